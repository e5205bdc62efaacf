#!/usr/bin/env python3
"""n4-lab-load: background flows behind a NAT, lambda new mappings per second.

Each flow is a fresh UDP socket (fresh ephemeral source port) sending one datagram to a fresh
destination port on DEST, so the NAT in front makes one new mapping per flow and its sequential
port counter advances by one.  Inter-flow gaps are exponential (a Poisson process, the model of
Klinec & Matyas 2014) unless --constant; the schedule is absolute, so a slow moment is caught up
and the long-run rate stays lambda.

Usage: n4-lab-load.py --rate LAMBDA [--dest 192.0.2.2] [--ports 40000-59999] [--seed N]
"""
import argparse
import random
import socket
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, required=True, help="new flows per second")
    ap.add_argument("--dest", default="192.0.2.2")
    ap.add_argument("--ports", default="40000-59999", help="destination port range, cycled")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--constant", action="store_true", help="fixed gaps instead of Poisson")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many s (0: never)")
    args = ap.parse_args()
    if args.rate <= 0:
        return
    lo, _, hi = args.ports.partition("-")
    lo, hi = int(lo), int(hi or lo)
    rng = random.Random(args.seed)
    port = lo + rng.randrange(hi - lo + 1)
    payload = b"n4-lab background flow"
    start = next_at = time.monotonic()
    while not args.duration or next_at - start < args.duration:
        next_at += 1.0 / args.rate if args.constant else rng.expovariate(args.rate)
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(payload, (args.dest, port))
        except OSError:
            pass
        s.close()
        port = lo if port >= hi else port + 1


if __name__ == "__main__":
    main()
