//! Port prediction: learn how our own NAT allocates external ports from a few observed
//! mappings, and turn that into a [`Hint`] for the peer and a window size for us.
//!
//! Model (Klinec & Matyáš): a sequential NAT hands out `port += step` for every new mapping,
//! ours and those of every other host behind it; the others arrive as a Poisson process of rate
//! λ. Between our EXCHANGE and our first PUNCH (about one RTT to the server) λ·RTT ports go to
//! others, with a standard deviation of √(λ·RTT) plus our uncertainty about λ itself.

use std::time::{Duration, Instant};

use crate::codec::Hint;

/// One observed mapping: our `seq`-th new mapping, made at `sent`, got public `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// How many new mappings of ours came before this one (probes, EXCHANGEs, punches —
    /// answered or not), so that our own unobserved mappings are not counted as others'.
    pub seq: u32,
    /// When the datagram that created the mapping left.
    pub sent: Instant,
    /// The external port the server saw.
    pub port: u16,
}

/// What the observations say about our NAT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NatBehaviour {
    /// Fewer than two observations.
    Unknown,
    /// Ports move by `step` (±k) per mapping, plus `rate` mappings per second of others.
    Sequential {
        /// Signed port step per mapping.
        step: i32,
        /// Other hosts' new mappings per second.
        rate: f64,
        /// How many other mappings were counted (the rate's sample size).
        counted: u32,
    },
    /// External ports do not follow the allocation order.
    Random,
}

/// Collects observations of our own NAT and predicts where our next ports will be.
#[derive(Clone, Debug, Default)]
pub struct PortPredictor {
    observations: Vec<Observation>,
    rtt: Option<Duration>,
}

/// Observations kept at most; older ones add little.
const MAX_OBSERVATIONS: usize = 32;
/// A jump larger than this between two consecutive mappings is not sequential allocation.
const MAX_SEQUENTIAL_JUMP: u32 = 1000;
/// Largest port step believed without a back-to-back pair of probes.
const MAX_STEP: u32 = 8;
/// Block changes tolerated among the observations of a sequential (carrier, port-block) NAT.
const MAX_BLOCK_JUMPS: usize = 2;
/// Observations the classification looks at (the latest).
const RECENT: usize = 10;
/// The longest step inside a block's run (own mappings and other hosts' flows between two
/// observations).
const MAX_BLOCK_RUN_STEP: u32 = 256;
/// Own mappings between two observations from which on a jump is no evidence of randomness
/// (a re-aim's EXCHANGE follows a whole punch window).
const WIDE: u32 = 8;

impl PortPredictor {
    /// Records that our `seq`-th new mapping, made at `sent`, got public `port`. Ignored once
    /// full, or if `seq` was recorded already.
    pub fn observe(&mut self, seq: u32, sent: Instant, port: u16) {
        if self.observations.iter().all(|o| o.seq != seq) {
            self.observations.push(Observation { seq, sent, port });
            self.observations.sort_by_key(|o| o.seq);
            // The oldest go first: what matters is where the NAT allocates now.
            if self.observations.len() > MAX_OBSERVATIONS {
                self.observations.remove(0);
            }
        }
    }

    /// Records a round-trip time sample to the server; the smallest is kept.
    pub fn observe_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(self.rtt.map_or(rtt, |r| r.min(rtt)));
    }

    /// The smallest RTT seen, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Number of observations.
    pub fn len(&self) -> usize {
        self.observations.len()
    }

    /// Whether nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.observations.is_empty()
    }

    /// Classifies the NAT from the observations.
    ///
    /// Sequential NATs show ports moving one way by small steps. A carrier NAT that hands
    /// out ports in blocks does too, except where it moves on to the next block: such a jump
    /// splits the observations into runs, and if every run is sequential the same way (and
    /// there are at most [`MAX_BLOCK_JUMPS`] jumps) the NAT is sequential, its rate counted
    /// inside the runs. Anything else is random.
    pub fn behaviour(&self) -> NatBehaviour {
        // The latest observations: a long session of a block NAT crosses many blocks, and
        // what matters is where the NAT allocates now.
        let obs = &self.observations[self.observations.len().saturating_sub(RECENT)..];
        if obs.len() < 2 {
            return NatBehaviour::Unknown;
        }
        let diffs: Vec<(i32, u32)> = obs
            .windows(2)
            .map(|w| {
                let d = i32::from(w[1].port) - i32::from(w[0].port);
                (d, w[1].seq.saturating_sub(w[0].seq).max(1))
            })
            .collect();
        let ups = diffs
            .iter()
            .filter(|(d, _)| *d > 0 && d.unsigned_abs() <= MAX_SEQUENTIAL_JUMP)
            .count();
        let downs = diffs
            .iter()
            .filter(|(d, _)| *d < 0 && d.unsigned_abs() <= MAX_SEQUENTIAL_JUMP)
            .count();
        let up = ups >= downs;
        let sequential = |d: i32, max: u32| d != 0 && (d > 0) == up && d.unsigned_abs() <= max;
        // Every step one way: sequential. Otherwise runs of short steps one way, split by at
        // most a few jumps, each jump followed by a short step: blocks. Random ports would
        // need several short steps the same way by chance (≈ (256/65536)^k).
        let strict = diffs
            .iter()
            .all(|(d, _)| sequential(*d, MAX_SEQUENTIAL_JUMP));
        let max = if strict {
            MAX_SEQUENTIAL_JUMP
        } else {
            MAX_BLOCK_RUN_STEP
        };
        let fits = |d: i32| sequential(d, max);
        // Across many of our own mappings (a punch window between two EXCHANGEs) a block NAT
        // may well have changed blocks: such a jump says nothing about the allocation order.
        let wide_jump = |(d, mine): (i32, u32)| !fits(d) && mine >= WIDE;
        let diffs: Vec<(i32, u32)> = diffs.into_iter().filter(|&x| !wide_jump(x)).collect();
        let obs_fit: Vec<bool> = obs
            .windows(2)
            .map(|w| {
                let d = i32::from(w[1].port) - i32::from(w[0].port);
                !wide_jump((d, w[1].seq.saturating_sub(w[0].seq).max(1)))
            })
            .collect();
        if diffs.is_empty() {
            return NatBehaviour::Unknown;
        }
        let jumps = diffs.iter().filter(|(d, _)| !fits(*d)).count();
        // Short steps one way, at least two more than the jumps between them — or a single
        // jump among at least two such steps (few probes, one block change), or two steps
        // after the last jump (they place the NAT's latest block). Random ports make a short
        // step one way about once in 256.
        let steps = diffs.len() - jumps;
        let last_run = diffs.iter().rev().take_while(|(d, _)| fits(*d)).count();
        let runs_ok = strict || steps >= 2 + jumps || (jumps == 1 && steps >= 2) || last_run >= 2;
        if jumps > MAX_BLOCK_JUMPS.max(diffs.len() / 3) || !runs_ok {
            // One jump and one step among three observations: a block change or chance.
            if diffs.len() == 2 && jumps == 1 {
                return NatBehaviour::Unknown;
            }
            return NatBehaviour::Random;
        }
        let inside: Vec<(i32, u32)> = diffs.iter().copied().filter(|(d, _)| fits(*d)).collect();
        let neighbours: Vec<u32> = inside
            .iter()
            .filter(|(_, mine)| *mine == 1)
            .map(|(d, _)| d.unsigned_abs())
            .collect();
        let step = match neighbours.iter().fold(0u32, |g, &d| gcd(g, d)) {
            g if (2..=MAX_STEP).contains(&g) && neighbours.contains(&g) => g,
            _ => 1,
        };
        let counted: u32 = inside
            .iter()
            .map(|&(d, mine)| (d.unsigned_abs() / step).saturating_sub(mine))
            .sum();
        // The time the runs cover (a jump's interval counts nothing).
        let span: Duration = obs
            .windows(2)
            .zip(&obs_fit)
            .filter(|(_, kept)| **kept)
            .map(|(w, _)| w)
            .zip(&diffs)
            .filter(|(_, (d, _))| fits(*d))
            .map(|(w, _)| w[1].sent.saturating_duration_since(w[0].sent))
            .sum();
        let rate = if span.is_zero() {
            0.0
        } else {
            f64::from(counted) / span.as_secs_f64()
        };
        let step = if up { step as i32 } else { -(step as i32) };
        NatBehaviour::Sequential {
            step,
            rate,
            counted,
        }
    }

    /// Plans our punch window for a round whose punches leave about `horizon` after the
    /// EXCHANGE: how many slots to punch from (at most `max_window`) and the hint that puts the
    /// peer's aim in the middle of them. `None` when we know too little to advise (or have no
    /// slot to punch from).
    pub fn plan(&self, horizon: Duration, max_window: u16) -> Option<Plan> {
        if max_window == 0 {
            return None;
        }
        match self.behaviour() {
            NatBehaviour::Unknown => None,
            NatBehaviour::Random => Some(Plan {
                hint: Hint::RANDOM,
                window: max_window,
            }),
            NatBehaviour::Sequential {
                step,
                rate,
                counted,
            } => {
                let h = horizon.as_secs_f64();
                let mean = rate * h;
                // Poisson spread of others' mappings, plus our error on the rate itself.
                let span = (self.observations[self.observations.len() - 1].sent
                    - self.observations[0].sent)
                    .as_secs_f64()
                    .max(1e-3);
                let rate_sd = f64::from(counted.max(1)).sqrt() / span;
                let sd = (mean + (rate_sd * h).powi(2)).sqrt();
                // At least 4 slots, but never more than we have (which may be fewer).
                let window = (2.0 * (3.0 * sd).ceil() + 4.0)
                    .max(4.0)
                    .min(f64::from(max_window));
                let window = window as u16;
                let centre = 1.0 + mean + f64::from(window - 1) / 2.0;
                // -32768 and -32767 are the RANDOM and INDEPENDENT sentinels, never offsets.
                let offset = (f64::from(step) * centre.round()).clamp(-32766.0, 32767.0);
                Some(Plan {
                    hint: Hint(offset as i16),
                    window,
                })
            }
        }
    }
}

/// Our window for one round and the hint to give the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Where the peer should aim, relative to our EXCHANGE's public port.
    pub hint: Hint,
    /// Slots to punch from.
    pub window: u16,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
