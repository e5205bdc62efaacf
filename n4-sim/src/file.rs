//! The scenario file format (TOML or JSON, same fields): a flat top level for the common knobs,
//! `[nat]`, `[client]` and `[lan]` for both sites, and `[a]`/`[b]` to override one site. Every
//! field is optional; what is left out keeps [`Scenario::new`]'s default. Example:
//!
//! ```toml
//! seed = 7
//! rtt_ms = 50
//! strategy = "v1"
//! [nat]
//! kind = "seq"
//! lambda = 200
//! [client]
//! count = 25
//! offset = 20
//! max_rounds = 3
//! [b.nat]
//! first_port = 3023
//! ```

use std::path::Path;
use std::time::Duration;

use n4_core::{ClientConfig, Ident};
use serde::{Deserialize, Serialize};

use crate::link::Link;
use crate::nat::{Allocation, BackgroundKind, Filtering, Mapping, NatConfig};
use crate::scenario::{parse_strategy, NatKind, Scenario, Site, Stop};
use n4_core::Strategy;

/// Why a scenario file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML/JSON for this format.
    #[error("cannot parse scenario: {0}")]
    Parse(String),
    /// Parsed, but a value is out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// A scenario as written in a file. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScenarioFile {
    /// RNG seed. Default 0.
    pub seed: Option<u64>,
    /// RTT between any two of server, A and B, in ms. Default 50.
    pub rtt_ms: Option<f64>,
    /// End-to-end loss on every path (UDP lost, TCP retransmitted), 0–1. Default 0.
    pub loss: Option<f64>,
    /// Up to this much extra delay on every path, in ms. Default 0.
    pub jitter_ms: Option<f64>,
    /// Virtual time limit in s. Default 60.
    pub time_limit_s: Option<f64>,
    /// `"decided"` (default) or `"finished"`.
    pub stop: Option<String>,
    /// `"v1"` or `"predict"`, applied to both clients after `[client]`.
    pub strategy: Option<String>,
    /// The server offers our extension. Default true.
    pub server_extensions: Option<bool>,
    /// Both NATs.
    pub nat: Option<NatSpec>,
    /// Both clients.
    pub client: Option<ClientSpec>,
    /// Both LANs (host ↔ NAT).
    pub lan: Option<LinkSpec>,
    /// The server's uplink (replaces what `rtt_ms`, `loss`, `jitter_ms` set).
    pub server_uplink: Option<LinkSpec>,
    /// Site A overrides.
    pub a: Option<SiteSpec>,
    /// Site B overrides.
    pub b: Option<SiteSpec>,
    /// Host B sits behind site A's NAT, next to host A (B's own NAT and uplink are unused).
    /// Default false.
    pub one_nat: Option<bool>,
}

/// Overrides for one site.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteSpec {
    /// Applied after the top-level `[nat]`.
    pub nat: Option<NatSpec>,
    /// Applied after the top-level `[client]`.
    pub client: Option<ClientSpec>,
    /// Applied after the top-level `[lan]`.
    pub lan: Option<LinkSpec>,
    /// Applied after `rtt_ms`, `loss` and `jitter_ms`.
    pub uplink: Option<LinkSpec>,
    /// Client start time in ms. Default 0.
    pub start_ms: Option<f64>,
}

/// A NAT. `kind` picks a preset first; the other fields then override it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatSpec {
    /// `seq`, `seq-down`, `random`, `preserving`, `cone`, `full-cone`.
    pub kind: Option<String>,
    /// `eim`, `adm`, `apdm`.
    pub mapping: Option<String>,
    /// `eif`, `adf`, `apdf`.
    pub filtering: Option<String>,
    /// `sequential`, `random`, `preserving`.
    pub allocation: Option<String>,
    /// Step of a sequential NAT (may be negative).
    pub step: Option<i32>,
    /// External port range, inclusive.
    pub port_range: Option<(u16, u16)>,
    /// Where the sequential counter starts.
    pub first_port: Option<u16>,
    /// Mapping lifetime in s.
    pub lifetime_s: Option<f64>,
    /// Background flows per second.
    pub lambda: Option<f64>,
    /// `poisson` or `constant`.
    pub background: Option<String>,
    /// Datagrams to the NAT's own public IP turn back inwards. Default false.
    pub hairpin: Option<bool>,
}

/// A client. Fields left out keep n4-core's `ClientConfig::default()` (the original's values).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSpec {
    /// Identifier, ≤ 6 ASCII characters.
    pub ident: Option<String>,
    /// First local port (0 = ephemeral).
    pub port_start: Option<u16>,
    /// Slots per round.
    pub count: Option<u16>,
    /// Peer port offset.
    pub offset: Option<i32>,
    /// Accept punches from any IP.
    pub accept_any_ip: Option<bool>,
    /// Round timeout in ms.
    pub round_timeout_ms: Option<f64>,
    /// Passes of PUNCH over the window.
    pub punch_passes: Option<u16>,
    /// EXCHANGE datagrams per round.
    pub exchange_count: Option<u16>,
    /// Acknowledgement PUNCHes after WIN.
    pub ack_count: Option<u16>,
    /// Their spacing in ms.
    pub ack_interval_ms: Option<f64>,
    /// Give up after this many rounds.
    pub max_rounds: Option<u32>,
    /// Wait after a server close, in ms.
    pub retry_delay_ms: Option<f64>,
    /// `v1` or `predict`.
    pub strategy: Option<String>,
    /// Predict: probes per fresh round.
    pub probes: Option<u16>,
    /// Predict: spacing of the probes, in ms.
    pub probe_interval_ms: Option<f64>,
    /// Predict: window slots opened.
    pub max_window: Option<u16>,
}

/// A link segment (one way).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkSpec {
    /// Fixed delay in ms.
    pub latency_ms: Option<f64>,
    /// Uniform extra delay up to this, in ms.
    pub jitter_ms: Option<f64>,
    /// Loss probability.
    pub loss: Option<f64>,
    /// Duplication probability.
    pub duplicate: Option<f64>,
    /// Probability of being held back by `reorder_delay_ms`.
    pub reorder: Option<f64>,
    /// Hold-back of a reordered datagram, in ms.
    pub reorder_delay_ms: Option<f64>,
}

fn ms(v: f64, what: &str) -> Result<Duration, FileError> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v / 1000.0))
    } else {
        Err(FileError::Invalid(format!(
            "{what} must be ≥ 0 ms, got {v}"
        )))
    }
}

fn prob(v: f64, what: &str) -> Result<f64, FileError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(FileError::Invalid(format!(
            "{what} must be in 0..=1, got {v}"
        )))
    }
}

impl NatSpec {
    /// Applies this spec on top of `n`.
    pub fn apply(&self, n: &mut NatConfig) -> Result<(), FileError> {
        let bad = |what: &str, v: &str| FileError::Invalid(format!("unknown {what} '{v}'"));
        if let Some(k) = &self.kind {
            let keep = (n.background_rate, n.background);
            *n = k.parse::<NatKind>().map_err(FileError::Invalid)?.config();
            (n.background_rate, n.background) = keep;
        }
        if let Some(m) = &self.mapping {
            n.mapping = match m.as_str() {
                "eim" => Mapping::EndpointIndependent,
                "adm" => Mapping::AddressDependent,
                "apdm" => Mapping::AddressAndPortDependent,
                _ => return Err(bad("mapping", m)),
            };
        }
        if let Some(f) = &self.filtering {
            n.filtering = match f.as_str() {
                "eif" => Filtering::EndpointIndependent,
                "adf" => Filtering::AddressDependent,
                "apdf" => Filtering::AddressAndPortDependent,
                _ => return Err(bad("filtering", f)),
            };
        }
        if let Some(a) = &self.allocation {
            n.allocation = match a.as_str() {
                "sequential" => Allocation::Sequential { step: 1 },
                "random" => Allocation::Random,
                "preserving" => Allocation::Preserving,
                "blocks" => Allocation::Blocks { size: 64 },
                _ => match a.strip_prefix("blocks:").and_then(|n| n.parse().ok()) {
                    Some(size) => Allocation::Blocks { size },
                    None => return Err(bad("allocation", a)),
                },
            };
        }
        if let Some(step) = self.step {
            n.allocation = Allocation::Sequential { step };
        }
        if let Some(r) = self.port_range {
            n.port_range = r;
        }
        if let Some(p) = self.first_port {
            n.first_port = Some(p);
        }
        if let Some(s) = self.lifetime_s {
            n.lifetime = ms(s * 1000.0, "lifetime_s")?;
        }
        if let Some(l) = self.lambda {
            n.background_rate = l;
        }
        if let Some(h) = self.hairpin {
            n.hairpin = h;
        }
        if let Some(b) = &self.background {
            n.background = match b.as_str() {
                "poisson" => BackgroundKind::Poisson,
                "constant" => BackgroundKind::Constant,
                _ => return Err(bad("background", b)),
            };
        }
        Ok(())
    }
}

impl ClientSpec {
    /// Applies this spec on top of `c`.
    pub fn apply(&self, c: &mut ClientConfig) -> Result<(), FileError> {
        if let Some(i) = &self.ident {
            c.ident = i
                .parse::<Ident>()
                .map_err(|e| FileError::Invalid(e.to_string()))?;
        }
        macro_rules! set {
            ($($f:ident => $g:ident),*) => { $(if let Some(v) = self.$f { c.$g = v; })* };
        }
        set!(port_start => port_start, count => port_count, offset => peer_port_offset,
            accept_any_ip => accept_any_ip, punch_passes => punch_passes,
            exchange_count => exchange_count, ack_count => ack_count, probes => probes,
            max_window => max_window);
        if let Some(v) = self.round_timeout_ms {
            c.round_timeout = ms(v, "round_timeout_ms")?;
        }
        if let Some(v) = self.ack_interval_ms {
            c.ack_interval = ms(v, "ack_interval_ms")?;
        }
        if let Some(v) = self.retry_delay_ms {
            c.retry_delay = ms(v, "retry_delay_ms")?;
        }
        if let Some(v) = self.probe_interval_ms {
            c.probe_interval = ms(v, "probe_interval_ms")?;
        }
        if let Some(st) = &self.strategy {
            c.strategy = parse_strategy(st).map_err(FileError::Invalid)?;
        }
        if self.max_rounds.is_some() {
            c.max_rounds = self.max_rounds;
        }
        Ok(())
    }
}

impl LinkSpec {
    /// Applies this spec on top of `l`.
    pub fn apply(&self, l: &mut Link) -> Result<(), FileError> {
        if let Some(v) = self.latency_ms {
            l.latency = ms(v, "latency_ms")?;
        }
        if let Some(v) = self.jitter_ms {
            l.jitter = ms(v, "jitter_ms")?;
        }
        if let Some(v) = self.loss {
            l.loss = prob(v, "loss")?;
        }
        if let Some(v) = self.duplicate {
            l.duplicate = prob(v, "duplicate")?;
        }
        if let Some(v) = self.reorder {
            l.reorder = prob(v, "reorder")?;
        }
        if let Some(v) = self.reorder_delay_ms {
            l.reorder_delay = ms(v, "reorder_delay_ms")?;
        }
        Ok(())
    }
}

impl ScenarioFile {
    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<Self, FileError> {
        toml::from_str(text).map_err(|e| FileError::Parse(e.to_string()))
    }

    /// Parses JSON.
    pub fn from_json(text: &str) -> Result<Self, FileError> {
        serde_json::from_str(text).map_err(|e| FileError::Parse(e.to_string()))
    }

    /// Reads a file: JSON if its name ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
    }

    /// Builds the scenario: [`Scenario::new`]'s defaults with this file's values on top.
    pub fn to_scenario(&self) -> Result<Scenario, FileError> {
        let mut s = Scenario::new(self.seed.unwrap_or(0));
        if let Some(rtt) = self.rtt_ms {
            s = s.with_rtt(ms(rtt, "rtt_ms")?);
        }
        if let Some(p) = self.loss {
            s = s.with_loss(prob(p, "loss")?);
        }
        if let Some(j) = self.jitter_ms {
            s = s.with_jitter(ms(j, "jitter_ms")?);
        }
        if let Some(t) = self.time_limit_s {
            s.time_limit = ms(t * 1000.0, "time_limit_s")?;
        }
        if let Some(stop) = &self.stop {
            s.stop = match stop.as_str() {
                "decided" => Stop::Decided,
                "finished" => Stop::Finished,
                _ => return Err(FileError::Invalid(format!("unknown stop '{stop}'"))),
            };
        }
        if let Some(e) = self.server_extensions {
            s.server.extensions = e;
        }
        if let Some(l) = &self.server_uplink {
            l.apply(&mut s.server_uplink)?;
        }
        let strategy = match &self.strategy {
            Some(name) => Some(parse_strategy(name).map_err(FileError::Invalid)?),
            None => None,
        };
        for (site, spec) in s.sites.iter_mut().zip([&self.a, &self.b]) {
            apply_site(site, self, spec.as_ref(), strategy)?;
        }
        if self.one_nat == Some(true) {
            s = s.with_one_nat();
        }
        Ok(s)
    }
}

fn apply_site(
    site: &mut Site,
    top: &ScenarioFile,
    spec: Option<&SiteSpec>,
    strategy: Option<Strategy>,
) -> Result<(), FileError> {
    if let Some(n) = &top.nat {
        n.apply(&mut site.nat)?;
    }
    if let Some(c) = &top.client {
        c.apply(&mut site.client)?;
    }
    if let Some(l) = &top.lan {
        l.apply(&mut site.lan)?;
    }
    if let Some(st) = strategy {
        site.client.strategy = st;
    }
    let Some(spec) = spec else {
        return Ok(());
    };
    if let Some(n) = &spec.nat {
        n.apply(&mut site.nat)?;
    }
    if let Some(c) = &spec.client {
        c.apply(&mut site.client)?;
    }
    if let Some(l) = &spec.lan {
        l.apply(&mut site.lan)?;
    }
    if let Some(l) = &spec.uplink {
        l.apply(&mut site.uplink)?;
    }
    if let Some(t) = spec.start_ms {
        site.start = ms(t, "start_ms")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_give_the_same_scenario() {
        let toml = r#"
            seed = 7
            rtt_ms = 50
            strategy = "v1"
            [nat]
            kind = "seq"
            lambda = 200
            [client]
            count = 8
            offset = 5
            [b.nat]
            first_port = 3023
        "#;
        let json = r#"{"seed":7,"rtt_ms":50,"strategy":"v1","nat":{"kind":"seq","lambda":200},
            "client":{"count":8,"offset":5},"b":{"nat":{"first_port":3023}}}"#;
        let a = ScenarioFile::from_toml(toml).unwrap();
        assert_eq!(a, ScenarioFile::from_json(json).unwrap());
        let s = a.to_scenario().unwrap();
        assert_eq!(s.sites[1].nat.first_port, Some(3023));
        assert_eq!(s.sites[0].nat.first_port, None);
        assert_eq!(s.sites[0].nat.background_rate, 200.0);
        assert_eq!(s.sites[0].client.port_count, 8);
        assert_eq!(s.sites[1].client.strategy, Strategy::V1);
        assert_eq!(s.sites[0].uplink.latency, Duration::from_micros(12_500));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        assert!(ScenarioFile::from_toml("sed = 1").is_err());
        let bad = ScenarioFile::from_toml("[nat]\nkind = \"nat9\"").unwrap();
        assert!(matches!(bad.to_scenario(), Err(FileError::Invalid(_))));
        let bad = ScenarioFile::from_toml("loss = 2.0").unwrap();
        assert!(bad.to_scenario().is_err());
    }
}
