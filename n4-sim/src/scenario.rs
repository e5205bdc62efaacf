//! A scenario: the server, its sites (each a host running an n4-core client behind its own NAT
//! or another site's, and its links) and the seed. Built in code with [`Scenario::new`] and the
//! `with_*` methods, or loaded from a TOML/JSON file (see [`crate::ScenarioFile`]).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;
use std::time::Duration;

use n4_core::{ClientConfig, ServerConfig, Strategy};

use crate::link::Link;
use crate::nat::{Allocation, Filtering, Mapping, NatConfig};

/// The rendezvous server's address (the seed README's).
pub const SERVER_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);

/// One side: a NAT, the host behind it and the client it runs.
#[derive(Clone, Debug)]
pub struct Site {
    /// The NAT box.
    pub nat: NatConfig,
    /// The NAT's public IP.
    pub public_ip: Ipv4Addr,
    /// The host's private IP.
    pub host_ip: Ipv4Addr,
    /// Host ↔ NAT, each way. Default: instant.
    pub lan: Link,
    /// NAT ↔ the internet core, each way. Every path between two sites, or a site and the
    /// server, crosses exactly two uplinks. Default: `rtt / 4` delay (see [`Scenario::with_rtt`]).
    pub uplink: Link,
    /// The client's settings; `server` is replaced by the scenario's server address.
    pub client: ClientConfig,
    /// When the client starts, from the beginning of the run. Default 0.
    pub start: Duration,
    /// `Some(j)`: this host sits behind site `j`'s NAT, beside that site's host (two hosts
    /// behind one NAT); its own `nat`, `public_ip` and `uplink` are unused. Default `None`.
    pub behind: Option<usize>,
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// As soon as every client won or gave up (the acknowledgement burst is cut short).
    Decided,
    /// When every client has nothing more to do (after the acknowledgement burst).
    Finished,
}

/// Everything a run depends on. Same scenario, same outcome and same trace, byte for byte.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Seeds the one RNG behind every random choice (and the server's tokens).
    pub seed: u64,
    /// The server's settings (`rng_seed` is derived from `seed`).
    pub server: ServerConfig,
    /// Where the server listens (TCP and UDP).
    pub server_addr: SocketAddrV4,
    /// Server ↔ the internet core, each way. Default: `rtt / 4` delay.
    pub server_uplink: Link,
    /// Site A (index 0), site B (index 1), and any more (2 to [`crate::MAX_SITES`]): each a
    /// host with its client, behind its own NAT or ([`Site::behind`]) another site's.
    pub sites: Vec<Site>,
    /// Virtual time after which the run stops, decided or not. Default 60 s.
    pub time_limit: Duration,
    /// Default [`Stop::Decided`].
    pub stop: Stop,
    /// TCP retransmission timeout for data segments (Linux's minimum RTO). Default 200 ms.
    pub tcp_rto: Duration,
    /// TCP retransmission timeout for SYNs (Linux's initial RTO). Default 1 s.
    pub tcp_syn_rto: Duration,
}

impl Scenario {
    /// Two symmetric incrementing NATs (NAT4, APDM/APDF, sequential +1), 50 ms RTT to the
    /// server (and between the sites), no background, no loss, default (extended) clients
    /// with the original's defaults: port start 30000, count 25, offset 20.
    pub fn new(seed: u64) -> Self {
        let site = |public: [u8; 4], host: [u8; 4]| Site {
            nat: NatConfig::default(),
            public_ip: public.into(),
            host_ip: host.into(),
            lan: Link::default(),
            uplink: Link::default(),
            client: ClientConfig::default(),
            start: Duration::ZERO,
            behind: None,
        };
        Self {
            seed,
            server: ServerConfig::default(),
            server_addr: SERVER_ADDR,
            server_uplink: Link::default(),
            sites: vec![
                site([198, 51, 100, 3], [192, 168, 1, 101]),
                site([203, 0, 113, 12], [192, 168, 0, 112]),
            ],
            time_limit: Duration::from_secs(60),
            stop: Stop::Decided,
            tcp_rto: Duration::from_millis(200),
            tcp_syn_rto: Duration::from_secs(1),
        }
        .with_rtt(Duration::from_millis(50))
    }

    /// Every uplink (both sites' and the server's) gets `rtt / 4` one-way delay, so the RTT
    /// between any two of the three is `rtt` — like the lab's WAN router that delays every
    /// forwarded packet by `rtt / 2`.
    pub fn with_rtt(mut self, rtt: Duration) -> Self {
        for link in self.uplinks_mut() {
            link.latency = rtt / 4;
        }
        self
    }

    /// End-to-end loss `p` on every path (each of the two uplinks on a path loses
    /// `1 - sqrt(1 - p)`), for UDP; TCP segments see the same loss and are retransmitted.
    pub fn with_loss(mut self, p: f64) -> Self {
        let per = 1.0 - (1.0 - p.clamp(0.0, 1.0)).sqrt();
        for link in self.uplinks_mut() {
            link.loss = per;
        }
        self
    }

    /// Up to `jitter` extra delay on every path (half of it on each uplink).
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        for link in self.uplinks_mut() {
            link.jitter = jitter / 2;
        }
        self
    }

    /// Every site's NAT gets this configuration.
    pub fn with_nat(mut self, nat: NatConfig) -> Self {
        for s in &mut self.sites {
            s.nat = nat;
        }
        self
    }

    /// Host B moves behind site A's NAT, next to host A (as 192.168.1.102): two clients
    /// behind one NAT, as a household or a carrier NAT has them. Whether they reach each
    /// other depends on the NAT's [`NatConfig::hairpin`].
    pub fn with_one_nat(mut self) -> Self {
        self.sites[1].behind = Some(0);
        self.sites[1].host_ip = Ipv4Addr::new(192, 168, 1, 102);
        self
    }

    /// One more host, behind site `behind`'s NAT (at `.120 + its index` in that site's
    /// subnet), running a client like site A's with identifier `ident`: more pairs in one
    /// run, or a crowd behind one NAT.
    pub fn with_host_behind(mut self, behind: usize, ident: n4_core::Ident) -> Self {
        let index = self.sites.len();
        let base = self.sites[behind].host_ip.octets();
        let mut site = self.sites[0].clone();
        site.behind = Some(behind);
        site.host_ip = Ipv4Addr::new(base[0], base[1], base[2], 120 + index as u8);
        site.client.ident = ident;
        self.sites.push(site);
        self
    }

    /// Every site's NAT sees `rate` background flows per second.
    pub fn with_background(mut self, rate: f64) -> Self {
        for s in &mut self.sites {
            s.nat.background_rate = rate;
        }
        self
    }

    /// Every client gets this configuration (identifiers included: call it before
    /// [`Scenario::with_host_behind`] gives a host its own room).
    pub fn with_client(mut self, client: ClientConfig) -> Self {
        for s in &mut self.sites {
            s.client = client.clone();
        }
        self
    }

    /// Changes every client's configuration.
    pub fn map_clients(mut self, f: impl Fn(&mut ClientConfig)) -> Self {
        for s in &mut self.sites {
            f(&mut s.client);
        }
        self
    }

    /// Every client plays this strategy.
    pub fn with_strategy(self, strategy: Strategy) -> Self {
        self.map_clients(|c| c.strategy = strategy)
    }

    fn uplinks_mut(&mut self) -> impl Iterator<Item = &mut Link> {
        std::iter::once(&mut self.server_uplink).chain(self.sites.iter_mut().map(|s| &mut s.uplink))
    }
}

/// Parses a strategy name as n4-core spells it (`v1`, `predict`, …).
pub fn parse_strategy(s: &str) -> Result<Strategy, String> {
    Strategy::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Strategy::ALL.iter().map(|k| k.name()).collect();
        format!("unknown strategy '{s}' (known: {})", names.join(", "))
    })
}

/// Every strategy n4-core has, for sweeps.
pub const STRATEGIES: [Strategy; Strategy::ALL.len()] = Strategy::ALL;

/// Named NAT kinds, for the command line and sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatKind {
    /// Symmetric (APDM/APDF), sequential +1: the "port-incrementing NAT4".
    Seq,
    /// Symmetric, sequential −1.
    SeqDown,
    /// Symmetric, random ports.
    Random,
    /// Symmetric, port-preserving (Linux masquerade).
    Preserving,
    /// Port-restricted cone (EIM/APDF), sequential +1: NAT3.
    Cone,
    /// Full cone (EIM/EIF), sequential +1: NAT1.
    FullCone,
    /// Symmetric, port blocks of 64 in random order (carrier-grade NAT).
    Blocks,
}

impl NatKind {
    /// Every kind.
    pub const ALL: [NatKind; 7] = [
        NatKind::Seq,
        NatKind::SeqDown,
        NatKind::Random,
        NatKind::Preserving,
        NatKind::Cone,
        NatKind::FullCone,
        NatKind::Blocks,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            NatKind::Seq => "seq",
            NatKind::SeqDown => "seq-down",
            NatKind::Random => "random",
            NatKind::Preserving => "preserving",
            NatKind::Cone => "cone",
            NatKind::FullCone => "full-cone",
            NatKind::Blocks => "blocks",
        }
    }

    /// The NAT configuration of this kind (other fields at their defaults).
    pub fn config(self) -> NatConfig {
        match self {
            NatKind::Seq => NatConfig::symmetric(Allocation::Sequential { step: 1 }),
            NatKind::SeqDown => NatConfig::symmetric(Allocation::Sequential { step: -1 }),
            NatKind::Random => NatConfig::symmetric(Allocation::Random),
            NatKind::Preserving => NatConfig::symmetric(Allocation::Preserving),
            NatKind::Blocks => NatConfig::symmetric(Allocation::Blocks { size: 64 }),
            NatKind::Cone => NatConfig::cone(Filtering::AddressAndPortDependent),
            NatKind::FullCone => NatConfig {
                mapping: Mapping::EndpointIndependent,
                ..NatConfig::cone(Filtering::EndpointIndependent)
            },
        }
    }
}

/// The NAT kinds of site A and site B: `kind` (both) or `a/b`, e.g. `random/preserving`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatPair {
    /// Site A's NAT.
    pub a: NatKind,
    /// Site B's NAT.
    pub b: NatKind,
}

impl NatPair {
    /// The same kind on both sides.
    pub fn both(kind: NatKind) -> Self {
        Self { a: kind, b: kind }
    }

    /// `kind`, or `a/b` when they differ.
    pub fn name(self) -> String {
        if self.a == self.b {
            self.a.name().into()
        } else {
            format!("{}/{}", self.a.name(), self.b.name())
        }
    }
}

impl FromStr for NatPair {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((a, b)) => Ok(Self {
                a: a.parse()?,
                b: b.parse()?,
            }),
            None => s.parse().map(Self::both),
        }
    }
}

impl FromStr for NatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NatKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = NatKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown NAT kind '{s}' (known: {})", names.join(", "))
            })
    }
}
