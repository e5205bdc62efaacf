//! The rendezvous server: pairs clients that say HELLO with equal identifiers and tells each the
//! other's public UDP address.
//!
//! Sans-IO: the driver owns the TCP listener and the UDP socket, numbers connections with
//! [`ConnId`]s and feeds what happens into `handle_*`; then it drains [`Server::poll_output`]
//! (writes and closes), [`Server::poll_event`] (for logs) and sleeps until
//! [`Server::poll_timeout`]. `now` must never go backwards. The server never reads a clock and
//! never opens a socket.
//!
//! Where v1 is fragile this one is not: many rooms at once, deadlines for silent connections,
//! garbage closes only its sender, garbage datagrams are ignored, a partner that leaves closes
//! the pair instead of hanging it, and per-seat tokens (our extension) attribute EXCHANGEs
//! exactly even when both clients share one public IP.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::codec::{
    Frame, FrameDecoder, Hint, Ident, LongMessage, Mac, Message, Nonce, RefuseReason, Token,
};
use crate::key::Key;

/// A TCP connection, numbered by the driver. Ids must not be reused while the server knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Server settings. `Default` gives the values in each field's doc.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Only this identifier may take a seat (the original's `-a`). Default: any identifier.
    pub only_ident: Option<Ident>,
    /// A connection must complete its HELLO within this. Default 10 s (v1: 60 s, blocking).
    pub hello_timeout: Duration,
    /// A seated client waits this long for a partner; `None` waits forever. Default 60 s: a
    /// seat nobody comes for is freed (our clients then say HELLO again), so squatters cannot
    /// hold seats for ever.
    pub wait_timeout: Option<Duration>,
    /// After READY, both EXCHANGEs must arrive within this or the pair is closed. Default 10 s.
    pub exchange_timeout: Duration,
    /// Open connections in all. Default 100 000.
    pub max_connections: usize,
    /// Open connections from one IP address. Default 256.
    pub max_per_ip: usize,
    /// Clients from one IP address waiting for a partner at once. Default 16. A HELLO that
    /// finds its partner waiting always pairs; one that would wait beyond this is refused.
    pub max_waiting_per_ip: usize,
    /// Probe answers per second to one IP address (a burst of as many is allowed). Default
    /// 50. A probe costs its sender as much as its answer, but unlimited answers would make
    /// the server a reflector at whatever address a spoofer names.
    pub probes_per_ip: u32,
    /// Offer our extension (a token in READY). Default `true`; `false` speaks pure v1.
    pub extensions: bool,
    /// How long a pair of extended clients may keep re-rounding after its first PEERINFO.
    /// Default 30 s.
    pub session_timeout: Duration,
    /// Seed for the tokens. Default 0; real servers should pass an unpredictable seed.
    pub rng_seed: u64,
    /// A private server's key (`n4 -s --key-file`): it serves only keyed clients whose HELLO
    /// proves this key, and refuses the rest. Default `None`: a public server.
    pub key: Option<Key>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            only_ident: None,
            hello_timeout: Duration::from_secs(10),
            wait_timeout: Some(Duration::from_secs(60)),
            exchange_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_per_ip: 256,
            max_waiting_per_ip: 16,
            probes_per_ip: 50,
            extensions: true,
            session_timeout: Duration::from_secs(30),
            rng_seed: 0,
            key: None,
        }
    }
}

/// What the driver must do on a connection.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerOutput {
    /// Write this frame on the connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame to write.
        message: Frame,
    },
    /// Flush what was written, then close the connection. The server has already forgotten it.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Send this datagram from the local socket `from`: the answer to a [`Message::Probe`]
    /// (from the socket the probe arrived on) or a [`Message::ProbeOther`] (from the other).
    Datagram {
        /// The server's socket it leaves from.
        from: Local,
        /// Destination.
        to: SocketAddr,
        /// The message.
        message: Message,
    },
}

/// The server's two UDP sockets: every datagram in names the one it arrived on, every
/// datagram out the one it leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Local {
    /// The listen port: EXCHANGEs, and probes.
    Main,
    /// The probe port (the listen port + 1): probes only, so that a v1 server (which has no
    /// such port) never sees one.
    Probe,
}

impl Local {
    /// The other socket.
    pub fn other(self) -> Self {
        match self {
            Self::Main => Self::Probe,
            Self::Probe => Self::Main,
        }
    }
}

/// What happened, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A connection was refused or dropped before it took a seat.
    Rejected {
        /// Its remote address.
        remote: SocketAddr,
        /// Why.
        reason: RejectReason,
    },
    /// A client took a seat and waits for a partner.
    Waiting {
        /// Its remote address.
        remote: SocketAddr,
        /// The identifier it asked for.
        ident: Ident,
    },
    /// Two clients were paired and told READY.
    Paired {
        /// The identifier.
        ident: Ident,
        /// First-seated client's TCP address.
        first: SocketAddr,
        /// Second client's TCP address.
        second: SocketAddr,
    },
    /// Both EXCHANGEs of a round arrived; each client got the other's address.
    Completed {
        /// Round of the session (1 unless both clients are ours and re-round).
        round: u8,
        /// The identifier.
        ident: Ident,
        /// Public UDP address of the first-seated client.
        first: SocketAddrV4,
        /// Public UDP address of the second client.
        second: SocketAddrV4,
    },
    /// A seated or paired client was lost; its partner (if any) was closed too.
    Abandoned {
        /// The identifier.
        ident: Ident,
        /// Why.
        reason: AbandonReason,
    },
}

/// Why a connection never took a seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The server holds `max_connections` already.
    TooManyConnections,
    /// This IP holds `max_per_ip` already.
    TooManyFromIp,
    /// This IP has `max_waiting_per_ip` clients waiting already.
    TooManyWaitingFromIp,
    /// No complete HELLO within `hello_timeout`.
    HelloTimeout,
    /// The first message was not a HELLO (or not a message at all).
    Garbage,
    /// HELLO with an identifier other than the only one allowed.
    WrongIdent,
    /// A private server: the keyed HELLO does not prove the server's key.
    WrongKey,
    /// A private server: a plain (keyless) HELLO.
    KeyRequired,
    /// It closed before saying HELLO.
    Closed,
}

/// Why a seated client or a pair was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbandonReason {
    /// A client closed its connection.
    Closed,
    /// A client sent bytes after HELLO.
    Garbage,
    /// Nobody came within `wait_timeout`.
    WaitTimeout,
    /// The EXCHANGEs did not both arrive within `exchange_timeout`.
    ExchangeTimeout,
    /// Keyed: a client said its partner did not prove the key.
    AuthFailed,
}

/// The server's counters, for tests, logs and the load generator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections currently known.
    pub connections: usize,
    /// Clients waiting for a partner.
    pub waiting: usize,
    /// Pairs between READY and their second EXCHANGE.
    pub pairing: usize,
    /// Pairs completed since start (first rounds).
    pub completed: u64,
    /// Probes answered since start.
    pub probes: u64,
    /// Probes not answered because their IP passed `probes_per_ip`.
    pub probes_limited: u64,
    /// Datagrams ignored since start (garbage, unknown seat, duplicate).
    pub ignored_datagrams: u64,
}

type PairId = u64;

#[derive(Debug)]
struct Conn {
    remote: SocketAddr,
    decoder: FrameDecoder,
    deadline: Option<Instant>,
    seat: Seat,
    /// Keyed: the nonce of its HELLO, for its partner.
    nonce: Option<Nonce>,
}

/// Where clients meet: a plain identifier (v1) or a keyed room tag. The two never mix, so a
/// client without the key can never be seated with a keyed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Room {
    keyed: bool,
    ident: Ident,
}

#[derive(Debug, Clone, Copy)]
enum Seat {
    /// Connected, no HELLO yet.
    Greeting,
    /// Said HELLO; no partner yet.
    Waiting(Room),
    /// In a pair.
    Paired(PairId),
}

#[derive(Debug)]
struct Pair {
    ident: Ident,
    /// A keyed room: PEERINFO waits until both sides said VERIFIED.
    keyed: bool,
    sides: [Side; 2],
    deadline: Instant,
    /// Highest round both sides have been told about (0: none yet).
    completed: u8,
}

impl Pair {
    /// The IPs under which [`Server::attribute_v1`] must find this pair: each seat's TCP peer
    /// IP (an EXCHANGE from there may be its seat's) and the source IP of each seat's latest
    /// EXCHANGE (a repeat from that address must be ignored, not given to a later pair).
    fn v1_ips(&self) -> [Option<IpAddr>; 4] {
        let [a, b] = &self.sides;
        let exchanged = |s: &Side| s.exchanged.map(|e| IpAddr::V4(*e.ip()));
        [Some(a.ip), Some(b.ip), exchanged(a), exchanged(b)]
    }
}

#[derive(Debug)]
struct Side {
    conn: ConnId,
    ip: IpAddr,
    token: Token,
    /// Spoke our extension (sent a token EXCHANGE).
    ext: bool,
    /// Round of its latest EXCHANGE (0: none yet; v1 clients only ever have round 1).
    round: u8,
    /// The public address its latest EXCHANGE came from, once known.
    exchanged: Option<SocketAddrV4>,
    hint: Hint,
    /// Keyed: its AUTH was relayed to the partner (once).
    auth_relayed: bool,
    /// Keyed: its PEER-DATA was relayed to the partner (once).
    data_relayed: bool,
    /// Keyed: it said its partner proved the key.
    verified: bool,
}

/// The rendezvous server state machine. See the module docs for the calling contract.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    rng: ChaCha8Rng,
    conns: BTreeMap<ConnId, Conn>,
    per_ip: BTreeMap<IpAddr, usize>,
    /// Waiting seats per IP, for `max_waiting_per_ip`.
    waiting_per_ip: BTreeMap<IpAddr, usize>,
    /// Probe answers per IP in the current second: (second began, answers).
    probe_counts: BTreeMap<IpAddr, (Instant, u32)>,
    /// Size of `probe_counts` at which stale entries are swept.
    probe_sweep_at: usize,
    /// At most one waiting client per room: a second one is paired at once.
    waiting: BTreeMap<Room, ConnId>,
    pairs: BTreeMap<PairId, Pair>,
    /// Pairs by identifier and IP address, in pairing order, for attributing v1 EXCHANGEs: a
    /// pair is listed under every IP its v1 rule can match (see [`Pair::v1_ips`]), so that an
    /// EXCHANGE visits only the pairs that could take it, not every pair with its identifier.
    v1_index: BTreeSet<(Ident, IpAddr, PairId)>,
    tokens: BTreeMap<Token, (PairId, usize)>,
    /// Connection deadlines (hello, wait) and pair deadlines, earliest first.
    conn_deadlines: BTreeSet<(Instant, ConnId)>,
    pair_deadlines: BTreeSet<(Instant, PairId)>,
    next_pair: PairId,
    outputs: VecDeque<ServerOutput>,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
}

impl Server {
    /// A server with no connections.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.rng_seed),
            config,
            conns: BTreeMap::new(),
            per_ip: BTreeMap::new(),
            waiting_per_ip: BTreeMap::new(),
            probe_counts: BTreeMap::new(),
            probe_sweep_at: 1024,
            waiting: BTreeMap::new(),
            pairs: BTreeMap::new(),
            v1_index: BTreeSet::new(),
            tokens: BTreeMap::new(),
            conn_deadlines: BTreeSet::new(),
            pair_deadlines: BTreeSet::new(),
            next_pair: 0,
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            stats: ServerStats::default(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.conns.len(),
            waiting: self.waiting.len(),
            pairing: self.pairs.len(),
            ..self.stats
        }
    }

    /// A TCP connection was accepted. It may be closed at once if a limit is reached.
    pub fn handle_connection_opened(&mut self, now: Instant, conn: ConnId, remote: SocketAddr) {
        let ip = canonical_ip(remote.ip());
        let reason = if self.conns.len() >= self.config.max_connections {
            Some(RejectReason::TooManyConnections)
        } else if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_per_ip {
            Some(RejectReason::TooManyFromIp)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.outputs.push_back(ServerOutput::Close { conn });
            self.events
                .push_back(ServerEvent::Rejected { remote, reason });
            return;
        }
        if self.conns.contains_key(&conn) {
            // A driver bug, not network input: keep the first connection's state intact.
            return;
        }
        *self.per_ip.entry(ip).or_insert(0) += 1;
        let deadline = crate::later(now, self.config.hello_timeout);
        self.conn_deadlines.insert((deadline, conn));
        self.conns.insert(
            conn,
            Conn {
                remote,
                decoder: FrameDecoder::default(),
                deadline: Some(deadline),
                seat: Seat::Greeting,
                nonce: None,
            },
        );
    }

    /// Bytes arrived on a connection.
    pub fn handle_stream_data(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) {
        let mut input = bytes;
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return; // closed by what came before
            };
            let Some(frame) = c.decoder.next(&mut input) else {
                return; // an incomplete frame; wait for the rest
            };
            match (c.seat, frame) {
                (Seat::Greeting, Ok(hello @ Frame::Short(Message::Hello(_))))
                | (Seat::Greeting, Ok(hello @ Frame::Long(LongMessage::KeyedHello { .. }))) => {
                    // A client says nothing more until READY: another whole frame (or bad
                    // bytes) in the same read is garbage, and closes it before it is seated.
                    let mut rest = c.decoder.clone();
                    let mut tail = input;
                    if rest.next(&mut tail).is_some() {
                        self.reject(conn, RejectReason::Garbage);
                        return;
                    }
                    c.decoder = rest;
                    input = tail;
                    match hello {
                        Frame::Short(Message::Hello(ident)) => {
                            self.on_hello(now, conn, ident, None)
                        }
                        Frame::Long(LongMessage::KeyedHello { room, nonce, proof }) => {
                            self.on_hello(now, conn, room, Some((nonce, proof)))
                        }
                        _ => unreachable!("matched above"),
                    }
                }
                (Seat::Greeting, _) => {
                    self.reject(conn, RejectReason::Garbage);
                    return;
                }
                (Seat::Paired(pair), Ok(Frame::Long(m)))
                    if self.pairs.get(&pair).is_some_and(|p| p.keyed)
                        && matches!(
                            m,
                            LongMessage::Auth(_)
                                | LongMessage::PeerData { .. }
                                | LongMessage::Verified
                                | LongMessage::AuthFailed
                        ) =>
                {
                    self.on_auth(now, pair, conn, m)
                }
                (Seat::Waiting(_) | Seat::Paired(_), _) => {
                    self.abandon(conn, AbandonReason::Garbage);
                    return;
                }
            }
        }
    }

    /// The peer closed the connection (or it failed). The driver closes its side.
    pub fn handle_connection_closed(&mut self, _now: Instant, conn: ConnId) {
        match self.conns.get(&conn).map(|c| (c.seat, c.remote)) {
            None => {}
            Some((Seat::Greeting, remote)) => {
                self.forget(conn);
                self.events.push_back(ServerEvent::Rejected {
                    remote,
                    reason: RejectReason::Closed,
                });
            }
            Some(_) => self.abandon(conn, AbandonReason::Closed),
        }
    }

    /// A UDP datagram arrived on the local socket `local` from `from`. Anything but an
    /// EXCHANGE on [`Local::Main`] that belongs to a seat in a pair, or a probe, is ignored and
    /// costs nothing else.
    ///
    /// A [`Message::Probe`] is answered from the socket it came in on, a
    /// [`Message::ProbeOther`] from the other ([`ServerOutput::Datagram`]); the probe port
    /// takes nothing but probes.
    pub fn handle_datagram(&mut self, now: Instant, local: Local, from: SocketAddr, bytes: &[u8]) {
        let Some(from) = v4(from) else {
            self.stats.ignored_datagrams += 1;
            return;
        };
        let msg = Message::decode(bytes);
        let probe = matches!(msg, Ok(Message::Probe | Message::ProbeOther));
        if local == Local::Probe && !probe {
            self.stats.ignored_datagrams += 1;
            return;
        }
        let seat = match msg {
            Ok(Message::ExchangeToken { token, round, hint }) => {
                self.tokens.get(&token).map(|&s| (s, Some((round, hint))))
            }
            Ok(Message::Exchange(ident)) => self.attribute_v1(ident, from).map(|s| (s, None)),
            Ok(m @ (Message::Probe | Message::ProbeOther)) => {
                // A reflector, like STUN: 8 bytes out for 8 bytes in, at a bounded rate per IP.
                if !self.probe_allowed(now, IpAddr::V4(*from.ip())) {
                    self.stats.probes_limited += 1;
                    return;
                }
                self.stats.probes += 1;
                self.outputs.push_back(ServerOutput::Datagram {
                    from: if m == Message::Probe {
                        local
                    } else {
                        local.other()
                    },
                    to: from.into(),
                    message: Message::Seen(from),
                });
                return;
            }
            _ => None,
        };
        match seat {
            Some(((pair, side), ext)) => self.on_exchange(now, pair, side, from, ext),
            None => self.stats.ignored_datagrams += 1,
        }
    }

    /// Time passed; expires deadlines up to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, conn)) = self.conn_deadlines.first() {
            if at > now {
                break;
            }
            self.conn_deadlines.pop_first();
            match self.conns.get(&conn).map(|c| c.seat) {
                Some(Seat::Greeting) => self.reject(conn, RejectReason::HelloTimeout),
                Some(Seat::Waiting(_)) => self.abandon(conn, AbandonReason::WaitTimeout),
                _ => {}
            }
        }
        while let Some(&(at, pair)) = self.pair_deadlines.first() {
            if at > now {
                break;
            }
            self.pair_deadlines.pop_first();
            if let Some(conn) = self.pairs.get(&pair).map(|p| p.sides[0].conn) {
                self.abandon(conn, AbandonReason::ExchangeTimeout);
            }
        }
    }

    /// The next write or close for the driver.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    /// The next event to log.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`Server::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conn = self.conn_deadlines.first().map(|d| d.0);
        let pair = self.pair_deadlines.first().map(|d| d.0);
        conn.into_iter().chain(pair).min()
    }

    /// A HELLO: plain (`keyed` is `None`) or keyed (the room tag, with nonce and proof).
    fn on_hello(&mut self, now: Instant, conn: ConnId, ident: Ident, keyed: Option<(Nonce, Mac)>) {
        match (self.config.key, keyed) {
            (Some(_), None) => return self.refuse(conn, RefuseReason::KeyRequired),
            (Some(key), Some((nonce, proof))) if !key.verify_hello(ident, &nonce, &proof) => {
                return self.refuse(conn, RefuseReason::WrongKey)
            }
            // The keyed handshake needs our extension (a token in READY).
            (None, Some(_)) if !self.config.extensions => {
                return self.reject(conn, RejectReason::Garbage)
            }
            _ => {}
        }
        // `-a` names a plain identifier; keyed rooms are tags nobody can name in advance.
        if keyed.is_none() && self.config.only_ident.is_some_and(|only| only != ident) {
            self.reject(conn, RejectReason::WrongIdent);
            return;
        }
        let room = Room {
            keyed: keyed.is_some(),
            ident,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.nonce = keyed.map(|(nonce, _)| nonce);
        }
        let ip = canonical_ip(self.conns[&conn].remote.ip());
        if !self.waiting.contains_key(&room)
            && self.waiting_per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_waiting_per_ip
        {
            self.reject(conn, RejectReason::TooManyWaitingFromIp);
            return;
        }
        self.clear_conn_deadline(conn);
        let Some(first) = self.waiting.remove(&room) else {
            self.waiting.insert(room, conn);
            *self.waiting_per_ip.entry(ip).or_insert(0) += 1;
            let c = self
                .conns
                .get_mut(&conn)
                .expect("conn exists: checked by caller");
            c.seat = Seat::Waiting(room);
            let remote = c.remote;
            if let Some(wait) = self.config.wait_timeout {
                let deadline = crate::later(now, wait);
                c.deadline = Some(deadline);
                self.conn_deadlines.insert((deadline, conn));
            }
            self.events
                .push_back(ServerEvent::Waiting { remote, ident });
            return;
        };
        self.clear_conn_deadline(first);
        self.unwait(canonical_ip(self.conns[&first].remote.ip()));
        let pair = self.next_pair;
        self.next_pair += 1;
        let sides = [first, conn].map(|conn| Side {
            conn,
            ip: canonical_ip(self.conns[&conn].remote.ip()),
            token: Token(0),
            ext: false,
            round: 0,
            exchanged: None,
            hint: Hint::NONE,
            auth_relayed: false,
            data_relayed: false,
            verified: false,
        });
        let deadline = crate::later(now, self.config.exchange_timeout);
        let mut p = Pair {
            ident,
            keyed: room.keyed,
            sides,
            deadline,
            completed: 0,
        };
        for (i, side) in p.sides.iter_mut().enumerate() {
            side.token = self.fresh_token();
            self.tokens.insert(side.token, (pair, i));
            self.conns
                .get_mut(&side.conn)
                .expect("seated conn exists")
                .seat = Seat::Paired(pair);
            let token = self.config.extensions.then_some(side.token);
            self.outputs.push_back(ServerOutput::Send {
                conn: side.conn,
                message: Message::Ready(token).into(),
            });
        }
        if room.keyed {
            // Each side gets the other's nonce: the handshake they run through us.
            for (me, other) in [(first, conn), (conn, first)] {
                if let Some(nonce) = self.conns.get(&other).and_then(|c| c.nonce) {
                    self.outputs.push_back(ServerOutput::Send {
                        conn: me,
                        message: LongMessage::PeerNonce(nonce).into(),
                    });
                }
            }
        }
        self.events.push_back(ServerEvent::Paired {
            ident,
            first: self.conns[&first].remote,
            second: self.conns[&conn].remote,
        });
        self.pair_deadlines.insert((deadline, pair));
        // A keyed pair takes token EXCHANGEs only: a plain one (from a shared NAT, or spoofed)
        // must never claim its seats.
        if !room.keyed {
            for ip in p.v1_ips().into_iter().flatten() {
                self.v1_index.insert((ident, ip, pair));
            }
        }
        self.pairs.insert(pair, p);
    }

    /// v1 rule: the EXCHANGE belongs to the earliest pair with this identifier that has a seat
    /// whose TCP peer IP equals the datagram's source IP and no EXCHANGE yet, first-seated side
    /// first. A repeat from an address already attributed in that pair is ignored (v1 clients
    /// send three), so two v1 clients behind one IP are told apart by arrival order.
    ///
    /// Only pairs listed under the datagram's IP can match either test, so only they are
    /// visited: a flood of EXCHANGEs for a busy identifier from elsewhere costs one lookup each.
    fn attribute_v1(&self, ident: Ident, from: SocketAddrV4) -> Option<(PairId, usize)> {
        let ip = IpAddr::V4(*from.ip());
        for &(_, _, pair) in self
            .v1_index
            .range((ident, ip, 0)..=(ident, ip, PairId::MAX))
        {
            let sides = &self.pairs[&pair].sides;
            if sides.iter().any(|s| s.exchanged == Some(from)) {
                return None;
            }
            if let Some(i) = sides
                .iter()
                .position(|s| s.ip == ip && s.exchanged.is_none())
            {
                return Some((pair, i));
            }
        }
        None
    }

    /// Records a seat's EXCHANGE (`ext`: round and hint of a token EXCHANGE). When both seats
    /// have a new one, each is told the other's address (a round completes). Pairs where both
    /// are ours stay open for more rounds; any other pair is closed, as in v1.
    fn on_exchange(
        &mut self,
        now: Instant,
        pair_id: PairId,
        side: usize,
        from: SocketAddrV4,
        ext: Option<(u8, Hint)>,
    ) {
        let pair = self
            .pairs
            .get_mut(&pair_id)
            .expect("token/ident index is in sync");
        let s = &mut pair.sides[side];
        let (round, hint) = ext.unwrap_or((1, Hint::NONE));
        // A newer round replaces the seat's EXCHANGE; so does a refresh of the current round
        // from a new address (a client of ours whose partner is late sends a fresher one)
        // until the round completes. Repeats and stale rounds are ignored.
        let refresh = round == s.round && round > pair.completed && s.exchanged != Some(from);
        if round < s.round || (round == s.round && !refresh) {
            self.stats.ignored_datagrams += 1;
            return;
        }
        let listed = pair.v1_ips();
        // Two clients behind one IP with one identifier are told apart by arrival order, so a
        // v1 EXCHANGE may have been given to the seat of a client of ours. Only ours sends a
        // token EXCHANGE, and never a plain one after a token READY: when its token EXCHANGE
        // comes, that earlier plain one was the other seat's.
        if ext.is_some() && !pair.sides[side].ext {
            let [a, b] = &mut pair.sides;
            let (mine, other) = if side == 0 { (a, b) } else { (b, a) };
            if let Some(plain) = mine.exchanged {
                if other.ip == mine.ip && other.exchanged.is_none() && !other.ext {
                    other.exchanged = Some(plain);
                    other.round = 1;
                    other.hint = Hint::NONE;
                }
            }
        }
        let s = &mut pair.sides[side];
        s.ext |= ext.is_some();
        s.round = round;
        s.exchanged = Some(from);
        s.hint = hint;
        let now_listed = if pair.keyed { listed } else { pair.v1_ips() };
        for ip in listed
            .iter()
            .flatten()
            .filter(|ip| !now_listed.contains(&Some(**ip)))
        {
            self.v1_index.remove(&(pair.ident, *ip, pair_id));
        }
        for ip in now_listed
            .iter()
            .flatten()
            .filter(|ip| !listed.contains(&Some(**ip)))
        {
            self.v1_index.insert((pair.ident, *ip, pair_id));
        }
        let s = &mut pair.sides[side];
        if s.ext {
            // Only a client of ours echoes a token, so a v1 client never receives SEEN.
            let conn = s.conn;
            self.outputs.push_back(ServerOutput::Send {
                conn,
                message: Message::Seen(from).into(),
            });
        }
        self.complete_round(now, pair_id);
    }

    /// Keyed handshake messages of a seated pair: AUTH and then PEER-DATA are relayed (once
    /// per side), VERIFIED may complete the round, AUTH-FAILED ends the pair.
    fn on_auth(&mut self, now: Instant, pair_id: PairId, conn: ConnId, msg: LongMessage) {
        let pair = self.pairs.get_mut(&pair_id).expect("seat index is in sync");
        let side = usize::from(pair.sides[1].conn == conn);
        match msg {
            LongMessage::Auth(_) if !pair.sides[side].auth_relayed => {
                pair.sides[side].auth_relayed = true;
                let to = pair.sides[1 - side].conn;
                self.outputs.push_back(ServerOutput::Send {
                    conn: to,
                    message: msg.into(),
                });
            }
            LongMessage::PeerData { .. }
                if pair.sides[side].auth_relayed && !pair.sides[side].data_relayed =>
            {
                pair.sides[side].data_relayed = true;
                let to = pair.sides[1 - side].conn;
                self.outputs.push_back(ServerOutput::Send {
                    conn: to,
                    message: msg.into(),
                });
            }
            LongMessage::Verified if pair.sides[side].auth_relayed => {
                pair.sides[side].verified = true;
                self.complete_round(now, pair_id);
            }
            LongMessage::AuthFailed => self.abandon(conn, AbandonReason::AuthFailed),
            _ => self.abandon(conn, AbandonReason::Garbage),
        }
    }

    /// When both seats have a new EXCHANGE (and in a keyed room both said VERIFIED), each is
    /// told the other's address.
    fn complete_round(&mut self, now: Instant, pair_id: PairId) {
        let pair = self
            .pairs
            .get_mut(&pair_id)
            .expect("token/ident index is in sync");
        let completed = pair.completed;
        if pair.sides.iter().any(|s| s.round <= completed) {
            return;
        }
        if pair.keyed && !pair.sides.iter().all(|s| s.verified) {
            return;
        }
        let [Some(a), Some(b)] = [pair.sides[0].exchanged, pair.sides[1].exchanged] else {
            unreachable!("a side with a round has an address");
        };
        for (me, other) in [(0, 1), (1, 0)] {
            let (me, other) = (&pair.sides[me], &pair.sides[other]);
            // A HINT (even "none") tells a client of ours that its partner is ours too.
            if me.ext && other.ext {
                self.outputs.push_back(ServerOutput::Send {
                    conn: me.conn,
                    message: Message::Hint(other.hint).into(),
                });
            }
            self.outputs.push_back(ServerOutput::Send {
                conn: me.conn,
                message: Message::PeerInfo(other.exchanged.expect("checked above")).into(),
            });
        }
        let round = pair.sides[0].round.max(pair.sides[1].round);
        pair.completed = round;
        let ident = pair.ident;
        let first_round = completed == 0;
        let session = pair.sides.iter().all(|s| s.ext);
        if session {
            let old = pair.deadline;
            pair.deadline = crate::later(now, self.config.session_timeout);
            let new = pair.deadline;
            self.pair_deadlines.remove(&(old, pair_id));
            self.pair_deadlines.insert((new, pair_id));
        } else {
            self.close_pair(pair_id);
        }
        if first_round {
            self.stats.completed += 1;
        }
        self.events.push_back(ServerEvent::Completed {
            round,
            ident,
            first: a,
            second: b,
        });
    }

    /// Closes both connections of a completed or abandoned pair and drops its indexes.
    fn close_pair(&mut self, pair_id: PairId) {
        let Some(pair) = self.pairs.remove(&pair_id) else {
            return;
        };
        for ip in pair.v1_ips().into_iter().flatten() {
            self.v1_index.remove(&(pair.ident, ip, pair_id));
        }
        self.pair_deadlines.remove(&(pair.deadline, pair_id));
        for side in &pair.sides {
            self.tokens.remove(&side.token);
            if self.forget(side.conn) {
                self.outputs
                    .push_back(ServerOutput::Close { conn: side.conn });
            }
        }
    }

    /// A private server's refusal: says why (REFUSED), then closes like [`Server::reject`].
    fn refuse(&mut self, conn: ConnId, why: RefuseReason) {
        self.outputs.push_back(ServerOutput::Send {
            conn,
            message: LongMessage::Refused(why).into(),
        });
        let reason = match why {
            RefuseReason::KeyRequired => RejectReason::KeyRequired,
            _ => RejectReason::WrongKey,
        };
        self.reject(conn, reason);
    }

    /// Closes a connection that never took a seat.
    fn reject(&mut self, conn: ConnId, reason: RejectReason) {
        if let Some(remote) = self.conns.get(&conn).map(|c| c.remote) {
            self.forget(conn);
            self.outputs.push_back(ServerOutput::Close { conn });
            self.events
                .push_back(ServerEvent::Rejected { remote, reason });
        }
    }

    /// Gives up a seated connection and, if it was in a pair, closes its partner. The
    /// connection itself gets a `Close` unless its peer closed it already.
    fn abandon(&mut self, conn: ConnId, reason: AbandonReason) {
        let Some((seat, remote)) = self.conns.get(&conn).map(|c| (c.seat, c.remote)) else {
            return;
        };
        if reason == AbandonReason::Closed {
            // The driver knows it is closed: forgetting it first suppresses its `Close`.
            self.forget(conn);
        }
        let ident = match seat {
            Seat::Greeting => return,
            Seat::Waiting(room) => {
                self.waiting.remove(&room);
                self.unwait(canonical_ip(remote.ip()));
                if self.forget(conn) {
                    self.outputs.push_back(ServerOutput::Close { conn });
                }
                room.ident
            }
            Seat::Paired(pair) => {
                let ident = self.pairs[&pair].ident;
                self.close_pair(pair);
                ident
            }
        };
        self.events
            .push_back(ServerEvent::Abandoned { ident, reason });
    }

    /// Drops a connection's own state (not its seat's). Returns whether it was known.
    fn forget(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.remove(&conn) else {
            return false;
        };
        if let Some(d) = c.deadline {
            self.conn_deadlines.remove(&(d, conn));
        }
        let ip = canonical_ip(c.remote.ip());
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        true
    }

    /// A client from `ip` no longer waits.
    fn unwait(&mut self, ip: IpAddr) {
        if let Some(n) = self.waiting_per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.waiting_per_ip.remove(&ip);
            }
        }
    }

    /// Whether a probe from `ip` may be answered now (and counts it): at most
    /// `probes_per_ip` per second. The table forgets IPs whose second is over whenever it
    /// has doubled since it was last swept, so it stays proportional to recent senders.
    fn probe_allowed(&mut self, now: Instant, ip: IpAddr) -> bool {
        const SECOND: Duration = Duration::from_secs(1);
        if self.probe_counts.len() >= self.probe_sweep_at {
            self.probe_counts
                .retain(|_, (since, _)| now.saturating_duration_since(*since) < SECOND);
            self.probe_sweep_at = (self.probe_counts.len() * 2).max(1024);
        }
        let (since, count) = self.probe_counts.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(*since) >= SECOND {
            *since = now;
            *count = 0;
        }
        if *count >= self.config.probes_per_ip {
            return false;
        }
        *count += 1;
        true
    }

    fn clear_conn_deadline(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(d) = c.deadline.take() {
                self.conn_deadlines.remove(&(d, conn));
            }
        }
    }

    fn fresh_token(&mut self) -> Token {
        loop {
            let t = Token(self.rng.next_u32());
            if !self.tokens.contains_key(&t) {
                return t;
            }
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match (canonical_ip(addr.ip()), addr.port()) {
        (IpAddr::V4(ip), port) => Some(SocketAddrV4::new(ip, port)),
        _ => None,
    }
}
