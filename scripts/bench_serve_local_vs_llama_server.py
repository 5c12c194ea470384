#!/usr/bin/env python3
"""`edge-node serve-api --local` against llama.cpp's `llama-server --parallel N`, same run.

Both servers get the same GGUF file and thread count and the same load: N clients at once, each
streaming one `/v1/completions` of the same prompt with `max_tokens` greedy tokens (llama-server
is told `ignore_eos` so both generate the full count). Reported per server, median of ROUNDS
alternating rounds: aggregate tokens/s of the N streams (completion tokens from the usage chunk
over the wall time from the first request to the last `[DONE]`), mean time to first token, and
one stream alone for reference. Standard library only.

  python3 scripts/bench_serve_local_vs_llama_server.py --clients 8 --threads 2 \\
      --llama .bench/llama.cpp/avx2/build/bin models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The history of computing is a story of people finding ways to make machines do "
        "arithmetic faster and more reliably. Early mechanical calculators gave way to relays, "
        "then vacuum tubes, transistors and integrated circuits. ")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"server on port {port} not ready within {timeout} s")


def stream(port, model_id, prompt, n, extra):
    """One streamed completion: (completion tokens, seconds to first text, seconds in all)."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, tokens, chunks = None, None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        msg = json.loads(line[6:])
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
        for ch in msg.get("choices") or []:
            if ch.get("text"):
                chunks += 1
                if first is None:
                    first = time.time() - t0
    return (tokens if tokens is not None else chunks), first or 0.0, time.time() - t0


def load(port, model_id, prompt, n, clients, extra):
    results = [None] * clients

    def one(i):
        results[i] = stream(port, model_id, prompt, n, extra)

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    tokens = sum(r[0] for r in results)
    return tokens / wall, statistics.mean(r[1] for r in results) * 1e3, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--llama", required=True, help="llama.cpp build/bin with llama-server")
    ap.add_argument("--edge-node", default=os.path.join(ROOT, "target/release/edge-node"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    words = (TEXT * 20).split()[: a.prompt_words]
    prompt = " ".join(words)
    model_id = os.path.basename(a.model).removesuffix(".gguf")
    ctx = a.clients * (2 * a.prompt_words + a.gen + 64)

    def start_ours():
        port = free_port()
        p = subprocess.Popen(
            [a.edge_node, "serve-api", "--local", "--model", a.model, "--listen",
             f"127.0.0.1:{port}", "--threads", str(a.threads), "--max-sessions", str(a.clients)],
            env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL)
        return p, port, {}

    def start_llama():
        port = free_port()
        p = subprocess.Popen(
            [os.path.join(a.llama, "llama-server"), "-m", a.model, "-t", str(a.threads),
             "-tb", str(a.threads), "--parallel", str(a.clients), "-c", str(ctx), "--port",
             str(port), "--host", "127.0.0.1", "--no-webui", "-a", model_id],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return p, port, {"ignore_eos": True}

    figures = {"edge-node serve-api --local": [], "llama-server": []}
    for rnd in range(a.rounds):
        for name, start in (("edge-node serve-api --local", start_ours),
                            ("llama-server", start_llama)):
            p, port, extra = start()
            try:
                wait_ready(port, p)
                stream(port, model_id, prompt, 8, extra)  # warm-up
                single = load(port, model_id, prompt, a.gen, 1, extra)
                many = load(port, model_id, prompt, a.gen, a.clients, extra)
            finally:
                p.terminate()
                p.wait(timeout=30)
            log(f"round {rnd + 1} {name}: 1 stream {single[0]:.1f} tok/s, "
                f"{a.clients} streams {many[0]:.1f} tok/s ({many[2]} tokens), "
                f"first token {many[1]:.0f} ms")
            figures[name].append((single, many))

    print(f"| server | 1 stream tok/s | {a.clients} streams tok/s (all together) | "
          f"gain | first token, {a.clients} at once |")
    print("|---|---|---|---|---|")
    med = {}
    for name, runs in figures.items():
        one = statistics.median(r[0][0] for r in runs)
        many = statistics.median(r[1][0] for r in runs)
        ttft = statistics.median(r[1][1] for r in runs)
        med[name] = (one, many, ttft)
        print(f"| {name} | {one:.1f} | {many:.1f} | {many / one:.2f}x | {ttft:.0f} ms |")
    ours, theirs = med["edge-node serve-api --local"], med["llama-server"]
    print(f"\nours / llama-server: {a.clients} streams {ours[1] / theirs[1]:.2f}x, "
          f"1 stream {ours[0] / theirs[0]:.2f}x, first token {ours[2] / theirs[2]:.2f}x (lower is better)")


if __name__ == "__main__":
    main()
