//! A thin mio event loop around `n4-core`'s machines, and the pieces of the `n4` binary.
//!
//! One thread per role: [`run_server`] owns a TCP listener and a UDP socket and drives
//! [`n4_core::Server`]; [`run_client`] owns the window of UDP sockets and the TCP connection
//! and drives [`n4_core::Client`]. The loops only bind, move bytes and read the clock; every
//! protocol decision is the core's.
//!
//! # Design decisions
//! - The drivers follow the core's calling contract literally: after every input, drain
//!   commands (client) or outputs (server) first, then datagrams, then events; sleep until the
//!   earliest `poll_timeout()`. `Instant::now()` is read here and nowhere in the core.
//! - Logs are the original's words (` <= Hello `, `[ WIN ]`, …) so scripts that grep keep
//!   working; the machine-readable result is `--json` on stdout.
//! - SIGINT/SIGTERM arrive through `signal-hook-mio` as a poll event, so shutdown is an
//!   ordinary branch of the loop, not a handler racing it.
#![warn(missing_docs, unreachable_pub)]

mod client;
mod hook;
mod link;
mod log;
mod probe;
mod server;
mod sockets;
mod wg;

pub use client::{run_client, AfterWin, ClientOptions, ClientOutcome, WinReport, KEEPALIVE};
pub use link::{run_link, WireGuardOptions};
pub use log::init_logging;
pub use probe::{run_probe, ProbeOptions, ProbeReport};
pub use server::{run_server, ServerOptions};
pub use sockets::raise_fd_limit;
pub use wg::parse_key as parse_wg_key;

/// 32 bytes from the operating system's RNG, to seed a client's CSPRNG (its handshake
/// nonces). Without an OS RNG, std's hasher keys (which come from it too) as a last resort.
pub fn random_seed() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let mut seed = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut seed) {
        tracing::warn!("no OS random numbers ({e}); seeding from the hasher");
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    seed
}

use std::io;
use std::net::SocketAddr;

/// Process exit codes of the `n4` binary.
pub mod exit {
    /// WIN (client), or a clean stop (server, or a client after WIN with `--keepalive`/`--forward`).
    pub const WIN: i32 = 0;
    /// The client gave up without a WIN: `--rounds`, `--timeout`, or a NAT pair that is
    /// unlikely to punch.
    pub const GAVE_UP: i32 = 1;
    /// Bad flags or flag values.
    pub const USAGE: i32 = 2;
    /// A network error: server unreachable, port in use, name not resolved; a server that
    /// refused our key or cannot serve a keyed session; a WireGuard interface that cannot be
    /// used.
    pub const NETWORK: i32 = 3;
    /// Stopped by SIGINT/SIGTERM before a WIN.
    pub const INTERRUPTED: i32 = 130;
}

/// What stops a driver before it could do its job. The binary exits with [`exit::NETWORK`]
/// for all of them; bad flags are caught before a driver starts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server host name did not resolve to an IPv4 address.
    #[error("cannot resolve server host {host:?}: {reason}")]
    Resolve {
        /// The name given.
        host: String,
        /// Why.
        reason: String,
    },
    /// The TCP connection to the server failed.
    #[error("cannot connect to server {addr}: {reason}")]
    Unreachable {
        /// Server address.
        addr: SocketAddr,
        /// Why (the OS error, or a timeout).
        reason: String,
    },
    /// The server refused us (a private server, `n4 -s --key-file`).
    #[error("the server {addr} refused us: {reason}")]
    Refused {
        /// Server address.
        addr: SocketAddr,
        /// Why, in words.
        reason: &'static str,
    },
    /// A keyed client met a server that does not speak our extension.
    #[error(
        "the server {addr} does not speak n4's extension (a v1 server?): a keyed session \
         (--key-file / N4_KEY) needs an n4 server"
    )]
    NeedsOurServer {
        /// Server address.
        addr: SocketAddr,
    },
    /// `--wg`: the WireGuard interface could not be read or configured.
    #[error("WireGuard interface {iface}: {reason}")]
    WireGuard {
        /// The interface.
        iface: String,
        /// Why.
        reason: String,
    },
    /// `n4 probe`: the server's probe port did not answer.
    #[error("no probe answer from n4 server {server} (probes go to its UDP port {probe_port}): {reason}")]
    NoProbeAnswer {
        /// The server as given (`-h`, `-p`).
        server: std::net::SocketAddrV4,
        /// The port probes went to: the server port + 1.
        probe_port: u16,
        /// Why.
        reason: String,
    },
    /// A listening socket could not be bound (typically: port in use).
    #[error("cannot listen on {proto} {addr}: {source}")]
    Listen {
        /// `TCP` or `UDP`.
        proto: &'static str,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Not one UDP source port of the window could be bound.
    #[error("cannot bind any UDP source port in {first}-{last}: {source}")]
    NoWindow {
        /// First port of the window.
        first: u16,
        /// Last port of the window.
        last: u16,
        /// The last OS error.
        source: io::Error,
    },
    /// The local socket for `--forward` could not be bound.
    #[error("cannot bind the forwarding socket on {addr}: {source}")]
    ForwardBind {
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The client's settings cannot run (the binary checks its flags before, so it does not
    /// meet this).
    #[error("bad client configuration: {0}")]
    Config(#[from] n4_core::ConfigError),
    /// The poller itself failed (or signals could not be registered).
    #[error("event loop: {0}")]
    Poll(#[from] io::Error),
}
