#!/usr/bin/env bash
# The default model in the quantizations people download, made from the default Q4_1 file with
# llama.cpp's llama-quantize --allow-requantize, for kernel tests and benchmarks:
#   models/requant/SmolLM2-135M-Instruct.{Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0}.gguf   (git-ignored)
# SmolLM2's 576-wide rows are not a multiple of 256, so llama-quantize keeps K-quants where a
# row allows them and falls back per tensor: the "Q4_K_M" file holds Q5_0, Q8_0, Q4_K and Q6_K
# tensors, "Q5_K_M" Q5_1, Q8_0, Q5_K and Q6_K; together they cover every common format.
# Needs llama.cpp built by scripts/build-llama-cpp.sh. Skips a file that is present with the
# expected SHA-256 (llama-quantize is deterministic); remakes it otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=models/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=models/requant
declare -A SHA=(
  [Q4_K_M]=dc0f3a02e821146247a0af6895adf9872124f368682cb110cb9ed09ff2a9f9f1
  [Q5_K_M]=8170c7ef444692b3b2fe63459c326def0358807ef9be6e3cb020efb86a71015e
  [Q6_K]=a969ae2086dd4945a7c61594bf72b2bcc3b7df8571c92aed8f213918673a7f80
  [Q8_0]=7b46609d11703c058397e5cfe4cc6e4b2508cb1eb4c80ddc472a5d421fbdb508
  [Q4_0]=aa4256f3b46eb4add75ece1c0eeac1c6e4f1ec0c93e6fbe64fe1770f4ad09ae8
)

./scripts/fetch-model.sh >/dev/null
mkdir -p "$OUT"
quantize=""
for build in avx512 avx2; do
  if [ -x ".bench/llama.cpp/$build/build/bin/llama-quantize" ]; then
    quantize=".bench/llama.cpp/$build/build/bin/llama-quantize"
    break
  fi
done
for type in Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0; do
  file="$OUT/SmolLM2-135M-Instruct.$type.gguf"
  if [ -f "$file" ] && echo "${SHA[$type]}  $file" | sha256sum --check --status; then
    echo "present: $file"
    continue
  fi
  [ -n "$quantize" ] || { bash scripts/build-llama-cpp.sh; exec bash "$0"; }
  "$quantize" --allow-requantize "$SRC" "$file.tmp" "$type" "$(nproc)" >/dev/null 2>&1
  if ! echo "${SHA[$type]}  $file.tmp" | sha256sum --check --status; then
    echo "warning: $file differs from the recorded SHA-256 (another llama.cpp version?)" >&2
  fi
  mv "$file.tmp" "$file"
  echo "made: $file"
done
