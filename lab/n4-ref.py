#!/usr/bin/env python3
"""n4-ref: a small Python model of the ORIGINAL N4 v1 tool (server and client), for the lab.

It follows docs of the v1 wire protocol (8-byte messages: HELLO/READY/EXCHANGE/PEERINFO/PUNCH)
and the v1 round exactly as DESIGN.md describes it, with the same flags and log lines as the
original, so the lab (lab.sh demo, selftest) can be proven without our Rust `n4`, and so the
Rust binary can be checked for wire compatibility against it (`LAB_N4=lab/n4-ref.py`).

  n4-ref.py -s [-p 1721] [-a n4n4n4]
  n4-ref.py -c -h HOST [-p 1721] [-a n4n4n4] [-b 30000] [-n 25] [-o 20] [-x]
"""
import argparse
import logging
import select
import socket
import struct
import time

HELLO, READY, EXCHANGE, PEERINFO, PUNCH = 1, 2, 3, 4, 5
log = logging.getLogger("n4-ref")


def msg(cmd, data=b""):
    return bytes([cmd, 0]) + data.ljust(6, b"\0")[:6]


def ident(text):
    return text.encode()[:6].ljust(6, b" ")


def recv_exact(conn, n, timeout):
    conn.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def server(a):
    idt = ident(a.a)
    while True:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", a.l))
        tcp.listen(8)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind(("0.0.0.0", a.l))
        seated = []
        while len(seated) < 2:
            conn, peer = tcp.accept()
            try:
                m = recv_exact(conn, 8, 60)
            except (OSError, ConnectionError):
                conn.close()
                continue
            if m[0] == HELLO and m[2:8] == idt:
                log.info("==> Client %s:%d seated", *peer)
                seated.append((conn, peer))
            else:
                conn.close()
        udp.setblocking(False)
        try:
            while True:
                udp.recvfrom(64)
        except BlockingIOError:
            pass
        udp.setblocking(True)
        for conn, _ in seated:
            conn.sendall(msg(READY))
        done = [None, None]
        udp.settimeout(60)
        try:
            while None in done:
                data, src = udp.recvfrom(64)
                if len(data) != 8 or data[0] != EXCHANGE or data[2:8] != idt:
                    continue
                for i, (conn, peer) in enumerate(seated):
                    if done[i] is None and peer[0] == src[0]:
                        done[i] = src
                        log.info("==> Exchange %s:%d", *src)
                        other = seated[1 - i][0]
                        other.sendall(msg(PEERINFO, socket.inet_aton(src[0]) + struct.pack(">H", src[1])))
                        break
        except OSError as e:
            log.info("pairing aborted: %s", e)
        for conn, _ in seated:
            conn.close()
        tcp.close()
        udp.close()


def client_round(a, start):
    idt = ident(a.a)
    socks = []
    for i in range(a.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", start + i if start else 0))
        socks.append(s)
    tcp = socket.create_connection((a.h, a.p))
    try:
        tcp.sendall(msg(HELLO, idt))
        if recv_exact(tcp, 8, 120)[0] != READY:
            raise ConnectionError("no READY")
        for _ in range(3):
            socks[0].sendto(msg(EXCHANGE, idt), (a.h, a.p))
        m = recv_exact(tcp, 8, 120)
        if m[0] != PEERINFO:
            raise ConnectionError("no PEERINFO")
        peer_ip = socket.inet_ntoa(m[2:6])
        peer_port = struct.unpack(">H", m[6:8])[0]
        target = (peer_ip, (peer_port + a.o) % 65536)
        log.info("==> Peer: %s:%d", peer_ip, peer_port)
        log.info("[ Target: %s:%d ]", *target)
        punch = msg(PUNCH, idt)
        for _ in range(5):
            for s in socks:
                s.sendto(punch, target)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select(socks, [], [], max(0, deadline - time.monotonic()))
            for s in ready:
                data, src = s.recvfrom(64)
                if data != punch or (src[0] != peer_ip and not a.x):
                    continue
                for _ in range(10):
                    s.sendto(punch, src)
                    time.sleep(0.2)
                local = s.getsockname()[1]
                log.info("Local port:    %d", local)
                log.info("Peer address:  %s:%d", *src)
                log.info("[ WIN ]")
                log.info("> nc -u -p %d %s %d", local, src[0], src[1])
                return True
        log.info("[ LOSE ]")
        return False
    finally:
        tcp.close()
        for s in socks:
            s.close()


def client(a):
    start = a.b
    while not client_round(a, start):
        start = start + a.n if start else 0


def main():
    ap = argparse.ArgumentParser(add_help=False, description=__doc__.splitlines()[0])
    ap.add_argument("--help", action="help")
    ap.add_argument("-s", action="store_true")
    ap.add_argument("-c", action="store_true")
    ap.add_argument("-h", default="")
    ap.add_argument("-p", type=int, default=1721)
    ap.add_argument("-l", type=int, default=1721)
    ap.add_argument("-a", default="n4n4n4")
    ap.add_argument("-b", type=int, default=30000)
    ap.add_argument("-n", type=int, default=25)
    ap.add_argument("-o", type=int, default=20)
    ap.add_argument("-x", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(message)s")
    if a.s:
        server(a)
    elif a.c and a.h:
        client(a)
    else:
        ap.error("give -s, or -c -h HOST")


if __name__ == "__main__":
    main()
