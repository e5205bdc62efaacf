//! The `n4` binary for real: processes and sockets on loopback, every wait bounded.
//!
//! Each test uses its own source-port windows (below Linux's ephemeral range, so nothing else
//! takes them) and a fresh server port, so the tests run in parallel.

mod util;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

use util::{client, server, v1_client, Proc};

const T: Duration = Duration::from_secs(20);

fn assert_won(p: &mut Proc) {
    let status = p.wait_exit(T);
    let log = p.log();
    assert_eq!(
        status.code(),
        Some(0),
        "{}: exit {status}; log:\n{log}",
        p.name
    );
    for line in [
        " => Punch from peer ",
        "[ WIN ]",
        "Local port:",
        "> nc -u -p ",
    ] {
        assert!(log.contains(line), "{}: no {line:?} in log:\n{log}", p.name);
    }
}

#[test]
fn two_clients_win_and_server_shrugs_off_silence_and_garbage() {
    let (mut srv, port) = server(&[]);
    // A v1 server would hang for 60 s on a silent connection and abort on a garbage datagram.
    let _silent = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .send_to(b"garbage!", (Ipv4Addr::LOCALHOST, port))
        .unwrap();
    let mut a = client("a", port, 21000, &[]);
    let mut b = client("b", port, 21100, &[]);
    assert_won(&mut a);
    assert_won(&mut b);
    // The original's log lines, in the original's words.
    let log = a.log();
    for line in [
        "==================",
        "Source port: 21000-21064",
        " <= Hello ",
        " => Ready ",
        " <= Exchange ",
        " => Peer: 127.0.0.1:211",
        // Where it aims depends on what the probes made of loopback's ephemeral ports.
        " [ Target: 127.0.0.1:",
        " <= Punch ",
        "Peer address:  127.0.0.1:211",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    srv.wait_log("Paired [n4n4n4]", T);
    srv.signal("-TERM");
    assert_eq!(srv.wait_exit(T).code(), Some(0));
    assert!(srv.log().contains("Stopped"));
}

#[test]
fn json_result_is_one_object_with_the_documented_fields() {
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 21200, &["--json"]);
    let mut b = client("b", port, 21300, &["--json"]);
    for (p, window) in [(&mut a, 21200..21264), (&mut b, 21300..21364)] {
        assert_won(p);
        let out = p.stdout();
        assert_eq!(out.len(), 1, "{}: stdout {out:?}", p.name);
        let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "datagrams",
                "elapsed_ms",
                "local_port",
                "peer",
                "round",
                "strategy"
            ]
        );
        // Probes, EXCHANGEs, at least one pass of PUNCH and the acknowledgements.
        assert!(v["datagrams"].as_u64().unwrap() >= 10, "{v}");
        let local = v["local_port"].as_u64().unwrap() as u16;
        assert!(window.contains(&local), "{local}");
        let peer: SocketAddr = v["peer"].as_str().unwrap().parse().unwrap();
        assert_eq!(peer.ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(v["round"], 1);
        // On loopback the probes see no NAT, so there is no hint to follow: either is right.
        let strategy = v["strategy"].as_str().unwrap();
        assert!(["v1", "predict"].contains(&strategy), "{strategy}");
        assert!(v["elapsed_ms"].as_u64().unwrap() < 10_000);
    }
}

#[test]
fn forward_carries_datagrams_both_ways_through_the_hole() {
    let (_srv, port) = server(&[]);
    let app_a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let app_b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for app in [&app_a, &app_b] {
        app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let fwd_a = app_a.local_addr().unwrap().to_string();
    let fwd_b = app_b.local_addr().unwrap().to_string();
    let mut a = client("a", port, 21400, &["--json", "-v", "--forward", &fwd_a]);
    let mut b = client("b", port, 21500, &["--json", "-v", "--forward", &fwd_b]);
    let via = |p: &Proc| -> SocketAddr {
        let v: serde_json::Value = serde_json::from_str(&p.wait_stdout(T)).unwrap();
        v["forward_via"].as_str().unwrap().parse().unwrap()
    };
    let (via_a, via_b) = (via(&a), via(&b));

    let mut buf = [0u8; 1500];
    app_a.send_to(b"ping from A", via_a).unwrap();
    let (n, from) = app_b
        .recv_from(&mut buf)
        .expect("A's datagram reaches B's program");
    assert_eq!(&buf[..n], b"ping from A");
    assert_eq!(from, via_b);
    app_b.send_to(b"pong from B", from).unwrap();
    let (n, from) = app_a.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!(
            "B's reply does not reach A's program: {e}\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        )
    });
    assert_eq!(&buf[..n], b"pong from B");
    assert_eq!(from, via_a);
    // A bigger datagram, the size WireGuard sends.
    let big = vec![0x5a; 1400];
    app_a.send_to(&big, via_a).unwrap();
    let (n, _) = app_b.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &big[..]);

    // Still holding after WIN; a signal ends it cleanly with 0.
    for p in [&mut a, &mut b] {
        assert!(p.is_running(), "{}: exited; log:\n{}", p.name, p.log());
        p.signal("-INT");
        assert_eq!(p.wait_exit(T).code(), Some(0), "{}", p.log());
        assert!(p.log().contains("[ WIN ]"));
        assert!(p.log().contains("Stopped"));
    }
}

#[test]
fn keepalive_holds_the_hole_until_a_signal() {
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 21600, &["--keepalive", "1", "-v"]);
    let mut b = client("b", port, 21700, &["--keepalive=1"]);
    a.wait_log("[ WIN ]", T);
    b.wait_log("[ WIN ]", T);
    a.wait_log("keepalive from slot", Duration::from_secs(5));
    assert!(a.is_running() && b.is_running());
    a.signal("-TERM");
    b.signal("-INT");
    assert_eq!(a.wait_exit(T).code(), Some(0), "{}", a.log());
    assert_eq!(b.wait_exit(T).code(), Some(0), "{}", b.log());
}

#[test]
fn v1_clients_pair_through_our_server() {
    let (_srv, port) = server(&[]);
    let a = thread::spawn(move || v1_client([127, 0, 0, 1], port, "n4n4n4", 0));
    let b = thread::spawn(move || v1_client([127, 0, 0, 2], port, "n4n4n4", 0));
    let (a, b) = (a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
    assert_eq!(a.peer.port(), b.local_port, "{a:?} {b:?}");
    assert_eq!(b.peer.port(), a.local_port, "{a:?} {b:?}");
}

#[test]
fn v1_client_pairs_with_our_client() {
    let (_srv, port) = server(&[]);
    // Offset 0 on both sides: the v1 client has a single socket, and aims at our EXCHANGE port.
    let v1 = thread::spawn(move || v1_client([127, 0, 0, 1], port, "n4n4n4", 0));
    let mut ours = client("ours", port, 21800, &["-o", "0", "-n", "5", "--json"]);
    let v1 = v1.join().unwrap().expect("v1 client wins");
    assert_won(&mut ours);
    assert_eq!(v1.peer_info.port(), 21800, "our EXCHANGE left from slot 0");
    let v: serde_json::Value = serde_json::from_str(&ours.stdout()[0]).unwrap();
    assert_eq!(
        v["peer"].as_str().unwrap(),
        format!("127.0.0.1:{}", v1.local_port)
    );
    // A v1 peer gives no hint: our client aimed like v1.
    assert_eq!(v["strategy"], "v1");
}

#[test]
fn rooms_with_different_identifiers_pair_at_once() {
    let (srv, port) = server(&[]);
    let mut procs = vec![
        client("x1", port, 22000, &["-a", "xx"]),
        client("y1", port, 22100, &["-a", "yy"]),
        client("x2", port, 22200, &["-a", "xx"]),
        client("y2", port, 22300, &["-a", "yy"]),
    ];
    for p in &mut procs {
        assert_won(p);
    }
    let x1 = procs[0].log();
    assert!(x1.contains("Peer address:  127.0.0.1:222"), "{x1}");
    srv.wait_log("Paired [xx]", T);
    srv.wait_log("Paired [yy]", T);
}

#[test]
fn explicit_ident_on_the_server_turns_others_away() {
    let (srv, port) = server(&["-a", "only", "-v"]);
    let mut other = client("other", port, 22400, &["--rounds", "1"]);
    let mut a = client("a", port, 22500, &["-a", "only"]);
    let mut b = client("b", port, 22600, &["-a", "only"]);
    assert_won(&mut a);
    assert_won(&mut b);
    // The server closes the stranger at once; with --rounds 1 it gives up.
    assert_eq!(other.wait_exit(T).code(), Some(1), "{}", other.log());
    srv.wait_log("WrongIdent", T);
}

#[test]
fn gives_up_after_rounds_with_exit_1() {
    let (_srv, port) = server(&[]);
    // Pure v1 rounds (--no-ext), and offset 1000 aims where nobody listens: every round is lost.
    let args = [
        "--no-ext",
        "-o",
        "1000",
        "-n",
        "3",
        "--rounds",
        "2",
        "--round-timeout",
        "0.5",
    ];
    let mut a = client("a", port, 22700, &args);
    let mut b = client("b", port, 22800, &args);
    for p in [&mut a, &mut b] {
        assert_eq!(p.wait_exit(T).code(), Some(1), "{}", p.log());
        let log = p.log();
        assert_eq!(log.matches("[ LOSE ]").count(), 2, "{log}");
        assert!(log.contains("Source port: 227") || log.contains("Source port: 228"));
        assert!(log.contains("Gave up after 2 rounds"), "{log}");
        assert!(!log.contains("[ WIN ]"));
    }
    assert!(
        a.log().contains("Source port: 22703-22706"),
        "second window follows the first"
    );
}

/// Runs `n4 args`, expects exit `code` and `needle` on stderr.
fn expect_failure(args: &[&str], code: i32, needle: &str) -> String {
    let mut p = Proc::spawn("n4", args);
    let status = p.wait_exit(T);
    let log = p.log();
    assert_eq!(status.code(), Some(code), "n4 {args:?}: {log}");
    assert!(
        log.contains(needle),
        "n4 {args:?}: no {needle:?} in {log:?}"
    );
    assert!(p.stdout().is_empty());
    log
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["-c", "-h", "127.0.0.1", "-n", "0"],
            "count must be at least 1",
        ),
        (&["-c", "-h", "127.0.0.1", "-b", "65530"], "past 65535"),
        (&["-c", "-h", "127.0.0.1", "-b", "70000"], "70000"),
        (&["-c", "-h", "127.0.0.1", "-o", "70000"], "outside 1-65535"),
        (
            &["-c", "-h", "127.0.0.1", "-o", "-65535"],
            "outside 1-65535",
        ),
        (&["-c", "-h", "127.0.0.1", "-a", "abcdefg"], "at most 6"),
        (&["-c", "-h", "127.0.0.1", "-a", "n4é"], "ASCII"),
        (
            &["-c", "-h", "127.0.0.1", "--rounds", "0"],
            "at least one round",
        ),
        (&["-c", "-h", "127.0.0.1", "--keepalive", "0"], "at least 1"),
        // Deadlines are now + the flag: past a year the clock would overflow.
        (
            &["-c", "-h", "127.0.0.1", "--round-timeout", "1e19"],
            "at most",
        ),
        (&["-c", "-h", "127.0.0.1", "--keepalive", "1e19"], "at most"),
        (&["-s", "--hello-timeout", "1e19"], "at most"),
        (&["-s", "--wait-timeout", "1e19"], "at most"),
        (
            &["-c", "-h", "127.0.0.1", "--forward", "nowhere"],
            "--forward",
        ),
        (&["-c"], "-h HOST"),
        (&["-s", "-a", "toolong"], "at most 6"),
        (&["-s", "-c"], "cannot be used with"),
        (&["--bogus"], "--bogus"),
        (&[], "-s (server) or -c (client)"),
    ];
    for (args, needle) in cases {
        let log = expect_failure(args, 2, needle);
        assert_eq!(log.lines().count(), 1, "n4 {args:?}: {log}");
        assert!(log.starts_with("n4: "), "{log}");
    }
}

#[test]
fn help_documents_the_original_flags_and_exit_codes() {
    let out = std::process::Command::new(util::N4)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "-s, --server",
        "-c, --client",
        "-h, --host",
        "-p, --port",
        "-l, --listen",
        "-a, --ident",
        "-b, --start",
        "-n, --count",
        "-o, --offset",
        "-x, --any-ip",
        "--json",
        "--rounds",
        "--keepalive",
        "--forward",
        "--round-timeout",
        "--hello-timeout",
        "--max-conns",
        "--max-per-ip",
        "--no-ext",
        "Exit codes",
    ] {
        assert!(help.contains(flag), "no {flag:?} in --help:\n{help}");
    }
}

#[test]
fn network_errors_exit_3_with_one_message() {
    // Nobody listens on a port we just freed.
    let closed = util::free_port().to_string();
    let log = expect_failure(
        &["-c", "-h", "127.0.0.1", "-p", &closed, "-b", "22900"],
        3,
        "cannot connect to server 127.0.0.1:",
    );
    assert!(log.contains("refused"), "{log}");
    expect_failure(
        &["-c", "-h", "name.invalid", "-b", "22900"],
        3,
        "cannot resolve server host",
    );
    // Port in use: the server says so instead of sharing it.
    let held = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    expect_failure(&["-s", "-l", &port], 3, "cannot listen on TCP 0.0.0.0:");
    let held = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, util::free_port())).unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    expect_failure(&["-s", "-l", &port], 3, "cannot listen on UDP 0.0.0.0:");
}

#[test]
fn server_with_the_largest_max_conns_serves() {
    // The descriptor budget adds a margin to it: that must not overflow.
    let (srv, port) = server(&["--max-conns", &usize::MAX.to_string()]);
    let mut a = client("a", port, 23300, &[]);
    let mut b = client("b", port, 23400, &[]);
    assert_won(&mut a);
    assert_won(&mut b);
    srv.wait_log("Paired [n4n4n4]", T);
}

/// The library takes a connect timeout (and keepalive interval) too long for the clock as
/// none at all, rather than panicking on `now + timeout`.
#[test]
fn library_client_takes_durations_too_long_for_the_clock() {
    use n4_core::ClientConfig;
    use n4_mio::{run_client, AfterWin, ClientOptions, Error};

    let closed = util::free_port();
    let result = run_client(ClientOptions {
        config: ClientConfig {
            server: std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, closed),
            port_start: 0,
            max_rounds: Some(1),
            ..ClientConfig::default()
        },
        after_win: AfterWin::KeepAlive {
            interval: Duration::MAX,
        },
        json: false,
        connect_timeout: Duration::MAX,
        timeout: Some(Duration::MAX),
        exec: None,
    });
    assert!(
        matches!(result, Err(Error::Unreachable { .. })),
        "{result:?}"
    );
}

#[test]
fn interrupted_before_win_exits_130() {
    let (_srv, port) = server(&[]);
    let p = client("alone", port, 23000, &[]);
    p.wait_log(" <= Hello ", T);
    p.signal("-INT");
    let mut p = p;
    assert_eq!(p.wait_exit(T).code(), Some(130), "{}", p.log());
}

#[test]
fn server_answers_probes_from_the_port_they_hit_and_probe_other_from_the_other() {
    use n4_core::{Ident, Message};
    let (_srv, port) = server(&[]);
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = match udp.local_addr().unwrap() {
        SocketAddr::V4(v4) => v4,
        other => panic!("{other}"),
    };
    let mut buf = [0u8; 64];
    let mut ask = |msg: Message, to: u16| {
        udp.send_to(&msg.to_bytes(), (Ipv4Addr::LOCALHOST, to))
            .unwrap();
        let (n, from) = udp.recv_from(&mut buf).expect("an answer");
        assert_eq!(Message::decode(&buf[..n]), Ok(Message::Seen(me)));
        from.port()
    };
    assert_eq!(ask(Message::Probe, port + 1), port + 1);
    assert_eq!(ask(Message::Probe, port), port);
    assert_eq!(ask(Message::ProbeOther, port + 1), port);
    assert_eq!(ask(Message::ProbeOther, port), port + 1);
    // The probe port takes nothing but probes; a stray EXCHANGE there is not answered either.
    udp.send_to(
        &Message::Exchange(Ident::default()).to_bytes(),
        (Ipv4Addr::LOCALHOST, port + 1),
    )
    .unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(udp.recv_from(&mut buf).is_err(), "no more answers");
}

/// The original server's pairing, by hand: two HELLOs, READY with six zero bytes to both,
/// EXCHANGEs on its UDP port, PEERINFO to the other side, close. It fails the test on any
/// datagram that is not a v1 EXCHANGE, as the original aborts the pairing on one. (It tells
/// the clients apart by their EXCHANGE port, since on loopback they share an IP.)
fn v1_server(port_of: [u16; 2]) -> (u16, thread::JoinHandle<Result<(), String>>) {
    use n4_core::{Ident, Message};
    use std::io::{Read, Write};
    let port = util::free_port();
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    let handle = thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..2 {
            let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut hello = [0u8; 8];
            c.read_exact(&mut hello).map_err(|e| e.to_string())?;
            if Message::decode(&hello) != Ok(Message::Hello(Ident::default())) {
                return Err(format!("not a HELLO: {hello:?}"));
            }
            conns.push(c);
        }
        for c in &mut conns {
            c.write_all(&[2, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        }
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut told = [false; 2];
        let mut buf = [0u8; 64];
        while told != [true, true] {
            let (n, from) = udp.recv_from(&mut buf).map_err(|e| e.to_string())?;
            if Message::decode(&buf[..n]) != Ok(Message::Exchange(Ident::default())) {
                return Err(format!("a v1 server would abort on {:?}", &buf[..n]));
            }
            let Some(side) = port_of.iter().position(|&p| p == from.port()) else {
                return Err(format!("EXCHANGE from unknown {from}"));
            };
            if !told[side] {
                told[side] = true;
                let SocketAddr::V4(v4) = from else {
                    unreachable!()
                };
                conns[1 - side]
                    .write_all(&Message::PeerInfo(v4).to_bytes())
                    .unwrap();
            }
        }
        // Stray datagrams after PEERINFO would still be seen by the next pairing in v1.
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            if Message::decode(&buf[..n]) != Ok(Message::Exchange(Ident::default())) {
                return Err(format!("a v1 server would abort on {:?}", &buf[..n]));
            }
        }
        Ok(())
    });
    (port, handle)
}

#[test]
fn our_clients_speak_pure_v1_to_a_v1_server() {
    let (port, v1) = v1_server([23100, 23200]);
    let mut a = client("a", port, 23100, &["--json"]);
    let mut b = client("b", port, 23200, &["--json"]);
    assert_won(&mut a);
    assert_won(&mut b);
    v1.join()
        .unwrap()
        .expect("the v1 server saw only v1 traffic");
    for p in [&a, &b] {
        let v: serde_json::Value = serde_json::from_str(&p.stdout()[0]).unwrap();
        assert_eq!(v["strategy"], "v1", "{}", p.log());
    }
}

#[test]
fn probe_reports_loopback_as_no_nat_in_words_and_json() {
    let (_srv, port) = server(&[]);
    let port = port.to_string();
    let mut p = Proc::spawn("n4", &["probe", "-h", "127.0.0.1", "-p", &port, "--json"]);
    assert_eq!(p.wait_exit(T).code(), Some(0), "{}", p.log());
    let report: serde_json::Value = serde_json::from_str(&p.stdout().join("\n")).expect("one JSON");
    assert_eq!(report["public_ip"], "127.0.0.1");
    assert_eq!(report["mapping"], "none");
    assert_eq!(report["filtering"], "port-independent");
    assert_eq!(report["allocation"], "preserving");
    assert_eq!(report["samples"].as_array().map(Vec::len), Some(10));

    let mut p = Proc::spawn("n4", &["probe", "-h", "127.0.0.1", "-p", &port]);
    assert_eq!(p.wait_exit(T).code(), Some(0), "{}", p.log());
    let text = p.stdout().join("\n");
    assert!(text.contains("mapping:        none"), "{text}");

    // A port where no n4 server answers probes: one line, network exit code.
    let closed = util::free_port().to_string();
    let log = expect_failure(
        &["probe", "-h", "127.0.0.1", "-p", &closed],
        3,
        "no probe answer",
    );
    assert_eq!(log.trim().lines().count(), 1, "{log}");
}
