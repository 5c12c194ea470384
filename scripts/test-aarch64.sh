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
# The real Qwen2.5 and Gemma 3 files against llama.cpp (families::) are skipped here: under
# emulation they take a quarter of an hour per path, and what they would add is already proven
# elsewhere: their block math is the same code on every architecture (checked on x86), and the
# kernels they run (Q4_K, Q5_0, Q6_K, Q8_0, F32) are checked bit for bit against the portable
# definition by the kernel tests below, which equal the x86 paths.
# The NEON path without dotprod differs from the dotprod one only in its kernels, so it runs the
# kernel tests and the synthetic block tests, not the default-model runs again.
echo "== aarch64 model tests, EDGE_CPU=dotprod (qemu-aarch64 -cpu max)"
EDGE_CPU=dotprod cargo test --locked -p model --target "$TARGET" --quiet -- --skip families::
echo "== aarch64 kernel and synthetic block tests, EDGE_CPU=neon (qemu-aarch64 -cpu max)"
EDGE_CPU=neon cargo test --locked -p model --target "$TARGET" --quiet --lib
EDGE_CPU=neon cargo test --locked -p model --target "$TARGET" --quiet --test it -- synthetic
