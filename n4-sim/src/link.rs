//! Links: one-way delay, jitter, loss, duplication and reordering, sampled from the sim's RNG.
//!
//! A path is made of segments (a site's LAN, a site's uplink, the far end's uplink); their
//! parameters combine with [`Link::then`]. A link never draws from the RNG for a parameter that
//! is zero, so turning a feature on does not reshuffle every other random choice more than needed.

use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

/// One direction of a segment of the network. `Default` is a perfect zero-delay wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Fixed one-way delay. Default 0.
    pub latency: Duration,
    /// Extra delay per datagram, uniform in `[0, jitter)`. Reorders datagrams sent close
    /// together. Default 0.
    pub jitter: Duration,
    /// Probability that a datagram is lost. Default 0.
    pub loss: f64,
    /// Probability that a datagram arrives twice (the copy gets its own jitter). Default 0.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_delay`, letting later ones pass.
    /// Default 0.
    pub reorder: f64,
    /// Extra delay of a reordered datagram. Default 10 ms.
    pub reorder_delay: Duration,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
        }
    }
}

/// The fate of one datagram on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Lost.
    Lost,
    /// Arrives after this delay, and a second copy after the second, if duplicated.
    Arrives(Duration, Option<Duration>),
}

impl Link {
    /// A link with only a fixed delay.
    pub fn delay(latency: Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    /// This segment followed by `next`: delays add, probabilities compound.
    pub fn then(&self, next: &Link) -> Link {
        let either = |a: f64, b: f64| 1.0 - (1.0 - a) * (1.0 - b);
        Link {
            latency: self.latency + next.latency,
            jitter: self.jitter + next.jitter,
            loss: either(self.loss, next.loss),
            duplicate: either(self.duplicate, next.duplicate),
            reorder: either(self.reorder, next.reorder),
            reorder_delay: self.reorder_delay.max(next.reorder_delay),
        }
    }

    /// Whether the link delivers everything at once, with no randomness.
    pub(crate) fn is_instant(&self) -> bool {
        self.latency.is_zero() && self.is_fixed()
    }

    /// Whether the link delivers everything after exactly `latency`, with no randomness.
    pub(crate) fn is_fixed(&self) -> bool {
        self.jitter.is_zero() && self.loss <= 0.0 && self.duplicate <= 0.0 && self.reorder <= 0.0
    }

    /// Decides what happens to one datagram.
    pub(crate) fn sample(&self, rng: &mut ChaCha8Rng) -> Fate {
        if self.is_fixed() {
            return Fate::Arrives(self.latency, None);
        }
        if chance(rng, self.loss) {
            return Fate::Lost;
        }
        let first = self.one_delay(rng);
        let copy = chance(rng, self.duplicate).then(|| self.one_delay(rng));
        Fate::Arrives(first, copy)
    }

    /// Delay of a segment of a reliable stream: lost segments are retransmitted after `rto`,
    /// doubling each time (TCP's exponential backoff).
    pub(crate) fn sample_reliable(&self, rng: &mut ChaCha8Rng, mut rto: Duration) -> Duration {
        let mut extra = Duration::ZERO;
        // Bounded so that a 100 % loss link cannot loop forever; 16 doublings is hours.
        for _ in 0..16 {
            if !chance(rng, self.loss) {
                break;
            }
            extra += rto;
            rto *= 2;
        }
        extra + self.one_delay(rng)
    }

    fn one_delay(&self, rng: &mut ChaCha8Rng) -> Duration {
        let mut d = self.latency;
        if !self.jitter.is_zero() {
            d += self.jitter.mul_f64(unit(rng));
        }
        if chance(rng, self.reorder) {
            d += self.reorder_delay;
        }
        d
    }
}

/// A uniform draw in `[0, 1)`.
pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// True with probability `p`; draws nothing when `p` is 0 or less.
pub(crate) fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    p > 0.0 && (p >= 1.0 || unit(rng) < p)
}

/// An exponential draw with the given rate (per second).
pub(crate) fn exponential(rng: &mut ChaCha8Rng, rate: f64) -> Duration {
    Duration::from_secs_f64(-(1.0 - unit(rng)).ln() / rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn a_perfect_link_draws_nothing_and_delays_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut untouched = rng.clone();
        let link = Link::delay(Duration::from_millis(25));
        assert!(!link.is_instant());
        assert_eq!(
            link.sample(&mut rng),
            Fate::Arrives(Duration::from_millis(25), None)
        );
        assert_eq!(rng.next_u64(), untouched.next_u64());
    }

    #[test]
    fn segments_compound() {
        let a = Link {
            latency: Duration::from_millis(10),
            loss: 0.5,
            ..Link::default()
        };
        let p = a.then(&a);
        assert_eq!(p.latency, Duration::from_millis(20));
        assert!((p.loss - 0.75).abs() < 1e-12);
    }

    #[test]
    fn loss_rate_is_about_right() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let link = Link {
            loss: 0.1,
            ..Link::default()
        };
        let lost = (0..100_000)
            .filter(|_| link.sample(&mut rng) == Fate::Lost)
            .count();
        assert!((9_000..11_000).contains(&lost), "{lost}");
    }
}
