#!/usr/bin/env python3
"""n4-lab-udp: tiny UDP tools the lab uses to prove itself and to talk through a punched hole.

  listen --port P [--count N] [--timeout S] [--echo]
      print "FROM ip:port LEN text" for each datagram (optionally echo it back); stop after N
      datagrams or S seconds of silence.
  probe --to IP:PORT [--count N] [--interval S] [--bind PORT]
      send N datagrams, each from a FRESH socket (a new NAT mapping each), every S seconds.
  line --bind PORT --to IP:PORT --text TEXT [--timeout S] [--answer]
      bind PORT, then either send TEXT and wait for one answer (default), or (--answer) wait for
      one datagram from IP, print it, and answer TEXT.  Prints "SENT ..." / "RECV ...".
  ping --to IP [--count N] [--interval S] [--timeout S]
      ICMP echo (raw socket, root) N times; print each RTT and a summary "rtt min/median/max ms";
      exit 1 if no answer came back.
  punch --bind BASE --count N --to IP:PORT [--timeout S]
      bind N sockets BASE..BASE+N-1, send a punch from each to IP:PORT every 100 ms, and report
      "WIN local=L peer=IP:PORT" when a punch from IP arrives (then answer it a few times).
"""
import argparse
import os
import select
import socket
import struct
import sys
import time


def addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def listen(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.port))
    s.settimeout(a.timeout)
    n = 0
    while not a.count or n < a.count:
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            break
        n += 1
        out("FROM %s:%d %d %s" % (src[0], src[1], len(data), data.decode(errors="replace")))
        if a.echo:
            s.sendto(data, src)


def probe(a):
    dst = addr(a.to)
    for i in range(a.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if a.bind:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", a.bind))
        s.sendto(("probe %d %.6f" % (i, time.time())).encode(), dst)
        s.close()
        if i + 1 < a.count:
            time.sleep(a.interval)


def line(a):
    peer = addr(a.to)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.bind))
    s.settimeout(a.timeout)
    if a.answer:
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            out("TIMEOUT no datagram on port %d within %gs" % (a.bind, a.timeout))
            sys.exit(1)
        out("RECV from %s:%d: %s" % (src[0], src[1], data.decode(errors="replace")))
        s.sendto(a.text.encode(), src)
        out("SENT to %s:%d: %s" % (src[0], src[1], a.text))
        return
    t0 = time.monotonic()
    s.sendto(a.text.encode(), peer)
    out("SENT to %s:%d: %s" % (peer[0], peer[1], a.text))
    # The answer may lag the first try (the other side starts a moment later): resend each 0.5 s.
    deadline = t0 + a.timeout
    while time.monotonic() < deadline:
        s.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            s.sendto(a.text.encode(), peer)
            continue
        out("RECV from %s:%d: %s" % (src[0], src[1], data.decode(errors="replace")))
        return
    out("TIMEOUT no answer from %s:%d within %gs" % (peer[0], peer[1], a.timeout))
    sys.exit(1)


def icmp_checksum(b):
    if len(b) % 2:
        b += b"\0"
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(a.count):
        body = struct.pack("!d", time.monotonic()) + b"n4-lab"
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, icmp_checksum(hdr + body), ident, seq) + body
        t0 = time.monotonic()
        s.sendto(pkt, (a.to, 0))
        deadline = t0 + a.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                out("seq=%d timeout" % seq)
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                continue
            data, src = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _code, _ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and rid == ident and rseq == seq and src[0] == a.to:
                rtt = (time.monotonic() - t0) * 1000.0
                rtts.append(rtt)
                out("seq=%d rtt=%.3f ms" % (seq, rtt))
                break
        if seq + 1 < a.count:
            time.sleep(a.interval)
    if not rtts:
        out("no answer from %s" % a.to)
        sys.exit(1)
    rtts.sort()
    out("rtt min/median/max = %.3f/%.3f/%.3f ms (%d/%d answered)" % (
        rtts[0], rtts[len(rtts) // 2], rtts[-1], len(rtts), a.count))


def punch(a):
    peer = addr(a.to)
    socks = []
    for i in range(a.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", a.bind + i))
        s.setblocking(False)
        socks.append(s)
    msg = b"n4-lab punch"
    deadline = time.monotonic() + a.timeout
    next_send = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_send:
            for s in socks:
                try:
                    s.sendto(msg, peer)
                except OSError:
                    pass
            next_send = now + 0.1
        ready, _, _ = select.select(socks, [], [], 0.02)
        for s in ready:
            try:
                data, src = s.recvfrom(2048)
            except OSError:
                continue
            if src[0] != peer[0]:
                continue
            out("WIN local=%d peer=%s:%d" % (s.getsockname()[1], src[0], src[1]))
            for _ in range(5):
                s.sendto(msg, src)
                time.sleep(0.05)
            return
    out("LOSE no punch from %s within %gs" % (peer[0], a.timeout))
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("listen")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10)
    p.add_argument("--echo", action="store_true")
    p = sub.add_parser("probe")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=0)
    p.add_argument("--bind", type=int, default=0)
    p = sub.add_parser("line")
    p.add_argument("--bind", type=int, required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--answer", action="store_true")
    p = sub.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=2)
    p = sub.add_parser("punch")
    p.add_argument("--bind", type=int, required=True)
    p.add_argument("--count", type=int, default=25)
    p.add_argument("--to", required=True)
    p.add_argument("--timeout", type=float, default=10)
    a = ap.parse_args()
    {"listen": listen, "probe": probe, "line": line, "ping": ping, "punch": punch}[a.cmd](a)


if __name__ == "__main__":
    main()
