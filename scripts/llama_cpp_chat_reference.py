#!/usr/bin/env python3
"""Chat-template reference of llama.cpp's own Jinja engine, written as JSON test data.

Why: a file's `tokenizer.chat_template` is Jinja; llama.cpp renders it with its own engine in
llama-server (the C API's llama_chat_apply_template only knows built-in formats). This starts
llama-server on 127.0.0.1 with the file, asks POST /apply-template for each conversation and
POST /tokenize for the ids of the rendered prompt (BOS as the file says, specials parsed).

  python3 scripts/llama_cpp_chat_reference.py --server .bench/llama.cpp/avx512/build/bin/llama-server \\
      --model models/X.gguf --cases model/tests/data/X.chat-cases.json --out model/tests/data/X.chat.json
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cases = json.load(open(args.cases))
    port = free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(args.server))
    proc = subprocess.Popen(
        [args.server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-c", "512",
         "-t", "1", "--jinja"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.2)
        else:
            sys.exit("llama-server did not become healthy")
        out = {"model": os.path.basename(args.model), "engine": "llama-server --jinja", "chat": []}
        for case in cases["chat"]:
            rendered = post(port, "/apply-template", {"messages": case["messages"]})["prompt"]
            ids = post(port, "/tokenize", {"content": rendered, "add_special": True,
                                           "parse_special": True})["tokens"]
            out["chat"].append({"messages": case["messages"], "rendered": rendered, "ids": ids})
            print(repr(rendered[:80]), len(ids), file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
