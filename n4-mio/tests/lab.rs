//! The `n4` binary through real Linux NATs: each test builds a lab with `lab/lab.sh run` (two
//! nftables NAT4s with sequential or random external ports, a server, a host behind each NAT,
//! all in network namespaces of its own; see lab/README.md), runs `n4` inside it and checks
//! what crosses the kernel NATs.
//!
//! Needs root, `ip`, `nft`, `iptables` and `python3` (.ci/run installs them and runs these as
//! root). Without them the tests FAIL, saying so; `N4_SKIP_LAB=1` turns them into no-ops.
//!
//! Every test holds its lab through `lab.sh run -- <holder>`: the holder prints the lab's
//! `LAB_*` variables and waits for its stdin to close. Dropping the [`Lab`] closes that stdin
//! (or, if `lab.sh` does not finish in time, signals it), and `lab.sh` tears the lab down; if
//! this test process dies, the pipe closes just the same. All traffic stays inside the lab's
//! namespaces; lab names are unique per run, so the tests run in parallel.

mod util;

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::{collect, wait_until, Lines, Proc, N4};

const LAB_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/lab.sh");

/// How long a lab may take to come up, and to go down.
const LAB_UP: Duration = Duration::from_secs(60);
const LAB_DOWN: Duration = Duration::from_secs(20);
/// How long a client may take to WIN (v1 logs WIN after a 2 s acknowledgement burst).
const WIN: Duration = Duration::from_secs(30);

/// Whether the lab can run here: `false` with `N4_SKIP_LAB=1`; panics with what is missing
/// otherwise.
fn lab_available() -> bool {
    if std::env::var("N4_SKIP_LAB").is_ok_and(|v| v == "1") {
        eprintln!("N4_SKIP_LAB=1: real-NAT lab test skipped");
        return false;
    }
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces, nftables)".to_string());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("iptables", "iptables"),
        ("python3", "python3"),
    ] {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            missing.push(format!("`{tool}` on PATH (package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the real-NAT lab tests (n4-mio/tests/lab.rs) need {}. Run them as root with iproute2, \
         nftables, iptables and python3 installed (.ci/run does), or set N4_SKIP_LAB=1 to skip \
         them.",
        missing.join(", ")
    );
    true
}

/// A lab of `lab.sh run`, torn down when dropped.
struct Lab {
    env: HashMap<String, String>,
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Lines,
}

impl Lab {
    /// `lab.sh run OPTS -- <holder>`; `None` when the lab tests are skipped.
    fn up(opts: &[&str]) -> Option<Lab> {
        if !lab_available() {
            return None;
        }
        let holder = "env | grep '^LAB_'; echo LAB_READY; exec cat >/dev/null";
        let mut child = Command::new(LAB_SH)
            .arg("run")
            .args(opts)
            .args(["--", "sh", "-c", holder])
            .env("LAB_N4", N4)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {LAB_SH}: {e}"));
        let (tx, rx) = mpsc::channel();
        collect(child.stdout.take().unwrap(), Some(tx));
        let stderr = collect(child.stderr.take().unwrap(), None);
        let stdin = child.stdin.take();
        let mut lab = Lab {
            env: HashMap::new(),
            child,
            stdin,
            stderr,
        };
        let end = Instant::now() + LAB_UP;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "LAB_READY" => break,
                Ok(line) => {
                    if let Some((k, v)) = line.split_once('=') {
                        lab.env.insert(k.to_string(), v.to_string());
                    }
                }
                Err(_) => panic!(
                    "lab.sh run {opts:?} did not bring a lab up within {LAB_UP:?}; its log:\n{}",
                    lab.log()
                ),
            }
        }
        Some(lab)
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("lab exported no {key}"))
    }

    /// The namespace of ROLE: server, a, b.
    fn ns(&self, role: &str) -> &str {
        self.var(match role {
            "server" => "LAB_NS_SERVER",
            "a" => "LAB_NS_A",
            "b" => "LAB_NS_B",
            _ => panic!("unknown role {role}"),
        })
    }

    fn server_ip(&self) -> &str {
        self.var("LAB_IP_SERVER")
    }

    /// `n4 ARGS` inside ROLE's namespace (`ip netns exec` execs it: the pid is n4's).
    fn n4(&self, role: &str, args: &[&str]) -> Proc {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.ns(role), N4])
            .args(args);
        Proc::spawn_command(&format!("{role} (n4 {})", args.join(" ")), command)
    }

    /// `n4 -s ARGS` in the server's namespace, once it listens.
    fn server(&self, args: &[&str]) -> Proc {
        let mut all = vec!["-s"];
        all.extend_from_slice(args);
        let s = self.n4("server", &all);
        s.wait_log("Listening on", Duration::from_secs(10));
        s
    }

    /// `n4 -c -h SERVER -b START ARGS` in host `role`'s namespace.
    fn client(&self, role: &str, start: u16, args: &[&str]) -> Proc {
        let start = start.to_string();
        let mut all = vec!["-c", "-h", self.server_ip(), "-b", &start];
        all.extend_from_slice(args);
        self.n4(role, &all)
    }

    /// A UDP socket bound to `bind` inside ROLE's namespace.
    fn udp(&self, role: &str, bind: SocketAddrV4) -> UdpSocket {
        let path = format!("/run/netns/{}", self.ns(role));
        let sock = thread::spawn(move || {
            // This thread enters the namespace; the socket it makes stays in there.
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on an open namespace file; it moves only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            UdpSocket::bind(bind)
        })
        .join()
        .expect("setns thread");
        let sock = sock.unwrap_or_else(|e| panic!("bind {bind} in {role}: {e}"));
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // EOF for the holder: lab.sh tears down and exits.
        drop(self.stdin.take());
        if wait_until(&mut self.child, LAB_DOWN).is_none() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if wait_until(&mut self.child, LAB_DOWN).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                eprintln!(
                    "lab.sh did not tear down in time (killed; `lab.sh down stale` removes \
                     the rest); its log:\n{}",
                    self.log()
                );
            }
        }
    }
}

/// The `--json` line of a client that won.
struct Won {
    local_port: u16,
    peer: SocketAddrV4,
    strategy: String,
    json: serde_json::Value,
}

fn won(p: &mut Proc) -> Won {
    let line = p.wait_stdout(WIN);
    let json: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("{}: stdout {line:?} is not JSON: {e}", p.name));
    // stdout and stderr are read by two threads: the log line may land a moment later.
    p.wait_log("[ WIN ]", WIN);
    Won {
        local_port: json["local_port"].as_u64().expect("local_port") as u16,
        peer: json["peer"]
            .as_str()
            .expect("peer")
            .parse()
            .expect("peer ip:port"),
        strategy: json["strategy"].as_str().expect("strategy").to_string(),
        json,
    }
}

/// Both clients exited 0 after WIN; returns their results.
fn both_won(a: &mut Proc, b: &mut Proc) -> (Won, Won) {
    let (wa, wb) = (won(a), won(b));
    for p in [a, b] {
        let status = p.wait_exit(WIN);
        assert_eq!(
            status.code(),
            Some(0),
            "{}: {status}; log:\n{}",
            p.name,
            p.log()
        );
    }
    (wa, wb)
}

/// The peers seen are the other side's NAT (the punch really crossed both kernel NATs).
fn assert_through_nats(lab: &Lab, wa: &Won, wb: &Won) {
    assert_eq!(
        wa.peer.ip().to_string(),
        lab.var("LAB_IP_NAT_B"),
        "{}",
        wa.json
    );
    assert_eq!(
        wb.peer.ip().to_string(),
        lab.var("LAB_IP_NAT_A"),
        "{}",
        wb.json
    );
}

/// After both clients exited, a datagram goes A → B and one B → A through the punched hole,
/// from the local ports the clients reported to the peers they reported.
fn datagrams_cross_the_hole(lab: &Lab, wa: &Won, wb: &Won) {
    let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let sa = lab.udp("a", any(wa.local_port));
    let sb = lab.udp("b", any(wb.local_port));
    let mut buf = [0u8; 1500];
    // Each side: its name, its socket, and the peer it reported.
    let a = ("A", &sa, wa.peer);
    let b = ("B", &sb, wb.peer);
    for ((x, from, aim), (y, to, seen_as)) in [(a, b), (b, a)] {
        let text = format!("hello {y}, this is {x}");
        from.send_to(text.as_bytes(), aim).unwrap();
        let (n, src) = to.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{x} -> {y} through the hole: {e}; A {} B {}",
                wa.json, wb.json
            )
        });
        assert_eq!(&buf[..n], text.as_bytes());
        assert_eq!(
            src,
            SocketAddr::V4(seen_as),
            "{y} hears {x} from the peer it reported"
        );
    }
}

/// (a) The original's behaviour (`--no-ext`: fixed offset 20, 25 ports) through two
/// sequential NATs, no background flows: WIN, then a datagram each way through the hole.
#[test]
fn v1_wins_through_two_sequential_nats_and_the_hole_carries_both_ways() {
    let Some(lab) = Lab::up(&["--nat", "sequential"]) else {
        return;
    };
    let _srv = lab.server(&[]);
    let args = ["--no-ext", "--json", "--rounds", "3"];
    let mut a = lab.client("a", 30000, &args);
    let mut b = lab.client("b", 31000, &args);
    let (wa, wb) = both_won(&mut a, &mut b);
    for w in [&wa, &wb] {
        assert_eq!(w.strategy, "v1", "{}", w.json);
        assert_eq!(
            w.json["round"], 1,
            "λ = 0: the first round wins; {}",
            w.json
        );
    }
    assert_through_nats(&lab, &wa, &wb);
    datagrams_cross_the_hole(&lab, &wa, &wb);
}

/// (b) Our default (the prediction extension) through the same NATs at 50 ms RTT: WIN in the
/// first round with both sides aiming by prediction, then a datagram each way.
#[test]
fn default_strategy_predicts_and_wins_through_two_sequential_nats() {
    let Some(lab) = Lab::up(&["--nat", "sequential", "--delay", "25"]) else {
        return;
    };
    let _srv = lab.server(&[]);
    let args = ["--json", "-v", "--rounds", "3"];
    let mut a = lab.client("a", 30000, &args);
    let mut b = lab.client("b", 31000, &args);
    let (wa, wb) = both_won(&mut a, &mut b);
    for (w, p) in [(&wa, &a), (&wb, &b)] {
        assert_eq!(w.strategy, "predict", "{}; log:\n{}", w.json, p.log());
        assert_eq!(w.json["round"], 1, "{}; log:\n{}", w.json, p.log());
    }
    assert_through_nats(&lab, &wa, &wb);
    datagrams_cross_the_hole(&lab, &wa, &wb);
}

/// (b') A keyed session (`--key-file`) through the same NATs at 50 ms RTT with background
/// load: authenticated through the server, WIN in the first round on one pair of addresses
/// both sides agree on, and the hole carries a datagram each way.
#[test]
fn keyed_clients_win_through_two_sequential_nats_on_one_agreed_pair() {
    let Some(lab) = Lab::up(&["--nat", "sequential", "--delay", "25", "--load", "200"]) else {
        return;
    };
    let key = std::env::temp_dir().join(format!("n4-lab-{}.key", std::process::id()));
    std::fs::write(&key, "a key for the lab, long enough").unwrap();
    let k = key.to_str().unwrap();
    let _srv = lab.server(&[]);
    let args = ["--json", "-v", "--rounds", "3", "--key-file", k];
    let mut a = lab.client("a", 30000, &args);
    let mut b = lab.client("b", 31000, &args);
    let (wa, wb) = both_won(&mut a, &mut b);
    for (w, p) in [(&wa, &a), (&wb, &b)] {
        assert!(p.log().contains("Partner authenticated"), "{}", p.log());
        assert_eq!(w.json["round"], 1, "{}; log:\n{}", w.json, p.log());
    }
    assert_through_nats(&lab, &wa, &wb);
    datagrams_cross_the_hole(&lab, &wa, &wb);
    let _ = std::fs::remove_file(key);
}

/// (d) WireGuard between the two NAT4 boxes, kept by `n4 --wg`: userspace WireGuard
/// (wireguard-go) on host A and host B behind the sequential NATs at 50 ms RTT with λ = 200;
/// a ping crosses the tunnel; then NAT A forgets every mapping (`conntrack -F`) and, without a
/// human, the ping gets through again within 10 s. The whole story is `lab/wg.py` (which also
/// measures it, docs/LAB.md); this runs one trial and checks its numbers.
#[test]
fn wireguard_link_through_two_nats_recovers_when_a_nat_forgets_the_hole() {
    if !lab_available() {
        return;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in [
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("conntrack", "conntrack"),
    ] {
        assert!(
            std::env::split_paths(&path).any(|d| d.join(tool).is_file()),
            "the WireGuard lab test needs `{tool}` (package {package}; .ci/run installs it)"
        );
    }
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/wg.py"))
        .args([
            "--trials",
            "1",
            "--delay",
            "25",
            "--load",
            "200",
            "--n4",
            util::N4,
        ])
        .output()
        .expect("run lab/wg.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let trial: serde_json::Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no trial result:\n{stdout}\n{stderr}"));
    let first = trial["first_ping_s"].as_f64();
    let recover = trial["recover_s"].as_f64();
    assert!(first.is_some(), "no ping through WireGuard: {trial:#}");
    assert_eq!(
        trial["outage_seen"], true,
        "the flush did not break the hole: {trial:#}"
    );
    assert!(
        recover.is_some_and(|r| r <= 10.0),
        "no ping within 10 s after the NAT forgot the hole: {trial:#}"
    );
    for side in ["a", "b"] {
        assert!(
            trial[side]["died"].as_u64() >= Some(1) && trial[side]["wins"].as_u64() >= Some(2),
            "{side} did not notice the dead hole and punch again: {trial:#}"
        );
    }
}

/// (e) `--keepalive`: when a NAT forgets the hole, both sides notice the silence and punch
/// again by themselves.
#[test]
fn keepalive_mode_punches_again_when_a_nat_forgets_the_hole() {
    let Some(lab) = Lab::up(&["--nat", "sequential", "--delay", "25"]) else {
        return;
    };
    let _srv = lab.server(&[]);
    let args = ["--keepalive", "1", "-v"];
    let a = lab.client("a", 30000, &args);
    let b = lab.client("b", 31000, &args);
    for p in [&a, &b] {
        p.wait_log("[ WIN ]", WIN);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let flush = std::process::Command::new("ip")
        .args(["netns", "exec", lab.var("LAB_NS_NAT_A"), "conntrack", "-F"])
        .output()
        .expect("conntrack -F (package conntrack)");
    assert!(
        flush.status.success(),
        "{}",
        String::from_utf8_lossy(&flush.stderr)
    );
    for p in [&a, &b] {
        p.wait_log("the hole died; punching again", Duration::from_secs(10));
    }
    for p in [&a, &b] {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while p.log().matches("[ WIN ]").count() < 2 {
            assert!(
                std::time::Instant::now() < end,
                "{}: no second WIN:\n{}",
                p.name,
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// (c) `--forward`: each side's local UDP program (on the host's loopback) talks to the other
/// through the relay and the kernel NATs, both ways; a signal then ends both cleanly.
#[test]
fn forward_relays_local_programs_through_the_kernel_nats() {
    let Some(lab) = Lab::up(&["--nat", "sequential"]) else {
        return;
    };
    let _srv = lab.server(&[]);
    let app_a = lab.udp("a", SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let app_b = lab.udp("b", SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let fwd_a = app_a.local_addr().unwrap().to_string();
    let fwd_b = app_b.local_addr().unwrap().to_string();
    let mut a = lab.client(
        "a",
        30000,
        &["--json", "--rounds", "3", "--forward", &fwd_a],
    );
    let mut b = lab.client(
        "b",
        31000,
        &["--json", "--rounds", "3", "--forward", &fwd_b],
    );
    let (wa, wb) = (won(&mut a), won(&mut b));
    assert_through_nats(&lab, &wa, &wb);
    let via = |w: &Won| -> SocketAddr {
        w.json["forward_via"]
            .as_str()
            .unwrap_or_else(|| panic!("no forward_via in {}", w.json))
            .parse()
            .unwrap()
    };
    let (via_a, via_b) = (via(&wa), via(&wb));

    let mut buf = [0u8; 1500];
    let mut relay = |from_app: &UdpSocket, to_via, to_app: &UdpSocket, from_via, text: &[u8]| {
        from_app.send_to(text, to_via).unwrap();
        let (n, from) = to_app.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{:?} did not cross: {e}\nA:\n{}\nB:\n{}",
                String::from_utf8_lossy(text),
                a.log(),
                b.log()
            )
        });
        assert_eq!(&buf[..n], text);
        assert_eq!(from, from_via);
    };
    relay(&app_a, via_a, &app_b, via_b, b"A's program to B's");
    relay(&app_b, via_b, &app_a, via_a, b"B's program to A's");
    relay(&app_a, via_a, &app_b, via_b, &[0x5a; 1400]);
    relay(&app_b, via_b, &app_a, via_a, &[0xa5; 1400]);

    for p in [&mut a, &mut b] {
        assert!(p.is_running(), "{}: exited; log:\n{}", p.name, p.log());
        p.signal("-INT");
        let status = p.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(0),
            "{}: {status}; log:\n{}",
            p.name,
            p.log()
        );
    }
}

/// (d) Both NATs random-port: nothing can be predicted; both clients report LOSE, give up after
/// `--rounds 2` with exit 1, print nothing on stdout, and neither hangs.
///
/// The server gets `--wait-timeout 2`: without it, when one client gives up while the other
/// has just reconnected for its next round, the latter waits for a partner forever (the
/// server's default) and never reaches its `--rounds` limit.
#[test]
fn random_port_nats_lose_cleanly_within_the_rounds_limit() {
    let Some(lab) = Lab::up(&["--nat", "random"]) else {
        return;
    };
    let _srv = lab.server(&["--wait-timeout", "2"]);
    let args = ["--json", "--rounds", "2", "--round-timeout", "1"];
    let t0 = Instant::now();
    let mut a = lab.client("a", 30000, &args);
    let mut b = lab.client("b", 31000, &args);
    for p in [&mut a, &mut b] {
        let status = p.wait_exit(Duration::from_secs(30));
        let log = p.log();
        assert_eq!(status.code(), Some(1), "{}: {status}; log:\n{log}", p.name);
        assert!(log.contains("[ LOSE ]"), "{}: no LOSE; log:\n{log}", p.name);
        assert!(
            log.contains("Gave up after 2 rounds"),
            "{}: log:\n{log}",
            p.name
        );
        assert!(!log.contains("[ WIN ]"), "{}: log:\n{log}", p.name);
        assert!(p.stdout().is_empty(), "{}: stdout {:?}", p.name, p.stdout());
    }
    eprintln!("both gave up after {:?}", t0.elapsed());
}
