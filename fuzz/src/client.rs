//! The `client` target: arbitrary configurations (both strategies), server bytes, connect
//! results, datagrams on any open slot from any address (punches, ACKs, CONFIRMs, probe
//! replies, window slot 0's probe answer, garbage), closes and time, applied to [`Client`]
//! through a well-behaved driver model.
//!
//! The driver only reports what a real one could: a connect result after `Connect`, stream
//! events while connected, datagrams on the slots it opened (window, probe and extra slots),
//! timers at or after their deadline. After every step it checks:
//! - `Client::new` refuses exactly the invalid configurations;
//! - commands make sense for the driver (one `Connect` per fresh round or re-HELLO, writes and
//!   `Close` only while connected, one HELLO per connection, windows of `window_slots`
//!   consecutive ports that never pass 65535 followed by `probe_slots` ephemeral ones, a new
//!   window only once the old connection is gone, `OpenSlots { count: 256 }` exactly when a
//!   birthday round's hard side needs its extra slots, once a window); undecodable server
//!   bytes end the connection;
//! - every transmit uses an open slot: EXCHANGEs go to the server from a window slot after
//!   READY, with the round's token and its planned hint (a v1 one from slot 0); PROBEs to the
//!   probe port from the probe slots in order, and from window slot 0 exactly once a window,
//!   right before the first, when its port is known; PUNCHes from a window slot to the round's
//!   target, the birthday strategy's exactly as below; and the answers to the peer exactly as
//!   the model of the confirmed WIN says (below);
//! - `Planned` is exactly the predictor's plan (`client.predictor()`, as it was at that point
//!   of the step), except that a NAT that kept window slot 0's port (its PROBE answer named
//!   it) gives hint INDEPENDENT; `PunchSent` counts the planned window's passes;
//! - a datagram on window slot 0 from the probe port is that PROBE's answer, never the
//!   peer's; the peer's datagrams (on window and extra slots) are judged as the model judges
//!   them (keyless: PUNCH, ACK and CONFIRM carrying our identifier, from an acceptable source,
//!   with the peer known from this round's PEERINFO or, while a session round waits for it,
//!   the session's last one; PUNCHes before that are kept, the first per source IP for
//!   [`EARLY_PUNCH_SOURCES`] IPs, and judged at PEERINFO):
//!   - a PUNCH wins the v1 way (WIN, then the acknowledgement burst: `ack_count` PUNCHes for a
//!     v1 round, 3 for a predicted one) unless the client is *confirming* (an extended READY
//!     and a SEEN that orders the two public addresses); then it is ACKed on its pair (once per
//!     pair, 16 pairs per attempt), and the attempt's first one arms the v1 fallback (unless a
//!     HINT, ACK or CONFIRM showed the peer is ours): WIN the v1 way on it at
//!     `max(2·RTT, 100 ms)` if still punching;
//!   - an ACK or CONFIRM shows the peer is ours (disarms the fallback); an ACK to the leader
//!     (the lower public address) or a CONFIRM to the other side wins at once on its pair: the
//!     leader sends 3 CONFIRMs there, then both leave (`Close`, `Finished`) in that step;
//!     an ACK to the other side on a pair it has not ACKed is ACKed back (same cap);
//!   - every WIN the model expects happens, and no other;
//! - PEERINFO aims at the peer's port plus its hint (INDEPENDENT: exactly its port), else
//!   plus v1's offset; with a hint, the pair's NAT classes (ours: port-keeping, else the
//!   predictor's behaviour, "random" read as sequential once a plan saw it sequential; the
//!   peer's from its hint) choose a hard-NAT plan, announced by `HardNat` (an unlikely pair
//!   once per client):
//!   - birthday, hard side (ours random, the peer's port-keeping): one PUNCH from each of 256
//!     extra slots to the PEERINFO address, right after the punch passes;
//!   - birthday, easy side (ours port-keeping, the peer's random): the spray, 5 PUNCHes every
//!     10 ms from the EXCHANGE slot to the peer's IP at ports drawn from the client's
//!     ChaCha20 (as the model draws them from the same seed), 1,024 at most, only while
//!     punching;
//!   - both: the round lasts `max(its timeout, 2.05 s + 4·RTT)`;
//!   - unlikely (per-destination NATs, one random): the 4th such round gives up (`GaveUp`)
//!     at PEERINFO, its punches out;
//! - a predicted attempt (an extended session whose peer gave a HINT in this attempt or an
//!   earlier one), not a hard-NAT plan, of a live connection, that reaches its punching
//!   deadline or whose PEERINFO names a target out of range is re-aimed while the round has
//!   re-aims left ([`MAX_REAIMS`]): `ReAimed` with the round unchanged and the attempt
//!   numbered 2, 3, … (at most `MAX_REAIMS + 1`), no LOSE; the attempt's state is forgotten
//!   (hint, PEERINFO, aim, ACKed pairs, timers); after a pause of `2·RTT · n / 1024` (`n`
//!   drawn from the client's ChaCha20, as the model draws it; a probe answer does not cut it
//!   short) a fresh EXCHANGE goes (`Planned`,
//!   `ExchangeSent`, from the window's next socket) with the next session round, unless a
//!   PEERINFO came first; otherwise the attempt's end is the round's LOSE (timeout, target
//!   out of range); a WIN after re-aims names the same round;
//! - every EXCHANGE with a token carries the session round (1 after READY, one more per
//!   in-session round and per re-aim) and comes from the socket of the attempt's latest fresh
//!   EXCHANGE; PEERINFO is awaited `round_timeout` after the attempt's first EXCHANGE, then
//!   LOSE no-peerinfo (so a round lasts at most `MAX_REAIMS + 1` attempts of a pause, that
//!   wait and a punching deadline);
//! - rounds are numbered 1, 2, …; each ends in at most one of WIN or LOSE; a punching attempt
//!   ends at its deadline, not before (the client's next timer is never after it, nor after
//!   the spray's tick); `max_rounds` is respected; the server closing the connection ≥ 1 s
//!   after HELLO while READY is awaited is a re-HELLO (same round, a new connection), earlier
//!   a LOSE; a REFUSED from the server ends the client;
//! - `peer_is_ours()` says what the connection showed (a HINT, a genuine ACK or CONFIRM);
//! - `poll_timeout()` is never in the past, fires finitely often at one instant, and the
//!   client is never stuck (no timer and nothing pending on the network) unless finished;
//! - once finished, nothing more comes out, whatever goes in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use n4_core::{
    Client, ClientConfig, Command, Event, Frame, FrameDecoder, HardNatPlan, Hint, LongMessage,
    LoseReason, Message, NatBehaviour, Plan, PortPredictor, RefuseReason, Side, Strategy, Token,
    Transmit, BIRTHDAY_SLOTS, EARLY_PUNCH_SOURCES, MAX_REAIMS, SPRAY_MAX, UNLIKELY_ROUNDS,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

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
/// Pairs a client ACKs per attempt at most (a re-aim forgets them).
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
/// A predicted round waits `max(4·RTT, this)` (at most `round_timeout`) for the peer.
const PREDICTED_ROUND_MIN: Duration = Duration::from_millis(200);
/// The birthday spray: this many PUNCHes every tick.
const SPRAY_BATCH: u16 = 5;
const SPRAY_TICK: Duration = Duration::from_millis(10);

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
    /// `max_window = this % 16` (up to 15 slots: a window can outlast a round's 12 attempts).
    pub max_window: u8,
    /// `rng_seed = [this; 32]` (the client's ChaCha20 draws the spray's ports and the
    /// re-aims' pauses from it).
    pub rng_seed: u8,
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
        /// Slot, modulo the number of open slots (window, probe and extra slots).
        slot: u16,
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
    /// HINT with one of the sentinels: NONE, RANDOM, INDEPENDENT (`this % 3`).
    HintSentinel(u8),
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
    /// The server's answer to window slot 0's PROBE saying the NAT kept its port: SEEN from
    /// the probe port naming the window's first port (the source is forced).
    PortKept,
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
    /// WINs of the other side on the leader's proven pair (no CONFIRM came).
    pub confirm_waits: u32,
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
    /// PROBEs from window slot 0 (does the NAT keep ports?).
    pub slot0_probes: u32,
    /// Plans that told the peer to aim at our EXCHANGE's port exactly (`Hint::INDEPENDENT`).
    pub independent_plans: u32,
    /// `HardNat` events, per plan.
    pub birthday_hard: u32,
    /// See `birthday_hard`.
    pub birthday_easy: u32,
    /// See `birthday_hard`.
    pub unlikely: u32,
    /// Extra slots opened (`OpenSlots`).
    pub extra_slots_opened: u32,
    /// PUNCHes from the extra slots.
    pub extra_slot_punches: u32,
    /// Spray PUNCHes.
    pub sprayed: u32,
    /// ACKs a follower sent for an ACK on a pair it had not ACKed.
    pub follower_acks: u32,
    /// WINs on an extra slot.
    pub extra_slot_wins: u32,
    /// The client gave up on a pair unlikely to punch.
    pub unlikely_gave_up: bool,
    /// Re-aims (`ReAimed`), in all rounds.
    pub reaims: u32,
    /// Re-aims after a PEERINFO whose target was out of range.
    pub reaims_out_of_range: u32,
    /// The highest attempt number seen (1 without re-aims).
    pub max_attempt: u32,
    /// Re-aims' EXCHANGEs sent.
    pub reaim_exchanges: u32,
    /// WINs of rounds that re-aimed.
    pub reaimed_wins: u32,
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
        max_window: u16::from(c.max_window % 16),
        // Unbounded here: the model does not predict when a budget runs out (the budget has
        // its own tests in n4-core/tests/hardening.rs).
        punch_budget: u32::MAX,
        // Keyless: the model speaks v1's wire (PUNCH, ACK, CONFIRM with the identifier).
        key: None,
        rng_seed: [c.rng_seed; 32],
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

/// What a keyless datagram says, if the peer's side sent it: an ACK or CONFIRM carrying our
/// own side (`ours`, once known) is our own, reflected back.
fn says(config: &ClientConfig, bytes: &[u8], ours: Option<Side>) -> Option<Says> {
    let id = config.ident;
    let theirs = |side: Side| side == Side::Unknown || Some(side) != ours;
    match Message::decode(bytes).ok()? {
        Message::Punch(i) if i == id => Some(Says::Punch),
        Message::Ack(i, side) if i == id && theirs(side) => Some(Says::Ack),
        Message::Confirm(i, side) if i == id && theirs(side) => Some(Says::Confirm),
        _ => None,
    }
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

/// A NAT as the client classifies it for a hard pair (its own from its probes, the peer's from
/// its hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatClass {
    Unknown,
    /// Keeps a socket's port (window slot 0's PROBE came back with its own port).
    Independent,
    Sequential,
    Random,
}

/// Our NAT: port-keeping if window slot 0's PROBE said so, else what the probes show, where
/// "random" after the NAT was once seen sequential at a plan stays sequential (block jumps).
fn own_class(preserving: Option<bool>, b: NatBehaviour, seen_sequential: bool) -> NatClass {
    if preserving == Some(true) {
        return NatClass::Independent;
    }
    match b {
        NatBehaviour::Unknown => NatClass::Unknown,
        NatBehaviour::Random if seen_sequential => NatClass::Sequential,
        NatBehaviour::Random => NatClass::Random,
        NatBehaviour::Sequential { .. } => NatClass::Sequential,
    }
}

/// The peer's NAT, from its hint.
fn peer_class(hint: Hint) -> NatClass {
    match hint {
        Hint::RANDOM => NatClass::Random,
        Hint::INDEPENDENT => NatClass::Independent,
        Hint::NONE => NatClass::Unknown,
        _ => NatClass::Sequential,
    }
}

/// How a pair is punched when one NAT is hard: the random side opens many mappings towards
/// the port-keeping side, which sprays; per-destination NATs with a random one are unlikely.
fn hard_plan(ours: NatClass, peer: NatClass) -> Option<HardNatPlan> {
    use NatClass::*;
    match (ours, peer) {
        (Random, Independent) => Some(HardNatPlan::BirthdayHard),
        (Independent, Random) => Some(HardNatPlan::BirthdayEasy),
        (Random, Random | Sequential) | (Sequential, Random) => Some(HardNatPlan::Unlikely),
        _ => None,
    }
}

/// How long the easy side sprays at most: `ceil(SPRAY_MAX / 5)` ticks of 10 ms.
fn spray_time() -> Duration {
    SPRAY_TICK * u32::from(SPRAY_MAX.div_ceil(SPRAY_BATCH))
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
    let rng = ChaCha20Rng::from_seed(config.rng_seed);
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
        side: None,
        peer_ours: false,
        rehello_pending: false,
        rounds: Vec::new(),
        session_peer: None,
        session_hinted: false,
        preserving: None,
        seen_sequential: false,
        unlikely_said: false,
        unlikely_rounds: 0,
        extra_open: false,
        step_opened: None,
        pred_before: None,
        rng,
        exchange_slot: 0,
        window_probes: 0,
        slot0_probe: false,
        probe_window_first: 0,
        new_window: false,
        session_round: 0,
        step_session_rounds: Vec::new(),
        exchanges_made: 0,
        step_exchange_slots: Vec::new(),
        step_planned: false,
        step_targets: Vec::new(),
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
    /// The step delivered a PROBE answer (SEEN from the probe port) on a probe slot.
    probe_answer: bool,
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

/// A PUNCH of the hard-NAT plans the model expects in this step, in order, among the step's
/// other transmits: from an extra slot (birthday, hard side) or a spray PUNCH from the
/// EXCHANGE's socket (birthday, easy side; its slot is known once the EXCHANGE is seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HardPunch {
    /// `None`: the client's EXCHANGE slot.
    slot: Option<usize>,
    to: SocketAddr,
}

/// How an attempt that did not win ends (at its punching deadline, or at a PEERINFO whose
/// target is out of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptEnd {
    /// `ReAimed`: a predicted attempt of a live extended session with re-aims left.
    ReAim,
    /// The round's LOSE, for this reason.
    Lose(LoseReason),
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
    /// A `HardNat` event is due (this plan).
    hard_nat: Option<HardNatPlan>,
    /// `OpenSlots { count: BIRTHDAY_SLOTS }` is due.
    open_slots: bool,
    /// The hard-NAT PUNCHes due, in order.
    hard: Vec<HardPunch>,
    /// An unlikely pair was tried `UNLIKELY_ROUNDS` times: `GaveUp` is due at PEERINFO.
    gave_up: bool,
    /// The attempt ends in this step, so.
    attempt_end: Option<AttemptEnd>,
    /// A re-aim's EXCHANGE is due in this step (its pause is over; probe answers do not end it).
    exchange: bool,
    /// The wait for PEERINFO is over (`round_timeout` after the attempt's first EXCHANGE):
    /// LOSE no-peerinfo is due.
    no_peer_info: bool,
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
    /// The other side: the first pair the leader's ACK proved, taken as the hole if no
    /// CONFIRM came by then.
    confirm_wait: Option<(Instant, usize, SocketAddr)>,
    won: Option<(usize, SocketAddr, Strategy, WinKind)>,
    /// Acknowledgement-burst PUNCHes sent after WIN.
    acks: u16,
    /// CONFIRMs sent after WIN.
    confirms: u16,
    lost: bool,
    /// The last `Planned` of the round: (window, hint).
    plan: Option<(u16, Hint)>,
    /// When the punching round ends without a WIN (set at PEERINFO).
    deadline: Option<Instant>,
    /// The easy side's spray: target IP and PUNCHes sent, and the next tick.
    spray: Option<(Ipv4Addr, u16)>,
    spray_at: Option<Instant>,
    /// Re-aims in this round (`ReAimed`; the attempt is `reaims + 1`).
    reaims: u32,
    /// This attempt plays a hard-NAT plan (it is not re-aimed).
    hard: bool,
    /// When this attempt's first EXCHANGE went out (`ExchangeSent`).
    exchange_at: Option<Instant>,
    /// After a re-aim: when its EXCHANGE is due (the end of the random pause).
    reaim_at: Option<Instant>,
}

impl RoundModel {
    /// What a re-aim forgets: everything of one attempt (the hint, PEERINFO, the aim, pairs,
    /// timers), not the round's token, WIN or LOSE.
    fn reset_attempt(&mut self) {
        self.hint = None;
        self.peer = None;
        self.target = None;
        self.early.clear();
        self.acked.clear();
        self.first_punch = None;
        self.fallback = None;
        self.confirm_wait = None;
        self.plan = None;
        self.deadline = None;
        self.spray = None;
        self.spray_at = None;
        self.hard = false;
        self.exchange_at = None;
        self.reaim_at = None;
    }

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
    /// Our side of the confirmation, as the connection's last PEERINFO settled it.
    side: Option<Side>,
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
    /// Per window: what window slot 0's PROBE answer said (its port is the window's first).
    preserving: Option<bool>,
    /// Our NAT was classified sequential at some plan (then "random" stays sequential).
    seen_sequential: bool,
    /// The first unlikely pair was reported, and how many unlikely rounds were played.
    unlikely_said: bool,
    unlikely_rounds: u32,
    /// Per window: the birthday strategy's extra slots are open.
    extra_open: bool,
    /// `OpenSlots` came in this step (its count).
    step_opened: Option<u16>,
    /// In a stream step, the predictor as it was before the step, until the step's first SEEN
    /// event (the one observation a stream step can make comes right before it).
    pred_before: Option<PortPredictor>,
    /// The client's RNG, drawn as the client draws it (keyless, only the spray and the re-aim
    /// pause draw).
    rng: ChaCha20Rng,
    /// The client's EXCHANGE slot: the latest EXCHANGE's (a v1 round's is slot 0, sent or
    /// not), kept across rounds (a PEERINFO before this round's EXCHANGE sprays from it).
    exchange_slot: usize,
    /// Per window: PROBEs from probe slots, whether window slot 0 probed, and the window's
    /// first port.
    window_probes: u16,
    slot0_probe: bool,
    probe_window_first: u16,
    /// A window opened in this step: the PROBE counts restart after its transmits.
    new_window: bool,
    /// Per connection: the session round the next EXCHANGE carries (1 at READY, one more per
    /// in-session round and per re-aim, saturating), and the values it took in this step.
    session_round: u8,
    step_session_rounds: Vec<u8>,
    /// Per window: EXCHANGE sockets used (a fresh one per attempt's first EXCHANGE and per
    /// refresh), and the slots an EXCHANGE of this step may use: the current socket's, or
    /// after a `Planned` in the step only the fresh ones.
    exchanges_made: usize,
    step_exchange_slots: Vec<usize>,
    step_planned: bool,
    /// Targets of attempts re-aimed in this step (their last punch pass may be in it).
    step_targets: Vec<SocketAddr>,
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

    /// Our side of the confirmation with the peer this attempt (or the session) names.
    fn our_side(&self) -> Option<Side> {
        // Settled at PEERINFO (a re-aim's SEEN does not move it), forgotten with the
        // connection.
        self.side
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
    fn on_genuine_punch(&mut self, slot: usize, from: SocketAddr) {
        let extended = self.rounds.last().is_some_and(RoundModel::extended);
        if !(extended && self.our_side().is_some()) {
            self.expect_win(slot, from, WinKind::V1, false);
            return;
        }
        let arm = !self.peer_ours && matches!(self.phase(), Phase::Punching(_));
        let rtt = self.client.predictor().rtt().unwrap_or(DEFAULT_RTT);
        let fallback = self.now + rtt.saturating_mul(2).max(V1_FALLBACK_MIN);
        self.ack_pair(slot, from);
        let r = self.rounds.last_mut().expect("a round has started");
        if r.first_punch.is_none() {
            r.first_punch = Some((slot, from));
            if arm {
                r.fallback = Some(fallback);
            }
        }
    }

    /// An ACK on (`slot`, `from`): once per pair, [`MAX_ACKED`] pairs per attempt. Returns
    /// whether one is due.
    fn ack_pair(&mut self, slot: usize, from: SocketAddr) -> bool {
        let ident = self.config.ident;
        let ours = self.our_side().unwrap_or(Side::Unknown);
        let r = self.rounds.last_mut().expect("a round has started");
        if r.acked.len() < MAX_ACKED && !r.acked.contains(&(slot, from)) {
            r.acked.push((slot, from));
            self.expect.replies.push(Reply {
                slot,
                to: from,
                bytes: Message::Ack(ident, ours).to_bytes(),
            });
            return true;
        }
        false
    }

    /// A genuine ACK or CONFIRM from an acceptable source while the peer is known.
    fn on_genuine_answer(&mut self, slot: usize, from: SocketAddr, s: Says) {
        self.peer_ours = true;
        self.round().fallback = None;
        match (self.our_side().map(|s| s == Side::Leader), s) {
            (Some(true), Says::Ack) => self.expect_win(slot, from, WinKind::Lead, false),
            (Some(false), Says::Confirm) => self.expect_win(slot, from, WinKind::Follow, false),
            // The leader's ACK proves the pair: taken as the hole if its CONFIRMs are all lost.
            // A pair we never ACKed (birthday: its PUNCH could not reach us before ours opened
            // our NAT) the follower ACKs, so the leader has its proof.
            (Some(false), Says::Ack) => {
                let punching = matches!(self.phase(), Phase::Punching(_));
                let rtt = self.client.predictor().rtt().unwrap_or(DEFAULT_RTT);
                let at = self.now + rtt.saturating_mul(2).max(V1_FALLBACK_MIN);
                let r = self.round();
                if r.confirm_wait.is_none() && punching {
                    r.confirm_wait = Some((at, slot, from));
                }
                if self.ack_pair(slot, from) {
                    self.outcome.follower_acks += 1;
                }
            }
            _ => {}
        }
    }

    /// What the client must make of a datagram about to be delivered on `slot`.
    fn judge_datagram(&mut self, slot: usize, from: SocketAddr, bytes: &[u8]) {
        let probes = self.window_slots..self.window_slots + usize::from(self.config.probe_slots());
        if probes.contains(&slot) {
            return; // a probe slot: only probe answers count there
        }
        if slot == 0 && from == SocketAddr::from(self.config.probe_server()) {
            // Window slot 0's own PROBE answer, never a peer's datagram: does the NAT keep
            // the port?
            if let Ok(Message::Seen(addr)) = Message::decode(bytes) {
                let first = self.window.as_ref().expect("a window is open")[0];
                self.preserving = Some(addr.port() == first);
            }
            return;
        }
        // Window slots and the birthday strategy's extra slots carry the peer.
        let Some(s) = says(&self.config, bytes, self.our_side()) else {
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
            Says::Punch => self.on_genuine_punch(slot, from),
            Says::Ack | Says::Confirm => self.on_genuine_answer(slot, from, s),
        }
    }

    /// Before `handle_timeout(now)`: the timers that come before the phase's deadline (the
    /// spray, the other side's wait for CONFIRM, the v1 fallback), then the deadline's.
    fn before_timeout(&mut self) {
        self.timers_before_deadline();
        if self.expect.win.is_none() {
            self.deadline_due();
        }
    }

    /// Whether an attempt ending now without a WIN is re-aimed: a predicted attempt (an
    /// extended session whose peer gave a hint in this attempt or an earlier one) of a live
    /// connection, not a hard-NAT plan, with re-aims left in the round.
    fn can_reaim(&self, connected: bool) -> bool {
        let r = self.rounds.last().expect("a round has started");
        connected
            && r.extended()
            && (r.hint.is_some() || self.session_hinted)
            && !r.hard
            && r.reaims < MAX_REAIMS
            && self.session_has_room()
    }

    /// The session can take one more EXCHANGE: a window socket that never talked to the
    /// server, and room in the round byte.
    fn session_has_room(&self) -> bool {
        self.exchanges_made < self.window_slots && self.session_round < u8::MAX
    }

    /// The phase's deadline, if due (no WIN came first in this step): a punching attempt ends
    /// (re-aim or LOSE timeout); a re-aim's pause ends (its EXCHANGE); the wait for PEERINFO
    /// ends (LOSE no-peerinfo).
    fn deadline_due(&mut self) {
        let now = self.now;
        let phase = self.phase();
        let connected = self.connected;
        let round_timeout = self.config.round_timeout;
        let Some(r) = self.rounds.last() else {
            return;
        };
        match phase {
            Phase::Punching(_) if r.deadline.is_some_and(|d| d <= now) => {
                self.expect.attempt_end = Some(if self.can_reaim(connected) {
                    AttemptEnd::ReAim
                } else {
                    AttemptEnd::Lose(LoseReason::Timeout)
                });
            }
            Phase::AwaitPeerInfo => {
                if r.reaim_at.is_some_and(|t| t <= now) {
                    self.expect.exchange = true;
                } else if r.exchange_at.is_some_and(|t| t + round_timeout <= now) {
                    self.expect.no_peer_info = true;
                }
            }
            _ => {}
        }
    }

    fn timers_before_deadline(&mut self) {
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
        if self
            .rounds
            .last()
            .is_some_and(|r| r.spray_at.is_some_and(|t| t <= now))
        {
            self.spray_tick();
        }
        let Some(r) = self.rounds.last_mut() else {
            return;
        };
        if let Some((_, slot, from)) = r.confirm_wait.filter(|&(at, ..)| at <= now) {
            r.confirm_wait = None;
            if matches!(phase, Phase::Punching(_)) {
                self.outcome.confirm_waits += 1;
                self.expect_win(slot, from, WinKind::Follow, false);
                return;
            }
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

    /// A tick of the easy side's spray: [`SPRAY_BATCH`] PUNCHes (fewer to reach
    /// [`SPRAY_MAX`]) from the EXCHANGE's socket to random ports of the peer's IP, drawn from
    /// the client's RNG, and the next tick in [`SPRAY_TICK`]; none once the round is no
    /// longer punching.
    fn spray_tick(&mut self) {
        let now = self.now;
        let punching = matches!(self.phase(), Phase::Punching(_));
        let r = self.rounds.last_mut().expect("a round has started");
        r.spray_at = None;
        let Some((ip, sent)) = r.spray else {
            return;
        };
        if !punching || sent >= SPRAY_MAX {
            r.spray = None;
            return;
        }
        let n = SPRAY_BATCH.min(SPRAY_MAX - sent);
        for _ in 0..n {
            let port = 1024 + (self.rng.next_u32() % (65536 - 1024)) as u16;
            self.expect.hard.push(HardPunch {
                slot: None,
                to: SocketAddrV4::new(ip, port).into(),
            });
        }
        r.spray = Some((ip, sent + n));
        r.spray_at = Some(now + SPRAY_TICK);
    }

    /// The predictor as the client's events of this step saw it (see `pred_before`).
    fn predictor(&self) -> PortPredictor {
        self.pred_before
            .clone()
            .unwrap_or_else(|| self.client.predictor().clone())
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
                self.client.handle_connection_opened(now);
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
                    StreamData::HintSentinel(i) => short(Message::Hint(
                        [Hint::NONE, Hint::RANDOM, Hint::INDEPENDENT][usize::from(i % 3)],
                    )),
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
                self.pred_before = Some(self.client.predictor().clone());
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
                self.client.handle_connection_closed(now);
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
                // Only slots the driver opened: the client judges a datagram on any slot
                // outside the probe slots as the peer's (window and extra slots alike).
                let slot = usize::from(slot) % window.len();
                let first = window[0];
                let mut from = SocketAddr::new(HOSTS[usize::from(host) % HOSTS.len()], port);
                let id = self.config.ident;
                // The peer's side (the other one than ours, once that is known); `…With(i)`
                // sends either side, our own included (a reflection).
                let peer_side = match self.our_side() {
                    Some(Side::Other) => Side::Leader,
                    _ => Side::Other,
                };
                let any_side =
                    |i: u8| [Side::Unknown, Side::Leader, Side::Other][usize::from(i % 3)];
                let bytes = match *data {
                    DatagramData::Punch => Message::Punch(id).to_bytes().to_vec(),
                    DatagramData::PunchWith(i) => Message::Punch(ident(i)).to_bytes().to_vec(),
                    DatagramData::Ack => Message::Ack(id, peer_side).to_bytes().to_vec(),
                    DatagramData::AckWith(i) => {
                        Message::Ack(ident(i), any_side(i)).to_bytes().to_vec()
                    }
                    DatagramData::Confirm => Message::Confirm(id, peer_side).to_bytes().to_vec(),
                    DatagramData::ConfirmWith(i) => {
                        Message::Confirm(ident(i), any_side(i)).to_bytes().to_vec()
                    }
                    DatagramData::ProbeReply { port } => {
                        from = self.config.probe_server().into();
                        Message::Seen(SocketAddrV4::new(PEER_IPS[1], port))
                            .to_bytes()
                            .to_vec()
                    }
                    DatagramData::PortKept => {
                        from = self.config.probe_server().into();
                        Message::Seen(SocketAddrV4::new(PEER_IPS[1], first))
                            .to_bytes()
                            .to_vec()
                    }
                    DatagramData::Bytes8(b) => b.to_vec(),
                    DatagramData::Raw(ref b) => b.clone(),
                };
                let probes =
                    self.window_slots..self.window_slots + usize::from(self.config.probe_slots());
                step.probe_answer = probes.contains(&slot)
                    && from == SocketAddr::from(self.config.probe_server())
                    && matches!(Message::decode(&bytes), Ok(Message::Seen(_)));
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
        self.step_session_rounds = vec![self.session_round];
        self.step_exchange_slots = self
            .exchanges_made
            .checked_sub(1)
            .map(|n| n % self.window_slots)
            .into_iter()
            .collect();
        self.step_planned = false;
        self.step_targets.clear();
        // Rounds this step's transmits may belong to (a step can end one and start the next).
        let first_round = self.rounds.len().max(1) - 1;
        let won_before = self.rounds.last().is_some_and(|r| r.won.is_some());
        for e in events {
            self.on_event(e, &step);
        }
        self.check_transmits(&transmits, first_round, won_before);
        if std::mem::take(&mut self.new_window) {
            self.window_probes = 0;
            self.slot0_probe = false;
            self.probe_window_first = self.window.as_ref().expect("opened")[0];
        }
        self.pred_before = None;
        let opened = self.step_opened.take();
        let expect = std::mem::take(&mut self.expect);
        assert_eq!(expect.win, None, "a due WIN did not happen");
        assert_eq!(expect.hard_nat, None, "a due HardNat event did not come");
        assert!(
            !expect.gave_up,
            "an unlikely pair was tried {UNLIKELY_ROUNDS} rounds, but no GaveUp"
        );
        assert_eq!(
            opened,
            expect.open_slots.then_some(BIRTHDAY_SLOTS),
            "OpenSlots: the birthday strategy's hard side opens its extra slots once a window"
        );
        assert!(
            !expect.peer_refused,
            "a refused peer address did not end the round"
        );
        assert!(
            !expect.no_partner,
            "the wait for READY outlived round_timeout (retry round or max_rounds)"
        );
        assert_eq!(
            expect.attempt_end, None,
            "the attempt's deadline passed (or its PEERINFO named no target), but it did not end"
        );
        assert!(
            !expect.exchange,
            "a re-aim's EXCHANGE is due (its pause is over) but did not go"
        );
        assert!(
            !expect.no_peer_info,
            "the wait for PEERINFO outlived round_timeout after the attempt's EXCHANGE"
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
        assert_eq!(
            self.client.peer_is_ours(),
            self.peer_ours,
            "peer_is_ours(): a HINT, ACK or CONFIRM on this connection says so"
        );
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
        if self.phase() == Phase::AwaitPeerInfo {
            // A re-aim's EXCHANGE goes at the end of its pause, and PEERINFO is awaited
            // `round_timeout` after the attempt's EXCHANGE: the client wakes up by then.
            let r = self.rounds.last().expect("awaiting PEERINFO");
            let due = [
                r.reaim_at,
                r.exchange_at.map(|t| t + self.config.round_timeout),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(due) = due {
                assert!(
                    timeout.is_some_and(|t| t <= due),
                    "awaiting PEERINFO, but poll_timeout {timeout:?} is after the re-aim's pause \
                     ({:?}) or the end of the wait ({:?})",
                    r.reaim_at,
                    r.exchange_at
                );
            }
        }
        if let Phase::Punching(_) = self.phase() {
            // The attempt ends at its deadline (and the spray ticks on time): the client wakes
            // up by then.
            let r = self.rounds.last().expect("punching");
            let deadline = r.deadline.expect("a punching round has a deadline");
            let next = r.spray_at.map_or(deadline, |s| s.min(deadline));
            assert!(
                timeout.is_some_and(|t| t <= next),
                "punching, but poll_timeout {timeout:?} is after the round's deadline or the \
                 spray's tick ({deadline:?}, {:?})",
                r.spray_at
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
                // PROBEs of this step still belong to the last window (a timer step sends
                // them before the round it ends opens the next window).
                self.new_window = true;
            }
            Command::OpenSlots { count } => {
                assert!(self.step_opened.is_none(), "two OpenSlots in one step");
                let window = self.window.as_mut().expect("OpenSlots with no window");
                assert_eq!(
                    window.len(),
                    self.window_slots + usize::from(self.config.probe_slots()),
                    "OpenSlots twice in a window"
                );
                window.extend(std::iter::repeat_n(0, usize::from(count)));
                self.step_opened = Some(count);
                self.outcome.extra_slots_opened += u32::from(count);
            }
            Command::Connect => {
                assert!(
                    !self.connected && !self.connect_pending,
                    "Connect with one open"
                );
                self.connect_pending = true;
                // A new server connection: what the last one told is forgotten. (A fresh
                // round's forgets at its `RoundStarted`: that step's earlier events, a HINT or
                // SEEN before the bytes that lost the round, still belong to the old one.)
                if std::mem::take(&mut self.rehello_pending) {
                    self.own_public = None;
                    self.side = None;
                    self.peer_ours = false;
                }
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
            Command::Close => {
                assert!(self.connected, "Close while not connected");
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
                    assert!(
                        self.session_has_room(),
                        "a session round with no fresh EXCHANGE socket or round byte left"
                    );
                    self.session_round = self.session_round.saturating_add(1);
                    self.step_session_rounds.push(self.session_round);
                } else {
                    self.session_round = 0;
                    self.exchanges_made = 0;
                    self.session_peer = None;
                    self.session_hinted = false;
                    // A new window: its slot 0 has not asked yet, no extra slots are open.
                    self.preserving = None;
                    self.extra_open = false;
                    // A new server connection, too.
                    self.own_public = None;
                    self.side = None;
                    self.peer_ours = false;
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
                self.session_round = 1;
                self.step_session_rounds.push(1);
            }
            Event::Planned {
                step: planned_step,
                rate,
                rtt,
                window,
                hint,
            } => {
                assert!(self.round().extended(), "a v1 round planned");
                assert!(
                    usize::from(window) <= self.window_slots,
                    "plan wider than the window"
                );
                // The plan is the predictor's, except that a port-keeping NAT (window slot
                // 0's PROBE came back with its own port) tells the peer to aim at our
                // EXCHANGE's port exactly.
                let pred = self.predictor();
                let b = pred.behaviour();
                let class = own_class(self.preserving, b, self.seen_sequential);
                self.seen_sequential |= class == NatClass::Sequential;
                let slots = self.config.window_slots();
                let port_count = self.config.port_count;
                let mut plan = pred.plan(pred.rtt().unwrap_or(DEFAULT_RTT), slots);
                if class == NatClass::Independent {
                    plan = Some(Plan {
                        hint: Hint::INDEPENDENT,
                        window: plan.map_or(port_count, |p| p.window),
                    });
                }
                let (step_, rate_) = match b {
                    NatBehaviour::Sequential { step, rate, .. } => (step, rate.round() as u32),
                    NatBehaviour::Unknown | NatBehaviour::Random => (0, 0),
                };
                let expected = (
                    step_,
                    rate_,
                    pred.rtt(),
                    plan.map_or(port_count, |p| p.window),
                    plan.map_or(Hint::NONE, |p| p.hint),
                );
                assert_eq!(
                    (planned_step, rate, rtt, window, hint),
                    expected,
                    "Planned (step, rate, rtt, window, hint) is not the predictor's"
                );
                assert_eq!(
                    hint == Hint::INDEPENDENT,
                    self.preserving == Some(true),
                    "hint INDEPENDENT exactly when the NAT keeps ports"
                );
                self.outcome.independent_plans += u32::from(hint == Hint::INDEPENDENT);
                self.round().plan = Some((window, hint));
                // Planned comes with every EXCHANGE from a fresh socket (an attempt's first, a
                // refresh): the window's next slot.
                self.exchanges_made += 1;
                if !std::mem::replace(&mut self.step_planned, true) {
                    self.step_exchange_slots.clear();
                }
                self.step_exchange_slots
                    .push((self.exchanges_made - 1) % self.window_slots);
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
            Event::ExchangeSent => {
                let now = self.now;
                let r = self.round();
                let token = r.token;
                assert!(token.is_some());
                assert!(
                    r.exchange_at.is_none() && r.peer.is_none(),
                    "a second first EXCHANGE in an attempt, or one after PEERINFO"
                );
                r.exchange_at = Some(now);
                if r.reaim_at.take().is_some() {
                    assert!(
                        std::mem::take(&mut self.expect.exchange),
                        "a re-aim's EXCHANGE before its pause ended"
                    );
                    self.outcome.reaim_exchanges += 1;
                }
                if token == Some(None) {
                    // A v1 round's first (and only) EXCHANGE socket, even with no copies.
                    self.exchange_slot = 0;
                    self.exchanges_made += 1;
                }
            }
            Event::Seen(addr) => {
                assert!(step.said.contains(&Frame::Short(Message::Seen(addr))));
                assert!(self.round().extended(), "SEEN used by v1");
                self.own_public = Some(addr);
                // The step's one observation (the EXCHANGE's mapping) came with it: what
                // follows sees the predictor as the step leaves it.
                self.pred_before = None;
            }
            Event::PeerInfo { peer, target } => self.on_peer_info(peer, target, step),
            Event::PunchSent { target, datagrams } => {
                assert_eq!(Some(target), self.round().target);
                let passes = usize::from(self.config.punch_passes.max(1));
                assert!(
                    datagrams <= self.window_slots * passes,
                    "more punches than slots"
                );
                // A predicted round punches once from its planned window (a second pass
                // follows); otherwise every pass covers the plan's window, at least `-n`.
                let port_count = self.config.port_count;
                let punch_passes = self.config.punch_passes;
                let hinted = self.session_hinted;
                let r = self.round();
                let predicted = r.extended() && (r.hint.is_some() || hinted);
                let (slots, passes) = match (predicted, r.plan) {
                    (true, plan) => (plan.map_or(port_count, |p| p.0), 1),
                    (false, plan) => (
                        plan.map_or(port_count, |p| p.0.max(port_count)),
                        punch_passes,
                    ),
                };
                assert_eq!(
                    datagrams,
                    usize::from(slots) * usize::from(passes),
                    "PunchSent counts another window"
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
                if matches!(reason, LoseReason::Timeout | LoseReason::TargetOutOfRange) {
                    assert_eq!(
                        self.expect.attempt_end.take(),
                        Some(AttemptEnd::Lose(reason)),
                        "LOSE {reason:?} where the model expects another end of the attempt \
                         (a re-aim while a predicted session has re-aims left)"
                    );
                }
                assert_eq!(
                    reason == LoseReason::NoPeerInfo,
                    std::mem::take(&mut self.expect.no_peer_info),
                    "LOSE {reason:?}, but the wait for PEERINFO was (not) over"
                );
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
                let now = self.now;
                let r = self.round();
                assert!(r.won.is_none(), "LOSE after WIN");
                assert!(!r.lost, "two LOSEs in a round");
                if reason == LoseReason::TargetOutOfRange {
                    assert!(r.peer.is_some() && r.target.is_none());
                }
                if matches!(reason, LoseReason::AuthFailed | LoseReason::BadPeerAddress) {
                    assert!(r.peer.is_none(), "{reason:?} after PEERINFO");
                }
                if reason == LoseReason::Timeout {
                    // Only a punching round times out, at its deadline (a birthday round
                    // gives the spray its time).
                    let deadline = r.deadline.expect("LOSE timeout while not punching");
                    assert!(now >= deadline, "LOSE timeout before the round's deadline");
                }
                assert_ne!(
                    reason,
                    LoseReason::AuthFailed,
                    "a keyless client lost on auth"
                );
                r.lost = true;
                self.outcome.losses += 1;
            }
            Event::ReAimed { round, attempt } => {
                assert_eq!(
                    self.expect.attempt_end.take(),
                    Some(AttemptEnd::ReAim),
                    "ReAimed {{ round: {round}, attempt: {attempt} }} where the model expects \
                     none (not punching, or not a predicted live session, a hard-NAT plan, \
                     no re-aims left, or not the attempt's deadline)"
                );
                assert_eq!(
                    round as usize,
                    self.rounds.len(),
                    "ReAimed names another round"
                );
                // The pause before the new EXCHANGE: up to 2·RTT, from the client's RNG.
                let rtt = self.client.predictor().rtt().unwrap_or(DEFAULT_RTT);
                let pause = rtt * 2 * (self.rng.next_u32() % 1024) / 1024;
                let now = self.now;
                let r = self.rounds.last_mut().expect("a round has started");
                assert!(r.won.is_none() && !r.lost, "ReAimed in a finished round");
                assert_eq!(attempt, r.reaims + 2, "attempts count 2, 3, … in a round");
                r.reaims += 1;
                assert!(
                    r.reaims <= MAX_REAIMS,
                    "more than MAX_REAIMS re-aims in a round"
                );
                let out_of_range = r.peer.is_some() && r.target.is_none();
                if let Some(t) = r.target {
                    self.step_targets.push(t.into());
                }
                r.reset_attempt();
                r.reaim_at = Some(now + pause);
                self.session_round = self.session_round.saturating_add(1);
                self.step_session_rounds.push(self.session_round);
                self.outcome.reaims += 1;
                self.outcome.reaims_out_of_range += u32::from(out_of_range);
                self.outcome.max_attempt = self.outcome.max_attempt.max(attempt);
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
                assert_eq!(rounds as usize, self.rounds.len());
                if std::mem::take(&mut self.expect.gave_up) {
                    // A pair unlikely to punch, tried enough: at PEERINFO, after the punches.
                    let r = self.round();
                    assert!(r.target.is_some() && r.won.is_none() && !r.lost);
                    self.outcome.unlikely_gave_up = true;
                } else {
                    assert_eq!(Some(rounds), self.config.max_rounds);
                    assert!(self.round().lost);
                }
                self.finished = true;
                self.outcome.finished = true;
            }
            Event::PeerBehindOurNat { public } => {
                // Said when PEERINFO names a peer on the public IP our SEEN gave us.
                assert_eq!(
                    self.own_public.map(|me| *me.ip()),
                    Some(public),
                    "PeerBehindOurNat without a SEEN of that IP"
                );
                assert!(
                    step.said.iter().any(|f| matches!(
                        f,
                        Frame::Short(Message::PeerInfo(p)) if *p.ip() == public
                    )),
                    "PeerBehindOurNat without a PEERINFO on that IP"
                );
            }
            Event::HardNat { plan, why } => {
                assert!(!why.is_empty());
                assert_eq!(
                    self.expect.hard_nat.take(),
                    Some(plan),
                    "HardNat {plan:?} the model did not expect"
                );
                match plan {
                    HardNatPlan::BirthdayHard => self.outcome.birthday_hard += 1,
                    HardNatPlan::BirthdayEasy => self.outcome.birthday_easy += 1,
                    HardNatPlan::Unlikely => self.outcome.unlikely += 1,
                }
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
        // The peer's hint, else v1's offset, fixes the aim (a port-keeping peer's: its
        // EXCHANGE's port exactly); a predicting client without a hint (against a v1 server)
        // may sweep, but aims at the peer's IP.
        let strategy = self.config.strategy;
        let offset = match self.round().hint {
            Some(Hint::INDEPENDENT) => Some(0),
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
        assert!(r.peer.is_none(), "two PEERINFOs in an attempt");
        r.peer = Some(peer);
        r.target = target;
        // A PEERINFO before a re-aim's EXCHANGE: that EXCHANGE no longer goes.
        r.reaim_at = None;
        if target.is_none() {
            // No port to aim at: a predicted live session aims again (the stream is live, as
            // the client read PEERINFO from it), else the round is lost.
            self.expect.attempt_end = Some(if self.can_reaim(true) {
                AttemptEnd::ReAim
            } else {
                AttemptEnd::Lose(LoseReason::TargetOutOfRange)
            });
            return;
        }
        let extended = r.extended();
        self.side = self.leads(peer).map(Side::of);
        if extended {
            self.session_peer = Some(peer);
        }
        // How long the round waits for the peer.
        let now = self.now;
        let pred = self.predictor();
        let rtt = pred.rtt().unwrap_or(DEFAULT_RTT);
        let hinted = self.session_hinted;
        let round_timeout = self.config.round_timeout;
        let ours = own_class(self.preserving, pred.behaviour(), self.seen_sequential);
        let r = self.round();
        let predicted = r.extended() && (r.hint.is_some() || hinted);
        let mut timeout = if predicted {
            rtt.saturating_mul(4)
                .max(PREDICTED_ROUND_MIN)
                .min(round_timeout)
        } else {
            round_timeout
        };
        // A hard NAT on either side: our class from our probes, the peer's from its hint.
        let plan = r.hint.and_then(|h| hard_plan(ours, peer_class(h)));
        r.hard = plan.is_some();
        if let Some(plan) = plan {
            if plan != HardNatPlan::Unlikely || !self.unlikely_said {
                self.expect.hard_nat = Some(plan);
            }
            let birthday = timeout.max(spray_time() + rtt.saturating_mul(4));
            match plan {
                HardNatPlan::BirthdayHard => {
                    // 256 more mappings towards the peer's one port, from extra slots after
                    // the window and probe slots (opened once a window).
                    if !self.extra_open {
                        self.extra_open = true;
                        self.expect.open_slots = true;
                    }
                    let base = self.window_slots + usize::from(self.config.probe_slots());
                    for i in 0..usize::from(BIRTHDAY_SLOTS) {
                        self.expect.hard.push(HardPunch {
                            slot: Some(base + i),
                            to: peer.into(),
                        });
                    }
                    timeout = birthday;
                }
                HardNatPlan::BirthdayEasy => {
                    self.round().spray = Some((*peer.ip(), 0));
                    self.spray_tick();
                    timeout = birthday;
                }
                HardNatPlan::Unlikely => {
                    self.unlikely_said = true;
                    self.unlikely_rounds += 1;
                    if self.unlikely_rounds > UNLIKELY_ROUNDS {
                        // Tried enough: the client gives up now, its punches out.
                        self.expect.gave_up = true;
                        self.round().early.clear();
                        return;
                    }
                }
            }
        }
        self.round().deadline = Some(now + timeout);
        // The punches kept from before PEERINFO are judged now, in order, until one wins.
        let early = std::mem::take(&mut self.round().early);
        for (slot, from) in early {
            if self.expect.win.is_some() {
                break;
            }
            if self.acceptable(peer, from) {
                self.on_genuine_punch(slot, from);
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
        let probes = self.window_slots..self.window_slots + usize::from(self.config.probe_slots());
        assert!(
            !probes.contains(&slot) && slot < self.window.as_ref().map_or(0, Vec::len),
            "WIN on a probe slot or on no open slot"
        );
        self.outcome.extra_slot_wins += u32::from(slot >= probes.end);
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
                        bytes: Message::Confirm(ident, Side::Leader).to_bytes(),
                    });
                }
            }
            WinKind::Follow => {}
        }
        self.outcome.wins += 1;
        self.outcome.reaimed_wins += u32::from(self.rounds.last().is_some_and(|r| r.reaims > 0));
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
        let hard = std::mem::take(&mut self.expect.hard);
        if transmits.is_empty() && replies.is_empty() && hard.is_empty() {
            return;
        }
        let window_len = self.window.as_ref().expect("transmit with no window").len();
        let ident = self.config.ident;
        let punch = Message::Punch(ident).to_bytes();
        let confirm = Message::Confirm(ident, Side::Leader).to_bytes();
        let ack = Message::Ack(ident, self.our_side().unwrap_or(Side::Unknown)).to_bytes();
        let server = SocketAddr::from(self.config.server);
        let probe_server = SocketAddr::from(self.config.probe_server());
        if won_before {
            assert!(replies.is_empty(), "model: answers expected after WIN");
            assert!(
                hard.is_empty(),
                "model: hard-NAT punches expected after WIN"
            );
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
        let first_port = self.probe_window_first;
        let probe_slots =
            self.window_slots..self.window_slots + usize::from(self.config.probe_slots());
        // The hard-NAT PUNCHes due come in order among the others (a PUNCH that is both one
        // of them and a punch pass's may count as either: they are the same datagram).
        let mut hard_due = hard.iter().peekable();
        for (i, t) in others.iter().enumerate() {
            assert!(
                t.slot < window_len,
                "transmit on slot {} of {}",
                t.slot,
                window_len
            );
            if let Some(&&h) = hard_due.peek() {
                let slot = h.slot.unwrap_or(self.exchange_slot);
                if t.payload == punch && (t.slot, t.destination) == (slot, h.to) {
                    hard_due.next();
                    if h.slot.is_some() {
                        self.outcome.extra_slot_punches += 1;
                    } else {
                        self.outcome.sprayed += 1;
                    }
                    continue;
                }
            }
            let rounds = &self.rounds[first_round..];
            match Message::decode(&t.payload) {
                Ok(Message::Probe) if t.slot == 0 => {
                    // Window slot 0 asks whether the NAT keeps its port: once a window (with
                    // known local ports), right before the first probe slot's PROBE.
                    assert_eq!(t.destination, probe_server, "PROBE elsewhere");
                    assert!(
                        first_port != 0,
                        "window slot 0 probed from an ephemeral port"
                    );
                    assert!(
                        !self.slot0_probe && self.window_probes == 0,
                        "window slot 0 probed twice, or after the probe slots"
                    );
                    assert!(
                        others
                            .get(i + 1)
                            .is_some_and(|n| probe_slots.contains(&n.slot)
                                && n.payload[..] == Message::Probe.to_bytes()[..]),
                        "window slot 0's PROBE without the first burst"
                    );
                    self.slot0_probe = true;
                    self.outcome.slot0_probes += 1;
                }
                Ok(Message::Probe) => {
                    assert_eq!(t.destination, probe_server, "PROBE elsewhere");
                    assert_eq!(
                        t.slot,
                        self.window_slots + usize::from(self.window_probes),
                        "PROBE from a window slot, or probe slots out of order"
                    );
                    if self.window_probes == 0 {
                        assert_eq!(
                            self.slot0_probe,
                            first_port != 0,
                            "window slot 0 asks in the first burst exactly when its port is known"
                        );
                    }
                    self.window_probes += 1;
                }
                Ok(Message::Exchange(id)) => {
                    assert_eq!((t.destination, id), (server, self.config.ident));
                    assert!(t.slot < self.window_slots, "EXCHANGE from a probe slot");
                    assert!(rounds.iter().any(|r| r.token == Some(None)), "v1 EXCHANGE");
                    assert_eq!(t.slot, 0, "a v1 round's EXCHANGE from another slot than 0");
                    self.exchange_slot = t.slot;
                }
                Ok(Message::ExchangeToken { token, round, hint }) => {
                    assert_eq!(t.destination, server);
                    assert!(t.slot < self.window_slots, "EXCHANGE from a probe slot");
                    assert!(round >= 1);
                    // Each attempt's EXCHANGE carries the next session round (a re-aim's too,
                    // so the server pairs it anew), from the window's next fresh socket.
                    assert!(
                        self.step_session_rounds.contains(&round),
                        "EXCHANGE of session round {round}, the model's: {:?}",
                        self.step_session_rounds
                    );
                    assert!(
                        self.step_exchange_slots.contains(&t.slot),
                        "EXCHANGE from slot {}, not the attempt's socket {:?}",
                        t.slot,
                        self.step_exchange_slots
                    );
                    assert!(
                        rounds.iter().any(|r| r.token == Some(Some(token))),
                        "EXCHANGE with another token"
                    );
                    assert!(
                        rounds
                            .iter()
                            .any(|r| r.token == Some(Some(token))
                                && r.plan.map(|p| p.1) == Some(hint)),
                        "EXCHANGE's hint {hint:?} is not the round's plan"
                    );
                    self.exchange_slot = t.slot;
                }
                Ok(Message::Punch(_)) if t.payload == punch => {
                    assert!(
                        t.slot < self.window_slots,
                        "PUNCH from a probe or extra slot: {t:?}"
                    );
                    let to = |r: &RoundModel| r.target.map(SocketAddr::from);
                    assert!(
                        rounds.iter().any(|r| to(r) == Some(t.destination))
                            || self.step_targets.contains(&t.destination),
                        "PUNCH to no round's (or re-aimed attempt's) target: {t:?}"
                    );
                }
                _ => panic!("client sent {t:?} (answers expected: {replies:?})"),
            }
        }
        let missing: Vec<_> = hard_due.collect();
        assert!(
            missing.is_empty(),
            "hard-NAT PUNCHes due but not sent (exchange slot {:?}): {} of {}, first {:?}",
            self.exchange_slot,
            missing.len(),
            hard.len(),
            missing.first()
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
        w.u8(self.rng_seed);
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
                w.u16(slot);
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
        const N: u32 = 9;
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
            Self::HintSentinel(i) => {
                w.variant(4, N);
                w.u8(i);
            }
            Self::Bytes8(b) => {
                w.variant(5, N);
                w.bytes(&b);
            }
            Self::Raw(_) => unimplemented!("seeds use Bytes8, not Raw"),
            Self::Refused(b) => {
                w.variant(7, N);
                w.u8(b);
            }
            Self::Keyed { kind, fill } => {
                w.variant(8, N);
                w.u8(kind);
                w.u8(fill);
            }
        }
    }
}

impl Encode for DatagramData {
    fn encode(&self, w: &mut Writer) {
        const N: u32 = 10;
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
            Self::PortKept => w.variant(9, N),
        }
    }
}
