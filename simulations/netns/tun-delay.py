#!/usr/bin/env python3
"""A point-to-point IP link with a one-way delay, made of two TUN devices.

    tun-delay.py DELAY_MS DEV_A DEV_B

Creates TUN devices DEV_A and DEV_B in the current network namespace, prints "ready" on stdout,
then copies every IP packet the kernel sends out of one into the other, each released DELAY_MS
after it was read (order kept). The caller moves the devices into two namespaces
(`ip link set DEV netns NS`) and addresses them; the pair is then the only link between those
namespaces, so every packet on it, TCP or UDP, pays the delay each way.

Why not link-delay (simulations' TCP relay)? It forwards one port to one address, which is a
port forward: behind it a node is reachable without NAT traversal, and UDP (QUIC, hole
punching) cannot pass at all. Why not tc netem? This machine's kernel has no sch_netem.
Exits when either device goes away or on SIGTERM.
"""

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


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: tun-delay.py DELAY_MS DEV_A DEV_B")
    delay = float(sys.argv[1]) / 1000.0
    a, b = open_tun(sys.argv[2]), open_tun(sys.argv[3])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    other = {a: b, b: a}
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
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, other[fd], packet))


if __name__ == "__main__":
    main()
