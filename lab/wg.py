#!/usr/bin/env python3
"""lab/wg.py: WireGuard between two NAT4 boxes, through the real-NAT lab, kept alive by n4.

Each trial is a fresh lab (`lab/lab.sh run --nat sequential --delay D --load L`).  In each host
namespace, in a mount namespace of its own (wireguard-go's control socket path
/run/wireguard/IFACE.sock is one path for every network namespace), a userspace `wireguard-go`
makes `wg0` (10.44.0.1 on host A, 10.44.0.2 on host B) and `n4 -c --key-file K --wg wg0` punches
through both NATs, hands the hole to WireGuard and watches it.  A pinger in host A sends an ICMP
echo through the tunnel every 50 ms.  Measured:

  first_ping_s   n4 start -> the first echo reply through WireGuard
  recover_s      `conntrack -F` in NAT A (the NAT forgets every mapping: the hole dies)
                 -> the next echo reply, with no human in between

  lab/wg.py [--trials 10] [--delay 25] [--load 200] [--n4 PATH] [--jsonl FILE] [--logs DIR]

Needs root, wireguard-go, wireguard-tools (wg) and conntrack (.ci/run installs them).
Prints one JSON object per trial, then a summary (median and worst).
"""
import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TUNNEL = {"a": ("10.44.0.1", "10.44.0.2"), "b": ("10.44.0.2", "10.44.0.1")}
PING_EVERY = 0.05
FIRST_LIMIT = 20.0   # s for the first reply
RECOVER_LIMIT = 20.0  # s for a reply after the flush (the target is 10)


def log(msg):
    sys.stderr.write("wg.py: %s\n" % msg)
    sys.stderr.flush()


# ------------------------------------------------------------------ pinger (inside host A)

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def pinger(a):
    """ICMP echo to a.to every PING_EVERY s; prints "OK <unix time>" per reply, forever."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    seq = 0
    while True:
        seq = (seq + 1) & 0xFFFF
        body = b"n4-wg-lab"
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + body), ident, seq) + body
        try:
            s.sendto(pkt, (a.to, 0))
        except OSError:
            pass  # no route yet (wg0 not up): try again
        end = time.monotonic() + PING_EVERY
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                continue
            data, src = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _c, _k, rid, _rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and rid == ident and src[0] == a.to:
                sys.stdout.write("OK %.3f\n" % time.time())
                sys.stdout.flush()


# ------------------------------------------------------------------ one trial (inside lab.sh run)

HOST_SCRIPT = r"""
set -e
umask 077
mkdir -p /run/wireguard
mount -t tmpfs n4wg /run/wireguard
wireguard-go -f wg0 >"$DIR/wg-$SIDE.log" 2>&1 &
echo $! >"$DIR/wg-$SIDE.pid"
i=0
until wg show wg0 >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 100 ] || { echo "wireguard-go did not start" >&2; exit 1; }
  sleep 0.05
done
wg genkey >"$DIR/wg-$SIDE.key"
wg set wg0 private-key "$DIR/wg-$SIDE.key"
ip addr add "$ME/24" dev wg0
ip link set wg0 up
date +%s.%N >"$DIR/n4-$SIDE.start"
exec "$N4" -c -h "$SERVER" -b 30000 --key-file "$KEY" --wg wg0 --json -v
"""


def ns_exec(ns, *cmd, **kw):
    return ["ip", "netns", "exec", ns] + list(cmd)


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_ok(lines, after, limit):
    """The first "OK t" line with t > after, within limit s of now; its t, or None."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for line in list(lines):
            parts = line.split()
            if len(parts) == 2 and parts[0] == "OK" and float(parts[1]) > after:
                return float(parts[1])
        time.sleep(0.02)
    return None


def reader(pipe, sink):
    import threading

    def run():
        for line in pipe:
            sink.append(line.strip())

    t = threading.Thread(target=run, daemon=True)
    t.start()


def trial(a):
    env = os.environ
    d = env["LAB_DIR"]
    key = os.path.join(d, "n4.key")
    with open(key, "w") as f:
        f.write("the lab's shared n4 key, long enough\n")
    os.chmod(key, 0o600)
    procs = []
    result = {}
    try:
        srv = subprocess.Popen(ns_exec(env["LAB_NS_SERVER"], a.n4, "-s"),
                               stdout=subprocess.DEVNULL,
                               stderr=open(os.path.join(d, "server.log"), "w"))
        procs.append(srv)
        time.sleep(0.3)
        pings = []
        pinger_p = subprocess.Popen(
            ns_exec(env["LAB_NS_A"], sys.executable, os.path.abspath(__file__), "pinger",
                    "--to", TUNNEL["a"][1]),
            stdout=subprocess.PIPE, text=True)
        procs.append(pinger_p)
        reader(pinger_p.stdout, pings)
        hosts = {}
        for side, ns in (("a", env["LAB_NS_A"]), ("b", env["LAB_NS_B"])):
            me, _peer = TUNNEL[side]
            script_env = dict(env, DIR=d, SIDE=side, ME=me, N4=a.n4, KEY=key,
                              SERVER=env["LAB_IP_SERVER"])
            err = open(os.path.join(d, "n4-%s.log" % side), "w")
            out = open(os.path.join(d, "n4-%s.json" % side), "w")
            hosts[side] = subprocess.Popen(
                ns_exec(ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
                        HOST_SCRIPT),
                env=script_env, stdout=out, stderr=err)
            procs.append(hosts[side])
        time.sleep(0.05)
        starts = []
        for side in "ab":
            path = os.path.join(d, "n4-%s.start" % side)
            for _ in range(100):
                if os.path.exists(path) and open(path).read().strip():
                    break
                time.sleep(0.05)
            starts.append(float(open(path).read()))
        start = min(starts)
        first = wait_ok(pings, start, FIRST_LIMIT)
        result["first_ping_s"] = None if first is None else round(first - start, 3)
        if first is not None:
            time.sleep(1.0)  # the link runs a little before the NAT forgets it
            flush = time.time()
            subprocess.run(ns_exec(env["LAB_NS_NAT_A"], "conntrack", "-F"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            # An echo already in flight may still come back: the outage starts after it.
            time.sleep(0.3)
            outage = not any(float(x.split()[1]) > flush + 0.25 for x in list(pings)
                             if x.startswith("OK"))
            back = wait_ok(pings, flush + 0.3, RECOVER_LIMIT)
            result["outage_seen"] = outage
            result["recover_s"] = None if back is None else round(back - flush, 3)
    finally:
        for p in reversed(procs):
            stop(p)
        for side in "ab":
            try:
                with open(os.path.join(d, "wg-%s.pid" % side)) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
    for side in "ab":
        with open(os.path.join(d, "n4-%s.log" % side)) as f:
            text = f.read()
        result[side] = {
            "wins": text.count("[ WIN ]"),
            "died": text.count("the hole died"),
            "log_tail": text.splitlines()[-12:],
        }
        if a.logs:
            os.makedirs(a.logs, exist_ok=True)
            with open(os.path.join(a.logs, "%s-n4-%s.log" % (a.tag, side)), "w") as g:
                g.write(text)
            try:
                with open(os.path.join(d, "wg-%s.log" % side)) as f, \
                        open(os.path.join(a.logs, "%s-wg-%s.log" % (a.tag, side)), "w") as g:
                    g.write(f.read())
            except OSError:
                pass
    result["ok"] = (result.get("first_ping_s") is not None
                    and result.get("recover_s") is not None)
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ trials


def build():
    log("building target/release/n4")
    if subprocess.run(["cargo", "build", "--release", "-p", "n4-mio", "--bin", "n4"],
                      cwd=REPO, stdout=sys.stderr).returncode != 0:
        sys.exit("wg.py: cargo build failed")
    return os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")),
                        "release", "n4")


def main():
    if sys.argv[1:2] == ["pinger"]:
        p = argparse.ArgumentParser(prog="wg.py pinger")
        p.add_argument("--to", required=True)
        pinger(p.parse_args(sys.argv[2:]))
        return 0
    if sys.argv[1:2] == ["trial"]:
        t = argparse.ArgumentParser(prog="wg.py trial")
        t.add_argument("--n4", required=True)
        t.add_argument("--logs")
        t.add_argument("--tag", default="trial")
        return trial(t.parse_args(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--delay", default="25", help="one-way WAN delay, ms (RTT = 2x)")
    ap.add_argument("--load", default="200", help="background flows/s behind each NAT")
    ap.add_argument("--n4", help="n4 binary (default: build target/release/n4)")
    ap.add_argument("--jsonl", help="append each trial's JSON here")
    ap.add_argument("--logs", help="keep each trial's n4 logs in this directory")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("wg.py: run as root (network namespaces)")
    n4 = os.path.abspath(a.n4) if a.n4 else build()
    results = []
    for k in range(a.trials):
        cmd = [os.path.join(HERE, "lab.sh"), "run", "--nat", "sequential", "--delay", a.delay,
               "--load", a.load, "--seed", str(2 * k + 1), "--", sys.executable,
               os.path.abspath(__file__), "trial", "--n4", n4, "--tag", "t%d" % k]
        if a.logs:
            cmd += ["--logs", a.logs]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = p.stdout.strip().splitlines()
        try:
            r = json.loads(out[-1])
        except (IndexError, ValueError):
            r = {"ok": False, "error": (p.stdout + p.stderr)[-800:]}
        r["trial"] = k
        results.append(r)
        print(json.dumps(r))
        sys.stdout.flush()
        log("%d/%d: first ping %s s, recovered %s s after the flush" % (
            k + 1, a.trials, r.get("first_ping_s"), r.get("recover_s")))
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
    ok = [r for r in results if r.get("ok")]
    firsts = sorted(r["first_ping_s"] for r in ok)
    recs = sorted(r["recover_s"] for r in ok)
    if ok:
        print("summary: %d/%d trials; start -> first ping: median %.2f s, worst %.2f s; "
              "recovery after conntrack -F: median %.2f s, worst %.2f s" % (
                  len(ok), len(results), statistics.median(firsts), firsts[-1],
                  statistics.median(recs), recs[-1]))
    else:
        print("summary: 0/%d trials" % len(results))
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
