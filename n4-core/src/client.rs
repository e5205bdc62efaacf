//! The punching client: rounds of HELLO → READY → EXCHANGE → PEERINFO → PUNCH until a PUNCH from
//! the peer arrives.
//!
//! Two strategies share the machine:
//! - [`Strategy::V1`]: exactly the original. A round opens a window of `count` local ports,
//!   connects, says HELLO, sends EXCHANGE ×3 from slot 0, punches `peer_port + offset` from every
//!   slot (5 passes) and waits `round_timeout` (10 s); a lost round shifts the window by `count`
//!   and starts over with a new TCP connection.
//! - [`Strategy::Predict`] (default): the same round, plus our extension when the server offers
//!   it. Before READY it probes the server's probe port from a few fresh sockets to learn its own
//!   NAT's step, direction, allocation rate and RTT ([`PortPredictor`]); its EXCHANGE carries a
//!   [`Hint`] telling the peer where to aim; the window it punches from is sized to its own
//!   uncertainty; lost rounds are re-run inside the same TCP session after a few RTTs, reusing
//!   the window. Whenever the server or the peer is v1, it speaks v1 to them; against a v1
//!   server it still sweeps its aim over the rounds instead of v1's fixed offset.
//!
//! Against a v1 peer, WIN is reported as soon as its PUNCH arrives and the acknowledgement
//! burst goes on as timed transmits. Between two clients of ours WIN is confirmed: a PUNCH is
//! answered by an ACK on the same pair, the leader wins on the first pair an ACK proves and
//! names it with CONFIRM, the other side wins on the CONFIRM (see docs/PROTOCOL.md).
//!
//! Sans-IO contract: after every `handle_*` call, drain [`Client::poll_command`] first (it opens
//! the window and the TCP connection the transmits need), then [`Client::poll_transmit`] and
//! [`Client::poll_event`]; call [`Client::handle_timeout`] at [`Client::poll_timeout`]. `now`
//! must never go backwards. The client never reads a clock, binds a socket or draws randomness.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::aim::{AimInput, PunchPlan, Strategy};
use crate::codec::{
    Frame, FrameDecoder, Hint, Ident, LongMessage, Message, Nonce, Payload, RefuseReason, Side,
    Token,
};
use crate::key::Key;
use crate::prediction::{NatBehaviour, Plan, PortPredictor};
use crate::session::{Handshake, PeerSays, Wire};
use crate::timer::{Timer, TimerTable};

/// Client settings. `Default` gives the original's values, written in each field's doc.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Session identifier (`-a`, default `n4n4n4`).
    pub ident: Ident,
    /// Server address; EXCHANGE goes to this UDP port, the TCP leg to the same port (`-h`, `-p`).
    /// Probes go to the next port up.
    pub server: SocketAddrV4,
    /// First local source port of the first window (`-b`, default 30000); 0 = ephemeral ports.
    pub port_start: u16,
    /// Number of local port slots per v1 round (`-n`, default 25).
    pub port_count: u16,
    /// Predicted peer port = observed peer port + this (`-o`, default 20), unless the peer
    /// gives a hint.
    pub peer_port_offset: i32,
    /// Accept a PUNCH from any IP, not only the one the server gave (`-x`, default off).
    pub accept_any_ip: bool,
    /// How long a v1 round waits for the peer's PUNCH (and for PEERINFO after READY). Default 10 s.
    pub round_timeout: Duration,
    /// Passes of PUNCH over the whole window in a v1 round. Default 5.
    pub punch_passes: u16,
    /// EXCHANGE datagrams sent per v1 round. Default 3.
    pub exchange_count: u16,
    /// Acknowledgement burst after WIN: this many PUNCHes back to the peer. Default 10.
    pub ack_count: u16,
    /// Spacing of the acknowledgement burst. Default 200 ms.
    pub ack_interval: Duration,
    /// Give up after this many rounds; `None` tries forever, like the original. Default `None`.
    pub max_rounds: Option<u32>,
    /// Wait before the next round when the server closed the connection early. Default 1 s.
    pub retry_delay: Duration,
    /// How to aim. Default [`Strategy::Predict`].
    pub strategy: Strategy,
    /// Predict: probes of the server's probe port per fresh round. Default 6.
    pub probes: u16,
    /// Predict: spacing of the probes. Default 20 ms.
    pub probe_interval: Duration,
    /// Predict: window slots opened (an adaptive part of them punches). Default 64.
    pub max_window: u16,
    /// Datagrams to peers (PUNCHes and acknowledgements) one client may send per minute.
    /// Default 3,000. It bounds what a lying server can make us send at an address of its
    /// choosing; a round that needs more than the rest of the minute's budget waits for the
    /// next minute. Never less than two whole v1 rounds (`2 · (passes · slots + acks)`), so a
    /// large `-n` still punches.
    pub punch_budget: u32,
    /// The shared key of a keyed session (`--key-file`, `N4_KEY`); `None`: keyless, v1's wire.
    /// With a key the client pairs only with a partner holding it, through a server of ours.
    pub key: Option<Key>,
    /// Seed of the client's CSPRNG, which draws the handshake nonces. Default all zeros;
    /// real clients pass an unpredictable seed.
    pub rng_seed: [u8; 32],
    /// Keyed: 32 bytes to hand the authenticated partner (our WireGuard public key); the
    /// partner's arrive as [`Event::PeerData`]. Default `None`.
    pub peer_data: Option<[u8; crate::codec::PEER_DATA_LEN]>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            ident: Ident::default(),
            server: SocketAddrV4::new([127, 0, 0, 1].into(), 1721),
            port_start: 30000,
            port_count: 25,
            peer_port_offset: 20,
            accept_any_ip: false,
            round_timeout: Duration::from_secs(10),
            punch_passes: 5,
            exchange_count: 3,
            ack_count: 10,
            ack_interval: Duration::from_millis(200),
            max_rounds: None,
            retry_delay: Duration::from_secs(1),
            strategy: Strategy::Predict,
            probes: 6,
            probe_interval: Duration::from_millis(20),
            max_window: 64,
            punch_budget: 3_000,
            key: None,
            rng_seed: [0; 32],
            peer_data: None,
        }
    }
}

impl ClientConfig {
    /// Window slots opened per fresh round.
    pub fn window_slots(&self) -> u16 {
        if self.strategy.extended() {
            self.port_count.max(self.max_window)
        } else {
            self.port_count
        }
    }

    /// Probe slots opened after the window.
    pub fn probe_slots(&self) -> u16 {
        if self.strategy.extended() {
            self.probes
        } else {
            0
        }
    }

    /// Where probes go: the server's port + 1.
    pub fn probe_server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(*self.server.ip(), self.server.port().wrapping_add(1))
    }

    /// The punch budget in force per minute: [`ClientConfig::punch_budget`], raised to two
    /// whole v1 rounds.
    pub fn punch_budget_per_minute(&self) -> u32 {
        let round = u32::from(self.punch_passes.max(1)) * u32::from(self.window_slots())
            + u32::from(self.ack_count);
        self.punch_budget.max(round.saturating_mul(2))
    }

    /// Why we would not punch `peer` as the server named it, if we would not: an address
    /// that is no host on the Internet (unspecified, broadcast, multicast, reserved), port 0,
    /// or loopback while the server itself is not on this machine. A server that names such
    /// an address is broken or lying (it would aim our punches at ourselves or at a group).
    pub fn refuse_peer(&self, peer: SocketAddrV4) -> Option<&'static str> {
        let ip = peer.ip();
        let first = ip.octets()[0];
        if peer.port() == 0 {
            Some("port 0")
        } else if ip.is_unspecified() || first == 0 {
            Some("an unspecified address")
        } else if ip.is_broadcast() {
            Some("the broadcast address")
        } else if ip.is_multicast() {
            Some("a multicast address")
        } else if first >= 240 {
            Some("a reserved address")
        } else if ip.is_loopback() && !self.server.ip().is_loopback() {
            Some("a loopback address, but the server is not on this machine")
        } else {
            None
        }
    }
}

/// Why a configuration cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `port_count` is 0.
    #[error("source port count must be at least 1")]
    ZeroCount,
    /// The first window does not fit below 65536.
    #[error("source ports {start}..{start}+{count} pass 65535")]
    WindowTooHigh {
        /// `port_start`.
        start: u16,
        /// Window slots.
        count: u16,
    },
    /// The offset is outside ±65535.
    #[error("peer port offset {0} is outside -65535..=65535")]
    Offset(i32),
}

/// A datagram to send from one of the window's slots.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Window slot (0-based) whose socket sends it.
    pub slot: usize,
    /// Where to.
    pub destination: SocketAddr,
    /// The bytes (8 for v1's messages, more for a keyed session's).
    pub payload: Payload,
}

/// What the driver must do besides sending datagrams.
///
/// Slots `0..window_slots` are the punch window; with [`Strategy::Predict`] a few probe slots
/// (port 0) follow them.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Close the previous window (if any) and bind one UDP socket per port, slot `i` on
    /// `ports[i]` (0 = any ephemeral port). A slot that cannot be bound is simply not used.
    OpenWindow {
        /// Local port per slot.
        ports: Vec<u16>,
    },
    /// Open a TCP connection to the server; report it with `handle_connection_opened` or
    /// `handle_connect_failed`.
    Connect,
    /// Write this frame on the TCP connection.
    Send(Frame),
    /// Close the TCP connection.
    Close,
    /// Bind `count` more UDP sockets on ephemeral ports, as slots after the window and probe
    /// slots (the birthday strategy's many mappings). They close with the window.
    OpenSlots {
        /// How many.
        count: u16,
    },
}

/// Progress, for logs and for the caller's decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A round began with this window of local ports.
    RoundStarted {
        /// 1-based round number.
        round: u32,
        /// First local port (0 = ephemeral).
        first_port: u16,
        /// Number of window slots.
        count: u16,
        /// The round reuses the session's TCP connection and window (extension).
        in_session: bool,
    },
    /// HELLO was sent.
    HelloSent,
    /// The server seated a partner.
    Ready {
        /// The server speaks our extension.
        extended: bool,
    },
    /// EXCHANGE was sent to the server.
    ExchangeSent,
    /// Our NAT as the probes show it, and the plan for this round (extension only).
    Planned {
        /// Signed port step per mapping (0: unknown or random).
        step: i32,
        /// Other hosts' new mappings per second behind our NAT.
        rate: u32,
        /// Smallest RTT to the server seen.
        rtt: Option<Duration>,
        /// Slots we will punch from.
        window: u16,
        /// Our advice to the peer.
        hint: Hint,
    },
    /// The peer's advice on where to aim (extension).
    PeerHint(Hint),
    /// The server told us our own public address (extension).
    Seen(SocketAddrV4),
    /// The partner's public address; `target` is where punches go (`None`: offset passes 65535).
    PeerInfo {
        /// Observed peer address.
        peer: SocketAddrV4,
        /// Predicted target, if in range.
        target: Option<SocketAddrV4>,
    },
    /// A predicted attempt of a pair of ours ended without a punch (or with a target out of
    /// range): aim again in the same
    /// round, from the same window and session (a new EXCHANGE, so both sides re-predict
    /// from where their NATs are now — after a port-block jump, in the new block).
    ReAimed {
        /// The round, unchanged.
        round: u32,
        /// Attempts of this round so far, this one included (2 = the first re-aim).
        attempt: u32,
    },
    /// PUNCH went out from every slot.
    PunchSent {
        /// To where (the first target, when the aim has several).
        target: SocketAddrV4,
        /// Datagrams sent, to every target.
        datagrams: usize,
    },
    /// The peer's PUNCH arrived: the hole is open.
    Win {
        /// Round that won.
        round: u32,
        /// Slot that received it (its socket is the one to keep).
        slot: usize,
        /// The peer's address as it reaches us.
        peer: SocketAddr,
        /// Which strategy aimed the winning round.
        strategy: Strategy,
    },
    /// The round ended without a PUNCH.
    Lose {
        /// Round that lost.
        round: u32,
        /// Why.
        reason: LoseReason,
    },
    /// The server named a peer address we will not punch; the round is lost.
    PeerRefused {
        /// The address as the server gave it.
        peer: SocketAddrV4,
        /// Why, in words.
        why: &'static str,
    },
    /// This minute's punch budget is spent: punches wait until `until`.
    BudgetExhausted {
        /// The budget per minute.
        budget: u32,
        /// When the next minute's budget opens.
        until: Instant,
    },
    /// The server ended our wait for a partner (its wait timeout); we say HELLO again on a
    /// new connection, same round, same window.
    Rehello,
    /// Keyed: the partner proved it holds the key (its MAC over both fresh nonces checked out).
    PeerAuthenticated,
    /// Keyed: the partner handed us its 32 bytes (its WireGuard public key), authenticated.
    PeerData([u8; crate::codec::PEER_DATA_LEN]),
    /// Keyed: the partner the server seated with us did not prove the key. We tell the server,
    /// which ends that pair; we wait for another partner.
    PeerAuthFailed,
    /// The server refused us (a private server: our key is not its key, or we gave none).
    /// The client stops.
    Refused(RefuseReason),
    /// Keyed, but the server does not speak our extension (a v1 server): it cannot pass the
    /// handshake, so the client stops.
    NeedsOurServer,
    /// PEERINFO names a peer on our own public IP: it is behind our NAT. A punch through the
    /// public address needs the NAT to turn datagrams to its own address back inwards
    /// (hairpinning). Said once per server connection.
    PeerBehindOurNat {
        /// The public IP both share.
        public: Ipv4Addr,
    },
    /// Both sides' NATs are known now, and one is hard: how this pair is punched.
    HardNat {
        /// What we do.
        plan: HardNatPlan,
        /// Why, in words.
        why: &'static str,
    },
    /// The acknowledgement burst is done; the client has nothing more to do.
    Finished,
    /// `max_rounds` rounds lost.
    GaveUp {
        /// Rounds played.
        rounds: u32,
    },
    /// The TCP connection to the server failed; the client stops.
    ServerUnreachable,
}

/// How a pair with a hard (random-port) NAT is punched, chosen from the two probe results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardNatPlan {
    /// Our NAT gives random ports, the peer's keeps them (endpoint-independent): we open
    /// [`BIRTHDAY_SLOTS`] mappings towards the peer's one port and wait for its spray.
    BirthdayHard,
    /// Our NAT keeps ports, the peer's gives random ones: we spray the peer's IP at random
    /// ports from our one socket ([`SPRAY_MAX`] at most, [`SPRAY_RATE`] a second) until one
    /// hits a mapping it opened towards us.
    BirthdayEasy,
    /// Both NATs are address-dependent and at least one gives random ports: a hit needs two
    /// coincidences at once (≈ 3 % within 2,000 datagrams per side). We try a bounded number
    /// of rounds ([`UNLIKELY_ROUNDS`]) and then give up, saying why.
    Unlikely,
}

/// Mappings the random-port side opens towards the peer (Tailscale's "256").
pub const BIRTHDAY_SLOTS: u16 = 256;
/// Datagrams the easy side sprays at most per round: with 256 (+ the window's) mappings open
/// among ~64,500 ports, ≈ 98 % of sessions meet within 1,024 (≈ 50 % within 174).
pub const SPRAY_MAX: u16 = 1024;
/// Spray datagrams per second (documented pace, 5 every 10 ms).
pub const SPRAY_RATE: u32 = 500;
/// Rounds tried for a pair that is unlikely to punch before giving up.
pub const UNLIKELY_ROUNDS: u32 = 3;
/// Re-aims a round may make ([`Event::ReAimed`]): with 64-port blocks and 200 new flows/s
/// behind each NAT about one attempt in three meets no block jump on either side, so 11 more
/// attempts (each ≈ 5·RTT plus a pause) bring a round to ≈ 99 % (docs/NATS.md).
pub const MAX_REAIMS: u32 = 11;
const SPRAY_BATCH: u16 = 5;
const SPRAY_TICK: Duration = Duration::from_millis(10);

/// What the probes say of a NAT, for choosing how a pair is punched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NatClass {
    Unknown,
    /// Keeps a socket's port (window slot 0's probe came back with its own port).
    Independent,
    Sequential,
    Random,
}

/// Why a round was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoseReason {
    /// No PUNCH from the peer within the round timeout.
    Timeout,
    /// No PEERINFO within the round timeout after READY.
    NoPeerInfo,
    /// The server closed the connection before PEERINFO.
    ServerClosed,
    /// The server broke the protocol.
    ServerGarbage,
    /// `peer_port + offset` is not a port.
    TargetOutOfRange,
    /// A retry round found no partner within the round timeout (the partner of the first
    /// round gave up). The first round waits for a partner as long as it takes, like v1,
    /// unless `max_rounds` bounds the effort: then it waits one round timeout.
    NoPartner,
    /// The server named a peer address we refuse to punch (see [`ClientConfig::refuse_peer`]).
    BadPeerAddress,
    /// Keyed: the partner did not prove the key.
    AuthFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitReady,
    AwaitPeerInfo,
    Punching {
        peer: SocketAddrV4,
    },
    /// Round lost; the next starts at the deadline. `rehello`: no round was lost, the server
    /// only ended our wait; at the deadline we connect and say HELLO again in the same round.
    Between {
        rehello: bool,
    },
    /// WIN: sending the acknowledgement burst from `slot` to `peer`.
    Won {
        slot: usize,
        peer: SocketAddr,
        acks_left: u16,
    },
    Done,
}

/// Punches that arrive before PEERINFO says who the peer is are kept and judged then: the first
/// from each source IP, for this many IPs. Junk from one IP cannot push out the real peer's
/// punch (the peer is judged by IP), only junk from as many other IPs could.
pub const EARLY_PUNCH_SOURCES: usize = 16;
/// The period of [`ClientConfig::punch_budget`].
pub const BUDGET_PERIOD: Duration = Duration::from_secs(60);
/// A wait for a partner that the server ends after this long was its wait timeout, not a
/// refusal: the client says HELLO again instead of losing the round.
const REHELLO_AFTER: Duration = Duration::from_secs(1);
/// How often an extended client repeats its EXCHANGE until PEERINFO arrives, once it has
/// stopped refreshing it.
const EXCHANGE_RESEND: Duration = Duration::from_millis(250);
/// Fresh EXCHANGEs an extended client sends per round while its partner is late.
const MAX_REFRESHES: u32 = 3;
/// How long an EXCHANGE may wait for probe answers after READY: about one RTT, within these.
const PROBE_WAIT_MIN: Duration = Duration::from_millis(20);
const PROBE_WAIT_MAX: Duration = Duration::from_millis(150);
/// Shortest wait before a refresh.
const MIN_REFRESH: Duration = Duration::from_millis(50);
/// RTT assumed before any was measured.
const DEFAULT_RTT: Duration = Duration::from_millis(100);
/// Acknowledgements to a peer of ours: it wins on the first, the rest cover loss.
const EXT_ACKS: u16 = 3;
const EXT_ACK_INTERVAL: Duration = Duration::from_millis(100);

/// Pairs a client ACKs per round at most: an ACK answers a genuine PUNCH, and the peer's
/// punches reach us on a few pairs at most.
const MAX_ACKED: usize = 16;
/// CONFIRMs the leader sends on the chosen pair, back to back (they must leave before the
/// port is closed at `[ WIN ]`).
const CONFIRMS: usize = 3;
/// Without a HINT we cannot tell a v1 peer from ours: after its PUNCH we wait this long (at
/// least; two RTTs if longer) for its ACK before winning the v1 way.
const V1_FALLBACK_MIN: Duration = Duration::from_millis(100);

/// The second punch pass of a predicted attempt, after half an RTT.
#[derive(Debug, Clone)]
struct PendingPass {
    targets: Vec<SocketAddrV4>,
    slots: usize,
}

/// The client's state tied to one server connection (reset with it; a re-HELLO in the same
/// round keeps `peer`, `hinted` and `exchanges_made`).
#[derive(Debug, Default)]
struct Session {
    /// Round within the current TCP session (the EXCHANGE's round byte).
    round: u8,
    /// Frames from the server's stream.
    decoder: FrameDecoder,
    /// Keyed: this connection's handshake.
    handshake: Option<Handshake>,
    /// How datagrams with the peer look (`None` in a keyed session before both nonces are
    /// known: nothing is genuine yet).
    wire: Option<Wire>,
    /// Our public address as the server last saw our EXCHANGE (SEEN): with the peer's, it
    /// decides who leads the confirmation.
    own_public: Option<SocketAddrV4>,
    /// The peer is a client of ours (it sent a HINT, an ACK or a CONFIRM, or holds our key):
    /// WIN is confirmed both ways, not by a blind acknowledgement burst.
    peer_ours: bool,
    /// The server's token: set when both it and we speak the extension.
    token: Option<Token>,
    /// The peer as the last PEERINFO of this session named it.
    peer: Option<SocketAddrV4>,
    /// The peer gave a hint in some round of this session.
    hinted: bool,
    /// EXCHANGE sockets used so far in this window (each a fresh mapping; across re-aims and
    /// in-session rounds, until a fresh round opens a new window).
    exchanges_made: usize,
    /// [`Event::PeerBehindOurNat`] was said on this connection.
    same_nat_said: bool,
    /// Our side of the confirmation, settled at PEERINFO ([`Client::our_side`]).
    side: Option<Side>,
}

/// What the client learns about its own NAT from its probes (and its EXCHANGEs' SEENs).
#[derive(Debug, Default)]
struct Probing {
    /// The NAT's ports as our mappings got them, and where the next ones will be.
    predictor: PortPredictor,
    /// Probes sent this round.
    sent: u16,
    /// Per probe slot: when its probe left and which of our mappings it was, until answered.
    sent_at: Vec<Option<(Instant, u32)>>,
    /// Window slot 0's probe answer: its public port equals its local one (a port-keeping,
    /// endpoint-independent NAT, or none).
    preserving: Option<bool>,
}

/// Why an attempt's EXCHANGE waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExchangeWait {
    /// READY came before two probe answers: for them (briefly; the second answer ends it).
    Probes,
    /// A re-aim's random pause: only its end does.
    ReAimPause,
}

/// The client's state for one attempt of a round: from the EXCHANGE to WIN or timeout.
#[derive(Debug, Default)]
struct Attempt {
    /// Pairs (our slot, peer address) whose PUNCH we ACKed.
    acked: Vec<(usize, SocketAddr)>,
    /// The first genuine PUNCH, for the v1 fallback.
    first_punch: Option<(usize, SocketAddr)>,
    /// The other side (not the leader): the first pair the leader's ACK proved, to take as
    /// the hole at [`Timer::ConfirmWait`] if the leader's CONFIRMs were all lost.
    confirm_pair: Option<(usize, SocketAddr)>,
    /// The easy side's spray: target IP, datagrams sent (ticks: [`Timer::Spray`]).
    spray: Option<(Ipv4Addr, u16)>,
    /// The peer's hint, if it gave one.
    peer_hint: Option<Hint>,
    /// Our own plan (window, hint) from our probes.
    plan: Option<Plan>,
    /// PUNCHes that came before PEERINFO named the peer (a few per source IP).
    early_punches: Vec<(usize, SocketAddr)>,
    /// This attempt's EXCHANGE mapping (when, which of ours), until SEEN reports its port.
    exchange_sent: Option<(Instant, u32)>,
    /// Refreshed EXCHANGEs.
    refreshes: u32,
    /// This attempt plays a hard-NAT plan (those have rounds of their own; no re-aim).
    hard: bool,
    /// The EXCHANGE waits ([`Timer::Phase`] ends the wait).
    exchange_wait: Option<ExchangeWait>,
    /// After READY: PEERINFO must arrive by then (checked when [`Timer::Phase`] fires).
    peer_info_deadline: Option<Instant>,
    /// The second punch pass of a predicted attempt, due at [`Timer::Pass`].
    pending_pass: Option<PendingPass>,
}

/// The punching client state machine. See the module docs for the calling contract.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    /// Rounds started, 1-based.
    round: u32,
    window_start: u16,
    phase: Phase,
    connected: bool,
    /// What belongs to the current server connection.
    session: Session,
    /// What one attempt (PEERINFO, aim, punches, acknowledgements) leaves behind.
    attempt: Attempt,
    /// Draws handshake nonces.
    rng: ChaCha20Rng,
    /// Extra slots opened for the birthday strategy (after window and probe slots).
    extra_slots: u16,
    /// The pair was found unlikely to punch in this round (said once per client).
    unlikely_said: bool,
    /// Rounds played since the pair was found unlikely.
    unlikely_rounds: u32,
    /// Our NAT was seen allocating sequentially (in runs): block jumps later must not make
    /// it look random (which would call a good pair hopeless).
    seen_sequential: bool,
    /// Datagrams to peers this budget period, and when the period began.
    budget: (Instant, u32),
    /// The budget was found spent this period (said once).
    budget_said: bool,
    /// When HELLO went out on the current connection (the wait for a partner began).
    hello_sent: Option<Instant>,
    /// What the probes tell about our NAT.
    probing: Probing,
    connect_sent: Option<Instant>,
    exchange_slot: usize,
    /// Re-aims in this round ([`Event::ReAimed`]).
    reaims: u32,
    /// The server has acknowledged (SEEN) our latest EXCHANGE.
    exchange_acked: bool,
    /// New NAT mappings we have made so far (probes, EXCHANGEs, first punches), so the
    /// predictor can tell our own port use from other hosts'.
    own_mappings: u32,
    /// Every deadline, by name.
    timers: TimerTable,
    commands: VecDeque<Command>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Datagrams handed to the driver so far (probes, EXCHANGEs, PUNCHes, acknowledgements).
    datagrams_sent: u64,
}

impl Client {
    /// A client that starts its first round at `now`.
    pub fn new(config: ClientConfig, now: Instant) -> Result<Self, ConfigError> {
        if config.port_count == 0 {
            return Err(ConfigError::ZeroCount);
        }
        let slots = config.window_slots();
        if config.port_start != 0 && u32::from(config.port_start) + u32::from(slots) - 1 > 65535 {
            return Err(ConfigError::WindowTooHigh {
                start: config.port_start,
                count: slots,
            });
        }
        if config.peer_port_offset.unsigned_abs() > 65535 {
            return Err(ConfigError::Offset(config.peer_port_offset));
        }
        let rng = ChaCha20Rng::from_seed(config.rng_seed);
        let mut client = Self {
            window_start: config.port_start,
            probing: Probing {
                sent_at: vec![None; usize::from(config.probe_slots())],
                ..Probing::default()
            },
            config,
            round: 0,
            reaims: 0,
            phase: Phase::Done,
            connected: false,
            session: Session::default(),
            attempt: Attempt::default(),
            rng,
            extra_slots: 0,
            unlikely_said: false,
            unlikely_rounds: 0,
            seen_sequential: false,
            budget: (now, 0),
            budget_said: false,
            hello_sent: None,
            connect_sent: None,
            own_mappings: 0,
            exchange_slot: 0,
            exchange_acked: false,
            timers: TimerTable::default(),
            commands: VecDeque::new(),
            // A v1 round queues its 5 × 25 punches at once: no regrowing on the way there.
            transmits: VecDeque::with_capacity(128),
            events: VecDeque::new(),
            datagrams_sent: 0,
        };
        client.start_round(now, false);
        Ok(client)
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Current round, 1-based.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Whether nothing more will happen (WIN and burst done, gave up, or unreachable).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// What the probes have shown of our own NAT so far.
    pub fn predictor(&self) -> &PortPredictor {
        &self.probing.predictor
    }

    /// The local ports of the current window and probe slots, slot by slot (0 = ephemeral).
    pub fn window(&self) -> Vec<u16> {
        let mut ports = window_ports(self.window_start, self.config.window_slots());
        ports.extend(std::iter::repeat_n(
            0,
            usize::from(self.config.probe_slots()),
        ));
        ports
    }

    /// The TCP connection to the server is up.
    pub fn handle_connection_opened(&mut self, now: Instant) {
        if self.phase != Phase::Connecting {
            return;
        }
        if let Some(sent) = self.connect_sent {
            // The TCP handshake is one RTT: a first estimate before any probe returns.
            self.probing
                .predictor
                .observe_rtt(now.saturating_duration_since(sent));
        }
        self.connected = true;
        self.phase = Phase::AwaitReady;
        let hello = match self.config.key {
            Some(key) => {
                let mut nonce: Nonce = [0; crate::codec::NONCE_LEN];
                self.rng.fill_bytes(&mut nonce);
                let handshake = Handshake::new(key, self.config.ident, nonce);
                self.session.handshake = Some(handshake);
                Frame::Long(handshake.hello())
            }
            None => Frame::Short(Message::Hello(self.config.ident)),
        };
        self.commands.push_back(Command::Send(hello));
        self.events.push_back(Event::HelloSent);
        self.hello_sent = Some(now);
        if self.round > 1 || self.config.max_rounds.is_some() {
            // A partner that played the last round with us comes back at once, or not at all;
            // and a bounded effort (`max_rounds`) bounds the first wait too.
            self.timers
                .set(Timer::Phase, crate::later(now, self.config.round_timeout));
        }
    }

    /// The TCP connection to the server could not be made. The client stops.
    pub fn handle_connect_failed(&mut self, _now: Instant) {
        if self.phase == Phase::Connecting {
            self.finish();
            self.events.push_back(Event::ServerUnreachable);
        }
    }

    /// Bytes from the server's TCP connection.
    pub fn handle_stream_data(&mut self, now: Instant, bytes: &[u8]) {
        if !self.connected {
            return;
        }
        let mut input = bytes;
        let mut ok = true;
        while self.connected {
            match self.session.decoder.next(&mut input) {
                None => break,
                Some(Ok(Frame::Short(m))) => self.on_server_message(now, m),
                Some(Ok(Frame::Long(m))) => self.on_server_long(now, m),
                Some(Err(_)) => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok && self.connected {
            if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                self.lose(now, LoseReason::ServerGarbage);
            } else {
                // Punches are out or the round is won: it no longer needs the server, whose
                // stream is unusable now, so only the connection goes.
                self.connected = false;
                self.commands.push_back(Command::Close);
            }
        }
    }

    /// The server closed the TCP connection.
    pub fn handle_connection_closed(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        self.connected = false;
        let waited = self
            .hello_sent
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if self.phase == Phase::AwaitReady && waited >= REHELLO_AFTER {
            // The server's wait timeout: it frees seats nobody came for. Not a lost round.
            self.events.push_back(Event::Rehello);
            self.phase = Phase::Between { rehello: true };
            self.timers.set(
                Timer::Phase,
                crate::later(now, self.config.retry_delay.min(REHELLO_AFTER)),
            );
        } else if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
            self.lose(now, LoseReason::ServerClosed);
        }
    }

    /// A datagram arrived on slot `slot` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, slot: usize, from: SocketAddr, bytes: &[u8]) {
        let window = usize::from(self.config.window_slots());
        let probes = usize::from(self.config.probe_slots());
        if (window..window + probes).contains(&slot) {
            self.on_probe_reply(now, slot - window, from, bytes);
            return;
        }
        if slot >= window + probes + usize::from(self.extra_slots) {
            return; // no slot of ours (a driver bug): nothing to answer from
        }
        if slot == 0 && from == SocketAddr::from(self.config.probe_server()) {
            // Window slot 0's own probe: does our NAT keep the port?
            if let Ok(Message::Seen(addr)) = Message::decode(bytes) {
                self.probing.preserving = Some(addr.port() == self.window_start);
            }
            return;
        }
        let ours = self.our_side();
        let Some(says) = self.session.wire.and_then(|w| w.judge(bytes, ours)) else {
            return;
        };
        // Who the peer is: this round's PEERINFO, or in a session re-round the last one (a
        // late datagram of the last round still counts).
        let peer = match self.phase {
            Phase::Punching { peer } => Some(peer),
            Phase::AwaitPeerInfo => self.session.peer,
            _ => None,
        };
        let Some(peer) = peer else {
            if says == PeerSays::Punch
                && matches!(
                    self.phase,
                    Phase::Connecting | Phase::AwaitReady | Phase::AwaitPeerInfo
                )
                && self.attempt.early_punches.len() < EARLY_PUNCH_SOURCES
                && !self
                    .attempt
                    .early_punches
                    .iter()
                    .any(|(_, f)| f.ip() == from.ip())
            {
                self.attempt.early_punches.push((slot, from));
            }
            return;
        };
        if !self.accepts(peer, from) {
            return;
        }
        match says {
            PeerSays::Punch => self.on_peer_punch(now, slot, from),
            PeerSays::Ack | PeerSays::Confirm => {
                self.session.peer_ours = true;
                self.timers.stop(Timer::V1Fallback);
                // The leader picks the pair (the first its ACK proves both ways); the other
                // side takes the leader's CONFIRM. So both settle on the same pair.
                match (self.our_side().map(|s| s == Side::Leader), says) {
                    (Some(true), PeerSays::Ack) => self.win_confirmed(slot, from, true),
                    (Some(false), PeerSays::Confirm) => self.win_confirmed(slot, from, false),
                    // The peer proved a pair we never ACKed (its PUNCH could not reach us
                    // before our datagram opened our NAT, as in the birthday strategy): our
                    // ACK gives the leader its proof.
                    (Some(false), PeerSays::Ack) => {
                        if self.attempt.confirm_pair.is_none()
                            && matches!(self.phase, Phase::Punching { .. })
                        {
                            let wait = self.rtt().saturating_mul(2).max(V1_FALLBACK_MIN);
                            self.attempt.confirm_pair = Some((slot, from));
                            self.timers.set(Timer::ConfirmWait, crate::later(now, wait));
                        }
                        self.send_peer_ack(slot, from)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether the peer showed itself one of ours (a HINT, an ACK or CONFIRM, or our key).
    pub fn peer_is_ours(&self) -> bool {
        self.session.peer_ours
    }

    /// Whether bytes that arrived on the window are the session's own handshake (PUNCH, ACK,
    /// CONFIRM from the peer's side) rather than the user's traffic.
    pub fn is_handshake(&self, bytes: &[u8]) -> bool {
        let ours = self.our_side();
        self.session
            .wire
            .is_some_and(|w| w.judge(bytes, ours).is_some())
    }

    /// Time passed; acts on every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.is_due(Timer::Probe, now) {
            self.send_probe(now);
        }
        if self.timers.is_due(Timer::Spray, now) {
            self.spray_tick(now);
        }
        if self.timers.expire(Timer::ConfirmWait, now) {
            let pair = self.attempt.confirm_pair.take();
            if let (Phase::Punching { .. }, Some((slot, from))) = (self.phase, pair) {
                // The leader's ACK proved this pair both ways; its CONFIRMs never came.
                self.win_confirmed(slot, from, false);
            }
        }
        if self.timers.expire(Timer::V1Fallback, now) {
            if let (Phase::Punching { .. }, Some((slot, from))) =
                (self.phase, self.attempt.first_punch)
            {
                // No ACK came: the peer is v1. It wins on our punches; we on its, v1's way.
                self.win(now, slot, from);
            }
        }
        if self.timers.expire(Timer::Pass, now) {
            if let (Phase::Punching { .. }, Some(pass)) =
                (self.phase, self.attempt.pending_pass.take())
            {
                for t in pass.targets {
                    self.punch_pass(now, t, pass.slots);
                }
            }
        }
        if !self.timers.expire(Timer::Phase, now) {
            return;
        }
        match self.phase {
            Phase::AwaitPeerInfo if self.attempt.exchange_wait.is_some() => {
                self.attempt.exchange_wait = None;
                self.send_exchange(now);
            }
            Phase::AwaitPeerInfo => {
                if self.attempt.peer_info_deadline.is_some_and(|d| d > now) {
                    self.send_exchange(now);
                } else {
                    self.lose(now, LoseReason::NoPeerInfo);
                }
            }
            Phase::Punching { .. } => {
                if !self.re_aim(now) {
                    self.lose(now, LoseReason::Timeout);
                }
            }
            Phase::Between { rehello: false } => self.start_round(now, false),
            Phase::Between { rehello: true } => self.reconnect(now),
            Phase::Won {
                slot,
                peer,
                acks_left,
            } => self.send_ack(now, slot, peer, acks_left),
            Phase::AwaitReady => self.lose(now, LoseReason::NoPartner),
            Phase::Connecting | Phase::Done => {}
        }
    }

    /// The next thing the driver must do besides sending datagrams. Drain before transmits.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next datagram to send.
    #[must_use]
    #[inline] // one call per datagram: let drivers in other crates inline it
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front()?;
        self.datagrams_sent += 1;
        Some(t)
    }

    /// Datagrams polled so far: the cost of punching, for comparing strategies.
    pub fn datagrams_sent(&self) -> u64 {
        self.datagrams_sent
    }

    /// The next event to report.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Our PUNCH as this session makes it.
    fn punch_bytes(&self) -> Payload {
        let wire = self.session.wire.unwrap_or(Wire::Plain(self.config.ident));
        wire.make(PeerSays::Punch, Side::Other)
    }

    /// Our side of the confirmation, as the last PEERINFO of this connection settled it (a
    /// re-aim's SEEN does not move it while datagrams of the last attempt may still come).
    /// `None` when we cannot tell (no SEEN): then we act as v1.
    fn our_side(&self) -> Option<Side> {
        self.session.side
    }

    /// Whether we lead the confirmation with `peer`: the side whose public address (keyed:
    /// nonce) is the lower one; `None` when we cannot tell.
    fn leads(&self, peer: SocketAddrV4) -> Option<bool> {
        if let Some(h) = self.session.handshake {
            return Some(h.mine < h.theirs?);
        }
        let me = self.session.own_public?;
        let key = |a: SocketAddrV4| (a.ip().octets(), a.port());
        (me != peer).then(|| key(me) < key(peer))
    }

    /// A genuine PUNCH from the peer on (`slot`, `from`). Against a v1 peer that is the WIN (and
    /// the acknowledgement burst follows). Between clients of ours it is only half: we ACK it
    /// on the same pair, and the WIN waits for proof that our side got through as well.
    fn on_peer_punch(&mut self, now: Instant, slot: usize, from: SocketAddr) {
        let confirming = self.session.token.is_some() && self.our_side().is_some();
        if !confirming {
            self.win(now, slot, from);
            return;
        }
        self.send_peer_ack(slot, from);
        if self.attempt.first_punch.is_none() {
            self.attempt.first_punch = Some((slot, from));
            if !self.session.peer_ours && self.phase != Phase::AwaitPeerInfo {
                let wait = self.rtt().saturating_mul(2).max(V1_FALLBACK_MIN);
                self.timers.set(Timer::V1Fallback, crate::later(now, wait));
            }
        }
    }

    /// An ACK on (`slot`, `from`), once per pair and round.
    fn send_peer_ack(&mut self, slot: usize, from: SocketAddr) {
        if self.attempt.acked.len() < MAX_ACKED && !self.attempt.acked.contains(&(slot, from)) {
            self.attempt.acked.push((slot, from));
            self.budget.1 = self.budget.1.saturating_add(1);
            let ours = self.our_side().unwrap_or(Side::Unknown);
            let payload = self
                .session
                .wire
                .expect("genuine, so judged")
                .make(PeerSays::Ack, ours);
            self.transmits.push_back(Transmit {
                slot,
                destination: from,
                payload,
            });
        }
    }

    /// Says WIN on (`slot`, `peer`), naming the strategy that aimed the round; returns it.
    fn report_win(&mut self, slot: usize, peer: SocketAddr) -> Strategy {
        let strategy = match self.config.strategy {
            Strategy::Predict if self.predicted() => Strategy::Predict,
            // Without a hint ours aims like v1.
            Strategy::Predict => Strategy::V1,
            other => other,
        };
        self.events.push_back(Event::Win {
            round: self.round,
            slot,
            peer,
            strategy,
        });
        strategy
    }

    /// Both directions of (`slot`, `peer`) are proven: WIN, at once, on that pair. The leader
    /// tells the other side which pair it chose (CONFIRM, before its port closes).
    fn win_confirmed(&mut self, slot: usize, peer: SocketAddr, lead: bool) {
        self.report_win(slot, peer);
        if lead {
            let payload = self
                .session
                .wire
                .expect("a genuine ACK came")
                .make(PeerSays::Confirm, Side::Leader);
            for _ in 0..CONFIRMS {
                self.budget.1 = self.budget.1.saturating_add(1);
                self.transmits.push_back(Transmit {
                    slot,
                    destination: peer,
                    payload,
                });
            }
        }
        if self.connected {
            self.connected = false;
            self.commands.push_back(Command::Close);
        }
        self.finish();
        self.events.push_back(Event::Finished);
    }

    fn accepts(&self, peer: SocketAddrV4, from: SocketAddr) -> bool {
        self.config.accept_any_ip || from.ip() == IpAddr::V4(*peer.ip())
    }

    fn rtt(&self) -> Duration {
        self.probing.predictor.rtt().unwrap_or(DEFAULT_RTT)
    }

    /// Whether this round is aimed by the extension (the server and the peer are ours).
    /// (A late punch of an earlier round of this session counts: that round was aimed too.)
    fn predicted(&self) -> bool {
        self.session.token.is_some() && (self.attempt.peer_hint.is_some() || self.session.hinted)
    }

    /// Keyed handshake messages from the server.
    fn on_server_long(&mut self, now: Instant, msg: LongMessage) {
        match (self.phase, msg, self.session.handshake) {
            (_, LongMessage::Refused(reason), _) => {
                self.events.push_back(Event::Refused(reason));
                self.finish();
            }
            (Phase::AwaitPeerInfo, LongMessage::PeerNonce(theirs), Some(mut h))
                if h.theirs.is_none() =>
            {
                h.theirs = Some(theirs);
                self.session.handshake = Some(h);
                self.session.wire = h.wire();
                let mac = h.key.auth(h.room, &h.mine, &theirs);
                self.commands
                    .push_back(Command::Send(LongMessage::Auth(mac).into()));
                if let Some(data) = self.config.peer_data {
                    let mac = h.key.peer_data(h.room, &h.mine, &theirs, &data);
                    self.commands
                        .push_back(Command::Send(LongMessage::PeerData { data, mac }.into()));
                }
            }
            (Phase::AwaitPeerInfo, LongMessage::Auth(mac), Some(mut h))
                if h.theirs.is_some() && !h.verified =>
            {
                let theirs = h.theirs.expect("checked");
                if h.key.verify_auth(h.room, &theirs, &h.mine, &mac) {
                    h.verified = true;
                    self.session.handshake = Some(h);
                    self.session.peer_ours = true;
                    self.commands
                        .push_back(Command::Send(LongMessage::Verified.into()));
                    self.events.push_back(Event::PeerAuthenticated);
                    if self.attempt.peer_info_deadline.is_none() {
                        self.send_exchange(now);
                    }
                } else {
                    self.commands
                        .push_back(Command::Send(LongMessage::AuthFailed.into()));
                    self.events.push_back(Event::PeerAuthFailed);
                    self.lose(now, LoseReason::AuthFailed);
                }
            }
            (_, LongMessage::PeerData { data, mac }, Some(h)) if h.theirs.is_some() => {
                let theirs = h.theirs.expect("checked");
                if h.key
                    .verify_peer_data(h.room, &theirs, &h.mine, &data, &mac)
                {
                    self.events.push_back(Event::PeerData(data));
                } else if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                    // Only someone without the key sends a bad MAC: as a failed AUTH.
                    self.commands
                        .push_back(Command::Send(LongMessage::AuthFailed.into()));
                    self.events.push_back(Event::PeerAuthFailed);
                    self.lose(now, LoseReason::AuthFailed);
                }
            }
            _ => {
                if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                    self.lose(now, LoseReason::ServerGarbage);
                }
            }
        }
    }

    /// Starts the next round: inside the TCP session if `in_session`, else from scratch.
    fn start_round(&mut self, now: Instant, in_session: bool) {
        if self.config.max_rounds.is_some_and(|max| self.round >= max) {
            self.finish();
            self.events.push_back(Event::GaveUp { rounds: self.round });
            return;
        }
        self.round += 1;
        self.reaims = 0;
        self.reset_attempt();
        // A fresh round moves the window first, so that RoundStarted names the one it opens.
        if !in_session && self.round > 1 {
            self.window_start = next_window_start(
                self.window_start,
                self.config.window_slots(),
                self.config.port_start,
            );
        }
        self.events.push_back(Event::RoundStarted {
            round: self.round,
            first_port: self.window_start,
            count: self.config.window_slots(),
            in_session,
        });
        if in_session {
            self.exchange_in_session(now);
            return;
        }
        self.phase = Phase::Connecting;
        self.connected = false;
        self.reset_connection();
        self.session.exchanges_made = 0;
        self.session.peer = None;
        self.session.hinted = false;
        self.commands.push_back(Command::OpenWindow {
            ports: self.window(),
        });
        self.extra_slots = 0;
        self.probing.preserving = None;
        self.commands.push_back(Command::Connect);
        self.connect_sent = Some(now);
        self.probing.sent = 0;
        self.probing.sent_at.iter_mut().for_each(|t| *t = None);
        self.timers
            .set_or_stop(Timer::Probe, (self.config.probe_slots() > 0).then_some(now));
    }

    /// A predicted attempt timed out, or its PEERINFO named a target out of range: aim again
    /// in this round if the session is live and the round has re-aims left. False: the round
    /// is lost.
    fn re_aim(&mut self, now: Instant) -> bool {
        if !(self.session_has_room() && !self.attempt.hard && self.reaims < MAX_REAIMS) {
            return false;
        }
        self.reaims += 1;
        self.reset_attempt();
        self.events.push_back(Event::ReAimed {
            round: self.round,
            attempt: self.reaims + 1,
        });
        // The new EXCHANGE waits a random pause of up to 2·RTT: an attempt may use up about
        // one port block, and without the pause every attempt would meet the same block end.
        self.session.round = self.session.round.saturating_add(1);
        self.phase = Phase::AwaitPeerInfo;
        self.attempt.exchange_wait = Some(ExchangeWait::ReAimPause);
        let pause = self.rtt() * 2 * (self.rng.next_u32() % 1024) / 1024;
        self.timers.set(Timer::Phase, crate::later(now, pause));
        true
    }

    /// A live predicted session can take one more EXCHANGE: the window still has a socket
    /// that never talked to the server (a used one would report an old mapping) and the
    /// EXCHANGE's round byte has room. Otherwise the next round starts afresh.
    fn session_has_room(&self) -> bool {
        self.connected
            && self.predicted()
            && self.session.exchanges_made < usize::from(self.config.window_slots())
            && self.session.round < u8::MAX
    }

    /// The next EXCHANGE of a live session (a new round or a re-aim).
    fn exchange_in_session(&mut self, now: Instant) {
        self.session.round = self.session.round.saturating_add(1);
        self.phase = Phase::AwaitPeerInfo;
        self.send_exchange(now);
    }

    /// Forgets what one attempt (PEERINFO, aim, punches, acknowledgements) left behind.
    fn reset_attempt(&mut self) {
        // The lists keep their allocations.
        let mut acked = std::mem::take(&mut self.attempt.acked);
        let mut early_punches = std::mem::take(&mut self.attempt.early_punches);
        acked.clear();
        early_punches.clear();
        self.attempt = Attempt {
            acked,
            early_punches,
            ..Attempt::default()
        };
        for timer in [
            Timer::Spray,
            Timer::V1Fallback,
            Timer::ConfirmWait,
            Timer::Pass,
            Timer::Phase,
        ] {
            self.timers.stop(timer);
        }
        self.hello_sent = None;
    }

    /// Sends the next probe; the first two go back to back, which shows the NAT's step.
    fn send_probe(&mut self, now: Instant) {
        let total = self.config.probe_slots();
        let burst = if self.probing.sent == 0 { 2 } else { 1 };
        if self.probing.sent == 0 && self.window_start != 0 {
            // Window slot 0 (the EXCHANGE's socket, whose local port we know) asks too: a
            // NAT that keeps its port is endpoint-independent in practice — the easy side of
            // a hard pair. (Probes go to the probe port only: a v1 server never sees one.)
            self.own_mappings += 1;
            self.transmits.push_back(Transmit {
                slot: 0,
                destination: self.config.probe_server().into(),
                payload: Message::Probe.to_bytes().into(),
            });
        }
        for _ in 0..burst {
            if self.probing.sent >= total {
                break;
            }
            let i = self.probing.sent;
            self.probing.sent_at[usize::from(i)] = Some((now, self.own_mappings));
            self.own_mappings += 1;
            self.transmits.push_back(Transmit {
                slot: usize::from(self.config.window_slots() + i),
                destination: self.config.probe_server().into(),
                payload: Message::Probe.to_bytes().into(),
            });
            self.probing.sent += 1;
        }
        let next =
            (self.probing.sent < total).then(|| crate::later(now, self.config.probe_interval));
        self.timers.set_or_stop(Timer::Probe, next);
    }

    fn on_probe_reply(&mut self, now: Instant, probe: usize, from: SocketAddr, bytes: &[u8]) {
        if from != SocketAddr::from(self.config.probe_server()) {
            return;
        }
        let (Some(slot), Ok(Message::Seen(addr))) =
            (self.probing.sent_at.get_mut(probe), Message::decode(bytes))
        else {
            return;
        };
        // One observation per probe socket: a repeat would count its mapping twice.
        if let Some((sent, seq)) = slot.take() {
            self.probing.predictor.observe(seq, sent, addr.port());
            self.probing
                .predictor
                .observe_rtt(now.saturating_duration_since(sent));
        }
        // Only while the round still waits for it: a PEERINFO (or the end) may come first.
        if self.attempt.exchange_wait == Some(ExchangeWait::Probes)
            && self.phase == Phase::AwaitPeerInfo
            && self.probing.predictor.len() >= 2
        {
            self.attempt.exchange_wait = None;
            self.send_exchange(now);
        }
    }

    fn on_server_message(&mut self, now: Instant, msg: Message) {
        match (self.phase, msg) {
            (Phase::AwaitReady, Message::Ready(None)) if self.session.handshake.is_some() => {
                self.events.push_back(Event::NeedsOurServer);
                self.finish();
            }
            (Phase::AwaitReady, Message::Ready(token)) => {
                self.session.token = token.filter(|_| self.config.strategy.extended());
                self.phase = Phase::AwaitPeerInfo;
                self.session.round = 1;
                self.timers.stop(Timer::Phase);
                self.events.push_back(Event::Ready {
                    extended: self.session.token.is_some(),
                });
                if self.session.handshake.is_some() {
                    // Keyed: the EXCHANGE waits for the handshake, so that PEERINFO follows it
                    // one RTT later, as the aim assumes (the server holds PEERINFO until both
                    // verified). The round timeout bounds the wait.
                    self.timers
                        .set(Timer::Phase, crate::later(now, self.config.round_timeout));
                } else if self.session.token.is_some()
                    && self.probing.predictor.len() < 2
                    && self.probing.sent > 0
                {
                    // READY came before our probes' answers (a partner already waiting, a
                    // short RTT): without them we could give no hint. Wait for them a little.
                    self.attempt.exchange_wait = Some(ExchangeWait::Probes);
                    self.timers.set(
                        Timer::Phase,
                        crate::later(now, self.rtt().clamp(PROBE_WAIT_MIN, PROBE_WAIT_MAX)),
                    );
                } else {
                    self.send_exchange(now);
                }
            }
            (Phase::AwaitPeerInfo, Message::PeerInfo(peer)) => self.on_peer_info(now, peer),
            (_, Message::Hint(hint)) if self.session.token.is_some() => {
                // Only a partner of ours sends a hint: the server relays it, even "none".
                self.session.peer_ours = true;
                self.attempt.peer_hint = Some(hint);
                self.session.hinted = true;
                self.events.push_back(Event::PeerHint(hint));
            }
            (_, Message::Seen(addr)) if self.session.token.is_some() => {
                self.session.own_public = Some(addr);
                self.exchange_acked = true;
                // The mapping of this round's EXCHANGE socket, made when it first sent.
                if let Some((sent, seq)) = self.attempt.exchange_sent.take() {
                    self.probing.predictor.observe(seq, sent, addr.port());
                }
                self.events.push_back(Event::Seen(addr))
            }
            // A PEERINFO for a round we already gave up on, say: harmless in a session.
            (_, Message::PeerInfo(_)) if self.session.token.is_some() => {}
            // Anything else from the server is out of protocol: v1 clients would misbehave;
            // we end the round cleanly instead.
            _ => {
                if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                    self.lose(now, LoseReason::ServerGarbage);
                }
            }
        }
    }

    /// Sends this round's first EXCHANGE, or on the timer a follow-up: while the partner is
    /// late, an extended client refreshes its EXCHANGE from a fresh socket now and then (the
    /// server keeps the newest, so the partner aims at a port of now, not of when we started
    /// waiting); after a few refreshes, or without the extension, it just repeats it.
    fn send_exchange(&mut self, now: Instant) {
        let first = self.attempt.peer_info_deadline.is_none();
        let give_up = *self
            .attempt
            .peer_info_deadline
            .get_or_insert(crate::later(now, self.config.round_timeout));
        // Refresh only while the server holds our EXCHANGE (SEEN came) and has not paired the
        // round (no HINT yet): then the partner is late. Otherwise PEERINFO may be on its way,
        // delayed by TCP, and a refresh would only move our ports past the partner's aim; the
        // few refreshes allowed move them by at most that many, well inside the window.
        let refresh = !first
            && self.session.token.is_some()
            && self.exchange_acked
            && self.attempt.peer_hint.is_none()
            && self.attempt.refreshes < MAX_REFRESHES;
        let repeat = !first && !refresh && !self.exchange_acked;
        if first || refresh {
            self.exchange_acked = false;
            if !first {
                self.attempt.refreshes += 1;
                // Its SEEN could be confused with the first one's: observe neither.
                self.attempt.exchange_sent = None;
            } else {
                self.attempt.exchange_sent = Some((now, self.own_mappings));
            }
            // A socket that has not talked to the server yet makes a fresh mapping.
            self.exchange_slot =
                self.session.exchanges_made % usize::from(self.config.window_slots());
            self.session.exchanges_made += 1;
            self.own_mappings += 1;
        }
        let (msg, copies) = match self.session.token {
            None => (
                Message::Exchange(self.config.ident),
                if first { self.config.exchange_count } else { 0 },
            ),
            Some(token) => {
                if first || refresh {
                    self.plan_round();
                }
                let hint = self.attempt.plan.map_or(Hint::NONE, |p| p.hint);
                let round = self.session.round;
                // Two copies of the first: a lost EXCHANGE costs a resend interval.
                let copies = match (first, refresh, repeat) {
                    (true, ..) => 2,
                    (_, true, _) | (_, _, true) => 1,
                    _ => 0,
                };
                (Message::ExchangeToken { token, round, hint }, copies)
            }
        };
        for _ in 0..copies {
            self.transmits.push_back(Transmit {
                slot: self.exchange_slot,
                destination: self.config.server.into(),
                payload: msg.to_bytes().into(),
            });
        }
        if first {
            self.events.push_back(Event::ExchangeSent);
        }
        // PEERINFO normally comes one RTT after our EXCHANGE; later means the partner is late.
        let wait = if refresh || first && self.session.token.is_some() {
            (self.rtt().saturating_mul(5) / 4 + Duration::from_millis(10)).max(MIN_REFRESH)
        } else {
            EXCHANGE_RESEND
        };
        self.timers.set(
            Timer::Phase,
            match self.session.token {
                Some(_) => give_up.min(crate::later(now, wait)),
                None => give_up,
            },
        );
    }

    fn plan_round(&mut self) {
        let rtt = self.probing.predictor.rtt();
        // Our punches leave when PEERINFO arrives, about one RTT after our EXCHANGE.
        self.attempt.plan = self
            .probing
            .predictor
            .plan(self.rtt(), self.config.window_slots());
        let class = self.nat_class();
        self.seen_sequential |= class == NatClass::Sequential;
        if class == NatClass::Independent {
            // Our EXCHANGE's port is the one the peer's punches must reach.
            let window = self
                .attempt
                .plan
                .map_or(self.config.port_count, |p| p.window);
            self.attempt.plan = Some(Plan {
                hint: Hint::INDEPENDENT,
                window,
            });
        }
        let (step, rate) = match self.probing.predictor.behaviour() {
            NatBehaviour::Sequential { step, rate, .. } => (step, rate.round() as u32),
            NatBehaviour::Unknown | NatBehaviour::Random => (0, 0),
        };
        self.events.push_back(Event::Planned {
            step,
            rate,
            rtt,
            window: self
                .attempt
                .plan
                .map_or(self.config.port_count, |p| p.window),
            hint: self.attempt.plan.map_or(Hint::NONE, |p| p.hint),
        });
    }

    fn on_peer_info(&mut self, now: Instant, peer: SocketAddrV4) {
        if self.session.handshake.is_some_and(|h| !h.verified) || self.session.wire.is_none() {
            // A server that names the peer before both sides proved the key breaks the
            // protocol (ours never does): punch nobody.
            self.lose(now, LoseReason::ServerGarbage);
            return;
        }
        if let Some(why) = self.config.refuse_peer(peer) {
            self.events.push_back(Event::PeerRefused { peer, why });
            self.lose(now, LoseReason::BadPeerAddress);
            return;
        }
        let same_nat = self
            .session
            .own_public
            .is_some_and(|me| me.ip() == peer.ip());
        if same_nat && !self.session.same_nat_said {
            self.session.same_nat_said = true;
            self.events
                .push_back(Event::PeerBehindOurNat { public: *peer.ip() });
        }
        let input = AimInput {
            config: &self.config,
            peer,
            peer_hint: self.attempt.peer_hint,
            predicted: self.predicted(),
            plan: self.attempt.plan,
            extended_session: self.session.token.is_some(),
            round: self.round,
            rtt: self.rtt(),
        };
        let PunchPlan {
            targets,
            slots,
            passes,
            second_pass_after,
            timeout,
        } = self.config.strategy.aim().plan(&input);
        let target = targets.first().copied();
        self.events.push_back(Event::PeerInfo { peer, target });
        let Some(target) = target else {
            // A session of ours aims again from a fresh EXCHANGE (the NAT moves on).
            if !self.re_aim(now) {
                self.lose(now, LoseReason::TargetOutOfRange);
            }
            return;
        };
        self.phase = Phase::Punching { peer };
        self.session.side = self.leads(peer).map(Side::of);
        if self.session.token.is_some() {
            self.session.peer = Some(peer);
        }
        let hard = self.hard_nat_plan();
        self.attempt.hard = hard.is_some();
        if let Some(after) = second_pass_after {
            self.attempt.pending_pass = Some(PendingPass {
                targets: targets.clone(),
                slots: usize::from(slots),
            });
            self.timers.set(Timer::Pass, crate::later(now, after));
        }
        // The first pass makes one new mapping per slot and target; later passes reuse them.
        self.own_mappings += u32::from(slots) * targets.len() as u32;
        for _ in 0..passes {
            for &t in &targets {
                self.punch_pass(now, t, usize::from(slots));
            }
        }
        self.events.push_back(Event::PunchSent {
            target,
            datagrams: usize::from(slots) * usize::from(passes) * targets.len(),
        });
        let mut timeout = timeout;
        if let Some((plan, why)) = hard {
            timeout = self.start_hard_nat(now, plan, why, peer, timeout);
        }
        if self.phase != (Phase::Punching { peer }) {
            return; // gave up (an unlikely pair, tried enough)
        }
        self.timers.set(Timer::Phase, crate::later(now, timeout));
        let early = std::mem::take(&mut self.attempt.early_punches);
        for (slot, from) in early {
            if !matches!(self.phase, Phase::Punching { .. }) {
                break; // won on an earlier one
            }
            if self.accepts(peer, from) {
                self.on_peer_punch(now, slot, from);
            }
        }
    }

    /// Our NAT, as the probes show it.
    fn nat_class(&self) -> NatClass {
        if self.probing.preserving == Some(true) {
            return NatClass::Independent;
        }
        match self.probing.predictor.behaviour() {
            NatBehaviour::Unknown => NatClass::Unknown,
            NatBehaviour::Random if self.seen_sequential => NatClass::Sequential,
            NatBehaviour::Random => NatClass::Random,
            NatBehaviour::Sequential { .. } => NatClass::Sequential,
        }
    }

    /// How this pair is punched when one NAT is hard, from our probes and the peer's hint.
    fn hard_nat_plan(&self) -> Option<(HardNatPlan, &'static str)> {
        let peer = match self.attempt.peer_hint? {
            Hint::RANDOM => NatClass::Random,
            Hint::INDEPENDENT => NatClass::Independent,
            Hint::NONE => NatClass::Unknown,
            _ => NatClass::Sequential,
        };
        match (self.nat_class(), peer) {
            (NatClass::Random, NatClass::Independent) => Some((
                HardNatPlan::BirthdayHard,
                "our NAT gives random ports, the peer's keeps them: we open 256 mappings \
                 towards it and it sprays our IP (birthday strategy)",
            )),
            (NatClass::Independent, NatClass::Random) => Some((
                HardNatPlan::BirthdayEasy,
                "the peer's NAT gives random ports, ours keeps them: the peer opens 256 \
                 mappings towards us and we spray its IP (birthday strategy)",
            )),
            (NatClass::Random, NatClass::Random | NatClass::Sequential)
            | (NatClass::Sequential, NatClass::Random) => Some((
                HardNatPlan::Unlikely,
                "both NATs map per destination and one gives random ports: a hit needs two \
                 coincidences at once (about 3 % within 2,000 datagrams per side); this pair \
                 is unlikely to punch without a relay",
            )),
            _ => None,
        }
    }

    /// Starts the hard-NAT plan of this round; returns the round's timeout.
    fn start_hard_nat(
        &mut self,
        now: Instant,
        plan: HardNatPlan,
        why: &'static str,
        peer: SocketAddrV4,
        timeout: Duration,
    ) -> Duration {
        let first = match plan {
            HardNatPlan::Unlikely => !self.unlikely_said,
            _ => true,
        };
        if first {
            self.events.push_back(Event::HardNat { plan, why });
        }
        let spray_time = SPRAY_TICK * u32::from(SPRAY_MAX.div_ceil(SPRAY_BATCH));
        match plan {
            HardNatPlan::BirthdayHard => {
                if self.extra_slots == 0 {
                    self.extra_slots = BIRTHDAY_SLOTS;
                    self.commands.push_back(Command::OpenSlots {
                        count: BIRTHDAY_SLOTS,
                    });
                }
                // One datagram from each towards the peer's one port opens 256 mappings.
                let base = usize::from(self.config.window_slots() + self.config.probe_slots());
                if self.spend(now, u32::from(self.extra_slots)) {
                    let payload = self.punch_bytes();
                    self.own_mappings += u32::from(self.extra_slots);
                    for i in 0..usize::from(self.extra_slots) {
                        self.transmits.push_back(Transmit {
                            slot: base + i,
                            destination: peer.into(),
                            payload,
                        });
                    }
                }
                timeout.max(spray_time + self.rtt().saturating_mul(4))
            }
            HardNatPlan::BirthdayEasy => {
                self.attempt.spray = Some((*peer.ip(), 0));
                self.spray_tick(now);
                timeout.max(spray_time + self.rtt().saturating_mul(4))
            }
            HardNatPlan::Unlikely => {
                self.unlikely_said = true;
                self.unlikely_rounds += 1;
                if self.unlikely_rounds > UNLIKELY_ROUNDS {
                    self.finish();
                    self.events.push_back(Event::GaveUp { rounds: self.round });
                }
                timeout
            }
        }
    }

    /// The easy side's spray: a few PUNCHes from the EXCHANGE's socket to random ports of the
    /// peer's IP, every tick, until [`SPRAY_MAX`] or the round ends.
    fn spray_tick(&mut self, now: Instant) {
        self.timers.stop(Timer::Spray);
        let Some((ip, sent)) = self.attempt.spray else {
            return;
        };
        if !matches!(self.phase, Phase::Punching { .. }) || sent >= SPRAY_MAX {
            self.attempt.spray = None;
            return;
        }
        let n = SPRAY_BATCH.min(SPRAY_MAX - sent);
        if self.spend(now, u32::from(n)) {
            let payload = self.punch_bytes();
            for _ in 0..n {
                let port = 1024 + (self.rng.next_u32() % (65536 - 1024)) as u16;
                self.transmits.push_back(Transmit {
                    slot: self.exchange_slot,
                    destination: SocketAddrV4::new(ip, port).into(),
                    payload,
                });
            }
        }
        self.attempt.spray = Some((ip, sent + n));
        self.timers.set(Timer::Spray, crate::later(now, SPRAY_TICK));
    }

    /// One PUNCH from each of the first `slots` slots to `target`, if the budget allows.
    fn punch_pass(&mut self, now: Instant, target: SocketAddrV4, slots: usize) {
        if !self.spend(now, u32::try_from(slots).unwrap_or(u32::MAX)) {
            return;
        }
        let payload = self.punch_bytes();
        for slot in 0..slots {
            self.transmits.push_back(Transmit {
                slot,
                destination: target.into(),
                payload,
            });
        }
    }

    fn win(&mut self, now: Instant, slot: usize, peer: SocketAddr) {
        let strategy = self.report_win(slot, peer);
        self.attempt.pending_pass = None;
        self.timers.stop(Timer::Pass);
        self.timers.stop(Timer::Probe);
        let acks = if strategy.extended() {
            EXT_ACKS
        } else {
            self.config.ack_count
        };
        self.send_ack(now, slot, peer, acks);
    }

    /// Takes `n` datagrams to peers from this period's budget; `false` (and, once a period,
    /// [`Event::BudgetExhausted`]) if they do not fit.
    fn spend(&mut self, now: Instant, n: u32) -> bool {
        if now.saturating_duration_since(self.budget.0) >= BUDGET_PERIOD {
            self.budget = (now, 0);
            self.budget_said = false;
        }
        let limit = self.config.punch_budget_per_minute();
        if self.budget.1.saturating_add(n) > limit {
            if !self.budget_said {
                self.budget_said = true;
                self.events.push_back(Event::BudgetExhausted {
                    budget: limit,
                    until: crate::later(self.budget.0, BUDGET_PERIOD),
                });
            }
            return false;
        }
        self.budget.1 += n;
        true
    }

    fn send_ack(&mut self, now: Instant, slot: usize, peer: SocketAddr, acks_left: u16) {
        if acks_left == 0 {
            // Leaving only now keeps a session peer's round intact while our acks reach it.
            if self.connected {
                self.connected = false;
                self.commands.push_back(Command::Close);
            }
            self.finish();
            self.events.push_back(Event::Finished);
            return;
        }
        // Acknowledgements answer a PUNCH that came from the peer, so no lying server can
        // draw them: counted, never refused.
        self.budget.1 = self.budget.1.saturating_add(1);
        self.transmits.push_back(Transmit {
            slot,
            destination: peer,
            payload: self.punch_bytes(),
        });
        self.phase = Phase::Won {
            slot,
            peer,
            acks_left: acks_left - 1,
        };
        let interval = if self.predicted() {
            EXT_ACK_INTERVAL
        } else {
            self.config.ack_interval
        };
        // The burst ends one interval after the last PUNCH, like v1's sleep after each send.
        self.timers.set(Timer::Phase, crate::later(now, interval));
    }

    fn lose(&mut self, now: Instant, reason: LoseReason) {
        self.events.push_back(Event::Lose {
            round: self.round,
            reason,
        });
        // A predicted round lost in a live session is re-run at once on the same connection.
        if reason == LoseReason::Timeout && self.session_has_room() {
            self.start_round(now, true);
            return;
        }
        if self.connected {
            self.connected = false;
            self.commands.push_back(Command::Close);
        }
        let wait = match reason {
            LoseReason::ServerClosed | LoseReason::ServerGarbage | LoseReason::BadPeerAddress => {
                self.config.retry_delay
            }
            _ => Duration::ZERO,
        };
        self.attempt.pending_pass = None;
        self.timers.stop(Timer::Pass);
        self.timers.stop(Timer::Probe);
        if wait.is_zero() {
            self.start_round(now, false);
        } else {
            self.phase = Phase::Between { rehello: false };
            self.timers.set(Timer::Phase, crate::later(now, wait));
        }
    }

    /// A new connection and HELLO in the same round and window, after the server ended our
    /// wait for a partner.
    fn reconnect(&mut self, now: Instant) {
        self.phase = Phase::Connecting;
        self.connected = false;
        self.reset_connection();
        self.hello_sent = None;
        self.commands.push_back(Command::Connect);
        self.connect_sent = Some(now);
    }

    /// Forgets what belonged to the server connection (its token, handshake, our side), before
    /// a new one; the round's peer, hint and used EXCHANGE sockets stay (a re-HELLO is still
    /// the same round; a fresh round clears them itself).
    fn reset_connection(&mut self) {
        // A re-HELLO stays in the round: its EXCHANGE sockets and the peer it knows stay too.
        let Session {
            exchanges_made,
            peer,
            hinted,
            ..
        } = self.session;
        self.session = Session {
            // Keyless datagrams carry the identifier; keyed ones wait for the new handshake.
            wire: match self.config.key {
                None => Some(Wire::Plain(self.config.ident)),
                Some(_) => None,
            },
            exchanges_made,
            peer,
            hinted,
            ..Session::default()
        };
    }

    fn finish(&mut self) {
        // Nothing more will happen, so the server connection goes too (a session that gives
        // up at `max_rounds` still holds it).
        if self.connected {
            self.connected = false;
            self.commands.push_back(Command::Close);
        }
        self.phase = Phase::Done;
        self.timers.stop(Timer::Phase);
        self.timers.stop(Timer::Probe);
        self.attempt.pending_pass = None;
        self.timers.stop(Timer::Pass);
    }
}

/// Local ports of a window; all 0 (ephemeral) when `start` is 0.
fn window_ports(start: u16, count: u16) -> Vec<u16> {
    (0..count)
        .map(|i| if start == 0 { 0 } else { start + i })
        .collect()
}

/// The next window follows the current one (the original's `start += count`); when it would pass
/// 65535 it wraps back to the first window instead of overflowing.
fn next_window_start(start: u16, count: u16, first: u16) -> u16 {
    if start == 0 {
        return 0;
    }
    let next = u32::from(start) + u32::from(count);
    if next + u32::from(count) - 1 > 65535 {
        first
    } else {
        next as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shift_by_count_and_wrap_instead_of_overflowing() {
        assert_eq!(next_window_start(30000, 25, 30000), 30025);
        assert_eq!(next_window_start(65500, 25, 30000), 30000);
        assert_eq!(next_window_start(65486, 25, 30000), 65511);
        assert_eq!(next_window_start(0, 25, 0), 0);
        assert_eq!(window_ports(0, 3), vec![0, 0, 0]);
        assert_eq!(window_ports(65533, 3), vec![65533, 65534, 65535]);
    }
}
