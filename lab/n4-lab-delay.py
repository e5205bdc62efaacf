#!/usr/bin/env python3
"""n4-lab-delay: hold packets from NFQUEUE queues for a fixed time, then accept them.

This kernel has no netem, and nft has no `queue` expression, but the iptables NFQUEUE target
works through nft compat.  The lab's WAN router sends every forwarded packet to a queue
(`iptables -A FORWARD -j NFQUEUE --queue-num Q`); this program binds the queue over plain
netlink (no libnetfilter_queue, no third-party module), stamps each packet with a due time
`arrival + delay` and gives the ACCEPT verdict when it is due.  The packet itself never leaves
the kernel (copy mode META: only the id comes up), so its bytes are untouched.

Usage:  n4-lab-delay.py [--ready-file PATH] QUEUE:DELAY_MS [QUEUE:DELAY_MS ...]
        e.g. n4-lab-delay.py 0:25        every packet in queue 0 is held 25 ms

Queues with different delays may be served by one process; within one queue order is kept
(constant delay, FIFO).  If the program dies, queued packets are dropped (no fail-open), so a
broken delay is loud, not silent.
"""
import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2

NFQA_PACKET_HDR = 1
NFQA_TIMESTAMP = 4
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_ACCEPT = 1


def nla(attr_type, payload):
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    pad = (-length) % 4
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * pad


def nfq_msg(msg, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    """nlmsghdr + nfgenmsg(AF_UNSPEC, version 0, res_id=queue big-endian) + attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def parse_attrs(buf):
    attrs = {}
    off = 0
    while off + 4 <= len(buf):
        length, attr_type = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        attrs[attr_type & 0x7FFF] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return attrs


def check_ack(sock, seq):
    """Wait for the NLMSG_ERROR answering `seq`; raise on a non-zero error."""
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, msg_type, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, off)
            if msg_type == NLMSG_ERROR and rseq == seq:
                (err,) = struct.unpack_from("=i", data, off + 16)
                if err != 0:
                    raise OSError(-err, os.strerror(-err))
                return
            off += (length + 3) & ~3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", metavar="QUEUE:DELAY_MS")
    ap.add_argument("--ready-file", help="touch this file once every queue is bound")
    ap.add_argument("--maxlen", type=int, default=65536, help="kernel queue length per queue")
    args = ap.parse_args()

    delays = {}
    for spec in args.specs:
        q, _, ms = spec.partition(":")
        delays[int(q)] = float(ms or 0) / 1000.0

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)

    # Any socket asking for SO_TIMESTAMP turns on kernel receive timestamps for every packet,
    # which NFQUEUE then hands us (NFQA_TIMESTAMP): the delay counts from the packet's arrival.
    stamp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stamp.setsockopt(socket.SOL_SOCKET, 29, 1)  # SO_TIMESTAMP

    seq = 1
    for q in delays:
        for attrs in (
            [nla(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0))],
            [
                nla(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)),
                nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", args.maxlen)),
            ],
        ):
            sock.send(nfq_msg(NFQNL_MSG_CONFIG, q, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
            check_ack(sock, seq)
            seq += 1

    stats = {"packets": 0, "stamped": 0, "late_sum": 0.0, "late_max": 0.0}

    def report(_signum=None, _frame=None):
        n = max(1, stats["packets"])
        sys.stderr.write(
            "n4-lab-delay: %d packets, %d with kernel timestamp, verdict lateness mean %.3f ms "
            "max %.3f ms\n" % (stats["packets"], stats["stamped"],
                                 stats["late_sum"] / n * 1000, stats["late_max"] * 1000))
        sys.stderr.flush()

    signal.signal(signal.SIGUSR1, report)

    def stop(_signum, _frame):
        report()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("%d\n" % os.getpid())
    sys.stderr.write("n4-lab-delay: bound %s\n" % ", ".join(
        "queue %d = %g ms" % (q, d * 1000) for q, d in sorted(delays.items())))
    sys.stderr.flush()


    held = {q: collections.deque() for q in delays}  # queue -> deque[(due, packet id)]
    clock = time.monotonic
    # A timed sleep here wakes late (about 0.5-1 ms in this VM).  `oversleep` learns by how much
    # (moving average) and we ask to be woken that much earlier, so releases land on time on
    # average without burning CPU in a spin loop.
    oversleep = 0.0005

    while True:
        # Release every packet that is due, in one send per burst.
        now = clock()
        out = []
        next_due = None
        for q, dq in held.items():
            while dq and dq[0][0] <= now + 0.0001:
                due, pid = dq.popleft()
                stats["packets"] += 1
                stats["late_sum"] += now - due
                stats["late_max"] = max(stats["late_max"], now - due)
                out.append(nfq_msg(NFQNL_MSG_VERDICT, q,
                                   [nla(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, pid))]))
            if dq and (next_due is None or dq[0][0] < next_due):
                next_due = dq[0][0]
        if out:
            sock.send(b"".join(out))
        # select takes a float (microseconds), poll only whole milliseconds: select keeps the
        # added delay within ~0.1 ms of the request instead of up to 1 ms late.
        timeout = None if next_due is None else max(0.0, next_due - clock() - oversleep)
        asked = clock()
        if not select.select([sock], [], [], timeout)[0]:
            if timeout:
                late = clock() - asked - timeout
                oversleep = min(0.003, max(0.0, 0.9 * oversleep + 0.1 * late))
            continue
        # Drain everything the kernel has for us.
        while True:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            arrival = clock()
            wall_minus_mono = time.time() - arrival
            off = 0
            while off + 16 <= len(data):
                length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    break
                if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    (res_id,) = struct.unpack_from(">H", data, off + 18)
                    attrs = parse_attrs(data[off + 20 : off + length])
                    hdr = attrs.get(NFQA_PACKET_HDR)
                    if hdr is not None and res_id in held:
                        (pid,) = struct.unpack_from(">I", hdr, 0)
                        t = arrival
                        ts = attrs.get(NFQA_TIMESTAMP)
                        if ts is not None and len(ts) >= 16:
                            # Kernel receive time (wall clock): excludes our own wake-up lag.
                            sec, usec = struct.unpack_from(">QQ", ts, 0)
                            stats["stamped"] += 1
                            t = min(arrival, sec + usec / 1e6 - wall_minus_mono)
                        held[res_id].append((t + delays[res_id], pid))
                off += (length + 3) & ~3


if __name__ == "__main__":
    main()
