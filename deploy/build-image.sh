#!/usr/bin/env bash
# Builds the `edge-swarm/edge-node` image without pulling anything: no base image is needed.
# The release binary and exactly the shared libraries it links (as `ldd` lists them) are
# assembled into a root file system with a non-root user and the CA certificates, and that tree
# becomes a `FROM scratch` image. The model is not baked in: compose mounts ../models.
#
#   bash deploy/build-image.sh            # binary for this machine's CPU
#   EDGE_TARGET_CPU=x86-64-v3 bash deploy/build-image.sh   # portable to any AVX2 machine
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${EDGE_IMAGE:-edge-swarm/edge-node:latest}
CPU=${EDGE_TARGET_CPU:-}
if [ "${EDGE_PROFILE:-release}" = debug ]; then
  # The test build: dependencies and the model crate are optimised in it as well.
  cargo build -p node --bin edge-node
  BIN=target/debug/edge-node
elif [ -n "$CPU" ]; then
  # A different target CPU gets its own target dir, so local builds are not thrown away.
  RUSTFLAGS="-C target-cpu=$CPU" cargo build --release -p node --bin edge-node --target-dir "target/cpu-$CPU"
  BIN="target/cpu-$CPU/release/edge-node"
else
  cargo build --release -p node --bin edge-node
  BIN=target/release/edge-node
fi

CTX=deploy/.build
ROOT=$CTX/rootfs
rm -rf "$CTX"
mkdir -p "$ROOT"/{etc/ssl/certs,home/edge,tmp,data}
chmod 1777 "$ROOT/tmp"
cp "$BIN" "$ROOT/edge-node"
strip --strip-debug "$ROOT/edge-node" 2>/dev/null || true

# Every library the binary loads, at the path the dynamic linker expects it.
ldd "$BIN" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u | while read -r lib; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
if [ -e /lib64/ld-linux-x86-64.so.2 ]; then
  mkdir -p "$ROOT/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
fi
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"
echo "edge:x:1000:1000:edge-node:/home/edge:/edge-node" >"$ROOT/etc/passwd"
echo "edge:x:1000:" >"$ROOT/etc/group"
printf 'hosts: files dns\n' >"$ROOT/etc/nsswitch.conf"

cat >"$CTX/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
USER 1000:1000
WORKDIR /home/edge
ENTRYPOINT ["/edge-node"]
DOCKERFILE
# The data directory must be writable by the non-root user (health file, identity).
docker build --quiet -t "$IMAGE" "$CTX" >/dev/null
echo "built $IMAGE ($(du -sh "$ROOT" | cut -f1) root file system)"
