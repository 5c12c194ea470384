#!/usr/bin/env python3
"""edge-node's local engine against llama.cpp's llama-bench, alternating in one run.

For every model file, thread count and kernel path, runs `edge-node bench --local` and
`llama-bench` one after the other, ROUNDS times, and reports the median prefill and decode
tokens/s of each and their ratio. A kernel path pairs our forced path with the llama.cpp build
of the same instruction set (scripts/build-llama-cpp.sh):

  avx512: EDGE_CPU=avx512 against .bench/llama.cpp/avx512 (AVX-512 F/BW/VL/VNNI/BF16, AMX off)
  avx2:   EDGE_CPU=avx2   against .bench/llama.cpp/avx2   (AVX2/FMA/F16C only)

Prints a Markdown table (and, with --json FILE, every raw figure). Example:
  python3 scripts/bench_vs_llama_cpp.py --threads 1 2 --paths avx512 avx2 \\
      models/SmolLM2-135M-Instruct.Q4_1.gguf models/requant/*.gguf
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ours(binary, model, threads, path, prompt, gen):
    env = dict(os.environ, EDGE_CPU=path, RUST_LOG="warn")
    out = subprocess.run(
        [binary, "bench", "--local", "--model", model, "--threads", str(threads),
         "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--repeats", "1", "--json"],
        env=env, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["kernels"] == path, f"asked for {path}, ran {r['kernels']}"
    return r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r


def llama(build, model, threads, prompt, gen):
    exe = os.path.join(ROOT, ".bench/llama.cpp", build, "build/bin/llama-bench")
    out = subprocess.run(
        [exe, "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1",
         "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return pp, tg, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/edge-node"))
    ap.add_argument("--json", help="write every raw figure here")
    args = ap.parse_args()

    raw = []
    print("| file | path | threads | prefill ours / llama.cpp | ratio | decode ours / llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        name = os.path.basename(model).replace(".gguf", "")
        for path in args.paths:
            for t in args.threads:
                res = {"ours_pp": [], "ours_tg": [], "llama_pp": [], "llama_tg": []}
                for r in range(args.rounds):
                    log(f"{name} {path} t={t} round {r + 1}/{args.rounds}")
                    pp, tg, _ = ours(args.binary, model, t, path, args.prompt_tokens, args.gen_tokens)
                    res["ours_pp"].append(pp)
                    res["ours_tg"].append(tg)
                    pp, tg, _ = llama(path, model, t, args.prompt_tokens, args.gen_tokens)
                    res["llama_pp"].append(pp)
                    res["llama_tg"].append(tg)
                m = {k: statistics.median(v) for k, v in res.items()}
                raw.append({"file": name, "path": path, "threads": t, **res, "median": m})
                print(f"| {name} | {path} | {t} | {m['ours_pp']:.1f} / {m['llama_pp']:.1f} | "
                      f"**{m['ours_pp'] / m['llama_pp']:.2f}x** | {m['ours_tg']:.1f} / "
                      f"{m['llama_tg']:.1f} | **{m['ours_tg'] / m['llama_tg']:.2f}x** |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
