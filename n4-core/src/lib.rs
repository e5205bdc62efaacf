//! Sans-IO core of N4, a UDP hole-punching tool for two hosts behind port-incrementing NATs.
//!
//! Three machines, a file each: the codec ([`Message`], v1's 8 bytes plus our extensions, and
//! [`Frame`]), [`Server`] (the rendezvous server that pairs clients) and [`Client`] (the client
//! that punches); beside them what the client uses: its aim strategies ([`Strategy`]), the
//! prediction of its NAT ([`PortPredictor`]), the keyed handshake ([`Key`]), named timers, and
//! after WIN the [`Hole`] a lasting link keeps.
//!
//! # Design decisions
//! - No IO, no clock, no threads, no global randomness: every input carries `now`, outputs are
//!   polled, randomness comes from a seed in the config. The same machines run under real
//!   sockets (`n4-mio`) and under the simulator (`n4-sim`), and fuzzers can drive them.
//! - Wire-compatible with v1 both ways; extensions are offered in-band (a token in READY) and
//!   used only when both ends are ours. See `docs/PROTOCOL.md`.
//! - Bad input from the network is never a panic: it closes the connection that sent it, or is
//!   ignored if it is a datagram.
#![warn(missing_docs, unreachable_pub)]

mod aim;
mod client;
mod codec;
mod hole;
mod key;
mod prediction;
mod server;
mod session;
mod timer;

pub use aim::Strategy;
pub use client::{
    Client, ClientConfig, Command, ConfigError, Event, HardNatPlan, LoseReason, Transmit,
    BIRTHDAY_SLOTS, BUDGET_PERIOD, EARLY_PUNCH_SOURCES, MAX_REAIMS, SPRAY_MAX, SPRAY_RATE,
    UNLIKELY_ROUNDS,
};
pub use codec::{
    check_round_trip, DecodeError, Frame, FrameDecoder, Hint, Ident, IdentError, LongMessage, Mac,
    Message, Nonce, Payload, RefuseReason, Side, StreamDecoder, Token, MAC_LEN, MAX_FRAME,
    MESSAGE_LEN, NONCE_LEN, PEER_DATA_LEN,
};
pub use hole::{FromPeer, Hole, DEAD_AFTER_KEEPALIVES, KEEPALIVE};
pub use key::{Datagram, Key, KeyError, SessionKey};
pub use prediction::{NatBehaviour, Observation, Plan, PortPredictor};
/// `now + d`, for deadlines: a duration too long for the clock (a misconfigured "forever")
/// becomes a century instead of a panic.
pub(crate) fn later(now: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d.min(CENTURY))
        .or_else(|| now.checked_add(std::time::Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

pub use server::{
    AbandonReason, ConnId, Local, RejectReason, Server, ServerConfig, ServerEvent, ServerOutput,
    ServerStats,
};
