//! The generator: one mio poll over every socket it holds, and the pair clients it plays. A pair
//! client is a v1 client without the punching: TCP HELLO, READY, `--exchanges` UDP EXCHANGEs,
//! PEERINFO, done. It never decides anything a v1 client would not; refused or (with
//! `--retry-closed`) reset connections start again from HELLO.

use std::fmt;
use std::io::{self, ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use n4_core::{Ident, Message};

use crate::abuse::{Abuse, Rng};
use crate::cli::Cli;
use crate::net::{addr, connect_from, is_refused, try_send};
use crate::sender::Sender;
use crate::waiting::Waiter;

/// Poll tokens: pair client `i` is `Token(i)`, waiting client `k` is `Token(WAIT_BASE + k)`,
/// abuse connection `k` is `Token(ABUSE_BASE + k)`.
pub const WAIT_BASE: usize = 1 << 40;
/// See [`WAIT_BASE`].
pub const ABUSE_BASE: usize = 1 << 41;

/// A refused client starts again at most this many times before it counts as failed.
const MAX_RETRIES: u16 = 1000;

/// Where a pair client is in its exchange with the server.
#[derive(Debug)]
pub enum Phase {
    /// Not started, or waiting for its retry.
    Idle,
    /// TCP connect under way.
    Connecting,
    /// HELLO sent.
    AwaitReady,
    /// EXCHANGEs sent.
    AwaitPeer,
    /// PEERINFO received.
    Done,
    /// Gave up.
    Failed(Failure),
}

/// Why a pair client gave up. Its text is what the report counts failures by.
#[derive(Debug)]
pub enum Failure {
    /// Refused more than [`MAX_RETRIES`] times.
    Refused,
    /// The server closed the connection before READY.
    ClosedBeforeReady,
    /// The server closed the connection before PEERINFO.
    ClosedBeforePeerInfo,
    /// The server sent more than READY and PEERINFO.
    TooMuch,
    /// The first message was not READY.
    NotReady,
    /// The message after READY was not PEERINFO.
    NotPeerInfo,
    /// A system call failed: what the client was doing (`connect`, `register`, `hello`, `read`
    /// or `exchange`) and the OS error.
    Io(&'static str, io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::ClosedBeforeReady => f.write_str("closed before READY"),
            Self::ClosedBeforePeerInfo => f.write_str("closed before PEERINFO"),
            Self::TooMuch => f.write_str("more than READY and PEERINFO"),
            Self::NotReady => f.write_str("not READY"),
            Self::NotPeerInfo => f.write_str("not PEERINFO"),
            Self::Io(step, error) => write!(f, "{step}: {error}"),
        }
    }
}

/// A pair client: clients `2p` and `2p + 1` are pair `p` and say the same identifier.
pub struct Client {
    pub ip: Ipv4Addr,
    pub ident: Ident,
    stream: Option<TcpStream>,
    /// Its own EXCHANGE socket (`--udp-per-client`), held until PEERINFO.
    udp: Option<UdpSocket>,
    pub phase: Phase,
    /// What arrived of the server's messages (8 bytes each), not yet read.
    buf: [u8; 16],
    len: usize,
    hello_at: Option<Instant>,
    retries: u16,
    /// Where its EXCHANGEs came from, as the server saw it.
    pub exchange_addr: Option<SocketAddrV4>,
    /// The address PEERINFO gave.
    pub peer: Option<SocketAddrV4>,
    /// HELLO sent → PEERINFO received.
    pub latency: Option<Duration>,
}

/// A 6-character identifier `prefix` + base-36 digits of `n`.
pub fn ident(prefix: u8, mut n: usize) -> Ident {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut raw = [prefix; 6];
    for slot in raw[1..].iter_mut().rev() {
        *slot = DIGITS[n % 36];
        n /= 36;
    }
    Ident::from_wire(raw).expect("ASCII")
}

/// Everything the generator holds: the flags, the poll, every client and connection, the counts.
pub struct Generator {
    pub cli: Cli,
    pub poll: Poll,
    /// `2 × --pairs` pair clients.
    pub clients: Vec<Client>,
    pub waiters: Vec<Waiter>,
    pub abuse: Vec<Abuse>,
    pub sender: Sender,
    /// Silent and garbage connections opened so far.
    pub silent_opened: usize,
    pub garbage_opened: usize,
    /// Garbage datagrams queued so far.
    pub garbage_sent: usize,
    pub rng: Rng,
    /// Pairs started and not finished.
    pub in_flight: usize,
    pub pairs_finished: usize,
    /// Per pair: both clients done or failed.
    finished: Vec<bool>,
    /// Connections started again (refused, or reset before READY).
    pub retries: u64,
    /// Clients to start again after `--retry-ms`.
    pub refused: Vec<usize>,
}

impl Generator {
    /// The generator for `cli`, every pair client created but none started. Every pair says
    /// `shared` if given, else an identifier of its own.
    pub fn new(cli: Cli, shared: Option<Ident>) -> Self {
        let pairs = cli.pairs;
        let clients = (0..2 * pairs)
            .map(|i| Client {
                ip: addr(cli.ip_base, i),
                ident: shared.unwrap_or_else(|| ident(b'p', i / 2)),
                stream: None,
                udp: None,
                phase: Phase::Idle,
                buf: [0; 16],
                len: 0,
                hello_at: None,
                retries: 0,
                exchange_addr: None,
                peer: None,
                latency: None,
            })
            .collect();
        let sender = Sender::new(cli.server).expect("UDP sender");
        Self {
            poll: Poll::new().expect("poll"),
            clients,
            waiters: Vec::new(),
            abuse: Vec::new(),
            sender,
            silent_opened: 0,
            garbage_opened: 0,
            garbage_sent: 0,
            rng: Rng::new(),
            in_flight: 0,
            pairs_finished: 0,
            finished: vec![false; pairs],
            retries: 0,
            refused: Vec::new(),
            cli,
        }
    }

    /// The other client of client `i`'s pair.
    pub fn partner(i: usize) -> usize {
        i ^ 1
    }

    fn pair_done(&self, pair: usize) -> bool {
        [2 * pair, 2 * pair + 1]
            .iter()
            .all(|&i| matches!(self.clients[i].phase, Phase::Done | Phase::Failed(_)))
    }

    /// Counts client `i`'s pair as finished once both its clients are done or failed.
    pub fn settle(&mut self, i: usize) {
        let pair = i / 2;
        if !self.finished[pair] && self.pair_done(pair) {
            self.finished[pair] = true;
            self.in_flight -= 1;
            self.pairs_finished += 1;
        }
    }

    /// Connects client `i` and, if the connection is up already, says HELLO.
    pub fn start_client(&mut self, i: usize, now: Instant) {
        let server = self.cli.server;
        let c = &mut self.clients[i];
        match connect_from(c.ip, server) {
            Ok(stream) => {
                c.stream = Some(stream);
                c.phase = Phase::Connecting;
                // On loopback the handshake is usually done when connect returns: say HELLO at
                // once and listen for reading only.
                self.send_hello(i, now);
                let c = &mut self.clients[i];
                let interest = match c.phase {
                    Phase::Connecting => Interest::READABLE | Interest::WRITABLE,
                    _ => Interest::READABLE,
                };
                if let Some(stream) = c.stream.as_mut() {
                    if let Err(error) = self.poll.registry().register(stream, Token(i), interest) {
                        self.fail(i, Failure::Io("register", error));
                    }
                }
            }
            Err(e) if is_refused(&e) => self.retry_or_fail(i, Failure::Refused),
            Err(error) => c.phase = Phase::Failed(Failure::Io("connect", error)),
        }
    }

    fn send_hello(&mut self, i: usize, now: Instant) {
        let c = &mut self.clients[i];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        let hello = Message::Hello(c.ident).to_bytes();
        match try_send(stream, &hello) {
            Ok(true) => {
                c.hello_at = Some(now);
                c.phase = Phase::AwaitReady;
            }
            Ok(false) => {}
            Err(error)
                if is_refused(&error)
                    || (self.cli.retry_closed && error.kind() == ErrorKind::ConnectionReset) =>
            {
                self.retry_or_fail(i, Failure::Io("hello", error))
            }
            Err(error) => self.fail(i, Failure::Io("hello", error)),
        }
    }

    /// Starts client `i` again after `--retry-ms` (a fresh connection and HELLO), unless it
    /// has been retried too often already.
    fn retry_or_fail(&mut self, i: usize, why: Failure) {
        let c = &mut self.clients[i];
        if c.retries >= MAX_RETRIES {
            return self.fail(i, why);
        }
        c.retries += 1;
        c.stream = None;
        c.hello_at = None;
        c.len = 0;
        c.phase = Phase::Idle;
        self.refused.push(i);
    }

    fn fail(&mut self, i: usize, why: Failure) {
        let c = &mut self.clients[i];
        c.stream = None;
        c.udp = None;
        c.phase = Phase::Failed(why);
    }

    fn client_event(&mut self, i: usize, now: Instant, read_closed: bool) {
        if matches!(self.clients[i].phase, Phase::Connecting) {
            let c = &mut self.clients[i];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) if is_refused(&e) => {
                    return self.retry_or_fail(i, Failure::Refused);
                }
                Ok(Some(error)) | Err(error) => {
                    self.fail(i, Failure::Io("connect", error));
                    return;
                }
            }
            self.send_hello(i, now);
            if matches!(self.clients[i].phase, Phase::Connecting) {
                return;
            }
        }
        let mut tmp = [0u8; 64];
        loop {
            let c = &mut self.clients[i];
            let await_ready = match c.phase {
                Phase::AwaitReady => true,
                Phase::AwaitPeer => false,
                _ => return,
            };
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut tmp) {
                Ok(0) if await_ready && self.cli.retry_closed => {
                    return self.retry_or_fail(i, Failure::ClosedBeforeReady);
                }
                Ok(0) if await_ready => return self.fail(i, Failure::ClosedBeforeReady),
                Ok(0) => return self.fail(i, Failure::ClosedBeforePeerInfo),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(error)
                    if await_ready
                        && (is_refused(&error)
                            || (self.cli.retry_closed
                                && error.kind() == ErrorKind::ConnectionReset)) =>
                {
                    return self.retry_or_fail(i, Failure::Io("read", error));
                }
                Err(error) => return self.fail(i, Failure::Io("read", error)),
            };
            if c.len + n > c.buf.len() {
                return self.fail(i, Failure::TooMuch);
            }
            c.buf[c.len..c.len + n].copy_from_slice(&tmp[..n]);
            c.len += n;
            while self.clients[i].len >= 8 {
                let c = &mut self.clients[i];
                let mut msg = [0u8; 8];
                msg.copy_from_slice(&c.buf[..8]);
                c.buf.copy_within(8.., 0);
                c.len -= 8;
                match (&c.phase, msg[0]) {
                    (Phase::AwaitReady, 0x02) => {
                        if let Err(error) = self.exchange(i) {
                            return self.fail(i, Failure::Io("exchange", error));
                        }
                    }
                    (Phase::AwaitPeer, 0x04) => {
                        let ip = Ipv4Addr::new(msg[2], msg[3], msg[4], msg[5]);
                        let port = u16::from_be_bytes([msg[6], msg[7]]);
                        c.peer = Some(SocketAddrV4::new(ip, port));
                        c.latency = c.hello_at.map(|t| now - t);
                        c.phase = Phase::Done;
                        c.stream = None;
                        c.udp = None;
                        return;
                    }
                    (Phase::AwaitReady, _) => return self.fail(i, Failure::NotReady),
                    _ => return self.fail(i, Failure::NotPeerInfo),
                }
            }
            // Edge-triggered: a short read emptied the socket, and more data will be a new
            // event (unless the peer's FIN came with it, which only another read shows).
            if n < tmp.len() && !read_closed {
                return;
            }
        }
    }

    /// READY arrived: v1 sends its EXCHANGE three times from one UDP socket. By default the
    /// datagrams leave through the shared sender from the client's own address (one port for
    /// all, batched); with `--udp-per-client` from a socket of the client's own.
    fn exchange(&mut self, i: usize) -> io::Result<()> {
        let c = &mut self.clients[i];
        let bytes = Message::Exchange(c.ident).to_bytes();
        let local = if self.cli.udp_per_client {
            let udp = UdpSocket::bind((c.ip, 0))?;
            udp.set_nonblocking(true)?;
            for _ in 0..self.cli.exchanges {
                udp.send_to(&bytes, self.cli.server)?;
            }
            let local = udp.local_addr()?;
            c.udp = Some(udp);
            match local {
                SocketAddr::V4(a) => a,
                SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
            }
        } else {
            for _ in 0..self.cli.exchanges {
                self.sender.queue(c.ip, &bytes);
            }
            SocketAddrV4::new(c.ip, self.sender.port)
        };
        c.exchange_addr = Some(local);
        c.phase = Phase::AwaitPeer;
        Ok(())
    }

    /// Hands each event to the client or connection its token names.
    pub fn dispatch(&mut self, events: &Events, now: Instant) {
        for event in events.iter() {
            match event.token().0 {
                t if t >= ABUSE_BASE => self.abuse_event(t - ABUSE_BASE),
                t if t >= WAIT_BASE => self.waiter_event(t - WAIT_BASE),
                i => {
                    self.client_event(i, now, event.is_read_closed() || event.is_error());
                    self.settle(i);
                }
            }
        }
    }

    /// Sends the queued datagrams, then waits up to `timeout` for events.
    pub fn poll_once(&mut self, events: &mut Events, timeout: Duration) {
        self.sender.flush();
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll: {e}");
            }
        }
    }
}
