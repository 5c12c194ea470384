#!/usr/bin/env bash
# What one hidden-state copy costs on a link, apart from the swarm: a fresh TCP connection per
# transfer over a tun-delay.py pair between two namespaces, the receiver timing from accept to
# the last byte.
#
#   simulations/netns/xfer.sh [TUN-DELAY ARGS...]    # default: --rate 30 70 (two lte links)
#
# Sizes: a 135-row copy of SmolLM2-135M's 576-wide hidden states in f32, f16 and q8 (311040,
# 155520, 78300 bytes), three times each. Needs root; prints SKIPPED where namespaces cannot
# be made. WAN_PREFIX (default es16) names the namespaces and devices, as in wan.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${WAN_PREFIX:-es16}
case "$P" in *[!a-z0-9]* | '') echo "WAN_PREFIX must be lowercase letters and digits" >&2; exit 2 ;; esac
[ ${#P} -le 13 ] || { echo "WAN_PREFIX is longer than 13 characters" >&2; exit 2; }
[ $# -gt 0 ] || set -- --rate 30 70
[ "$(id -u)" = 0 ] && [ -c /dev/net/tun ] || { echo "SKIPPED: xfer: needs root and /dev/net/tun"; exit 0; }
ip netns add "$P-xa" 2>/dev/null || { echo "SKIPPED: xfer: cannot create network namespaces"; exit 0; }
ip netns add "$P-xb"
LOG=$(mktemp -d "/tmp/$P-xfer.XXXXXX")
LINK=""
cleanup() {
  [ -z "$LINK" ] || kill "$LINK" 2>/dev/null || true
  ip netns del "$P-xa" 2>/dev/null || true
  ip netns del "$P-xb" 2>/dev/null || true
  rm -rf "$LOG"
}
trap cleanup EXIT
python3 simulations/netns/tun-delay.py "$@" "${P}ya" "${P}yb" >"$LOG/link.out" 2>"$LOG/link.err" &
LINK=$!
for _ in $(seq 1 50); do grep -q ready "$LOG/link.out" && break; sleep 0.1; done
grep -q ready "$LOG/link.out" || { cat "$LOG/link.err" >&2; exit 1; }
ip link set "${P}ya" netns "$P-xa"
ip link set "${P}yb" netns "$P-xb"
ip -n "$P-xa" addr add 10.99.0.1/24 dev "${P}ya"
ip -n "$P-xa" link set "${P}ya" up
ip -n "$P-xb" addr add 10.99.0.2/24 dev "${P}yb"
ip -n "$P-xb" link set "${P}yb" up
echo "# tun-delay.py $*: fresh TCP connection per transfer, accept to last byte"
for size in 311040 155520 78300 311040 155520 78300 311040 155520 78300; do
  ip netns exec "$P-xb" timeout 20 python3 -c '
import socket, sys, time
size = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.99.0.2", 5001))
s.listen(1)
print("up", flush=True)
c, _ = s.accept()
t0, n = time.monotonic(), 0
while n < size:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
print(n, "bytes in %.0f ms" % ((time.monotonic() - t0) * 1000), flush=True)' "$size" >"$LOG/recv.out" &
  recv=$!
  for _ in $(seq 1 50); do grep -q up "$LOG/recv.out" 2>/dev/null && break; sleep 0.05; done
  ip netns exec "$P-xa" timeout 20 python3 -c '
import socket, sys
s = socket.create_connection(("10.99.0.2", 5001))
s.sendall(b"x" * int(sys.argv[1]))
s.close()' "$size"
  wait "$recv"
  tail -1 "$LOG/recv.out"
done
