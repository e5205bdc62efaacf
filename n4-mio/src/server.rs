//! The server's event loop: a TCP listener and a UDP socket on one port, many connections,
//! one thread, driving [`n4_core::Server`].

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use n4_core::{
    AbandonReason, ConnId, Local, RejectReason, Server, ServerConfig, ServerEvent, ServerOutput,
    ServerStats,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, info, warn, Level};

use crate::{sockets, Error};

const SIGNALS: Token = Token(0);
const LISTENER: Token = Token(1);
const UDP: Token = Token(2);
const PROBE: Token = Token(3);
/// Connection `ConnId(n)` has token `CONN_BASE + n`; ids are never reused.
const CONN_BASE: usize = 16;

/// How long a closed connection's read side is drained after our FIN, so that a late byte
/// from the client does not turn the close into a reset that could destroy our last message.
const LINGER: Duration = Duration::from_secs(2);

/// After `accept` failed for want of descriptors (EMFILE), try again this soon: the queued
/// connections raise no new event once descriptors are free again (edge-triggered), so
/// without a retry they would wait for an unrelated new connection.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How often, at most, the counters are logged (at debug level, and only when they changed).
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// A connection whose unwritten bytes pass this is not reading: it is dropped. The protocol
/// sends a few 8-byte messages per round and a session has at most 255 rounds, so an honest
/// client never comes near it (the kernel's send buffer takes them all first).
const MAX_PENDING: usize = 16 * 1024;

/// What [`run_server`] needs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// TCP and UDP listen address (the original: `0.0.0.0:1721`).
    pub listen: SocketAddr,
    /// The machine's settings (identifier, limits, deadlines, seed).
    pub config: ServerConfig,
}

struct Conn {
    stream: TcpStream,
    /// The remote IP, for the per-IP socket count.
    ip: IpAddr,
    /// Bytes the kernel did not take yet (almost always none: it has room for thousands of
    /// our 8-byte messages), bounded by [`MAX_PENDING`].
    out: Vec<u8>,
    /// Something was written: a close must then protect it (see [`LINGER`]).
    wrote: bool,
    /// Registered for writable events too (only while `out` is not empty).
    write_interest: bool,
    /// The machine said `Close`: flush, FIN, drain until EOF or the deadline; the machine has
    /// forgotten the connection.
    closing: Option<Instant>,
}

/// Runs the server until SIGINT/SIGTERM. Returns an error only when it cannot start (port in
/// use) or the poller fails.
pub fn run_server(mut options: ServerOptions) -> Result<(), Error> {
    // Each connection is a descriptor, and so is each closed one that still lingers; keep a
    // margin so that the machine refuses the excess (closing it at once) before accept(2)
    // runs out of descriptors and leaves connections hanging in the backlog.
    let max = options.config.max_connections as u64;
    let files = sockets::raise_fd_limit(max.saturating_add(fd_margin(max)));
    let fit = files.saturating_sub(fd_margin(files)).max(1);
    if fit < max {
        warn!(
            "Open files limited to {files}: serving at most {fit} connections (--max-conns {max})"
        );
        options.config.max_connections = fit as usize;
    }
    let listen = options.listen;
    let mut listener = sockets::listen_tcp(listen).map_err(|source| Error::Listen {
        proto: "TCP",
        addr: listen,
        source,
    })?;
    // With `-l 0` the TCP port is ephemeral; UDP takes the same number.
    let listen = listener.local_addr().unwrap_or(listen);
    let mut udp = sockets::bind_server_udp(listen).map_err(|source| Error::Listen {
        proto: "UDP",
        addr: listen,
        source,
    })?;
    // Probes (our extension) go to the next port up, which a v1 server never hears. Without
    // it clients still pair; they only predict less well.
    let mut probe = match listen.port().checked_add(1) {
        Some(port) => {
            let addr = SocketAddr::new(listen.ip(), port);
            sockets::bind_server_udp(addr)
                .map_err(|e| warn!("No probe port: cannot listen on UDP {addr}: {e}"))
                .ok()
        }
        None => {
            warn!(
                "No probe port: port {} has no port above it (-l 65534 or lower gives one); \
                 clients pair but cannot predict",
                listen.port()
            );
            None
        }
    };
    let poll = Poll::new()?;
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    poll.registry()
        .register(&mut udp, UDP, Interest::READABLE)?;
    if let Some(probe) = &mut probe {
        poll.registry().register(probe, PROBE, Interest::READABLE)?;
    }

    let only = options.config.only_ident;
    let private = options.config.key.is_some();
    let extensions = options.config.extensions;
    let limits = (options.config.max_connections, options.config.max_per_ip);
    let mut driver = Driver {
        limits,
        sockets_per_ip: HashMap::new(),
        accept_retry: None,
        server: Server::new(options.config),
        poll,
        probe_answers: Vec::new(),
        conns: HashMap::new(),
        lingering: BTreeSet::new(),
        next_conn: 0,
        dirty: Vec::new(),
        accept_warned: None,
        stats: StatsLog::new(),
    };
    info!(
        "Listening on TCP/{port} and UDP/{port}",
        port = listen.port()
    );
    if let Some(probe) = probe.as_ref().and_then(|p| p.local_addr().ok()) {
        debug!("Probe port: UDP/{}", probe.port());
    }
    match only {
        Some(ident) => info!("Identifier: {ident} (only)"),
        None => info!("Identifier: any"),
    }
    if private {
        info!("Private server: only clients holding its key are served");
    }
    if !extensions {
        debug!("extensions off: pure v1 replies");
    }

    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    let mut datagrams = sockets::Datagrams::new();
    loop {
        let now = Instant::now();
        let timeout = driver
            .next_wakeup()
            .map(|t| t.saturating_duration_since(now));
        if let Err(e) = driver.poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let now = Instant::now();
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if signals.pending().next().is_some() {
                        info!("Stopped");
                        return Ok(());
                    }
                }
                LISTENER => driver.accept(now, &listener),
                UDP => driver.receive(now, &udp, probe.as_ref(), false, &mut datagrams),
                PROBE => driver.receive(now, &udp, probe.as_ref(), true, &mut datagrams),
                Token(t) if t >= CONN_BASE => {
                    let conn = ConnId((t - CONN_BASE) as u64);
                    let closed = event.is_read_closed() || event.is_error();
                    if event.is_readable() || closed {
                        driver.read(now, conn, &mut buf, closed);
                    }
                    if event.is_writable() {
                        driver.flush(now, conn);
                    }
                }
                Token(_) => {}
            }
            driver.drain(now);
            answer_probes(&udp, probe.as_ref(), &mut driver.probe_answers);
        }
        if driver.server.poll_timeout().is_some_and(|t| t <= now) {
            driver.server.handle_timeout(now);
        }
        driver.expire_lingering(now);
        if driver.accept_retry.is_some_and(|t| t <= now) {
            driver.accept_retry = None;
            driver.accept(now, &listener);
        }
        driver.drain(now);
        driver.stats.tick(now, &driver.server, driver.conns.len());
    }
}

/// Descriptors kept free beside `connections` open ones: the listener, the UDP ports, the
/// poller, and connections that linger after their close (see [`LINGER`]).
fn fd_margin(connections: u64) -> u64 {
    64 + connections / 16
}

/// The periodic counters line (`-v`): what the machine holds, what happened since start, and
/// the sockets the loop still owns (lingering ones included). Logged at most every
/// [`STATS_INTERVAL`], only when something changed, so an idle server stays quiet.
struct StatsLog {
    enabled: bool,
    due: Option<Instant>,
    last: Option<(ServerStats, u64, u64, usize)>,
    abandoned: u64,
    rejected: u64,
}

impl StatsLog {
    fn new() -> Self {
        Self {
            enabled: tracing::enabled!(Level::DEBUG),
            due: None,
            last: None,
            abandoned: 0,
            rejected: 0,
        }
    }

    fn count(&mut self, event: &ServerEvent) {
        match event {
            ServerEvent::Abandoned { .. } => self.abandoned += 1,
            ServerEvent::Rejected { .. } => self.rejected += 1,
            _ => {}
        }
    }

    fn tick(&mut self, now: Instant, server: &Server, sockets: usize) {
        if !self.enabled {
            return;
        }
        let s = server.stats();
        let current = (s, self.abandoned, self.rejected, sockets);
        if self.last == Some(current) {
            self.due = None;
            return;
        }
        let due = *self.due.get_or_insert(now + STATS_INTERVAL);
        if now < due {
            return;
        }
        self.due = None;
        self.last = Some(current);
        debug!(
            "Stats: connections {}, waiting {}, pairing {}, completed {}, abandoned {}, \
             rejected {}, ignored datagrams {}, probes {}, sockets {}",
            s.connections,
            s.waiting,
            s.pairing,
            s.completed,
            self.abandoned,
            self.rejected,
            s.ignored_datagrams,
            s.probes,
            sockets
        );
    }
}

struct Driver {
    server: Server,
    poll: Poll,
    /// `--max-conns` and `--max-per-ip`, applied here to every socket the loop holds
    /// (lingering ones included), as the machine applies them to connections it knows.
    limits: (usize, usize),
    /// Sockets held per remote IP, lingering ones included.
    sockets_per_ip: HashMap<IpAddr, usize>,
    /// When to call `accept` again after it ran out of descriptors.
    accept_retry: Option<Instant>,
    /// Answers to probes, sent by the loop from the socket the machine names.
    probe_answers: Vec<(Local, SocketAddr, [u8; 8])>,
    conns: HashMap<ConnId, Conn>,
    lingering: BTreeSet<(Instant, ConnId)>,
    next_conn: u64,
    /// Connections with writes or a close gathered by `drain`, to flush.
    dirty: Vec<ConnId>,
    /// Until when an accept error is not logged again.
    accept_warned: Option<Instant>,
    stats: StatsLog,
}

impl Driver {
    fn next_wakeup(&self) -> Option<Instant> {
        let linger = self.lingering.first().map(|l| l.0);
        let stats = self.stats.due;
        self.server
            .poll_timeout()
            .into_iter()
            .chain(linger)
            .chain(stats)
            .chain(self.accept_retry)
            .min()
    }

    /// Feeds every datagram waiting on the server port (`probe_port` false) or the probe port
    /// to the machine, a batch at a time, answering probes after each batch.
    ///
    /// Each datagram names the socket it came in on; the machine decides what it is (the probe
    /// port takes only probes) and which socket answers.
    fn receive(
        &mut self,
        now: Instant,
        udp: &UdpSocket,
        probe: Option<&UdpSocket>,
        probe_port: bool,
        datagrams: &mut sockets::Datagrams,
    ) {
        let socket = match (probe_port, probe) {
            (false, _) => udp,
            (true, Some(probe)) => probe,
            (true, None) => return,
        };
        loop {
            match datagrams.recv(socket) {
                Ok(n) => {
                    let local = if probe_port {
                        Local::Probe
                    } else {
                        Local::Main
                    };
                    for (from, bytes) in datagrams.iter() {
                        self.server.handle_datagram(now, local, from, bytes);
                        self.drain(now);
                    }
                    answer_probes(udp, probe, &mut self.probe_answers);
                    if n < sockets::BATCH {
                        // Edge-triggered: the queue is empty; a new datagram is a new event.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // e.g. an ICMP error for an earlier probe answer: nothing to do.
                    debug!("udp receive: {e}");
                }
            }
        }
    }

    fn accept(&mut self, now: Instant, listener: &TcpListener) {
        loop {
            match listener.accept() {
                Ok((stream, remote)) => {
                    let ip = remote.ip();
                    let held = self.sockets_per_ip.get(&ip).copied().unwrap_or(0);
                    let full = if self.conns.len() >= self.limits.0 {
                        Some(RejectReason::TooManyConnections)
                    } else if held >= self.limits.1 {
                        Some(RejectReason::TooManyFromIp)
                    } else {
                        None
                    };
                    if let Some(reason) = full {
                        // Lingering sockets still hold descriptors: counting them keeps a
                        // flood of short pairings from exhausting descriptors.
                        debug!("Rejected {remote}: {reason:?} (sockets, lingering included)");
                        self.stats.rejected += 1;
                        drop(stream);
                        continue;
                    }
                    *self.sockets_per_ip.entry(ip).or_insert(0) += 1;
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    // Linux hands the listener's TCP_NODELAY down to accepted sockets.
                    #[cfg(not(target_os = "linux"))]
                    let _ = stream.set_nodelay(true);
                    debug!("New connection: {remote}");
                    self.conns.insert(
                        conn,
                        Conn {
                            stream,
                            ip,
                            out: Vec::new(),
                            wrote: false,
                            write_interest: false,
                            closing: None,
                        },
                    );
                    self.server.handle_connection_opened(now, conn, remote);
                    // Apply an immediate `Close` (limits): such a connection is dropped before
                    // it costs a registration.
                    self.drain(now);
                    let Some(c) = self.conns.get_mut(&conn) else {
                        continue;
                    };
                    let token = Token(CONN_BASE + conn.0 as usize);
                    // Readable only: writes go straight out, and only a full send buffer
                    // asks for writable events (see `flush`).
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut c.stream, token, Interest::READABLE)
                    {
                        warn!("cannot register connection from {remote}: {e}");
                        self.drop_conn(conn);
                        self.server.handle_connection_closed(now, conn);
                        self.drain(now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection waits in the backlog; try again
                    // shortly (see ACCEPT_RETRY) rather than spinning. Said once a second at
                    // most: under a flood every new connection would say it again.
                    if !matches!(self.accept_warned, Some(quiet_until) if now < quiet_until) {
                        warn!("accept: {e}; retrying");
                        self.accept_warned = Some(now + Duration::from_secs(1));
                    }
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Reads what arrived. Edge-triggered: a read shorter than `buf` emptied the socket and
    /// more data will be a new event, so it stops there unless the event also reported the
    /// peer's FIN or an error (`closed`), which only another read shows.
    fn read(&mut self, now: Instant, conn: ConnId, buf: &mut [u8], closed: bool) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            match c.stream.read(buf) {
                Ok(0) => {
                    self.lose_conn(now, conn);
                    return;
                }
                Ok(n) => {
                    if c.closing.is_none() {
                        self.server.handle_stream_data(now, conn, &buf[..n]);
                        // The machine may have closed it: act before reading more.
                        self.drain(now);
                    }
                    if n < buf.len() && !closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("connection {}: {e}", conn.0);
                    self.lose_conn(now, conn);
                    return;
                }
            }
        }
    }

    /// Writes what is pending; a connection in `closing` gets its FIN once empty.
    fn flush(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        while !c.out.is_empty() {
            // With a close to follow, hold the bytes back (MSG_MORE) so that the FIN below
            // rides in their segment: one segment and one ACK fewer per connection.
            match send(&c.stream, &c.out, c.closing.is_some()) {
                Ok(n) => {
                    c.wrote = true;
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if c.out.len() > MAX_PENDING {
                        debug!("connection {}: not reading; dropped", conn.0);
                        self.lose_conn(now, conn);
                    } else if !c.write_interest {
                        c.write_interest = true;
                        let token = Token(CONN_BASE + conn.0 as usize);
                        let interest = Interest::READABLE | Interest::WRITABLE;
                        if let Err(e) =
                            self.poll
                                .registry()
                                .reregister(&mut c.stream, token, interest)
                        {
                            debug!("connection {}: {e}", conn.0);
                        }
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("connection {}: {e}", conn.0);
                    self.lose_conn(now, conn);
                    return;
                }
            }
        }
        if let Some(deadline) = c.closing {
            if !c.wrote {
                // Nothing of ours to protect (limits, garbage, silence): close at once.
                self.drop_conn(conn);
            } else if !self.lingering.contains(&(deadline, conn)) {
                let _ = c.stream.shutdown(Shutdown::Write);
                self.lingering.insert((deadline, conn));
            }
        }
    }

    /// The peer closed or the socket failed: closes it and, unless the machine closed it
    /// first (and has forgotten it), tells the machine.
    fn lose_conn(&mut self, now: Instant, conn: ConnId) {
        let closing = self.conns.get(&conn).is_some_and(|c| c.closing.is_some());
        self.drop_conn(conn);
        if !closing {
            self.server.handle_connection_closed(now, conn);
        }
    }

    /// Closes the socket. Closing the only descriptor of a socket also removes it from the
    /// epoll set, so there is no `deregister` call to pay for; an event already fetched for it
    /// finds no connection and is ignored.
    fn drop_conn(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(deadline) = c.closing {
                self.lingering.remove(&(deadline, conn));
            }
            if let Some(n) = self.sockets_per_ip.get_mut(&c.ip) {
                *n -= 1;
                if *n == 0 {
                    self.sockets_per_ip.remove(&c.ip);
                }
            }
        }
    }

    fn expire_lingering(&mut self, now: Instant) {
        while let Some(&(at, conn)) = self.lingering.first() {
            if at > now {
                break;
            }
            self.lingering.pop_first();
            self.drop_conn(conn);
        }
    }

    /// Applies the machine's outputs and logs its events.
    ///
    /// Writes and closes are gathered first and applied per connection afterwards, so that a
    /// last message and its close leave in one segment (see [`send`]).
    fn drain(&mut self, now: Instant) {
        loop {
            while let Some(out) = self.server.poll_output() {
                match out {
                    ServerOutput::Send { conn, message } => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.out.extend_from_slice(&message.to_bytes());
                            self.dirty.push(conn);
                        }
                    }
                    ServerOutput::Datagram { from, to, message } => {
                        self.probe_answers.push((from, to, message.to_bytes()));
                    }
                    ServerOutput::Close { conn } => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            if c.closing.is_none() {
                                c.closing = Some(now + LINGER);
                                self.dirty.push(conn);
                            }
                        }
                    }
                }
            }
            if self.dirty.is_empty() {
                break;
            }
            // A failed write tells the machine, which may have more to say: go round again.
            let mut dirty = std::mem::take(&mut self.dirty);
            for conn in dirty.drain(..) {
                self.flush(now, conn);
            }
            self.dirty = dirty;
        }
        while let Some(event) = self.server.poll_event() {
            self.stats.count(&event);
            log_event(&event);
        }
    }
}

/// `write`, but with MSG_MORE when `more` (Linux; elsewhere a plain write): the kernel keeps a
/// short segment back until the next write or the FIN.
fn send(stream: &TcpStream, bytes: &[u8], more: bool) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;

        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        // SAFETY: send(2) reads `bytes.len()` bytes from a live slice.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                flags,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = more;
        io::Write::write(&mut &*stream, bytes)
    }
}

fn answer_probes(
    udp: &UdpSocket,
    probe: Option<&UdpSocket>,
    answers: &mut Vec<(Local, SocketAddr, [u8; 8])>,
) {
    for (from, to, bytes) in answers.drain(..) {
        let socket = match from {
            Local::Main => Some(udp),
            Local::Probe => probe,
        };
        if let Some(socket) = socket {
            if let Err(e) = socket.send_to(&bytes, to) {
                debug!("probe answer to {to}: {e}");
            }
        }
    }
}

fn log_event(event: &ServerEvent) {
    match event {
        // A private server's refusals are worth a line: someone holds a wrong key.
        ServerEvent::Rejected {
            remote,
            reason: reason @ (RejectReason::WrongKey | RejectReason::KeyRequired),
        } => info!("Refused {remote}: {reason:?}"),
        ServerEvent::Rejected { remote, reason } => debug!("Rejected {remote}: {reason:?}"),
        ServerEvent::Waiting { remote, ident } => debug!("Waiting [{ident}]: {remote}"),
        ServerEvent::Paired {
            ident,
            first,
            second,
        } => debug!("Ready [{ident}]: {first} + {second}"),
        ServerEvent::Completed {
            round: 1,
            ident,
            first,
            second,
        } => info!("Paired [{ident}]: {first} <-> {second}"),
        ServerEvent::Completed {
            round,
            ident,
            first,
            second,
        } => debug!("Round {round} [{ident}]: {first} <-> {second}"),
        // A pairing that fails half-way is worth a line; a client leaving is its own business.
        ServerEvent::Abandoned {
            ident,
            reason: reason @ (AbandonReason::ExchangeTimeout | AbandonReason::AuthFailed),
        } => info!("Abandoned [{ident}]: {reason:?}"),
        ServerEvent::Abandoned { ident, reason } => debug!("Abandoned [{ident}]: {reason:?}"),
    }
}
