#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model (skipped when present), build the
# optimised `edge-node`, start a small swarm on 127.0.0.1 (a bootstrap peer and three nodes,
# each holding a third of the model's 30 blocks), generate a chat answer through it, show the
# route and the speed, and stop every process it started (also on Ctrl-C).
#
#   bash scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo build --release -p cli --bin edge-node

BIN=./target/release/edge-node
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT=${1:-Explain in two sentences why the sky is blue.}
LOGS=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME ARGS...: runs edge-node in the background and sets ADDR to its TCP address.
start() {
  local name=$1
  shift
  "$BIN" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 600); do
    ADDR=$(sed -n 's#^listening on \(/ip4/127.0.0.1/tcp/.*\)$#\1#p' "$LOGS/$name.out" | head -n1)
    [ -n "$ADDR" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "edge-node $name failed to start:" >&2
      cat "$LOGS/$name.err" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "edge-node $name printed no address within 60 s" >&2
  exit 1
}

start bootstrap bootstrap --listen /ip4/127.0.0.1/tcp/0 --no-mdns
BOOT=$ADDR
echo "bootstrap peer: $BOOT"
for blocks in 0..10 10..20 20..30; do
  start "node-$blocks" join --model "$MODEL" --blocks "$blocks" --listen /ip4/127.0.0.1/tcp/0 \
    --bootstrap "$BOOT" --no-mdns --threads 1
  echo "node for blocks $blocks: $ADDR"
done

echo "generating through the swarm..."
"$BIN" generate --bootstrap "$BOOT" --model "$MODEL" --chat --prompt "$PROMPT" \
  --max-new-tokens "${MAX_NEW_TOKENS:-96}"
