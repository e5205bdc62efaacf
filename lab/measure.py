#!/usr/bin/env python3
"""lab/measure.py: N4 through the real-NAT lab, next to n4-sim on the same grid.

Each trial is a fresh lab (`lab/lab.sh run --delay D --load L --seed K`) in which an `n4 -s`
starts in the server namespace and, once it listens, the two clients start together
(`n4 -c -h 192.0.2.2 -b 30000|31000 --json`, plus `--no-ext` for strategy v1).  A trial is a
success when both clients print their WIN JSON with `elapsed_ms` <= the strategy's time limit;
its time-to-WIN is the larger of the two `elapsed_ms` (client start -> the peer's punch
arrives, the same event n4-sim times).  Packets: UDP datagrams each client sent (an nftables
counter on the host's output hook: every UDP datagram except the background flows', which all
go to the server's ports 40000-59999), until the client exited or the trial ended.

Then `n4-sim sweep` runs the same grid (RTT = 2 x delay, λ, strategy, time limit, unlimited
rounds) and both are printed side by side as a Markdown table.

  lab/measure.py [--trials 3] [--lambda 0,200,400,1000] [--delay 25] [--strategy v1,predict]
                 [--limit-v1 25] [--limit-predict 10] [--sim-seeds 200] [--jsonl FILE]
                 [--logs DIR] [--rev COMMIT | --n4 PATH --sim PATH] [--no-sim]
                 [--client-args "..."] [--nat-a KIND] [--nat-b KIND] [--one-nat [--hairpin]]
  lab/measure.py --from FILE.jsonl ...     re-print the table of recorded trials (no lab)

--one-nat: both clients behind nat-a (`lab.sh run --one-nat`: host-b is 192.168.1.102 in
nat-a's LAN; --hairpin: nat-a hairpins; the sim sweep gets --one-nat [--hairpin] too).
--n4 PATH with --no-sim (or --sim PATH) builds nothing.

Needs root (the lab).  Trials run one after another, cells interleaved (trial 1 of every
cell, then trial 2, ...), so a slow phase of the machine spreads over all cells.
"""
import argparse
import csv
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LAB_SH = os.path.join(HERE, "lab.sh")
GRACE = 3.0  # s after the limit for a WIN's JSON to appear (v1 prints it after a 2 s burst)


def log(msg):
    sys.stderr.write("measure: %s\n" % msg)
    sys.stderr.flush()


# ----------------------------------------------------------------------------- one trial
# Runs inside `lab.sh run`, with the LAB_* variables in the environment; prints one JSON line.

COUNTERS = """table ip n4measure {
  chain out {
    type filter hook output priority 0; policy accept;
    meta l4proto udp udp dport 40000-59999 counter accept comment "load"
    meta l4proto udp counter comment "n4"
  }
}
"""


def nsx(ns, *cmd, **kw):
    return subprocess.run(["ip", "netns", "exec", ns] + list(cmd), **kw)


def counters(ns):
    out = nsx(ns, "nft", "list", "chain", "ip", "n4measure", "out",
              capture_output=True, text=True).stdout
    got = {}
    for m in re.finditer(r"packets (\d+) bytes \d+.*?comment \"(\w+)\"", out):
        got[m.group(2)] = int(m.group(1))
    return got


def wait_file(path, needle, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(path) as f:
                if needle in f.read():
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    return False


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(1.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def trial(a):
    env = os.environ
    d = env["LAB_DIR"]
    hosts = {"a": (env["LAB_NS_A"], 30000), "b": (env["LAB_NS_B"], 31000)}
    for ns, _ in hosts.values():
        nsx(ns, "nft", "-f", "-", input=COUNTERS, text=True, check=True)
    files = []
    srv_log = open(os.path.join(d, "server.log"), "w")
    files.append(srv_log)
    srv = subprocess.Popen(["ip", "netns", "exec", env["LAB_NS_SERVER"], a.n4, "-s"],
                           stdout=subprocess.DEVNULL, stderr=srv_log)
    if not wait_file(os.path.join(d, "server.log"), "Listening on", 10):
        stop(srv)
        print(json.dumps({"error": "server did not listen"}))
        return 1
    extra = shlex.split(a.client_args or "")
    if a.strategy == "v1":
        extra = ["--no-ext"] + extra
    procs = {}
    t0 = time.monotonic()
    for side, (ns, start) in hosts.items():
        out = open(os.path.join(d, "client-%s.json" % side), "w")
        err = open(os.path.join(d, "client-%s.log" % side), "w")
        files += [out, err]
        cmd = [a.n4, "-c", "-h", env["LAB_IP_SERVER"], "-b", str(start), "--json", "-v"] + extra
        procs[side] = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdout=out, stderr=err)
    end = t0 + a.limit + GRACE
    exited = {}
    while time.monotonic() < end and any(p.poll() is None for p in procs.values()):
        for side, p in procs.items():
            if side not in exited and p.poll() is not None:
                exited[side] = round(time.monotonic() - t0, 3)
        time.sleep(0.02)
    for side, p in procs.items():
        if side not in exited and p.poll() is not None:
            exited[side] = round(time.monotonic() - t0, 3)
    ran = time.monotonic() - t0
    for p in procs.values():
        stop(p)
    result = {"ran_s": round(ran, 3)}
    for side, (ns, _) in hosts.items():
        c = counters(ns)
        r = {"rc": procs[side].returncode, "packets": c.get("n4"), "load_packets": c.get("load"),
             "exit_s": exited.get(side)}  # None: still running when the trial stopped it
        with open(os.path.join(d, "client-%s.json" % side)) as f:
            line = f.read().strip()
        if line:
            try:
                r["win"] = json.loads(line.splitlines()[0])
            except ValueError:
                r["stdout"] = line
        with open(os.path.join(d, "client-%s.log" % side)) as f:
            text = f.read()
        r["lose"] = text.count("[ LOSE ]")
        r["rounds_logged"] = text.count("Source port:")
        r["plans"] = re.findall(r"plan: (.*)", text)[:3]
        r["peers"] = re.findall(r"=> Peer: (\S+)", text)[:5]  # the first PEERINFO addresses
        r["wins_logged"] = text.count("[ WIN ]")
        last = [x for x in text.splitlines() if x.strip()]
        r["last_line"] = last[-1] if last else None
        result[side] = r
    stop(srv)
    for f in files:
        f.close()
    with open(os.path.join(d, "server.log")) as f:
        result["paired"] = re.findall(r"Paired \[[^\]]*\]: (.*)", f.read())[:5]
    # The delay program's release lateness (how faithfully the router held the delay).
    try:
        with open(os.path.join(d, "delay.pid")) as f:
            os.kill(int(f.read()), signal.SIGUSR1)
        time.sleep(0.1)
        with open(os.path.join(d, "delay.log")) as f:
            lines = [x for x in f.read().splitlines() if "lateness" in x]
        if lines:
            result["delay_stats"] = lines[-1]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    wins = [result[s].get("win") for s in "ab"]
    result["ok"] = all(w is not None and w["elapsed_ms"] <= a.limit * 1000 for w in wins)
    if all(wins):
        result["t_ms"] = max(w["elapsed_ms"] for w in wins)
        result["round"] = max(w["round"] for w in wins)
    if a.logs:
        os.makedirs(a.logs, exist_ok=True)
        for name in ("server.log", "client-a.log", "client-b.log"):
            src = os.path.join(d, name)
            if os.path.exists(src):
                with open(src) as f, open(os.path.join(a.logs, "%s-%s" % (a.tag, name)), "w") as g:
                    g.write(f.read())
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- the grid


def floats(text):
    return [float(x) for x in text.split(",") if x]


def num(x):
    return ("%g" % x)


def build(pkg, binary):
    log("building %s (cargo build --release -p %s)" % (binary, pkg))
    args = ["cargo", "build", "--release", "-p", pkg]
    if binary == "n4":
        args += ["--bin", "n4"]
    if subprocess.run(args, cwd=REPO, stdout=sys.stderr).returncode != 0:
        sys.exit("measure: `%s` failed in %s (a tree in mid-edit? --rev COMMIT builds a "
                 "commit apart)" % (" ".join(args), REPO))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return os.path.join(target, "release", binary)


def build_rev(rev):
    """n4 and n4-sim of commit REV, built from `git archive` in their own directory."""
    sha = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip()
    src = os.path.join(tempfile.gettempdir(), "n4-measure-" + sha[:12])
    if not os.path.exists(os.path.join(src, "Cargo.toml")):
        os.makedirs(src, exist_ok=True)
        arch = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", src], stdin=arch.stdout, check=True)
        arch.wait()
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(src, "target"))
    log("building n4 and n4-sim of %s in %s" % (sha[:12], src))
    for args in (["-p", "n4-mio", "--bin", "n4"], ["-p", "n4-sim"]):
        if subprocess.run(["cargo", "build", "--release"] + args, cwd=src, env=env,
                          stdout=sys.stderr).returncode != 0:
            sys.exit("measure: cargo build %s failed in %s" % (" ".join(args), src))
    return (os.path.join(src, "target", "release", "n4"),
            os.path.join(src, "target", "release", "n4-sim"), sha[:12])


def run_trial(a, cell, k):
    lam, delay, strat = cell
    limit = a.limit_v1 if strat == "v1" else a.limit_predict
    tag = "l%s-d%s-%s-%d" % (num(lam), num(delay), strat, k)
    nats = ["--nat-a", a.nat_a, "--nat-b", a.nat_b]
    if a.one_nat:  # both hosts behind nat-a; lab.sh refuses --nat-b then
        nats = ["--one-nat", "--nat-a", a.nat_a] + (["--hairpin"] if a.hairpin else [])
        tag = "onenat-" + ("hairpin-" if a.hairpin else "") + tag
    cmd = [LAB_SH, "run", "--delay", num(delay), "--load", num(lam), "--seed", str(2 * k + 1)] + \
        nats + ["--", sys.executable, os.path.abspath(__file__), "trial", "--n4", a.n4,
                "--strategy", strat, "--limit", str(limit), "--tag", tag]
    if a.logs:
        cmd += ["--logs", a.logs]
    if a.client_args:
        cmd += ["--client-args", a.client_args]
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + GRACE + 60)
        out = p.stdout.strip().splitlines()
        res = json.loads(out[-1]) if out else {"error": "no output: " + p.stderr[-500:]}
    except subprocess.TimeoutExpired:
        res = {"error": "trial timed out"}
    except ValueError:
        res = {"error": "bad output: " + p.stdout[-500:]}
    res.update({"lambda": lam, "delay_ms": delay, "strategy": strat, "limit_s": limit,
                "trial": k, "wall_s": round(time.monotonic() - t, 2)})
    if a.one_nat:
        res["one_nat"] = True
        res["hairpin"] = bool(a.hairpin)
    res.setdefault("ok", False)
    return res


def sim_grid(a, cells):
    """{(λ, delay, strategy): csv row} from n4-sim sweep, one sweep per (strategy, delay)."""
    out = {}
    groups = {}
    for lam, delay, strat in cells:
        groups.setdefault((strat, delay), []).append(lam)
    a.sim_cmds = []
    for (strat, delay), lams in groups.items():
        limit = a.limit_v1 if strat == "v1" else a.limit_predict
        with tempfile.NamedTemporaryFile(suffix=".csv") as tmp:
            cmd = [a.sim, "sweep", "--lambda", ",".join(num(x) for x in lams),
                   "--rtt-ms", num(2 * delay), "--strategy", strat, "--seeds", str(a.sim_seeds),
                   "--max-rounds", "0", "--time-limit-s", num(limit), "--quiet"]
            if a.one_nat:
                cmd += ["--one-nat"] + (["--hairpin"] if a.hairpin else [])
            cmd += ["--csv", tmp.name]
            a.sim_cmds.append(" ".join(["n4-sim"] + cmd[1:-2]))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(tmp.name) as f:
                for row in csv.DictReader(f):
                    out[(float(row["lambda"]), float(row["rtt_ms"]) / 2, row["strategy"])] = row
    return out


def fmt_ms(x):
    return "-" if x is None else "%.0f" % x


def table(results, cells, sim):
    lines = [
        "| λ /s | RTT ms | strategy | limit s | lab WIN | lab median ms (min–max) | "
        "sim WIN | sim median ms | lab rounds | sim rounds | lab pkts/client | "
        "sim pkts/client |",
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        lam, delay, strat = cell
        rs = [r for r in results if (r["lambda"], r["delay_ms"], r["strategy"]) == cell]
        if not rs:
            continue
        wins = [r for r in rs if r["ok"]]
        ts = sorted(r["t_ms"] for r in wins)
        med = statistics.median(ts) if ts else None
        span = " (%d–%d)" % (ts[0], ts[-1]) if len(ts) > 1 else ""
        rounds = statistics.mean(r["round"] for r in wins) if wins else None
        pk = [(r[s]["packets"]) for r in rs for s in "ab"
              if isinstance(r.get(s), dict) and r[s].get("packets") is not None]
        s = sim.get((lam, delay, strat))
        if s:
            sim_win = "%.0f %%" % (100 * float(s["success"]))
            sim_med = fmt_ms(float(s["median_ms"])) if s["median_ms"] else "-"
            sim_rounds = "%.2f" % float(s["mean_rounds"]) if s["mean_rounds"] else "-"
            sim_pk = "%.0f" % (float(s["mean_datagrams"]) / 2)
        else:
            sim_win = sim_med = sim_rounds = sim_pk = "n/a"
        lines.append("| %s | %s | %s | %s | %d/%d | %s%s | %s | %s | %s | %s | %s | %s |" % (
            num(lam), num(2 * delay), strat, num(rs[0]["limit_s"]), len(wins), len(rs),
            fmt_ms(med), span, sim_win, sim_med,
            "-" if rounds is None else "%.2f" % rounds, sim_rounds,
            "%.0f" % statistics.mean(pk) if pk else "-", sim_pk))
    return "\n".join(lines)


def machine(rev=None):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    if not rev:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip() or "?"
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "n4-core", "n4-mio/src",
                           "n4-sim/src"], cwd=REPO).returncode != 0:
            rev += " + uncommitted changes"
    return "%d CPUs (%s), kernel %s, load average %s at start, n4 of commit %s" % (
        os.cpu_count(), cpu, platform.release(),
        " ".join(open("/proc/loadavg").read().split()[:3]), rev)


def main():
    if sys.argv[1:2] == ["trial"]:  # internal: one trial inside `lab.sh run`
        t = argparse.ArgumentParser(prog="measure.py trial", allow_abbrev=False)
        t.add_argument("--n4", required=True)
        t.add_argument("--strategy", choices=["v1", "predict"], required=True)
        t.add_argument("--limit", type=float, required=True)
        t.add_argument("--tag", default="trial")
        t.add_argument("--logs")
        t.add_argument("--client-args")
        return trial(t.parse_args(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="trials per cell (default 3)")
    ap.add_argument("--lambda", dest="lam", default="0,200,400,1000",
                    help="background flows/s behind each NAT (default 0,200,400,1000)")
    ap.add_argument("--delay", default="25",
                    help="one-way delay per router crossing, ms; RTT = 2x (default 25)")
    ap.add_argument("--strategy", default="v1,predict", help="v1 (--no-ext), predict (default)")
    ap.add_argument("--limit-v1", type=float, default=25, help="s to WIN for v1 (default 25)")
    ap.add_argument("--limit-predict", type=float, default=10,
                    help="s to WIN for predict (default 10)")
    ap.add_argument("--client-args", help="extra arguments for both n4 -c")
    ap.add_argument("--nat-a", default="sequential",
                    help="lab NAT kind of site A: sequential, blocks, random, preserving")
    ap.add_argument("--nat-b", help="lab NAT kind of site B (default sequential)")
    ap.add_argument("--one-nat", action="store_true",
                    help="both clients behind nat-a (lab.sh --one-nat; no site B)")
    ap.add_argument("--hairpin", action="store_true",
                    help="with --one-nat: nat-a hairpins (lab.sh --hairpin)")
    ap.add_argument("--n4", help="n4 binary (default: build target/release/n4)")
    ap.add_argument("--sim", help="n4-sim binary (default: build target/release/n4-sim)")
    ap.add_argument("--no-sim", action="store_true", help="lab only")
    ap.add_argument("--rev", help="measure n4 and n4-sim of this git commit (built apart)")
    ap.add_argument("--sim-seeds", type=int, default=200, help="sim runs per cell (default 200)")
    ap.add_argument("--jsonl", help="append every trial's result here (one JSON per line)")
    ap.add_argument("--logs", help="keep each trial's n4 logs in this directory")
    ap.add_argument("--from", dest="from_file", help="no lab: tabulate a --jsonl file")
    a = ap.parse_args()
    if a.one_nat and a.nat_b:
        ap.error("--one-nat: there is no site B (--nat-b)")
    if a.hairpin and not a.one_nat:
        ap.error("--hairpin needs --one-nat")
    a.nat_b = a.nat_b or "sequential"

    strategies = [s for s in a.strategy.split(",") if s]
    for s in strategies:
        if s not in ("v1", "predict"):
            ap.error("unknown strategy %r" % s)
    cells = [(lam, d, s) for s in strategies for d in floats(a.delay) for lam in floats(a.lam)]
    rev = None
    if a.rev and not a.from_file:
        a.n4, a.sim, rev = build_rev(a.rev)
    facts = machine(rev)
    if a.from_file:
        with open(a.from_file) as f:
            results = [json.loads(x) for x in f if x.strip()]
        results = [r for r in results if (r["lambda"], r["delay_ms"], r["strategy"]) in cells]
    else:
        if os.geteuid() != 0:
            ap.error("the lab needs root")
        if not a.n4:
            a.n4 = build("n4-mio", "n4")
        a.n4 = os.path.abspath(a.n4)
        results = []
        total = len(cells) * a.trials
        started = time.monotonic()
        for k in range(a.trials):
            for cell in cells:
                r = run_trial(a, cell, k)
                results.append(r)
                if a.jsonl:
                    with open(a.jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
                log("%d/%d λ=%s delay=%s %s: %s%s (%.1f s)" % (
                    len(results), total, num(cell[0]), num(cell[1]), cell[2],
                    "WIN %d ms" % r["t_ms"] if r["ok"] else "no WIN",
                    " " + r["error"] if "error" in r else "", r["wall_s"]))
        log("%d trials in %.0f s" % (total, time.monotonic() - started))
    sim = {}
    if not a.no_sim:
        if not a.sim:
            a.sim = build("n4-sim", "n4-sim")
        a.sim = os.path.abspath(a.sim)
        sim = sim_grid(a, cells)
    print("Command: `%s`" % " ".join(shlex.quote(x) for x in ["lab/measure.py"] + sys.argv[1:]))
    print()
    print("Machine: %s" % facts)
    if sim:
        print()
        print("Sim: " + "; ".join("`%s`" % c for c in a.sim_cmds))
    print()
    print(table(results, cells, sim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
