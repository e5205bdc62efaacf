//! The `client` target: arbitrary configurations (both strategies), server bytes, connect
//! results, datagrams on any slot from any address (punches, probe replies, garbage), closes and
//! time, applied to [`Client`] through a well-behaved driver model.
//!
//! The driver only reports what a real one could: a connect result after `Connect`, stream
//! events while connected, datagrams while a window is open (on any slot, in range or not),
//! timers at or after their deadline. After every step it checks:
//! - `Client::new` refuses exactly the invalid configurations;
//! - commands make sense for the driver (one `Connect` per fresh round, writes and `Disconnect`
//!   only while connected, one HELLO per connection, windows of `window_slots` consecutive
//!   ports that never pass 65535 followed by `probe_slots` ephemeral ones, a new window only
//!   once the old connection is gone);
//! - every transmit uses an open slot: EXCHANGEs go to the server from a window slot after
//!   READY, with the round's token; PROBEs to the probe port from a probe slot; PUNCHes from a
//!   window slot to the round's target, then the acknowledgements to the winning peer from the
//!   winning slot (`ack_count` of them for a v1 round);
//! - rounds are numbered 1, 2, …; each ends in at most one of WIN or LOSE; WIN needs PEERINFO
//!   (this round's or the session's) and a PUNCH this round from an acceptable address on that
//!   slot, and does happen when one arrives; `max_rounds` is respected;
//! - `poll_timeout()` is never in the past, fires finitely often at one instant, and the
//!   client is never stuck (no timer and nothing pending on the network) unless finished;
//! - once finished, nothing more comes out, whatever goes in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use n4_core::{
    Client, ClientConfig, Command, Event, Hint, LoseReason, Message, Strategy, StreamDecoder,
    Token, Transmit, EARLY_PUNCH_SOURCES,
};

use crate::ident;
use crate::seed::{Encode, Writer};

/// The rendezvous server's address (probes go to its port + 1).
pub const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);

/// IPv4 addresses a PEERINFO or SEEN can name: the peer, another host, the server.
pub const PEER_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(203, 0, 113, 12),
    Ipv4Addr::new(198, 51, 100, 3),
    Ipv4Addr::new(192, 0, 2, 2),
];

/// Datagram sources: the [`PEER_IPS`], the peer as a v4-mapped IPv6 address, an IPv6 host.
pub const HOSTS: [IpAddr; 5] = [
    IpAddr::V4(PEER_IPS[0]),
    IpAddr::V4(PEER_IPS[1]),
    IpAddr::V4(PEER_IPS[2]),
    IpAddr::V6(PEER_IPS[0].to_ipv6_mapped()),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5)),
];

/// `port_start` choices: usual, ephemeral, near the top (some windows do not fit), the bottom.
pub const PORT_STARTS: [u16; 4] = [30000, 0, 65531, 1];

/// `peer_port_offset` choices, the last out of range.
pub const OFFSETS: [i32; 6] = [20, 0, -1, 65535, 1000, -65536];

/// A step may fire timers at one instant at most this often before it counts as a livelock.
const MAX_FIRES_PER_STEP: usize = 10_000;

/// One fuzz input.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Client settings.
    pub config: Config,
    /// What happens, in order.
    pub ops: Vec<Operation>,
}

/// Client settings, each from a small range.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Index into [`PORT_STARTS`].
    pub port_start: u8,
    /// `port_count = this % 7` (0 is invalid).
    pub port_count: u8,
    /// Index into [`OFFSETS`].
    pub offset: u8,
    /// `accept_any_ip`.
    pub accept_any_ip: bool,
    /// `Strategy::Predict` rather than `Strategy::V1`.
    pub predict: bool,
    /// `max_rounds = this % 4`, 0 meaning `None`.
    pub max_rounds: u8,
    /// `round_timeout` in units of 10 ms (0 allowed).
    pub round_timeout: u8,
    /// `punch_passes = this % 3`.
    pub punch_passes: u8,
    /// `exchange_count = this % 4`.
    pub exchange_count: u8,
    /// `ack_count = this % 4`.
    pub ack_count: u8,
    /// `ack_interval` in ms (0 allowed).
    pub ack_interval: u8,
    /// `retry_delay` in units of 10 ms (0 allowed).
    pub retry_delay: u8,
    /// `probes = this % 5`.
    pub probes: u8,
    /// `probe_interval` in ms (0 allowed).
    pub probe_interval: u8,
    /// `max_window = this % 10`.
    pub max_window: u8,
}

/// One event at the client.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// The TCP connect succeeded (only delivered while one is pending).
    Connected,
    /// The TCP connect failed (only delivered while one is pending).
    ConnectFailed,
    /// Bytes from the server (only delivered while connected).
    Stream(StreamData),
    /// The server closed the connection (only delivered while connected).
    StreamClosed,
    /// A datagram on a slot (only delivered while a window is open).
    Datagram {
        /// Slot, modulo the number of slots + 1 (so one out-of-range slot is possible).
        slot: u8,
        /// Source host, index into [`HOSTS`].
        host: u8,
        /// Source port.
        port: u16,
        /// What arrives.
        data: DatagramData,
    },
    /// Time passes; the driver fires every timer on time.
    Advance {
        /// How much.
        millis: u16,
    },
    /// Time passes; the driver wakes up late, once, at the end.
    AdvanceLate {
        /// How much.
        millis: u16,
    },
    /// The clock jumps to `poll_timeout()` and the timer fires.
    AdvanceToTimeout,
}

/// Bytes from the server.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum StreamData {
    /// READY, v1 (`None`) or with a token.
    Ready(Option<u32>),
    /// PEERINFO.
    PeerInfo {
        /// Index into [`PEER_IPS`].
        ip: u8,
        /// Port.
        port: u16,
    },
    /// SEEN.
    Seen {
        /// Index into [`PEER_IPS`].
        ip: u8,
        /// Port.
        port: u16,
    },
    /// HINT.
    Hint(i16),
    /// Any 8 bytes.
    Bytes8([u8; 8]),
    /// Anything.
    Raw(Vec<u8>),
}

/// A datagram to the client.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum DatagramData {
    /// The client's own PUNCH bytes (what its peer sends).
    Punch,
    /// A PUNCH with an identifier from [`crate::IDENTS`].
    PunchWith(u8),
    /// The server's answer to a PROBE: SEEN from the probe port (the source is forced).
    ProbeReply {
        /// The port SEEN names.
        port: u16,
    },
    /// Any 8 bytes.
    Bytes8([u8; 8]),
    /// Anything.
    Raw(Vec<u8>),
}

/// What a run reached, for the seed tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `Client::new` refused the configuration.
    pub invalid_config: bool,
    /// Rounds started.
    pub rounds: u32,
    /// Rounds started inside a session.
    pub in_session_rounds: u32,
    /// Rounds lost.
    pub losses: u32,
    /// WINs.
    pub wins: u32,
    /// WINs of predicted rounds.
    pub predicted_wins: u32,
    /// Rounds that used the extension.
    pub extended_rounds: u32,
    /// The client finished.
    pub finished: bool,
}

/// The client configuration an input's [`Config`] stands for.
pub fn client_config(c: Config) -> ClientConfig {
    ClientConfig {
        ident: ident(0),
        server: SERVER,
        port_start: PORT_STARTS[usize::from(c.port_start) % PORT_STARTS.len()],
        port_count: u16::from(c.port_count % 7),
        peer_port_offset: OFFSETS[usize::from(c.offset) % OFFSETS.len()],
        accept_any_ip: c.accept_any_ip,
        round_timeout: Duration::from_millis(10 * u64::from(c.round_timeout)),
        punch_passes: u16::from(c.punch_passes % 3),
        exchange_count: u16::from(c.exchange_count % 4),
        ack_count: u16::from(c.ack_count % 4),
        ack_interval: Duration::from_millis(u64::from(c.ack_interval)),
        max_rounds: Some(u32::from(c.max_rounds % 4)).filter(|&n| n > 0),
        retry_delay: Duration::from_millis(10 * u64::from(c.retry_delay)),
        strategy: if c.predict {
            Strategy::Predict
        } else {
            Strategy::V1
        },
        probes: u16::from(c.probes % 5),
        probe_interval: Duration::from_millis(u64::from(c.probe_interval)),
        max_window: u16::from(c.max_window % 10),
        // Unbounded here: the model does not predict when a budget runs out (the budget has
        // its own tests in n4-core/tests/hardening.rs).
        punch_budget: u32::MAX,
    }
}

/// The early punches the client keeps: the first from each source IP, for
/// [`EARLY_PUNCH_SOURCES`] IPs.
fn kept_early(early: &[(usize, SocketAddr)]) -> Vec<(usize, SocketAddr)> {
    let mut kept: Vec<(usize, SocketAddr)> = Vec::new();
    for &(slot, from) in early {
        if kept.len() < EARLY_PUNCH_SOURCES && !kept.iter().any(|(_, f)| f.ip() == from.ip()) {
            kept.push((slot, from));
        }
    }
    kept
}

/// Runs one input; panics on a broken promise.
pub fn run(input: &Input) -> Outcome {
    let config = client_config(input.config);
    let slots = config.window_slots();
    let valid = config.port_count > 0
        && (config.port_start == 0 || u32::from(config.port_start) + u32::from(slots) - 1 <= 65535)
        && config.peer_port_offset.unsigned_abs() <= 65535;
    let now = Instant::now();
    let client = match Client::new(config.clone(), now) {
        Ok(client) => client,
        Err(e) => {
            assert!(!valid, "valid configuration refused: {e}");
            return Outcome {
                invalid_config: true,
                ..Outcome::default()
            };
        }
    };
    assert!(valid, "invalid configuration accepted: {config:?}");
    let mut h = Harness {
        client,
        window_slots: usize::from(config.window_slots()),
        config,
        now,
        window: None,
        fresh_windows: 0,
        connect_pending: false,
        connected: false,
        hello_sent: false,
        decoder: StreamDecoder::default(),
        rounds: Vec::new(),
        session_peer: None,
        session_hinted: false,
        transmitted: 0,
        finished: false,
        outcome: Outcome::default(),
    };
    h.step(Step::default());
    for op in &input.ops {
        h.apply(op);
    }
    h.outcome
}

/// What the harness did in one step, to judge what comes out.
#[derive(Debug, Default)]
struct Step {
    /// Whole messages the server's bytes completed.
    said: Vec<Message>,
    /// A datagram of the client's own PUNCH delivered on a window slot: (slot, from).
    punch: Option<(usize, SocketAddr)>,
    /// The step reported a failed connect.
    connect_failed: bool,
}

#[derive(Debug, Default)]
struct RoundModel {
    in_session: bool,
    /// READY's token as the client uses it (`Some(None)`: v1 READY, or the V1 strategy).
    token: Option<Option<Token>>,
    /// The peer's latest HINT this round.
    hint: Option<Hint>,
    peer: Option<SocketAddrV4>,
    target: Option<SocketAddrV4>,
    /// Own-PUNCH datagrams delivered before PEERINFO (the client keeps the first 16).
    early: Vec<(usize, SocketAddr)>,
    won: Option<(usize, SocketAddr, Strategy)>,
    acks: u16,
    lost: bool,
}

impl RoundModel {
    fn predicted(&self) -> bool {
        matches!(self.token, Some(Some(_))) && self.hint.is_some()
    }
}

struct Harness {
    client: Client,
    config: ClientConfig,
    window_slots: usize,
    now: Instant,
    window: Option<Vec<u16>>,
    /// Windows opened (one per fresh round; commands come before the round's events).
    fresh_windows: u32,
    connect_pending: bool,
    connected: bool,
    hello_sent: bool,
    decoder: StreamDecoder,
    /// Round `n` is `rounds[n - 1]`, created by its `RoundStarted` event.
    rounds: Vec<RoundModel>,
    /// The peer as the last PEERINFO of this extended session named it.
    session_peer: Option<SocketAddrV4>,
    /// The peer gave a HINT in some round of this session.
    session_hinted: bool,
    /// Transmits polled so far.
    transmitted: u64,
    finished: bool,
    outcome: Outcome,
}

impl Harness {
    fn round(&mut self) -> &mut RoundModel {
        self.rounds.last_mut().expect("a round has started")
    }

    fn acceptable(&self, peer: SocketAddrV4, from: SocketAddr) -> bool {
        self.config.accept_any_ip || from.ip() == IpAddr::V4(*peer.ip())
    }

    fn apply(&mut self, op: &Operation) {
        let now = self.now;
        let mut step = Step::default();
        match *op {
            Operation::Connected => {
                if !self.connect_pending {
                    return;
                }
                self.connect_pending = false;
                self.connected = true;
                self.hello_sent = false;
                self.decoder = StreamDecoder::default();
                self.client.handle_connected(now);
            }
            Operation::ConnectFailed => {
                if !self.connect_pending {
                    return;
                }
                self.connect_pending = false;
                step.connect_failed = true;
                self.client.handle_connect_failed(now);
            }
            Operation::Stream(ref data) => {
                if !self.connected {
                    return;
                }
                let ip = |i: u8| PEER_IPS[usize::from(i) % PEER_IPS.len()];
                let bytes = match *data {
                    StreamData::Ready(t) => Message::Ready(t.map(Token)).to_bytes().to_vec(),
                    StreamData::PeerInfo { ip: i, port } => {
                        Message::PeerInfo(SocketAddrV4::new(ip(i), port))
                            .to_bytes()
                            .to_vec()
                    }
                    StreamData::Seen { ip: i, port } => {
                        Message::Seen(SocketAddrV4::new(ip(i), port))
                            .to_bytes()
                            .to_vec()
                    }
                    StreamData::Hint(h) => Message::Hint(Hint(h)).to_bytes().to_vec(),
                    StreamData::Bytes8(b) => b.to_vec(),
                    StreamData::Raw(ref b) => b.clone(),
                };
                let _ = self.decoder.feed(&bytes, |m| step.said.push(m));
                self.client.handle_stream_data(now, &bytes);
            }
            Operation::StreamClosed => {
                if !self.connected {
                    return;
                }
                self.connected = false;
                self.client.handle_stream_closed(now);
            }
            Operation::Datagram {
                slot,
                host,
                port,
                ref data,
            } => {
                let Some(window) = &self.window else {
                    return;
                };
                let slot = usize::from(slot) % (window.len() + 1);
                let mut from = SocketAddr::new(HOSTS[usize::from(host) % HOSTS.len()], port);
                let bytes = match *data {
                    DatagramData::Punch => Message::Punch(ident(0)).to_bytes().to_vec(),
                    DatagramData::PunchWith(i) => Message::Punch(ident(i)).to_bytes().to_vec(),
                    DatagramData::ProbeReply { port } => {
                        from = self.config.probe_server().into();
                        Message::Seen(SocketAddrV4::new(PEER_IPS[1], port))
                            .to_bytes()
                            .to_vec()
                    }
                    DatagramData::Bytes8(b) => b.to_vec(),
                    DatagramData::Raw(ref b) => b.clone(),
                };
                if bytes == Message::Punch(ident(0)).to_bytes() && slot < self.window_slots {
                    step.punch = Some((slot, from));
                }
                self.client.handle_datagram(now, slot, from, &bytes);
            }
            Operation::Advance { millis } => {
                let end = now + Duration::from_millis(u64::from(millis));
                self.fire_timers(Some(end));
                self.now = end;
                return;
            }
            Operation::AdvanceLate { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                self.fire_timers(None);
                return;
            }
            Operation::AdvanceToTimeout => {
                if let Some(t) = self.client.poll_timeout() {
                    self.now = self.now.max(t);
                    self.client.handle_timeout(self.now);
                    self.step(Step::default());
                }
                return;
            }
        }
        self.step(step);
    }

    /// Fires due timers: each at its own deadline up to `end` (on time), or all at `now`.
    fn fire_timers(&mut self, end: Option<Instant>) {
        let mut fires = 0;
        while let Some(t) = self.client.poll_timeout() {
            let at = match end {
                Some(end) if t <= end => t,
                None if t <= self.now => self.now,
                _ => break,
            };
            fires += 1;
            assert!(fires <= MAX_FIRES_PER_STEP, "timer livelock at {t:?}");
            self.now = self.now.max(at);
            self.client.handle_timeout(self.now);
            self.step(Step::default());
        }
        if let Some(t) = self.client.poll_timeout() {
            assert!(t > end.unwrap_or(self.now), "a due timer was left");
        }
    }

    /// Drains and judges everything the client wants after one `handle_*` call.
    fn step(&mut self, step: Step) {
        let was_finished = self.finished;
        let mut commands = Vec::new();
        while let Some(c) = self.client.poll_command() {
            commands.push(c);
        }
        let mut transmits = Vec::new();
        while let Some(t) = self.client.poll_transmit() {
            transmits.push(t);
        }
        self.transmitted += transmits.len() as u64;
        assert_eq!(
            self.client.datagrams_sent(),
            self.transmitted,
            "datagrams_sent"
        );
        let mut events = Vec::new();
        while let Some(e) = self.client.poll_event() {
            events.push(e);
        }
        if was_finished {
            assert!(
                commands.is_empty() && transmits.is_empty() && events.is_empty(),
                "output after finishing: {commands:?} {transmits:?} {events:?}"
            );
        }
        for c in commands {
            self.on_command(c);
        }
        // Rounds this step's transmits may belong to (a step can end one and start the next).
        let first_round = self.rounds.len().max(1) - 1;
        let won_before = self.rounds.last().is_some_and(|r| r.won.is_some());
        let mut won_now = false;
        for e in events {
            self.on_event(e, &step, &mut won_now);
        }
        self.check_transmits(&transmits, first_round, won_before, won_now);
        if let Some((slot, from)) = step.punch {
            self.on_punch_delivered(slot, from, won_now);
        }
        if let Some(r) = self.rounds.last() {
            if let (Some(peer), Some(_), None, false) = (r.peer, r.target, r.won, r.lost) {
                let due = kept_early(&r.early)
                    .iter()
                    .any(|&(_, from)| self.acceptable(peer, from));
                assert!(!due, "an acceptable PUNCH from before PEERINFO was ignored");
            }
        }
        assert_eq!(self.client.is_finished(), self.finished);
        let timeout = self.client.poll_timeout();
        assert!(
            timeout.is_none_or(|t| t >= self.now),
            "poll_timeout in the past"
        );
        if !self.finished && timeout.is_none() {
            assert!(
                self.connect_pending || self.connected,
                "stuck: no timer and nothing pending on the network"
            );
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::OpenWindow { ports } => {
                assert!(
                    !self.connected && !self.connect_pending,
                    "new window with TCP open"
                );
                let slots = self.window_slots;
                let probes = usize::from(self.config.probe_slots());
                assert_eq!(ports.len(), slots + probes);
                let start = self.config.port_start;
                let first = match &self.window {
                    _ if start == 0 => 0,
                    None => start,
                    Some(prev) => {
                        let next = u32::from(prev[0]) + slots as u32;
                        if next + slots as u32 - 1 > 65535 {
                            start
                        } else {
                            next as u16
                        }
                    }
                };
                let expected: Vec<u16> = (0..slots as u16)
                    .map(|i| if first == 0 { 0 } else { first + i })
                    .chain(std::iter::repeat_n(0, probes))
                    .collect();
                assert_eq!(ports, expected, "unexpected window");
                self.window = Some(ports);
                self.fresh_windows += 1;
            }
            Command::Connect => {
                assert!(
                    !self.connected && !self.connect_pending,
                    "Connect with one open"
                );
                self.connect_pending = true;
            }
            Command::Send(m) => {
                assert!(self.connected, "Send({m:?}) while not connected");
                assert_eq!(m, Message::Hello(self.config.ident), "client sent {m:?}");
                assert!(!self.hello_sent, "second HELLO on one connection");
                self.hello_sent = true;
            }
            Command::Disconnect => {
                assert!(self.connected, "Disconnect while not connected");
                self.connected = false;
            }
        }
    }

    fn on_event(&mut self, e: Event, step: &Step, won_now: &mut bool) {
        match e {
            Event::RoundStarted {
                round,
                first_port,
                count,
                in_session,
            } => {
                let mut token = None;
                if let Some(prev) = self.rounds.last() {
                    assert!(prev.lost, "a round started while the last one was open");
                    if in_session {
                        assert!(
                            prev.predicted() || self.session_hinted,
                            "a session round after a v1 round"
                        );
                        token = prev.token;
                    }
                } else {
                    assert!(!in_session, "the first round in a session");
                }
                if in_session {
                    assert!(self.connected, "a session round without the session");
                } else {
                    self.session_peer = None;
                    self.session_hinted = false;
                    let fresh = self.rounds.iter().filter(|r| !r.in_session).count() as u32;
                    assert_eq!(
                        fresh + 1,
                        self.fresh_windows,
                        "a fresh round without its window"
                    );
                }
                assert_eq!(round as usize, self.rounds.len() + 1, "round numbers skip");
                assert!(self.config.max_rounds.is_none_or(|m| round <= m));
                assert_eq!(usize::from(count), self.window_slots);
                let window = self.window.as_ref().expect("a window is open");
                assert_eq!(first_port, window[0]);
                self.rounds.push(RoundModel {
                    in_session,
                    token,
                    ..RoundModel::default()
                });
                self.outcome.rounds = round;
                self.outcome.in_session_rounds += u32::from(in_session);
            }
            Event::HelloSent => assert!(self.hello_sent),
            Event::Ready { extended } => {
                let Some(Message::Ready(token)) = step
                    .said
                    .iter()
                    .copied()
                    .find(|m| matches!(m, Message::Ready(_)))
                else {
                    panic!("Ready event without READY");
                };
                let token = token.filter(|_| self.config.strategy == Strategy::Predict);
                assert_eq!(extended, token.is_some());
                self.outcome.extended_rounds += u32::from(extended);
                let r = self.round();
                assert!(r.token.is_none(), "two READYs in a round");
                r.token = Some(token);
            }
            Event::Planned { window, .. } => {
                assert!(
                    matches!(self.round().token, Some(Some(_))),
                    "a v1 round planned"
                );
                assert!(
                    usize::from(window) <= self.window_slots,
                    "plan wider than the window"
                );
            }
            Event::PeerHint(h) => {
                assert!(step.said.contains(&Message::Hint(h)));
                let r = self.round();
                assert!(matches!(r.token, Some(Some(_))), "HINT used by v1");
                r.hint = Some(h);
                self.session_hinted = true;
            }
            Event::ExchangeSent => assert!(self.round().token.is_some()),
            Event::Seen(addr) => {
                assert!(step.said.contains(&Message::Seen(addr)));
                assert!(
                    matches!(self.round().token, Some(Some(_))),
                    "SEEN used by v1"
                );
            }
            Event::PeerInfo { peer, target } => {
                assert!(step.said.contains(&Message::PeerInfo(peer)));
                // The peer's hint, else v1's offset, fixes the aim; a predicting client
                // without a hint (against a v1 server) may sweep, but aims at the peer's IP.
                let strategy = self.config.strategy;
                let offset = match self.round().hint {
                    Some(h) if h != Hint::RANDOM && h != Hint::NONE => Some(i32::from(h.0)),
                    _ if strategy == Strategy::V1 => Some(self.config.peer_port_offset),
                    _ => None,
                };
                if let Some(offset) = offset {
                    let expected = u16::try_from(i32::from(peer.port()) + offset)
                        .ok()
                        .filter(|&p| p != 0)
                        .map(|p| SocketAddrV4::new(*peer.ip(), p));
                    assert_eq!(target, expected, "target is not PEERINFO + hint or offset");
                }
                assert!(
                    target.is_none_or(|t| t.ip() == peer.ip()),
                    "aim at another IP"
                );
                let r = self.round();
                assert!(r.token.is_some(), "PEERINFO before READY");
                assert!(r.peer.is_none(), "two PEERINFOs in a round");
                r.peer = Some(peer);
                r.target = target;
                if matches!(r.token, Some(Some(_))) && target.is_some() {
                    self.session_peer = Some(peer);
                }
            }
            Event::PunchSent { target, datagrams } => {
                assert_eq!(Some(target), self.round().target);
                let passes = usize::from(self.config.punch_passes.max(1));
                assert!(
                    datagrams <= self.window_slots * passes,
                    "more punches than slots"
                );
            }
            Event::Win {
                round,
                slot,
                peer,
                strategy,
            } => {
                assert_eq!(round as usize, self.rounds.len());
                assert!(slot < self.window_slots, "WIN on a probe slot");
                let session_peer = self.session_peer;
                let session_hinted = self.session_hinted;
                let accept_any = self.config.accept_any_ip;
                let r = self.round();
                assert!(r.won.is_none() && !r.lost, "WIN in a finished round");
                let known = match r.peer {
                    Some(p) => {
                        assert!(r.target.is_some(), "WIN without a target");
                        Some(p)
                    }
                    None => session_peer,
                };
                let Some(known) = known else {
                    panic!("WIN before PEERINFO");
                };
                assert!(
                    accept_any || peer.ip() == IpAddr::V4(*known.ip()),
                    "WIN from an unacceptable address"
                );
                let delivered = step.punch == Some((slot, peer))
                    || kept_early(&r.early).contains(&(slot, peer));
                assert!(delivered, "WIN for a PUNCH that never arrived");
                // A late punch of an aimed earlier round of the session counts as aimed.
                let session_hinted = matches!(r.token, Some(Some(_))) && session_hinted;
                let expected = if r.predicted() || session_hinted {
                    Strategy::Predict
                } else {
                    Strategy::V1
                };
                assert_eq!(strategy, expected, "WIN names the wrong strategy");
                r.won = Some((slot, peer, strategy));
                *won_now = true;
                self.outcome.wins += 1;
                self.outcome.predicted_wins += u32::from(strategy == Strategy::Predict);
            }
            Event::Lose { round, reason } => {
                assert_eq!(round as usize, self.rounds.len());
                let r = self.round();
                assert!(r.won.is_none(), "LOSE after WIN");
                assert!(!r.lost, "two LOSEs in a round");
                if reason == LoseReason::TargetOutOfRange {
                    assert!(r.peer.is_some() && r.target.is_none());
                }
                r.lost = true;
                self.outcome.losses += 1;
            }
            Event::Finished => {
                let acks = self.config.ack_count;
                let r = self.round();
                let Some((_, _, strategy)) = r.won else {
                    panic!("Finished without WIN");
                };
                match strategy {
                    Strategy::V1 => assert_eq!(r.acks, acks, "acknowledgements sent"),
                    Strategy::Predict => assert!(r.acks >= 1, "no acknowledgement"),
                }
                self.finished = true;
                self.outcome.finished = true;
            }
            Event::GaveUp { rounds } => {
                assert_eq!(Some(rounds), self.config.max_rounds);
                assert_eq!(rounds as usize, self.rounds.len());
                assert!(self.round().lost);
                self.finished = true;
                self.outcome.finished = true;
            }
            Event::PeerRefused { peer, .. } => {
                assert!(step.said.contains(&Message::PeerInfo(peer)));
                // The model's peers are public hosts: only port 0 can be refused.
                assert_eq!(peer.port(), 0, "refused a good peer address");
                assert!(self.round().token.is_some(), "PEERINFO before READY");
            }
            Event::BudgetExhausted { .. } => panic!("the model's budget is unbounded"),
            Event::Rehello => {
                assert!(!self.connected, "HELLO again while connected");
                assert!(self.round().token.is_none(), "HELLO again after READY");
            }
            Event::ServerUnreachable => {
                assert!(
                    step.connect_failed,
                    "ServerUnreachable without a failed connect"
                );
                self.finished = true;
                self.outcome.finished = true;
            }
        }
    }

    /// Every transmit of one step: on an open slot, of a kind the step's rounds allow.
    /// Acknowledgements: one at the end of the step that won (unless a v1 round asks for
    /// none), and after that only acknowledgements (and probes) until finished.
    fn check_transmits(
        &mut self,
        transmits: &[Transmit],
        first_round: usize,
        won_before: bool,
        won_now: bool,
    ) {
        if transmits.is_empty() {
            return;
        }
        let window = self.window.as_ref().expect("transmit with no window");
        let punch = Message::Punch(self.config.ident).to_bytes();
        let server = SocketAddr::from(self.config.server);
        let probe_server = SocketAddr::from(self.config.probe_server());
        let rounds = &self.rounds[first_round..];
        let mut acks = &transmits[transmits.len()..];
        let mut others = transmits;
        if won_now {
            let r = self.rounds.last().expect("won");
            let (_, _, strategy) = r.won.expect("won");
            if strategy == Strategy::Predict || self.config.ack_count > 0 {
                (others, acks) = transmits.split_at(transmits.len() - 1);
            }
        } else if won_before {
            acks = transmits;
            others = &[];
        }
        for t in others {
            assert!(
                t.slot < window.len(),
                "transmit on slot {} of {}",
                t.slot,
                window.len()
            );
            match Message::decode(&t.payload) {
                Ok(Message::Probe) => {
                    assert_eq!(t.destination, probe_server, "PROBE elsewhere");
                    assert!(t.slot >= self.window_slots, "PROBE from a window slot");
                }
                Ok(Message::Exchange(id)) => {
                    assert_eq!((t.destination, id), (server, self.config.ident));
                    assert!(t.slot < self.window_slots, "EXCHANGE from a probe slot");
                    assert!(rounds.iter().any(|r| r.token == Some(None)), "v1 EXCHANGE");
                }
                Ok(Message::ExchangeToken { token, round, .. }) => {
                    assert_eq!(t.destination, server);
                    assert!(t.slot < self.window_slots, "EXCHANGE from a probe slot");
                    assert!(round >= 1);
                    assert!(
                        rounds.iter().any(|r| r.token == Some(Some(token))),
                        "EXCHANGE with another token"
                    );
                }
                Ok(Message::Punch(_)) if t.payload == punch => {
                    assert!(t.slot < self.window_slots, "PUNCH from a probe slot");
                    let to = |r: &RoundModel| r.target.map(SocketAddr::from);
                    assert!(
                        rounds.iter().any(|r| to(r) == Some(t.destination)),
                        "PUNCH to no round's target: {t:?}"
                    );
                }
                _ => panic!("client sent {t:?}"),
            }
        }
        for t in acks {
            if t.payload == Message::Probe.to_bytes() && t.destination == probe_server {
                continue;
            }
            let ack_count = self.config.ack_count;
            let r = self.round();
            let Some((slot, peer, strategy)) = r.won else {
                unreachable!("acks only after WIN");
            };
            assert_eq!(t.payload, punch, "after WIN the client sent {t:?}");
            assert_eq!(
                (t.slot, t.destination),
                (slot, peer),
                "acknowledgement misdirected"
            );
            r.acks += 1;
            if strategy == Strategy::V1 {
                assert!(r.acks <= ack_count, "more acknowledgements than ack_count");
            }
        }
    }

    /// A PUNCH arrived on a window slot: it must WIN if it is due, else wait for PEERINFO.
    fn on_punch_delivered(&mut self, slot: usize, from: SocketAddr, won_now: bool) {
        let session_peer = self.session_peer;
        let Some(r) = self.rounds.last() else {
            return;
        };
        if won_now || r.won.is_some() || r.lost {
            return;
        }
        match (r.peer, r.target) {
            (Some(peer), Some(_)) => {
                assert!(
                    !self.acceptable(peer, from),
                    "an acceptable PUNCH arrived but no WIN"
                );
            }
            (Some(_), None) => {}
            (None, _) => {
                if let Some(sp) = session_peer {
                    assert!(
                        !self.acceptable(sp, from),
                        "the session peer's PUNCH but no WIN"
                    );
                }
                self.round().early.push((slot, from));
            }
        }
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
        w.u8(self.port_start);
        w.u8(self.port_count);
        w.u8(self.offset);
        w.bool(self.accept_any_ip);
        w.bool(self.predict);
        w.u8(self.max_rounds);
        w.u8(self.round_timeout);
        w.u8(self.punch_passes);
        w.u8(self.exchange_count);
        w.u8(self.ack_count);
        w.u8(self.ack_interval);
        w.u8(self.retry_delay);
        w.u8(self.probes);
        w.u8(self.probe_interval);
        w.u8(self.max_window);
    }
}

impl Encode for Operation {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 8;
        match *self {
            Self::Connected => w.variant(0, N),
            Self::ConnectFailed => w.variant(1, N),
            Self::Stream(ref data) => {
                w.variant(2, N);
                data.encode(w);
            }
            Self::StreamClosed => w.variant(3, N),
            Self::Datagram {
                slot,
                host,
                port,
                ref data,
            } => {
                w.variant(4, N);
                w.u8(slot);
                w.u8(host);
                w.u16(port);
                data.encode(w);
            }
            Self::Advance { millis } => {
                w.variant(5, N);
                w.u16(millis);
            }
            Self::AdvanceLate { millis } => {
                w.variant(6, N);
                w.u16(millis);
            }
            Self::AdvanceToTimeout => w.variant(7, N),
        }
    }
}

impl Encode for StreamData {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 6;
        match *self {
            Self::Ready(t) => {
                w.variant(0, N);
                t.encode(w);
            }
            Self::PeerInfo { ip, port } => {
                w.variant(1, N);
                w.u8(ip);
                w.u16(port);
            }
            Self::Seen { ip, port } => {
                w.variant(2, N);
                w.u8(ip);
                w.u16(port);
            }
            Self::Hint(h) => {
                w.variant(3, N);
                w.u16(h as u16);
            }
            Self::Bytes8(b) => {
                w.variant(4, N);
                w.bytes(&b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
        }
    }
}

impl Encode for DatagramData {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 5;
        match *self {
            Self::Punch => w.variant(0, N),
            Self::PunchWith(i) => {
                w.variant(1, N);
                w.u8(i);
            }
            Self::ProbeReply { port } => {
                w.variant(2, N);
                w.u16(port);
            }
            Self::Bytes8(b) => {
                w.variant(3, N);
                w.bytes(&b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
        }
    }
}
