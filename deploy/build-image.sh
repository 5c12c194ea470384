#!/usr/bin/env bash
# Builds the `edge-swarm/edge-node` image without pulling anything: no base image is needed.
# The binary and exactly the shared libraries it links (as `ldd` lists them) are assembled into
# a root file system with a non-root user and the CA certificates, and that tree becomes a
# `FROM scratch` image. The model is not baked in: compose mounts ../models. It also builds
# `edge-swarm/link-delay`, the relay the slow-link scenario uses where the kernel has no netem.
#
#   bash deploy/build-image.sh                    # release binary
#   EDGE_PROFILE=test bash deploy/build-image.sh  # the binaries of the workspace test build (CI)
#
# The binary runs on any x86-64 CPU: its kernels pick AVX-512, AVX2 or portable code at start.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${EDGE_IMAGE:-edge-swarm/edge-node:latest}
BINS=(-p cli --bin edge-node -p simulations --bin link-delay)
if [ "${EDGE_PROFILE:-release}" = test ]; then
  # The binaries `cargo test --workspace` builds for the integration tests (dependencies and the
  # model crate are optimised in that profile as well). Building them the way the tests do
  # selects the same features, so after the test run this compiles nothing; `cargo build -p ...`
  # would resolve features differently and compile half the dependency tree again.
  cargo test --workspace --locked --no-run --quiet
  OUT=target/debug
else
  cargo build --release "${BINS[@]}"
  OUT=target/release
fi

# assemble BINARY IMAGE: a FROM scratch image whose entrypoint is BINARY.
assemble() {
  local bin=$1 image=$2 name
  name=$(basename "$bin")
  local ctx="deploy/.build/$name"
  local root="$ctx/rootfs"
  rm -rf "$ctx"
  mkdir -p "$root"/{etc/ssl/certs,home/edge,tmp}
  chmod 1777 "$root/tmp"
  cp "$bin" "$root/$name"
  strip --strip-debug "$root/$name" 2>/dev/null || true
  # Every library the binary loads, at the path the dynamic linker expects it.
  ldd "$bin" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  if [ -e /lib64/ld-linux-x86-64.so.2 ]; then
    mkdir -p "$root/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
  fi
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  fi
  echo "edge:x:1000:1000:edge-swarm:/home/edge:/$name" >"$root/etc/passwd"
  echo "edge:x:1000:" >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
USER 1000:1000
WORKDIR /home/edge
ENTRYPOINT ["/$name"]
DOCKERFILE
  docker build --quiet -t "$image" "$ctx" >/dev/null
  echo "built $image ($(du -sh "$root" | cut -f1) root file system)"
}

assemble "$OUT/edge-node" "$IMAGE"
assemble "$OUT/link-delay" "${EDGE_DELAY_IMAGE:-edge-swarm/link-delay:latest}"
