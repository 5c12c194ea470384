#!/usr/bin/env bash
# The model crate's kernel and block tests on aarch64, without ARM hardware: cross-compiled with
# Debian's aarch64 gcc as linker and run under qemu-user with `-cpu max` (NEON, dotprod, i8mm),
# once on every NEON path (the dot-product one and the one without). What the tests check is the
# same as on x86: each path bit-identical to the portable definition, blocks and split stacks
# bit-identical, the default model against llama.cpp's outputs.
#
# Installs what is missing (rustup target; gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and
# qemu-user via apt, which needs root or sudo); prints a SKIPPED line and exits 0 only when those
# cannot be installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
skip() { echo "aarch64 tests SKIPPED: $*"; exit 0; }

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  rustup target add "$TARGET" >/dev/null 2>&1 || skip "rustup cannot add the $TARGET target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1 \
   || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || skip "need root or sudo to apt-get install the cross tools"
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  { $sudo apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq gcc-aarch64-linux-gnu \
           libc6-dev-arm64-cross qemu-user >/dev/null; }; } \
    || skip "apt-get could not install gcc-aarch64-linux-gnu and qemu-user"
fi

# The linker and the qemu runner come from .cargo/config.toml. The tests find the x86 checkout's
# model file through $EDGE_MODEL; qemu needs no access beyond the working tree.
export EDGE_MODEL=${EDGE_MODEL:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
cargo test --locked -p model --target "$TARGET" --no-run
for path in dotprod neon; do
  echo "== aarch64 model tests, EDGE_CPU=$path (qemu-aarch64 -cpu max)"
  EDGE_CPU=$path cargo test --locked -p model --target "$TARGET" --quiet
done
