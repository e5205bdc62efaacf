//! The punching client: one v1 round after another until a PUNCH from the peer arrives.
//!
//! A round: open a window of local UDP port slots, connect to the server, HELLO, wait READY,
//! EXCHANGE from slot 0, wait PEERINFO, PUNCH from every slot to `peer_port + offset`, and WIN
//! as soon as the peer's PUNCH arrives (then acknowledge it with a timed burst), or LOSE at the
//! round timeout and shift the window by `count` for the next round.
//!
//! Sans-IO contract: after every `handle_*` call, drain [`Client::poll_command`] first (it opens
//! the window and the TCP connection the transmits need), then [`Client::poll_transmit`] and
//! [`Client::poll_event`]; call [`Client::handle_timeout`] at [`Client::poll_timeout`]. `now`
//! must never go backwards. The client never reads a clock, binds a socket or draws randomness.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::codec::{Ident, Message, StreamDecoder, Token};

/// Client settings. `Default` gives the original's values, written in each field's doc.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Session identifier (`-a`, default `n4n4n4`).
    pub ident: Ident,
    /// Server address; EXCHANGE goes to this UDP port, the TCP leg to the same port (`-h`, `-p`).
    pub server: SocketAddrV4,
    /// First local source port of the first window (`-b`, default 30000); 0 = ephemeral ports.
    pub port_start: u16,
    /// Number of local port slots per round (`-n`, default 25).
    pub port_count: u16,
    /// Predicted peer port = observed peer port + this (`-o`, default 20).
    pub peer_port_offset: i32,
    /// Accept a PUNCH from any IP, not only the one the server gave (`-x`, default off).
    pub accept_any_ip: bool,
    /// How long a round waits for the peer's PUNCH (and for PEERINFO after READY). Default 10 s.
    pub round_timeout: Duration,
    /// Passes of PUNCH over the whole window. Default 5.
    pub punch_passes: u16,
    /// EXCHANGE datagrams sent per round. Default 3.
    pub exchange_count: u16,
    /// Acknowledgement burst after WIN: this many PUNCHes back to the peer. Default 10.
    pub ack_count: u16,
    /// Spacing of the acknowledgement burst. Default 200 ms.
    pub ack_interval: Duration,
    /// Give up after this many rounds; `None` tries forever, like the original. Default `None`.
    pub max_rounds: Option<u32>,
    /// Wait before the next round when the server closed the connection early. Default 1 s.
    pub retry_delay: Duration,
    /// Use our extension when the server offers it. Default `true`.
    pub extensions: bool,
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
            extensions: true,
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
        /// `port_count`.
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
    /// The 8 bytes.
    pub payload: [u8; 8],
}

/// What the driver must do besides sending datagrams.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Close the previous window (if any) and bind one UDP socket per port, slot `i` on
    /// `ports[i]` (0 = any ephemeral port). A slot that cannot be bound is simply not used.
    OpenWindow {
        /// Local port per slot.
        ports: Vec<u16>,
    },
    /// Open a TCP connection to the server; report it with `handle_connected` or
    /// `handle_connect_failed`.
    Connect,
    /// Write this message on the TCP connection.
    Send(Message),
    /// Close the TCP connection.
    Disconnect,
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
        /// Number of slots.
        count: u16,
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
    /// The server told us our own public address (extension).
    Seen(SocketAddrV4),
    /// The partner's public address; `target` is where punches go (`None`: offset passes 65535).
    PeerInfo {
        /// Observed peer address.
        peer: SocketAddrV4,
        /// Predicted target, if in range.
        target: Option<SocketAddrV4>,
    },
    /// PUNCH went out from every slot.
    PunchSent {
        /// To where.
        target: SocketAddrV4,
        /// Datagrams sent.
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
    },
    /// The round ended without a PUNCH.
    Lose {
        /// Round that lost.
        round: u32,
        /// Why.
        reason: LoseReason,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitReady,
    AwaitPeerInfo,
    Punching {
        peer: SocketAddrV4,
    },
    /// Round lost; the next starts at the deadline.
    Between,
    /// WIN: sending the acknowledgement burst from `slot` to `peer`.
    Won {
        slot: usize,
        peer: SocketAddr,
        acks_left: u16,
    },
    Done,
}

/// Punches that arrive before PEERINFO says who the peer is; kept (bounded) and judged then.
const EARLY_PUNCHES: usize = 16;

/// The punching client state machine. See the module docs for the calling contract.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    round: u32,
    window_start: u16,
    phase: Phase,
    connected: bool,
    decoder: StreamDecoder,
    token: Option<Token>,
    early_punches: Vec<(usize, SocketAddr)>,
    /// The one pending timer: what it does depends on the phase.
    deadline: Option<Instant>,
    /// After READY: PEERINFO must arrive by then.
    peer_info_deadline: Option<Instant>,
    commands: VecDeque<Command>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Client {
    /// A client that starts its first round at `now`.
    pub fn new(config: ClientConfig, now: Instant) -> Result<Self, ConfigError> {
        if config.port_count == 0 {
            return Err(ConfigError::ZeroCount);
        }
        if u32::from(config.port_start) + u32::from(config.port_count) - 1 > 65535 {
            return Err(ConfigError::WindowTooHigh {
                start: config.port_start,
                count: config.port_count,
            });
        }
        if config.peer_port_offset.unsigned_abs() > 65535 {
            return Err(ConfigError::Offset(config.peer_port_offset));
        }
        let mut client = Self {
            window_start: config.port_start,
            config,
            round: 0,
            phase: Phase::Done,
            connected: false,
            decoder: StreamDecoder::default(),
            token: None,
            early_punches: Vec::new(),
            deadline: None,
            peer_info_deadline: None,
            commands: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        client.start_round(now);
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

    /// The local ports of the current window, slot by slot.
    pub fn window(&self) -> Vec<u16> {
        window_ports(self.window_start, self.config.port_count)
    }

    /// The TCP connection to the server is up.
    pub fn handle_connected(&mut self, _now: Instant) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.connected = true;
        self.phase = Phase::AwaitReady;
        self.commands
            .push_back(Command::Send(Message::Hello(self.config.ident)));
        self.events.push_back(Event::HelloSent);
    }

    /// The TCP connection to the server could not be made. The client stops.
    pub fn handle_connect_failed(&mut self, _now: Instant) {
        if self.phase == Phase::Connecting {
            self.phase = Phase::Done;
            self.deadline = None;
            self.events.push_back(Event::ServerUnreachable);
        }
    }

    /// Bytes from the server's TCP connection.
    pub fn handle_stream_data(&mut self, now: Instant, bytes: &[u8]) {
        if !self.connected {
            return;
        }
        let mut messages = Vec::new();
        let ok = self.decoder.feed(bytes, |m| messages.push(m)).is_ok();
        for m in messages {
            self.on_server_message(now, m);
        }
        if !ok && self.connected {
            self.lose(now, LoseReason::ServerGarbage);
        }
    }

    /// The server closed the TCP connection.
    pub fn handle_stream_closed(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        self.connected = false;
        if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
            self.lose(now, LoseReason::ServerClosed);
        }
    }

    /// A datagram arrived on window slot `slot` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, slot: usize, from: SocketAddr, bytes: &[u8]) {
        if bytes != self.punch_bytes() || slot >= usize::from(self.config.port_count) {
            return;
        }
        match self.phase {
            Phase::Connecting | Phase::AwaitReady | Phase::AwaitPeerInfo => {
                if self.early_punches.len() < EARLY_PUNCHES {
                    self.early_punches.push((slot, from));
                }
            }
            Phase::Punching { peer } => {
                if self.accepts(peer, from) {
                    self.win(now, slot, from);
                }
            }
            Phase::Between | Phase::Won { .. } | Phase::Done => {}
        }
    }

    /// Time passed; acts on the deadline if it is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if d <= now => self.deadline = None,
            _ => return,
        }
        match self.phase {
            Phase::AwaitPeerInfo => {
                if self.peer_info_deadline.is_some_and(|d| d > now) {
                    self.send_exchange(now, 1);
                } else {
                    self.lose(now, LoseReason::NoPeerInfo);
                }
            }
            Phase::Punching { .. } => self.lose(now, LoseReason::Timeout),
            Phase::Between => self.start_round(now),
            Phase::Won {
                slot,
                peer,
                acks_left,
            } => self.send_ack(now, slot, peer, acks_left),
            Phase::Connecting | Phase::AwaitReady | Phase::Done => {}
        }
    }

    /// The next thing the driver must do besides sending datagrams. Drain before transmits.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event to report.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    fn punch_bytes(&self) -> [u8; 8] {
        Message::Punch(self.config.ident).to_bytes()
    }

    fn accepts(&self, peer: SocketAddrV4, from: SocketAddr) -> bool {
        self.config.accept_any_ip || from.ip() == IpAddr::V4(*peer.ip())
    }

    fn start_round(&mut self, _now: Instant) {
        if self.config.max_rounds.is_some_and(|max| self.round >= max) {
            self.phase = Phase::Done;
            self.deadline = None;
            self.events.push_back(Event::GaveUp { rounds: self.round });
            return;
        }
        if self.round > 0 {
            self.window_start = next_window_start(
                self.window_start,
                self.config.port_count,
                self.config.port_start,
            );
        }
        self.round += 1;
        self.phase = Phase::Connecting;
        self.decoder = StreamDecoder::default();
        self.token = None;
        self.early_punches.clear();
        self.deadline = None;
        self.peer_info_deadline = None;
        self.commands.push_back(Command::OpenWindow {
            ports: self.window(),
        });
        self.commands.push_back(Command::Connect);
        self.events.push_back(Event::RoundStarted {
            round: self.round,
            first_port: self.window_start,
            count: self.config.port_count,
        });
    }

    fn on_server_message(&mut self, now: Instant, msg: Message) {
        match (self.phase, msg) {
            (Phase::AwaitReady, Message::Ready(token)) => {
                self.token = token.filter(|_| self.config.extensions);
                self.phase = Phase::AwaitPeerInfo;
                self.events.push_back(Event::Ready {
                    extended: self.token.is_some(),
                });
                self.send_exchange(now, self.config.exchange_count);
            }
            (Phase::AwaitPeerInfo, Message::PeerInfo(peer)) => self.on_peer_info(now, peer),
            (_, Message::Seen(addr)) if self.token.is_some() => {
                self.events.push_back(Event::Seen(addr))
            }
            // Anything else from the server is out of protocol: v1 clients would misbehave;
            // we end the round cleanly instead.
            _ => {
                if matches!(self.phase, Phase::AwaitReady | Phase::AwaitPeerInfo) {
                    self.lose(now, LoseReason::ServerGarbage);
                }
            }
        }
    }

    fn send_exchange(&mut self, now: Instant, times: u16) {
        let msg = match self.token {
            Some(t) => Message::ExchangeToken(t),
            None => Message::Exchange(self.config.ident),
        };
        for _ in 0..times {
            self.transmits.push_back(Transmit {
                slot: 0,
                destination: self.config.server.into(),
                payload: msg.to_bytes(),
            });
        }
        self.events.push_back(Event::ExchangeSent);
        let give_up = *self
            .peer_info_deadline
            .get_or_insert(now + self.config.round_timeout);
        // An extended client repeats its EXCHANGE until PEERINFO: our server dedups by token.
        self.deadline = Some(match self.token {
            Some(_) => give_up.min(now + EXCHANGE_RESEND),
            None => give_up,
        });
    }

    fn on_peer_info(&mut self, now: Instant, peer: SocketAddrV4) {
        let target = u16::try_from(i32::from(peer.port()) + self.config.peer_port_offset)
            .ok()
            .map(|port| SocketAddrV4::new(*peer.ip(), port));
        self.events.push_back(Event::PeerInfo { peer, target });
        let Some(target) = target else {
            self.lose(now, LoseReason::TargetOutOfRange);
            return;
        };
        self.phase = Phase::Punching { peer };
        let payload = self.punch_bytes();
        let slots = usize::from(self.config.port_count);
        for _ in 0..self.config.punch_passes {
            for slot in 0..slots {
                self.transmits.push_back(Transmit {
                    slot,
                    destination: target.into(),
                    payload,
                });
            }
        }
        self.events.push_back(Event::PunchSent {
            target,
            datagrams: slots * usize::from(self.config.punch_passes),
        });
        self.deadline = Some(now + self.config.round_timeout);
        let early = std::mem::take(&mut self.early_punches);
        if let Some(&(slot, from)) = early.iter().find(|(_, from)| self.accepts(peer, *from)) {
            self.win(now, slot, from);
        }
    }

    fn win(&mut self, now: Instant, slot: usize, peer: SocketAddr) {
        self.events.push_back(Event::Win {
            round: self.round,
            slot,
            peer,
        });
        self.send_ack(now, slot, peer, self.config.ack_count);
    }

    fn send_ack(&mut self, now: Instant, slot: usize, peer: SocketAddr, acks_left: u16) {
        if acks_left == 0 {
            self.phase = Phase::Done;
            self.deadline = None;
            self.events.push_back(Event::Finished);
            return;
        }
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
        // The burst ends one interval after the last PUNCH, like v1's sleep after each send.
        self.deadline = Some(now + self.config.ack_interval);
    }

    fn lose(&mut self, now: Instant, reason: LoseReason) {
        if self.connected {
            self.connected = false;
            self.commands.push_back(Command::Disconnect);
        }
        self.events.push_back(Event::Lose {
            round: self.round,
            reason,
        });
        let wait = match reason {
            LoseReason::ServerClosed | LoseReason::ServerGarbage => self.config.retry_delay,
            _ => Duration::ZERO,
        };
        self.phase = Phase::Between;
        self.deadline = Some(now + wait);
        if wait.is_zero() {
            self.deadline = None;
            self.start_round(now);
        }
    }
}

/// How often an extended client repeats its EXCHANGE until PEERINFO arrives.
const EXCHANGE_RESEND: Duration = Duration::from_millis(250);

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
