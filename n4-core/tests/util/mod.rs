//! An in-memory world for n4-core's machines: one server, any number of clients, raw test
//! connections, a fixed one-way latency, virtual time, no sockets and no NAT (every host's
//! public address is its own). Like quinn's `Pair`: step every machine, queue what it sends with
//! the latency, jump the clock to the earliest wake-up.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::*;

pub const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);
/// Where the server answers probes: its port + 1.
pub const PROBE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1722);

/// Something in flight, delivered at its time.
#[derive(Debug, Clone)]
enum Delivery {
    Open {
        conn: ConnId,
        remote: SocketAddr,
    },
    ToServer {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    ServerSawClose {
        conn: ConnId,
    },
    Datagram {
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    Connected {
        client: usize,
    },
    ToClient {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    ClientSawClose {
        conn: ConnId,
    },
}

pub struct Host {
    pub client: Client,
    pub ip: Ipv4Addr,
    /// Ports bound for the current window, slot by slot.
    pub window: Vec<u16>,
    pub conn: Option<ConnId>,
    pub events: Vec<Event>,
}

/// A raw TCP connection a test drives by hand (silent, garbage, v1 by hand).
pub struct RawConn {
    pub received: Vec<u8>,
    pub closed: bool,
}

pub struct World {
    pub epoch: Instant,
    pub now: Instant,
    pub latency: Duration,
    pub server: Server,
    pub server_events: Vec<ServerEvent>,
    pub hosts: Vec<Host>,
    pub raw: BTreeMap<ConnId, RawConn>,
    /// Datagrams between clients (not to or from the server) sent before this are lost.
    pub drop_peer_traffic_until: Option<Instant>,
    conn_owner: BTreeMap<ConnId, usize>,
    queue: BTreeMap<(Instant, u64), Delivery>,
    seq: u64,
    next_conn: u64,
}

impl World {
    pub fn new(config: ServerConfig) -> Self {
        // The only clock read: an arbitrary origin for virtual time.
        let epoch = Instant::now();
        Self {
            epoch,
            now: epoch,
            latency: Duration::from_millis(25),
            server: Server::new(config),
            server_events: Vec::new(),
            hosts: Vec::new(),
            raw: BTreeMap::new(),
            drop_peer_traffic_until: None,
            conn_owner: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            next_conn: 0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    /// Adds a client at `ip`, starting now.
    pub fn add_client(&mut self, ip: [u8; 4], config: ClientConfig) -> usize {
        let config = ClientConfig {
            server: SERVER,
            ..config
        };
        let client = Client::new(config, self.now).expect("valid test config");
        self.hosts.push(Host {
            client,
            ip: ip.into(),
            window: Vec::new(),
            conn: None,
            events: Vec::new(),
        });
        self.hosts.len() - 1
    }

    /// Opens a raw connection from `remote` to the server.
    pub fn raw_connect(&mut self, remote: SocketAddr) -> ConnId {
        let conn = self.fresh_conn();
        self.raw.insert(
            conn,
            RawConn {
                received: Vec::new(),
                closed: false,
            },
        );
        self.send(Delivery::Open { conn, remote });
        conn
    }

    pub fn raw_send(&mut self, conn: ConnId, bytes: &[u8]) {
        self.send(Delivery::ToServer {
            conn,
            bytes: bytes.to_vec(),
        });
    }

    pub fn raw_close(&mut self, conn: ConnId) {
        if let Some(r) = self.raw.get_mut(&conn) {
            r.closed = true;
        }
        self.send(Delivery::ServerSawClose { conn });
    }

    /// Sends a datagram to the server's UDP port.
    pub fn datagram_to_server(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.send(Delivery::Datagram {
            from,
            to: SERVER.into(),
            bytes: bytes.to_vec(),
        });
    }

    pub fn won(&self, host: usize) -> Option<(usize, SocketAddr)> {
        self.hosts[host].events.iter().find_map(|e| match e {
            Event::Win { slot, peer, .. } => Some((*slot, *peer)),
            _ => None,
        })
    }

    /// Asserts that `a` and `b` won on one pair of addresses — each one's peer is the other's
    /// address and winning local port — and returns their winning slots.
    pub fn assert_one_pair(&self, a: usize, b: usize) -> (usize, usize) {
        let ((slot_a, peer_a), (slot_b, peer_b)) = (self.won(a).unwrap(), self.won(b).unwrap());
        let at = |h: usize, slot: usize| {
            SocketAddr::from((self.hosts[h].ip, self.hosts[h].window[slot]))
        };
        assert_eq!(peer_a, at(b, slot_b));
        assert_eq!(peer_b, at(a, slot_a));
        (slot_a, slot_b)
    }

    pub fn peer_info(&self, host: usize) -> Vec<SocketAddrV4> {
        self.hosts[host]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::PeerInfo { peer, .. } => Some(*peer),
                _ => None,
            })
            .collect()
    }

    /// The public address of a host's EXCHANGE slot (no NAT: its own first window port).
    pub fn exchange_addr(&self, host: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.hosts[host].ip, self.hosts[host].window[0])
    }

    /// Runs until `done` holds or `limit` of virtual time passes; returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            self.drain();
            if done(self) {
                return true;
            }
            let Some(next) = self.next_wakeup() else {
                return false;
            };
            if next > end {
                self.now = end;
                return false;
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    fn fresh_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    fn send(&mut self, d: Delivery) {
        self.send_after(self.latency, d);
    }

    fn send_after(&mut self, delay: Duration, d: Delivery) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), d);
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let q = self.queue.keys().next().map(|k| k.0);
        let s = self.server.poll_timeout();
        let c = self.hosts.iter().filter_map(|h| h.client.poll_timeout());
        q.into_iter().chain(s).chain(c).min()
    }

    /// Delivers everything due and fires every due timer.
    fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            self.deliver(d);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        for h in &mut self.hosts {
            if h.client.poll_timeout().is_some_and(|t| t <= now) {
                h.client.handle_timeout(now);
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.now;
        match d {
            Delivery::Open { conn, remote } => {
                self.server.handle_connection_opened(now, conn, remote)
            }
            Delivery::ToServer { conn, bytes } => self.server.handle_stream_data(now, conn, &bytes),
            Delivery::ServerSawClose { conn } => self.server.handle_connection_closed(now, conn),
            Delivery::Datagram { from, to, bytes } => {
                let local = if to == SocketAddr::from(SERVER) {
                    Some(Local::Main)
                } else if to == SocketAddr::from(PROBE) {
                    Some(Local::Probe)
                } else {
                    None
                };
                if let Some(local) = local {
                    self.server.handle_datagram(now, local, from, &bytes);
                    return;
                }
                for h in &mut self.hosts {
                    if SocketAddr::from((h.ip, 0)).ip() != to.ip() {
                        continue;
                    }
                    if let Some(slot) = h.window.iter().position(|&p| p == to.port()) {
                        h.client.handle_datagram(now, slot, from, &bytes);
                    }
                }
            }
            Delivery::Connected { client } => {
                self.hosts[client].client.handle_connection_opened(now)
            }
            Delivery::ToClient { conn, bytes } => {
                if let Some(r) = self.raw.get_mut(&conn) {
                    r.received.extend(bytes);
                } else if let Some(&i) = self.conn_owner.get(&conn) {
                    if self.hosts[i].conn == Some(conn) {
                        self.hosts[i].client.handle_stream_data(now, &bytes);
                    }
                }
            }
            Delivery::ClientSawClose { conn } => {
                if let Some(r) = self.raw.get_mut(&conn) {
                    r.closed = true;
                } else if let Some(&i) = self.conn_owner.get(&conn) {
                    if self.hosts[i].conn == Some(conn) {
                        self.hosts[i].conn = None;
                        self.hosts[i].client.handle_connection_closed(now);
                    }
                }
            }
        }
    }

    /// Moves every machine's output into the network.
    fn drain(&mut self) {
        loop {
            let mut moved = false;
            while let Some(out) = self.server.poll_output() {
                moved = true;
                match out {
                    ServerOutput::Send { conn, message } => self.send(Delivery::ToClient {
                        conn,
                        bytes: message.to_bytes().to_vec(),
                    }),
                    ServerOutput::Close { conn } => self.send(Delivery::ClientSawClose { conn }),
                    ServerOutput::Datagram { from, to, message } => self.send(Delivery::Datagram {
                        from: match from {
                            Local::Main => SERVER.into(),
                            Local::Probe => PROBE.into(),
                        },
                        to,
                        bytes: message.to_bytes().to_vec(),
                    }),
                }
            }
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            for i in 0..self.hosts.len() {
                while let Some(cmd) = self.hosts[i].client.poll_command() {
                    moved = true;
                    self.client_command(i, cmd);
                }
                while let Some(t) = self.hosts[i].client.poll_transmit() {
                    moved = true;
                    let h = &self.hosts[i];
                    let from = SocketAddr::from((h.ip, h.window[t.slot]));
                    let to_server = t.destination.ip() == std::net::IpAddr::V4(*SERVER.ip());
                    if !to_server && self.drop_peer_traffic_until.is_some_and(|t| self.now < t) {
                        continue;
                    }
                    self.send(Delivery::Datagram {
                        from,
                        to: t.destination,
                        bytes: t.payload.to_vec(),
                    });
                }
                while let Some(e) = self.hosts[i].client.poll_event() {
                    self.hosts[i].events.push(e);
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn client_command(&mut self, i: usize, cmd: Command) {
        match cmd {
            Command::OpenWindow { ports } => {
                // Port 0 means "any": hand out distinct ephemeral ports, as an OS would.
                self.hosts[i].window = ports
                    .into_iter()
                    .map(|p| {
                        if p == 0 {
                            self.next_conn += 1;
                            50000 + (self.next_conn % 10000) as u16
                        } else {
                            p
                        }
                    })
                    .collect();
            }
            Command::OpenSlots { count } => {
                for _ in 0..count {
                    self.next_conn += 1;
                    let port = 50000 + (self.next_conn % 10000) as u16;
                    self.hosts[i].window.push(port);
                }
            }
            Command::Connect => {
                let conn = self.fresh_conn();
                self.hosts[i].conn = Some(conn);
                self.conn_owner.insert(conn, i);
                // The TCP source port is irrelevant to N4; use an ephemeral-looking one.
                let remote = SocketAddr::from((self.hosts[i].ip, 40000 + conn.0 as u16));
                self.send(Delivery::Open { conn, remote });
                // The handshake takes a round trip before the client may write.
                self.send_after(2 * self.latency, Delivery::Connected { client: i });
            }
            Command::Send(m) => {
                if let Some(conn) = self.hosts[i].conn {
                    self.send(Delivery::ToServer {
                        conn,
                        bytes: m.to_bytes().to_vec(),
                    });
                }
            }
            Command::Close => {
                if let Some(conn) = self.hosts[i].conn.take() {
                    self.send(Delivery::ServerSawClose { conn });
                }
            }
        }
    }
}
