#!/usr/bin/env python3
"""llama.cpp baseline benchmark (via llama-cpp-python), for comparison with our Rust engine.

Why: to judge our own inference engine we need the reference numbers llama.cpp
gets on the *same* GGUF file, thread count, prompt length and generation length
on this machine. Install the pinned binding with scripts/install-llama-cpp.sh.

Measures, on CPU only (n_gpu_layers=0, same n_threads for batch and generation):
  * prefill: one llama_decode of exactly P prompt tokens (n_batch = n_ubatch >= P)
  * decode:  G greedy steps after that prompt, one token per llama_decode call;
             only the llama_decode calls are timed (greedy sampling is not)
Each of R repeats starts from an empty KV cache; the reported throughput is the
MEDIAN over repeats. One untimed warm-up (prefill + a few decode steps) runs first.
peak_rss_mib is the process's ru_maxrss at the end (after load and all runs);
python_rss_mib is ru_maxrss before the model was loaded (interpreter + imports).

Prints one JSON line on stdout; progress goes to stderr.
Example:
  python3 scripts/llama_cpp_bench.py --model m.gguf --threads 2 \
      --prompt-tokens 128 --gen-tokens 128 --repeats 3
"""
import argparse
import json
import resource
import statistics
import sys
import time

import llama_cpp

PROMPT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors "
    "in Europe experimented with two-wheeled machines that riders pushed along with their "
    "feet. Over the following decades, pedals, chains and pneumatic tyres turned the "
    "bicycle into a practical means of transport. Today millions of people ride to work, "
    "to school and to the shops every day, and many cities have built dedicated lanes to "
    "keep cyclists safe from traffic. Explain briefly why the bicycle became so popular, "
    "and describe how it changed everyday life for ordinary families."
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    P, G = args.prompt_tokens, args.gen_tokens

    python_rss = rss_mib()
    n_batch = max(P, 512)
    llm = llama_cpp.Llama(
        model_path=args.model, n_gpu_layers=0, n_ctx=P + G + 16,
        n_batch=n_batch, n_ubatch=n_batch,
        n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
    )
    ctx = llm.ctx
    mem = llama_cpp.llama_get_memory(ctx)

    # Fixed English prompt, tokens repeated/truncated to exactly P.
    base = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    prompt = (base * (P // len(base) + 1))[:P]

    batch = llama_cpp.llama_batch_init(max(P, 1), 0, 1)
    sampler = llama_cpp.llama_sampler_init_greedy()

    def decode(tokens, pos0):
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(ctx, batch)
        llama_cpp.llama_synchronize(ctx)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return dt

    def run(n_gen):
        llama_cpp.llama_memory_clear(mem, True)  # empty KV cache for every run
        t_prefill = decode(prompt, 0)
        t_decode = 0.0
        out = []
        for i in range(n_gen):
            tok = llama_cpp.llama_sampler_sample(sampler, ctx, -1)  # greedy argmax
            out.append(tok)
            t_decode += decode([tok], P + i)
        return t_prefill, t_decode, out

    run(8)  # untimed warm-up
    prefill, dec = [], []
    for r in range(args.repeats):
        tp, td, out = run(G)
        prefill.append(P / tp)
        dec.append(G / td)
        log(f"repeat {r}: prefill {prefill[-1]:.1f} tok/s, decode {dec[-1]:.1f} tok/s")
    log("sample output:", repr(llm.detokenize(out).decode("utf-8", "replace")[:120]))

    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_batch_free(batch)
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python_version": llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": P,
        "gen_tokens": G,
        "prefill_tokens_per_s": round(statistics.median(prefill), 2),
        "decode_tokens_per_s": round(statistics.median(dec), 2),
        "peak_rss_mib": round(rss_mib(), 1),
        "python_rss_mib": round(python_rss, 1),
        "repeats": args.repeats,
        "stat": "median",
    }))


if __name__ == "__main__":
    main()
