#!/usr/bin/env python3
"""Reference outputs of llama.cpp for a GGUF file, written as JSON test data.

Why: the model crate must compute what llama.cpp computes (token ids, greedy tokens,
log-probabilities). This runs llama.cpp itself (through the pure-ctypes llama-cpp-python
binding over a llama.cpp build, see scripts/build-llama-cpp.sh) on the cases of a spec file
and records what it produced, so the tests need no llama.cpp build.

Run (paths of the build made by scripts/build-llama-cpp.sh):
  PYTHONPATH=.bench/llama.cpp/src LLAMA_CPP_LIB_PATH=.bench/llama.cpp/avx512/build/bin \\
    python3 scripts/llama_cpp_reference.py --model models/X.gguf \\
      --cases model/tests/data/cases.json --out model/tests/data/X.json [--n-ctx N]

Cases (JSON): {"generations": [{"prompt": str, "tokens": int}],
               "tokenize": [str], "chat": [{"messages": [...], "template": "gemma"?}]}
- generations: prompt tokenized with BOS as the file says and specials parsed, then greedy
  decoding one token per llama_decode with flash attention on (the arithmetic the Rust
  kernels follow); per position the chosen id, its log-probability and the top-1/top-2
  margin; near_tie_index is the first position whose margin is below 0.2 nats.
- tokenize: ids without BOS, specials parsed.
- chat: rendered with llama.cpp's built-in template named by "template" (llama_chat_apply_template)
  and tokenized as a prompt (BOS as the file says). Files whose template needs the Jinja engine
  get their chat references from llama-server instead (scripts/llama_cpp_chat_reference.py).
"""
import argparse
import ctypes
import hashlib
import json
import math
import sys

import llama_cpp


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flash-attn", action="store_true",
                    help="llama.cpp's other attention kernel, to see how much llama.cpp moves itself")
    ap.add_argument("--ubatch", type=int, default=0, help="llama.cpp's micro-batch (default n_ctx)")
    ap.add_argument("--no-repack", action="store_true",
                    help="keep weights as in the file (llama.cpp's use_extra_bufts = false)")
    args = ap.parse_args()
    cases = json.load(open(args.cases))
    if args.no_repack:
        default_params = llama_cpp.llama_model_default_params

        def no_repack_params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = no_repack_params

    llm = llama_cpp.Llama(
        model_path=args.model, n_gpu_layers=0, n_ctx=args.n_ctx, n_batch=args.n_ctx,
        n_ubatch=args.ubatch or args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
        flash_attn=not args.no_flash_attn, verbose=False,
    )
    ctx, vocab = llm.ctx, llm._model.vocab
    mem = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def tokenize(text, add_special):
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 16))()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), add_special, True)
        if n < 0:
            buf = (llama_cpp.llama_token * (-n))()
            n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), add_special, True)
        return list(buf[:n])

    batch = llama_cpp.llama_batch_init(args.n_ctx, 0, 1)

    def decode(tokens, pos0):
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return [ptr[i] for i in range(n_vocab)]

    out = {
        "model": args.model.rsplit("/", 1)[-1],
        "model_sha256": hashlib.sha256(open(args.model, "rb").read()).hexdigest(),
        "llama_cpp_python": llama_cpp.__version__,
        "n_ctx": args.n_ctx,
        "flash_attn": not args.no_flash_attn,
        "repack": not args.no_repack,
        "generations": [],
        "tokenize": [],
        "chat": [],
    }
    for case in cases.get("generations", []):
        prompt = case["prompt"]
        ids = tokenize(prompt, True)
        llama_cpp.llama_memory_clear(mem, True)
        logits = decode(ids, 0)
        gen, lps, margins = [], [], []
        for i in range(case["tokens"]):
            m = max(logits)
            lse = math.log(sum(math.exp(x - m) for x in logits)) + m
            order = sorted(range(n_vocab), key=lambda j: -logits[j])[:2]
            tok = order[0]
            gen.append(tok)
            lps.append(logits[tok] - lse)
            margins.append(logits[order[0]] - logits[order[1]])
            logits = decode([tok], len(ids) + i)
        tie = next((i for i, mg in enumerate(margins) if mg < 0.2), None)
        text = llm.detokenize(gen).decode("utf-8", "replace")
        log(f"{prompt[:40]!r}: {len(ids)} prompt tokens -> {text[:60]!r} (near tie {tie})")
        out["generations"].append({
            "prompt": prompt,
            "prompt_token_ids": ids,
            "generated_token_ids": gen,
            "generated_text": text,
            "chosen_logprob_per_position": [round(x, 6) for x in lps],
            "top2_margin_per_position": [round(x, 6) for x in margins],
            "near_tie_index": tie,
        })
    for text in cases.get("tokenize", []):
        out["tokenize"].append({"text": text, "ids": tokenize(text, False)})
    for case in cases.get("chat", []):
        msgs = case["messages"]
        arr = (llama_cpp.llama_chat_message * len(msgs))()
        keep = []
        for i, m in enumerate(msgs):
            role, content = m["role"].encode(), m["content"].encode()
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        tmpl = case["template"].encode()
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(msgs), True, buf, size)
        if n < 0 or n > size:
            raise RuntimeError(f"chat template {case['template']} failed ({n})")
        rendered = buf.raw[:n].decode()
        out["chat"].append({
            "messages": msgs,
            "template": case["template"],
            "rendered": rendered,
            "ids": tokenize(rendered, True),
        })
    llama_cpp.llama_batch_free(batch)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
