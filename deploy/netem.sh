#!/usr/bin/env bash
# Shapes a running container's link with one of the named profiles the swarm simulator also
# uses (simulations/profiles/links.txt), with tc netem run from the host inside the container's
# network namespace: the image itself has no tc and needs none.
#
#   bash deploy/netem.sh PROFILE CONTAINER      # e.g. wan-100ms edgeswarm_node-d_1
#   bash deploy/netem.sh clear CONTAINER
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 PROFILE|clear CONTAINER" >&2; exit 2; }
profile=$1
pid=$(docker inspect -f '{{.State.Pid}}' "$2")
if [ "$profile" = clear ]; then
  nsenter -t "$pid" -n tc qdisc del dev eth0 root 2>/dev/null || true
  exit 0
fi
read -r delay jitter loss rate < <(awk -v p="$profile" '$1 == p { print $2, $3, $4, $5 }' simulations/profiles/links.txt)
if [ -z "${delay:-}" ]; then
  echo "unknown link profile '$profile'; known: $(awk '!/^#/ && NF { printf "%s ", $1 }' simulations/profiles/links.txt)" >&2
  exit 2
fi
nsenter -t "$pid" -n tc qdisc replace dev eth0 root netem \
  delay "${delay}ms" "${jitter}ms" loss "${loss}%" rate "${rate}mbit"
echo "$2: $profile (delay ${delay}ms ±${jitter}ms, loss ${loss}%, ${rate} Mbit/s)"
