//! The `n4` server under abuse, on loopback: silent connections, garbage connections, garbage
//! datagrams, one IP over its limit, clients that leave half-way. Every legitimate pair must
//! still be served, and the server's counters (its `-v` stats line) must return to zero.
//!
//! Clients here are v1 rendezvous clients by hand (HELLO, READY, EXCHANGE, PEERINFO; no
//! punching), each from its own 127.x.y.z address. Every wait is bounded; nothing is timed.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use n4_core::{Hint, Ident, Message, Token};
use util::{server, Proc};

const T: Duration = Duration::from_secs(20);

/// A TCP connection to the server from `ip` (bound before connecting).
fn connect_from(ip: Ipv4Addr, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    socket
        .connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into(), T)
        .unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(T)).unwrap();
    stream
}

fn read_message(tcp: &mut TcpStream) -> Result<Message, String> {
    let mut buf = [0u8; 8];
    tcp.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Message::decode(&buf).map_err(|e| e.to_string())
}

/// Whether the server closed `tcp` (EOF or reset) within `limit`, having sent nothing.
fn closed_by_server(tcp: &mut TcpStream, limit: Duration) -> bool {
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 8];
    match tcp.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("the server sent {:?}", &buf[..n]),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true, // reset
    }
}

/// A v1 client's rendezvous from `ip`: HELLO, READY, EXCHANGE ×3 from its own UDP socket,
/// PEERINFO. Returns its exchange address and the PEERINFO.
fn rendezvous(
    ip: Ipv4Addr,
    port: u16,
    ident: &str,
) -> Result<(SocketAddrV4, SocketAddrV4), String> {
    let ident = Ident::new(ident).unwrap();
    let mut tcp = connect_from(ip, port);
    tcp.write_all(&Message::Hello(ident).to_bytes())
        .map_err(|e| e.to_string())?;
    let ready = read_message(&mut tcp)?;
    if !matches!(ready, Message::Ready(_)) {
        return Err(format!("not READY: {ready:?}"));
    }
    let udp = UdpSocket::bind((ip, 0)).unwrap();
    for _ in 0..3 {
        udp.send_to(
            &Message::Exchange(ident).to_bytes(),
            (Ipv4Addr::LOCALHOST, port),
        )
        .unwrap();
    }
    let SocketAddr::V4(me) = udp.local_addr().unwrap() else {
        unreachable!()
    };
    match read_message(&mut tcp)? {
        Message::PeerInfo(peer) => Ok((me, peer)),
        other => Err(format!("not PEERINFO: {other:?}")),
    }
}

/// Two clients from `ips` with `ident`, at once; asserts each learned the other's address.
fn pair(port: u16, ips: [Ipv4Addr; 2], ident: &'static str) {
    let [a, b] = ips.map(|ip| thread::spawn(move || rendezvous(ip, port, ident)));
    let (a, b) = (a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
    assert_eq!(a.1, b.0, "A learned B's exchange address");
    assert_eq!(b.1, a.0, "B learned A's exchange address");
}

/// Waits for a server log line for which `pred` holds; panics with the log after `T`.
fn wait_line(p: &Proc, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + T;
    loop {
        if let Some(line) = p.log().lines().find(|l| pred(l)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < end,
            "no {what} within {T:?}; log:\n{}",
            p.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the stats line that shows nothing held: no connection, nobody waiting, no pair,
/// no socket left in the loop, after `abandoned` pairs or seats were given up.
fn wait_all_released(p: &Proc, abandoned: u32) {
    let needle = format!("abandoned {abandoned},");
    wait_line(p, "a stats line with everything released", |l| {
        l.contains("Stats: connections 0, waiting 0, pairing 0,")
            && l.contains(&needle)
            && l.ends_with("sockets 0")
    });
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn silent_connections_do_not_block_pairing_and_are_dropped_at_the_hello_deadline() {
    let (srv, port) = server(&["-v", "--hello-timeout", "1"]);
    let mut silent: Vec<TcpStream> = (1..=50)
        .map(|h| connect_from(Ipv4Addr::new(127, 31, 0, h), port))
        .collect();
    // v1 would serve nobody for 60 s; ours pairs at once.
    pair(
        port,
        [Ipv4Addr::new(127, 31, 1, 1), Ipv4Addr::new(127, 31, 1, 2)],
        "quiet",
    );
    for tcp in &mut silent {
        assert!(
            closed_by_server(tcp, T),
            "a silent connection outlived its deadline"
        );
    }
    wait_line(&srv, "50 hello timeouts", |_| {
        count(&srv.log(), "HelloTimeout") == 50
    });
    wait_all_released(&srv, 0);
}

#[test]
fn garbage_connections_are_closed_alone() {
    let (srv, port) = server(&["-v"]);
    // A client waits for its partner while garbage arrives.
    let ident = Ident::new("wait").unwrap();
    let mut waiting = connect_from(Ipv4Addr::new(127, 32, 1, 1), port);
    waiting
        .write_all(&Message::Hello(ident).to_bytes())
        .unwrap();
    let garbage: [&[u8]; 5] = [
        b"GET / HTTP/1.0\r\n\r\n",
        &[0xff; 8],
        &[0x02, 0, 0, 0, 0, 0, 0, 0], // a READY, the wrong way round
        // A HELLO and a second message: one message per connection is all a client may send
        // before READY.
        &[
            1, 0, b'j', b'u', b'n', b'k', b' ', b' ', 1, 0, b'j', b'u', b'n', b'k', b' ', b' ',
        ],
        &[0x01, 0, 0xc3, 0xa9, b' ', b' ', b' ', b' '], // HELLO, identifier not ASCII
    ];
    let mut conns = Vec::new();
    for (n, bytes) in garbage.iter().cycle().take(50).enumerate() {
        let mut tcp = connect_from(Ipv4Addr::new(127, 32, 0, n as u8 + 1), port);
        tcp.write_all(bytes).unwrap();
        conns.push(tcp);
    }
    for tcp in &mut conns {
        assert!(closed_by_server(tcp, T), "garbage connection left open");
    }
    // The waiting client was not disturbed: still open, and it pairs when its partner comes.
    assert!(!closed_by_server(&mut waiting, Duration::from_millis(200)));
    let partner = thread::spawn(move || rendezvous(Ipv4Addr::new(127, 32, 1, 2), port, "wait"));
    waiting.set_read_timeout(Some(T)).unwrap();
    assert!(matches!(read_message(&mut waiting), Ok(Message::Ready(_))));
    let udp = UdpSocket::bind((Ipv4Addr::new(127, 32, 1, 1), 0)).unwrap();
    udp.send_to(
        &Message::Exchange(ident).to_bytes(),
        (Ipv4Addr::LOCALHOST, port),
    )
    .unwrap();
    let (partner_addr, partner_learned) = partner.join().unwrap().unwrap();
    assert_eq!(
        read_message(&mut waiting),
        Ok(Message::PeerInfo(partner_addr))
    );
    assert_eq!(SocketAddr::V4(partner_learned), udp.local_addr().unwrap());
    wait_line(&srv, "50 garbage rejections", |_| {
        count(&srv.log(), ": Garbage") == 50
    });
    drop(waiting);
    wait_all_released(&srv, 0);
}

#[test]
fn garbage_datagrams_do_not_disturb_pairing() {
    let (srv, port) = server(&["-v"]);
    let ident = Ident::new("dgram").unwrap();
    let ips = [Ipv4Addr::new(127, 33, 0, 1), Ipv4Addr::new(127, 33, 0, 2)];
    let mut tcp = ips.map(|ip| connect_from(ip, port));
    for t in &mut tcp {
        t.write_all(&Message::Hello(ident).to_bytes()).unwrap();
    }
    for t in &mut tcp {
        assert!(matches!(read_message(t), Ok(Message::Ready(Some(_)))));
    }
    // Between READY and EXCHANGE (where a v1 server aborts on any stray datagram): datagrams
    // of every kind from elsewhere, including EXCHANGEs for this very identifier and guessed
    // tokens.
    let flood = UdpSocket::bind((Ipv4Addr::new(127, 33, 9, 9), 0)).unwrap();
    let server_udp = (Ipv4Addr::LOCALHOST, port);
    let kinds: [Vec<u8>; 6] = [
        b"garbage!".to_vec(),
        vec![0x03; 100],
        vec![],
        Message::Exchange(ident).to_bytes().to_vec(),
        Message::ExchangeToken {
            token: Token(0xdead_beef),
            round: 1,
            hint: Hint::NONE,
        }
        .to_bytes()
        .to_vec(),
        Message::Hello(ident).to_bytes().to_vec(),
    ];
    for bytes in kinds.iter().cycle().take(3000) {
        flood.send_to(bytes, server_udp).unwrap();
    }
    let udp = ips.map(|ip| UdpSocket::bind((ip, 0)).unwrap());
    for u in &udp {
        for _ in 0..3 {
            u.send_to(&Message::Exchange(ident).to_bytes(), server_udp)
                .unwrap();
        }
    }
    let addr = |u: &UdpSocket| match u.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    assert_eq!(
        read_message(&mut tcp[0]),
        Ok(Message::PeerInfo(addr(&udp[1])))
    );
    assert_eq!(
        read_message(&mut tcp[1]),
        Ok(Message::PeerInfo(addr(&udp[0])))
    );
    drop(tcp);
    let stats = wait_line(&srv, "the released stats line", |l| {
        l.contains("Stats: connections 0, waiting 0, pairing 0, completed 1,")
            && l.ends_with("sockets 0")
    });
    // 3000 garbage datagrams and the 4 repeats of the two EXCHANGEs, all ignored (some of the
    // repeats may arrive after the pair closed: ignored all the same).
    assert!(stats.contains("ignored datagrams 3004,"), "{stats}");
}

#[test]
fn per_ip_limit_refuses_the_excess_while_another_ip_pairs() {
    let (srv, port) = server(&["-v", "--max-per-ip", "4"]);
    let crowded = Ipv4Addr::new(127, 34, 0, 1);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|n| {
            let mut t = connect_from(crowded, port);
            let ident = Ident::new(&format!("held{n}")).unwrap();
            t.write_all(&Message::Hello(ident).to_bytes()).unwrap();
            t
        })
        .collect();
    wait_line(&srv, "four waiting", |_| {
        count(&srv.log(), "Waiting [held") == 4
    });
    // The fifth from that IP is closed at once, without a word.
    let mut fifth = connect_from(crowded, port);
    assert!(
        closed_by_server(&mut fifth, T),
        "the fifth connection was served"
    );
    srv.wait_log(": TooManyFromIp", T);
    // Other IPs are served as usual meanwhile.
    pair(
        port,
        [Ipv4Addr::new(127, 34, 0, 2), Ipv4Addr::new(127, 34, 0, 3)],
        "other",
    );
    // When one of the four leaves, that IP may connect again: its new client pairs.
    drop(held.pop());
    wait_line(&srv, "a seat given up", |l| {
        l.contains("Abandoned [held3]: Closed")
    });
    pair(port, [crowded, Ipv4Addr::new(127, 34, 0, 4)], "again");
    drop(held);
    wait_all_released(&srv, 4);
}

#[test]
fn a_client_leaving_mid_pairing_lets_its_partner_go_and_counters_return_to_zero() {
    let (srv, port) = server(&["-v"]);
    let ident = Ident::new("leave").unwrap();
    let mut a = connect_from(Ipv4Addr::new(127, 35, 0, 1), port);
    let mut b = connect_from(Ipv4Addr::new(127, 35, 0, 2), port);
    for t in [&mut a, &mut b] {
        t.write_all(&Message::Hello(ident).to_bytes()).unwrap();
    }
    for t in [&mut a, &mut b] {
        assert!(matches!(read_message(t), Ok(Message::Ready(_))));
    }
    // A sends its EXCHANGE, then leaves before B's: B is let go at once (not after the
    // exchange timeout), with no PEERINFO.
    let udp = UdpSocket::bind((Ipv4Addr::new(127, 35, 0, 1), 0)).unwrap();
    udp.send_to(
        &Message::Exchange(ident).to_bytes(),
        (Ipv4Addr::LOCALHOST, port),
    )
    .unwrap();
    drop(a);
    assert!(closed_by_server(&mut b, T), "B was kept after A left");
    srv.wait_log("Abandoned [leave]: Closed", T);
    // A client that leaves while waiting frees its seat too.
    let mut c = connect_from(Ipv4Addr::new(127, 35, 0, 3), port);
    c.write_all(&Message::Hello(Ident::new("alone").unwrap()).to_bytes())
        .unwrap();
    srv.wait_log("Waiting [alone]", T);
    drop(c);
    drop(b);
    wait_all_released(&srv, 2);
}
