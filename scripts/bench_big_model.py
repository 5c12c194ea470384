#!/usr/bin/env python3
"""A 7B-class model on four memory-limited nodes against llama.cpp running it whole, one run.

Why: the project's promise is a model no single device can hold, run across several at about
the speed one big process runs it. This measures exactly that on the synthetic Mistral-7B-shaped
Q4_0 file (scripts/make-synthetic-7b.sh): the `big-model` compose profile (four nodes, each in a
container limited to 1600 MiB, each taking a quarter of the blocks by --blocks auto
--max-memory) timed by `edge-node bench --bootstrap` from a client container (time to first
token of a 128-token prompt, per-token greedy decode latency), then llama.cpp's llama-bench on
the same file in one process with the same thread count as each node, the time to first token
being its 128-token prompt time. Also each node's peak RSS (VmHWM) and its cgroup's peak
(page cache included) next to the weight bytes of its slice.

Needs the image (bash deploy/build-image.sh) and the llama.cpp build (scripts/build-llama-cpp.sh).
One command (prints a Markdown table; --json FILE keeps every raw figure):
  python3 scripts/bench_big_model.py [--threads 2] [--gen-tokens 64] [--repeats 3]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "edgeswarm-bench-big"
NODES = ["big-node-a", "big-node-b", "big-node-c", "big-node-d"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def compose(*args, env=None):
    return ["docker-compose", "-p", PROJECT, "-f", os.path.join(ROOT, "deploy/docker-compose.yml"),
            "--profile", "big-model", *args]


def wait_healthy(service, env, within=300):
    deadline = time.time() + within
    while time.time() < deadline:
        cid = sh(compose("ps", "-q", service), env=env).strip()
        state = sh(["docker", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", cid]).split()
        if state[-1] == "healthy":
            return cid
        if state[0] not in ("running", "created"):
            raise RuntimeError(f"{service} stopped: {sh(['docker', 'logs', '--tail', '5', cid])}")
        time.sleep(0.5)
    raise RuntimeError(f"{service} not healthy within {within} s")


def cgroup_peak(cid):
    for p in (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.peak",
              f"/sys/fs/cgroup/docker/{cid}/memory.peak",
              f"/sys/fs/cgroup/memory/docker/{cid}/memory.max_usage_in_bytes"):
        if os.path.exists(p):
            return int(open(p).read()) / 2**20
    return None


def vm_hwm(cid):
    pid = sh(["docker", "inspect", "-f", "{{.State.Pid}}", cid]).strip()
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def weights_mib(service, env):
    logs = sh(compose("logs", "--no-color", service), env=env)
    vals = [l.split("weights_mib=")[1].split()[0].strip('"') for l in logs.splitlines() if "weights_mib=" in l]
    blocks = [l.split("blocks ")[1].split()[0] for l in logs.splitlines() if "serving blocks " in l]
    return (float(vals[-1]) if vals else None), (blocks[-1] if blocks else "?")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads of each node and of llama.cpp")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-build", default="avx512")
    ap.add_argument("--image", default=os.environ.get("EDGE_IMAGE", "edge-swarm/edge-node:latest"))
    ap.add_argument("--json", help="write every raw figure here")
    args = ap.parse_args()

    path = sh(["bash", os.path.join(ROOT, "scripts/make-synthetic-7b.sh"), "Q4_0"]).strip().splitlines()[-1]
    name = os.path.basename(path)
    in_container = f"/models/synthetic/{name}"
    env = dict(os.environ, EDGE_IMAGE=args.image, EDGE_API_PORT="18099")
    subprocess.run(compose("down", "-v", "--remove-orphans"), env=env, capture_output=True)
    raw = {"file": name, "file_bytes": os.path.getsize(path), "threads": args.threads}
    try:
        sh(compose("up", "-d", "bootstrap"), env=env)
        ids = {}
        for n in NODES:
            log(f"starting {n}")
            sh(compose("up", "-d", n), env=env)
            ids[n] = wait_healthy(n, env)
        log("timing the swarm")
        out = sh(compose("run", "--rm", "-T", "big-client", "bench", "--bootstrap",
                         "/dns4/bootstrap/tcp/31330", "--model", in_container,
                         "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                         "--repeats", str(args.repeats), "--json"), env=env)
        swarm = json.loads(out.strip().splitlines()[-1])
        raw["swarm"] = swarm
        nodes = []
        for n in NODES:
            w, blocks = weights_mib(n, env)
            limit = int(sh(["docker", "inspect", "-f", "{{.HostConfig.Memory}}", ids[n]]))
            nodes.append({"node": n, "blocks": blocks, "weights_mib": w, "peak_rss_mib": vm_hwm(ids[n]),
                          "cgroup_peak_mib": cgroup_peak(ids[n]), "limit_mib": limit / 2**20})
        raw["nodes"] = nodes
    finally:
        subprocess.run(compose("down", "-v", "--remove-orphans"), env=env, capture_output=True)

    log("timing llama.cpp")
    exe = os.path.join(ROOT, ".bench/llama.cpp", args.llama_build, "build/bin/llama-bench")
    rows = json.loads(sh([exe, "-m", path, "-t", str(args.threads), "-p", str(args.prompt_tokens),
                          "-n", str(args.gen_tokens), "-r", str(args.repeats), "-o", "json"]))
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    raw["llama_cpp"] = rows
    l_ttft, l_step = args.prompt_tokens / pp * 1e3, 1e3 / tg
    s_ttft, s_step = swarm["time_to_first_token_ms"], swarm["decode_ms_per_token"]

    print(f"file {name} ({raw['file_bytes'] / 2**30:.2f} GiB), {args.threads} threads per node and for llama.cpp, "
          f"prompt {args.prompt_tokens}, {args.gen_tokens} decode steps, median of {args.repeats}")
    print()
    print("| | time to first token (ms) | decode latency (ms/token) |")
    print("|---|---|---|")
    print(f"| 4 nodes, 1600 MiB containers | {s_ttft:.0f} | {s_step:.1f} |")
    print(f"| llama.cpp, one process ({args.llama_build}) | {l_ttft:.0f} | {l_step:.1f} |")
    print(f"| ratio (swarm / llama.cpp) | {s_ttft / l_ttft:.2f}x | {s_step / l_step:.2f}x |")
    print()
    print("| node | blocks | slice weights (MiB) | peak RSS (MiB) | RSS / (1.1 x slice + 64 MiB) | cgroup peak (MiB) | limit (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for n in nodes:
        w, r = n["weights_mib"], n["peak_rss_mib"]
        ratio = f"{r / (1.1 * w + 64):.2f}" if w and r else "?"
        cg = f"{n['cgroup_peak_mib']:.0f}" if n["cgroup_peak_mib"] else "?"
        print(f"| {n['node']} | {n['blocks']} | {w or 0:.0f} | {r or 0:.0f} | {ratio} | {cg} | {n['limit_mib']:.0f} |")
    if args.json:
        json.dump(raw, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
