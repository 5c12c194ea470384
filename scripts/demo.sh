#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model (skipped when present), build the
# optimised `edge-node` binary, and generate a chat answer with it, streamed as it is produced.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo build --release -p node --bin edge-node
exec ./target/release/edge-node generate --local \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --chat --prompt "${1:-Explain in two sentences why the sky is blue.}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-96}"
