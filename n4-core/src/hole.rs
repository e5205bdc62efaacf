//! After WIN: the hole as a lasting link keeps it — which datagrams on the window are the
//! peer's, the keepalive's bytes and timing, and when the hole counts as dead. Sans-IO like
//! the machines: the driver feeds datagrams and time, sends what [`Hole::poll_transmit`]
//! gives, and asks [`Hole::is_dead`].

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{ClientConfig, Transmit};

/// The keepalive datagram sent to the peer after WIN (`--keepalive`, `--forward`, `--wg`): 8
/// bytes, command byte 0x00 (no v1 command), `"N4KA"`, two zero bytes. It is never equal to a
/// PUNCH, and a peer in `--forward` mode does not pass it to its local program.
pub const KEEPALIVE: [u8; 8] = [0x00, 0x00, b'N', b'4', b'K', b'A', 0x00, 0x00];

/// Keepalive intervals of silence from the peer after which a kept hole counts as dead.
pub const DEAD_AFTER_KEEPALIVES: u32 = 3;

/// What a datagram that arrived on the client's sockets after WIN is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromPeer {
    /// Not from the peer's path: a probe slot, the server, another port of the peer's IP, a
    /// stranger. Drop it.
    NotThePeer,
    /// The session's own handshake (PUNCH, ACK, CONFIRM) or a keepalive: not the user's.
    Handshake,
    /// The user's traffic from the peer.
    Data,
}

/// The hole after WIN.
#[derive(Clone, Debug)]
pub struct Hole {
    /// The slot that won and the peer's address on it: our way out.
    slot: usize,
    peer: SocketAddr,
    /// Every slot on which the peer's PUNCH reached us, with the exact address it came from
    /// (the winning slot keeps the winning address). Where filtering is open (loopback,
    /// endpoint-independent filtering) the two sides may win on different pairs, so the
    /// peer's traffic can arrive on another slot than ours. Only a datagram from exactly the
    /// address of its slot's path is the peer's. Bounded by the window.
    paths: BTreeMap<usize, SocketAddr>,
    /// Window slots, then probe slots (never the peer's), then extra slots (birthday).
    window_slots: usize,
    probe_slots: usize,
    /// The server's two ports: never the peer, even on the peer's IP (loopback).
    server: [SocketAddr; 2],
    /// `None`: the hole is not kept (the original's exit after WIN).
    keepalive: Option<Duration>,
    keepalive_at: Option<Instant>,
    last_from_peer: Instant,
    /// A keepalive came from the peer, or it is one of ours: it keeps the hole too, so its
    /// silence means the hole died (a v1 peer's silence does not).
    peer_keeps_alive: bool,
    transmits: VecDeque<Transmit>,
}

impl Hole {
    /// The hole the client's `Win` event names, at `now`; `keepalive`: the interval of
    /// keepalives, or `None` if the hole is not kept.
    pub fn new(
        now: Instant,
        config: &ClientConfig,
        slot: usize,
        peer: SocketAddr,
        keepalive: Option<Duration>,
    ) -> Self {
        Self {
            slot,
            peer,
            paths: BTreeMap::from([(slot, peer)]),
            window_slots: usize::from(config.window_slots()),
            probe_slots: usize::from(config.probe_slots()),
            server: [config.server.into(), config.probe_server().into()],
            keepalive,
            keepalive_at: keepalive.and_then(|k| now.checked_add(k)),
            last_from_peer: now,
            peer_keeps_alive: false,
            transmits: VecDeque::new(),
        }
    }

    /// The winning slot.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The peer's address on the winning slot.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The slots the peer reaches us on (keep their sockets).
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.paths.keys().copied()
    }

    /// A datagram on slot `slot` from `from`. `handshake`: the client judged it the session's
    /// own ([`crate::Client::is_handshake`]); `ours`: the peer is one of ours
    /// ([`crate::Client::peer_is_ours`]).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        slot: usize,
        from: SocketAddr,
        bytes: &[u8],
        handshake: bool,
        ours: bool,
    ) -> FromPeer {
        let probes = self.window_slots..self.window_slots + self.probe_slots;
        if probes.contains(&slot) || self.server.contains(&from) {
            return FromPeer::NotThePeer;
        }
        if handshake && from.ip() == self.peer.ip() && !self.paths.contains_key(&slot) {
            // The peer's PUNCH on another slot: the pair it won on (see `paths`).
            self.paths.insert(slot, from);
        }
        if self.paths.get(&slot) != Some(&from) {
            return FromPeer::NotThePeer;
        }
        // Anything on the path shows the hole alive; a keepalive (or a confirmed WIN) shows
        // the peer is one of ours, which keeps the hole too.
        self.last_from_peer = now;
        let keepalive = bytes == KEEPALIVE;
        self.peer_keeps_alive |= keepalive || ours;
        if handshake || keepalive {
            FromPeer::Handshake
        } else {
            FromPeer::Data
        }
    }

    /// We sent the user's traffic to the peer at `now`: it keeps the NAT's mapping as a
    /// keepalive would.
    pub fn handle_sent(&mut self, now: Instant) {
        self.keepalive_at = self.keepalive.and_then(|k| now.checked_add(k));
    }

    /// Time passed: a keepalive is queued when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.keepalive_at.is_some_and(|t| t <= now) {
            self.transmits.push_back(Transmit {
                slot: self.slot,
                destination: self.peer,
                payload: KEEPALIVE.into(),
            });
            self.handle_sent(now);
        }
    }

    /// The next datagram to send (a keepalive, from the winning slot to the peer).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Hole::handle_timeout`] must next be called, or the hole may be found dead.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keepalive_at.into_iter().chain(self.dead_at()).min()
    }

    /// When the next keepalive is due (for a driver that does not ask [`Hole::is_dead`] yet).
    pub fn next_keepalive(&self) -> Option<Instant> {
        self.keepalive_at
    }

    /// The peer keeps the hole, yet nothing came on its path for
    /// [`DEAD_AFTER_KEEPALIVES`] keepalive intervals: the NAT forgot the hole.
    pub fn is_dead(&self, now: Instant) -> bool {
        self.dead_at().is_some_and(|t| t <= now)
    }

    fn dead_at(&self) -> Option<Instant> {
        let k = self.keepalive?;
        if !self.peer_keeps_alive {
            return None;
        }
        self.last_from_peer
            .checked_add(k.saturating_mul(DEAD_AFTER_KEEPALIVES))
    }
}
