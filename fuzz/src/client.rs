//! The `client` target: arbitrary configurations (both strategies), server bytes, connect
//! results, datagrams on any slot from any address (punches, ACKs, CONFIRMs, probe replies,
//! garbage), closes and time, applied to [`Client`] through a well-behaved driver model.
//!
//! The driver only reports what a real one could: a connect result after `Connect`, stream
//! events while connected, datagrams while a window is open (on any slot, in range or not),
//! timers at or after their deadline. After every step it checks:
//! - `Client::new` refuses exactly the invalid configurations;
//! - commands make sense for the driver (one `Connect` per fresh round or re-HELLO, writes and
//!   `Disconnect` only while connected, one HELLO per connection, windows of `window_slots`
//!   consecutive ports that never pass 65535 followed by `probe_slots` ephemeral ones, a new
//!   window only once the old connection is gone); undecodable server bytes end the connection;
//! - every transmit uses an open slot: EXCHANGEs go to the server from a window slot after
//!   READY, with the round's token; PROBEs to the probe port from a probe slot; PUNCHes from a
//!   window slot to the round's target; and the answers to the peer exactly as the model of
//!   the confirmed WIN says (below);
//! - the peer's datagrams are judged as the model judges them (keyless: PUNCH, ACK and
//!   CONFIRM carrying our identifier, from an acceptable source, with the peer known from this
//!   round's PEERINFO or, while a session round waits for it, the session's last one; PUNCHes
//!   before that are kept, the first per source IP for [`EARLY_PUNCH_SOURCES`] IPs, and judged
//!   at PEERINFO):
//!   - a PUNCH wins the v1 way (WIN, then the acknowledgement burst: `ack_count` PUNCHes for a
//!     v1 round, 3 for a predicted one) unless the client is *confirming* (an extended READY
//!     and a SEEN that orders the two public addresses); then it is ACKed on its pair (once per
//!     pair, 16 pairs per round), and the round's first one arms the v1 fallback (unless a
//!     HINT, ACK or CONFIRM showed the peer is ours): WIN the v1 way on it at
//!     `max(2·RTT, 100 ms)` if still punching;
//!   - an ACK or CONFIRM shows the peer is ours (disarms the fallback); an ACK to the leader
//!     (the lower public address) or a CONFIRM to the other side wins at once on its pair: the
//!     leader sends 3 CONFIRMs there, then both leave (`Disconnect`, `Finished`) in that step;
//!   - every WIN the model expects happens, and no other;
//! - rounds are numbered 1, 2, …; each ends in at most one of WIN or LOSE; `max_rounds` is
//!   respected; the server closing the connection ≥ 1 s after HELLO while READY is awaited is a
//!   re-HELLO (same round, a new connection), earlier a LOSE; a REFUSED from the server ends
//!   the client;
//! - `poll_timeout()` is never in the past, fires finitely often at one instant, and the
//!   client is never stuck (no timer and nothing pending on the network) unless finished;
//! - once finished, nothing more comes out, whatever goes in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use n4_core::{
    Client, ClientConfig, Command, Event, Frame, FrameDecoder, Hint, LongMessage, LoseReason,
    Message, RefuseReason, Strategy, Token, Transmit, EARLY_PUNCH_SOURCES,
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

// The client's documented numbers the model restates (private constants of `n4-core`).
/// Pairs a client ACKs per round at most.
const MAX_ACKED: usize = 16;
/// CONFIRMs the leader sends on the chosen pair.
const CONFIRMS: u16 = 3;
/// Acknowledgements of a predicted (extended) round's WIN, and their spacing.
const EXT_ACKS: u16 = 3;
const EXT_ACK_INTERVAL: Duration = Duration::from_millis(100);
/// The v1 fallback waits `max(2·RTT, this)`; RTT is 100 ms until one was measured.
const V1_FALLBACK_MIN: Duration = Duration::from_millis(100);
const DEFAULT_RTT: Duration = Duration::from_millis(100);
/// A server close this long after HELLO, while READY is awaited, is a re-HELLO.
const REHELLO_AFTER: Duration = Duration::from_secs(1);

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
    /// REFUSED (a private server's answer), with this reason byte.
    Refused(u8),
    /// A keyed handshake message a keyless client never expects: PEER-NONCE, AUTH, VERIFIED
    /// or AUTH-FAILED (`kind % 4`), payload bytes all `fill`.
    Keyed {
        /// Which message.
        kind: u8,
        /// Payload byte.
        fill: u8,
    },
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
    /// An ACK with the client's identifier (what a peer of ours sends for our PUNCH).
    Ack,
    /// A CONFIRM with the client's identifier (what a leading peer of ours sends).
    Confirm,
    /// An ACK with an identifier from [`crate::IDENTS`].
    AckWith(u8),
    /// A CONFIRM with an identifier from [`crate::IDENTS`].
    ConfirmWith(u8),
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
    /// WINs confirmed by an ACK (as the leader) or a CONFIRM (as the other side).
    pub confirmed_wins: u32,
    /// Confirmed WINs as the leader (CONFIRMs sent).
    pub led_wins: u32,
    /// WINs of the v1 fallback (no ACK came for a PUNCH we ACKed).
    pub fallback_wins: u32,
    /// ACKs sent.
    pub acks: u32,
    /// Re-HELLOs.
    pub rehellos: u32,
    /// Rounds that used the extension.
    pub extended_rounds: u32,
    /// The server refused the client.
    pub refused: bool,
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
        // Keyless: the model speaks v1's wire (PUNCH, ACK, CONFIRM with the identifier).
        key: None,
        ..ClientConfig::default()
    }
}

/// What a keyless client makes of a datagram from its peer's side: our identifier in a
/// PUNCH, ACK or CONFIRM, exactly those 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Says {
    Punch,
    Ack,
    Confirm,
}

fn says(config: &ClientConfig, bytes: &[u8]) -> Option<Says> {
    let id = config.ident;
    [
        (Message::Punch(id), Says::Punch),
        (Message::Ack(id), Says::Ack),
        (Message::Confirm(id), Says::Confirm),
    ]
    .into_iter()
    .find(|(m, _)| m.to_bytes()[..] == *bytes)
    .map(|(_, s)| s)
}

/// Whether the client must refuse to punch `peer` as a server named it: port 0, or no host on
/// the Internet (0.0.0.0/8, broadcast, multicast, 240.0.0.0/4), or loopback while the server
/// is not on this machine.
fn refused(config: &ClientConfig, peer: SocketAddrV4) -> bool {
    let ip = *peer.ip();
    let first = ip.octets()[0];
    peer.port() == 0
        || first == 0
        || ip == Ipv4Addr::BROADCAST
        || (224..240).contains(&first)
        || first >= 240
        || (first == 127 && !config.server.ip().is_loopback())
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
        hello_sent: None,
        decoder: FrameDecoder::default(),
        own_public: None,
        peer_ours: false,
        rehello_pending: false,
        rounds: Vec::new(),
        session_peer: None,
        session_hinted: false,
        expect: Expect::default(),
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
    /// Whole frames the server's bytes completed.
    said: Vec<Frame>,
    /// The server's bytes did not decode (the client must drop the connection).
    garbage: bool,
    /// The step reported a failed connect.
    connect_failed: bool,
}

/// How a WIN comes about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WinKind {
    /// The v1 way: on a PUNCH (or the fallback), then the acknowledgement burst.
    V1,
    /// Confirmed by the peer's ACK: we lead, and send the CONFIRMs.
    Lead,
    /// Confirmed by the leader's CONFIRM.
    Follow,
}

/// A WIN the model expects in the current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExpectedWin {
    slot: usize,
    peer: SocketAddr,
    kind: WinKind,
    /// The v1 fallback fired.
    fallback: bool,
}

/// A datagram to the peer the model expects, in order, at the end of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reply {
    slot: usize,
    to: SocketAddr,
    bytes: [u8; 8],
}

/// What the model expects of the current step beyond the plain rules.
#[derive(Debug, Default)]
struct Expect {
    win: Option<ExpectedWin>,
    /// The answers to the peer that end the step's transmits.
    replies: Vec<Reply>,
    /// The step is a `handle_timeout` call.
    timeout_step: bool,
    /// A server close that must be a re-HELLO (`Some(true)`) or not (`Some(false)`).
    rehello: Option<bool>,
    /// A WIN happened in this step (kind).
    won: Option<WinKind>,
    /// `Finished` came in this step.
    finished: bool,
    /// `PeerRefused` came in this step: the round's LOSE must follow.
    peer_refused: bool,
    /// The wait for READY is over (`round_timeout` after HELLO, in a retry round or with
    /// `max_rounds`): LOSE no-partner is due.
    no_partner: bool,
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
    /// PUNCHes kept before PEERINFO: the first per source IP, [`EARLY_PUNCH_SOURCES`] IPs.
    early: Vec<(usize, SocketAddr)>,
    /// Pairs ACKed this round.
    acked: Vec<(usize, SocketAddr)>,
    /// The first genuine PUNCH of the round (confirming).
    first_punch: Option<(usize, SocketAddr)>,
    /// The v1 fallback's deadline.
    fallback: Option<Instant>,
    won: Option<(usize, SocketAddr, Strategy, WinKind)>,
    /// Acknowledgement-burst PUNCHes sent after WIN.
    acks: u16,
    /// CONFIRMs sent after WIN.
    confirms: u16,
    lost: bool,
}

impl RoundModel {
    fn extended(&self) -> bool {
        matches!(self.token, Some(Some(_)))
    }

    fn predicted(&self) -> bool {
        self.extended() && self.hint.is_some()
    }
}

/// The client's phase as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connecting, or waiting for READY.
    AwaitReady,
    AwaitPeerInfo,
    Punching(SocketAddrV4),
    /// A round lost, or a re-HELLO pending: nothing is judged.
    Between,
    Won,
    Done,
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
    /// When HELLO went out on the current connection.
    hello_sent: Option<Instant>,
    decoder: FrameDecoder,
    /// Per connection: our public address from the last SEEN.
    own_public: Option<SocketAddrV4>,
    /// Per connection: a HINT, ACK or CONFIRM showed the peer is ours.
    peer_ours: bool,
    /// The server ended our wait; a new connection (same round) comes.
    rehello_pending: bool,
    /// Round `n` is `rounds[n - 1]`, created by its `RoundStarted` event.
    rounds: Vec<RoundModel>,
    /// The peer as the last PEERINFO of this extended session named it.
    session_peer: Option<SocketAddrV4>,
    /// The peer gave a HINT in some round of this session.
    session_hinted: bool,
    expect: Expect,
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

    fn phase(&self) -> Phase {
        if self.finished {
            return Phase::Done;
        }
        let Some(r) = self.rounds.last() else {
            return Phase::Done;
        };
        if r.won.is_some() {
            Phase::Won
        } else if r.lost || self.rehello_pending {
            Phase::Between
        } else if r.token.is_none() {
            Phase::AwaitReady
        } else if let (Some(peer), Some(_)) = (r.peer, r.target) {
            Phase::Punching(peer)
        } else {
            Phase::AwaitPeerInfo
        }
    }

    /// Whether we lead the confirmation with `peer` (keyless: the lower public address, ours
    /// from the last SEEN); `None` when that cannot be told.
    fn leads(&self, peer: SocketAddrV4) -> Option<bool> {
        let me = self.own_public?;
        let key = |a: SocketAddrV4| (a.ip().octets(), a.port());
        (me != peer).then(|| key(me) < key(peer))
    }

    fn expect_win(&mut self, slot: usize, peer: SocketAddr, kind: WinKind, fallback: bool) {
        assert!(
            self.expect.win.is_none(),
            "model: a second WIN expected in one step"
        );
        self.expect.win = Some(ExpectedWin {
            slot,
            peer,
            kind,
            fallback,
        });
    }

    /// A genuine PUNCH from an acceptable source while the peer is known: the v1 WIN, or
    /// (confirming) an ACK on its pair and maybe the v1 fallback's timer.
    fn on_genuine_punch(&mut self, peer: SocketAddrV4, slot: usize, from: SocketAddr) {
        let extended = self.rounds.last().is_some_and(RoundModel::extended);
        if !(extended && self.leads(peer).is_some()) {
            self.expect_win(slot, from, WinKind::V1, false);
            return;
        }
        let arm = !self.peer_ours && matches!(self.phase(), Phase::Punching(_));
        let rtt = self.client.predictor().rtt().unwrap_or(DEFAULT_RTT);
        let fallback = self.now + rtt.saturating_mul(2).max(V1_FALLBACK_MIN);
        let ident = self.config.ident;
        let r = self.rounds.last_mut().expect("a round has started");
        if r.acked.len() < MAX_ACKED && !r.acked.contains(&(slot, from)) {
            r.acked.push((slot, from));
            self.expect.replies.push(Reply {
                slot,
                to: from,
                bytes: Message::Ack(ident).to_bytes(),
            });
        }
        if r.first_punch.is_none() {
            r.first_punch = Some((slot, from));
            if arm {
                r.fallback = Some(fallback);
            }
        }
    }

    /// A genuine ACK or CONFIRM from an acceptable source while the peer is known.
    fn on_genuine_answer(&mut self, peer: SocketAddrV4, slot: usize, from: SocketAddr, s: Says) {
        self.peer_ours = true;
        self.round().fallback = None;
        match (self.leads(peer), s) {
            (Some(true), Says::Ack) => self.expect_win(slot, from, WinKind::Lead, false),
            (Some(false), Says::Confirm) => self.expect_win(slot, from, WinKind::Follow, false),
            _ => {}
        }
    }

    /// What the client must make of a datagram about to be delivered on `slot`.
    fn judge_datagram(&mut self, slot: usize, from: SocketAddr, bytes: &[u8]) {
        if slot >= self.window_slots {
            return; // a probe slot (or none): only probe answers count there
        }
        let Some(s) = says(&self.config, bytes) else {
            return;
        };
        let phase = self.phase();
        let peer = match phase {
            Phase::Punching(peer) => Some(peer),
            Phase::AwaitPeerInfo => self.session_peer,
            _ => None,
        };
        let Some(peer) = peer else {
            if s == Says::Punch && matches!(phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                let r = self.round();
                if r.early.len() < EARLY_PUNCH_SOURCES
                    && !r.early.iter().any(|(_, f)| f.ip() == from.ip())
                {
                    r.early.push((slot, from));
                }
            }
            return;
        };
        if !self.acceptable(peer, from) {
            return;
        }
        match s {
            Says::Punch => self.on_genuine_punch(peer, slot, from),
            Says::Ack | Says::Confirm => self.on_genuine_answer(peer, slot, from, s),
        }
    }

    /// Before `handle_timeout(now)`: the v1 fallback fires if due.
    fn before_timeout(&mut self) {
        self.expect.timeout_step = true;
        let now = self.now;
        let phase = self.phase();
        let bounded = self.rounds.len() > 1 || self.config.max_rounds.is_some();
        if phase == Phase::AwaitReady
            && self.connected
            && bounded
            && self
                .hello_sent
                .is_some_and(|t| t + self.config.round_timeout <= now)
        {
            self.expect.no_partner = true;
        }
        let Some(r) = self.rounds.last_mut() else {
            return;
        };
        if r.fallback.is_some_and(|t| t <= now) {
            r.fallback = None;
            if let (Phase::Punching(_), Some((slot, from))) = (phase, r.first_punch) {
                self.expect_win(slot, from, WinKind::V1, true);
            }
        }
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
                self.hello_sent = None;
                self.decoder = FrameDecoder::default();
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
                let short = |m: Message| m.to_bytes().to_vec();
                let bytes = match *data {
                    StreamData::Ready(t) => short(Message::Ready(t.map(Token))),
                    StreamData::PeerInfo { ip: i, port } => {
                        short(Message::PeerInfo(SocketAddrV4::new(ip(i), port)))
                    }
                    StreamData::Seen { ip: i, port } => {
                        short(Message::Seen(SocketAddrV4::new(ip(i), port)))
                    }
                    StreamData::Hint(h) => short(Message::Hint(Hint(h))),
                    StreamData::Bytes8(b) => b.to_vec(),
                    StreamData::Raw(ref b) => b.clone(),
                    StreamData::Refused(b) => {
                        let why = match b {
                            1 => RefuseReason::WrongKey,
                            2 => RefuseReason::KeyRequired,
                            b => RefuseReason::Other(b),
                        };
                        LongMessage::Refused(why).to_bytes().to_vec()
                    }
                    StreamData::Keyed { kind, fill } => match kind % 4 {
                        0 => LongMessage::PeerNonce([fill; 16]),
                        1 => LongMessage::Auth([fill; 16]),
                        2 => LongMessage::Verified,
                        _ => LongMessage::AuthFailed,
                    }
                    .to_bytes()
                    .to_vec(),
                };
                let mut input = &bytes[..];
                while let Some(frame) = self.decoder.next(&mut input) {
                    match frame {
                        Ok(f) => step.said.push(f),
                        Err(_) => {
                            step.garbage = true;
                            break;
                        }
                    }
                }
                self.client.handle_stream_data(now, &bytes);
            }
            Operation::StreamClosed => {
                if !self.connected {
                    return;
                }
                self.connected = false;
                if self.phase() == Phase::AwaitReady {
                    let waited = self
                        .hello_sent
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                    self.expect.rehello = Some(waited >= REHELLO_AFTER);
                }
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
                let id = self.config.ident;
                let bytes = match *data {
                    DatagramData::Punch => Message::Punch(id).to_bytes().to_vec(),
                    DatagramData::PunchWith(i) => Message::Punch(ident(i)).to_bytes().to_vec(),
                    DatagramData::Ack => Message::Ack(id).to_bytes().to_vec(),
                    DatagramData::AckWith(i) => Message::Ack(ident(i)).to_bytes().to_vec(),
                    DatagramData::Confirm => Message::Confirm(id).to_bytes().to_vec(),
                    DatagramData::ConfirmWith(i) => Message::Confirm(ident(i)).to_bytes().to_vec(),
                    DatagramData::ProbeReply { port } => {
                        from = self.config.probe_server().into();
                        Message::Seen(SocketAddrV4::new(PEER_IPS[1], port))
                            .to_bytes()
                            .to_vec()
                    }
                    DatagramData::Bytes8(b) => b.to_vec(),
                    DatagramData::Raw(ref b) => b.clone(),
                };
                self.judge_datagram(slot, from, &bytes);
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
                    self.before_timeout();
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
            self.before_timeout();
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
        for e in events {
            self.on_event(e, &step);
        }
        self.check_transmits(&transmits, first_round, won_before);
        let expect = std::mem::take(&mut self.expect);
        assert_eq!(expect.win, None, "a due WIN did not happen");
        assert!(
            !expect.peer_refused,
            "a refused peer address did not end the round"
        );
        assert!(
            !expect.no_partner,
            "the wait for READY outlived round_timeout (retry round or max_rounds)"
        );
        assert_ne!(
            expect.rehello,
            Some(true),
            "the server ended a long wait for READY but no re-HELLO"
        );
        if matches!(expect.won, Some(WinKind::Lead | WinKind::Follow)) {
            assert!(expect.finished, "a confirmed WIN did not finish at once");
            assert!(
                !self.connected,
                "a confirmed WIN kept the server connection"
            );
        }
        if expect.finished {
            self.check_finished();
        }
        if step.garbage {
            assert!(!self.connected, "undecodable server bytes, connection kept");
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
                // A new server connection: what the last one told is forgotten.
                self.own_public = None;
                self.peer_ours = false;
                self.rehello_pending = false;
            }
            Command::Send(f) => {
                assert!(self.connected, "Send({f:?}) while not connected");
                assert_eq!(
                    f,
                    Frame::Short(Message::Hello(self.config.ident)),
                    "client sent {f:?}"
                );
                assert!(self.hello_sent.is_none(), "second HELLO on one connection");
                self.hello_sent = Some(self.now);
            }
            Command::Disconnect => {
                assert!(self.connected, "Disconnect while not connected");
                self.connected = false;
            }
        }
    }

    fn on_event(&mut self, e: Event, step: &Step) {
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
            Event::HelloSent => assert!(self.hello_sent.is_some()),
            Event::Ready { extended } => {
                let Some(Frame::Short(Message::Ready(token))) = step
                    .said
                    .iter()
                    .copied()
                    .find(|m| matches!(m, Frame::Short(Message::Ready(_))))
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
                assert!(self.round().extended(), "a v1 round planned");
                assert!(
                    usize::from(window) <= self.window_slots,
                    "plan wider than the window"
                );
            }
            Event::PeerHint(h) => {
                assert!(step.said.contains(&Frame::Short(Message::Hint(h))));
                let r = self.round();
                assert!(r.extended(), "HINT used by v1");
                r.hint = Some(h);
                self.session_hinted = true;
                // Only a partner of ours has a hint relayed: even "none" says so.
                self.peer_ours = true;
            }
            Event::ExchangeSent => assert!(self.round().token.is_some()),
            Event::Seen(addr) => {
                assert!(step.said.contains(&Frame::Short(Message::Seen(addr))));
                assert!(self.round().extended(), "SEEN used by v1");
                self.own_public = Some(addr);
            }
            Event::PeerInfo { peer, target } => self.on_peer_info(peer, target, step),
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
            } => self.on_win(round, slot, peer, strategy),
            Event::Lose { round, reason } => {
                assert_eq!(round as usize, self.rounds.len());
                assert_eq!(
                    reason == LoseReason::BadPeerAddress,
                    std::mem::take(&mut self.expect.peer_refused),
                    "a refused peer address and the round's end disagree"
                );
                assert_eq!(
                    reason == LoseReason::NoPartner,
                    std::mem::take(&mut self.expect.no_partner),
                    "LOSE {reason:?}, but the wait for READY was (not) over"
                );
                let r = self.round();
                assert!(r.won.is_none(), "LOSE after WIN");
                assert!(!r.lost, "two LOSEs in a round");
                if reason == LoseReason::TargetOutOfRange {
                    assert!(r.peer.is_some() && r.target.is_none());
                }
                if matches!(reason, LoseReason::AuthFailed | LoseReason::BadPeerAddress) {
                    assert!(r.peer.is_none(), "{reason:?} after PEERINFO");
                }
                assert_ne!(
                    reason,
                    LoseReason::AuthFailed,
                    "a keyless client lost on auth"
                );
                r.lost = true;
                self.outcome.losses += 1;
            }
            Event::Finished => {
                assert!(
                    self.rounds.last().is_some_and(|r| r.won.is_some()),
                    "Finished without WIN"
                );
                self.expect.finished = true;
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
                assert!(step.said.contains(&Frame::Short(Message::PeerInfo(peer))));
                assert!(
                    refused(&self.config, peer),
                    "refused a good peer address {peer}"
                );
                assert!(self.round().token.is_some(), "PEERINFO before READY");
                self.expect.peer_refused = true;
            }
            Event::BudgetExhausted { .. } => panic!("the model's budget is unbounded"),
            Event::Rehello => {
                assert_eq!(
                    self.expect.rehello.take(),
                    Some(true),
                    "re-HELLO without a server close ≥ 1 s after HELLO while awaiting READY"
                );
                assert!(!self.connected, "HELLO again while connected");
                assert!(self.round().token.is_none(), "HELLO again after READY");
                self.rehello_pending = true;
                self.outcome.rehellos += 1;
            }
            Event::Refused(why) => {
                assert!(
                    step.said.contains(&Frame::Long(LongMessage::Refused(why))),
                    "Refused({why:?}) the server never said"
                );
                self.finished = true;
                self.outcome.finished = true;
                self.outcome.refused = true;
            }
            Event::PeerAuthenticated | Event::PeerAuthFailed | Event::NeedsOurServer => {
                panic!("a keyless client reported {e:?}")
            }
            Event::ServerUnreachable => {
                assert!(
                    step.connect_failed,
                    "ServerUnreachable without a failed connect"
                );
                self.finished = true;
                self.outcome.finished = true;
            }
            // Newer keyed events (a partner's data…) never reach a keyless client either.
            #[allow(unreachable_patterns)]
            other => panic!("a keyless client reported {other:?}"),
        }
    }

    fn on_peer_info(&mut self, peer: SocketAddrV4, target: Option<SocketAddrV4>, step: &Step) {
        assert!(step.said.contains(&Frame::Short(Message::PeerInfo(peer))));
        assert!(
            !refused(&self.config, peer),
            "punching {peer}, which is no host to punch"
        );
        // The peer's hint, else v1's offset, fixes the aim; a predicting client without a
        // hint (against a v1 server) may sweep, but aims at the peer's IP.
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
            target.is_none_or(|t| t.ip() == peer.ip() && t.port() != 0),
            "aim at another IP or at port 0"
        );
        let r = self.round();
        assert!(r.token.is_some(), "PEERINFO before READY");
        assert!(r.peer.is_none(), "two PEERINFOs in a round");
        r.peer = Some(peer);
        r.target = target;
        if target.is_none() {
            return;
        }
        if r.extended() {
            self.session_peer = Some(peer);
        }
        // The punches kept from before PEERINFO are judged now, in order, until one wins.
        let early = std::mem::take(&mut self.round().early);
        for (slot, from) in early {
            if self.expect.win.is_some() {
                break;
            }
            if self.acceptable(peer, from) {
                self.on_genuine_punch(peer, slot, from);
            }
        }
    }

    fn on_win(&mut self, round: u32, slot: usize, peer: SocketAddr, strategy: Strategy) {
        let Some(expected) = self.expect.win.take() else {
            panic!("WIN on slot {slot} from {peer} that nothing called for");
        };
        assert_eq!(
            (slot, peer),
            (expected.slot, expected.peer),
            "WIN on another pair than the model's {expected:?}"
        );
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
        // A late punch of an aimed earlier round of the session counts as aimed.
        let session_hinted = r.extended() && session_hinted;
        let predicted = r.predicted() || session_hinted;
        let expected_strategy = if predicted {
            Strategy::Predict
        } else {
            Strategy::V1
        };
        assert_eq!(strategy, expected_strategy, "WIN names the wrong strategy");
        r.won = Some((slot, peer, strategy, expected.kind));
        self.expect.won = Some(expected.kind);
        let ident = self.config.ident;
        match expected.kind {
            WinKind::V1 => {
                let (total, interval) = if predicted {
                    (EXT_ACKS, EXT_ACK_INTERVAL)
                } else {
                    (self.config.ack_count, self.config.ack_interval)
                };
                // The first acknowledgement goes at once; with no interval, a timer step
                // also sends the next (its deadline is due in the same call).
                let now = match total {
                    0 => 0,
                    _ if self.expect.timeout_step && interval.is_zero() => total.min(2),
                    _ => 1,
                };
                for _ in 0..now {
                    self.expect.replies.push(Reply {
                        slot,
                        to: peer,
                        bytes: Message::Punch(ident).to_bytes(),
                    });
                }
            }
            WinKind::Lead => {
                for _ in 0..CONFIRMS {
                    self.expect.replies.push(Reply {
                        slot,
                        to: peer,
                        bytes: Message::Confirm(ident).to_bytes(),
                    });
                }
            }
            WinKind::Follow => {}
        }
        self.outcome.wins += 1;
        self.outcome.predicted_wins += u32::from(strategy == Strategy::Predict);
        self.outcome.confirmed_wins += u32::from(expected.kind != WinKind::V1);
        self.outcome.led_wins += u32::from(expected.kind == WinKind::Lead);
        self.outcome.fallback_wins += u32::from(expected.fallback);
    }

    /// `Finished` came: the WIN's answers are all out.
    fn check_finished(&mut self) {
        let ack_count = self.config.ack_count;
        let r = self.round();
        let Some((_, _, strategy, kind)) = r.won else {
            panic!("Finished without WIN");
        };
        match kind {
            WinKind::V1 => {
                let total = match strategy {
                    Strategy::Predict => EXT_ACKS,
                    Strategy::V1 => ack_count,
                };
                assert_eq!(r.acks, total, "acknowledgements sent");
                assert_eq!(r.confirms, 0);
            }
            WinKind::Lead => assert_eq!((r.acks, r.confirms), (0, CONFIRMS), "CONFIRMs sent"),
            WinKind::Follow => assert_eq!((r.acks, r.confirms), (0, 0), "a follower answered"),
        }
    }

    /// Every transmit of one step: on an open slot, of a kind the step's rounds allow, ending
    /// with exactly the answers to the peer the model expects. After a v1 WIN only the
    /// acknowledgement burst follows.
    fn check_transmits(&mut self, transmits: &[Transmit], first_round: usize, won_before: bool) {
        let replies = std::mem::take(&mut self.expect.replies);
        if transmits.is_empty() && replies.is_empty() {
            return;
        }
        let window_len = self.window.as_ref().expect("transmit with no window").len();
        let ident = self.config.ident;
        let punch = Message::Punch(ident).to_bytes();
        let confirm = Message::Confirm(ident).to_bytes();
        let ack = Message::Ack(ident).to_bytes();
        let server = SocketAddr::from(self.config.server);
        let probe_server = SocketAddr::from(self.config.probe_server());
        if won_before {
            assert!(replies.is_empty(), "model: answers expected after WIN");
            let ack_count = self.config.ack_count;
            let r = self.round();
            let Some((slot, peer, strategy, kind)) = r.won else {
                unreachable!("won before");
            };
            for t in transmits {
                assert_eq!(kind, WinKind::V1, "sent {t:?} after a confirmed WIN");
                assert_eq!(t.payload, punch, "after WIN the client sent {t:?}");
                assert_eq!(
                    (t.slot, t.destination),
                    (slot, peer),
                    "acknowledgement misdirected"
                );
                r.acks += 1;
                let total = match strategy {
                    Strategy::Predict => EXT_ACKS,
                    Strategy::V1 => ack_count,
                };
                assert!(r.acks <= total, "more acknowledgements than due");
            }
            return;
        }
        assert!(
            transmits.len() >= replies.len(),
            "expected the answers {replies:?}, the client sent {transmits:?}"
        );
        let (others, answers) = transmits.split_at(transmits.len() - replies.len());
        for (t, e) in answers.iter().zip(&replies) {
            assert_eq!(
                (t.slot, t.destination, &t.payload[..]),
                (e.slot, e.to, &e.bytes[..]),
                "expected the answers {replies:?} to end {transmits:?}"
            );
            if e.bytes == punch {
                self.round().acks += 1;
            } else if e.bytes == confirm {
                self.round().confirms += 1;
            } else if e.bytes == ack {
                self.outcome.acks += 1;
            }
        }
        let rounds = &self.rounds[first_round..];
        for t in others {
            assert!(
                t.slot < window_len,
                "transmit on slot {} of {}",
                t.slot,
                window_len
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
                _ => panic!("client sent {t:?} (answers expected: {replies:?})"),
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
        const N: u32 = 8;
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
            Self::Refused(b) => {
                w.variant(6, N);
                w.u8(b);
            }
            Self::Keyed { kind, fill } => {
                w.variant(7, N);
                w.u8(kind);
                w.u8(fill);
            }
        }
    }
}

impl Encode for DatagramData {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 9;
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
            Self::Ack => w.variant(5, N),
            Self::Confirm => w.variant(6, N),
            Self::AckWith(i) => {
                w.variant(7, N);
                w.u8(i);
            }
            Self::ConfirmWith(i) => {
                w.variant(8, N);
                w.u8(i);
            }
        }
    }
}
