//! Keyed sessions and the confirmed WIN with the real binary on loopback: `--key-file` and
//! `N4_KEY`, squatters, a private server, and `nc` lines that talk to each other.

mod util;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use n4_core::{Ident, Message, Side};
use util::{client, server, Proc, N4};

const T: Duration = Duration::from_secs(20);

/// A key file with `secret`, private to its owner, unique to the test.
fn key_file(name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("n4-test-{}-{name}.key", std::process::id()));
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The `--json` result of a client that won and exited 0.
fn result(p: &mut Proc) -> serde_json::Value {
    let line = p.wait_stdout(T);
    assert_eq!(p.wait_exit(T).code(), Some(0), "{}:\n{}", p.name, p.log());
    serde_json::from_str(&line).unwrap()
}

fn local_and_peer(r: &serde_json::Value) -> (u16, SocketAddr) {
    (
        r["local_port"].as_u64().unwrap() as u16,
        r["peer"].as_str().unwrap().parse().unwrap(),
    )
}

/// Both sides settled on one pair: each one's local port is the other's peer port.
fn assert_mirrored(a: &serde_json::Value, b: &serde_json::Value) {
    let ((la, pa), (lb, pb)) = (local_and_peer(a), local_and_peer(b));
    assert_eq!(pa.port(), lb, "A's peer is not B's local port: {a} / {b}");
    assert_eq!(pb.port(), la, "B's peer is not A's local port: {a} / {b}");
}

#[test]
fn keyed_clients_win_on_one_pair_of_addresses() {
    let key = key_file("pair", "correct horse battery staple");
    let k = key.to_str().unwrap();
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 26000, &["--json", "--key-file", k]);
    let mut b = client("b", port, 26100, &["--json", "--key-file", k, "-x"]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
    for p in [&a, &b] {
        assert!(p.log().contains("Partner authenticated"), "{}", p.log());
    }
}

#[test]
fn the_two_printed_nc_lines_talk_to_each_other() {
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 26200, &["--json"]);
    let mut b = client("b", port, 26300, &["--json"]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
    // The port is free when `[ WIN ]` is printed: run each side's `nc` line (as sockets).
    let ((la, pa), (lb, pb)) = (local_and_peer(&ra), local_and_peer(&rb));
    let sa = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, la)).expect("A's port is free");
    let sb = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, lb)).expect("B's port is free");
    for s in [&sa, &sb] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    sa.send_to(b"hello B", pa).unwrap();
    sb.send_to(b"hello A", pb).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = sb.recv_from(&mut buf).expect("A's line reaches B's");
    assert_eq!((&buf[..n], from.port()), (&b"hello B"[..], la));
    let (n, from) = sa.recv_from(&mut buf).expect("B's line reaches A's");
    assert_eq!((&buf[..n], from.port()), (&b"hello A"[..], lb));
    // And the log says the same as the JSON.
    assert!(a
        .log()
        .contains(&format!("> nc -u -p {la} {} {}", pa.ip(), pa.port())));
}

#[test]
fn a_client_without_the_key_is_never_paired_with_keyed_ones() {
    let key = key_file("squat", "correct horse battery staple");
    let k = key.to_str().unwrap();
    let (_srv, port) = server(&[]);
    // The squatter comes first: our client without the key, same identifier (a v1 client
    // would sit in the same plain room).
    let keyless = client("keyless", port, 26400, &["-v"]);
    keyless.wait_log(" <= Hello ", T);
    let mut a = client("a", port, 26500, &["--json", "--key-file", k]);
    let mut b = client("b", port, 26600, &["--json", "--key-file", k]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
    for r in [&ra, &rb] {
        let (_, peer) = local_and_peer(r);
        assert!(
            (26500..26700).contains(&peer.port()),
            "paired with a squatter: {r}"
        );
    }
    // The keyless client never heard of them: still waiting, no partner, no address.
    assert!(!keyless.log().contains(" => Ready "), "{}", keyless.log());
    assert!(!keyless.log().contains("Peer:"), "{}", keyless.log());
}

#[test]
fn a_raw_v1_squatter_first_in_the_room_is_never_answered() {
    let key = key_file("raw", "correct horse battery staple");
    let k = key.to_str().unwrap();
    let (_srv, port) = server(&[]);
    let mut raw = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    raw.write_all(&Message::Hello(Ident::default()).to_bytes())
        .unwrap();
    let mut a = client("a", port, 27100, &["--json", "--key-file", k]);
    let mut b = client("b", port, 27200, &["--json", "--key-file", k]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
    raw.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(
        !matches!(raw.read(&mut buf), Ok(n) if n > 0),
        "the raw squatter was answered"
    );
}

#[test]
fn n4_key_in_the_environment_is_the_same_key() {
    let secret = "one secret, two ways to give it";
    let key = key_file("env", secret);
    let (_srv, port) = server(&[]);
    let mut a = client(
        "a",
        port,
        26700,
        &["--json", "--key-file", key.to_str().unwrap()],
    );
    let (p, b_start) = (port.to_string(), "26800".to_string());
    let mut cmd = Command::new(N4);
    cmd.args(["-c", "-h", "127.0.0.1", "-p", &p, "-b", &b_start, "--json"])
        .env("N4_KEY", secret);
    let mut b = Proc::spawn_command("b", cmd);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
}

#[test]
fn a_private_server_refuses_a_wrong_key_and_a_missing_one_with_one_line() {
    let right = key_file("private", "the server's key");
    let wrong = key_file("wrong", "not the server's key");
    let (_srv, port) = server(&["--key-file", right.to_str().unwrap()]);
    for (name, extra) in [
        ("wrong", vec!["--key-file", wrong.to_str().unwrap()]),
        ("none", vec![]),
    ] {
        let mut p = client(name, port, 0, &extra);
        assert_eq!(p.wait_exit(T).code(), Some(3), "{name}:\n{}", p.log());
        let errors = p.errors();
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert!(
            errors[0].contains("refused us") && errors[0].contains("key"),
            "{errors:?}"
        );
    }
    // Holders of its key are served.
    let r = right.to_str().unwrap();
    let mut a = client("a", port, 26900, &["--json", "--key-file", r]);
    let mut b = client("b", port, 27000, &["--json", "--key-file", r]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    assert_mirrored(&ra, &rb);
}

#[test]
fn bad_keys_are_usage_errors_with_one_line() {
    let empty = key_file("empty", " \n");
    let good = key_file("good", "a good key, long enough not to be warned about");
    let missing = std::env::temp_dir().join("n4-test-no-such.key");
    for (args, env, needle) in [
        (
            vec![
                "-c",
                "-h",
                "127.0.0.1",
                "--key-file",
                missing.to_str().unwrap(),
            ],
            None,
            "cannot read",
        ),
        (
            vec![
                "-c",
                "-h",
                "127.0.0.1",
                "--key-file",
                empty.to_str().unwrap(),
            ],
            None,
            "the key is empty",
        ),
        (
            vec![
                "-c",
                "-h",
                "127.0.0.1",
                "--key-file",
                good.to_str().unwrap(),
            ],
            Some("also a key"),
            "not both",
        ),
        (
            vec![
                "-c",
                "-h",
                "127.0.0.1",
                "--key-file",
                good.to_str().unwrap(),
                "--no-ext",
            ],
            None,
            "--no-ext",
        ),
        (
            vec!["-s", "--key-file", missing.to_str().unwrap()],
            None,
            "cannot read",
        ),
    ] {
        let mut cmd = Command::new(N4);
        cmd.args(&args).env_remove("N4_KEY");
        if let Some(v) = env {
            cmd.env("N4_KEY", v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: no {needle:?} in {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn injected_punches_never_win_a_keyed_session_on_loopback() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let key = key_file("inject", "correct horse battery staple");
    let k = key.to_str().unwrap();
    let (_srv, port) = server(&[]);
    // An injector floods both windows with what it can make without the key: v1's PUNCH and
    // our plain ACK/CONFIRM (the identifier is no secret) and keyed frames with made-up MACs,
    // from another IP and from the peers' own IP on other ports, all through the session.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let from: Vec<UdpSocket> = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::LOCALHOST]
                .into_iter()
                .map(|ip| UdpSocket::bind((ip, 0)).unwrap())
                .collect();
            let ident = Ident::default();
            let mut fakes: Vec<Vec<u8>> = vec![
                Message::Punch(ident).to_bytes().to_vec(),
                Message::Ack(ident, Side::Leader).to_bytes().to_vec(),
                Message::Ack(ident, Side::Other).to_bytes().to_vec(),
                Message::Confirm(ident, Side::Leader).to_bytes().to_vec(),
                Message::Confirm(ident, Side::Other).to_bytes().to_vec(),
            ];
            for cmd in [0x16u8, 0x17, 0x18] {
                let mut f = vec![cmd, 16];
                f.extend_from_slice(&[0x5a; 16]);
                fakes.push(f);
            }
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for port in (27700..27764).chain(27800..27864) {
                    for s in &from {
                        for f in &fakes {
                            let _ = s.send_to(f, (Ipv4Addr::LOCALHOST, port));
                            sent += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut a = client("a", port, 27700, &["--json", "-x", "--key-file", k]);
    let mut b = client("b", port, 27800, &["--json", "-x", "--key-file", k]);
    let (ra, rb) = (result(&mut a), result(&mut b));
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(sent > 1000, "the injector sent only {sent}");
    assert_mirrored(&ra, &rb);
    let ((_, pa), (_, pb)) = (local_and_peer(&ra), local_and_peer(&rb));
    assert!((27800..27864).contains(&pa.port()), "A won with {pa}");
    assert!((27700..27764).contains(&pb.port()), "B won with {pb}");
}

#[test]
fn a_keyed_client_at_a_v1_server_stops_with_one_line() {
    // The original server closes a connection whose first 8 bytes are no HELLO for its
    // identifier: a keyed HELLO (command 0x10) is closed at once, every time.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(10) {
            let Ok(mut conn) = conn else { break };
            let mut first = [0u8; 8];
            let _ = conn.read_exact(&mut first);
        }
    });
    let key = key_file("v1server", "correct horse battery staple");
    let mut p = client("c", port, 0, &["--key-file", key.to_str().unwrap()]);
    assert_eq!(p.wait_exit(T).code(), Some(3), "{}", p.log());
    let errors = p.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("does not speak n4's extension"),
        "{errors:?}"
    );
}
