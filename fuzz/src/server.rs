//! The `server` target: a sequence of connection, stream, close, datagram and time events
//! applied to [`Server`] with small limits, checked against a model of what a well-behaved
//! driver sees.
//!
//! The model knows only what crosses the server's public API: which connections the driver
//! holds open, the bytes each sent, the READYs, PEERINFOs and SEENs each received, and the
//! datagrams sent to the server. From that alone it checks, after every event:
//! - no output names a connection the driver does not hold open (a refused connection gets
//!   exactly one `Close`), and nothing is sent after a `Close`;
//! - a connection is refused exactly when a limit is reached; `stats()` agree with the model
//!   (so `connections <= max_connections`);
//! - READY goes only to a connection whose first 8 bytes were a HELLO (with the allowed
//!   identifier), once, two at a time to partners with equal identifiers;
//! - PEERINFO goes only to a connection seated in a pair, at most once, carries the source of
//!   the datagram just received, and that datagram was the partner's EXCHANGE (its token, or its
//!   identifier from its TCP peer IP); SEEN likewise to the sender of a token EXCHANGE;
//! - every deadline is honoured (silent, waiting and half-exchanged connections are closed in
//!   time) and `poll_timeout()` is exactly the earliest one, never in the past;
//! - every datagram is either attributed or counted as ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use n4_core::{ConnId, Hint, Message, Server, ServerConfig, ServerEvent, ServerOutput, Token};

use crate::ident;
use crate::seed::{Encode, Writer};

/// `ServerConfig::max_connections` under test.
pub const MAX_CONNECTIONS: usize = 6;
/// `ServerConfig::max_per_ip` under test.
pub const MAX_PER_IP: usize = 3;
/// `ServerConfig::hello_timeout` under test.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// `ServerConfig::wait_timeout` under test, when [`Config::wait_timeout`] is set.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(3);
/// `ServerConfig::exchange_timeout` under test.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// `ServerConfig::session_timeout` under test.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(4);
/// Connection ids are `0..CONN_IDS`: few enough that ids are reused after a close.
pub const CONN_IDS: u8 = 10;

/// Remote hosts: three IPv4 hosts, the first again as a v4-mapped IPv6 address (the same host
/// to the server), and an IPv6 host.
pub const HOSTS: [IpAddr; 5] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3)),
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 12)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
    IpAddr::V6(Ipv4Addr::new(198, 51, 100, 3).to_ipv6_mapped()),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

/// UDP source ports datagrams come from: few, so repeats from one address happen.
pub const UDP_PORTS: [u16; 4] = [40000, 40001, 1721, 0];

/// One fuzz input.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Server settings.
    pub config: Config,
    /// What happens, in order.
    pub ops: Vec<Operation>,
}

/// The settings the fuzzer chooses; limits and timeouts are the constants above.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Only `IDENTS[0]` may take a seat.
    pub only_ident: bool,
    /// Waiting clients time out after [`WAIT_TIMEOUT`].
    pub wait_timeout: bool,
    /// Offer the token extension.
    pub extensions: bool,
    /// Token seed.
    pub rng_seed: u8,
}

/// One event at the server.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// A TCP connection is accepted (skipped if the driver holds this id open already).
    Open {
        /// Id, modulo [`CONN_IDS`].
        conn: u8,
        /// Remote host, index into [`HOSTS`].
        host: u8,
        /// Remote TCP port.
        port: u16,
    },
    /// Bytes arrive on a connection (delivered even for ids not open: they must be ignored).
    Stream {
        /// Id, modulo [`CONN_IDS`].
        conn: u8,
        /// What arrives.
        data: StreamData,
    },
    /// The peer closes a connection.
    Close {
        /// Id, modulo [`CONN_IDS`].
        conn: u8,
    },
    /// A datagram arrives on the server's UDP port.
    Datagram {
        /// Source host, index into [`HOSTS`].
        host: u8,
        /// Source port, index into [`UDP_PORTS`].
        port: u8,
        /// What arrives.
        data: DatagramData,
    },
    /// Time passes, then `handle_timeout`.
    Advance {
        /// How much.
        millis: u16,
    },
    /// The clock jumps to `poll_timeout()`, then `handle_timeout`.
    AdvanceToTimeout,
}

/// Bytes on a TCP connection.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum StreamData {
    /// A HELLO in one write.
    Hello(IdentChoice),
    /// A HELLO in two writes, cut after `at % 9` bytes.
    SplitHello {
        /// The identifier.
        ident: IdentChoice,
        /// Where to cut.
        at: u8,
    },
    /// Any 8 bytes (a message or not).
    Bytes8([u8; 8]),
    /// Anything.
    Raw(Vec<u8>),
}

/// An identifier on the wire.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentChoice {
    /// `IDENTS[i % 3]`.
    Known(u8),
    /// Any 6 bytes (ASCII or not).
    Wire([u8; 6]),
}

/// A datagram to the server.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum DatagramData {
    /// A v1 EXCHANGE.
    Exchange(IdentChoice),
    /// An extended EXCHANGE (round 0 makes it a v1 EXCHANGE, or garbage).
    Token {
        /// Whose token.
        token: TokenChoice,
        /// Session round.
        round: u8,
        /// The sender's hint.
        hint: i16,
    },
    /// A PROBE.
    Probe,
    /// A PROBE-OTHER (answered from the other port; the same output to the driver).
    ProbeOther,
    /// Any 8 bytes.
    Bytes8([u8; 8]),
    /// Anything.
    Raw(Vec<u8>),
}

/// A token in an extended EXCHANGE.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenChoice {
    /// The `i`-th token handed out in a READY so far (modulo their number; 0 if none).
    Issued(u8),
    /// Any token.
    Raw(u32),
}

/// What a run reached, for the seed tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Connections refused at a limit.
    pub refused: usize,
    /// READYs sent.
    pub readies: usize,
    /// PEERINFOs sent.
    pub peer_infos: usize,
    /// SEENs sent.
    pub seens: usize,
    /// Pairs completed.
    pub completed: u64,
    /// Connections the server closed (refusals included).
    pub server_closes: usize,
}

/// Runs one input; panics on a broken promise.
pub fn run(input: &Input) -> Outcome {
    let mut h = Harness::new(input.config);
    for op in &input.ops {
        h.apply(op);
    }
    h.outcome
}

impl IdentChoice {
    fn wire(self) -> [u8; 6] {
        match self {
            Self::Known(i) => *ident(i).as_bytes(),
            Self::Wire(raw) => raw,
        }
    }
}

fn message_bytes(cmd: u8, data: [u8; 6]) -> [u8; 8] {
    let mut b = [cmd, 0, 0, 0, 0, 0, 0, 0];
    b[2..].copy_from_slice(&data);
    b
}

/// A datagram just handed to the server, to judge the outputs it causes.
#[derive(Debug, Clone, Copy)]
struct LastDatagram {
    /// The source as the server sees it (v4-mapped IPv6 made IPv4); `None` for IPv6.
    from: Option<SocketAddrV4>,
    message: Option<Message>,
    /// It may be the EXCHANGE of some seat.
    candidate: bool,
}

#[derive(Debug)]
struct ConnModel {
    ip: IpAddr,
    opened_at: Instant,
    /// The first 16 bytes the connection sent (more is never allowed to stay open).
    stream: Vec<u8>,
    /// The HELLO identifier and when its last byte arrived.
    hello: Option<([u8; 6], Instant)>,
    ready: Option<ReadyModel>,
}

#[derive(Debug)]
struct ReadyModel {
    token: Option<Token>,
    partner: Option<ConnId>,
    /// When the pair is given up unless a round completes (exchange, then session timeout).
    deadline: Instant,
    /// Sources of datagrams that may be this seat's EXCHANGE.
    candidates: Vec<SocketAddrV4>,
    /// Hints of token EXCHANGEs that may be this seat's.
    hints: Vec<Hint>,
    /// A token EXCHANGE that may be this seat's arrived.
    token_sent: bool,
    /// A candidate arrived since the last completed round.
    fresh: bool,
    peer_infos: u32,
}

struct Harness {
    config: Config,
    server: Server,
    now: Instant,
    conns: BTreeMap<ConnId, ConnModel>,
    tokens: Vec<Token>,
    outcome: Outcome,
    ignored: u64,
    probes: u64,
}

impl Harness {
    fn new(config: Config) -> Self {
        let server = Server::new(ServerConfig {
            only_ident: config.only_ident.then(|| ident(0)),
            hello_timeout: HELLO_TIMEOUT,
            wait_timeout: config.wait_timeout.then_some(WAIT_TIMEOUT),
            exchange_timeout: EXCHANGE_TIMEOUT,
            session_timeout: SESSION_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_per_ip: MAX_PER_IP,
            // Unbounded here: the model does not predict these limits (they have their own
            // tests in n4-core/tests/hardening.rs).
            max_waiting_per_ip: usize::MAX,
            probes_per_ip: u32::MAX,
            extensions: config.extensions,
            rng_seed: u64::from(config.rng_seed),
        });
        Self {
            config,
            server,
            now: Instant::now(),
            conns: BTreeMap::new(),
            tokens: Vec::new(),
            outcome: Outcome::default(),
            ignored: 0,
            probes: 0,
        }
    }

    fn apply(&mut self, op: &Operation) {
        let now = self.now;
        let mut refusing = None;
        let mut datagram = None;
        let mut admitted = None;
        match *op {
            Operation::Open { conn, host, port } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                if self.conns.contains_key(&conn) {
                    return; // a driver never reuses an id it holds open
                }
                let remote = SocketAddr::new(HOSTS[usize::from(host) % HOSTS.len()], port);
                let ip = remote.ip().to_canonical();
                let from_ip = self.conns.values().filter(|c| c.ip == ip).count();
                if self.conns.len() >= MAX_CONNECTIONS || from_ip >= MAX_PER_IP {
                    refusing = Some(conn);
                } else {
                    admitted = Some(conn);
                    self.conns.insert(
                        conn,
                        ConnModel {
                            ip,
                            opened_at: now,
                            stream: Vec::new(),
                            hello: None,
                            ready: None,
                        },
                    );
                }
                self.server.handle_connection_opened(now, conn, remote);
            }
            Operation::Stream { conn, ref data } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                let writes: Vec<Vec<u8>> = match data {
                    StreamData::Hello(id) => vec![message_bytes(0x01, id.wire()).to_vec()],
                    StreamData::SplitHello { ident, at } => {
                        let b = message_bytes(0x01, ident.wire());
                        let (x, y) = b.split_at(usize::from(*at) % 9);
                        vec![x.to_vec(), y.to_vec()]
                    }
                    StreamData::Bytes8(b) => vec![b.to_vec()],
                    StreamData::Raw(b) => vec![b.clone()],
                };
                for w in writes {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        let room = 16usize.saturating_sub(c.stream.len());
                        c.stream.extend(w.iter().take(room));
                        if c.hello.is_none() && c.stream.len() >= 8 {
                            if let Ok(Message::Hello(id)) = Message::decode(&c.stream[..8]) {
                                c.hello = Some((*id.as_bytes(), now));
                            }
                        }
                    }
                    self.server.handle_stream_data(now, conn, &w);
                    self.drain(None, None);
                    self.check();
                }
                return;
            }
            Operation::Close { conn } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                self.conns.remove(&conn);
                self.server.handle_connection_closed(now, conn);
            }
            Operation::Datagram {
                host,
                port,
                ref data,
            } => {
                let from = SocketAddr::new(
                    HOSTS[usize::from(host) % HOSTS.len()],
                    UDP_PORTS[usize::from(port) % UDP_PORTS.len()],
                );
                let bytes = match data {
                    DatagramData::Exchange(id) => message_bytes(0x03, id.wire()).to_vec(),
                    DatagramData::Token { token, round, hint } => {
                        let token = match *token {
                            TokenChoice::Issued(i) if !self.tokens.is_empty() => {
                                self.tokens[usize::from(i) % self.tokens.len()]
                            }
                            TokenChoice::Issued(_) => Token(0),
                            TokenChoice::Raw(t) => Token(t),
                        };
                        let m = Message::ExchangeToken {
                            token,
                            round: *round,
                            hint: Hint(*hint),
                        };
                        m.to_bytes().to_vec()
                    }
                    DatagramData::Probe => Message::Probe.to_bytes().to_vec(),
                    DatagramData::ProbeOther => Message::ProbeOther.to_bytes().to_vec(),
                    DatagramData::Bytes8(b) => b.to_vec(),
                    DatagramData::Raw(b) => b.clone(),
                };
                let from4 = match (from.ip().to_canonical(), from.port()) {
                    (IpAddr::V4(ip), port) => Some(SocketAddrV4::new(ip, port)),
                    _ => None,
                };
                let mut d = LastDatagram {
                    from: from4,
                    message: Message::decode(&bytes).ok(),
                    candidate: false,
                };
                d.candidate = self.note_candidates(d);
                datagram = Some(d);
                self.server.handle_datagram(now, from, &bytes);
            }
            Operation::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                self.server.handle_timeout(self.now);
            }
            Operation::AdvanceToTimeout => {
                if let Some(t) = self.server.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.server.handle_timeout(self.now);
            }
        }
        let outputs = self.drain(refusing, datagram);
        if let Some(conn) = admitted {
            assert!(
                self.conns.contains_key(&conn),
                "{conn:?} closed at once below the limits"
            );
        }
        if let Some(d) = datagram {
            let stats = self.server.stats();
            let ignored = stats.ignored_datagrams - self.ignored;
            let probes = stats.probes - self.probes;
            self.ignored = stats.ignored_datagrams;
            self.probes = stats.probes;
            let is_probe =
                d.from.is_some() && matches!(d.message, Some(Message::Probe | Message::ProbeOther));
            assert_eq!(probes, u64::from(is_probe), "probe count");
            assert!(ignored <= 1, "one datagram ignored {ignored} times");
            if outputs > 0 || is_probe {
                assert_eq!(ignored, 0, "a datagram acted on and counted as ignored");
            } else if !d.candidate {
                assert_eq!(
                    ignored, 1,
                    "a datagram neither acted on nor counted as ignored"
                );
            }
        }
        self.check();
    }

    /// Before the server sees a datagram: which seats might it be the EXCHANGE of?
    fn note_candidates(&mut self, d: LastDatagram) -> bool {
        let Some(from) = d.from else { return false };
        let mut any = false;
        let extensions = self.config.extensions;
        for c in self.conns.values_mut() {
            let hello = c.hello.map(|h| h.0);
            let ip = c.ip;
            let Some(r) = c.ready.as_mut() else { continue };
            let mine = match d.message {
                // With extensions off the tokens are never shown, so any seat might own it.
                Some(Message::ExchangeToken { token, hint, .. }) => {
                    let mine = !extensions || r.token == Some(token);
                    if mine {
                        r.hints.push(hint);
                        r.token_sent = true;
                    }
                    mine
                }
                Some(Message::Exchange(id)) => {
                    hello == Some(*id.as_bytes()) && ip == IpAddr::V4(*from.ip())
                }
                _ => false,
            };
            if mine {
                r.candidates.push(from);
                r.fresh = true;
                any = true;
            }
        }
        any
    }

    /// Takes every output and event, checking each against the model. Returns how many
    /// outputs there were.
    fn drain(&mut self, mut refusing: Option<ConnId>, datagram: Option<LastDatagram>) -> usize {
        let now = self.now;
        let mut outputs = 0;
        let mut readies = Vec::new();
        let mut peer_infos = Vec::new();
        let mut hint_for: Option<ConnId> = None;
        let mut seen = false;
        while let Some(out) = self.server.poll_output() {
            outputs += 1;
            if let Some(h) = hint_for.take() {
                assert!(
                    matches!(out, ServerOutput::Send { conn, message: Message::PeerInfo(_) } if conn == h),
                    "HINT to {h:?} not followed by its PEERINFO but by {out:?}"
                );
            }
            match out {
                ServerOutput::Close { conn } => {
                    self.outcome.server_closes += 1;
                    if refusing == Some(conn) {
                        refusing = None;
                        self.outcome.refused += 1;
                    } else {
                        assert!(
                            self.conns.remove(&conn).is_some(),
                            "Close for {conn:?}, which the driver does not hold open"
                        );
                    }
                }
                ServerOutput::Datagram { to, message } => {
                    let d = datagram.expect("a datagram output without a datagram");
                    let from = d.from.expect("a datagram output to an IPv6 source");
                    assert!(
                        matches!(d.message, Some(Message::Probe | Message::ProbeOther)),
                        "answered a non-PROBE"
                    );
                    assert_eq!((to, message), (SocketAddr::V4(from), Message::Seen(from)));
                    assert!(!seen, "two answers to one datagram");
                    seen = true;
                }
                ServerOutput::Send { conn, message } => {
                    let Some(c) = self.conns.get(&conn) else {
                        panic!(
                            "{message:?} sent to {conn:?}, which is not open (closed or unknown)"
                        );
                    };
                    match message {
                        Message::Ready(token) => {
                            let Some((id, _)) = c.hello else {
                                panic!("READY to {conn:?}, which sent no HELLO");
                            };
                            assert!(c.ready.is_none(), "second READY to {conn:?}");
                            if self.config.only_ident {
                                assert_eq!(&id, ident(0).as_bytes(), "READY for a wrong ident");
                            }
                            assert_eq!(token.is_some(), self.config.extensions);
                            self.tokens.extend(token);
                            self.outcome.readies += 1;
                            readies.push(conn);
                            self.conns.get_mut(&conn).expect("checked").ready = Some(ReadyModel {
                                token,
                                partner: None,
                                deadline: now + EXCHANGE_TIMEOUT,
                                candidates: Vec::new(),
                                hints: Vec::new(),
                                token_sent: false,
                                fresh: false,
                                peer_infos: 0,
                            });
                        }
                        Message::PeerInfo(_) | Message::Hint(_) => {
                            let Some(ready) = &c.ready else {
                                panic!("{message:?} to {conn:?}, which is not in a pair");
                            };
                            let partner = ready.partner.expect("READYs come in pairs");
                            let Some(p) = self.conns.get(&partner).and_then(|p| p.ready.as_ref())
                            else {
                                panic!("{message:?} to {conn:?} after its partner left");
                            };
                            match message {
                                Message::Hint(h) => {
                                    assert_ne!(h, Hint::NONE, "HINT of no advice");
                                    assert!(p.hints.contains(&h), "HINT the partner never gave");
                                    assert!(
                                        ready.token_sent,
                                        "HINT to a client that never used a token"
                                    );
                                    hint_for = Some(conn);
                                }
                                Message::PeerInfo(addr) => {
                                    assert!(
                                        p.candidates.contains(&addr),
                                        "PEERINFO {addr} is no EXCHANGE of the partner"
                                    );
                                    assert!(
                                        p.fresh && ready.fresh,
                                        "a round completed without a new EXCHANGE from each side"
                                    );
                                    assert!(
                                        !peer_infos.iter().any(|&(c, _)| c == conn),
                                        "two PEERINFOs to {conn:?} in one step"
                                    );
                                    peer_infos.push((conn, partner));
                                    self.outcome.peer_infos += 1;
                                }
                                _ => unreachable!("matched above"),
                            }
                        }
                        Message::Seen(addr) => {
                            let Some(ready) = &c.ready else {
                                panic!("SEEN to {conn:?}, which is not in a pair");
                            };
                            let d = datagram.expect("SEEN without a datagram");
                            assert_eq!(d.from, Some(addr), "SEEN is not the datagram's source");
                            let Some(Message::ExchangeToken { token, .. }) = d.message else {
                                panic!("SEEN for a datagram without a token");
                            };
                            if self.config.extensions {
                                assert_eq!(ready.token, Some(token), "SEEN to the wrong seat");
                            }
                            assert!(!seen, "two answers to one datagram");
                            seen = true;
                            self.outcome.seens += 1;
                        }
                        other => panic!("server sent {other:?}"),
                    }
                }
            }
        }
        assert_eq!(hint_for, None, "HINT without PEERINFO");
        assert_eq!(refusing, None, "a refused connection got no Close");
        match readies[..] {
            [] => {}
            [a, b] => {
                let id = |c: ConnId| self.conns.get(&c).and_then(|c| c.hello).map(|h| h.0);
                assert_eq!(id(a), id(b), "partners with different identifiers");
                for (me, other) in [(a, b), (b, a)] {
                    if let Some(r) = self.conns.get_mut(&me).and_then(|c| c.ready.as_mut()) {
                        r.partner = Some(other);
                    }
                }
            }
            _ => panic!("READY to {readies:?} in one step"),
        }
        let mut first_rounds = 0;
        match peer_infos[..] {
            [] => {}
            [(a, pa), (b, pb)] => {
                assert_eq!(
                    (pa, pb),
                    (b, a),
                    "one round's PEERINFOs to two non-partners"
                );
                // Both stay open for more rounds (a session of two clients of ours), or neither.
                let open = [a, b].map(|c| self.conns.contains_key(&c));
                assert_eq!(open[0], open[1], "half a pair left open");
                for c in [a, b] {
                    if let Some(r) = self.conns.get_mut(&c).and_then(|c| c.ready.as_mut()) {
                        if self.config.extensions {
                            assert!(r.token_sent, "a session with a v1 client");
                        }
                        r.deadline = now + SESSION_TIMEOUT;
                        r.fresh = false;
                        r.peer_infos += 1;
                    }
                }
                first_rounds = 1; // refined below for sessions
                if open[0] {
                    let r = self.conns[&a].ready.as_ref().expect("paired");
                    if r.peer_infos > 1 {
                        first_rounds = 0;
                    }
                }
            }
            _ => panic!("PEERINFO to {peer_infos:?} in one step"),
        }
        let mut completed = 0;
        while let Some(e) = self.server.poll_event() {
            if matches!(e, ServerEvent::Completed { .. }) {
                completed += 1;
            }
        }
        assert_eq!(
            completed,
            peer_infos.len() / 2,
            "Completed events and PEERINFOs disagree"
        );
        let stats = self.server.stats();
        assert_eq!(
            stats.completed,
            self.outcome.completed + first_rounds,
            "first rounds completed"
        );
        self.outcome.completed = stats.completed;
        outputs
    }

    /// Model-wide promises that hold between events.
    fn check(&self) {
        let now = self.now;
        let stats = self.server.stats();
        assert_eq!(
            stats.connections,
            self.conns.len(),
            "server and driver disagree on open connections"
        );
        assert!(stats.connections <= MAX_CONNECTIONS);
        let mut expected_timeout: Option<Instant> = None;
        let mut deadline = |t: Instant| {
            expected_timeout = Some(expected_timeout.map_or(t, |e| e.min(t)));
        };
        let mut waiting = Vec::new();
        let mut paired = 0;
        for (id, c) in &self.conns {
            let same_ip = self.conns.values().filter(|o| o.ip == c.ip).count();
            assert!(same_ip <= MAX_PER_IP);
            assert!(
                c.stream.len() < 16,
                "{id:?} still open after a second message"
            );
            match (c.hello, &c.ready) {
                (None, _) => {
                    assert!(
                        c.stream.len() < 8,
                        "{id:?} still open after a first message that is not a HELLO"
                    );
                    assert!(
                        now < c.opened_at + HELLO_TIMEOUT,
                        "{id:?} silent past hello_timeout"
                    );
                    deadline(c.opened_at + HELLO_TIMEOUT);
                }
                (Some((ident_bytes, at)), None) => {
                    if self.config.only_ident {
                        assert_eq!(
                            &ident_bytes,
                            ident(0).as_bytes(),
                            "{id:?} seated with a wrong ident"
                        );
                    }
                    if self.config.wait_timeout {
                        assert!(now < at + WAIT_TIMEOUT, "{id:?} waiting past wait_timeout");
                        deadline(at + WAIT_TIMEOUT);
                    }
                    assert!(
                        !waiting.contains(&ident_bytes),
                        "two clients wait for one identifier"
                    );
                    waiting.push(ident_bytes);
                }
                (Some(_), Some(r)) => {
                    assert!(now < r.deadline, "{id:?} paired past its deadline");
                    deadline(r.deadline);
                    paired += 1;
                }
            }
        }
        assert_eq!(stats.waiting, waiting.len());
        assert_eq!(stats.pairing * 2, paired);
        let timeout = self.server.poll_timeout();
        assert_eq!(
            timeout, expected_timeout,
            "poll_timeout is not the earliest deadline"
        );
        assert!(timeout.is_none_or(|t| t > now));
    }
}

impl Encode for Input {
    fn encode(&self, w: &mut Writer) {
        self.config.encode(w);
        self.ops.encode(w);
    }
}

impl Encode for Config {
    fn encode(&self, w: &mut Writer) {
        w.bool(self.only_ident);
        w.bool(self.wait_timeout);
        w.bool(self.extensions);
        w.u8(self.rng_seed);
    }
}

impl Encode for Operation {
    fn encode(&self, w: &mut Writer) {
        match *self {
            Self::Open { conn, host, port } => {
                w.variant(0, 6);
                w.u8(conn);
                w.u8(host);
                w.u16(port);
            }
            Self::Stream { conn, ref data } => {
                w.variant(1, 6);
                w.u8(conn);
                data.encode(w);
            }
            Self::Close { conn } => {
                w.variant(2, 6);
                w.u8(conn);
            }
            Self::Datagram {
                host,
                port,
                ref data,
            } => {
                w.variant(3, 6);
                w.u8(host);
                w.u8(port);
                data.encode(w);
            }
            Self::Advance { millis } => {
                w.variant(4, 6);
                w.u16(millis);
            }
            Self::AdvanceToTimeout => w.variant(5, 6),
        }
    }
}

impl Encode for StreamData {
    fn encode(&self, w: &mut Writer) {
        match self {
            Self::Hello(id) => {
                w.variant(0, 4);
                id.encode(w);
            }
            Self::SplitHello { ident, at } => {
                w.variant(1, 4);
                ident.encode(w);
                w.u8(*at);
            }
            Self::Bytes8(b) => {
                w.variant(2, 4);
                w.bytes(b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
        }
    }
}

impl Encode for IdentChoice {
    fn encode(&self, w: &mut Writer) {
        match self {
            Self::Known(i) => {
                w.variant(0, 2);
                w.u8(*i);
            }
            Self::Wire(b) => {
                w.variant(1, 2);
                w.bytes(b);
            }
        }
    }
}

impl Encode for DatagramData {
    fn encode(&self, w: &mut Writer) {
        match self {
            Self::Exchange(id) => {
                w.variant(0, 6);
                id.encode(w);
            }
            Self::Token { token, round, hint } => {
                w.variant(1, 6);
                token.encode(w);
                w.u8(*round);
                w.u16(*hint as u16);
            }
            Self::Probe => w.variant(2, 6),
            Self::ProbeOther => w.variant(3, 6),
            Self::Bytes8(b) => {
                w.variant(4, 6);
                w.bytes(b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
        }
    }
}

impl Encode for TokenChoice {
    fn encode(&self, w: &mut Writer) {
        match self {
            Self::Issued(i) => {
                w.variant(0, 2);
                w.u8(*i);
            }
            Self::Raw(t) => {
                w.variant(1, 2);
                w.u32(*t);
            }
        }
    }
}
