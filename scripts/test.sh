#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh all
./scripts/setup-test-tools.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# The model's exactness tests again on every lower kernel path this CPU has (the default run
# above used the fastest), then on aarch64 under qemu (NEON with and without dotprod).
for path in avx2 portable; do
  if [ "$path" = portable ] || grep -qw avx2 /proc/cpuinfo; then
    echo "== model tests with EDGE_CPU=$path"
    EDGE_CPU=$path cargo test --locked -p model --quiet
  fi
done
bash scripts/test-aarch64.sh

# Fault scenarios against the docker-compose cluster, where a Docker engine is reachable. The
# image is made from the test build (dependencies and model math are optimised there too), so
# no second, release build is needed here.
if docker info >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1; then
  EDGE_PROFILE=debug bash deploy/build-image.sh
  cargo run --locked -p simulations --bin compose-scenarios -- all
else
  echo "compose scenarios SKIPPED: no Docker engine reachable (or no nsenter) on this machine"
fi
