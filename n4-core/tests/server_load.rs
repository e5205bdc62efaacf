//! The server with many clients at once, driven directly (no clients, no clock): the v1
//! attribution index, floods of EXCHANGEs that belong to nobody, and state that returns to
//! zero. The loopback versions of these stories, with real sockets, are in
//! `n4-mio/tests/abuse.rs`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::{ConnId, Frame, Ident, Local, Message, Server, ServerConfig, ServerOutput, Token};

struct Harness {
    server: Server,
    now: Instant,
    next: u64,
    /// Messages written to each connection, and whether it was closed.
    sent: HashMap<ConnId, Vec<Message>>,
    closed: Vec<ConnId>,
}

impl Harness {
    fn new(config: ServerConfig) -> Self {
        Self {
            server: Server::new(config),
            now: Instant::now(),
            next: 0,
            sent: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.server.poll_output() {
            match out {
                ServerOutput::Send {
                    conn,
                    message: Frame::Short(message),
                } => self.sent.entry(conn).or_default().push(message),
                ServerOutput::Send { .. } => panic!("a long frame in a keyless test"),
                ServerOutput::Close { conn } => self.closed.push(conn),
                ServerOutput::Datagram { .. } => {}
            }
        }
        while self.server.poll_event().is_some() {}
    }

    /// A client that connects from `remote` and says HELLO.
    fn hello(&mut self, remote: SocketAddrV4, ident: Ident) -> ConnId {
        let conn = ConnId(self.next);
        self.next += 1;
        self.server
            .handle_connection_opened(self.now, conn, remote.into());
        self.server
            .handle_stream_data(self.now, conn, &Message::Hello(ident).to_bytes());
        self.drain();
        conn
    }

    fn datagram(&mut self, from: SocketAddrV4, message: Message) {
        self.server
            .handle_datagram(self.now, Local::Main, from.into(), &message.to_bytes());
        self.drain();
    }

    fn token(&self, conn: ConnId) -> Token {
        match self.sent[&conn][0] {
            Message::Ready(Some(token)) => token,
            ref m => panic!("no token READY: {m:?}"),
        }
    }

    fn peer_info(&self, conn: ConnId) -> Option<SocketAddrV4> {
        self.sent.get(&conn)?.iter().find_map(|m| match m {
            Message::PeerInfo(a) => Some(*a),
            _ => None,
        })
    }
}

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + n)
}

#[test]
fn five_hundred_v1_pairs_on_one_identifier_each_learn_their_partner_despite_a_flood() {
    let ident = Ident::default();
    let mut h = Harness::new(ServerConfig::default());
    let pairs = 500u32;
    let conns: Vec<(ConnId, ConnId)> = (0..pairs)
        .map(|p| {
            let a = h.hello(SocketAddrV4::new(ip(2 * p), 40000), ident);
            let b = h.hello(SocketAddrV4::new(ip(2 * p + 1), 40000), ident);
            (a, b)
        })
        .collect();
    assert_eq!(h.server.stats().pairing, pairs as usize);
    // EXCHANGEs from addresses no seat has, for the busy identifier: ignored, and (with the
    // index) each costs one lookup instead of a walk over 500 pairs.
    for n in 0..5000 {
        h.datagram(
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, (n % 250) as u8), 1000 + n as u16),
            Message::Exchange(ident),
        );
    }
    assert_eq!(h.server.stats().ignored_datagrams, 5000);
    // Last pair first, second seat first, each three times as v1 does.
    for p in (0..pairs).rev() {
        for seat in [2 * p + 1, 2 * p] {
            for _ in 0..3 {
                h.datagram(SocketAddrV4::new(ip(seat), 50000), Message::Exchange(ident));
            }
        }
    }
    for (p, (a, b)) in conns.iter().enumerate() {
        let p = p as u32;
        assert_eq!(
            h.peer_info(*a),
            Some(SocketAddrV4::new(ip(2 * p + 1), 50000))
        );
        assert_eq!(h.peer_info(*b), Some(SocketAddrV4::new(ip(2 * p), 50000)));
    }
    let stats = h.server.stats();
    assert_eq!((stats.connections, stats.waiting, stats.pairing), (0, 0, 0));
    assert_eq!(stats.completed, pairs as u64);
    // The two repeats of each seat's EXCHANGE are ignored (the second seat's arrive after its
    // pair closed).
    assert_eq!(stats.ignored_datagrams, 5000 + 4 * pairs as u64);
}

#[test]
fn a_repeat_of_an_address_a_token_seat_used_is_not_given_to_a_later_pair() {
    // The v1 rule ignores an EXCHANGE from an address an earlier pair already attributed, even
    // when that address's IP is not the seat's TCP IP (a token EXCHANGE can come from anywhere)
    // and a later pair has a seat at that IP.
    let ident = Ident::default();
    let mut h = Harness::new(ServerConfig::default());
    let a = h.hello("198.51.100.1:4000".parse().unwrap(), ident);
    let _b = h.hello("198.51.100.2:4000".parse().unwrap(), ident);
    let _c = h.hello("203.0.113.7:4000".parse().unwrap(), ident);
    let d = h.hello("198.51.100.4:4000".parse().unwrap(), ident);
    // a's EXCHANGE (token) comes from 203.0.113.7:9000 — c's IP.
    let x: SocketAddrV4 = "203.0.113.7:9000".parse().unwrap();
    let token = h.token(a);
    h.datagram(
        x,
        Message::ExchangeToken {
            token,
            round: 1,
            hint: n4_core::Hint::NONE,
        },
    );
    let ignored = h.server.stats().ignored_datagrams;
    h.datagram(x, Message::Exchange(ident));
    assert_eq!(h.server.stats().ignored_datagrams, ignored + 1);
    // From another port of that IP it is c's.
    h.datagram(
        "203.0.113.7:9001".parse().unwrap(),
        Message::Exchange(ident),
    );
    h.datagram(
        "198.51.100.4:9000".parse().unwrap(),
        Message::Exchange(ident),
    );
    assert_eq!(h.peer_info(d), Some("203.0.113.7:9001".parse().unwrap()));
}

#[test]
fn silent_garbage_and_departed_clients_leave_no_state() {
    let ident = Ident::default();
    let config = ServerConfig {
        hello_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let mut silent = Vec::new();
    for n in 0..1000 {
        let conn = ConnId(1_000_000 + n);
        let remote = SocketAddr::from((ip(100_000 + n as u32), 1));
        h.server.handle_connection_opened(h.now, conn, remote);
        silent.push(conn);
    }
    for n in 0..1000u32 {
        let conn = ConnId(2_000_000 + n as u64);
        h.server
            .handle_connection_opened(h.now, conn, SocketAddr::from((ip(200_000 + n), 1)));
        h.server
            .handle_stream_data(h.now, conn, b"GET / HTTP/1.0\r\n");
    }
    h.drain();
    assert_eq!(h.closed.len(), 1000, "garbage is closed at once");
    // A pair where one side leaves after READY: the other is closed too.
    let a = h.hello(SocketAddrV4::new(ip(1), 1), ident);
    let b = h.hello(SocketAddrV4::new(ip(2), 1), ident);
    h.server.handle_connection_closed(h.now, a);
    h.drain();
    assert!(h.closed.contains(&b));
    assert_eq!(h.server.stats().connections, 1000, "only the silent ones");
    h.now += Duration::from_secs(1);
    h.server.handle_timeout(h.now);
    h.drain();
    for conn in &silent {
        assert!(h.closed.contains(conn));
    }
    let stats = h.server.stats();
    assert_eq!((stats.connections, stats.waiting, stats.pairing), (0, 0, 0));
    assert_eq!(h.server.poll_timeout(), None);
}
