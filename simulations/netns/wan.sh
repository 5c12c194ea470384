#!/usr/bin/env bash
# Homes behind NAT routers on one "internet", built from network namespaces on this machine.
#
#   simulations/netns/wan.sh test  [BIN_DIR]   # text through 3 NATed nodes equals local; a killed
#                                              # node behind NAT is rerouted around
#   simulations/netns/wan.sh bench [BIN_DIR]   # per-token decode latency through 3 nodes at
#                                              # 5/25/50 ms one-way: relayed by the client vs push
#   simulations/netns/wan.sh ttft  [BIN_DIR]   # time to first token of a 128-token prompt through
#                                              # 3 nodes on lte links (35 ms, 30 Mbit/s), per
#                                              # wire dtype (f32, f16, bf16, q8), push on
#   simulations/netns/wan.sh chat  [BIN_DIR]   # two turns of `chat --wire-dtype auto` on those
#                                              # links: the dtype each sender chose per turn, once
#                                              # its links' rates are measured
#
# BIN_DIR holds edge-node (default target/release). Needs root (ip netns, iptables, /dev/net/tun)
# and python3; prints one SKIPPED line and exits 0 where namespaces cannot be made.
# WAN_PREFIX (default es16, at most 13 lowercase letters and digits) names the namespaces and
# interfaces, so runs with different prefixes can coexist on one machine.
#
# Topology: namespace <P>-wan is the internet; it holds the bootstrap peer at 100.64.0.1, which
# is also the circuit relay (v2). Home i is a router <P>-ri (WAN 100.64.i.2 on a veth to the
# internet, LAN 10.i.0.1; iptables MASQUERADE out, new connections in dropped, no port
# forwarded) and a host <P>-hi (10.i.0.2) behind it. Homes 1..3 (and 5 in `test`) run a node,
# home 4 the client. In `test`, home 3's router maps every new flow to a random port
# (MASQUERADE --random-fully: a symmetric, address-and-port-dependent NAT), so no hole punch
# can reach node 3 and its connections must stay relayed. The access link between host and
# router is a pair of TUN devices joined by tun-delay.py (beside this script), which holds
# every packet, TCP or UDP, for the link's one-way delay in each direction (in `ttft` it also
# serialises packets at the profile's rate before the delay): it is the home's only way in or
# out, so nothing bypasses the delay. (tc netem would be the kernel's way; this machine's
# kernel has no sch_netem. The link-delay TCP relay cannot be used here: it is a port forward,
# which would make a node reachable without NAT traversal, and it carries no UDP.)
#
# Nodes are not reachable from outside their home: each reserves a slot on the relay and
# announces the relayed address (/p2p/<relay>/p2p-circuit); peers that dial it are relayed, then
# DCUtR tries to punch through both NATs (the node listens on a fixed QUIC and TCP port, Linux
# MASQUERADE keeps the source port, and conntrack lets the answer to an outgoing packet in). The
# test says from the logs whether the connections ended up direct or relayed.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODE=${1:-test}
BIN=${2:-target/release}
P=${WAN_PREFIX:-es16}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
BOOT_TCP=/ip4/100.64.0.1/tcp/31000
BOOT_QUIC=/ip4/100.64.0.1/udp/31000/quic-v1
DELAY_LINK=simulations/netns/tun-delay.py
# Interfaces are ${P}<letter><home>: Linux allows 15 characters, so P has at most 13.
case "$P" in
  *[!a-z0-9]* | '') echo "WAN_PREFIX must be lowercase letters and digits: $P" >&2; exit 2 ;;
esac
[ ${#P} -le 13 ] || { echo "WAN_PREFIX is longer than 13 characters: $P" >&2; exit 2; }
# Set per mode: the access links' rate in Mbit/s (empty: delay only), and the homes whose NAT
# is symmetric.
LINK_RATE=""
SYMMETRIC=""

skip() { echo "SKIPPED: netns wan $MODE: $*"; exit 0; }
case "$MODE" in test|bench|ttft|chat) ;; *) echo "usage: $0 test|bench|ttft|chat [BIN_DIR]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || skip "needs root for ip netns and iptables"
command -v ip >/dev/null && command -v iptables >/dev/null || skip "ip or iptables missing"
command -v python3 >/dev/null || skip "python3 missing"
[ -c /dev/net/tun ] || skip "no /dev/net/tun"
[ -x "$BIN/edge-node" ] || skip "no edge-node in $BIN"
[ -f "$MODEL" ] || skip "model missing: run scripts/fetch-model.sh first"
ip netns add $P-probe 2>/dev/null || skip "cannot create network namespaces"
if ! ip netns exec $P-probe iptables -t nat -L >/dev/null 2>&1; then
  ip netns del $P-probe
  skip "no iptables nat table in a namespace"
fi
ip netns del $P-probe
LOG=$(mktemp -d "/tmp/$P-wan.XXXXXX")

PIDS=()
declare -A NODE_PID LINK_PID
# Stops every process this script started, then removes its namespaces.
teardown() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  # Anything left inside our namespaces (a process whose pid we did not hold) goes too.
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns"
  done
}
cleanup() {
  local rc=$?
  teardown
  [ $rc = 0 ] || echo "logs in $LOG" >&2
}
trap cleanup EXIT

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

internet() {
  ip netns add $P-wan
  in_ns $P-wan ip link set lo up
  in_ns $P-wan ip addr add 100.64.0.1/32 dev lo
  in_ns $P-wan sysctl -qw net.ipv4.ip_forward=1
}

# home I DELAY_MS: router $P-rI with a NAT, host $P-hI behind it on a delayed access link
# (LINK_RATE Mbit/s each way when set; the NAT symmetric when I is in SYMMETRIC).
home() {
  local i=$1 d=$2 r=$P-r$1 h=$P-h$1
  ip netns add "$r"
  ip netns add "$h"
  ip link add ${P}w$i type veth peer name ${P}x$i
  ip link set ${P}w$i netns $P-wan
  ip link set ${P}x$i netns "$r"
  in_ns $P-wan ip addr add 100.64.$i.1/24 dev ${P}w$i
  in_ns $P-wan ip link set ${P}w$i up
  in_ns "$r" ip link set lo up
  in_ns "$r" ip addr add 100.64.$i.2/24 dev ${P}x$i
  in_ns "$r" ip link set ${P}x$i up
  in_ns "$r" ip route add default via 100.64.$i.1
  # The access link: TUN ${P}u$i (router) <-> ${P}t$i (host), every packet delayed d ms.
  python3 $DELAY_LINK ${LINK_RATE:+--rate "$LINK_RATE"} "$d" ${P}u$i ${P}t$i >"$LOG/link$i.out" 2>"$LOG/link$i.err" &
  PIDS+=($!)
  LINK_PID[$i]=$!
  for _ in $(seq 1 200); do grep -q ready "$LOG/link$i.out" 2>/dev/null && break; sleep 0.1; done
  grep -q ready "$LOG/link$i.out" || { echo "FAIL: tun-delay for home $i did not start:" >&2; cat "$LOG/link$i.err" >&2; exit 1; }
  ip link set ${P}u$i netns "$r"
  ip link set ${P}t$i netns "$h"
  in_ns "$r" ip addr add 10.$i.0.1/24 dev ${P}u$i
  in_ns "$r" ip link set ${P}u$i up
  in_ns "$h" ip link set lo up
  in_ns "$h" ip addr add 10.$i.0.2/24 dev ${P}t$i
  in_ns "$h" ip link set ${P}t$i up
  in_ns "$h" ip route add default dev ${P}t$i
  in_ns "$r" sysctl -qw net.ipv4.ip_forward=1
  local random=()
  # A symmetric NAT: each new flow (another peer, or the same peer on another port) leaves on a
  # fresh random port, so the port a peer observed is no use to any other: no hole punch.
  case " $SYMMETRIC " in *" $i "*) random=(--random-fully) ;; esac
  in_ns "$r" iptables -t nat -A POSTROUTING -o ${P}x$i -j MASQUERADE "${random[@]}"
  in_ns "$r" iptables -A FORWARD -i ${P}x$i -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  in_ns "$r" iptables -A FORWARD -i ${P}x$i -j DROP
  # Unsolicited packets to the router itself are dropped too, as a home router's firewall does.
  # Besides, a packet accepted here would leave a conntrack entry for its flow, and the NAT
  # would then map the home host's answer in that flow to another port, which defeats a hole
  # punch whose first packet from the far side arrives a little early.
  in_ns "$r" iptables -A INPUT -i ${P}x$i -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  in_ns "$r" iptables -A INPUT -i ${P}x$i -j DROP
}

# link_stats I: what home I's access link carried since the last call, as tun-delay.py's
# "stats" line (ab: router to host, down; ba: host to router, up).
link_stats() {
  local f=$LOG/link$1.out n
  n=$(grep -c '^stats' "$f" || true)
  kill -USR1 "${LINK_PID[$1]}"
  for _ in $(seq 1 50); do
    [ "$(grep -c '^stats' "$f" || true)" -gt "$n" ] && break
    sleep 0.05
  done
  grep '^stats' "$f" | tail -1
}

# world DELAY_MS HOMES...: the internet and the listed homes.
world() {
  local d=$1; shift
  internet
  for i in "$@"; do home "$i" "$d"; done
}

# Waits (bounded) for a line matching $2 in file $1.
wait_for() {
  for _ in $(seq 1 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no '$2' in $1 within 60 s:" >&2
  tail -5 "$1" >&2
  return 1
}

start_bootstrap() {
  # Background processes are started directly, never through a shell function, so that $! is
  # the process itself (ip exec's it) and teardown's kill reaches it.
  ip netns exec $P-wan "$BIN/edge-node" bootstrap --listen $BOOT_TCP --listen $BOOT_QUIC --no-mdns \
    >"$LOG/boot.out" 2>"$LOG/boot.err" &
  PIDS+=($!)
  wait_for "$LOG/boot.out" "listening on"
}

# node I BLOCKS: a node in home I, listening only inside its home.
start_node() {
  local i=$1 blocks=$2
  # Started directly (not through a shell function), so $! is the node's own pid (ip and env
  # exec it): the test kills exactly that process. WAN_NODE_LOG sets the nodes' RUST_LOG
  # (WAN_CLIENT_LOG the bench client's).
  ip netns exec $P-h$i env ${WAN_NODE_LOG:+RUST_LOG=$WAN_NODE_LOG} "$BIN/edge-node" join --model $MODEL --blocks "$blocks" \
    --listen /ip4/10.$i.0.2/tcp/31330 --listen /ip4/10.$i.0.2/udp/31330/quic-v1 \
    --bootstrap $BOOT_TCP --bootstrap $BOOT_QUIC --no-mdns --threads 1 --announce-interval 2 \
    >"$LOG/node$i.out" 2>"$LOG/node$i.err" &
  PIDS+=($!)
  NODE_PID[$i]=$!
}

# Waits until node I serves and announces a relayed address (its only reachable one).
node_ready() {
  wait_for "$LOG/node$1.out" "serving blocks"
  wait_for "$LOG/node$1.out" "p2p-circuit"
}

# generate ARGS...: the client in home 4, JSON on stdout.
generate() {
  in_ns $P-h4 "$BIN/edge-node" generate --model $MODEL --bootstrap $BOOT_TCP --bootstrap $BOOT_QUIC \
    --json --threads 1 --discovery-timeout 60 "$@"
}

json_field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps(v$1))"; }

# How the client's connections to nodes ended up, from its log: hole punched or relayed.
paths() {
  local log=$1 punched failed relayed
  punched=$(grep -c "hole punch succeeded" "$log" || true)
  failed=$(grep -c "hole punch failed" "$log" || true)
  relayed=$(grep -c "connected through a relay" "$log" || true)
  echo "client: $relayed connection(s) opened through the relay, $punched hole punch(es) succeeded (direct), $failed failed (stayed relayed)"
}

peer_id() { sed -n 's#^listening on .*/p2p/##p' "$LOG/node$1.out" | head -1; }

# count PATTERN ID FILES...: lines matching PATTERN that name peer ID, in all FILES.
count() {
  local pat=$1 id=$2; shift 2
  cat "$@" 2>/dev/null | grep -F "$pat" | grep -cF "$id" || true
}

# node_paths I: how every connection with node I ended up, from the logs of this run: opened
# through the relay, then hole punched (direct) or not (stayed relayed). "Others" are the
# other nodes, which forward to it (push). Sets RELAYED, PUNCHED and FAILED (client's view)
# and ANY_PUNCHED (any log, node I's own included).
node_paths() {
  local i=$1 id others=() j
  id=$(peer_id "$i")
  [ -n "$id" ] || { echo "FAIL: no peer id for node $i" >&2; exit 1; }
  for j in 1 2 3 5; do [ "$j" = "$i" ] || others+=("$LOG/node$j.err"); done
  local clients=("$LOG"/client*.err)
  RELAYED=$(count "connected through a relay" "$id" "${clients[@]}")
  PUNCHED=$(count "hole punch succeeded" "$id" "${clients[@]}")
  FAILED=$(count "hole punch failed" "$id" "${clients[@]}")
  local n_rel n_ok n_fail own own_fail
  n_rel=$(count "connected through a relay" "$id" "${others[@]}")
  n_ok=$(count "hole punch succeeded" "$id" "${others[@]}")
  n_fail=$(count "hole punch failed" "$id" "${others[@]}")
  # DCUtR reports a failure on the side that was dialled (the node), some 30 s after the
  # connection (3 attempts); the dialling side logs nothing then.
  own=$(grep -c "hole punch succeeded" "$LOG/node$i.err" || true)
  own_fail=$(grep -c "hole punch failed" "$LOG/node$i.err" || true)
  ANY_PUNCHED=$((PUNCHED + n_ok + own))
  local nat="NAT keeps ports" verdict=relayed
  case " $SYMMETRIC " in *" $i "*) nat="symmetric NAT" ;; esac
  [ "$ANY_PUNCHED" -gt 0 ] && verdict="went direct"
  echo "node $i ($nat): client: $RELAYED relayed connection(s), $PUNCHED hole punch(es) succeeded," \
    "$FAILED failed; other nodes: $n_rel relayed, $n_ok succeeded, $n_fail failed;" \
    "its own log: $own succeeded, $own_fail failed => $verdict"
}

if [ "$MODE" = test ]; then
  SECONDS=0
  SYMMETRIC=3
  world 5 1 2 3 4 5
  start_bootstrap
  start_node 1 0..10
  start_node 2 10..20
  start_node 3 20..30
  start_node 5 10..20
  for i in 1 2 3 5; do node_ready $i; done
  # Nothing but the relay reaches a node: a direct dial from the internet must fail.
  if in_ns $P-wan timeout 3 bash -c 'echo > /dev/tcp/100.64.1.2/31330' 2>/dev/null; then
    echo "FAIL: node 1 is reachable from the internet without NAT traversal" >&2; exit 1
  fi
  prompt="The capital of France is"
  want=$("$BIN/edge-node" generate --local --model $MODEL --prompt "$prompt" --max-new-tokens 16 \
    --json --threads 1 | json_field '["tokens"]')
  got=$(RUST_LOG=info,libp2p=warn generate --prompt "$prompt" --max-new-tokens 16 2>"$LOG/client1.err")
  [ "$(echo "$got" | json_field '["tokens"]')" = "$want" ] || {
    echo "FAIL: tokens through the NATed swarm differ from local: $got" >&2; exit 1; }
  pushed=$(echo "$got" | json_field '["pushed_spans"]')
  [ "$pushed" -gt 0 ] || { echo "FAIL: nothing was pushed node to node: $got" >&2; exit 1; }
  echo "ok: 3 nodes behind NAT, client behind NAT: local tokens, $pushed span steps pushed node to node"
  paths "$LOG/client1.err"
  # Node 3 sits behind the symmetric NAT: no hole punch may succeed with it, and the client
  # still reached it (through the relay). Node 1 (blocks 0..10, in every route) went direct.
  for i in 1 2 3 5; do node_paths $i; done
  node_paths 3 >/dev/null
  [ "$ANY_PUNCHED" = 0 ] || { echo "FAIL: a hole punch succeeded through node 3's symmetric NAT" >&2; exit 1; }
  [ "$RELAYED" -gt 0 ] || { echo "FAIL: the client did not reach node 3 through the relay" >&2; exit 1; }
  node_paths 1 >/dev/null
  [ "$PUNCHED" -gt 0 ] || { echo "FAIL: the client's connection to node 1 was not hole punched" >&2; exit 1; }
  echo "ok: node 3 behind a symmetric NAT stayed relayed, node 1 went direct"

  # A node behind NAT killed mid-generation: the client reroutes around it.
  long="Once upon a time, in a small village by the sea,"
  want=$("$BIN/edge-node" generate --local --model $MODEL --prompt "$long" --max-new-tokens 120 \
    --json --threads 1 | json_field '["tokens"]')
  ip netns exec $P-h4 env RUST_LOG=info "$BIN/edge-node" generate --model $MODEL \
    --bootstrap $BOOT_TCP --bootstrap $BOOT_QUIC --json --threads 1 --discovery-timeout 60 \
    --prompt "$long" --max-new-tokens 120 >"$LOG/client2.out" 2>"$LOG/client2.err" &
  client=$!
  PIDS+=("$client")
  wait_for "$LOG/client2.err" "route: "
  sleep 1
  victim=""
  for i in 2 5; do
    id=$(sed -n 's#^listening on .*/p2p/##p' "$LOG/node$i.out" | head -1)
    if [ -n "$id" ] && grep "route: " "$LOG/client2.err" | head -1 | grep -q "$id"; then victim=$i; fi
  done
  [ -n "$victim" ] || { echo "FAIL: no 10..20 node in the route" >&2; exit 1; }
  kill -9 "${NODE_PID[$victim]}"
  timeout 120 tail --pid="$client" -f /dev/null || { echo "FAIL: the client did not finish within 120 s" >&2; exit 1; }
  wait "$client" || { echo "FAIL: the client failed after the kill:" >&2; tail -5 "$LOG/client2.err" >&2; exit 1; }
  got=$(cat "$LOG/client2.out")
  [ "$(echo "$got" | json_field '["tokens"]')" = "$want" ] || {
    echo "FAIL: tokens changed after the reroute" >&2; exit 1; }
  reroutes=$(echo "$got" | json_field '["reroutes"]')
  [ "$reroutes" -ge 1 ] || { echo "FAIL: no reroute recorded: $got" >&2; exit 1; }
  echo "ok: node in home $victim killed mid-generation: rerouted ($reroutes), local tokens"
  paths "$LOG/client2.err"
  for i in 1 2 3 5; do node_paths $i; done
  node_paths 3 >/dev/null
  [ "$ANY_PUNCHED" = 0 ] || { echo "FAIL: a hole punch succeeded through node 3's symmetric NAT" >&2; exit 1; }
  echo "netns wan test passed in ${SECONDS}s (logs: $LOG)"
  exit 0
fi

# three_nodes DELAY: homes 1-4 on access links of DELAY ms one-way, the bootstrap and relay,
# and nodes serving 0..10, 10..20 and 20..30 in homes 1-3 (home 4 is the client's), ready.
three_nodes() {
  world "$1" 1 2 3 4
  start_bootstrap
  start_node 1 0..10
  start_node 2 10..20
  start_node 3 20..30
  for i in 1 2 3; do node_ready $i; done
}

# The profile's links (WAN_PROFILE, default lte; WAN_RATE overrides its rate in Mbit/s, "none":
# delay only).
link_profile() {
  PROFILE=${WAN_PROFILE:-lte}
  read -r delay rate < <(awk -v p="$PROFILE" '$1 == p { print $2, $5 }' simulations/profiles/links.txt)
  [ -n "${rate:-}" ] || { echo "no link profile $PROFILE in simulations/profiles/links.txt" >&2; exit 2; }
  rate=${WAN_RATE:-$rate}
  LINK_RATE=$rate
  [ "$rate" = none ] && LINK_RATE=""
  return 0
}

if [ "$MODE" = chat ]; then
  # One client process for two turns, as a chat or a gateway is: on the first turn its own
  # links are new (judged by their round trip), on the second they are measured. Each line of
  # the summary is one choice of a sender for a prompt-sized step: the client's for its link
  # to node 1, each node's for its output (to the next node, the last to the client).
  link_profile
  three_nodes "$delay"
  turn="Tell me the history of the printing press, from the woodblocks of China and the movable \
type of Bi Sheng to the bronze type of Korea and the press of Johannes Gutenberg, and how the price \
of books changed in the fifty years after his Bible."
  turn2="And what came after that? Tell me about the two hundred cities that had presses by 1500, \
the printers of Venice and their small books, the spread of pamphlets in the Reformation, the first \
newspapers of the seventeenth century, and how the steam press changed it all again in 1814."
  printf '%s\n%s\n' "$turn" "$turn2" |
    in_ns $P-h4 env RUST_LOG=info,libp2p=warn,coordinator::session::span=debug "$BIN/edge-node" chat \
      --model $MODEL --bootstrap $BOOT_TCP --bootstrap $BOOT_QUIC --discovery-timeout 60 \
      --max-new-tokens 8 --wire-dtype auto >"$LOG/chat.out" 2>"$LOG/chat.err" ||
    { echo "FAIL: chat failed:" >&2; tail -5 "$LOG/chat.err" >&2; exit 1; }
  echo "# profile $PROFILE: $delay ms one-way and ${LINK_RATE:-no} Mbit/s rate each way"
  echo "client:"; grep -o 'auto wire: step as .*' "$LOG/chat.err" | sed 's/^/  /'
  for i in 1 2 3; do
    echo "node $i:"; grep -o 'auto wire: output as .*' "$LOG/node$i.err" | sed 's/^/  /'
  done
  exit 0
fi

if [ "$MODE" = ttft ]; then
  # Rounds on the profile's links, each in a fresh world and swarm: one generation per wire
  # dtype, in turn. ttft is the client's prefill time: the prompt through the 3 spans and the
  # head to the first token (connecting and opening the session, a few seconds with the hole
  # punches, come before it and are not counted).
  link_profile
  TOKENS=${WAN_TOKENS:-8}
  # 128 tokens with SmolLM2's tokenizer (BOS included); the script checks the count.
  prompt=${WAN_PROMPT:-"The history of the printing press begins long before Gutenberg. In China, \
woodblock printing was used to print texts on paper and cloth as early as the seventh century, \
and movable type made of baked clay was invented by Bi Sheng around 1040. Korean printers later \
cast movable type in bronze. In Europe, Johannes Gutenberg combined a hand mould for casting \
metal type, an oil-based ink and a screw press adapted from wine making, and around 1455 he \
printed the famous Bible that bears his name. Within fifty years, presses were working in more \
than two hundred cities, and the price of books fell sharply"}
  local_out=$("$BIN/edge-node" generate --local --model $MODEL --prompt "$prompt" \
    --max-new-tokens "$TOKENS" --json --threads 1)
  n=$(echo "$local_out" | json_field '["prompt_tokens"]' | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  want=$(echo "$local_out" | json_field '["tokens"]')
  [ -n "${WAN_PROMPT:-}" ] || [ "$n" = 128 ] || { echo "FAIL: the prompt has $n tokens, not 128" >&2; exit 1; }
  echo "# profile $PROFILE: $delay ms one-way and ${LINK_RATE:-no} Mbit/s rate each way on every" \
    "access link;" \
    "prompt of $n tokens, $TOKENS new; push on"
  # Bytes each access link carried during the generation (connecting included), in kB: the
  # client's up and down, each node's up; and the longest a packet queued for a link's rate.
  echo "round wire ttft_ms ms_per_token pushed_spans tokens_equal_local client_up_kB" \
    "client_down_kB nodes_up_kB max_queue_ms"
  for round in $(seq 1 "${WAN_ROUNDS:-2}"); do
    # A fresh world and swarm per round: the relay lets one IP open only so many circuits
    # (libp2p's default limiter: a burst of 60, then one a minute), and each client run opens
    # about six from the client home's one public address while it hole punches.
    teardown
    three_nodes "$delay"
    # Not measured: a first generation opens the connections between the nodes (relay, then
    # hole punch), which the measured ones would otherwise pay in turn, and its f32 prompt lets
    # each node time the arrival of a large frame from the one before it, so `auto` finds the
    # node-to-node links' rates measured, as in a swarm that has been in use. (The client's own
    # links are new in every run: a client process learns them on its first prompt.)
    generate --prompt "$prompt" --max-new-tokens 1 --wire-dtype f32 >/dev/null 2>>"$LOG/warmup.err"
    # Each round starts one dtype further along, so none always runs first.
    read -ra wires <<<"${WAN_WIRES:-f32 f16 bf16 q8}"
    k=$(( (round - 1) % ${#wires[@]} ))
    for wire in "${wires[@]:k}" "${wires[@]:0:k}"; do
      for i in 1 2 3 4; do link_stats $i >/dev/null; done
      out=$(RUST_LOG=info,libp2p=warn generate --prompt "$prompt" --max-new-tokens "$TOKENS" \
        --wire-dtype "$wire" 2>>"$LOG/ttft-$wire.err")
      stats=$(for i in 1 2 3 4; do link_stats $i; done)
      python3 - "$round" "$wire" "$want" "$out" "$stats" <<'EOF2'
import json, sys
r, wire, want, v = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
links = [dict(kv.split("=") for kv in line.split()[1:]) for line in sys.argv[5].splitlines()]
ttft = len(v["prompt_tokens"]) / v["prefill_tokens_per_s"] * 1000
tps = v["decode_tokens_per_s"]
same = sum(1 for a, b in zip(v["tokens"], want) if a == b)
kb = lambda n: round(int(n) / 1000)
wait = max(float(l[k]) for l in links for k in ("ab_wait_ms", "ba_wait_ms"))
print(r, wire, round(ttft, 1), round(1000 / tps, 1) if tps else "-", v["pushed_spans"],
      "%d/%d" % (same, len(want)), kb(links[3]["ba_bytes"]), kb(links[3]["ab_bytes"]),
      "/".join(str(kb(l["ba_bytes"])) for l in links[:3]), round(wait))
EOF2
    done
  done
  for wire in ${WAN_WIRES:-f32 f16 bf16 q8}; do
    echo "# $wire: $(paths "$LOG/ttft-$wire.err")"
  done
  exit 0
fi

# bench: per delay, a fresh world and swarm; the same prompt relayed by the client and pushed.
TOKENS=${WAN_TOKENS:-48}
echo "delay_ms mode ms_per_token decode_tok_s ttft_ms"
for d in ${WAN_DELAYS:-5 25 50}; do
  teardown
  three_nodes "$d"
  for mode in relay push relay push; do
    extra=()
    [ $mode = relay ] && extra=(--no-push)
    out=$(RUST_LOG=${WAN_CLIENT_LOG:-info,libp2p=warn} generate \
      --prompt "The history of the printing press begins" \
      --max-new-tokens "$TOKENS" "${extra[@]}" 2>>"$LOG/bench-$d.err")
    python3 - "$d" "$mode" "$out" <<'EOF2'
import json, sys
d, mode, v = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tps = v["decode_tokens_per_s"]
ttft = len(v["prompt_tokens"]) / v["prefill_tokens_per_s"] * 1000
print(d, mode, round(1000 / tps, 1), round(tps, 2), round(ttft, 1))
EOF2
  done
  echo "# $d ms: $(paths "$LOG/bench-$d.err")"
done
