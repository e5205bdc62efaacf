//! Sans-IO core of N4, a UDP hole-punching tool for two hosts behind port-incrementing NATs.
//!
//! Three pieces, one file each: [`Message`] (the 8-byte codec, v1 plus our extensions),
//! [`Server`] (the rendezvous server that pairs clients) and [`Client`] (the client that punches).
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

mod client;
mod codec;
mod prediction;
mod server;

pub use client::{
    Client, ClientConfig, Command, ConfigError, Event, LoseReason, Strategy, Transmit,
};
pub use codec::{
    check_round_trip, DecodeError, Hint, Ident, IdentError, Message, StreamDecoder, Token,
    MESSAGE_LEN,
};
pub use prediction::{NatBehaviour, Observation, Plan, PortPredictor};
pub use server::{
    AbandonReason, ConnId, RejectReason, Server, ServerConfig, ServerEvent, ServerOutput,
    ServerStats,
};
