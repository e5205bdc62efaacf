//! `n4 probe`: what our NAT does, asked of an n4 server's two UDP ports.
//!
//! - Mapping: one socket probes the probe port (listen + 1) and the server port; the same
//!   public port for both means the mapping does not depend on the destination port.
//! - Filtering: a fresh socket sends PROBE-OTHER to the probe port; the answer comes from the
//!   server port, which that socket never sent to, so it only arrives if the NAT's filtering
//!   does not depend on the port.
//! - Allocation: fresh sockets probe one after another (the first two back to back); the public
//!   ports they get show the step, the direction and how fast other hosts take ports
//!   ([`n4_core::PortPredictor`]).
//!
//! Plain blocking std sockets with timeouts: a probe is a few dozen datagrams, no event loop.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use n4_core::{Message, NatBehaviour, PortPredictor};
use serde::Serialize;

use crate::Error;

/// What to probe and how hard.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// The server (its TCP/UDP port; probes also go to port + 1).
    pub server: SocketAddrV4,
    /// Fresh sockets for the allocation measurement.
    pub samples: u16,
    /// Spacing of those probes (after the first two, which go back to back).
    pub interval: Duration,
    /// How long to wait for each answer.
    pub timeout: Duration,
}

/// The NAT as the probes saw it.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// Our public IPv4 address.
    pub public_ip: Ipv4Addr,
    /// `"none"` (no NAT), `"endpoint-independent"` or `"address-and-port-dependent"`.
    pub mapping: &'static str,
    /// `"port-independent"` or `"address-and-port-dependent"`.
    pub filtering: &'static str,
    /// `"preserving"`, `"sequential"`, `"random"` or `"unknown"`.
    pub allocation: &'static str,
    /// Signed port step per new mapping (sequential only).
    pub step: Option<i32>,
    /// Other hosts' new mappings per second (sequential only).
    pub rate_per_sec: Option<f64>,
    /// Smallest round-trip time to the server, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// `(local port, public port)` of each allocation probe, in sending order.
    pub samples: Vec<(u16, u16)>,
}

impl ProbeReport {
    /// The report in words, one property per line.
    pub fn to_text(&self) -> String {
        let mapping = match self.mapping {
            "none" => "none: the server sees our own address (no NAT)",
            "endpoint-independent" => {
                "endpoint-independent: one public port per socket, whatever the destination port"
            }
            _ => "address-and-port-dependent (symmetric): a new public port per destination",
        };
        let filtering = match self.filtering {
            "port-independent" => "port-independent: other ports of a host we talk to may answer",
            _ => "address-and-port-dependent: only the exact address we sent to may answer",
        };
        let allocation = match (self.allocation, self.step, self.rate_per_sec) {
            ("sequential", Some(step), Some(rate)) => {
                let dir = if step > 0 { "increasing" } else { "decreasing" };
                format!("sequential, step {step:+} ({dir}), about {rate:.0} new mappings/s by other hosts")
            }
            ("preserving", ..) => "port-preserving: the public port is the local port".into(),
            ("random", ..) => "random: public ports cannot be predicted".into(),
            _ => "unknown: too few answers".into(),
        };
        let verdict = match (self.mapping, self.allocation) {
            ("none", _) | ("endpoint-independent", _) => "easy: any strategy punches this NAT",
            (_, "sequential") | (_, "preserving") => {
                "n4 can predict this NAT's ports: punching should work (default strategy)"
            }
            (_, "random") => {
                "hard: symmetric with random ports; works only if the peer's NAT is easy"
            }
            _ => "unclear: run again, or check that UDP reaches the server",
        };
        let rtt = self
            .rtt_ms
            .map_or("unknown".to_string(), |r| format!("{r:.1} ms"));
        format!(
            "public address: {}\nmapping:        {mapping}\nfiltering:      {filtering}\n\
             allocation:     {allocation}\nrtt to server:  {rtt}\nverdict:        {verdict}\n",
            self.public_ip
        )
    }
}

/// Runs the probe. Fails if the probe port never answers (not an n4 server of ours, or UDP
/// blocked).
pub fn run_probe(opts: &ProbeOptions) -> Result<ProbeReport, Error> {
    let server = opts.server;
    let probe_port = SocketAddrV4::new(*server.ip(), server.port().wrapping_add(1));
    let fail = |reason: String| Error::NoProbeAnswer {
        server,
        probe_port: probe_port.port(),
        reason,
    };

    // Mapping.
    let s = bind()?;
    let local = local_port(&s)?;
    let (seen, rtt) = ask(&s, Message::Probe, probe_port, opts.timeout)?.ok_or_else(|| {
        fail("no answer (is it an n4 server of ours, and does UDP reach it?)".into())
    })?;
    let mut predictor = PortPredictor::default();
    predictor.observe_rtt(rtt);
    let via_server_port = ask(&s, Message::Probe, server, opts.timeout)?;
    let mapping = match via_server_port {
        _ if seen.port() == local && local_ips_include(*seen.ip()) => "none",
        Some((other, _)) if other.port() == seen.port() => "endpoint-independent",
        _ => "address-and-port-dependent",
    };

    // Filtering: the answer comes from the server port, which this socket never sent to.
    let f = bind()?;
    let filtering = match ask(&f, Message::ProbeOther, probe_port, opts.timeout)? {
        Some(_) => "port-independent",
        None => "address-and-port-dependent",
    };

    // Allocation: fresh sockets, one new mapping each.
    let mut sockets = Vec::new();
    // Sequence numbers of our new mappings: the two above came first.
    for (seq, i) in (2u32..).zip(0..opts.samples) {
        if i >= 2 {
            thread::sleep(opts.interval);
        }
        let sock = bind()?;
        let sent = Instant::now();
        sock.send_to(&Message::Probe.to_bytes(), probe_port)
            .map_err(|e| fail(e.to_string()))?;
        sockets.push((sock, sent, seq));
    }
    let mut samples = Vec::new();
    for (sock, sent, seq) in &sockets {
        if let Some((addr, at)) = receive_seen(sock, probe_port, opts.timeout)? {
            predictor.observe(*seq, *sent, addr.port());
            predictor.observe_rtt(at.saturating_duration_since(*sent));
            samples.push((local_port(sock)?, addr.port()));
        }
    }
    let (allocation, step, rate) = if !samples.is_empty() && samples.iter().all(|(l, p)| l == p) {
        ("preserving", None, None)
    } else {
        match predictor.behaviour() {
            NatBehaviour::Sequential { step, rate, .. } => ("sequential", Some(step), Some(rate)),
            NatBehaviour::Random => ("random", None, None),
            NatBehaviour::Unknown => ("unknown", None, None),
        }
    };
    Ok(ProbeReport {
        public_ip: *seen.ip(),
        mapping,
        filtering,
        allocation,
        step,
        rate_per_sec: rate.map(|r| (r * 10.0).round() / 10.0),
        // Microseconds are all a clock over a network can say.
        rtt_ms: predictor
            .rtt()
            .map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
        samples,
    })
}

fn bind() -> Result<UdpSocket, Error> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|source| Error::Listen {
        proto: "UDP",
        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        source,
    })
}

fn local_port(s: &UdpSocket) -> Result<u16, Error> {
    Ok(s.local_addr().map_err(Error::Poll)?.port())
}

/// Whether `ip` is one of this host's own addresses, as far as a UDP connect can tell.
fn local_ips_include(ip: Ipv4Addr) -> bool {
    UdpSocket::bind((ip, 0)).is_ok()
}

/// Sends `msg` to `to` (three tries) and waits for a SEEN from `to` or its sibling port.
fn ask(
    s: &UdpSocket,
    msg: Message,
    to: SocketAddrV4,
    timeout: Duration,
) -> Result<Option<(SocketAddrV4, Duration)>, Error> {
    for _ in 0..3 {
        let sent = Instant::now();
        s.send_to(&msg.to_bytes(), to).map_err(Error::Poll)?;
        if let Some((addr, at)) = receive_seen(s, to, timeout / 3)? {
            return Ok(Some((addr, at - sent)));
        }
    }
    Ok(None)
}

/// Waits up to `timeout` for a SEEN from the server's IP; anything else is skipped.
fn receive_seen(
    s: &UdpSocket,
    server: SocketAddrV4,
    timeout: Duration,
) -> Result<Option<(SocketAddrV4, Instant)>, Error> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        s.set_read_timeout(Some(left)).map_err(Error::Poll)?;
        match s.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) if from.ip() == server.ip() => {
                if let Ok(Message::Seen(addr)) = Message::decode(&buf[..n]) {
                    return Ok(Some((addr, Instant::now())));
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(Error::Poll(e)),
        }
    }
}
