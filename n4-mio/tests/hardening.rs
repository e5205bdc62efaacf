//! The findings of the attack review that concern the `n4` binary (docs/SECURITY.md), one
//! regression test each, named after what it guards. Real processes and sockets on loopback;
//! the tests that need another user or dropped privileges run only as root (CI is root).
//! Core findings (refused peer addresses, the punch budget, early punches, waiting caps, probe
//! rates) have sans-IO tests in n4-core/tests/hardening.rs.

mod util;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use n4_core::{Ident, Message};
use util::{client, free_port, server, Proc, N4};

const T: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A TCP connection to `port` on loopback from `ip`, with short read timeouts.
fn connect_from(ip: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    socket.connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into(),
        Duration::from_secs(2),
    )?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

fn read_message(tcp: &mut TcpStream) -> std::io::Result<Message> {
    let mut buf = [0u8; 8];
    tcp.read_exact(&mut buf)?;
    Message::decode(&buf).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A v1 rendezvous pair by hand from `ips` (HELLO, READY, EXCHANGE, PEERINFO); the TCP
/// connections are returned open (a client that does not hang up makes the server linger).
fn v1_pair(port: u16, ips: [Ipv4Addr; 2], ident: Ident) -> std::io::Result<Vec<TcpStream>> {
    let mut tcp = Vec::new();
    for ip in ips {
        let mut t = connect_from(ip, port)?;
        // Short: a server that cannot accept leaves the pair hanging, and the attack below
        // must stop at once, while the server's closed sockets still linger.
        t.set_read_timeout(Some(Duration::from_millis(300)))?;
        t.write_all(&Message::Hello(ident).to_bytes())?;
        tcp.push(t);
    }
    for t in &mut tcp {
        read_message(t)?;
    }
    for ip in ips {
        let udp = UdpSocket::bind((ip, 0))?;
        udp.send_to(
            &Message::Exchange(ident).to_bytes(),
            (Ipv4Addr::LOCALHOST, port),
        )?;
    }
    for t in &mut tcp {
        read_message(t)?;
    }
    Ok(tcp)
}

fn expect_usage_error(args: &[&str], needle: &str) -> String {
    let out = Command::new(N4).args(args).output().expect("run n4");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: no {needle:?} in {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err
}

/// Finding 1: after `accept` failed with EMFILE, a queued legitimate pair waited until an
/// unrelated connection arrived; lingering closed sockets were counted by no limit.
#[test]
fn accept_resumes_after_descriptors_run_out() {
    if !is_root() {
        eprintln!("skipped: needs root to drop CAP_SYS_RESOURCE");
        return;
    }
    let port = free_port();
    let p = port.to_string();
    // Without CAP_SYS_RESOURCE the server cannot raise its descriptor limit past 200.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set=-sys_resource",
        "prlimit",
        "--nofile=200",
        "--",
    ])
    .args([N4, "-s", "-l", &p, "-v"]);
    let srv = Proc::spawn_command("server", cmd);
    srv.wait_log("Listening on", T);
    // Pairs that complete and keep their connections open: the server's closed sockets
    // linger (2 s), each holding a descriptor. The legitimate pair comes right after, while
    // they still do, and nothing comes after it: its connections must not wait in the
    // backlog for an event that never comes.
    let mut held = Vec::new();
    for i in 0..150u32 {
        let ip = |n: u32| Ipv4Addr::new(127, 60, (n / 250) as u8, (n % 250 + 1) as u8);
        let ident = Ident::new(&format!("f{i}")).unwrap();
        match v1_pair(port, [ip(2 * i), ip(2 * i + 1)], ident) {
            Ok(tcp) => held.extend(tcp),
            Err(_) => break,
        }
    }
    let mut a = client("a", port, 24000, &["--json"]);
    let mut b = client("b", port, 24100, &["--json"]);
    for p in [&mut a, &mut b] {
        let status = p.wait_exit(T);
        assert_eq!(
            status.code(),
            Some(0),
            "{}:\n{}\nserver:\n{}",
            p.name,
            p.log(),
            srv.log()
        );
    }
    drop(held);
}

/// Finding 2: squatters held seats for ever. The wait ends (our client says HELLO again by
/// itself and still pairs), and waiting seats per IP are capped apart from connections.
#[test]
fn squatted_seats_end_with_the_wait_and_are_capped_per_ip() {
    let (srv, port) = server(&["-v", "--wait-timeout", "1", "--max-waiting-per-ip", "2"]);
    let mut a = client("a", port, 24200, &["-v"]);
    a.wait_log("saying HELLO again", T);
    let mut b = client("b", port, 24300, &[]);
    for p in [&mut a, &mut b] {
        assert_eq!(p.wait_exit(T).code(), Some(0), "{}:\n{}", p.name, p.log());
    }
    assert!(!a.log().contains("[ LOSE ]"), "{}", a.log());

    let squatter = Ipv4Addr::new(127, 61, 0, 1);
    let mut seats: Vec<TcpStream> = ["sq1", "sq2", "sq3"]
        .iter()
        .map(|ident| {
            let mut t = connect_from(squatter, port).unwrap();
            t.write_all(&Message::Hello(Ident::new(ident).unwrap()).to_bytes())
                .unwrap();
            thread::sleep(Duration::from_millis(100));
            t
        })
        .collect();
    srv.wait_log("TooManyWaitingFromIp", T);
    let mut buf = [0u8; 8];
    let third = seats.last_mut().unwrap();
    third.set_read_timeout(Some(T)).unwrap();
    assert!(
        matches!(third.read(&mut buf), Ok(0) | Err(_)),
        "the third seat was kept"
    );
}

/// A server on loopback that answers HELLO with a v1 READY and then PEERINFO(`peer`).
fn lying_server(peer: std::net::SocketAddrV4) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let Ok((mut tcp, _)) = listener.accept() else {
            return;
        };
        let mut hello = [0u8; 8];
        if tcp.read_exact(&mut hello).is_err() {
            return;
        }
        let _ = tcp.write_all(&Message::Ready(None).to_bytes());
        thread::sleep(Duration::from_millis(100));
        let _ = tcp.write_all(&Message::PeerInfo(peer).to_bytes());
        thread::sleep(Duration::from_secs(3));
    });
    (port, handle)
}

/// Finding 3: a fake server named 0.0.0.0, multicast or port 0 and the client punched it.
#[test]
fn peer_addresses_that_are_no_host_are_refused() {
    for bad in ["0.0.0.0:5353", "224.0.0.1:5353", "127.0.0.1:0"] {
        let (port, _srv) = lying_server(bad.parse().unwrap());
        let mut c = client("c", port, 0, &["--rounds", "1"]);
        assert_eq!(c.wait_exit(T).code(), Some(1), "{bad}:\n{}", c.log());
        let log = c.log();
        assert!(
            log.contains(&format!("The server named peer address {bad}"))
                && log.contains("refused"),
            "{bad}:\n{log}"
        );
        assert!(!log.contains(" <= Punch "), "{bad}: punched:\n{log}");
    }
}

/// Finding 4: window sockets set SO_REUSEADDR, so another user co-bound the window ports
/// and received the peer's punch.
#[test]
fn another_user_cannot_bind_the_window_ports() {
    if !is_root() {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let (_srv, port) = server(&[]);
    let a = client("a", port, 24400, &[]);
    a.wait_log(" <= Hello ", T); // the window is bound before the connection
                                 // As uid/gid 65534 (nobody), in the child before it execs `true`: try to co-bind some
                                 // window ports on the wildcard and on loopback, with both sharing options. Only raw
                                 // system calls here (the child of a threaded process must not allocate); a bind that
                                 // succeeds is reported as the spawn's error.
    const BOUND: i32 = libc::ENOTRECOVERABLE;
    let ports: [u16; 4] = [24400, 24401, 24420, 24463];
    let mut thief = Command::new("true");
    thief.uid(65534).gid(65534);
    // SAFETY: the closure makes only async-signal-safe system calls on its own stack data.
    unsafe {
        thief.pre_exec(move || {
            for port in ports {
                for ip in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let one: libc::c_int = 1;
                    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
                        libc::setsockopt(
                            fd,
                            libc::SOL_SOCKET,
                            opt,
                            (&one as *const libc::c_int).cast(),
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        );
                    }
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    let bound = libc::bind(
                        fd,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    libc::close(fd);
                    if bound == 0 {
                        return Err(std::io::Error::from_raw_os_error(BOUND));
                    }
                }
            }
            Ok(())
        });
    }
    match thief.status() {
        Ok(status) => assert!(status.success(), "the thief did not run: {status}"),
        Err(e) if e.raw_os_error() == Some(BOUND) => {
            panic!("another user bound one of our window ports")
        }
        Err(e) => panic!("cannot run the thief: {e}"),
    }
}

/// Finding 5: `--forward` passed datagrams from any port of the peer's IP to the local
/// program, and anyone's datagrams from the relay socket to the peer; it bound 0.0.0.0 for a
/// target that is not loopback.
#[test]
fn forward_relays_only_the_won_peer_and_the_local_program() {
    let (_srv, port) = server(&[]);
    let app_a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let app_b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for app in [&app_a, &app_b] {
        app.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
    }
    let fwd_a = app_a.local_addr().unwrap().to_string();
    let fwd_b = app_b.local_addr().unwrap().to_string();
    let a = client("a", port, 24500, &["--json", "--forward", &fwd_a]);
    let b = client("b", port, 24600, &["--json", "--forward", &fwd_b]);
    let result =
        |p: &Proc| -> serde_json::Value { serde_json::from_str(&p.wait_stdout(T)).unwrap() };
    // Both won (b keeps its hole and relay open while the test runs).
    let (ra, _rb) = (result(&a), result(&b));
    let via = |r: &serde_json::Value| -> SocketAddr {
        r["forward_via"].as_str().unwrap().parse().unwrap()
    };
    let via_a = via(&ra);
    let hole_a = SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        ra["local_port"].as_u64().unwrap() as u16,
    ));
    let mut buf = [0u8; 1500];

    // The hole works: A's program reaches B's.
    app_a.send_to(b"real", via_a).unwrap();
    let (n, _) = app_b
        .recv_from(&mut buf)
        .expect("the hole carries the real traffic");
    assert_eq!(&buf[..n], b"real");

    // The peer's IP (loopback here), another port: into A's hole. It must not reach A's program.
    let stranger = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    stranger.send_to(b"injected", hole_a).unwrap();
    assert!(
        app_a.recv_from(&mut buf).is_err(),
        "a stranger reached A's program"
    );

    // Someone other than A's program, into A's relay socket: it must not reach B.
    stranger.send_to(b"smuggled", via_a).unwrap();
    assert!(
        app_b.recv_from(&mut buf).is_err(),
        "a stranger sent through A's hole"
    );

    // A target that is not loopback: the relay socket is never put on 0.0.0.0 by itself;
    // where it listens must be said.
    expect_usage_error(
        &["-c", "-h", "127.0.0.1", "--forward", "192.0.2.1:9"],
        "--forward-bind",
    );
}

/// Finding 7: CR and LF from a client's identifier went raw into the server's log.
#[test]
fn log_lines_escape_control_bytes_from_the_network() {
    let (srv, port) = server(&[]);
    let ident = Ident::new("x\r\nFAK").unwrap();
    let _tcp = v1_pair(
        port,
        [Ipv4Addr::new(127, 62, 0, 1), Ipv4Addr::new(127, 62, 0, 2)],
        ident,
    )
    .expect("the pair is served");
    let line = srv.wait_log("Paired [", T);
    assert!(line.contains(r"Paired [x\r\nFAK]"), "{line:?}");
    thread::sleep(Duration::from_millis(100));
    assert!(
        !srv.log()
            .lines()
            .any(|l| l.starts_with("FAK") || l.contains('\r')),
        "{}",
        srv.log()
    );
}

/// Finding 8: no floors on durations, keepalives to every slot, no word about a missing probe
/// port, probes answered 1:1 without a per-IP limit.
#[test]
fn durations_have_floors() {
    expect_usage_error(
        &["-c", "-h", "127.0.0.1", "--keepalive", "0.01"],
        "--keepalive",
    );
    expect_usage_error(
        &["-c", "-h", "127.0.0.1", "--round-timeout", "1e-9"],
        "--round-timeout",
    );
    expect_usage_error(
        &["-c", "-h", "127.0.0.1", "--timeout", "0.001"],
        "--timeout",
    );
    expect_usage_error(&["-s", "--hello-timeout", "0.001"], "--hello-timeout");
    expect_usage_error(&["-s", "--wait-timeout", "0"], "--wait-timeout");
}

#[test]
fn keepalives_go_only_to_the_won_path() {
    let (_srv, port) = server(&[]);
    let a = client("a", port, 24900, &["--keepalive", "1", "-v"]);
    let b = client("b", port, 25000, &["--keepalive", "1", "-v"]);
    for p in [&a, &b] {
        p.wait_log("[ WIN ]", T);
    }
    thread::sleep(Duration::from_millis(2600));
    for p in [&a, &b] {
        let log = p.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("keepalive from slot"))
            .collect();
        assert!((1..=4).contains(&lines.len()), "{}: {lines:?}", p.name);
        let targets: std::collections::BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l.split("keepalive from ").nth(1))
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{}: keepalives on several paths: {lines:?}",
            p.name
        );
    }
}

#[test]
fn a_server_on_the_last_port_warns_that_it_has_no_probe_port() {
    if TcpListener::bind((Ipv4Addr::UNSPECIFIED, 65535)).is_err()
        || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 65535)).is_err()
    {
        eprintln!("skipped: port 65535 is in use");
        return;
    }
    let srv = Proc::spawn("server", &["-s", "-l", "65535"]);
    srv.wait_log("No probe port", T);
}

#[test]
fn probe_answers_are_rate_limited_per_ip() {
    let (_srv, port) = server(&[]);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for _ in 0..5040 {
        let _ = socket.send_to(&Message::Probe.to_bytes(), (Ipv4Addr::LOCALHOST, port + 1));
    }
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut answers = 0;
    let mut buf = [0u8; 64];
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end && socket.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    assert!(
        (1..=100).contains(&answers),
        "{answers} answers to one IP's burst"
    );
}

/// Finding 9: a lone client said nothing after HELLO and waited for ever, even with
/// `--rounds 1 --round-timeout 1`.
#[test]
fn a_lone_client_says_it_waits_and_its_timeout_ends_it() {
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 25100, &["--timeout", "6"]);
    a.wait_log("Waiting for a partner", Duration::from_secs(10));
    assert_eq!(a.wait_exit(T).code(), Some(1), "{}", a.log());
    assert!(a.log().contains("Timed out"), "{}", a.log());

    let mut b = client("b", port, 25200, &["--rounds", "1", "--round-timeout", "1"]);
    assert_eq!(
        b.wait_exit(Duration::from_secs(10)).code(),
        Some(1),
        "{}",
        b.log()
    );
}

/// Finding 10: rough edges of the command line.
#[test]
fn probe_and_usage_errors_say_what_is_missing() {
    expect_usage_error(&["probe"], "-h HOST");
    expect_usage_error(&[], "probe");
    // -v works after the subcommand; an unanswered probe names the server and the probe port.
    let out = Command::new(N4)
        .args(["probe", "-v", "-h", "127.0.0.1", "-p", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("127.0.0.1:1") && err.contains("port 2"),
        "{err}"
    );
    assert!(!err.contains("cannot connect"), "{err}");
}

#[test]
fn numbers_in_reports_and_logs_are_readable() {
    let (_srv, port) = server(&[]);
    let out = Command::new(N4)
        .args([
            "probe",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let rtt = json
        .split("\"rtt_ms\":")
        .nth(1)
        .expect("rtt_ms")
        .split([',', '}'])
        .next()
        .unwrap();
    let decimals = rtt.split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "rtt_ms {rtt}");

    let a = client("a", port, 25300, &["-v"]);
    let b = client("b", port, 25400, &["-v"]);
    for p in [&a, &b] {
        let line = p.wait_log("plan:", T);
        assert!(
            !line.contains("Some(") && !line.contains("-32768"),
            "{line}"
        );
    }
}

#[test]
fn cli_doc_has_a_probe_section_with_its_flags() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CLI.md")).unwrap();
    let section = doc
        .split("## `n4 probe`")
        .nth(1)
        .expect("a `n4 probe` section");
    for flag in ["-h HOST", "-p PORT", "--samples", "--json", "-v"] {
        assert!(section.contains(flag), "no {flag} in the probe section");
    }
}
