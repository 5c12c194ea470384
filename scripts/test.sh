#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage prints the time since the start, so a slow CI run says where its minutes went.
stage() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }
trap 'stage "test script ended (exit $?)"' EXIT

stage "models and test tools"
./scripts/fetch-model.sh all
./scripts/setup-test-tools.sh
stage "format, paths, lint"
cargo fmt --all -- --check
python3 scripts/check-inside-repo.py
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "workspace tests"
cargo test --workspace --locked

# The model's exactness tests again on every lower kernel path this CPU has (the default run
# above used the fastest, so the path it picked is not run twice), then on aarch64 under qemu
# (NEON with and without dotprod).
has() { grep -qw "$1" /proc/cpuinfo; }
paths=""
if has avx2 && has fma && has f16c; then
  if has avx512f && has avx512bw && has avx512vl && has avx512_vnni; then paths="avx2"; fi
  paths="$paths portable"
fi
# The model crate's test binaries as the workspace build above made them: `cargo test -p model`
# would resolve features for that crate alone and recompile its dependencies (6 min on 2 cores).
model_tests=$(cargo test --workspace --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["manifest_path"].endswith("/model/Cargo.toml"):
        print(m["executable"])')
[ -n "$model_tests" ] || { echo "no test binaries of the model crate found" >&2; exit 1; }
# The Qwen2.5 and Gemma 3 files against llama.cpp (families::) run once, on the default path:
# their block math is the same code on every path, and the kernels they use are checked bit for
# bit against the portable definition by the kernel tests, which do run here. On the scalar
# path they alone took 4-7 minutes.
for path in $paths; do
  stage "model tests with EDGE_CPU=$path"
  for exe in $model_tests; do (cd model && EDGE_CPU=$path "$exe" --quiet --skip families::); done
done
stage "aarch64 tests under qemu"
bash scripts/test-aarch64.sh

# Homes behind NAT routers in network namespaces (issue 16): nodes reachable only through the
# circuit relay and hole punching, delayed access links; the edge-node binary the workspace test
# build above made. Prints SKIPPED where namespaces cannot be made.
stage "NAT traversal in network namespaces"
bash simulations/netns/wan.sh test target/debug

# Fault scenarios against the docker-compose cluster, where a Docker engine is reachable. The
# image is made from the binaries the workspace test build above already made (dependencies and
# model math are optimised there too), so nothing is compiled again here.
if docker info >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1; then
  stage "image and compose scenarios"
  EDGE_PROFILE=test bash deploy/build-image.sh
  target/debug/compose-scenarios all
else
  echo "compose scenarios SKIPPED: no Docker engine reachable (or no nsenter) on this machine"
fi
