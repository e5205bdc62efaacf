//! The client's event loop: the window of UDP sockets and the TCP connection, one thread,
//! driving [`n4_core::Client`]; after WIN, optionally keeping the hole (keepalive) or relaying
//! it to a local UDP program (forward).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use n4_core::{Client, ClientConfig, Command, Event, FromPeer, Hole, LoseReason};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::{sockets, Error};

const SIGNALS: Token = Token(0);
const TCP: Token = Token(1);
const FORWARD: Token = Token(2);
/// Window slot `i` has token `WINDOW_BASE + i`.
const WINDOW_BASE: usize = 16;

pub use n4_core::KEEPALIVE;

/// What to do once the hole is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterWin {
    /// Like the original: send the acknowledgement burst, print the `nc` hint, exit.
    Exit,
    /// Keep the winning socket and send [`KEEPALIVE`] to the peer every `interval` until
    /// SIGINT/SIGTERM.
    KeepAlive {
        /// Spacing of keepalives.
        interval: Duration,
    },
    /// Keep the winning socket and relay: datagrams from the peer go to `to` from a local
    /// socket bound on `bind`; datagrams arriving on that socket go to the peer. A keepalive
    /// goes to the peer after `keepalive` without traffic towards it.
    Forward {
        /// The local program (e.g. WireGuard's listen address).
        to: SocketAddr,
        /// Where the local relay socket binds (port 0: any).
        bind: SocketAddr,
        /// Idle time before a keepalive to the peer.
        keepalive: Duration,
    },
}

/// What [`run_client`] needs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The machine's settings (server address already resolved).
    pub config: ClientConfig,
    /// What to do after WIN.
    pub after_win: AfterWin,
    /// Print the result as one JSON object on stdout.
    pub json: bool,
    /// Give up on a TCP connect that neither succeeds nor fails within this.
    pub connect_timeout: Duration,
    /// Give up when no WIN came within this of the start, whatever the client is doing
    /// (waiting for a partner included); `None`: no overall deadline.
    pub timeout: Option<Duration>,
    /// A shell command run after each WIN with the result JSON on stdin (`--exec`).
    pub exec: Option<String>,
}

/// A server that closes a keyed HELLO's connection within this, [`KEYED_CLOSES`] times in a
/// row, cannot serve keyed sessions.
const QUICK_CLOSE: Duration = Duration::from_secs(1);
const KEYED_CLOSES: u32 = 3;

/// How often a client waiting for a partner says it still waits.
const WAITING_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The result of a WIN, as `--json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WinReport {
    /// Local UDP port of the hole.
    pub local_port: u16,
    /// The peer's address as it reaches us.
    pub peer: SocketAddr,
    /// 1-based round that won.
    pub round: u32,
    /// From start to the `[ WIN ]` line (what the user waited).
    pub elapsed_ms: u64,
    /// The strategy that aimed the winning round: `v1` (the original's fixed offset) or
    /// `predict` (our extension, when the server and the peer are ours).
    pub strategy: &'static str,
    /// UDP datagrams this client sent in all (probes, EXCHANGEs, PUNCHes, acknowledgements).
    pub datagrams: u64,
    /// With `--forward`: the local relay socket the local program talks to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_via: Option<SocketAddr>,
    /// Keyed: the WireGuard public key the authenticated partner handed us (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_wg_key: Option<String>,
}

/// How a client run ended (errors aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOutcome {
    /// WIN; with `--keepalive`/`--forward` returned only after SIGINT/SIGTERM.
    Won(WinReport),
    /// `--rounds` rounds lost.
    GaveUp {
        /// Rounds played.
        rounds: u32,
    },
    /// With `--keepalive`/`--forward`: nothing came from the peer for three keepalive
    /// intervals after WIN — the NAT forgot the hole. The caller punches again.
    HoleDied(WinReport),
    /// No WIN within [`ClientOptions::timeout`].
    TimedOut {
        /// The timeout.
        after: Duration,
        /// Rounds started.
        rounds: u32,
    },
    /// SIGINT/SIGTERM before WIN.
    Interrupted,
}

/// Runs one client until WIN (and its aftermath), give-up, a signal, or a network error.
pub fn run_client(options: ClientOptions) -> Result<ClientOutcome, Error> {
    let start = Instant::now();
    let poll = Poll::new()?;
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    // Bind the relay socket before punching: a bad --forward address fails now, not after WIN.
    let forward = match &options.after_win {
        AfterWin::Forward { bind, .. } => {
            let mut socket = sockets::bind_udp(*bind).map_err(|source| Error::ForwardBind {
                addr: *bind,
                source,
            })?;
            poll.registry()
                .register(&mut socket, FORWARD, Interest::READABLE)?;
            Some(socket)
        }
        _ => None,
    };
    let client = Client::new(options.config.clone(), start)?;
    let mut driver = Driver {
        client,
        poll,
        options,
        start,
        window: Vec::new(),
        window_first: None,
        tcp: None,
        connect_deadline: None,
        connect_error: None,
        exchange_logged: false,
        won: None,
        finished: false,
        forward,
        deadline: None,
        waiting_since: None,
        waiting_log_at: None,
        peer_data: None,
        keyed_closes: 0,
    };
    driver.deadline = driver.options.timeout.and_then(|t| start.checked_add(t));
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 65536];
    let mut now = start;
    loop {
        if let Some(outcome) = driver.drain(now)? {
            return Ok(outcome);
        }
        let timeout = driver
            .next_wakeup()
            .map(|t| t.saturating_duration_since(Instant::now()));
        if let Err(e) = driver.poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        now = Instant::now();
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if signals.pending().next().is_some() {
                        if driver.won.is_some() && !driver.finished {
                            // Stopped during the acknowledgement burst: the hole is open all
                            // the same, so report it.
                            let _ = driver.finished(now);
                        }
                        info!("Stopped");
                        return Ok(match driver.won.take() {
                            Some(won) => ClientOutcome::Won(won.report),
                            None => ClientOutcome::Interrupted,
                        });
                    }
                }
                TCP => driver.tcp_event(now, event, &mut buf),
                FORWARD => driver.forward_readable(now, &mut buf),
                Token(t) if t >= WINDOW_BASE => {
                    driver.slot_readable(now, t - WINDOW_BASE, &mut buf)
                }
                Token(_) => {}
            }
            if let Some(outcome) = driver.drain(now)? {
                return Ok(outcome);
            }
        }
        driver.timers(now);
        if let Some(report) = driver.hole_died(now) {
            return Ok(ClientOutcome::HoleDied(report));
        }
        if driver.won.is_none() && driver.deadline.is_some_and(|d| d <= now) {
            return Ok(ClientOutcome::TimedOut {
                after: driver.options.timeout.unwrap_or_default(),
                rounds: driver.client.round(),
            });
        }
    }
}

struct Tcp {
    stream: TcpStream,
    connected: bool,
    out: Vec<u8>,
}

struct Won {
    /// Which datagrams are the peer's, keepalives, the hole's death (n4-core's policy).
    hole: Hole,
    report: WinReport,
}

struct Driver {
    client: Client,
    poll: Poll,
    options: ClientOptions,
    start: Instant,
    /// Slot `i`'s socket; `None` when its port could not be bound.
    window: Vec<Option<UdpSocket>>,
    /// First port of the window opened last.
    window_first: Option<u16>,
    tcp: Option<Tcp>,
    connect_deadline: Option<Instant>,
    /// Why the last connect failed, for the error message.
    connect_error: Option<String>,
    /// ` <= Exchange ` was logged this round (repeats go to debug).
    exchange_logged: bool,
    won: Option<Won>,
    /// The machine is done (acknowledgement burst sent).
    finished: bool,
    forward: Option<UdpSocket>,
    /// The overall deadline (`--timeout`).
    deadline: Option<Instant>,
    /// Since when we wait for a partner (HELLO sent, no READY yet).
    waiting_since: Option<Instant>,
    /// When to say again that we still wait.
    waiting_log_at: Option<Instant>,
    /// Keyed: the partner's 32 bytes (its WireGuard public key).
    peer_data: Option<[u8; 32]>,
    /// Keyed HELLOs the server closed at once, in a row.
    keyed_closes: u32,
}

impl Driver {
    /// After WIN in a lasting mode: the report, if the peer has been silent too long.
    fn hole_died(&self, now: Instant) -> Option<WinReport> {
        let won = self.won.as_ref().filter(|_| self.finished)?;
        won.hole.is_dead(now).then(|| won.report.clone())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.client.poll_timeout(),
            self.connect_deadline,
            // The hole's death counts once the acknowledgements are done (`hole_died`).
            self.won.as_ref().and_then(|w| {
                if self.finished {
                    w.hole.poll_timeout()
                } else {
                    w.hole.next_keepalive()
                }
            }),
            self.deadline.filter(|_| self.won.is_none()),
            self.waiting_log_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn timers(&mut self, now: Instant) {
        if self.connect_deadline.is_some_and(|d| d <= now) {
            self.connect_deadline = None;
            if self.tcp.as_ref().is_some_and(|t| !t.connected) {
                self.connect_failed(now, "timed out".into());
            }
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        if let Some(won) = &mut self.won {
            won.hole.handle_timeout(now);
            while let Some(t) = won.hole.poll_transmit() {
                send_from(&self.window, t.slot, t.destination, &t.payload);
                debug!("keepalive from slot {} to {}", t.slot, t.destination);
            }
        }
        if let (Some(since), Some(at)) = (self.waiting_since, self.waiting_log_at) {
            if at <= now {
                let keyed = if self.client.config().key.is_some() {
                    " (keyed: the partner needs the same key)"
                } else {
                    ""
                };
                info!(
                    "Waiting for a partner with identifier [{}] at {}{keyed}: {} s so far",
                    self.client.config().ident,
                    self.client.config().server,
                    now.saturating_duration_since(since).as_secs()
                );
                self.waiting_log_at = now.checked_add(WAITING_LOG_INTERVAL);
            }
        }
    }

    /// The keepalive interval of a lasting hole; `None` when the hole is not kept.
    fn keepalive_interval(&self) -> Option<Duration> {
        match self.options.after_win {
            AfterWin::KeepAlive { interval } => Some(interval),
            AfterWin::Forward { keepalive, .. } => Some(keepalive),
            AfterWin::Exit => None,
        }
    }

    /// Carries out the machine's commands and datagrams and reacts to its events, until it
    /// has nothing more to say. Returns the outcome when the run is over.
    fn drain(&mut self, now: Instant) -> Result<Option<ClientOutcome>, Error> {
        loop {
            let mut moved = false;
            while let Some(command) = self.client.poll_command() {
                moved = true;
                self.command(now, command)?;
            }
            while let Some(t) = self.client.poll_transmit() {
                moved = true;
                send_from(&self.window, t.slot, t.destination, &t.payload);
            }
            while let Some(event) = self.client.poll_event() {
                moved = true;
                if let Some(outcome) = self.event(now, event)? {
                    return Ok(Some(outcome));
                }
            }
            if !moved {
                return Ok(None);
            }
        }
    }

    fn command(&mut self, now: Instant, command: Command) -> Result<(), Error> {
        match command {
            Command::OpenWindow { ports } => self.open_window(&ports)?,
            Command::OpenSlots { count } => self.open_slots(count),
            Command::Connect => self.connect(now),
            Command::Send(message) => {
                if let Some(tcp) = &mut self.tcp {
                    tcp.out.extend_from_slice(&message.to_bytes());
                }
                self.flush(now);
            }
            Command::Close => self.close_tcp(),
        }
        Ok(())
    }

    fn open_window(&mut self, ports: &[u16]) -> Result<(), Error> {
        self.close_window();
        self.window_first = ports.first().copied();
        let mut last_error = None;
        for (slot, &port) in ports.iter().enumerate() {
            match self.bind_slot(slot, port) {
                Ok(socket) => self.window.push(Some(socket)),
                Err(e) => {
                    warn!("Cannot bind UDP port {port}: {e}; slot skipped");
                    last_error = Some(e);
                    self.window.push(None);
                }
            }
        }
        // Probe slots (port 0) always bind; the window's fixed ports are what matters.
        let fixed = ports.iter().zip(&self.window).filter(|(&p, _)| p != 0);
        if fixed.clone().count() > 0 && fixed.clone().all(|(_, s)| s.is_none())
            || self.window.iter().all(Option::is_none)
        {
            return Err(Error::NoWindow {
                first: ports.first().copied().unwrap_or(0),
                last: ports.iter().rev().find(|&&p| p != 0).copied().unwrap_or(0),
                source: last_error.unwrap_or_else(|| io::ErrorKind::InvalidInput.into()),
            });
        }
        Ok(())
    }

    /// More slots after the window and probe slots (ephemeral ports); one that cannot be bound
    /// is simply not used.
    fn open_slots(&mut self, count: u16) {
        let mut failed = 0;
        for _ in 0..count {
            let bound = self.bind_slot(self.window.len(), 0);
            if bound.is_err() {
                failed += 1;
            }
            self.window.push(bound.ok());
        }
        debug!("{count} more slots for the birthday strategy ({failed} could not be bound)");
    }

    /// Slot `slot`'s socket on `port` (0: ephemeral), registered with the poll.
    fn bind_slot(&self, slot: usize, port: u16) -> io::Result<UdpSocket> {
        let mut socket = sockets::bind_slot(port)?;
        self.poll.registry().register(
            &mut socket,
            Token(WINDOW_BASE + slot),
            Interest::READABLE,
        )?;
        Ok(socket)
    }

    fn close_window(&mut self) {
        for mut socket in self.window.drain(..).flatten() {
            let _ = self.poll.registry().deregister(&mut socket);
        }
    }

    fn connect(&mut self, now: Instant) {
        self.close_tcp();
        let server = SocketAddr::from(self.client.config().server);
        match TcpStream::connect(server) {
            Ok(mut stream) => {
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    TCP,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.connect_failed(now, e.to_string());
                    return;
                }
                self.tcp = Some(Tcp {
                    stream,
                    connected: false,
                    out: Vec::new(),
                });
                // A timeout too long for the clock is no deadline at all.
                self.connect_deadline = now.checked_add(self.options.connect_timeout);
            }
            Err(e) => self.connect_failed(now, e.to_string()),
        }
    }

    fn connect_failed(&mut self, now: Instant, reason: String) {
        self.close_tcp();
        self.connect_error = Some(reason);
        self.client.handle_connect_failed(now);
    }

    fn close_tcp(&mut self) {
        self.connect_deadline = None;
        if let Some(mut tcp) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut tcp.stream);
            let _ = tcp.stream.shutdown(Shutdown::Both);
        }
    }

    fn tcp_event(&mut self, now: Instant, event: &mio::event::Event, buf: &mut [u8]) {
        let Some(tcp) = &mut self.tcp else {
            return;
        };
        if !tcp.connected {
            // mio's recipe for a nonblocking connect: an error, or a peer address, or neither
            // yet (a spurious wake-up).
            match tcp.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.connect_failed(now, e.to_string()),
            }
            match tcp.stream.peer_addr() {
                Ok(_) => {
                    tcp.connected = true;
                    let _ = tcp.stream.set_nodelay(true);
                    self.connect_deadline = None;
                    self.client.handle_connection_opened(now);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if event.is_error() || event.is_write_closed() {
                        return self.connect_failed(now, "connection failed".into());
                    }
                    return;
                }
                Err(e) => return self.connect_failed(now, e.to_string()),
            }
        }
        if event.is_writable() {
            self.flush(now);
        }
        loop {
            let Some(tcp) = &mut self.tcp else {
                return;
            };
            match tcp.stream.read(buf) {
                Ok(0) => return self.stream_closed(now),
                // If the machine gives up on the connection (garbage), it ignores what follows;
                // its `Close` is carried out by the next drain.
                Ok(n) => self.client.handle_stream_data(now, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("server connection: {e}");
                    return self.stream_closed(now);
                }
            }
        }
    }

    fn stream_closed(&mut self, now: Instant) {
        self.close_tcp();
        self.client.handle_connection_closed(now);
    }

    fn flush(&mut self, now: Instant) {
        let Some(tcp) = &mut self.tcp else {
            return;
        };
        if !tcp.connected {
            return;
        }
        while !tcp.out.is_empty() {
            match tcp.stream.write(&tcp.out) {
                Ok(n) => {
                    tcp.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("server connection: {e}");
                    return self.stream_closed(now);
                }
            }
        }
    }

    fn slot_readable(&mut self, now: Instant, slot: usize, buf: &mut [u8]) {
        loop {
            let Some(Some(socket)) = self.window.get(slot) else {
                return;
            };
            let (n, from) = match socket.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error; nothing to do but go on.
                    debug!("slot {slot}: {e}");
                    continue;
                }
            };
            let data = &buf[..n];
            if let Some(won) = self.won.as_mut() {
                let handshake = self.client.is_handshake(data);
                let ours = self.client.peer_is_ours();
                match won
                    .hole
                    .handle_datagram(now, slot, from, data, handshake, ours)
                {
                    FromPeer::NotThePeer => {
                        debug!("{n} bytes from {from} on slot {slot}: not the peer's path; dropped")
                    }
                    // Handshake noise and keepalives, not the user's traffic.
                    FromPeer::Handshake => {}
                    FromPeer::Data => {
                        if let (Some(relay), AfterWin::Forward { to, .. }) =
                            (&self.forward, &self.options.after_win)
                        {
                            if let Err(e) = relay.send_to(data, *to) {
                                debug!("forward to {to}: {e}");
                            }
                        } else {
                            debug!("{n} bytes from peer {from}");
                        }
                    }
                }
            }
            if !self.finished {
                self.client.handle_datagram(now, slot, from, data);
            }
        }
    }

    /// A datagram from the local program: to the peer, through the hole.
    fn forward_readable(&mut self, now: Instant, buf: &mut [u8]) {
        let Some(relay) = &self.forward else {
            return;
        };
        loop {
            let (n, from) = match relay.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("forwarding socket: {e}");
                    continue;
                }
            };
            let AfterWin::Forward { to, .. } = self.options.after_win else {
                continue;
            };
            if from != to {
                // Only the local program speaks for us; anyone else who reaches the relay
                // socket must not send through our hole.
                debug!("{n} bytes from {from}, not the local program {to}: dropped");
                continue;
            }
            let Some(won) = &mut self.won else {
                debug!("{n} bytes from {from} before WIN: dropped");
                continue;
            };
            send_from(&self.window, won.hole.slot(), won.hole.peer(), &buf[..n]);
            won.hole.handle_sent(now);
        }
    }

    fn event(&mut self, now: Instant, event: Event) -> Result<Option<ClientOutcome>, Error> {
        match event {
            Event::RoundStarted {
                first_port,
                count,
                in_session,
                ..
            } => {
                self.exchange_logged = false;
                if !in_session {
                    // A new connection may seat another partner: its key comes anew.
                    self.peer_data = None;
                }
                // The window this round really uses is the one opened last (commands run
                // before events); the event's own `first_port` may lag behind after a LOSE.
                let first = self.window_first.unwrap_or(first_port);
                info!("==================");
                info!(
                    "Source port: {}-{}",
                    first,
                    u32::from(first) + u32::from(count)
                );
            }
            Event::HelloSent => {
                info!(" <= Hello ");
                debug!(
                    "waiting for a partner with identifier [{}]",
                    self.client.config().ident
                );
                self.waiting_since = Some(now);
                self.waiting_log_at = now.checked_add(WAITING_LOG_INTERVAL);
            }
            Event::Ready { extended } => {
                self.keyed_closes = 0;
                self.waiting_since = None;
                self.waiting_log_at = None;
                info!(" => Ready ");
                debug!("server extensions: {extended}");
            }
            Event::ExchangeSent => {
                if self.exchange_logged {
                    debug!(" <= Exchange (again)");
                } else {
                    self.exchange_logged = true;
                    info!(" <= Exchange ");
                }
            }
            Event::Seen(addr) => debug!(" => Seen: {addr} (our public address)"),
            Event::Planned {
                step,
                rate,
                rtt,
                window,
                hint,
            } => debug!(
                "plan: NAT step {step}, {rate} flows/s, rtt {}, window {window}, hint {}",
                rtt.map_or_else(|| "unknown".into(), |r| format!("{:.1} ms", ms(r))),
                hint_text(hint)
            ),
            Event::PeerHint(hint) => debug!("peer hint: {}", hint_text(hint)),
            Event::PeerRefused { peer, why } => {
                warn!("The server named peer address {peer}: {why}; refused, not punched")
            }
            Event::BudgetExhausted { budget, until } => warn!(
                "Punch budget spent ({budget} datagrams a minute): punches pause for {:.0} s",
                until.saturating_duration_since(now).as_secs_f64()
            ),
            Event::PeerAuthenticated => info!(" => Partner authenticated (shared key)"),
            Event::PeerData(data) => {
                debug!("partner's WireGuard public key: {}", wg_key_text(&data));
                self.peer_data = Some(data);
            }
            Event::PeerAuthFailed => error!(
                "The partner the server seated with us does not hold our key: not told our \
                 address; waiting for another"
            ),
            Event::Refused(reason) => {
                return Err(Error::Refused {
                    addr: self.client.config().server.into(),
                    reason: match reason {
                        n4_core::RefuseReason::WrongKey => {
                            "our key is not the server's (check --key-file / N4_KEY)"
                        }
                        n4_core::RefuseReason::KeyRequired => {
                            "it is a private server: a key is required (--key-file or N4_KEY)"
                        }
                        n4_core::RefuseReason::Other(_) => "no reason this version knows",
                    },
                })
            }
            Event::NeedsOurServer => {
                return Err(Error::NeedsOurServer {
                    addr: self.client.config().server.into(),
                })
            }
            Event::ReAimed { round, attempt } => info!(
                "No punch in time; aiming again in round {round} (attempt {attempt} of {}): a \
                 new EXCHANGE on the same connection, from where both NATs are now",
                n4_core::MAX_REAIMS + 1
            ),
            Event::PeerBehindOurNat { public } => warn!(
                "The peer shares our public IP {public}: it is behind our own NAT. A punch \
                 through the public address needs a NAT that hairpins (many home routers do, \
                 Linux masquerade does not)"
            ),
            Event::HardNat { plan, why } => match plan {
                n4_core::HardNatPlan::Unlikely => warn!("Hard NATs: {why}"),
                _ => info!("Hard NATs: {why}"),
            },
            Event::Rehello => {
                self.waiting_since = None;
                self.waiting_log_at = None;
                info!("The server ended our wait for a partner; saying HELLO again");
            }
            Event::PeerInfo { peer, target } => {
                info!(" => Peer: {peer} ");
                match target {
                    Some(target) => info!(" [ Target: {target} ] "),
                    None => warn!(
                        " [ Target: out of range ] (peer port {} + offset {} > 65535)",
                        peer.port(),
                        self.client.config().peer_port_offset
                    ),
                }
            }
            Event::PunchSent { target, datagrams } => {
                info!(" <= Punch ");
                debug!("{datagrams} punches to {target}");
            }
            Event::Win {
                round,
                slot,
                peer,
                strategy,
            } => {
                info!(" => Punch from peer ");
                let local_port = self
                    .window
                    .get(slot)
                    .and_then(Option::as_ref)
                    .and_then(|s| s.local_addr().ok())
                    .map_or(0, |a| a.port());
                let report = WinReport {
                    local_port,
                    peer,
                    round,
                    elapsed_ms: now.duration_since(self.start).as_millis() as u64,
                    strategy: strategy.name(),
                    datagrams: 0,
                    forward_via: self.forward.as_ref().and_then(|s| s.local_addr().ok()),
                    peer_wg_key: self.peer_data.as_ref().map(wg_key_text),
                };
                let hole = Hole::new(
                    now,
                    self.client.config(),
                    slot,
                    peer,
                    self.keepalive_interval(),
                );
                self.won = Some(Won { hole, report });
            }
            Event::Lose { reason, .. } => {
                // A keyed HELLO that the server answers by closing at once, again and again:
                // a v1 server (or ours with --no-ext), which cannot serve a keyed session.
                let quick = self
                    .waiting_since
                    .is_some_and(|t| now.saturating_duration_since(t) < QUICK_CLOSE);
                if reason == LoseReason::ServerClosed && quick && self.client.config().key.is_some()
                {
                    self.keyed_closes += 1;
                    if self.keyed_closes >= KEYED_CLOSES {
                        return Err(Error::NeedsOurServer {
                            addr: self.client.config().server.into(),
                        });
                    }
                }
                self.waiting_since = None;
                self.waiting_log_at = None;
                info!("[ LOSE ]");
                match reason {
                    LoseReason::Timeout => debug!("no punch from the peer in time"),
                    LoseReason::NoPeerInfo => warn!("no peer info from the server in time"),
                    LoseReason::ServerClosed => {
                        warn!("the server closed the connection before sending peer info")
                    }
                    LoseReason::ServerGarbage => warn!("the server broke the protocol"),
                    LoseReason::NoPartner => {
                        warn!("no partner came back for this round; it may have given up")
                    }
                    LoseReason::TargetOutOfRange => {
                        warn!("the predicted peer port is out of range")
                    }
                    LoseReason::BadPeerAddress => {
                        warn!("the server gave a peer address we refuse")
                    }
                    LoseReason::AuthFailed => debug!("the partner failed authentication"),
                }
            }
            Event::Finished => return Ok(self.finished(now)),
            Event::GaveUp { rounds } => return Ok(Some(ClientOutcome::GaveUp { rounds })),
            Event::ServerUnreachable => {
                return Err(Error::Unreachable {
                    addr: self.client.config().server.into(),
                    reason: self
                        .connect_error
                        .take()
                        .unwrap_or_else(|| "connection failed".into()),
                })
            }
        }
        Ok(None)
    }

    /// The acknowledgement burst is done: log the result the original's way, then exit or hold.
    fn finished(&mut self, now: Instant) -> Option<ClientOutcome> {
        self.finished = true;
        let Some(won) = &self.won else {
            // Finished without WIN cannot happen (the machine finishes only after a WIN).
            return None;
        };
        let (peer, mut report) = (won.hole.peer(), won.report.clone());
        report.datagrams = self.client.datagrams_sent();
        // What the user waited for: the `[ WIN ]` line is printed now.
        report.elapsed_ms = now.duration_since(self.start).as_millis() as u64;
        let keep: Vec<usize> = won.hole.slots().collect();
        info!(" <= Punch ");
        self.close_tcp();
        if self.options.after_win == AfterWin::Exit {
            // Like the original: the port is free by the time `[ WIN ]` is printed.
            self.close_window();
        } else {
            // The peer's acknowledgements have arrived by now: slots it does not use can go.
            for (i, socket) in self.window.iter_mut().enumerate() {
                if !keep.contains(&i) {
                    if let Some(mut s) = socket.take() {
                        let _ = self.poll.registry().deregister(&mut s);
                    }
                }
            }
        }
        info!("------");
        info!("Local port:    {}", report.local_port);
        info!("Peer address:  {peer}");
        info!("------");
        info!("[ WIN ]");
        info!("------");
        info!(
            "> nc -u -p {} {} {}",
            report.local_port,
            peer.ip(),
            peer.port()
        );
        match &self.options.after_win {
            AfterWin::Exit => {}
            AfterWin::KeepAlive { interval } => info!(
                "Keeping the hole open: keepalive to {peer} every {} s (Ctrl-C to stop)",
                interval.as_secs_f64()
            ),
            AfterWin::Forward { to, .. } => info!(
                "Forwarding: peer {peer} <=> {to} via {} (Ctrl-C to stop)",
                report
                    .forward_via
                    .map_or_else(|| "?".into(), |a| a.to_string())
            ),
        }
        let line = serde_json::to_string(&report).expect("a WinReport always serializes");
        if self.options.json {
            let mut stdout = io::stdout().lock();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
        if let Some(cmd) = &self.options.exec {
            crate::hook::run(cmd, &report, &line);
        }
        match self.options.after_win {
            AfterWin::Exit => Some(ClientOutcome::Won(report)),
            _ => None,
        }
    }
}

/// A WireGuard key as `wg` prints it (base64).
pub(crate) fn wg_key_text(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Milliseconds of `d`, as a float for printing.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A hint in words: the offset to aim at, or what its sentinel means.
fn hint_text(hint: n4_core::Hint) -> String {
    match hint {
        n4_core::Hint::NONE => "none".into(),
        n4_core::Hint::RANDOM => "random ports (no aim)".into(),
        n4_core::Hint::INDEPENDENT => "my port exactly (the NAT keeps ports)".into(),
        n4_core::Hint(offset) => format!("{offset:+}"),
    }
}

fn send_from(window: &[Option<UdpSocket>], slot: usize, to: SocketAddr, payload: &[u8]) {
    match window.get(slot) {
        Some(Some(socket)) => {
            if let Err(e) = socket.send_to(payload, to) {
                debug!("send from slot {slot} to {to}: {e}");
            }
        }
        _ => debug!("slot {slot} is not bound: datagram to {to} dropped"),
    }
}
