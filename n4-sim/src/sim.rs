//! The simulation: a virtual clock, an event queue, the NATs and links of a [`Scenario`], and
//! n4-core's [`Server`] and a [`Client`] per site driven exactly as a real event loop drives them.
//!
//! Loop: jump the clock to the earliest of (next queued delivery, the machines' timeouts);
//! deliver everything due in (time, sequence) order, draining every machine after each input
//! (commands before transmits, then events); then fire due timers. Time is a `Duration` since a
//! process-wide epoch; machines see `epoch + now`, the trace prints `now`, so traces do not
//! depend on when the process started.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use n4_core::{
    Client, ClientConfig, Command, ConfigError, ConnId, Event, Local, Server, ServerConfig,
    ServerEvent, ServerOutput,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::link::{Fate, Link};
use crate::nat::{ns, Drop, Nat};
use crate::queue::EventQueue;
use crate::scenario::{Scenario, Stop};

/// How much the trace says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TraceLevel {
    /// Client and server events, new NAT mappings, a summary.
    Events,
    /// Also every datagram dropped by a NAT or lost on a link.
    Packets,
}

/// Options of a run that do not change its outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimOptions {
    /// Write a trace. Default: none.
    pub trace: Option<TraceLevel>,
    /// Keep every new NAT mapping (for [`Sim::mappings`] and [`Sim::punch_table`]). Implied by
    /// a trace. Default off.
    pub record_mappings: bool,
}

/// A new NAT mapping, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingRecord {
    /// When the NAT made it.
    pub at: Duration,
    /// Site index (0 = A, 1 = B, …).
    pub site: usize,
    /// The host's endpoint.
    pub internal: SocketAddrV4,
    /// The NAT's public endpoint.
    pub external: SocketAddrV4,
    /// The destination of the datagram that made it.
    pub remote: SocketAddrV4,
    /// Background flows that took ports since the NAT's previous mapping for us.
    pub background: u64,
}

/// How one client fared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOutcome {
    /// A PUNCH from the peer arrived.
    pub won: bool,
    /// From the client's start to its WIN.
    pub time_to_win: Option<Duration>,
    /// The round that won.
    pub win_round: Option<u32>,
    /// Rounds started.
    pub rounds: u32,
    /// UDP datagrams the client sent (EXCHANGE, PUNCH, acknowledgements).
    pub datagrams_sent: u64,
    /// The host port of the slot that won.
    pub local_port: Option<u16>,
    /// The peer's address as the winning PUNCH came from.
    pub peer: Option<SocketAddr>,
    /// The client stopped without a WIN (`max_rounds`, or server unreachable).
    pub gave_up: bool,
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Client A, client B, and any more, in site order.
    pub clients: Vec<ClientOutcome>,
    /// Virtual time when the run stopped.
    pub elapsed: Duration,
    /// Queued events processed.
    pub events: u64,
    /// Background flows per site's NAT that moved a port counter (0 for a host behind
    /// another site's NAT).
    pub background: Vec<u64>,
}

impl Outcome {
    /// Every client won.
    pub fn won(&self) -> bool {
        self.clients.iter().all(|c| c.won)
    }

    /// When all had won: the latest time-to-WIN.
    pub fn time_to_win(&self) -> Option<Duration> {
        self.clients
            .iter()
            .map(|c| c.time_to_win)
            .try_fold(Duration::ZERO, |latest, t| Some(latest.max(t?)))
    }

    /// Rounds the longest-playing client started.
    pub fn rounds(&self) -> u32 {
        self.clients.iter().map(|c| c.rounds).max().unwrap_or(0)
    }

    /// UDP datagrams sent by all clients.
    pub fn datagrams(&self) -> u64 {
        self.clients.iter().map(|c| c.datagrams_sent).sum()
    }
}

/// Why a scenario cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioError {
    /// A site's NAT settings are out of range.
    #[error("site {site}: {reason}")]
    Nat {
        /// The site's name (`A`, `B`, …).
        site: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A client's settings are refused by n4-core.
    #[error("client {site}: {source}")]
    Client {
        /// The site's name (`A`, `B`, …).
        site: &'static str,
        /// n4-core's reason.
        source: ConfigError,
    },
    /// [`crate::Site::behind`] names no site with a NAT of its own.
    #[error("site {site}: behind site {behind}, which is no site with a NAT of its own")]
    Behind {
        /// The site's name (`A`, `B`, …).
        site: &'static str,
        /// The index it names.
        behind: usize,
    },
    /// Two hosts behind one NAT share an IP.
    #[error("site {site}: hosts behind one NAT need different IPs")]
    SameHostIp {
        /// The site's name (`A`, `B`, …).
        site: &'static str,
    },
    /// Two of the server and the sites with NATs of their own share a public IP.
    #[error("public IPs must differ")]
    SamePublicIp,
    /// A scenario has 2 to [`MAX_SITES`] sites.
    #[error("{count} sites: a scenario has 2 to {MAX_SITES}")]
    Sites {
        /// How many it has.
        count: usize,
    },
}

/// The most sites (hosts, each with its client) a scenario may have.
pub const MAX_SITES: usize = 8;

/// Site names, in order, for traces and errors.
const SITE_NAMES: [&str; MAX_SITES] = ["A", "B", "C", "D", "E", "F", "G", "H"];

/// The one real clock read of the crate: an arbitrary origin for virtual time.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[derive(Clone, Copy, Debug)]
enum TcpEv {
    /// The handshake completed at the server (accept).
    Open,
    /// The handshake completed at the client.
    Connected,
    ToServer([u8; 8]),
    ToClient([u8; 8]),
    CloseAtServer,
    CloseAtClient,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Start(u8),
    /// A host's datagram reaches its NAT.
    Egress {
        site: u8,
        port: u16,
        to: SocketAddrV4,
        payload: [u8; 8],
    },
    /// The datagrams of burst `burst` (`Sim::bursts`: a range of the WAN arena) reach their
    /// public addresses (the server or a NAT), in order: datagrams scheduled one after the
    /// other for the same time (a burst sent over one fixed-delay path) are one entry.
    Wan {
        burst: u32,
    },
    /// A datagram reaches a host's port.
    Ingress {
        site: u8,
        port: u16,
        from: SocketAddrV4,
        payload: [u8; 8],
    },
    Tcp {
        conn: u32,
        ev: TcpEv,
    },
}

/// A datagram between public addresses, packed into scalars (`ip << 16 | port`, the payload
/// as a `u64`) so that it is built in registers and stored with plain word moves.
#[derive(Clone, Copy, Debug)]
struct WanDatagram {
    from: u64,
    to: u64,
    payload: u64,
}

impl WanDatagram {
    #[inline(always)]
    fn new(from: SocketAddrV4, to: SocketAddrV4, payload: [u8; 8]) -> Self {
        let pack = |a: SocketAddrV4| u64::from(a.ip().to_bits()) << 16 | u64::from(a.port());
        Self {
            from: pack(from),
            to: pack(to),
            payload: u64::from_ne_bytes(payload),
        }
    }

    #[inline(always)]
    fn unpack(self) -> (SocketAddrV4, SocketAddrV4, [u8; 8]) {
        let addr = |a: u64| SocketAddrV4::new(Ipv4Addr::from_bits((a >> 16) as u32), a as u16);
        (addr(self.from), addr(self.to), self.payload.to_ne_bytes())
    }
}

struct Conn {
    site: usize,
    remote: SocketAddr,
    up_last: Duration,
    down_last: Duration,
}

#[derive(Default, Clone, Copy)]
struct Drops {
    no_mapping: u64,
    filtered: u64,
    lost: u64,
}

struct SiteRt {
    name: &'static str,
    nat: Nat,
    /// The site whose NAT this host sits behind: itself, or the other ([`Site::behind`]).
    ///
    /// [`Site::behind`]: crate::Site::behind
    nat_at: usize,
    host_ip: Ipv4Addr,
    lan: Link,
    /// `lan.is_instant()`: the host and its NAT hand datagrams over directly.
    lan_instant: bool,
    config: ClientConfig,
    client: Option<Client>,
    start: Duration,
    window: Vec<u16>,
    next_ephemeral: u16,
    conn: Option<u32>,
    outcome: ClientOutcome,
    done: bool,
    mappings: u64,
    drops: Drops,
}

impl SiteRt {
    /// A placeholder without allocations, for [`SiteRt::reset`] to fill in.
    fn empty() -> Self {
        Self {
            name: "",
            nat: Nat::empty(),
            nat_at: 0,
            host_ip: Ipv4Addr::UNSPECIFIED,
            lan: Link::default(),
            lan_instant: true,
            config: ClientConfig::default(),
            client: None,
            start: Duration::ZERO,
            window: Vec::new(),
            next_ephemeral: 0,
            conn: None,
            outcome: ClientOutcome::default(),
            done: false,
            mappings: 0,
            drops: Drops::default(),
        }
    }

    /// The next port of the kernel's ephemeral range (32768–60999, wrapping) that the window
    /// does not hold and `also_not` does not name.
    fn ephemeral_port(&mut self, also_not: &[u16]) -> u16 {
        loop {
            let e = self.next_ephemeral;
            self.next_ephemeral = if e >= 60999 { 32768 } else { e + 1 };
            if !also_not.contains(&e) && !self.window.contains(&e) {
                return e;
            }
        }
    }

    /// Site `i` of `scenario`, as the start of a run has it: NAT, client (made now if it
    /// starts at 0; made now anyway, to validate its settings), counters.
    fn reset(
        &mut self,
        i: usize,
        scenario: &Scenario,
        epoch: Instant,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), ScenarioError> {
        let s = &scenario.sites[i];
        let name = SITE_NAMES[i];
        let nat_at = match s.behind {
            None => i,
            Some(j) if j != i && scenario.sites.get(j).is_some_and(|o| o.behind.is_none()) => j,
            Some(j) => {
                return Err(ScenarioError::Behind {
                    site: name,
                    behind: j,
                })
            }
        };
        self.nat
            .reset(s.nat, s.public_ip, rng)
            .map_err(|reason| ScenarioError::Nat { site: name, reason })?;
        let config = ClientConfig {
            server: scenario.server_addr,
            ..s.client.clone()
        };
        // A client starting at 0 is made now; a later one is made (and validated) now too,
        // so that a bad configuration is an error here, and remade when it starts.
        let client = Client::new(config.clone(), epoch)
            .map_err(|source| ScenarioError::Client { site: name, source })?;
        // Every field by name: a new field that is not reset here does not compile.
        let Self {
            name: n,
            nat: _,
            nat_at: at,
            host_ip,
            lan,
            lan_instant,
            config: c,
            client: cl,
            start,
            window,
            next_ephemeral,
            conn,
            outcome,
            done,
            mappings,
            drops,
        } = self;
        *n = name;
        *at = nat_at;
        *host_ip = s.host_ip;
        *lan = s.lan;
        *lan_instant = s.lan.is_instant();
        *c = config;
        *cl = s.start.is_zero().then_some(client);
        *start = s.start;
        window.clear();
        *next_ephemeral = 32768 + (rng.next_u64() % 28000) as u16;
        *conn = None;
        *outcome = ClientOutcome::default();
        *done = false;
        *mappings = 0;
        *drops = Drops::default();
        Ok(())
    }
}

struct Trace {
    level: TraceLevel,
    out: String,
}

impl Trace {
    fn line(&mut self, now: Duration, args: fmt::Arguments<'_>) {
        let _ = writeln!(
            self.out,
            "{:>4}.{:06} {}",
            now.as_secs(),
            now.subsec_micros(),
            args
        );
    }
}

/// Writes a trace line if tracing (at least at `$level`) is on; formats nothing otherwise.
macro_rules! trace {
    ($sim:expr, $level:expr, $($arg:tt)*) => {
        if let Some(t) = $sim.trace.as_mut() {
            if t.level >= $level {
                t.line($sim.now, format_args!($($arg)*));
            }
        }
    };
}

/// One run of a scenario. See the module docs.
pub struct Sim {
    epoch: Instant,
    now: Duration,
    /// `now` in nanoseconds, for the NATs' expiry checks.
    now_ns: u64,
    time_limit: Duration,
    stop: Stop,
    rng: ChaCha8Rng,
    queue: EventQueue<Ev>,
    /// Machines that got input since they were last drained: bit 0 server, bit `i + 1` site
    /// `i`'s client.
    dirty: u16,
    /// Datagrams of queued [`Ev::Wan`] entries; cleared when none is queued.
    wan: Vec<WanDatagram>,
    /// `(first, len)` in `wan` of each [`Ev::Wan`] entry; cleared with `wan`.
    bursts: Vec<(u32, u32)>,
    /// Queue sequence number and time of the last [`Ev::Wan`] entry pushed, while it is still
    /// queued: a datagram scheduled right after it for the same time joins its burst.
    wan_tail: (u64, u64),
    wan_queued: u32,
    events: u64,
    server: Server,
    server_addr: SocketAddrV4,
    sites: Vec<SiteRt>,
    /// Nodes: 0 = the server, `i + 1` = site `i`'s NAT.
    nodes: usize,
    /// `paths[src * nodes + dst]`: uplink then uplink.
    paths: Vec<Link>,
    /// `Some(latency)` where the path delivers everything after exactly that (draws nothing).
    fixed: Vec<Option<u64>>,
    /// Host → server for each site's TCP leg: LAN, uplink, server uplink.
    tcp_paths: Vec<Link>,
    tcp_rto: Duration,
    tcp_syn_rto: Duration,
    conns: Vec<Conn>,
    trace: Option<Trace>,
    records: Option<Vec<MappingRecord>>,
}

impl Sim {
    /// Prepares a run; nothing happens until [`Sim::run`].
    pub fn new(scenario: &Scenario, options: SimOptions) -> Result<Self, ScenarioError> {
        let mut sim = Self::empty();
        sim.reset(scenario, options)?;
        Ok(sim)
    }

    /// A placeholder without allocations, for [`Sim::reset`] to fill in.
    fn empty() -> Self {
        Self {
            epoch: epoch(),
            now: Duration::ZERO,
            now_ns: 0,
            time_limit: Duration::ZERO,
            stop: Stop::Decided,
            rng: ChaCha8Rng::seed_from_u64(0),
            queue: EventQueue::with_capacity(0),
            dirty: 0,
            wan: Vec::new(),
            bursts: Vec::new(),
            wan_tail: (0, 0),
            wan_queued: 0,
            events: 0,
            server: Server::new(ServerConfig::default()),
            server_addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            sites: Vec::new(),
            nodes: 0,
            paths: Vec::new(),
            fixed: Vec::new(),
            tcp_paths: Vec::new(),
            tcp_rto: Duration::ZERO,
            tcp_syn_rto: Duration::ZERO,
            conns: Vec::new(),
            trace: None,
            records: None,
        }
    }

    /// Makes this the `Sim` that [`Sim::new`] would make, keeping the allocations (and
    /// writing the big parts in place). On an error it is left half-made: drop it.
    fn reset(&mut self, scenario: &Scenario, options: SimOptions) -> Result<(), ScenarioError> {
        let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
        let server_config = ServerConfig {
            rng_seed: rng.next_u64(),
            ..scenario.server.clone()
        };
        let epoch = epoch();
        let n = scenario.sites.len();
        if !(2..=MAX_SITES).contains(&n) {
            return Err(ScenarioError::Sites { count: n });
        }
        self.sites.truncate(n);
        while self.sites.len() < n {
            self.sites.push(SiteRt::empty());
        }
        for (i, site) in self.sites.iter_mut().enumerate() {
            site.reset(i, scenario, epoch, &mut rng)?;
        }
        for (i, site) in self.sites.iter().enumerate() {
            let twin = self.sites[..i]
                .iter()
                .any(|o| o.nat_at == site.nat_at && o.host_ip == site.host_ip);
            if twin {
                return Err(ScenarioError::SameHostIp { site: site.name });
            }
        }
        // The server's and every NAT's public IP differ (a host behind another site's NAT has
        // no public IP of its own).
        let ips: Vec<Ipv4Addr> = std::iter::once(*scenario.server_addr.ip())
            .chain(
                scenario
                    .sites
                    .iter()
                    .filter(|s| s.behind.is_none())
                    .map(|s| s.public_ip),
            )
            .collect();
        if (1..ips.len()).any(|k| ips[..k].contains(&ips[k])) {
            return Err(ScenarioError::SamePublicIp);
        }
        let up: Vec<Link> = std::iter::once(scenario.server_uplink)
            .chain(scenario.sites.iter().map(|s| s.uplink))
            .collect();
        // Every field by name: a new field that is not reset here does not compile.
        let Self {
            epoch: e,
            now,
            now_ns,
            time_limit,
            stop,
            rng: r,
            queue,
            dirty,
            wan,
            bursts,
            wan_tail,
            wan_queued,
            events,
            server,
            server_addr,
            sites,
            nodes,
            paths,
            fixed,
            tcp_paths,
            tcp_rto,
            tcp_syn_rto,
            conns,
            trace,
            records,
        } = self;
        *e = epoch;
        *now = Duration::ZERO;
        *now_ns = 0;
        *time_limit = scenario.time_limit;
        *stop = scenario.stop;
        *r = rng;
        queue.clear();
        *dirty = 0;
        for (i, site) in sites.iter().enumerate() {
            match site.client {
                Some(_) => *dirty |= 2 << i,
                None => queue.push(site.start, Ev::Start(i as u8)),
            }
        }
        wan.clear();
        wan.reserve(256);
        bursts.clear();
        bursts.reserve(16);
        *wan_tail = (0, 0);
        *wan_queued = 0;
        *events = 0;
        *server = Server::new(server_config);
        *server_addr = scenario.server_addr;
        *nodes = up.len();
        paths.clear();
        paths.extend(up.iter().flat_map(|s| up.iter().map(|d| s.then(d))));
        fixed.clear();
        fixed.extend(paths.iter().map(|p| p.is_fixed().then(|| ns(p.latency))));
        tcp_paths.clear();
        tcp_paths.extend(scenario.sites.iter().enumerate().map(|(i, s)| {
            let nat_at = s.behind.unwrap_or(i);
            s.lan
                .then(&scenario.sites[nat_at].uplink)
                .then(&scenario.server_uplink)
        }));
        *tcp_rto = scenario.tcp_rto;
        *tcp_syn_rto = scenario.tcp_syn_rto;
        conns.clear();
        conns.reserve(4);
        *trace = options.trace.map(|level| Trace {
            level,
            out: String::with_capacity(4096),
        });
        *records = (options.record_mappings || options.trace.is_some()).then(Vec::new);
        Ok(())
    }

    /// Runs to the stop condition or the time limit and returns the outcome.
    pub fn run(&mut self) -> Outcome {
        // Clients that start at 0 already have their first commands queued.
        self.drain();
        loop {
            if self.stopped() {
                break;
            }
            let Some(next) = self.next_wakeup() else {
                break;
            };
            if next > self.time_limit {
                self.now = self.time_limit;
                self.now_ns = ns(self.now);
                trace!(self, TraceLevel::Events, "time limit");
                break;
            }
            self.now = self.now.max(next);
            self.now_ns = ns(self.now);
            while let Some(ev) = self.queue.pop_due(self.now) {
                self.events += 1;
                self.handle(ev);
                self.drain();
            }
            let t = self.epoch + self.now;
            if self.server.poll_timeout().is_some_and(|d| d <= t) {
                self.server.handle_timeout(t);
                self.dirty |= 1;
                self.drain();
            }
            for i in 0..self.sites.len() {
                let due = self.sites[i]
                    .client
                    .as_ref()
                    .and_then(|c| c.poll_timeout())
                    .is_some_and(|d| d <= t);
                if due {
                    if let Some(c) = self.sites[i].client.as_mut() {
                        c.handle_timeout(t);
                    }
                    self.dirty |= 2 << i;
                    self.drain();
                }
            }
        }
        self.summary();
        self.outcome()
    }

    /// The outcome so far.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            clients: self.sites.iter().map(|s| s.outcome.clone()).collect(),
            elapsed: self.now,
            events: self.events,
            background: self
                .sites
                .iter()
                .map(|s| s.nat.background_total())
                .collect(),
        }
    }

    /// The trace so far (empty without [`SimOptions::trace`]).
    pub fn trace(&self) -> &str {
        self.trace.as_ref().map_or("", |t| t.out.as_str())
    }

    /// Every new NAT mapping so far, in order (empty unless recorded).
    pub fn mappings(&self) -> &[MappingRecord] {
        self.records.as_deref().unwrap_or(&[])
    }

    /// The local ports of a client's current (last) window.
    pub fn window(&self, site: usize) -> &[u16] {
        &self.sites[site].window
    }

    /// The seed README's table for one site's current (last) window: each slot's mappings,
    /// host endpoint → (NAT endpoint) → destination, EXCHANGE first, the winning slot marked
    /// `[*]`. Needs recorded mappings.
    pub fn punch_table(&self, site: usize) -> String {
        let s = &self.sites[site];
        let mine: Vec<&MappingRecord> = self
            .mappings()
            .iter()
            .filter(|m| m.site == site && s.window.contains(&m.internal.port()))
            .collect();
        let row = |m: &MappingRecord| {
            let won = s.outcome.local_port == Some(m.internal.port())
                && s.outcome.peer == Some(m.remote.into());
            format!(
                "{} --> ({}) --> {}{}\n",
                m.internal,
                m.external,
                m.remote,
                if won { " [*]" } else { "" }
            )
        };
        let mut out = String::from("---(Exchange)---\n");
        for m in mine.iter().filter(|m| m.remote == self.server_addr) {
            out += &row(m);
        }
        out += "----(Punch)-----\n";
        for &p in &s.window {
            for m in mine
                .iter()
                .filter(|m| m.internal.port() == p && m.remote != self.server_addr)
            {
                out += &row(m);
            }
        }
        out
    }

    fn stopped(&self) -> bool {
        self.sites.iter().all(|s| match self.stop {
            Stop::Decided => s.outcome.won || s.done,
            Stop::Finished => s.done,
        })
    }

    fn next_wakeup(&self) -> Option<Duration> {
        let since = |t: Instant| t.saturating_duration_since(self.epoch);
        let q = self.queue.next_at();
        let s = self.server.poll_timeout().map(since);
        let c = self
            .sites
            .iter()
            .filter_map(|s| s.client.as_ref()?.poll_timeout().map(since));
        q.into_iter().chain(s).chain(c).min()
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        self.queue.push(at, ev);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(i) => self.start_client(usize::from(i)),
            Ev::Egress {
                site,
                port,
                to,
                payload,
            } => self.egress(usize::from(site), port, to, payload),
            Ev::Wan { burst } => {
                // Out of the queue: nothing may join it any more.
                self.wan_tail.0 = 0;
                let (first, len) = self.bursts[burst as usize];
                self.events += u64::from(len) - 1;
                for k in first..first + len {
                    let (from, to, payload) = self.wan[k as usize].unpack();
                    self.wan(from, to, payload);
                    self.drain();
                }
                self.wan_queued -= 1;
                if self.wan_queued == 0 {
                    self.wan.clear();
                    self.bursts.clear();
                }
            }
            Ev::Ingress {
                site,
                port,
                from,
                payload,
            } => self.ingress(usize::from(site), port, from, payload),
            Ev::Tcp { conn, ev } => self.tcp(conn, ev),
        }
    }

    fn start_client(&mut self, i: usize) {
        let t = self.epoch + self.now;
        let client = Client::new(self.sites[i].config.clone(), t).expect("validated in new");
        self.sites[i].client = Some(client);
        self.dirty |= 2 << i;
    }

    // ------------------------------------------------------------------------------- UDP

    /// A client's datagram from host port `port` over a LAN with delay or randomness.
    #[inline(never)]
    fn host_send_lan(&mut self, i: usize, port: u16, to: SocketAddrV4, payload: [u8; 8]) {
        let lan = self.sites[i].lan;
        let ev = |_| Ev::Egress {
            site: i as u8,
            port,
            to,
            payload,
        };
        self.over(&lan, ev);
    }

    /// Sends `make(())` over `link`: lost, delivered once, or twice.
    fn over(&mut self, link: &Link, make: impl Fn(()) -> Ev) -> bool {
        match link.sample(&mut self.rng) {
            Fate::Lost => false,
            Fate::Arrives(d, copy) => {
                self.schedule(self.now + d, make(()));
                if let Some(d2) = copy {
                    self.schedule(self.now + d2, make(()));
                }
                true
            }
        }
    }

    /// Sends a datagram between public addresses over `path`: lost, delivered once, or twice.
    #[inline(always)]
    fn over_wan(&mut self, path: &Link, d: WanDatagram) -> bool {
        match path.sample(&mut self.rng) {
            Fate::Lost => false,
            Fate::Arrives(t, copy) => {
                self.schedule_wan(ns(self.now + t), d);
                if let Some(t2) = copy {
                    self.schedule_wan(ns(self.now + t2), d);
                }
                true
            }
        }
    }

    #[inline(always)]
    fn schedule_wan(&mut self, at: u64, d: WanDatagram) {
        let next = self.wan.len() as u32;
        self.wan.push(d);
        // The last entry pushed is this burst and it is due at `at`: a datagram pushed now
        // would be delivered right after it (nothing sorts between two consecutive sequence
        // numbers at the same time), so it joins the burst. Its datagrams end at `next`.
        if self.wan_tail == (self.queue.last_seq(), at) {
            if let Some(b) = self.bursts.last_mut() {
                b.1 += 1;
                return;
            }
        }
        self.wan_queued += 1;
        let burst = self.bursts.len() as u32;
        self.bursts.push((next, 1));
        self.queue.push_ns(at, Ev::Wan { burst });
        self.wan_tail = (self.queue.last_seq(), at);
    }

    fn node_of(&self, ip: &Ipv4Addr) -> Option<usize> {
        if ip == self.server_addr.ip() {
            Some(0)
        } else {
            (0..self.sites.len())
                .find(|&i| self.sites[i].nat_at == i && self.sites[i].nat.public_ip() == *ip)
                .map(|i| i + 1)
        }
    }

    /// The NAT translates an outbound datagram and puts it on the WAN.
    #[inline(never)]
    fn egress(&mut self, i: usize, port: u16, to: SocketAddrV4, payload: [u8; 8]) {
        self.egress_inline(i, port, to, payload);
    }

    /// [`Sim::egress`], for the loop that sends a client's datagrams.
    #[inline(always)]
    fn egress_inline(&mut self, i: usize, port: u16, to: SocketAddrV4, payload: [u8; 8]) {
        let internal = SocketAddrV4::new(self.sites[i].host_ip, port);
        let n = self.sites[i].nat_at;
        let ext = match self.sites[n]
            .nat
            .outbound_existing(self.now_ns, internal, to)
        {
            Some(ext) => ext,
            None => match self.new_mapping(i, internal, to) {
                Some(ext) => ext,
                None => return,
            },
        };
        let from = SocketAddrV4::new(self.sites[n].nat.public_ip(), ext);
        let Some(dst) = self.node_of(to.ip()) else {
            trace!(
                self,
                TraceLevel::Packets,
                "net  {from} -> {to}: no such host"
            );
            return;
        };
        if dst == n + 1 {
            self.hairpin(n, from, to, payload);
            return;
        }
        match self.fixed[(n + 1) * self.nodes + dst] {
            // What `over_wan` does for a fixed path, without copying the link.
            Some(latency) => self.schedule_wan(
                self.now_ns.saturating_add(latency),
                WanDatagram::new(from, to, payload),
            ),
            None => self.egress_sampled(i, dst, from, to, payload),
        }
    }

    /// A datagram from behind NAT `n` to that NAT's own public IP: turned back inwards at
    /// once if the NAT hairpins, else dropped.
    #[inline(never)]
    fn hairpin(&mut self, n: usize, from: SocketAddrV4, to: SocketAddrV4, payload: [u8; 8]) {
        if self.sites[n].nat.hairpin() {
            self.schedule_wan(self.now_ns, WanDatagram::new(from, to, payload));
        } else {
            trace!(
                self,
                TraceLevel::Packets,
                "nat{} drop {from} -> {to}: no hairpinning",
                self.sites[n].name
            );
        }
    }

    /// The NAT makes a new mapping for an outbound datagram: its external port, or `None`
    /// (and the datagram is dropped) if no port is free.
    #[inline(never)]
    fn new_mapping(&mut self, i: usize, internal: SocketAddrV4, to: SocketAddrV4) -> Option<u16> {
        let at = self.sites[i].nat_at;
        let Some((ext, n)) = self.sites[at]
            .nat
            .outbound_new(self.now, internal, to, &mut self.rng)
        else {
            trace!(
                self,
                TraceLevel::Events,
                "nat{} out of ports: {internal} -> {to} dropped",
                self.sites[at].name
            );
            return None;
        };
        let from = SocketAddrV4::new(self.sites[at].nat.public_ip(), ext);
        self.sites[i].mappings += 1;
        if let Some(r) = self.records.as_mut() {
            r.push(MappingRecord {
                at: self.now,
                site: i,
                internal,
                external: from,
                remote: to,
                background: n.background,
            });
        }
        trace!(
            self,
            TraceLevel::Events,
            "nat{} {internal} -> ({from}) -> {to}  bg +{}",
            self.sites[at].name,
            n.background
        );
        Some(ext)
    }

    /// An outbound datagram on a path with randomness (jitter, loss, …) from site `i`.
    #[inline(never)]
    fn egress_sampled(
        &mut self,
        i: usize,
        dst: usize,
        from: SocketAddrV4,
        to: SocketAddrV4,
        payload: [u8; 8],
    ) {
        let path = self.paths[(self.sites[i].nat_at + 1) * self.nodes + dst];
        if !self.over_wan(&path, WanDatagram::new(from, to, payload)) {
            self.sites[i].drops.lost += 1;
            trace!(self, TraceLevel::Packets, "net  {from} -> {to}: lost");
        }
    }

    /// The server's probe port: its port + 1, as n4-core's clients and drivers have it.
    fn probe_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            *self.server_addr.ip(),
            self.server_addr.port().wrapping_add(1),
        )
    }

    /// A datagram from the server's socket `local` onto the WAN.
    fn server_send(&mut self, local: Local, to: SocketAddrV4, payload: [u8; 8]) {
        let from = match local {
            Local::Main => self.server_addr,
            Local::Probe => self.probe_addr(),
        };
        let Some(dst) = self.node_of(to.ip()) else {
            return;
        };
        let d = WanDatagram::new(from, to, payload);
        if let Some(latency) = self.fixed[dst] {
            self.schedule_wan(self.now_ns.saturating_add(latency), d);
            return;
        }
        let path = self.paths[dst];
        if !self.over_wan(&path, d) {
            trace!(self, TraceLevel::Packets, "net  {from} -> {to}: lost");
        }
    }

    /// A datagram reaches a public address.
    #[inline]
    fn wan(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: [u8; 8]) {
        if to.ip() == self.server_addr.ip() {
            self.wan_to_server(from, to, payload);
            return;
        }
        let Some(n) = self.node_of(to.ip()).map(|node| node - 1) else {
            return;
        };
        match self.sites[n].nat.inbound(self.now_ns, from, to.port()) {
            Ok(internal) => {
                let port = internal.port();
                // The host behind NAT `n` with that IP (two hosts may share the NAT).
                let i = if self.sites[n].host_ip == *internal.ip() {
                    n
                } else {
                    match (0..self.sites.len()).find(|&k| {
                        self.sites[k].nat_at == n && self.sites[k].host_ip == *internal.ip()
                    }) {
                        Some(k) => k,
                        None => return,
                    }
                };
                if self.sites[i].lan_instant {
                    self.ingress(i, port, from, payload);
                } else {
                    let lan = self.sites[i].lan;
                    self.over(&lan, |_| Ev::Ingress {
                        site: i as u8,
                        port,
                        from,
                        payload,
                    });
                }
            }
            Err(why) => {
                let d = &mut self.sites[n].drops;
                match why {
                    Drop::NoMapping => d.no_mapping += 1,
                    Drop::Filtered => d.filtered += 1,
                }
                trace!(
                    self,
                    TraceLevel::Packets,
                    "nat{} drop {from} -> {to}: {why:?}",
                    self.sites[n].name
                );
            }
        }
    }

    /// A datagram reaches the server's IP.
    #[inline(never)]
    fn wan_to_server(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: [u8; 8]) {
        // The server listens on its port and the probe port (port + 1); the machine decides.
        let local = if to == self.server_addr {
            Local::Main
        } else if to == self.probe_addr() {
            Local::Probe
        } else {
            return;
        };
        self.server
            .handle_datagram(self.epoch + self.now, local, from.into(), &payload);
        self.dirty |= 1;
    }

    /// A datagram reaches a host port: the client gets it if the port is in its window.
    fn ingress(&mut self, i: usize, port: u16, from: SocketAddrV4, payload: [u8; 8]) {
        let t = self.epoch + self.now;
        let s = &mut self.sites[i];
        let (Some(slot), Some(client)) = (s.window.iter().position(|&p| p == port), &mut s.client)
        else {
            return;
        };
        client.handle_datagram(t, slot, from.into(), &payload);
        self.dirty |= 2 << i;
    }

    // ------------------------------------------------------------------------------- TCP

    fn connect(&mut self, i: usize) {
        let conn = self.conns.len() as u32;
        let n = self.sites[i].nat_at;
        let remote = SocketAddrV4::new(self.sites[n].nat.public_ip(), self.sites[n].nat.tcp_port());
        let path = self.tcp_paths[i];
        let syn = path.sample_reliable(&mut self.rng, self.tcp_syn_rto);
        let syn_ack = path.sample_reliable(&mut self.rng, self.tcp_syn_rto);
        let (up, down) = (self.now + syn, self.now + syn + syn_ack);
        self.conns.push(Conn {
            site: i,
            remote: remote.into(),
            up_last: up,
            down_last: down,
        });
        self.sites[i].conn = Some(conn);
        self.schedule(
            down,
            Ev::Tcp {
                conn,
                ev: TcpEv::Connected,
            },
        );
    }

    /// Client → server on a connection, in order after everything sent before.
    fn tcp_up(&mut self, conn: u32, ev: TcpEv) {
        let c = &self.conns[conn as usize];
        let d = self.tcp_paths[c.site].sample_reliable(&mut self.rng, self.tcp_rto);
        let at = (self.now + d).max(self.conns[conn as usize].up_last);
        self.conns[conn as usize].up_last = at;
        self.schedule(at, Ev::Tcp { conn, ev });
    }

    /// Server → client on a connection, in order after everything sent before.
    fn tcp_down(&mut self, conn: u32, ev: TcpEv) {
        let c = &self.conns[conn as usize];
        let d = self.tcp_paths[c.site].sample_reliable(&mut self.rng, self.tcp_rto);
        let at = (self.now + d).max(self.conns[conn as usize].down_last);
        self.conns[conn as usize].down_last = at;
        self.schedule(at, Ev::Tcp { conn, ev });
    }

    fn tcp(&mut self, conn: u32, ev: TcpEv) {
        let t = self.epoch + self.now;
        let i = self.conns[conn as usize].site;
        let current = self.sites[i].conn == Some(conn);
        self.dirty |= 1 | (2 << i);
        match ev {
            TcpEv::Open => {
                let remote = self.conns[conn as usize].remote;
                self.server
                    .handle_connection_opened(t, ConnId(conn.into()), remote);
            }
            TcpEv::Connected if current => {
                // The handshake's last ACK goes up first; HELLO follows it on the stream.
                self.tcp_up(conn, TcpEv::Open);
                if let Some(c) = self.sites[i].client.as_mut() {
                    c.handle_connection_opened(t);
                }
            }
            TcpEv::ToServer(bytes) => {
                self.server
                    .handle_stream_data(t, ConnId(conn.into()), &bytes)
            }
            TcpEv::CloseAtServer => self.server.handle_connection_closed(t, ConnId(conn.into())),
            TcpEv::ToClient(bytes) if current => {
                if let Some(c) = self.sites[i].client.as_mut() {
                    c.handle_stream_data(t, &bytes);
                }
            }
            TcpEv::CloseAtClient if current => {
                self.sites[i].conn = None;
                if let Some(c) = self.sites[i].client.as_mut() {
                    c.handle_connection_closed(t);
                }
            }
            // For a connection the client already left: the socket is gone.
            TcpEv::Connected | TcpEv::ToClient(_) | TcpEv::CloseAtClient => {}
        }
    }

    // ------------------------------------------------------------------------------- drain

    /// Moves the output of every machine that got input into the network. Outputs only ever
    /// schedule deliveries (or pass a NAT), never feed a machine directly, so one pass empties
    /// them; the loop is a guard.
    #[inline]
    fn drain(&mut self) {
        if self.dirty != 0 {
            self.drain_dirty();
        }
    }

    #[inline(never)]
    fn drain_dirty(&mut self) {
        while self.dirty != 0 {
            let dirty = std::mem::take(&mut self.dirty);
            if dirty & 1 != 0 {
                self.drain_server();
            }
            for i in 0..self.sites.len() {
                if dirty & (2 << i) != 0 {
                    self.drain_client(i);
                }
            }
        }
    }

    fn drain_server(&mut self) {
        while let Some(out) = self.server.poll_output() {
            match out {
                ServerOutput::Send { conn, message } => {
                    self.tcp_down(conn.0 as u32, TcpEv::ToClient(eight(&message.to_bytes())))
                }
                ServerOutput::Close { conn } => self.tcp_down(conn.0 as u32, TcpEv::CloseAtClient),
                ServerOutput::Datagram { from, to, message } => {
                    if let SocketAddr::V4(to) = to {
                        self.server_send(from, to, message.to_bytes());
                    }
                }
            }
        }
        while let Some(e) = self.server.poll_event() {
            self.server_event(e);
        }
    }

    fn drain_client(&mut self, i: usize) {
        loop {
            let Some(client) = self.sites[i].client.as_mut() else {
                return;
            };
            let Some(cmd) = client.poll_command() else {
                break;
            };
            self.command(i, cmd);
        }
        // Events before transmits: the order does not matter to the client (they are separate
        // queues), and the trace then reads cause before effect.
        while let Some(e) = self.sites[i].client.as_mut().and_then(|c| c.poll_event()) {
            self.client_event(i, e);
        }
        self.send_transmits(i);
    }

    /// Moves client `i`'s datagrams out: over the LAN, or straight through the NAT.
    #[inline(never)]
    fn send_transmits(&mut self, i: usize) {
        while let Some(t) = self.sites[i]
            .client
            .as_mut()
            .and_then(|c| c.poll_transmit())
        {
            let SocketAddr::V4(to) = t.destination else {
                continue;
            };
            let Some(&port) = self.sites[i].window.get(t.slot) else {
                continue;
            };
            self.sites[i].outcome.datagrams_sent += 1;
            if self.sites[i].lan_instant {
                self.egress_inline(i, port, to, eight(&t.payload));
            } else {
                self.host_send_lan(i, port, to, eight(&t.payload));
            }
        }
    }

    fn command(&mut self, i: usize, cmd: Command) {
        match cmd {
            Command::OpenWindow { ports } => {
                let s = &mut self.sites[i];
                s.window.clear();
                s.window.reserve(ports.len());
                for &p in &ports {
                    let p = if p == 0 { s.ephemeral_port(&ports) } else { p };
                    s.window.push(p);
                }
            }
            Command::OpenSlots { count } => {
                let s = &mut self.sites[i];
                for _ in 0..count {
                    let p = s.ephemeral_port(&[]);
                    s.window.push(p);
                }
            }
            Command::Connect => self.connect(i),
            Command::Send(m) => {
                if let Some(conn) = self.sites[i].conn {
                    self.tcp_up(conn, TcpEv::ToServer(eight(&m.to_bytes())));
                }
            }
            Command::Close => {
                if let Some(conn) = self.sites[i].conn.take() {
                    self.tcp_up(conn, TcpEv::CloseAtServer);
                }
            }
        }
    }

    // ------------------------------------------------------------------------------- trace

    fn client_event(&mut self, i: usize, e: Event) {
        let now = self.now;
        let s = &mut self.sites[i];
        match &e {
            Event::RoundStarted { round, .. } => s.outcome.rounds = *round,
            Event::Win {
                round, slot, peer, ..
            } if !s.outcome.won => {
                s.outcome.won = true;
                s.outcome.time_to_win = Some(now.saturating_sub(s.start));
                s.outcome.win_round = Some(*round);
                s.outcome.local_port = s.window.get(*slot).copied();
                s.outcome.peer = Some(*peer);
            }
            Event::Finished => s.done = true,
            Event::GaveUp { .. } | Event::ServerUnreachable => {
                s.done = true;
                s.outcome.gave_up = true;
            }
            _ => {}
        }
        if self.trace.is_none() {
            return;
        }
        let name = s.name;
        let local = |slot: usize| s.window.get(slot).copied().unwrap_or(0);
        let text = match e {
            Event::RoundStarted {
                round,
                first_port,
                count,
                in_session,
            } => format!(
                "round {round}: ports {first_port}-{}{}",
                u32::from(first_port) + u32::from(count) - 1,
                if in_session { " (in session)" } else { "" }
            ),
            Event::Planned {
                step,
                rate,
                rtt,
                window,
                hint,
            } => format!(
                "plan: step {step}, {rate} flows/s, rtt {}, window {window}, hint {hint:?}",
                rtt.map_or("?".into(), |r| format!(
                    "{:.1} ms",
                    r.as_secs_f64() * 1000.0
                ))
            ),
            Event::PeerHint(h) => format!("=> HINT {h:?}"),
            Event::HelloSent => "<= HELLO".into(),
            Event::Ready { extended } => {
                format!("=> READY{}", if extended { " (extended)" } else { "" })
            }
            Event::ExchangeSent => "<= EXCHANGE".into(),
            Event::Seen(a) => format!("=> SEEN {a}"),
            Event::PeerInfo { peer, target } => match target {
                Some(t) => format!("=> PEERINFO {peer}  [ Target: {t} ]"),
                None => format!("=> PEERINFO {peer}  [ no target ]"),
            },
            Event::PunchSent { target, datagrams } => format!("<= PUNCH x{datagrams} to {target}"),
            Event::Win {
                round,
                slot,
                peer,
                strategy,
            } => format!(
                "[ WIN ] round {round}, local port {} (slot {slot}), peer {peer} ({})",
                local(slot),
                strategy.name()
            ),
            Event::Lose { round, reason } => format!("[ LOSE ] round {round}: {reason:?}"),
            Event::PeerRefused { peer, why } => format!("=> PEERINFO {peer} refused: {why}"),
            Event::BudgetExhausted { budget, .. } => format!("punch budget {budget}/min spent"),
            Event::Rehello => "wait ended by the server; HELLO again".into(),
            Event::PeerAuthenticated => "partner authenticated".into(),
            Event::PeerData(_) => "partner's data (WireGuard key)".into(),
            Event::PeerAuthFailed => "partner failed authentication".into(),
            Event::Refused(r) => format!("refused by the server: {r:?}"),
            Event::NeedsOurServer => "keyed, but the server is v1".into(),
            Event::HardNat { plan, .. } => format!("hard NAT pair: {plan:?}"),
            Event::PeerBehindOurNat { public } => format!("peer behind our own NAT ({public})"),
            Event::ReAimed { round, attempt } => {
                format!("round {round}: re-aim, attempt {attempt}")
            }
            Event::Finished => "finished".into(),
            Event::GaveUp { rounds } => format!("gave up after {rounds} rounds"),
            Event::ServerUnreachable => "server unreachable".into(),
        };
        trace!(self, TraceLevel::Events, "{name}    {text}");
    }

    fn server_event(&mut self, e: ServerEvent) {
        if self.trace.is_none() {
            return;
        }
        let text = match e {
            ServerEvent::Waiting { remote, ident } => format!("{remote} waits ({ident})"),
            ServerEvent::Paired { first, second, .. } => format!("paired {first} + {second}"),
            ServerEvent::Completed { first, second, .. } => {
                format!("exchanged {first} <-> {second}")
            }
            other => format!("{other:?}"),
        };
        trace!(self, TraceLevel::Events, "srv  {text}");
    }

    fn summary(&mut self) {
        if self.trace.is_none() {
            return;
        }
        for i in 0..self.sites.len() {
            let s = &self.sites[i];
            let o = &s.outcome;
            let result = match (o.win_round, o.time_to_win) {
                (Some(r), Some(t)) => format!(
                    "WIN in round {r} after {}.{:06} s",
                    t.as_secs(),
                    t.subsec_micros()
                ),
                _ => format!("no WIN in {} rounds", o.rounds),
            };
            let (name, sent, d) = (s.name, o.datagrams_sent, s.drops);
            let (maps, bg) = (s.mappings, s.nat.background_total());
            trace!(
                self,
                TraceLevel::Events,
                "{name}    {result}; {sent} datagrams sent"
            );
            if s.nat_at != i {
                // Its NAT is another site's: that site's line counts the drops.
                let owner = self.sites[s.nat_at].name;
                trace!(
                    self,
                    TraceLevel::Events,
                    "{name}    behind nat{owner}: {maps} mappings; {} lost on the way out",
                    d.lost
                );
                continue;
            }
            trace!(self, TraceLevel::Events,
                "nat{name} {maps} mappings, {bg} background flows; dropped inbound: {} no mapping, {} filtered; {} lost on the way out",
                d.no_mapping, d.filtered, d.lost);
        }
        let events = self.events;
        trace!(self, TraceLevel::Events, "end  {events} events");
    }
}

/// Runs a scenario without a trace.
pub fn run(scenario: &Scenario) -> Result<Outcome, ScenarioError> {
    // One `Sim` per thread, reset in place for every run: no multi-kilobyte moves, and its
    // queues, buffers and NAT tables keep their allocations from run to run.
    thread_local! {
        static SPARE: Cell<Option<Box<Sim>>> = const { Cell::new(None) };
    }
    let mut sim = SPARE.take().unwrap_or_else(|| Box::new(Sim::empty()));
    sim.reset(scenario, SimOptions::default())?;
    let outcome = sim.run();
    SPARE.set(Some(sim));
    Ok(outcome)
}

/// Runs a scenario with a trace at `level`; returns the outcome and the trace.
pub fn run_traced(
    scenario: &Scenario,
    level: TraceLevel,
) -> Result<(Outcome, String), ScenarioError> {
    let mut sim = Sim::new(
        scenario,
        SimOptions {
            trace: Some(level),
            record_mappings: true,
        },
    )?;
    let outcome = sim.run();
    Ok((outcome, sim.trace().to_owned()))
}

/// The 8 bytes of a keyless message: the simulator runs keyless sessions only, so every frame
/// its machines produce is one of v1's 8-byte shapes (a longer one is a bug here).
fn eight(bytes: &[u8]) -> [u8; 8] {
    bytes
        .try_into()
        .expect("the simulator runs keyless sessions: 8-byte messages")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::NatKind;

    /// Scenarios that exercise every part a run resets: strategies, NAT kinds, background,
    /// loss and jitter, a late start, a slow LAN, ephemeral ports, and a bad one in between.
    fn mix() -> Vec<Scenario> {
        let ms = Duration::from_millis;
        let mut late = Scenario::new(5).with_strategy(n4_core::Strategy::V1);
        late.sites[1].start = ms(300);
        late.sites[0].lan = Link::delay(ms(3));
        let mut bad = Scenario::new(6);
        bad.sites[1].public_ip = bad.sites[0].public_ip;
        vec![
            Scenario::new(1).with_strategy(n4_core::Strategy::V1),
            Scenario::new(2).with_background(400.0),
            bad,
            Scenario::new(3)
                .with_nat(NatKind::Random.config())
                .with_loss(0.1)
                .map_clients(|c| c.max_rounds = Some(2)),
            late,
            Scenario::new(4)
                .with_jitter(ms(20))
                .with_nat(NatKind::Preserving.config())
                .map_clients(|c| c.port_start = 0),
            Scenario::new(7)
                .with_nat(NatKind::Cone.config())
                .with_background(100.0),
        ]
    }

    #[test]
    fn runs_on_the_reused_sim_match_fresh_ones_in_any_order() {
        let fresh = |s: &Scenario| match Sim::new(s, SimOptions::default()) {
            Ok(mut sim) => Ok(sim.run()),
            Err(e) => Err(e),
        };
        let scenarios = mix();
        let want: Vec<_> = scenarios.iter().map(fresh).collect();
        assert!(want[2].is_err() && want.iter().filter(|o| o.is_ok()).count() == 6);
        for round in 0..3 {
            for k in 0..scenarios.len() {
                // Forwards, backwards, and each one twice in a row.
                let i = match round {
                    0 => k,
                    1 => scenarios.len() - 1 - k,
                    _ => k / 2,
                };
                assert_eq!(run(&scenarios[i]), want[i], "scenario {i}, round {round}");
            }
        }
    }
}
