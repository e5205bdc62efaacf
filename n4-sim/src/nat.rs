//! NAT boxes in RFC 4787 terms: mapping, filtering, port allocation, mapping lifetime, and the
//! background traffic of other hosts behind the same NAT.
//!
//! What a NAT never does here: hairpinning, ICMP, port overloading for sequential or random
//! allocation (every new mapping takes a port no live mapping holds), or TCP through the UDP
//! port space (the TCP leg gets its ports from a separate counter, as Linux conntrack keeps a
//! port space per protocol; see `docs/SIM.md`).
//!
//! Background flows are applied lazily: right before the NAT allocates a port for our host at
//! time `t`, the shared counter advances once for every background arrival in `(last, t]`. This
//! is exact for what our host can observe (the ports it gets), costs nothing while nobody looks,
//! and keeps no state per background flow; the one thing it does not model is a background
//! mapping still holding its port when the counter wraps around to it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::link::{exponential, unit};

/// Which outbound flows share one external port (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mapping {
    /// One mapping per internal endpoint, whatever the destination ("cone").
    EndpointIndependent,
    /// One mapping per internal endpoint and destination IP.
    AddressDependent,
    /// One mapping per internal endpoint and destination IP:port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound datagrams a mapping lets in (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Filtering {
    /// Anything sent to the external port.
    EndpointIndependent,
    /// Datagrams from an IP the internal endpoint has sent to through this mapping.
    AddressDependent,
    /// Datagrams from an IP:port the internal endpoint has sent to through this mapping.
    AddressAndPortDependent,
}

/// How a new mapping's external port is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allocation {
    /// The internal port, when no live mapping with that port conflicts (Linux masquerade:
    /// the same port is reused towards different destinations); else the next free one above.
    Preserving,
    /// One counter for everything behind the NAT, moving by `step` (±k) per new mapping and
    /// wrapping inside the port range; ports held by live mappings are skipped.
    Sequential {
        /// Counter step; negative for decrementing NATs. Never 0.
        step: i32,
    },
    /// Uniform in the port range, skipping ports held by live mappings.
    Random,
    /// Carrier-grade NATs: sequential +1 inside a block of `size` ports, then on to a block
    /// picked at random (ports held by live mappings are skipped).
    Blocks {
        /// Ports per block (64–512 in the wild). Never 0.
        size: u16,
    },
}

/// How the other hosts behind a NAT open their flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackgroundKind {
    /// A Poisson process (exponential gaps), as Klinec & Matyáš model it.
    Poisson,
    /// Evenly spaced flows with a random phase (the lab's `--constant`).
    Constant,
}

/// Settings of a NAT box. `Default` is a symmetric, incrementing NAT4 (APDM, APDF, sequential
/// +1 over 1024–65535, counter starting at a random port, 30 s lifetime, no background).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NatConfig {
    /// Mapping behaviour. Default APDM.
    pub mapping: Mapping,
    /// Filtering behaviour. Default APDF.
    pub filtering: Filtering,
    /// Port allocation. Default sequential, step +1.
    pub allocation: Allocation,
    /// External port range, inclusive. Default 1024–65535.
    pub port_range: (u16, u16),
    /// Where the sequential counter starts; `None` draws it from the seed. Default `None`.
    pub first_port: Option<u16>,
    /// A mapping dies this long after the last datagram through it, either way. Default 30 s
    /// (Linux conntrack's unreplied UDP timeout).
    pub lifetime: Duration,
    /// Other hosts' new mappings per second. Default 0.
    pub background_rate: f64,
    /// Arrival process of the background flows. Default Poisson.
    pub background: BackgroundKind,
    /// A datagram from a host behind this NAT to the NAT's own public IP is translated and
    /// turned back inwards (RFC 4787 "hairpinning"), as if it had come from outside; without
    /// it the NAT drops it (Linux masquerade). Matters only with two hosts behind one NAT.
    /// Default off.
    pub hairpin: bool,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            mapping: Mapping::AddressAndPortDependent,
            filtering: Filtering::AddressAndPortDependent,
            allocation: Allocation::Sequential { step: 1 },
            port_range: (1024, 65535),
            first_port: None,
            lifetime: Duration::from_secs(30),
            background_rate: 0.0,
            background: BackgroundKind::Poisson,
            hairpin: false,
        }
    }
}

impl NatConfig {
    /// A symmetric NAT (APDM + APDF) with the given allocation.
    pub fn symmetric(allocation: Allocation) -> Self {
        Self {
            allocation,
            ..Self::default()
        }
    }

    /// A cone NAT (EIM) with the given filtering and sequential +1 allocation.
    pub fn cone(filtering: Filtering) -> Self {
        Self {
            mapping: Mapping::EndpointIndependent,
            filtering,
            ..Self::default()
        }
    }

    /// The same NAT with `rate` background flows per second.
    pub fn with_background(self, rate: f64) -> Self {
        Self {
            background_rate: rate,
            ..self
        }
    }

    fn check(&self) -> Result<(), String> {
        let (lo, hi) = self.port_range;
        if lo == 0 || lo > hi {
            return Err(format!("bad NAT port range {lo}-{hi}"));
        }
        if let Allocation::Sequential { step } = self.allocation {
            if step == 0 || step.unsigned_abs() > u32::from(hi - lo) + 1 {
                return Err(format!("bad NAT step {step} for range {lo}-{hi}"));
            }
        }
        if let Allocation::Blocks { size } = self.allocation {
            if size == 0 || u32::from(size) > u32::from(hi - lo) + 1 {
                return Err(format!("bad NAT block size {size} for range {lo}-{hi}"));
            }
        }
        if let Some(p) = self.first_port {
            if !(lo..=hi).contains(&p) {
                return Err(format!("NAT first port {p} is outside {lo}-{hi}"));
            }
        }
        if !(self.background_rate >= 0.0 && self.background_rate.is_finite()) {
            return Err(format!("bad background rate {}", self.background_rate));
        }
        Ok(())
    }
}

/// Virtual time in nanoseconds, saturating (584 years fit, as in the event queue): expiry
/// checks on the hot path compare and add plain integers.
pub(crate) fn ns(t: Duration) -> u64 {
    t.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(t.subsec_nanos()))
}

/// A lookup key: internal port, remote IP, remote port. The internal IP is left out to keep
/// the key one word; lookups check it on a match, so hosts behind one NAT may share a key.
fn key(internal: SocketAddrV4, remote: SocketAddrV4) -> u64 {
    (u64::from(internal.port()) << 48)
        | (u64::from(remote.ip().to_bits()) << 16)
        | u64::from(remote.port())
}

#[derive(Clone, Debug)]
struct Entry {
    internal: SocketAddrV4,
    external: u16,
    /// The destination that created it: with APDM the key, with ADM its IP is.
    remote: SocketAddrV4,
    /// Further destinations sent to through this mapping (EIM/ADM only), for filtering.
    more: Vec<SocketAddrV4>,
    /// Nanoseconds of virtual time (see [`ns`]).
    expires: u64,
}

impl Entry {
    fn permits(&self, from: SocketAddrV4, filtering: Filtering) -> bool {
        let one = |r: &SocketAddrV4| match filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => r.ip() == from.ip(),
            Filtering::AddressAndPortDependent => *r == from,
        };
        one(&self.remote) || self.more.iter().any(one)
    }
}

/// Which entries hold an external port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortHolders {
    None,
    One(usize),
    /// Port reuse towards different destinations (preserving NATs): scan them all.
    Many,
}

/// A new mapping, for the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NewMapping {
    /// Background flows that took ports since this NAT's previous allocation.
    pub(crate) background: u64,
}

/// Why an inbound datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drop {
    /// No live mapping has that external port.
    NoMapping,
    /// A mapping exists but its filter refuses the sender.
    Filtered,
}

/// A NAT box with one public IP, our host and the background hosts behind it.
#[derive(Clone, Debug)]
pub(crate) struct Nat {
    config: NatConfig,
    public_ip: Ipv4Addr,
    entries: Vec<Entry>,
    /// `key(internal, remote)` of each entry, same order: scanned instead of the entries.
    keys: Vec<u64>,
    /// A 256-bit filter over the masked keys: a clear bit proves no entry has the key, so a
    /// datagram that needs a new mapping skips the scan. Rebuilt when entries are removed.
    key_filter: [u64; 4],
    /// External port of each entry, same order.
    externals: Vec<u16>,
    /// Every port in `externals` lies in `held_range.0..=held_range.1` (empty when `.0 > .1`):
    /// a sequential counter usually moves past them all, and then `held` needs no scan.
    held_range: (u16, u16),
    /// Which bits of a key the mapping behaviour compares.
    mask: u64,
    /// Bumped whenever entries are added or removed; guards `port_memo`.
    generation: u64,
    /// The entries holding one external port, as of `generation`: a burst of punches aims at
    /// one port, so the next inbound datagram usually asks for the same one.
    port_memo: Option<(u16, u64, PortHolders)>,
    /// Where the last outbound lookup hit: a window's passes ask for entries in order.
    last_out: usize,
    /// No entry expires before this (ns).
    earliest_expiry: u64,
    /// `config.lifetime` in ns.
    lifetime: u64,
    /// Sequential counter, as an index into the port range.
    counter: u32,
    next_background: Duration,
    background_total: u64,
    background_reported: u64,
    next_tcp: u16,
}

impl Nat {
    #[cfg(test)]
    pub(crate) fn new(
        config: NatConfig,
        public_ip: Ipv4Addr,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self, String> {
        let mut nat = Self::empty();
        nat.reset(config, public_ip, rng)?;
        Ok(nat)
    }

    /// A placeholder without allocations, for [`Nat::reset`] to fill in.
    pub(crate) fn empty() -> Self {
        Self {
            config: NatConfig::default(),
            public_ip: Ipv4Addr::UNSPECIFIED,
            entries: Vec::new(),
            keys: Vec::new(),
            key_filter: [0; 4],
            externals: Vec::new(),
            held_range: (u16::MAX, 0),
            generation: 0,
            port_memo: None,
            last_out: 0,
            earliest_expiry: u64::MAX,
            lifetime: 0,
            mask: !0,
            counter: 0,
            next_background: Duration::MAX,
            background_total: 0,
            background_reported: 0,
            next_tcp: 0,
        }
    }

    /// Makes this the NAT that [`Nat::new`] would make (same random draws, in the same
    /// order), keeping the allocations. Nothing changes on an error.
    pub(crate) fn reset(
        &mut self,
        config: NatConfig,
        public_ip: Ipv4Addr,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), String> {
        config.check()?;
        let (lo, hi) = config.port_range;
        let size = u32::from(hi - lo) + 1;
        let first_counter = match config.first_port {
            Some(p) => u32::from(p - lo),
            None => (rng.next_u64() % u64::from(size)) as u32,
        };
        let first_background = match (config.background_rate, config.background) {
            (r, _) if r <= 0.0 => Duration::MAX,
            (r, BackgroundKind::Poisson) => exponential(rng, r),
            (r, BackgroundKind::Constant) => Duration::from_secs_f64(unit(rng) / r),
        };
        // Every field by name: a new field that is not reset here does not compile.
        let Self {
            config: c,
            public_ip: ip,
            entries,
            keys,
            key_filter,
            externals,
            held_range,
            generation,
            port_memo,
            last_out,
            earliest_expiry,
            lifetime,
            mask,
            counter,
            next_background,
            background_total,
            background_reported,
            next_tcp,
        } = self;
        *c = config;
        *ip = public_ip;
        keys.clear();
        keys.reserve(64);
        *key_filter = [0; 4];
        entries.clear();
        entries.reserve(64);
        externals.clear();
        externals.reserve(64);
        *held_range = (u16::MAX, 0);
        *generation = 0;
        *port_memo = None;
        *last_out = 0;
        *earliest_expiry = u64::MAX;
        *lifetime = ns(config.lifetime);
        *mask = match config.mapping {
            Mapping::EndpointIndependent => 0xffff << 48,
            Mapping::AddressDependent => !0xffff,
            Mapping::AddressAndPortDependent => !0,
        };
        *counter = first_counter;
        *next_background = first_background;
        *background_total = 0;
        *background_reported = 0;
        *next_tcp = 40000 + (rng.next_u64() % 20000) as u16;
        Ok(())
    }

    pub(crate) fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    /// Turns datagrams to its own public IP back inwards.
    pub(crate) fn hairpin(&self) -> bool {
        self.config.hairpin
    }

    /// Background flows so far (only counted where they move a counter: sequential NATs).
    pub(crate) fn background_total(&self) -> u64 {
        self.background_total
    }

    /// An outbound datagram from `internal` to `remote` at `now`: the external port it leaves
    /// from (and whether a mapping was made for it), or `None` if no port is free.
    #[cfg(test)]
    pub(crate) fn outbound(
        &mut self,
        now: Duration,
        internal: SocketAddrV4,
        remote: SocketAddrV4,
        rng: &mut ChaCha8Rng,
    ) -> Option<(u16, Option<NewMapping>)> {
        match self.outbound_existing(ns(now), internal, remote) {
            Some(external) => Some((external, None)),
            None => self
                .outbound_new(now, internal, remote, rng)
                .map(|(external, n)| (external, Some(n))),
        }
    }

    /// [`Nat::outbound`] through a live mapping: its external port, or `None` if there is
    /// none (then call [`Nat::outbound_new`]).
    #[inline(always)]
    pub(crate) fn outbound_existing(
        &mut self,
        now: u64,
        internal: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> Option<u16> {
        let i = self.find_out(now, internal, remote)?;
        self.last_out = i;
        let e = &mut self.entries[i];
        e.expires = now.saturating_add(self.lifetime);
        if e.remote != remote {
            Self::add_remote(e, remote);
        }
        Some(e.external)
    }

    /// The live entry that an outbound datagram from `internal` to `remote` uses, if any.
    #[inline(always)]
    fn find_out(&self, now: u64, internal: SocketAddrV4, remote: SocketAddrV4) -> Option<usize> {
        let mask = self.mask;
        let want = key(internal, remote) & mask;
        let hit = |i: usize| self.entries[i].expires > now && self.entries[i].internal == internal;
        // Keys are unique among a host's live entries, and `hit` checks the host: a hit at
        // the guess is the hit.
        let guess = self.last_out + 1;
        if self.keys.get(guess).is_some_and(|&k| k & mask == want) && hit(guess) {
            return Some(guess);
        }
        if !self.may_hold(want) {
            return None;
        }
        // `expire` runs before every allocation, so a key is held by at most one entry per
        // host; the first live one of this host is the hit.
        self.keys
            .iter()
            .enumerate()
            .position(|(i, &k)| k & mask == want && hit(i))
    }

    /// The bit of `key_filter` for a masked key.
    #[inline(always)]
    fn filter_bit(masked: u64) -> (usize, u64) {
        let h = masked.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
        ((h >> 6) as usize, 1 << (h & 63))
    }

    /// False if no entry has the masked key `masked`.
    #[inline(always)]
    fn may_hold(&self, masked: u64) -> bool {
        let (word, bit) = Self::filter_bit(masked);
        self.key_filter[word] & bit != 0
    }

    fn add_to_filter(&mut self, key: u64) {
        let (word, bit) = Self::filter_bit(key & self.mask);
        self.key_filter[word] |= bit;
    }

    #[cold]
    fn add_remote(e: &mut Entry, remote: SocketAddrV4) {
        if !e.more.contains(&remote) {
            e.more.push(remote);
        }
    }

    /// [`Nat::outbound`] without a live mapping (after [`Nat::outbound_existing`] found
    /// none): make one, or `None` if no port is free.
    #[inline(never)]
    pub(crate) fn outbound_new(
        &mut self,
        now: Duration,
        internal: SocketAddrV4,
        remote: SocketAddrV4,
        rng: &mut ChaCha8Rng,
    ) -> Option<(u16, NewMapping)> {
        let at = ns(now);
        let expires = at.saturating_add(self.lifetime);
        self.expire(at);
        self.run_background(now, rng);
        let external = self.allocate(internal, remote, rng)?;
        self.entries.push(Entry {
            internal,
            external,
            remote,
            more: Vec::new(),
            expires,
        });
        self.earliest_expiry = self.earliest_expiry.min(expires);
        self.keys.push(key(internal, remote));
        self.add_to_filter(key(internal, remote));
        self.externals.push(external);
        self.held_range = (
            self.held_range.0.min(external),
            self.held_range.1.max(external),
        );
        self.generation += 1;
        let background = self.background_total - self.background_reported;
        self.background_reported = self.background_total;
        Some((external, NewMapping { background }))
    }

    /// Forgets expired mappings, keeping the others in order.
    fn expire(&mut self, now: u64) {
        // Expiry times only grow (refreshes), so the earliest one seen is a lower bound.
        if now < self.earliest_expiry {
            return;
        }
        self.earliest_expiry = self
            .entries
            .iter()
            .map(|e| e.expires)
            .filter(|&t| t > now)
            .min()
            .unwrap_or(u64::MAX);
        if self.entries.iter().all(|e| e.expires > now) {
            return;
        }
        let mut kept = 0;
        for i in 0..self.entries.len() {
            if self.entries[i].expires > now {
                self.entries.swap(kept, i);
                self.keys.swap(kept, i);
                self.externals.swap(kept, i);
                kept += 1;
            }
        }
        self.entries.truncate(kept);
        self.keys.truncate(kept);
        self.externals.truncate(kept);
        self.key_filter = [0; 4];
        for i in 0..kept {
            self.add_to_filter(self.keys[i]);
        }
        self.held_range = self
            .externals
            .iter()
            .fold((u16::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
        self.generation += 1;
    }

    /// An inbound datagram from `from` to external port `port` at `now`: the internal endpoint
    /// it goes to, or why it is dropped. A dropped datagram leaves no state behind.
    #[inline]
    pub(crate) fn inbound(
        &mut self,
        now: u64,
        from: SocketAddrV4,
        port: u16,
    ) -> Result<SocketAddrV4, Drop> {
        // A burst of punches aims at one port: the memo usually names its one holder.
        if let Some((p, g, PortHolders::One(i))) = self.port_memo {
            if p == port && g == self.generation {
                return self.inbound_to(i, now, from);
            }
        }
        self.inbound_slow(now, from, port)
    }

    /// An inbound datagram from `from` to the one entry `i` that holds its port: delivered
    /// (refreshing the mapping) unless the entry expired or its filtering refuses `from`.
    #[inline(always)]
    fn inbound_to(&mut self, i: usize, now: u64, from: SocketAddrV4) -> Result<SocketAddrV4, Drop> {
        let (filtering, lifetime) = (self.config.filtering, self.lifetime);
        let e = &mut self.entries[i];
        if e.expires <= now {
            return Err(Drop::NoMapping);
        }
        if !e.permits(from, filtering) {
            return Err(Drop::Filtered);
        }
        e.expires = now.saturating_add(lifetime);
        Ok(e.internal)
    }

    /// [`Nat::inbound`] without a memo for `port`, or with several holders.
    #[inline(never)]
    fn inbound_slow(
        &mut self,
        now: u64,
        from: SocketAddrV4,
        port: u16,
    ) -> Result<SocketAddrV4, Drop> {
        let (filtering, lifetime) = (self.config.filtering, self.lifetime);
        let holders = match self.port_memo {
            Some((p, g, h)) if p == port && g == self.generation => h,
            _ => {
                let mut h = PortHolders::None;
                for (i, &p) in self.externals.iter().enumerate() {
                    if p == port {
                        h = match h {
                            PortHolders::None => PortHolders::One(i),
                            _ => PortHolders::Many,
                        };
                    }
                }
                self.port_memo = Some((port, self.generation, h));
                h
            }
        };
        match holders {
            PortHolders::None => return Err(Drop::NoMapping),
            PortHolders::One(i) => return self.inbound_to(i, now, from),
            PortHolders::Many => {}
        }
        let mut seen = false;
        let mut from_index = 0;
        // Usually no entry or one has the port; scan the dense port list, not the entries.
        while let Some(i) = self.externals[from_index..].iter().position(|&p| p == port) {
            let i = from_index + i;
            from_index = i + 1;
            let e = &mut self.entries[i];
            if e.expires <= now {
                continue;
            }
            seen = true;
            if e.permits(from, filtering) {
                e.expires = now.saturating_add(lifetime);
                return Ok(e.internal);
            }
        }
        Err(if seen {
            Drop::Filtered
        } else {
            Drop::NoMapping
        })
    }

    /// A port for a new TCP connection: a separate counter, never the UDP one.
    pub(crate) fn tcp_port(&mut self) -> u16 {
        let p = self.next_tcp;
        self.next_tcp = if p >= 60999 { 40000 } else { p + 1 };
        p
    }

    fn run_background(&mut self, now: Duration, rng: &mut ChaCha8Rng) {
        let rate = self.config.background_rate;
        while self.next_background <= now {
            match self.config.allocation {
                Allocation::Sequential { step } => self.step_counter(step),
                Allocation::Blocks { size } => self.step_block(size, rng),
                // Random and preserving allocation: other hosts' flows move nothing we
                // could predict.
                Allocation::Random | Allocation::Preserving => return,
            }
            self.background_total += 1;
            self.next_background += match self.config.background {
                BackgroundKind::Poisson => exponential(rng, rate),
                BackgroundKind::Constant => Duration::from_secs_f64(1.0 / rate),
            };
        }
    }

    fn size(&self) -> u32 {
        u32::from(self.config.port_range.1 - self.config.port_range.0) + 1
    }

    fn step_counter(&mut self, step: i32) {
        // `(counter + step).rem_euclid(size)` without a division: `check` keeps |step| ≤ size,
        // so one correction brings the sum back into `0..size`.
        let size = i64::from(self.size());
        let next = i64::from(self.counter) + i64::from(step);
        self.counter = if next >= size {
            next - size
        } else if next < 0 {
            next + size
        } else {
            next
        } as u32;
    }

    /// The next port of a block NAT: the next in the block, or the first of a random block.
    fn step_block(&mut self, block: u16, rng: &mut ChaCha8Rng) {
        let blocks = (self.size() / u32::from(block)).max(1);
        let next = self.counter + 1;
        self.counter = if next % u32::from(block) == 0 || next >= self.size() {
            (rng.next_u64() % u64::from(blocks)) as u32 * u32::from(block)
        } else {
            next
        };
    }

    fn port_at(&self, index: u32) -> u16 {
        self.config.port_range.0 + index as u16
    }

    fn held(&self, port: u16) -> bool {
        let (lo, hi) = self.held_range;
        (lo..=hi).contains(&port) && self.externals.contains(&port)
    }

    fn allocate(
        &mut self,
        internal: SocketAddrV4,
        remote: SocketAddrV4,
        rng: &mut ChaCha8Rng,
    ) -> Option<u16> {
        let size = self.size();
        match self.config.allocation {
            Allocation::Sequential { step } => {
                for _ in 0..size {
                    let port = self.port_at(self.counter);
                    self.step_counter(step);
                    if !self.held(port) {
                        return Some(port);
                    }
                }
                None
            }
            Allocation::Blocks { size: block } => {
                for _ in 0..size {
                    let port = self.port_at(self.counter);
                    self.step_block(block, rng);
                    if !self.held(port) {
                        return Some(port);
                    }
                }
                None
            }
            Allocation::Random => {
                // A few random tries, then a scan from a random point: always terminates.
                for _ in 0..16 {
                    let port = self.port_at((rng.next_u64() % u64::from(size)) as u32);
                    if !self.held(port) {
                        return Some(port);
                    }
                }
                let start = (rng.next_u64() % u64::from(size)) as u32;
                (0..size)
                    .map(|i| self.port_at((start + i) % size))
                    .find(|&p| !self.held(p))
            }
            Allocation::Preserving => {
                let (lo, hi) = self.config.port_range;
                let want = internal.port().clamp(lo, hi);
                let mapping = self.config.mapping;
                let conflicts = |p: u16, e: &Entry| {
                    e.external == p
                        && (e.internal != internal
                            || match mapping {
                                Mapping::EndpointIndependent => true,
                                Mapping::AddressDependent => e.remote.ip() == remote.ip(),
                                Mapping::AddressAndPortDependent => e.remote == remote,
                            })
                };
                (0..size)
                    .map(|i| self.port_at((u32::from(want - lo) + i) % size))
                    .find(|&p| !self.entries.iter().any(|e| conflicts(p, e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 101);
    const S: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);
    const P: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), 3028);

    fn nat(config: NatConfig) -> (Nat, ChaCha8Rng) {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let nat = Nat::new(config, Ipv4Addr::new(198, 51, 100, 3), &mut rng).unwrap();
        (nat, rng)
    }

    fn out(n: &mut Nat, rng: &mut ChaCha8Rng, t: u64, port: u16, to: SocketAddrV4) -> u16 {
        let at = Duration::from_millis(t);
        n.outbound(at, SocketAddrV4::new(HOST, port), to, rng)
            .unwrap()
            .0
    }

    #[test]
    fn symmetric_sequential_nat_counts_up_per_destination() {
        let (mut n, mut rng) = nat(NatConfig {
            first_port: Some(1801),
            ..NatConfig::default()
        });
        assert_eq!(out(&mut n, &mut rng, 0, 30000, S), 1801);
        assert_eq!(out(&mut n, &mut rng, 1, 30000, S), 1801);
        assert_eq!(out(&mut n, &mut rng, 2, 30000, P), 1802);
        assert_eq!(out(&mut n, &mut rng, 3, 30001, P), 1803);
    }

    #[test]
    fn unsolicited_inbound_is_dropped_and_leaves_no_state() {
        let (mut n, mut rng) = nat(NatConfig {
            first_port: Some(1801),
            ..NatConfig::default()
        });
        let t = Duration::from_millis(5);
        assert_eq!(n.inbound(ns(t), P, 1801), Err(Drop::NoMapping));
        assert_eq!(out(&mut n, &mut rng, 10, 30000, S), 1801);
        assert_eq!(n.inbound(ns(t), P, 1801), Err(Drop::Filtered));
        let s2 = SocketAddrV4::new(*S.ip(), 9);
        assert_eq!(n.inbound(ns(t), s2, 1801), Err(Drop::Filtered));
        assert_eq!(
            n.inbound(ns(t), S, 1801),
            Ok(SocketAddrV4::new(HOST, 30000))
        );
    }

    #[test]
    fn cone_filters_differ() {
        let s2 = SocketAddrV4::new(*S.ip(), 9);
        for (filtering, from_s2, from_p) in [
            (Filtering::EndpointIndependent, true, true),
            (Filtering::AddressDependent, true, true),
            (Filtering::AddressAndPortDependent, false, false),
        ] {
            let (mut n, mut rng) = nat(NatConfig::cone(filtering));
            let e = out(&mut n, &mut rng, 0, 30000, S);
            assert_eq!(
                out(&mut n, &mut rng, 1, 30000, P),
                e,
                "EIM reuses the mapping"
            );
            let t = Duration::from_millis(2);
            assert_eq!(n.inbound(ns(t), s2, e).is_ok(), from_s2, "{filtering:?}");
            let p2 = SocketAddrV4::new(*P.ip(), 1);
            assert_eq!(n.inbound(ns(t), p2, e).is_ok(), from_p, "{filtering:?}");
        }
    }

    #[test]
    fn mappings_expire_and_the_counter_moves_on() {
        let (mut n, mut rng) = nat(NatConfig {
            first_port: Some(5000),
            lifetime: Duration::from_millis(100),
            ..NatConfig::default()
        });
        assert_eq!(out(&mut n, &mut rng, 0, 30000, S), 5000);
        assert_eq!(out(&mut n, &mut rng, 99, 30000, S), 5000);
        assert_eq!(out(&mut n, &mut rng, 250, 30000, S), 5001);
        assert_eq!(
            n.inbound(ns(Duration::from_millis(400)), S, 5001),
            Err(Drop::NoMapping)
        );
    }

    #[test]
    fn decrementing_nat_wraps_inside_its_range_and_skips_held_ports() {
        let (mut n, mut rng) = nat(NatConfig {
            allocation: Allocation::Sequential { step: -2 },
            port_range: (1000, 1005),
            first_port: Some(1002),
            ..NatConfig::default()
        });
        let ports: Vec<u16> = (0..3)
            .map(|i| out(&mut n, &mut rng, 0, 30000 + i, S))
            .collect();
        assert_eq!(ports, [1002, 1000, 1004]);
        // The counter only ever visits even ports, and all three are held: no port, no mapping.
        let fourth = n.outbound(Duration::ZERO, SocketAddrV4::new(HOST, 30003), S, &mut rng);
        assert_eq!(fourth, None);
    }

    #[test]
    fn background_flows_eat_ports_between_our_mappings() {
        let (mut n, mut rng) = nat(NatConfig {
            first_port: Some(2000),
            background_rate: 100.0,
            background: BackgroundKind::Constant,
            ..NatConfig::default()
        });
        let a = out(&mut n, &mut rng, 0, 30000, S);
        let b = out(&mut n, &mut rng, 1000, 30000, P);
        assert_eq!(a, 2000);
        assert_eq!(
            b,
            2000 + 1 + 100,
            "a constant 100/s eats exactly 100 ports per second"
        );
    }

    #[test]
    fn preserving_nat_keeps_the_port_towards_every_destination() {
        let (mut n, mut rng) = nat(NatConfig::symmetric(Allocation::Preserving));
        assert_eq!(out(&mut n, &mut rng, 0, 30000, S), 30000);
        assert_eq!(out(&mut n, &mut rng, 0, 30000, P), 30000);
        assert_eq!(out(&mut n, &mut rng, 0, 30001, P), 30001);
    }
}
