#!/usr/bin/env bash
# Writes the full-size synthetic models (Mistral-7B shape: 32 blocks, d=4096, 8 KV heads, FFN
# 14336, vocabulary 32000) as GGUF into models/synthetic/ (git-ignored): Q4_0 and Q4_K_M by
# default, or the quantizations named. A file already there is checked (size, header and the
# first bytes of every tensor, as the seeded generator makes them) and kept.
#
#   bash scripts/make-synthetic-7b.sh            # both, ~4.1 and ~4.4 GB
#   bash scripts/make-synthetic-7b.sh Q4_0
#   bash scripts/make-synthetic-7b.sh --shape llama2-7b Q4_0   # Llama-2-7B: 32 KV heads, FFN 11008
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --locked -q -p model --example synthetic_7b -- models/synthetic "$@"
