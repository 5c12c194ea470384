#!/usr/bin/env bash
# The model families against llama.cpp in one run: `edge-node bench --local` and llama-bench on
# each real file (fetched by scripts/fetch-model.sh), then the memory of a node that holds a
# third of each model's blocks. Prints one JSON line per measurement; BENCHMARKS.md has the table.
#
#   scripts/bench-families.sh [THREADS]
#
# Needs a release build (cargo build --release -p cli) and llama-bench from
# scripts/build-llama-cpp.sh (LLAMA_BENCH_DIR, default .bench/llama.cpp/avx512/build/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
BIN=${LLAMA_BENCH_DIR:-.bench/llama.cpp/avx512/build/bin}
EDGE=./target/release/edge-node
[ -x "$EDGE" ] || { echo "error: build first: cargo build --release -p cli" >&2; exit 1; }
[ -x "$BIN/llama-bench" ] || { echo "error: no llama-bench in $BIN (scripts/build-llama-cpp.sh)" >&2; exit 1; }

lscpu | grep -E '^Model name' | sed 's/^/# /' >&2
grep -o 'avx512[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/# CPU flags: /' >&2; echo >&2
for spec in "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf 0..8" "gemma-3-270m.Q4_K_M.gguf 0..6"; do
  set -- $spec
  M=models/$1
  [ -f "$M" ] || { echo "error: $M missing: scripts/fetch-model.sh all" >&2; exit 1; }
  "$EDGE" bench --local --model "$M" --threads "$T" --json
  LD_LIBRARY_PATH="$BIN" "$BIN/llama-bench" -m "$M" -t "$T" -p 128 -n 128 -r 3 -o jsonl 2>/dev/null
  # A node's share: a third of the blocks, no embedding or head.
  "$EDGE" bench --local --model "$M" --threads "$T" --blocks "$2" --json
done
