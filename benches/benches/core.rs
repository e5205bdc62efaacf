//! n4-core's machines alone, in memory, no IO: the codec, the server pairing clients, and a
//! client playing a whole round against the server and a scripted peer.
//!
//! Inputs come from fixed seeds; what is measured goes through `black_box`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use n4_core::{
    Client, ClientConfig, Command, ConnId, Event, Frame, Hint, Ident, Local, Message, Payload,
    Server, ServerConfig, ServerOutput, Side, Strategy, StreamDecoder, Token, MESSAGE_LEN,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Messages encoded or decoded per iteration.
const MESSAGES: usize = 1024;
/// Pairs per server iteration: all open, say HELLO, EXCHANGE, and get PEERINFO together.
const PAIRS: u32 = 1000;

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);
const PROBE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1722);

/// `MESSAGES` valid messages of every kind, from seed 7.
fn messages() -> Vec<Message> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let ident = |rng: &mut ChaCha8Rng| {
        let n = (rng.next_u32() % 7) as usize;
        let s: String = (0..n)
            .map(|_| char::from(b'a' + (rng.next_u32() % 26) as u8))
            .collect();
        Ident::new(&s).expect("ASCII, at most 6")
    };
    (0..MESSAGES)
        .map(|i| {
            let r = rng.next_u32();
            let addr = SocketAddrV4::new(Ipv4Addr::from(r), (r >> 7) as u16);
            match i % 9 {
                0 => Message::Hello(ident(&mut rng)),
                1 => Message::Ready(None),
                2 => Message::Ready(Some(Token(r))),
                3 => Message::Exchange(ident(&mut rng)),
                4 => Message::ExchangeToken {
                    token: Token(r),
                    round: 1 + (r % 255) as u8,
                    hint: Hint(r as i16),
                },
                5 => Message::PeerInfo(addr),
                6 => Message::Punch(ident(&mut rng)),
                7 => Message::Seen(addr),
                _ => Message::Hint(Hint(r as i16)),
            }
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let messages = messages();
    let wire: Vec<u8> = messages.iter().flat_map(|m| m.to_bytes()).collect();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(wire.len());
        b.iter(|| {
            out.clear();
            for m in black_box(&messages) {
                m.encode(&mut out);
            }
            black_box(&out);
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            for piece in black_box(&wire).chunks_exact(MESSAGE_LEN) {
                black_box(Message::decode(piece).expect("valid"));
            }
        })
    });
    // A TCP stream arrives in segments that cut messages anywhere.
    g.bench_function("stream_decode_1460", |b| {
        b.iter(|| {
            let mut decoder = StreamDecoder::default();
            for segment in black_box(&wire).chunks(1460) {
                decoder
                    .feed(segment, |m| {
                        black_box(m);
                    })
                    .expect("valid");
            }
        })
    });
    g.finish();
}

/// The i-th host: distinct IPv4 addresses, so no per-IP limit is reached.
fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i)
}

/// Pair `p`'s identifier: pairs do not mix.
fn pair_ident(p: u32) -> Ident {
    Ident::new(&format!("p{p:05}")).expect("6 ASCII characters")
}

/// `PAIRS` pairs at once through HELLO → READY → EXCHANGE → PEERINFO, then both clients leave.
/// `extended`: token EXCHANGEs (the pair stays a session until the clients close); else v1
/// EXCHANGEs (the server closes the pair itself).
fn pairings(server: &mut Server, now: Instant, extended: bool) -> u64 {
    let conn = |p: u32, side: u32| ConnId(u64::from(2 * p + side));
    for p in 0..PAIRS {
        for side in 0..2 {
            let remote = SocketAddr::from((host(2 * p + side), 40000));
            server.handle_connection_opened(now, conn(p, side), remote);
        }
    }
    for p in 0..PAIRS {
        let hello = Message::Hello(pair_ident(p)).to_bytes();
        for side in 0..2 {
            server.handle_stream_data(now, conn(p, side), &hello);
        }
    }
    let mut tokens = vec![Token(0); 2 * PAIRS as usize];
    while let Some(out) = server.poll_output() {
        if let ServerOutput::Send {
            conn,
            message: Frame::Short(Message::Ready(Some(t))),
        } = out
        {
            tokens[conn.0 as usize] = t;
        }
    }
    for p in 0..PAIRS {
        for side in 0..2 {
            let from = SocketAddr::from((host(2 * p + side), 50000));
            let exchange = if extended {
                Message::ExchangeToken {
                    token: tokens[conn(p, side).0 as usize],
                    round: 1,
                    hint: Hint::NONE,
                }
            } else {
                Message::Exchange(pair_ident(p))
            };
            server.handle_datagram(now, Local::Main, from, &exchange.to_bytes());
        }
    }
    let mut peer_infos = 0;
    while let Some(out) = server.poll_output() {
        if let ServerOutput::Send {
            message: Frame::Short(Message::PeerInfo(addr)),
            ..
        } = out
        {
            black_box(addr);
            peer_infos += 1;
        }
    }
    if extended {
        for c in 0..2 * PAIRS {
            server.handle_connection_closed(now, ConnId(u64::from(c)));
        }
        while server.poll_output().is_some() {}
    }
    while server.poll_event().is_some() {}
    peer_infos
}

fn server(c: &mut Criterion) {
    let mut g = c.benchmark_group("server");
    g.throughput(Throughput::Elements(u64::from(PAIRS)));
    for (name, extended) in [("pairings_v1", false), ("pairings_extended", true)] {
        g.bench_function(name, |b| {
            let now = Instant::now();
            b.iter_batched(
                || {
                    Server::new(ServerConfig {
                        rng_seed: 7,
                        ..ServerConfig::default()
                    })
                },
                |mut server| {
                    let n = pairings(&mut server, now, extended);
                    assert_eq!(n, 2 * u64::from(PAIRS));
                    assert_eq!(server.stats().connections, 0);
                    server
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// One round in memory: a client, the server, and a scripted peer that says HELLO and
/// EXCHANGE (v1, or with its token and a hint when `extended`) and answers every PUNCH that
/// reaches its address. No latency, no NAT (public addresses are local ones); timers fire when
/// nothing else is in flight.
struct Round {
    now: Instant,
    extended: bool,
    /// The NAT step the client's plan was based on, if it planned.
    planned_step: Option<i32>,
    client: Client,
    server: Server,
    client_ip: Ipv4Addr,
    window: Vec<u16>,
    peer: SocketAddrV4,
    inbox: VecDeque<Delivery>,
}

enum Delivery {
    ServerOpen(ConnId, SocketAddr),
    ServerStream(ConnId, Payload),
    ServerDatagram(SocketAddr, Payload),
    ClientConnected,
    ClientStream(Payload),
    ClientDatagram(usize, SocketAddr, Payload),
}

const CLIENT_CONN: ConnId = ConnId(1);
const PEER_CONN: ConnId = ConnId(2);

impl Round {
    fn new(strategy: Strategy) -> Self {
        let now = Instant::now();
        let config = ClientConfig {
            server: SERVER,
            strategy,
            ..ClientConfig::default()
        };
        let peer = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), 40000);
        let hello = Message::Hello(Ident::default()).to_bytes();
        let inbox = VecDeque::from([
            Delivery::ServerOpen(PEER_CONN, SocketAddr::from((*peer.ip(), 45000))),
            Delivery::ServerStream(PEER_CONN, hello.into()),
        ]);
        Self {
            now,
            extended: strategy == Strategy::Predict,
            planned_step: None,
            client: Client::new(config, now).expect("valid config"),
            server: Server::new(ServerConfig {
                rng_seed: 7,
                ..ServerConfig::default()
            }),
            client_ip: Ipv4Addr::new(198, 51, 100, 3),
            window: Vec::new(),
            peer,
            inbox,
        }
    }

    /// Runs to the client's WIN; returns it.
    fn run(&mut self) -> Event {
        let punch = Message::Punch(Ident::default()).to_bytes();
        loop {
            // Timers due now fire before more IO, as in a real event loop: the first probes
            // go out (and are answered) while the client waits for READY.
            if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
                self.client.handle_timeout(self.now);
            }
            while let Some(cmd) = self.client.poll_command() {
                match cmd {
                    Command::OpenWindow { ports } => {
                        // Port 0 = any: number ephemeral slots like an OS would.
                        self.window = (0..ports.len())
                            .map(|i| {
                                if ports[i] == 0 {
                                    50000 + i as u16
                                } else {
                                    ports[i]
                                }
                            })
                            .collect();
                    }
                    Command::Connect => {
                        let remote = SocketAddr::from((self.client_ip, 45001));
                        self.inbox
                            .push_back(Delivery::ServerOpen(CLIENT_CONN, remote));
                        self.inbox.push_back(Delivery::ClientConnected);
                    }
                    Command::Send(m) => self
                        .inbox
                        .push_back(Delivery::ServerStream(CLIENT_CONN, m.to_bytes())),
                    Command::Close | Command::OpenSlots { .. } => {}
                }
            }
            while let Some(t) = self.client.poll_transmit() {
                let from = SocketAddr::from((self.client_ip, self.window[t.slot]));
                if t.destination.ip() == SocketAddr::from(SERVER).ip() {
                    self.inbox
                        .push_back(Delivery::ServerDatagram(from, t.payload));
                } else if t.destination.ip() == SocketAddr::from(self.peer).ip()
                    && t.payload == punch
                {
                    // The peer answers from where the punch reached it: a PUNCH, and a peer
                    // of ours also an ACK (the client leads: its address is the lower one).
                    self.inbox.push_back(Delivery::ClientDatagram(
                        t.slot,
                        t.destination,
                        punch.into(),
                    ));
                    if self.extended {
                        let ack = Message::Ack(Ident::default(), Side::Other)
                            .to_bytes()
                            .into();
                        self.inbox
                            .push_back(Delivery::ClientDatagram(t.slot, t.destination, ack));
                    }
                }
            }
            while let Some(e) = self.client.poll_event() {
                match e {
                    Event::Win { .. } => return e,
                    Event::Planned { step, .. } => self.planned_step = Some(step),
                    _ => {}
                }
            }
            while let Some(out) = self.server.poll_output() {
                match out {
                    ServerOutput::Send { conn, message } if conn == CLIENT_CONN => self
                        .inbox
                        .push_back(Delivery::ClientStream(message.to_bytes())),
                    ServerOutput::Send {
                        message: Frame::Short(Message::Ready(token)),
                        ..
                    } => {
                        let exchange = match token {
                            Some(token) if self.extended => Message::ExchangeToken {
                                token,
                                round: 1,
                                hint: Hint(20),
                            },
                            _ => Message::Exchange(Ident::default()),
                        };
                        let d =
                            Delivery::ServerDatagram(self.peer.into(), exchange.to_bytes().into());
                        self.inbox.push_back(d);
                    }
                    ServerOutput::Datagram { to, message, .. } => {
                        if let Some(slot) = self.window.iter().position(|&p| p == to.port()) {
                            let reply = Delivery::ClientDatagram(
                                slot,
                                PROBE.into(),
                                message.to_bytes().into(),
                            );
                            self.inbox.push_back(reply);
                        }
                    }
                    _ => {}
                }
            }
            while self.server.poll_event().is_some() {}
            if let Some(d) = self.inbox.pop_front() {
                self.deliver(d);
                continue;
            }
            let next = [self.client.poll_timeout(), self.server.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .expect("a round in progress has a timer");
            self.now = self.now.max(next);
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.now;
        match d {
            Delivery::ServerOpen(conn, remote) => {
                self.server.handle_connection_opened(now, conn, remote)
            }
            Delivery::ServerStream(conn, bytes) => {
                self.server.handle_stream_data(now, conn, &bytes)
            }
            Delivery::ServerDatagram(from, bytes) => {
                self.server.handle_datagram(now, Local::Main, from, &bytes)
            }
            Delivery::ClientConnected => self.client.handle_connection_opened(now),
            Delivery::ClientStream(bytes) => self.client.handle_stream_data(now, &bytes),
            Delivery::ClientDatagram(slot, from, bytes) => {
                self.client.handle_datagram(now, slot, from, &bytes)
            }
        }
    }
}

fn client_round(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_round");
    g.throughput(Throughput::Elements(1));
    for (name, strategy) in [("v1", Strategy::V1), ("predict", Strategy::Predict)] {
        // The round measured is the one named: a predicted WIN needs the peer's hint, and
        // its plan the answers to the client's own probes.
        let mut round = Round::new(strategy);
        let win = round.run();
        assert!(
            matches!(win, Event::Win { strategy: s, .. } if s == strategy),
            "{win:?}"
        );
        let expected_step = (strategy == Strategy::Predict).then_some(1);
        assert_eq!(round.planned_step, expected_step);
        g.bench_function(name, |b| {
            b.iter_batched(
                || Round::new(strategy),
                |mut round| black_box(round.run()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, codec, server, client_round);
criterion_main!(benches);
