//! The `server` target: a sequence of connection, stream, close, datagram and time events
//! applied to [`Server`] with small limits, checked against a reference model of the server's
//! documented behaviour.
//!
//! The model predicts, for every event, exactly what the server must output (writes, closes,
//! probe answers, in order, READY tokens included: it draws them from the same seed) and which
//! events it must report, from what crossed the public API alone. After every event it checks:
//! - no output names a connection the driver does not hold open (a refused connection gets
//!   exactly one `Close`), and nothing is sent after a `Close`;
//! - a connection is refused exactly when a limit is reached; `stats()` agree with the model
//!   (so `connections <= max_connections`);
//! - greeting: the first frame must be a HELLO or a keyed HELLO, and nothing more may complete
//!   in the same read (another whole frame or bad bytes close it before it is seated; a trailing
//!   partial frame is kept); a keyed HELLO needs the extension; `only_ident` applies to plain
//!   HELLOs; a private server refuses plain HELLOs (REFUSED key-required) and keyed HELLOs
//!   whose proof fails (REFUSED wrong-key), each followed by the close;
//! - rooms: plain and keyed HELLOs with the same 6 bytes wait in separate rooms and never pair;
//!   READY goes two at a time to the partners of one room, each with its own token (none when
//!   the extension is off), and in a keyed room each then gets the partner's nonce;
//! - keyed handshake: a side's first AUTH is relayed verbatim to its partner, a second one (or
//!   VERIFIED before its AUTH, or anything else) ends the pair; AUTH-FAILED ends the pair (both
//!   closed); no PEERINFO in a keyed pair before both sides said VERIFIED and both EXCHANGEs of
//!   the round are in, whichever comes last;
//! - rounds: PEERINFO carries the partner's latest EXCHANGE source (token or v1 attribution),
//!   one per side per round; HINT (even of no advice) right before it whenever both sides used
//!   tokens; SEEN to the sender of an attributed token EXCHANGE; a pair that is not two
//!   token users is closed after its round, a session lives on `session_timeout`;
//! - every deadline is honoured (silent, waiting and half-exchanged connections are closed in
//!   time) and `poll_timeout()` is exactly the earliest one, never in the past;
//! - every datagram is either acted on or counted as ignored, probes are answered to the source.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use n4_core::{
    AbandonReason, ConnId, Frame, FrameDecoder, Hint, Ident, Key, Local, LongMessage, Message,
    Nonce, RefuseReason, RejectReason, Server, ServerConfig, ServerEvent, ServerOutput, Token,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

/// PEER-DATA's command byte (a keyed client's data for its partner, relayed once after its
/// AUTH). Named by its byte so that the harness also builds against a core without it, where
/// it is an unknown command (garbage).
pub const CMD_PEER_DATA: u8 = 0x19;
/// PEER-DATA's payload: 32 bytes of data and a 16-byte MAC.
const PEER_DATA_PAYLOAD: u8 = 48;

/// The private server's key (when [`Config::private`] is set); keyed HELLOs prove it or
/// [`other_key`].
pub fn server_key() -> Key {
    Key::new(b"n4 fuzz: the private server's key").expect("not empty")
}

/// A key that is not the server's.
pub fn other_key() -> Key {
    Key::new(b"n4 fuzz: somebody else's key").expect("not empty")
}

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
    /// Only `IDENTS[0]` may take a seat (plain HELLOs).
    pub only_ident: bool,
    /// Waiting clients time out after [`WAIT_TIMEOUT`].
    pub wait_timeout: bool,
    /// Offer the token extension (always on for a private server, as the CLI requires).
    pub extensions: bool,
    /// Token seed.
    pub rng_seed: u8,
    /// A private server with [`server_key`].
    pub private: bool,
}

impl Config {
    fn extensions(&self) -> bool {
        self.extensions || self.private
    }
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
    /// One frame in one write.
    Frame(FrameChoice),
    /// Two frames in one write.
    Frames(FrameChoice, FrameChoice),
    /// One frame in two writes, cut after `at % (length + 1)` bytes.
    SplitFrame {
        /// The frame.
        frame: FrameChoice,
        /// Where to cut.
        at: u8,
    },
}

/// A frame a client might write.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameChoice {
    /// A plain HELLO.
    Hello(IdentChoice),
    /// A keyed HELLO for room tag `room` (the same 6 bytes as a plain identifier, when known),
    /// nonce `[nonce; 16]`, with the proof of [`server_key`] (`proof`) or of [`other_key`].
    KeyedHello {
        /// The room tag.
        room: IdentChoice,
        /// The nonce's byte.
        nonce: u8,
        /// The proof is the server key's.
        proof: bool,
    },
    /// AUTH with MAC `[mac; 16]`.
    Auth(u8),
    /// VERIFIED.
    Verified,
    /// AUTH-FAILED.
    AuthFailed,
    /// PEER-DATA with every payload byte `fill`.
    PeerData(u8),
    /// A long frame no client may write (`% 6`: unknown command, short AUTH, a length past any
    /// frame, PEER-NONCE, a keyed PUNCH, VERIFIED with a payload).
    Garbage(u8),
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
    /// HINTs sent.
    pub hints: usize,
    /// SEENs sent.
    pub seens: usize,
    /// Pairs completed.
    pub completed: u64,
    /// Connections the server closed (refusals included).
    pub server_closes: usize,
    /// PEER-NONCEs sent (keyed pairs).
    pub peer_nonces: usize,
    /// AUTHs relayed.
    pub auths_relayed: usize,
    /// PEERINFOs sent in keyed pairs.
    pub keyed_peer_infos: usize,
    /// REFUSEDs sent (a private server).
    pub refusals: usize,
    /// Pairs ended by AUTH-FAILED.
    pub auth_failures: usize,
    /// PEER-DATAs relayed.
    pub data_relayed: usize,
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

impl FrameChoice {
    /// The bytes of the frame.
    pub fn bytes(self) -> Vec<u8> {
        match self {
            Self::Hello(id) => message_bytes(0x01, id.wire()).to_vec(),
            Self::KeyedHello { room, nonce, proof } => {
                let room = room.wire();
                let nonce = [nonce; 16];
                let proof = match Ident::from_wire(room) {
                    Ok(r) if proof => server_key().hello_proof(r, &nonce),
                    Ok(r) => other_key().hello_proof(r, &nonce),
                    Err(_) => [0; 16],
                };
                let mut b = vec![0x10, 38];
                b.extend(room);
                b.extend(nonce);
                b.extend(proof);
                b
            }
            Self::Auth(m) => LongMessage::Auth([m; 16]).to_bytes().to_vec(),
            Self::Verified => LongMessage::Verified.to_bytes().to_vec(),
            Self::AuthFailed => LongMessage::AuthFailed.to_bytes().to_vec(),
            Self::PeerData(fill) => {
                let mut b = vec![CMD_PEER_DATA, PEER_DATA_PAYLOAD];
                b.extend([fill; PEER_DATA_PAYLOAD as usize]);
                b
            }
            Self::Garbage(g) => match g % 6 {
                0 => vec![0x1f, 0],
                1 => vec![0x13, 2, 0, 0],
                2 => vec![0x13, 200],
                3 => LongMessage::PeerNonce([g; 16]).to_bytes().to_vec(),
                4 => LongMessage::Punch([g; 16]).to_bytes().to_vec(),
                _ => vec![0x14, 1, 0],
            },
        }
    }
}

/// Where clients meet: (keyed, identifier or room tag).
type Room = (bool, Ident);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seat {
    Greeting,
    Waiting(Room),
    Paired(u64),
}

#[derive(Debug)]
struct ConnModel {
    remote: SocketAddr,
    /// The remote IP as the server counts it (v4-mapped made IPv4).
    ip: IpAddr,
    decoder: FrameDecoder,
    seat: Seat,
    /// Keyed: the nonce of its HELLO.
    nonce: Option<Nonce>,
    /// Hello or wait deadline.
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct SideModel {
    conn: ConnId,
    ip: IpAddr,
    token: Token,
    ext: bool,
    round: u8,
    exchanged: Option<SocketAddrV4>,
    hint: Hint,
    auth_relayed: bool,
    data_relayed: bool,
    verified: bool,
}

#[derive(Debug)]
struct PairModel {
    ident: Ident,
    keyed: bool,
    sides: [SideModel; 2],
    deadline: Instant,
    completed: u8,
}

impl PairModel {
    fn side_of(&self, conn: ConnId) -> usize {
        usize::from(self.sides[1].conn == conn)
    }
}

struct Harness {
    config: Config,
    key: Option<Key>,
    server: Server,
    now: Instant,
    /// Connections the driver holds open.
    held: BTreeSet<ConnId>,
    /// The model of the server's connections, rooms and pairs.
    conns: BTreeMap<ConnId, ConnModel>,
    waiting: BTreeMap<Room, ConnId>,
    pairs: BTreeMap<u64, PairModel>,
    next_pair: u64,
    tokens: BTreeMap<Token, (u64, usize)>,
    /// Tokens shown in READYs, in order.
    issued: Vec<Token>,
    rng: ChaCha8Rng,
    completed: u64,
    ignored: u64,
    probes: u64,
    /// What the current step must output and report, in order.
    out: Vec<ServerOutput>,
    events: Vec<ServerEvent>,
    outcome: Outcome,
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match (addr.ip().to_canonical(), addr.port()) {
        (IpAddr::V4(ip), port) => Some(SocketAddrV4::new(ip, port)),
        _ => None,
    }
}

impl Harness {
    fn new(config: Config) -> Self {
        let key = config.private.then(server_key);
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
            extensions: config.extensions(),
            rng_seed: u64::from(config.rng_seed),
            key,
        });
        Self {
            config,
            key,
            server,
            now: Instant::now(),
            held: BTreeSet::new(),
            conns: BTreeMap::new(),
            waiting: BTreeMap::new(),
            pairs: BTreeMap::new(),
            next_pair: 0,
            tokens: BTreeMap::new(),
            issued: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(u64::from(config.rng_seed)),
            completed: 0,
            ignored: 0,
            probes: 0,
            out: Vec::new(),
            events: Vec::new(),
            outcome: Outcome::default(),
        }
    }

    fn apply(&mut self, op: &Operation) {
        let mut refusing = None;
        let mut datagram = None;
        match *op {
            Operation::Open { conn, host, port } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                if self.held.contains(&conn) {
                    return; // a driver never reuses an id it holds open
                }
                let remote = SocketAddr::new(HOSTS[usize::from(host) % HOSTS.len()], port);
                if self.model_open(conn, remote) {
                    self.held.insert(conn);
                } else {
                    refusing = Some(conn);
                }
                self.server.handle_connection_opened(self.now, conn, remote);
            }
            Operation::Stream { conn, ref data } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                let split = |b: Vec<u8>, at: usize| {
                    let (x, y) = b.split_at(at);
                    vec![x.to_vec(), y.to_vec()]
                };
                let writes: Vec<Vec<u8>> = match data {
                    StreamData::Hello(id) => vec![message_bytes(0x01, id.wire()).to_vec()],
                    StreamData::SplitHello { ident, at } => split(
                        message_bytes(0x01, ident.wire()).to_vec(),
                        usize::from(*at) % 9,
                    ),
                    StreamData::Bytes8(b) => vec![b.to_vec()],
                    StreamData::Raw(b) => vec![b.clone()],
                    StreamData::Frame(f) => vec![f.bytes()],
                    StreamData::Frames(a, b) => vec![[a.bytes(), b.bytes()].concat()],
                    StreamData::SplitFrame { frame, at } => {
                        let b = frame.bytes();
                        let at = usize::from(*at) % (b.len() + 1);
                        split(b, at)
                    }
                };
                for w in writes {
                    self.model_stream(conn, &w);
                    self.server.handle_stream_data(self.now, conn, &w);
                    self.drain(None, None);
                    self.check();
                }
                return;
            }
            Operation::Close { conn } => {
                let conn = ConnId(u64::from(conn % CONN_IDS));
                self.held.remove(&conn);
                self.model_closed(conn);
                self.server.handle_connection_closed(self.now, conn);
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
                            TokenChoice::Issued(i) if !self.issued.is_empty() => {
                                self.issued[usize::from(i) % self.issued.len()]
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
                datagram = Some(from);
                self.model_datagram(from, &bytes);
                self.server
                    .handle_datagram(self.now, Local::Main, from, &bytes);
            }
            Operation::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                self.model_timeout();
                self.server.handle_timeout(self.now);
            }
            Operation::AdvanceToTimeout => {
                if let Some(t) = self.server.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.model_timeout();
                self.server.handle_timeout(self.now);
            }
        }
        self.drain(refusing, datagram);
        self.check();
    }

    // ---- The model: what the server must do. ----

    fn send(&mut self, conn: ConnId, message: impl Into<Frame>) {
        self.out.push(ServerOutput::Send {
            conn,
            message: message.into(),
        });
    }

    /// A connection was accepted: `true` if it is admitted.
    fn model_open(&mut self, conn: ConnId, remote: SocketAddr) -> bool {
        let ip = remote.ip().to_canonical();
        let from_ip = self.conns.values().filter(|c| c.ip == ip).count();
        let reason = if self.conns.len() >= MAX_CONNECTIONS {
            Some(RejectReason::TooManyConnections)
        } else if from_ip >= MAX_PER_IP {
            Some(RejectReason::TooManyFromIp)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.out.push(ServerOutput::Close { conn });
            self.events.push(ServerEvent::Rejected { remote, reason });
            return false;
        }
        self.conns.insert(
            conn,
            ConnModel {
                remote,
                ip,
                decoder: FrameDecoder::default(),
                seat: Seat::Greeting,
                nonce: None,
                deadline: Some(self.now + HELLO_TIMEOUT),
            },
        );
        true
    }

    /// Bytes on a connection, frame by frame.
    fn model_stream(&mut self, conn: ConnId, bytes: &[u8]) {
        let mut input = bytes;
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return; // unknown, or closed by what came before
            };
            let Some(frame) = c.decoder.next(&mut input) else {
                return; // a partial frame is kept
            };
            match (c.seat, frame) {
                (
                    Seat::Greeting,
                    Ok(
                        hello @ (Frame::Short(Message::Hello(_))
                        | Frame::Long(LongMessage::KeyedHello { .. })),
                    ),
                ) => {
                    // Nothing more may complete in the same read.
                    let mut rest = c.decoder.clone();
                    let mut tail = input;
                    if rest.next(&mut tail).is_some() {
                        self.reject(conn, RejectReason::Garbage);
                        return;
                    }
                    c.decoder = rest;
                    input = tail;
                    match hello {
                        Frame::Short(Message::Hello(id)) => self.on_hello(conn, id, None),
                        Frame::Long(LongMessage::KeyedHello { room, nonce, proof }) => {
                            self.on_hello(conn, room, Some((nonce, proof)))
                        }
                        _ => unreachable!("matched above"),
                    }
                }
                (Seat::Greeting, _) => {
                    self.reject(conn, RejectReason::Garbage);
                    return;
                }
                (Seat::Paired(p), Ok(Frame::Long(m)))
                    if self.pairs[&p].keyed
                        && (matches!(
                            m,
                            LongMessage::Auth(_) | LongMessage::Verified | LongMessage::AuthFailed
                        ) || m.command() == CMD_PEER_DATA) =>
                {
                    self.on_auth(p, conn, m)
                }
                (Seat::Waiting(_) | Seat::Paired(_), _) => {
                    self.abandon(conn, AbandonReason::Garbage);
                    return;
                }
            }
        }
    }

    fn on_hello(&mut self, conn: ConnId, ident_: Ident, keyed: Option<(Nonce, [u8; 16])>) {
        match (self.key, keyed) {
            (Some(_), None) => return self.refuse(conn, RefuseReason::KeyRequired),
            (Some(key), Some((nonce, proof))) if !key.verify_hello(ident_, &nonce, &proof) => {
                return self.refuse(conn, RefuseReason::WrongKey)
            }
            (None, Some(_)) if !self.config.extensions() => {
                return self.reject(conn, RejectReason::Garbage)
            }
            _ => {}
        }
        if keyed.is_none() && self.config.only_ident && ident_ != ident(0) {
            return self.reject(conn, RejectReason::WrongIdent);
        }
        let room: Room = (keyed.is_some(), ident_);
        let now = self.now;
        let c = self.conns.get_mut(&conn).expect("greeting conn");
        c.nonce = keyed.map(|(nonce, _)| nonce);
        c.deadline = None;
        let remote = c.remote;
        let Some(first) = self.waiting.remove(&room) else {
            self.waiting.insert(room, conn);
            c.seat = Seat::Waiting(room);
            if self.config.wait_timeout {
                c.deadline = Some(now + WAIT_TIMEOUT);
            }
            self.events.push(ServerEvent::Waiting {
                remote,
                ident: ident_,
            });
            return;
        };
        let pair = self.next_pair;
        self.next_pair += 1;
        let ext = self.config.extensions();
        let mut sides = Vec::new();
        for (i, conn) in [first, conn].into_iter().enumerate() {
            let token = loop {
                let t = Token(self.rng.next_u32());
                if !self.tokens.contains_key(&t) {
                    break t;
                }
            };
            self.tokens.insert(token, (pair, i));
            let c = self.conns.get_mut(&conn).expect("seated conn");
            c.seat = Seat::Paired(pair);
            c.deadline = None;
            sides.push(SideModel {
                conn,
                ip: c.ip,
                token,
                ext: false,
                round: 0,
                exchanged: None,
                hint: Hint::NONE,
                auth_relayed: false,
                data_relayed: false,
                verified: false,
            });
            self.send(conn, Message::Ready(ext.then_some(token)));
        }
        if room.0 {
            for (me, other) in [(first, conn), (conn, first)] {
                let nonce = self.conns[&other].nonce.expect("a keyed room's nonce");
                self.send(me, LongMessage::PeerNonce(nonce));
            }
        }
        self.events.push(ServerEvent::Paired {
            ident: ident_,
            first: self.conns[&first].remote,
            second: remote,
        });
        let [a, b]: [SideModel; 2] = sides.try_into().expect("two sides");
        self.pairs.insert(
            pair,
            PairModel {
                ident: ident_,
                keyed: room.0,
                sides: [a, b],
                deadline: now + EXCHANGE_TIMEOUT,
                completed: 0,
            },
        );
    }

    fn on_auth(&mut self, p: u64, conn: ConnId, m: LongMessage) {
        let pair = self.pairs.get_mut(&p).expect("paired");
        let side = pair.side_of(conn);
        let partner = pair.sides[1 - side].conn;
        match m {
            LongMessage::Auth(_) if !pair.sides[side].auth_relayed => {
                pair.sides[side].auth_relayed = true;
                self.send(partner, m);
            }
            m if m.command() == CMD_PEER_DATA
                && pair.sides[side].auth_relayed
                && !pair.sides[side].data_relayed =>
            {
                pair.sides[side].data_relayed = true;
                self.send(partner, m);
            }
            LongMessage::Verified if pair.sides[side].auth_relayed => {
                pair.sides[side].verified = true;
                self.complete_round(p);
            }
            LongMessage::AuthFailed => self.abandon(conn, AbandonReason::AuthFailed),
            _ => self.abandon(conn, AbandonReason::Garbage),
        }
    }

    /// Both sides have a new EXCHANGE (and, keyed, both said VERIFIED): each learns the other's
    /// address; a pair that is not two token users is then closed.
    fn complete_round(&mut self, p: u64) {
        let now = self.now;
        let pair = self.pairs.get_mut(&p).expect("pair");
        if pair.sides.iter().any(|s| s.round <= pair.completed) {
            return;
        }
        if pair.keyed && !pair.sides.iter().all(|s| s.verified) {
            return;
        }
        let mut sends = Vec::new();
        for (me, other) in [(0, 1), (1, 0)] {
            let (me, other) = (&pair.sides[me], &pair.sides[other]);
            if me.ext && other.ext {
                sends.push((me.conn, Message::Hint(other.hint)));
            }
            let addr = other.exchanged.expect("a side with a round has an address");
            sends.push((me.conn, Message::PeerInfo(addr)));
        }
        let round = pair.sides[0].round.max(pair.sides[1].round);
        let first_round = pair.completed == 0;
        pair.completed = round;
        let event = ServerEvent::Completed {
            round,
            ident: pair.ident,
            first: pair.sides[0].exchanged.expect("exchanged"),
            second: pair.sides[1].exchanged.expect("exchanged"),
        };
        let session = pair.sides.iter().all(|s| s.ext);
        if pair.keyed {
            self.outcome.keyed_peer_infos += 2;
        }
        if session {
            pair.deadline = now + SESSION_TIMEOUT;
        }
        for (conn, m) in sends {
            self.send(conn, m);
        }
        if !session {
            self.close_pair(p);
        }
        if first_round {
            self.completed += 1;
        }
        self.events.push(event);
    }

    fn refuse(&mut self, conn: ConnId, why: RefuseReason) {
        self.send(conn, LongMessage::Refused(why));
        let reason = match why {
            RefuseReason::KeyRequired => RejectReason::KeyRequired,
            _ => RejectReason::WrongKey,
        };
        self.reject(conn, reason);
    }

    /// Closes a connection that never took a seat.
    fn reject(&mut self, conn: ConnId, reason: RejectReason) {
        if let Some(c) = self.conns.remove(&conn) {
            self.out.push(ServerOutput::Close { conn });
            self.events.push(ServerEvent::Rejected {
                remote: c.remote,
                reason,
            });
        }
    }

    /// Gives up a seated connection and its pair (a peer's close gets no `Close`).
    fn abandon(&mut self, conn: ConnId, reason: AbandonReason) {
        let Some(seat) = self.conns.get(&conn).map(|c| c.seat) else {
            return;
        };
        if reason == AbandonReason::Closed {
            self.conns.remove(&conn);
        }
        let ident_ = match seat {
            Seat::Greeting => return,
            Seat::Waiting(room) => {
                self.waiting.remove(&room);
                if self.conns.remove(&conn).is_some() {
                    self.out.push(ServerOutput::Close { conn });
                }
                room.1
            }
            Seat::Paired(p) => {
                let ident_ = self.pairs[&p].ident;
                self.close_pair(p);
                ident_
            }
        };
        if reason == AbandonReason::AuthFailed {
            self.outcome.auth_failures += 1;
        }
        self.events.push(ServerEvent::Abandoned {
            ident: ident_,
            reason,
        });
    }

    /// Closes both connections of a pair (those still known) and forgets it.
    fn close_pair(&mut self, p: u64) {
        let Some(pair) = self.pairs.remove(&p) else {
            return;
        };
        for side in &pair.sides {
            self.tokens.remove(&side.token);
            if self.conns.remove(&side.conn).is_some() {
                self.out.push(ServerOutput::Close { conn: side.conn });
            }
        }
    }

    fn model_closed(&mut self, conn: ConnId) {
        match self.conns.get(&conn).map(|c| (c.seat, c.remote)) {
            None => {}
            Some((Seat::Greeting, remote)) => {
                self.conns.remove(&conn);
                self.events.push(ServerEvent::Rejected {
                    remote,
                    reason: RejectReason::Closed,
                });
            }
            Some(_) => self.abandon(conn, AbandonReason::Closed),
        }
    }

    fn model_datagram(&mut self, from: SocketAddr, bytes: &[u8]) {
        let Some(from) = v4(from) else {
            self.ignored += 1;
            return;
        };
        let seat = match Message::decode(bytes) {
            Ok(Message::ExchangeToken { token, round, hint }) => self
                .tokens
                .get(&token)
                .map(|&seat| (seat, Some((round, hint)))),
            Ok(Message::Exchange(id)) => self.attribute_v1(id, from).map(|seat| (seat, None)),
            Ok(m @ (Message::Probe | Message::ProbeOther)) => {
                self.probes += 1;
                self.out.push(ServerOutput::Datagram {
                    // Every datagram arrives on the main socket: a PROBE-OTHER leaves from the
                    // probe socket.
                    from: if m == Message::Probe {
                        Local::Main
                    } else {
                        Local::Probe
                    },
                    to: from.into(),
                    message: Message::Seen(from),
                });
                return;
            }
            _ => None,
        };
        match seat {
            Some(((p, side), ext)) => self.on_exchange(p, side, from, ext),
            None => self.ignored += 1,
        }
    }

    /// v1: the earliest pair with this identifier (or room tag) that the source IP can belong
    /// to (a seat's TCP IP, or a seat's EXCHANGE IP); a repeat of an attributed source is
    /// ignored; else the first seat from that IP without an EXCHANGE yet.
    fn attribute_v1(&self, id: Ident, from: SocketAddrV4) -> Option<(u64, usize)> {
        let ip = IpAddr::V4(*from.ip());
        for (&p, pair) in &self.pairs {
            let listed = pair
                .sides
                .iter()
                .any(|s| s.ip == ip || s.exchanged.map(|e| IpAddr::V4(*e.ip())) == Some(ip));
            // A keyed pair takes token EXCHANGEs only.
            if pair.keyed || pair.ident != id || !listed {
                continue;
            }
            if pair.sides.iter().any(|s| s.exchanged == Some(from)) {
                return None;
            }
            if let Some(i) = pair
                .sides
                .iter()
                .position(|s| s.ip == ip && s.exchanged.is_none())
            {
                return Some((p, i));
            }
        }
        None
    }

    fn on_exchange(&mut self, p: u64, side: usize, from: SocketAddrV4, ext: Option<(u8, Hint)>) {
        let pair = self.pairs.get_mut(&p).expect("attributed to a pair");
        let completed = pair.completed;
        let s = &mut pair.sides[side];
        let (round, hint) = ext.unwrap_or((1, Hint::NONE));
        // A newer round, or a refresh of the open round from a new address; else ignored.
        let refresh = round == s.round && round > completed && s.exchanged != Some(from);
        if round < s.round || (round == s.round && !refresh) {
            self.ignored += 1;
            return;
        }
        // A plain EXCHANGE given by arrival order to this seat, whose client then shows it is
        // ours (a token EXCHANGE), was its same-IP partner's.
        if ext.is_some() && !pair.sides[side].ext {
            let plain = pair.sides[side].exchanged;
            let ip = pair.sides[side].ip;
            let other = &mut pair.sides[1 - side];
            if let Some(plain) = plain {
                if other.ip == ip && other.exchanged.is_none() && !other.ext {
                    other.exchanged = Some(plain);
                    other.round = 1;
                    other.hint = Hint::NONE;
                }
            }
        }
        let s = &mut pair.sides[side];
        s.ext |= ext.is_some();
        s.round = round;
        s.exchanged = Some(from);
        s.hint = hint;
        if s.ext {
            let conn = s.conn;
            self.send(conn, Message::Seen(from));
        }
        self.complete_round(p);
    }

    fn model_timeout(&mut self) {
        let now = self.now;
        let mut due: Vec<(Instant, ConnId)> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| c.deadline.filter(|&d| d <= now).map(|d| (d, id)))
            .collect();
        due.sort();
        for (_, conn) in due {
            match self.conns.get(&conn).map(|c| c.seat) {
                Some(Seat::Greeting) => self.reject(conn, RejectReason::HelloTimeout),
                Some(Seat::Waiting(_)) => self.abandon(conn, AbandonReason::WaitTimeout),
                _ => {}
            }
        }
        let mut due: Vec<(Instant, u64)> = self
            .pairs
            .iter()
            .filter(|(_, pair)| pair.deadline <= now)
            .map(|(&p, pair)| (pair.deadline, p))
            .collect();
        due.sort();
        for (_, p) in due {
            if let Some(conn) = self.pairs.get(&p).map(|pair| pair.sides[0].conn) {
                self.abandon(conn, AbandonReason::ExchangeTimeout);
            }
        }
    }

    // ---- The checks. ----

    /// Takes every output and event: the driver's own rules first, then the model's
    /// prediction, output for output.
    fn drain(&mut self, mut refusing: Option<ConnId>, datagram: Option<SocketAddr>) {
        let expected = std::mem::take(&mut self.out);
        let expected_events = std::mem::take(&mut self.events);
        let mut outputs = Vec::new();
        while let Some(out) = self.server.poll_output() {
            outputs.push(out);
        }
        let mut readies = Vec::new();
        let mut answered = false;
        for out in &outputs {
            match *out {
                ServerOutput::Close { conn } => {
                    self.outcome.server_closes += 1;
                    if refusing == Some(conn) {
                        refusing = None;
                        self.outcome.refused += 1;
                    } else {
                        assert!(
                            self.held.remove(&conn),
                            "Close for {conn:?}, which the driver does not hold open"
                        );
                    }
                }
                ServerOutput::Datagram { to, message, .. } => {
                    let from = datagram.expect("a datagram output without a datagram");
                    let from = v4(from).expect("a datagram output to an IPv6 source");
                    assert_eq!((to, message), (SocketAddr::V4(from), Message::Seen(from)));
                    assert!(!answered, "two answers to one datagram");
                    answered = true;
                }
                ServerOutput::Send { conn, message } => {
                    assert!(
                        self.held.contains(&conn),
                        "{message:?} sent to {conn:?}, which is not open (closed or unknown)"
                    );
                    match message {
                        Frame::Short(Message::Ready(token)) => {
                            assert_eq!(token.is_some(), self.config.extensions());
                            self.issued.extend(token);
                            self.outcome.readies += 1;
                            readies.push(conn);
                        }
                        Frame::Short(Message::PeerInfo(_)) => self.outcome.peer_infos += 1,
                        Frame::Short(Message::Hint(_)) => self.outcome.hints += 1,
                        Frame::Short(Message::Seen(_)) => self.outcome.seens += 1,
                        Frame::Long(LongMessage::PeerNonce(_)) => self.outcome.peer_nonces += 1,
                        Frame::Long(LongMessage::Auth(_)) => self.outcome.auths_relayed += 1,
                        Frame::Long(LongMessage::Refused(_)) => self.outcome.refusals += 1,
                        Frame::Long(m) if m.command() == CMD_PEER_DATA => {
                            self.outcome.data_relayed += 1
                        }
                        other => panic!("server sent {other:?}"),
                    }
                }
            }
        }
        assert_eq!(refusing, None, "a refused connection got no Close");
        assert_eq!(
            outputs, expected,
            "the server's outputs (left) are not the model's (right)"
        );
        let mut events = Vec::new();
        while let Some(e) = self.server.poll_event() {
            events.push(e);
        }
        assert_eq!(
            events, expected_events,
            "the server's events (left) are not the model's (right)"
        );
        // READY goes to the two partners of one room, never across plain and keyed.
        match readies[..] {
            [] => {}
            [a, b] => {
                let room = |c: ConnId| {
                    let Seat::Paired(p) = self.conns[&c].seat else {
                        panic!("READY to {c:?}, which is not paired");
                    };
                    (p, self.pairs[&p].keyed, self.pairs[&p].ident)
                };
                assert_eq!(room(a), room(b), "READY to two conns of different rooms");
            }
            _ => panic!("READY to {readies:?} in one step"),
        }
    }

    /// Model-wide promises that hold between events.
    fn check(&mut self) {
        let now = self.now;
        let stats = self.server.stats();
        let known: BTreeSet<ConnId> = self.conns.keys().copied().collect();
        assert_eq!(
            known, self.held,
            "the model and the driver disagree on open connections"
        );
        assert_eq!(
            stats.connections,
            self.held.len(),
            "server and driver disagree on open connections"
        );
        assert!(stats.connections <= MAX_CONNECTIONS);
        for c in self.conns.values() {
            let same_ip = self.conns.values().filter(|o| o.ip == c.ip).count();
            assert!(same_ip <= MAX_PER_IP);
        }
        assert_eq!(stats.waiting, self.waiting.len(), "waiting");
        assert_eq!(stats.pairing, self.pairs.len(), "pairing");
        assert_eq!(stats.completed, self.completed, "first rounds completed");
        assert_eq!(stats.probes, self.probes, "probes answered");
        assert_eq!(stats.probes_limited, 0, "probes limited");
        assert_eq!(stats.ignored_datagrams, self.ignored, "datagrams ignored");
        self.outcome.completed = stats.completed;
        // A keyed pair learns addresses only after both sides proved the key.
        for pair in self.pairs.values() {
            if pair.keyed && pair.completed > 0 {
                assert!(pair.sides.iter().all(|s| s.verified));
            }
        }
        let expected_timeout = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.pairs.values().map(|p| p.deadline))
            .min();
        let timeout = self.server.poll_timeout();
        assert_eq!(
            timeout, expected_timeout,
            "poll_timeout is not the earliest deadline"
        );
        assert!(
            timeout.is_none_or(|t| t > now),
            "a deadline was left in the past"
        );
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
        w.bool(self.private);
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
        const N: u32 = 7;
        match self {
            Self::Hello(id) => {
                w.variant(0, N);
                id.encode(w);
            }
            Self::SplitHello { ident, at } => {
                w.variant(1, N);
                ident.encode(w);
                w.u8(*at);
            }
            Self::Bytes8(b) => {
                w.variant(2, N);
                w.bytes(b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
            Self::Frame(f) => {
                w.variant(4, N);
                f.encode(w);
            }
            Self::Frames(a, b) => {
                w.variant(5, N);
                a.encode(w);
                b.encode(w);
            }
            Self::SplitFrame { frame, at } => {
                w.variant(6, N);
                frame.encode(w);
                w.u8(*at);
            }
        }
    }
}

impl Encode for FrameChoice {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 7;
        match *self {
            Self::Hello(id) => {
                w.variant(0, N);
                id.encode(w);
            }
            Self::KeyedHello { room, nonce, proof } => {
                w.variant(1, N);
                room.encode(w);
                w.u8(nonce);
                w.bool(proof);
            }
            Self::Auth(m) => {
                w.variant(2, N);
                w.u8(m);
            }
            Self::Verified => w.variant(3, N),
            Self::AuthFailed => w.variant(4, N),
            Self::PeerData(fill) => {
                w.variant(5, N);
                w.u8(fill);
            }
            Self::Garbage(g) => {
                w.variant(6, N);
                w.u8(g);
            }
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
