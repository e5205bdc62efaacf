//! The server's event loop: a TCP listener and a UDP socket on one port, many connections,
//! one thread, driving [`n4_core::Server`].

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use n4_core::{AbandonReason, ConnId, Message, Server, ServerConfig, ServerEvent, ServerOutput};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, info, warn};

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
    /// Bytes not yet written (the server writes at most a few 8-byte messages).
    out: Vec<u8>,
    /// The machine said `Close`: flush, FIN, drain until EOF or the deadline; the machine has
    /// forgotten the connection.
    closing: Option<Instant>,
}

/// Runs the server until SIGINT/SIGTERM. Returns an error only when it cannot start (port in
/// use) or the poller fails.
pub fn run_server(options: ServerOptions) -> Result<(), Error> {
    sockets::raise_fd_limit();
    let listen = options.listen;
    let mut listener = sockets::listen_tcp(listen).map_err(|source| Error::Listen {
        proto: "TCP",
        addr: listen,
        source,
    })?;
    // With `-l 0` the TCP port is ephemeral; UDP takes the same number.
    let listen = listener.local_addr().unwrap_or(listen);
    let mut udp = sockets::bind_udp(listen).map_err(|source| Error::Listen {
        proto: "UDP",
        addr: listen,
        source,
    })?;
    // Probes (our extension) go to the next port up, which a v1 server never hears. Without
    // it clients still pair; they only predict less well.
    let mut probe = listen.port().checked_add(1).and_then(|port| {
        let addr = SocketAddr::new(listen.ip(), port);
        sockets::bind_udp(addr)
            .map_err(|e| warn!("No probe port: cannot listen on UDP {addr}: {e}"))
            .ok()
    });
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
    let extensions = options.config.extensions;
    let mut driver = Driver {
        server: Server::new(options.config),
        poll,
        probe_answers: Vec::new(),
        answer_from_server_port: false,
        conns: HashMap::new(),
        lingering: BTreeSet::new(),
        next_conn: 0,
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
    if !extensions {
        debug!("extensions off: pure v1 replies");
    }

    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
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
                UDP => driver.receive(now, &udp, false, &mut buf),
                PROBE => {
                    if let Some(probe) = &probe {
                        driver.receive(now, probe, true, &mut buf);
                    }
                }
                Token(t) if t >= CONN_BASE => {
                    let conn = ConnId((t - CONN_BASE) as u64);
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        driver.read(now, conn, &mut buf);
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
        driver.drain(now);
    }
}

struct Driver {
    server: Server,
    poll: Poll,
    /// Answers to probes, sent by the loop from the server port (`true`) or the probe port.
    probe_answers: Vec<(bool, SocketAddr, [u8; 8])>,
    /// Which port answers the probe being handled: the one it came in on, or for PROBE-OTHER
    /// the other one.
    answer_from_server_port: bool,
    conns: HashMap<ConnId, Conn>,
    lingering: BTreeSet<(Instant, ConnId)>,
    next_conn: u64,
}

impl Driver {
    fn next_wakeup(&self) -> Option<Instant> {
        let linger = self.lingering.first().map(|l| l.0);
        self.server.poll_timeout().into_iter().chain(linger).min()
    }

    /// Feeds every datagram waiting on `socket` (the server port or the probe port) to the
    /// machine, answering probes as it goes.
    ///
    /// The probe port hears only probes, so a stray datagram there can never touch a pairing;
    /// the server port hears everything (`n4 probe` probes it too, to tell mappings apart). A
    /// PROBE is answered from the port it came in on, a PROBE-OTHER from the other one.
    fn receive(&mut self, now: Instant, socket: &UdpSocket, probe_port: bool, buf: &mut [u8]) {
        loop {
            match socket.recv_from(buf) {
                Ok((n, from)) => {
                    let msg = Message::decode(&buf[..n]);
                    let is_probe = matches!(msg, Ok(Message::Probe | Message::ProbeOther));
                    if is_probe || !probe_port {
                        self.answer_from_server_port =
                            (msg == Ok(Message::ProbeOther)) == probe_port;
                        self.server.handle_datagram(now, from, &buf[..n]);
                        self.drain(now);
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
                Ok((mut stream, remote)) => {
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    let _ = stream.set_nodelay(true);
                    let token = Token(CONN_BASE + conn.0 as usize);
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("cannot register connection from {remote}: {e}");
                        continue;
                    }
                    debug!("New connection: {remote}");
                    self.conns.insert(
                        conn,
                        Conn {
                            stream,
                            out: Vec::new(),
                            closing: None,
                        },
                    );
                    self.server.handle_connection_opened(now, conn, remote);
                    // Apply an immediate `Close` (limits) before the next accept.
                    self.drain(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection waits in the backlog; try again on
                    // the next event rather than spinning.
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn read(&mut self, now: Instant, conn: ConnId, buf: &mut [u8]) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            match c.stream.read(buf) {
                Ok(0) => {
                    let closing = c.closing.is_some();
                    self.drop_conn(conn);
                    if !closing {
                        self.server.handle_connection_closed(now, conn);
                    }
                    return;
                }
                Ok(n) => {
                    if c.closing.is_none() {
                        self.server.handle_stream_data(now, conn, &buf[..n]);
                        // The machine may have closed it: act before reading more.
                        self.drain(now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("connection {}: {e}", conn.0);
                    let closing = c.closing.is_some();
                    self.drop_conn(conn);
                    if !closing {
                        self.server.handle_connection_closed(now, conn);
                    }
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
            match c.stream.write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("connection {}: {e}", conn.0);
                    let closing = c.closing.is_some();
                    self.drop_conn(conn);
                    if !closing {
                        self.server.handle_connection_closed(now, conn);
                    }
                    return;
                }
            }
        }
        if let Some(deadline) = c.closing {
            if !self.lingering.contains(&(deadline, conn)) {
                let _ = c.stream.shutdown(Shutdown::Write);
                self.lingering.insert((deadline, conn));
            }
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        if let Some(mut c) = self.conns.remove(&conn) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Some(deadline) = c.closing {
                self.lingering.remove(&(deadline, conn));
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
    fn drain(&mut self, now: Instant) {
        while let Some(out) = self.server.poll_output() {
            match out {
                ServerOutput::Send { conn, message } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.out.extend_from_slice(&message.to_bytes());
                        self.flush(now, conn);
                    }
                }
                ServerOutput::Datagram { to, message } => {
                    let from_server_port = self.answer_from_server_port;
                    self.probe_answers
                        .push((from_server_port, to, message.to_bytes()));
                }
                ServerOutput::Close { conn } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        if c.closing.is_none() {
                            c.closing = Some(now + LINGER);
                            self.flush(now, conn);
                        }
                    }
                }
            }
        }
        while let Some(event) = self.server.poll_event() {
            log_event(&event);
        }
    }
}

fn answer_probes(
    udp: &UdpSocket,
    probe: Option<&UdpSocket>,
    answers: &mut Vec<(bool, SocketAddr, [u8; 8])>,
) {
    for (from_server_port, to, bytes) in answers.drain(..) {
        let socket = if from_server_port { Some(udp) } else { probe };
        if let Some(socket) = socket {
            if let Err(e) = socket.send_to(&bytes, to) {
                debug!("probe answer to {to}: {e}");
            }
        }
    }
}

fn log_event(event: &ServerEvent) {
    match event {
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
            reason: reason @ AbandonReason::ExchangeTimeout,
        } => info!("Abandoned [{ident}]: {reason:?}"),
        ServerEvent::Abandoned { ident, reason } => debug!("Abandoned [{ident}]: {reason:?}"),
    }
}
