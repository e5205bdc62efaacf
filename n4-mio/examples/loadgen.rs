//! `loadgen`: a load generator for the rendezvous server (`n4 -s`, or any v1 server).
//!
//! It plays K pairs of v1 clients — TCP HELLO, READY, UDP EXCHANGE (three times, as v1), PEERINFO;
//! no punching — each client from its own loopback address (127.x.y.z: Linux routes all of 127/8
//! to `lo`), optionally mixed with abuse: silent TCP connections, garbage TCP connections and
//! garbage datagrams to the server's UDP port, spread over the run. It can also hold N *waiting*
//! clients (a HELLO with a unique identifier, then nothing) before and during the pairs.
//!
//! At the end it checks that the PEERINFOs form a perfect matching (every client learned the
//! exchange address of exactly one other client, who learned its own; with distinct identifiers,
//! that other client is its own partner) and prints pairs/s, the p50/p99/max pairing latency
//! (HELLO sent → PEERINFO received, per client) and the server's RSS (`/proc/PID/status`) when it
//! knows the server's pid (`--spawn` or `--server-pid`).
//!
//! One thread, one mio poll, nonblocking sockets. Exit status 0 when every pair was matched
//! correctly and every garbage connection was closed by the server, 1 otherwise.
//!
//! ```text
//! cargo build --release -p n4-mio --bin n4 --example loadgen
//! target/release/examples/loadgen --spawn 'target/release/n4 -s -l 17210 -q' \
//!     --server 127.0.0.1:17210 --pairs 50000 --concurrency 500
//! ```

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream as StdTcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use n4_core::{Hint, Ident, Message, Token as WireToken};
use socket2::{Domain, Protocol, Socket, Type};

/// Load generator for the N4 rendezvous server: K pairs of v1 clients, waiting clients, abuse.
#[derive(Parser, Debug)]
#[command(name = "loadgen", max_term_width = 100)]
struct Cli {
    /// Server address (TCP and UDP)
    #[arg(long, default_value = "127.0.0.1:1721")]
    server: SocketAddrV4,

    /// Start the server with this command line (split on whitespace), measure its RSS, stop it
    /// at the end (SIGTERM). Example: 'target/release/n4 -s -l 17210 -q'
    #[arg(long, value_name = "CMD")]
    spawn: Option<String>,

    /// Append the spawned server's stderr to this file (default: discard)
    #[arg(long, value_name = "FILE", requires = "spawn")]
    server_log: Option<String>,

    /// Pid of an already running server, to read its RSS
    #[arg(long, value_name = "PID", conflicts_with = "spawn")]
    server_pid: Option<u32>,

    /// Pairs of clients to run
    #[arg(long, default_value_t = 10_000)]
    pairs: usize,

    /// Pairs in flight at once
    #[arg(long, default_value_t = 256)]
    concurrency: usize,

    /// Start at most this many pairs per second (default: as fast as --concurrency allows)
    #[arg(long)]
    rate: Option<f64>,

    /// Every pair uses this identifier (default: a distinct identifier per pair). Pairing is
    /// then first come first served, so only the matching as a whole is checked.
    #[arg(long, value_name = "IDENT")]
    ident: Option<String>,

    /// EXCHANGE datagrams each client sends after READY (v1: 3)
    #[arg(long, default_value_t = 3)]
    exchanges: u32,

    /// Clients that say HELLO with a unique identifier and wait, opened before the pairs and
    /// held until the end
    #[arg(long, default_value_t = 0)]
    waiting: usize,

    /// Silent TCP connections (connect, never send), spread over the run, held until the end
    /// or until the server closes them
    #[arg(long, default_value_t = 0)]
    silent: usize,

    /// Garbage TCP connections (connect, send 8..16 bytes that are not a HELLO), spread over
    /// the run; each must be closed by the server
    #[arg(long, default_value_t = 0)]
    garbage_conns: usize,

    /// Garbage datagrams to the server's UDP port, spread over the run
    #[arg(long, default_value_t = 0)]
    garbage_datagrams: usize,

    /// Second octet of the first client address (clients use 127.N.0.1 upwards; abuse and
    /// waiting clients use 127.200 and up)
    #[arg(long, default_value_t = 1)]
    ip_base: u8,

    /// Give up on the pairs after this many seconds
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,

    /// After the pairs, wait this long for the server to close the garbage connections
    #[arg(long, default_value_t = 5.0)]
    grace: f64,

    /// With --waiting: wait this long after the last HELLO before reading the server's RSS
    #[arg(long, default_value_t = 1.0)]
    settle: f64,

    /// Retry a refused connection (a v1 server closes its listener between pairs) after this
    /// many milliseconds, up to 1000 times per client
    #[arg(long, default_value_t = 1.0)]
    retry_ms: f64,

    /// Also retry a connection closed or reset before READY: a v1 server resets the
    /// connections queued on its listener when it closes it after each pair
    #[arg(long)]
    retry_closed: bool,

    /// Each client sends its EXCHANGEs from a UDP socket of its own (v1's way; slower) instead
    /// of the shared sender (one port, the client's own source address, batched)
    #[arg(long)]
    udp_per_client: bool,

    /// Also print the result as one JSON object on stdout
    #[arg(long)]
    json: bool,
}

const WAIT_BASE: usize = 1 << 40;
const ABUSE_BASE: usize = 1 << 41;
/// Connections allowed in the SYN/accept stage at once while opening waiting clients.
const OPEN_BATCH: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    AwaitReady,
    AwaitPeer,
    Done,
    Failed(&'static str),
}

struct Client {
    ip: Ipv4Addr,
    ident: Ident,
    stream: Option<TcpStream>,
    udp: Option<UdpSocket>,
    phase: Phase,
    buf: [u8; 16],
    len: usize,
    hello_at: Option<Instant>,
    retry_at: Option<Instant>,
    retries: u16,
    exchange_addr: Option<SocketAddrV4>,
    peer: Option<SocketAddrV4>,
    latency: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AbuseKind {
    Silent,
    Garbage,
}

struct Abuse {
    kind: AbuseKind,
    stream: Option<TcpStream>,
    sent: bool,
    /// The server closed it (EOF or reset).
    closed_by_server: bool,
    failed: bool,
}

struct Waiter {
    stream: Option<TcpStream>,
    said_hello: bool,
    closed_by_server: bool,
}

/// xorshift64*: garbage needs no quality, only variety and reproducibility.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The `idx`-th address of a /16 block: 127.`second`.x.y with y in 1..=254.
fn addr(second: u8, idx: usize) -> Ipv4Addr {
    let host = idx % 254 + 1;
    let net = idx / 254;
    let base = u32::from(Ipv4Addr::new(127, second, 0, 0));
    Ipv4Addr::from(base + (net as u32) * 256 + host as u32)
}

/// A 6-character identifier `prefix` + base-36 digits of `n`.
fn ident(prefix: u8, mut n: usize) -> Ident {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut raw = [prefix; 6];
    for slot in raw[1..].iter_mut().rev() {
        *slot = DIGITS[n % 36];
        n /= 36;
    }
    Ident::from_wire(raw).expect("ASCII")
}

fn connect_from(ip: Ipv4Addr, server: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // The port is picked at connect time, against the full 4-tuple: cheaper than a search at
    // bind time, and it never runs out.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a pointer to a live int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    match socket.connect(&SocketAddr::from(server).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn is_refused(e: &io::Error) -> bool {
    e.kind() == ErrorKind::ConnectionRefused
}

/// Writes all of `bytes` on a fresh connection: `Ok(false)` if it is not connected yet.
fn try_send(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<bool> {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(true),
        Ok(_) => Err(io::Error::other("short write")),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::NotConnected => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Reads and discards what the server sent: `true` once it closed the connection (EOF or
/// reset), `false` while it is open (or, before the connect completes, not open yet).
fn server_closed(stream: &mut TcpStream) -> bool {
    let mut tmp = [0u8; 64];
    loop {
        match stream.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        // Root may raise the hard limit too; others get the hard limit.
        let want = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: limit.rlim_max.max(1 << 20),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_cur
    }
}

/// `/proc/PID/status` and `/proc/PID/stat` of the server, opened once at the start: by the time
/// they are read the generator may have used up its descriptors.
struct ProcFiles {
    status: std::fs::File,
    stat: std::fs::File,
}

impl ProcFiles {
    fn open(pid: u32) -> Option<Self> {
        Some(Self {
            status: std::fs::File::open(format!("/proc/{pid}/status")).ok()?,
            stat: std::fs::File::open(format!("/proc/{pid}/stat")).ok()?,
        })
    }
}

fn read_again(mut file: &std::fs::File) -> Option<String> {
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory_kib(proc: &ProcFiles) -> Option<(u64, u64)> {
    let status = read_again(&proc.status)?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_of(proc: &ProcFiles) -> Option<Duration> {
    let stat = read_again(&proc.stat)?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// CPU time this process has used.
fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Gen {
    cli: Cli,
    poll: Poll,
    clients: Vec<Client>,
    waiters: Vec<Waiter>,
    abuse: Vec<Abuse>,
    sender: Sender,
    garbage_sent: usize,
    rng: Rng,
    in_flight: usize,
    pairs_finished: usize,
    finished: Vec<bool>,
    retries: u64,
    refused: Vec<usize>,
}

impl Gen {
    fn partner(i: usize) -> usize {
        i ^ 1
    }

    fn pair_done(&self, pair: usize) -> bool {
        [2 * pair, 2 * pair + 1]
            .iter()
            .all(|&i| matches!(self.clients[i].phase, Phase::Done | Phase::Failed(_)))
    }

    /// Counts client `i`'s pair as finished once both its clients are done or failed.
    fn settle(&mut self, i: usize) {
        let pair = i / 2;
        if !self.finished[pair] && self.pair_done(pair) {
            self.finished[pair] = true;
            self.in_flight -= 1;
            self.pairs_finished += 1;
        }
    }

    fn start_client(&mut self, i: usize, now: Instant) {
        let server = self.cli.server;
        let c = &mut self.clients[i];
        c.retry_at = None;
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
                    if let Err(e) = self.poll.registry().register(stream, Token(i), interest) {
                        self.fail(i, leak(format!("register: {e}")));
                    }
                }
            }
            Err(e) if is_refused(&e) => self.retry_or_fail(i, "connection refused"),
            Err(e) => c.phase = Phase::Failed(leak(format!("connect: {e}"))),
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
            Err(e)
                if is_refused(&e)
                    || (self.cli.retry_closed && e.kind() == ErrorKind::ConnectionReset) =>
            {
                self.retry_or_fail(i, leak(format!("hello: {e}")))
            }
            Err(e) => self.fail(i, leak(format!("hello: {e}"))),
        }
    }

    /// Starts client `i` again after `--retry-ms` (a fresh connection and HELLO), unless it
    /// has been retried too often already.
    fn retry_or_fail(&mut self, i: usize, why: &'static str) {
        const MAX_RETRIES: u16 = 1000;
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

    fn fail(&mut self, i: usize, why: &'static str) {
        let c = &mut self.clients[i];
        c.stream = None;
        c.udp = None;
        c.phase = Phase::Failed(why);
    }

    fn client_event(&mut self, i: usize, now: Instant, read_closed: bool) {
        if self.clients[i].phase == Phase::Connecting {
            let c = &mut self.clients[i];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) if is_refused(&e) => {
                    return self.retry_or_fail(i, "connection refused");
                }
                Ok(Some(e)) | Err(e) => {
                    self.fail(i, leak(format!("connect: {e}")));
                    return;
                }
            }
            self.send_hello(i, now);
            if self.clients[i].phase == Phase::Connecting {
                return;
            }
        }
        let mut tmp = [0u8; 64];
        loop {
            let c = &mut self.clients[i];
            if !matches!(c.phase, Phase::AwaitReady | Phase::AwaitPeer) {
                return;
            }
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut tmp) {
                Ok(0) if c.phase == Phase::AwaitReady && self.cli.retry_closed => {
                    return self.retry_or_fail(i, "closed before READY");
                }
                Ok(0) if c.phase == Phase::AwaitReady => {
                    return self.fail(i, "closed before READY");
                }
                Ok(0) => return self.fail(i, "closed before PEERINFO"),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e)
                    if c.phase == Phase::AwaitReady
                        && (is_refused(&e)
                            || (self.cli.retry_closed
                                && e.kind() == ErrorKind::ConnectionReset)) =>
                {
                    return self.retry_or_fail(i, leak(format!("read: {e}")));
                }
                Err(e) => return self.fail(i, leak(format!("read: {e}"))),
            };
            if c.len + n > c.buf.len() {
                return self.fail(i, "more than READY and PEERINFO");
            }
            c.buf[c.len..c.len + n].copy_from_slice(&tmp[..n]);
            c.len += n;
            while self.clients[i].len >= 8 {
                let c = &mut self.clients[i];
                let mut msg = [0u8; 8];
                msg.copy_from_slice(&c.buf[..8]);
                c.buf.copy_within(8.., 0);
                c.len -= 8;
                match (c.phase, msg[0]) {
                    (Phase::AwaitReady, 0x02) => {
                        if let Err(e) = self.exchange(i) {
                            return self.fail(i, leak(format!("exchange: {e}")));
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
                    (Phase::AwaitReady, _) => return self.fail(i, "not READY"),
                    _ => return self.fail(i, "not PEERINFO"),
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

    fn open_abuse(&mut self, kind: AbuseKind) {
        let k = self.abuse.len();
        let ip = match kind {
            AbuseKind::Silent => addr(200, k),
            AbuseKind::Garbage => addr(210, k),
        };
        let mut a = Abuse {
            kind,
            stream: None,
            sent: false,
            closed_by_server: false,
            failed: false,
        };
        match connect_from(ip, self.cli.server) {
            Ok(mut stream) => {
                let ok = self
                    .poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(ABUSE_BASE + k),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok();
                a.failed = !ok;
                a.stream = ok.then_some(stream);
            }
            Err(_) => a.failed = true,
        }
        self.abuse.push(a);
        if kind == AbuseKind::Garbage {
            self.abuse_event(k);
        }
    }

    fn garbage_bytes(&mut self) -> Vec<u8> {
        let r = self.rng.next();
        match r % 4 {
            0 => b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            1 => r.to_le_bytes().to_vec(),
            // A READY, as if the client were a server.
            2 => Message::Ready(None).to_bytes().to_vec(),
            // Half a HELLO then garbage: 16 bytes, the first 8 undecodable.
            _ => {
                let mut v = vec![0x01, 0x00, b'a', b'b', 0xff, 0xfe, 0x00, 0x00];
                v.extend_from_slice(&r.to_be_bytes());
                v
            }
        }
    }

    fn abuse_event(&mut self, k: usize) {
        if self.abuse[k].kind == AbuseKind::Garbage && !self.abuse[k].sent {
            let bytes = self.garbage_bytes();
            let a = &mut self.abuse[k];
            let Some(stream) = a.stream.as_mut() else {
                return;
            };
            match try_send(stream, &bytes) {
                Ok(true) => a.sent = true,
                Ok(false) => return,
                Err(_) => {
                    a.stream = None;
                    a.failed = true;
                    return;
                }
            }
        }
        let a = &mut self.abuse[k];
        let Some(stream) = a.stream.as_mut() else {
            return;
        };
        if server_closed(stream) {
            a.closed_by_server = true;
            a.stream = None;
        }
    }

    fn send_garbage_datagram(&mut self) {
        let r = self.rng.next();
        let bytes: Vec<u8> = match r % 8 {
            0 => r.to_le_bytes().to_vec(),
            1 => vec![0x03],
            2 => vec![0x03; 100],
            // An EXCHANGE for an identifier nobody uses.
            3 => Message::Exchange(ident(b'g', (r >> 8) as usize))
                .to_bytes()
                .to_vec(),
            // An EXCHANGE for an identifier in use, from an address no client has: the v1
            // attribution must find nothing, cheaply.
            4 | 5 => {
                let pair = (r >> 8) as usize % (self.clients.len() / 2).max(1);
                let ident = self
                    .clients
                    .get(2 * pair)
                    .map_or_else(Ident::default, |c| c.ident);
                Message::Exchange(ident).to_bytes().to_vec()
            }
            // A token EXCHANGE with a guessed token.
            6 => Message::ExchangeToken {
                token: WireToken((r >> 16) as u32),
                round: 1,
                hint: Hint::NONE,
            }
            .to_bytes()
            .to_vec(),
            _ => Message::Hello(Ident::default()).to_bytes().to_vec(),
        };
        // From addresses no client uses, each a little different.
        let from = Ipv4Addr::new(127, 220, (r >> 40) as u8, (r >> 48) as u8 | 1);
        self.sender.queue(from, &bytes);
        self.garbage_sent += 1;
    }

    fn open_waiter(&mut self, k: usize) {
        let mut w = Waiter {
            stream: None,
            said_hello: false,
            closed_by_server: false,
        };
        if let Ok(mut stream) = connect_from(addr(230, k), self.cli.server) {
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(WAIT_BASE + k),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok()
            {
                w.stream = Some(stream);
            }
        }
        self.waiters.push(w);
        self.waiter_event(k);
    }

    fn waiter_event(&mut self, k: usize) {
        let hello = Message::Hello(ident(b'w', k)).to_bytes();
        let w = &mut self.waiters[k];
        let Some(stream) = w.stream.as_mut() else {
            return;
        };
        if !w.said_hello {
            match try_send(stream, &hello) {
                Ok(true) => w.said_hello = true,
                Ok(false) => return,
                Err(_) => {
                    w.stream = None;
                    w.closed_by_server = true;
                    return;
                }
            }
        }
        if server_closed(stream) {
            w.closed_by_server = true;
            w.stream = None;
        }
    }

    fn dispatch(&mut self, events: &Events, now: Instant) {
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

    fn poll_once(&mut self, events: &mut Events, timeout: Duration) {
        self.sender.flush();
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll: {e}");
            }
        }
    }
}

/// The longest datagram [`Sender`] sends.
const MAX_DATAGRAM: usize = 128;

/// One UDP socket on `0.0.0.0:port` that sends datagrams from any loopback address
/// (`IP_PKTINFO`'s `ipi_spec_dst`), many per `sendmmsg` call.
struct Sender {
    socket: UdpSocket,
    port: u16,
    to: libc::sockaddr_in,
    queue: Vec<(Ipv4Addr, [u8; MAX_DATAGRAM], usize)>,
}

impl Sender {
    fn new(server: SocketAddrV4) -> io::Result<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_nonblocking(true)?;
        let port = socket.local_addr()?.port();
        // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_port = server.port().to_be();
        to.sin_addr.s_addr = u32::from(*server.ip()).to_be();
        Ok(Self {
            socket,
            port,
            to,
            queue: Vec::new(),
        })
    }

    /// Queues a datagram (cut to [`MAX_DATAGRAM`] bytes) from `from` to the server.
    fn queue(&mut self, from: Ipv4Addr, bytes: &[u8]) {
        let mut b = [0u8; MAX_DATAGRAM];
        let n = bytes.len().min(MAX_DATAGRAM);
        b[..n].copy_from_slice(&bytes[..n]);
        self.queue.push((from, b, n));
    }

    fn flush(&mut self) {
        const BATCH: usize = 256;
        const SPACE: usize =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as usize;
        let mut pending = std::mem::take(&mut self.queue);
        for chunk in pending.chunks_mut(BATCH) {
            let n = chunk.len();
            // SAFETY: all of these are plain old data; zero is a valid value for each.
            let mut iovs: Vec<libc::iovec> = Vec::with_capacity(n);
            let mut cmsgs = vec![[0u64; SPACE.div_ceil(8)]; n];
            let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(n);
            for (k, (from, bytes, len)) in chunk.iter_mut().enumerate() {
                iovs.push(libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: *len,
                });
                let cmsg = cmsgs[k].as_mut_ptr().cast::<libc::cmsghdr>();
                // SAFETY: the buffer is CMSG_SPACE bytes, 8-aligned: room for the header and
                // an in_pktinfo after it.
                unsafe {
                    (*cmsg).cmsg_len =
                        libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    let info = libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>();
                    info.write_unaligned(libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(*from).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    });
                }
            }
            for k in 0..n {
                // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = (&mut self.to as *mut libc::sockaddr_in).cast();
                hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                hdr.msg_iov = &mut iovs[k];
                hdr.msg_iovlen = 1;
                hdr.msg_control = cmsgs[k].as_mut_ptr().cast();
                hdr.msg_controllen = SPACE as _;
                msgs.push(libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                });
            }
            let mut sent = 0;
            while sent < n {
                // SAFETY: msgs[sent..n] are valid mmsghdrs whose buffers live until we return.
                let r = unsafe {
                    libc::sendmmsg(
                        self.socket.as_raw_fd(),
                        msgs[sent..].as_mut_ptr(),
                        (n - sent) as u32,
                        0,
                    )
                };
                if r <= 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    // Loopback drops what the receiver cannot queue without telling us; an
                    // error here is ours (e.g. no such local address): report it once.
                    eprintln!("sendmmsg: {e}");
                    break;
                }
                sent += r as usize;
            }
        }
        pending.clear();
        self.queue = pending;
    }
}

fn leak(s: String) -> &'static str {
    // Failure reasons are few and reported once; interning them keeps `Phase` Copy.
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap();
    if let Some(s) = seen.get(&s) {
        return s;
    }
    let leaked: &'static str = Box::leak(s.clone().into_boxed_str());
    seen.insert(s, leaked);
    leaked
}

fn spawn_server(cmd: &str, log: Option<&str>, server: SocketAddrV4) -> Child {
    let mut words = cmd.split_whitespace();
    let program = words.next().expect("--spawn: empty command");
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("--server-log: cannot open"),
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(program)
        .args(words)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("--spawn {cmd:?}: {e}"));
    // Ready when it accepts a connection (which then closes without a word: harmless).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if StdTcpStream::connect_timeout(&server.into(), Duration::from_millis(200)).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("--spawn {cmd:?} exited: {status}");
        }
        assert!(Instant::now() < end, "server not listening on {server}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    child
}

fn main() {
    let cli = Cli::parse();
    let fd_limit = raise_fd_limit();
    let shared = cli.ident.as_deref().map(|s| {
        Ident::new(s).unwrap_or_else(|e| {
            eprintln!("--ident {s:?}: {e}");
            std::process::exit(2)
        })
    });
    let mut child = cli
        .spawn
        .as_deref()
        .map(|cmd| spawn_server(cmd, cli.server_log.as_deref(), cli.server));
    let pid = child.as_ref().map(Child::id).or(cli.server_pid);
    let proc = pid.and_then(ProcFiles::open);
    if let (Some(pid), None) = (pid, &proc) {
        eprintln!("cannot read /proc/{pid}: no RSS or CPU figures");
    }
    let proc = proc.as_ref();

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
            retry_at: None,
            retries: 0,
            exchange_addr: None,
            peer: None,
            latency: None,
        })
        .collect();
    let sender = Sender::new(cli.server).expect("UDP sender");
    let mut g = Gen {
        poll: Poll::new().expect("poll"),
        clients,
        waiters: Vec::new(),
        abuse: Vec::new(),
        sender,
        garbage_sent: 0,
        rng: Rng(0x9E37_79B9_7F4A_7C15),
        in_flight: 0,
        pairs_finished: 0,
        finished: vec![false; pairs],
        retries: 0,
        refused: Vec::new(),
        cli,
    };
    let mut events = Events::with_capacity(4096);

    // Phase 1: waiting clients.
    let mut waiting_rss = None;
    if g.cli.waiting > 0 {
        let t0 = Instant::now();
        let mut next = 0;
        while next < g.cli.waiting
            || g.waiters
                .iter()
                .any(|w| w.stream.is_some() && !w.said_hello)
        {
            let unsent = g
                .waiters
                .iter()
                .filter(|w| w.stream.is_some() && !w.said_hello)
                .count();
            for _ in unsent..OPEN_BATCH {
                if next == g.cli.waiting {
                    break;
                }
                g.open_waiter(next);
                next += 1;
            }
            g.poll_once(&mut events, Duration::from_millis(5));
            g.dispatch(&events, Instant::now());
            assert!(
                t0.elapsed() < Duration::from_secs_f64(g.cli.timeout),
                "waiting clients not connected within --timeout"
            );
        }
        let opened = t0.elapsed();
        let settle_end = Instant::now() + Duration::from_secs_f64(g.cli.settle);
        while Instant::now() < settle_end {
            g.poll_once(&mut events, Duration::from_millis(20));
            g.dispatch(&events, Instant::now());
        }
        waiting_rss = proc.and_then(memory_kib);
        let held = g.waiters.iter().filter(|w| w.stream.is_some()).count();
        eprintln!(
            "waiting: {held} of {} clients held after HELLO ({:.2} s to open){}",
            g.cli.waiting,
            opened.as_secs_f64(),
            waiting_rss.map_or(String::new(), |(rss, _)| format!(
                "; server RSS {:.1} MiB",
                rss as f64 / 1024.0
            ))
        );
    }

    // Phase 2: pairs, with abuse spread over the launches.
    let server_cpu0 = proc.and_then(cpu_of);
    let own_cpu0 = own_cpu();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(g.cli.timeout);
    let retry = Duration::from_secs_f64(g.cli.retry_ms / 1000.0);
    let (n_silent, n_garbage_conns, n_garbage_dgrams) =
        (g.cli.silent, g.cli.garbage_conns, g.cli.garbage_datagrams);
    let total_abuse_units = pairs.max(1);
    let mut launched = 0;
    let (mut silent_opened, mut garbage_opened) = (0, 0);
    let mut retry_queue: Vec<(Instant, usize)> = Vec::new();
    while g.pairs_finished < pairs || launched < pairs {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Refused connections go back in line.
        for i in g.refused.drain(..) {
            retry_queue.push((now + retry, i));
        }
        let mut k = 0;
        while k < retry_queue.len() {
            if retry_queue[k].0 <= now {
                let (_, i) = retry_queue.swap_remove(k);
                g.retries += 1;
                g.start_client(i, now);
                g.settle(i);
            } else {
                k += 1;
            }
        }
        // Launch pairs.
        while launched < pairs && g.in_flight < g.cli.concurrency {
            if let Some(rate) = g.cli.rate {
                if now < t0 + Duration::from_secs_f64(launched as f64 / rate) {
                    break;
                }
            }
            g.in_flight += 1;
            g.start_client(2 * launched, now);
            g.start_client(2 * launched + 1, now);
            g.settle(2 * launched);
            launched += 1;
            // Abuse in proportion to the pairs launched.
            let due = |n: usize| n * launched / total_abuse_units;
            while silent_opened < due(n_silent) {
                g.open_abuse(AbuseKind::Silent);
                silent_opened += 1;
            }
            while garbage_opened < due(n_garbage_conns) {
                g.open_abuse(AbuseKind::Garbage);
                garbage_opened += 1;
            }
            while g.garbage_sent < due(n_garbage_dgrams) {
                g.send_garbage_datagram();
            }
            if pairs > 0 && launched % 64 == 0 {
                break; // let the loop breathe: read replies between bursts
            }
        }
        let mut timeout = Duration::from_millis(2);
        if g.cli.rate.is_some() || !retry_queue.is_empty() {
            timeout = Duration::from_micros(200);
        }
        if launched < pairs && g.in_flight < g.cli.concurrency && g.cli.rate.is_none() {
            timeout = Duration::ZERO;
        }
        g.poll_once(&mut events, timeout);
        g.dispatch(&events, Instant::now());
    }
    let elapsed = t0.elapsed();
    let cpu = Cpu {
        server: server_cpu0.and_then(|c0| Some(cpu_of(proc?)?.saturating_sub(c0))),
        own: own_cpu().saturating_sub(own_cpu0),
    };
    // Abuse launched after the last pair (pairs = 0, or rounding).
    while silent_opened < n_silent {
        g.open_abuse(AbuseKind::Silent);
        silent_opened += 1;
    }
    while garbage_opened < n_garbage_conns {
        g.open_abuse(AbuseKind::Garbage);
        garbage_opened += 1;
    }
    while g.garbage_sent < n_garbage_dgrams {
        g.send_garbage_datagram();
    }
    // Phase 3: the server should close every garbage connection.
    let grace_end = Instant::now() + Duration::from_secs_f64(g.cli.grace);
    while Instant::now() < grace_end
        && g.abuse
            .iter()
            .any(|a| a.kind == AbuseKind::Garbage && a.stream.is_some())
    {
        g.poll_once(&mut events, Duration::from_millis(10));
        g.dispatch(&events, Instant::now());
    }
    let final_rss = proc.and_then(memory_kib);

    report(&g, elapsed, cpu, waiting_rss, final_rss, fd_limit);
    let ok = verdict(&g);
    if let Some(child) = child.as_mut() {
        // SAFETY: kill(2) with our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
    }
    std::process::exit(if ok { 0 } else { 1 });
}

struct Matching {
    matched_pairs: usize,
    wrong: usize,
    incomplete: usize,
}

fn check_matching(g: &Gen, shared: bool) -> Matching {
    let by_addr: HashMap<SocketAddrV4, usize> = g
        .clients
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.exchange_addr.map(|a| (a, i)))
        .collect();
    let (mut good, mut wrong, mut incomplete) = (0, 0, 0);
    for (i, c) in g.clients.iter().enumerate() {
        let Some(peer) = c.peer else {
            incomplete += 1;
            continue;
        };
        let ok = by_addr.get(&peer).is_some_and(|&j| {
            j != i && g.clients[j].peer == c.exchange_addr && (shared || j == Gen::partner(i))
        });
        if ok {
            good += 1;
        } else {
            wrong += 1;
        }
    }
    Matching {
        matched_pairs: good / 2,
        wrong,
        incomplete,
    }
}

fn verdict(g: &Gen) -> bool {
    let m = check_matching(g, g.cli.ident.is_some());
    let garbage_open = g
        .abuse
        .iter()
        .filter(|a| a.kind == AbuseKind::Garbage && !a.closed_by_server)
        .count();
    m.matched_pairs == g.cli.pairs && m.wrong == 0 && garbage_open == 0
}

/// CPU used during the pairs phase.
#[derive(Clone, Copy)]
struct Cpu {
    server: Option<Duration>,
    own: Duration,
}

fn report(
    g: &Gen,
    elapsed: Duration,
    cpu: Cpu,
    waiting_rss: Option<(u64, u64)>,
    final_rss: Option<(u64, u64)>,
    fd_limit: u64,
) {
    let shared = g.cli.ident.is_some();
    let m = check_matching(g, shared);
    let mut latencies: Vec<Duration> = g.clients.iter().filter_map(|c| c.latency).collect();
    latencies.sort_unstable();
    let mut failures: HashMap<&str, usize> = HashMap::new();
    for c in &g.clients {
        match c.phase {
            Phase::Failed(why) => *failures.entry(why).or_default() += 1,
            Phase::Done => {}
            _ => *failures.entry("unfinished at --timeout").or_default() += 1,
        }
    }
    let count = |kind: AbuseKind, closed: bool| {
        g.abuse
            .iter()
            .filter(|a| a.kind == kind && (!closed || a.closed_by_server))
            .count()
    };
    let abuse_failed = g.abuse.iter().filter(|a| a.failed).count();
    let pairs_per_s = m.matched_pairs as f64 / elapsed.as_secs_f64();
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
    );
    let waiting_held = g.waiters.iter().filter(|w| w.stream.is_some()).count();
    println!(
        "pairs: {} of {} matched ({} ident{}), {} wrong, {} incomplete, in {:.3} s: {:.0} pairs/s",
        m.matched_pairs,
        g.cli.pairs,
        if shared { "one" } else { "distinct" },
        if shared { "" } else { "s" },
        m.wrong,
        m.incomplete,
        elapsed.as_secs_f64(),
        pairs_per_s
    );
    println!(
        "latency (HELLO -> PEERINFO, per client): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
    let per_pair = |d: Duration| d.as_secs_f64() * 1e6 / (m.matched_pairs.max(1) as f64);
    // /proc counts CPU in clock ticks (10 ms): below a few ticks the figure means nothing.
    if let Some(server) = cpu.server.filter(|c| *c >= Duration::from_millis(50)) {
        println!(
            "CPU during the pairs: server {:.2} s ({:.1} us/pair: {:.0} pairs per server CPU-second), \
             generator {:.2} s ({:.1} us/pair)",
            server.as_secs_f64(),
            per_pair(server),
            1e6 / per_pair(server).max(1e-9),
            cpu.own.as_secs_f64(),
            per_pair(cpu.own)
        );
    } else {
        println!(
            "CPU during the pairs: generator {:.2} s ({:.1} us/pair)",
            cpu.own.as_secs_f64(),
            per_pair(cpu.own)
        );
    }
    if !failures.is_empty() {
        let mut f: Vec<_> = failures.iter().collect();
        f.sort();
        println!("client failures: {f:?}");
    }
    if g.retries > 0 {
        println!(
            "connections retried (refused, or reset before READY): {}",
            g.retries
        );
    }
    if !g.abuse.is_empty() || g.garbage_sent > 0 {
        println!(
            "abuse: silent {} (closed by server {}), garbage conns {} (closed by server {}), \
             garbage datagrams {}, abuse sockets that failed to open {}",
            count(AbuseKind::Silent, false),
            count(AbuseKind::Silent, true),
            count(AbuseKind::Garbage, false),
            count(AbuseKind::Garbage, true),
            g.garbage_sent,
            abuse_failed
        );
    }
    if g.cli.waiting > 0 {
        println!(
            "waiting clients held to the end: {waiting_held} of {}",
            g.cli.waiting
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    if let Some((rss, _)) = waiting_rss {
        println!(
            "server RSS with {} waiting clients: {:.1} MiB",
            g.cli.waiting,
            mib(rss)
        );
    }
    if let Some((rss, hwm)) = final_rss {
        println!(
            "server RSS at the end: {:.1} MiB (peak {:.1} MiB)",
            mib(rss),
            mib(hwm)
        );
    }
    if g.cli.json {
        let opt = |v: Option<(u64, u64)>, i: usize| {
            v.map_or("null".to_string(), |v| {
                format!("{}", if i == 0 { v.0 } else { v.1 })
            })
        };
        println!(
            "{{\"pairs\":{},\"matched\":{},\"wrong\":{},\"incomplete\":{},\"shared_ident\":{},\
             \"seconds\":{:.4},\"pairs_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\
             \"max_ms\":{:.3},\"silent\":{},\"garbage_conns\":{},\"garbage_conns_closed\":{},\
             \"garbage_datagrams\":{},\"waiting\":{},\"waiting_held\":{},\
             \"rss_waiting_kib\":{},\"rss_end_kib\":{},\"rss_peak_kib\":{},\"fd_limit\":{},\
             \"server_cpu_s\":{},\"generator_cpu_s\":{:.3}}}",
            g.cli.pairs,
            m.matched_pairs,
            m.wrong,
            m.incomplete,
            shared,
            elapsed.as_secs_f64(),
            pairs_per_s,
            ms(p50),
            ms(p99),
            ms(max),
            count(AbuseKind::Silent, false),
            count(AbuseKind::Garbage, false),
            count(AbuseKind::Garbage, true),
            g.garbage_sent,
            g.cli.waiting,
            waiting_held,
            opt(waiting_rss, 0),
            opt(final_rss, 0),
            opt(final_rss, 1),
            fd_limit,
            cpu.server
                .map_or("null".to_string(), |c| format!("{:.3}", c.as_secs_f64())),
            cpu.own.as_secs_f64()
        );
    }
}
