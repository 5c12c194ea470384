#!/usr/bin/env python3
"""A point-to-point IP link with a one-way delay and optionally a rate, made of two TUN devices.

    tun-delay.py [--rate MBIT] [--rate-ab MBIT] [--rate-ba MBIT] DELAY_MS DEV_A DEV_B

Creates TUN devices DEV_A and DEV_B in the current network namespace, prints "ready" on stdout,
then copies every IP packet the kernel sends out of one into the other. Without a rate, each
packet is released DELAY_MS after it was read (order kept). With a rate (Mbit/s; --rate sets
both directions, --rate-ab the packets read from DEV_A, --rate-ba those read from DEV_B), each
direction is a wire that sends one packet at a time: a packet starts when it is read or when the
one before it in the same direction is done, whichever is later, takes len * 8 / rate to
serialise, and is released DELAY_MS after it is done. The queue in front of the wire has no
limit and nothing is lost (no jitter, no loss: the figures measured over it stay repeatable);
a sender that outruns the rate sees its packets wait, as behind a deep LTE buffer.

On SIGUSR1 it prints one line on stdout with what each direction carried since the last such
line (or the start), then starts counting afresh:
    stats ab_bytes=N ab_packets=N ab_wait_ms=MAX ba_bytes=N ba_packets=N ba_wait_ms=MAX
where wait is the longest time a packet queued for the wire (0 without a rate).

The caller moves the devices into two namespaces (`ip link set DEV netns NS`) and addresses
them; the pair is then the only link between those namespaces, so every packet on it, TCP or
UDP, pays the delay (and the rate) each way.

Why not link-delay (simulations' TCP relay)? It forwards one port to one address, which is a
port forward: behind it a node is reachable without NAT traversal, and UDP (QUIC, hole
punching) cannot pass at all. Why not tc netem/tbf? This machine's kernel has no sch_netem.
Exits when either device goes away or on SIGTERM.
"""

import argparse
import fcntl
import heapq
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def mbit(s):
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive Mbit/s, got {s}")
    return v


def parse_args():
    p = argparse.ArgumentParser(description="TUN pair with a one-way delay and optional rate")
    p.add_argument("--rate", type=mbit, help="Mbit/s in both directions")
    p.add_argument("--rate-ab", type=mbit, help="Mbit/s of packets read from DEV_A")
    p.add_argument("--rate-ba", type=mbit, help="Mbit/s of packets read from DEV_B")
    p.add_argument("delay_ms", type=float)
    p.add_argument("dev_a")
    p.add_argument("dev_b")
    args = p.parse_args()
    if args.delay_ms < 0:
        p.error("DELAY_MS must be 0 or more")
    return args


def main():
    args = parse_args()
    delay = args.delay_ms / 1000.0
    a, b = open_tun(args.dev_a), open_tun(args.dev_b)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    other = {a: b, b: a}
    # Seconds per byte on the wire read from each device; None: no rate, only the delay.
    per_byte = {}
    for fd, r in ((a, args.rate_ab or args.rate), (b, args.rate_ba or args.rate)):
        per_byte[fd] = 8.0 / (r * 1e6) if r else None
    wire_free = {a: 0.0, b: 0.0}  # when the last packet read from this device is done sending
    stats = {}

    def reset():
        for fd in (a, b):
            stats[fd] = [0, 0, 0.0]  # bytes, packets, longest wait (s)

    def report(*_):
        line = "stats " + " ".join(
            f"{name}_bytes={stats[fd][0]} {name}_packets={stats[fd][1]} "
            f"{name}_wait_ms={stats[fd][2] * 1000:.1f}"
            for name, fd in (("ab", a), ("ba", b))
        )
        print(line, flush=True)
        reset()

    reset()
    signal.signal(signal.SIGUSR1, report)
    print("ready", flush=True)
    queue = []  # (due, seq, out_fd, packet)
    seq = 0
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(queue)
            try:
                os.write(out, packet)
            except OSError:
                pass  # device down (namespace being torn down): drop, like a cable would
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        try:
            ready, _, _ = select.select([a, b], [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            try:
                packet = os.read(fd, 65536)
            except OSError:
                return
            now = time.monotonic()
            done = now
            st = stats[fd]
            st[0] += len(packet)
            st[1] += 1
            if per_byte[fd] is not None:
                start = max(now, wire_free[fd])
                st[2] = max(st[2], start - now)
                done = start + len(packet) * per_byte[fd]
                wire_free[fd] = done
            seq += 1
            # Per direction, done times only grow, so the order within a direction is kept.
            heapq.heappush(queue, (done + delay, seq, other[fd], packet))


if __name__ == "__main__":
    main()
