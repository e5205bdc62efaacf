//! Aim strategies: where a client's punches go once PEERINFO names the peer.
//!
//! Each strategy is a type behind [`Aim`] that turns what the client knows at PEERINFO
//! ([`AimInput`]) into a [`PunchPlan`]: targets × the first `slots` window slots × `passes`,
//! then a wait of `timeout` for the peer. The client carries the plan out; the punch budget,
//! timers, early punches, confirmation and hard-NAT plans are shared by every strategy.
//!
//! A new strategy is a type implementing [`Aim`] (here or in a file of its own), a
//! [`Strategy`] variant with its name, and its arm in [`Strategy::aim`].

use std::net::SocketAddrV4;
use std::time::Duration;

use crate::client::ClientConfig;
use crate::codec::Hint;
use crate::prediction::Plan;

/// How the client aims its punches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The original's fixed offset and window, 10 s rounds, a new connection per round.
    V1,
    /// NAT-aware prediction and fast in-session attempts when the server and peer are ours.
    Predict,
}

impl Strategy {
    /// Every strategy, for command lines and sweeps.
    pub const ALL: [Strategy; 2] = [Strategy::V1, Strategy::Predict];

    /// Lowercase name, as in logs, JSON and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::Predict => "predict",
        }
    }

    /// The strategy called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The strategy's aim.
    pub(crate) fn aim(self) -> &'static dyn Aim {
        match self {
            Self::V1 => &V1Aim,
            Self::Predict => &PredictAim,
        }
    }

    /// It speaks our extension: asks for a token, probes its NAT, gives hints, confirms WINs.
    pub fn extended(self) -> bool {
        self.aim().extended()
    }
}

/// What the client knows when PEERINFO arrives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AimInput<'a> {
    pub(crate) config: &'a ClientConfig,
    /// The peer's EXCHANGE address, as the server saw it.
    pub(crate) peer: SocketAddrV4,
    /// The peer's hint for this attempt, if it gave one.
    pub(crate) peer_hint: Option<Hint>,
    /// The pair is ours on both ends with a hint this session: the prediction applies.
    pub(crate) predicted: bool,
    /// Our own plan from our probes (window and hint), if we made one.
    pub(crate) plan: Option<Plan>,
    /// The server gave a token: the session is extended.
    pub(crate) extended_session: bool,
    /// The round, 1-based.
    pub(crate) round: u32,
    pub(crate) rtt: Duration,
}

impl AimInput<'_> {
    /// `peer + offset`, if that is a port.
    pub(crate) fn peer_plus(&self, offset: i32) -> Option<SocketAddrV4> {
        u16::try_from(i32::from(self.peer.port()) + offset)
            .ok()
            .filter(|&port| port != 0)
            .map(|port| SocketAddrV4::new(*self.peer.ip(), port))
    }
}

/// Where and how often to punch in one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PunchPlan {
    /// Every slot punches each, in order; empty if the aim is out of the port range.
    pub(crate) targets: Vec<SocketAddrV4>,
    /// The first `slots` window slots punch.
    pub(crate) slots: u16,
    /// Passes sent at once.
    pub(crate) passes: u16,
    /// One more pass this long after the first ones.
    pub(crate) second_pass_after: Option<Duration>,
    /// How long to wait for the peer's punches.
    pub(crate) timeout: Duration,
}

/// An aim strategy.
pub(crate) trait Aim {
    /// It speaks our extension (see [`Strategy::extended`]).
    fn extended(&self) -> bool;
    /// The plan for this attempt.
    fn plan(&self, input: &AimInput<'_>) -> PunchPlan;
}

/// v1's after-this-many-rounds sweep of offsets when a predicting client meets a v1 server.
const V1_SERVER_SWEEP: u32 = 4;

/// The original's aim: `peer + offset` from `count` slots, `punch_passes` passes, the round
/// timeout.
pub(crate) struct V1Aim;

impl V1Aim {
    /// The offset without a hint. A predicting client behind a v1 server sweeps the offsets
    /// round by round (`offset`, `+count`, `+2·count`, `+3·count`, again), so a peer whose NAT
    /// gave away more than `offset` ports in one RTT is still hit in a later round.
    pub(crate) fn offset(input: &AimInput<'_>) -> i32 {
        let c = input.config;
        let offset = c.peer_port_offset;
        if !c.strategy.extended() || input.extended_session {
            return offset;
        }
        let band = i32::try_from((input.round - 1) % V1_SERVER_SWEEP).unwrap_or(0);
        let step = i32::from(c.port_count) * if offset < 0 { -1 } else { 1 };
        offset + band * step
    }
}

impl Aim for V1Aim {
    fn extended(&self) -> bool {
        false
    }

    fn plan(&self, input: &AimInput<'_>) -> PunchPlan {
        let c = input.config;
        let slots = match input.plan {
            // Our window must also hold a v1 peer's fixed aim.
            Some(p) => p.window.max(c.port_count),
            None => c.port_count,
        };
        PunchPlan {
            targets: input.peer_plus(Self::offset(input)).into_iter().collect(),
            slots,
            passes: c.punch_passes,
            second_pass_after: None,
            timeout: c.round_timeout,
        }
    }
}

/// Ours: the peer's hint says where its punches' mappings will be; our window as our own plan
/// sized it; one pass now and one half an RTT later; a short wait (the peer punches about
/// when we do). Without a hint (a v1 peer or server) it aims like [`V1Aim`].
pub(crate) struct PredictAim;

impl Aim for PredictAim {
    fn extended(&self) -> bool {
        true
    }

    fn plan(&self, input: &AimInput<'_>) -> PunchPlan {
        if !input.predicted {
            return V1Aim.plan(input);
        }
        let c = input.config;
        // A random-port peer gets the v1 aim; a port-keeping peer its EXCHANGE's port exactly.
        let offset = match input.peer_hint {
            Some(Hint::INDEPENDENT) => 0,
            Some(h) if h != Hint::RANDOM && h != Hint::NONE => i32::from(h.0),
            _ => V1Aim::offset(input),
        };
        // The peer punches about when we do; its punches cross in one one-way trip.
        let timeout = input.rtt.saturating_mul(4).max(Duration::from_millis(200));
        PunchPlan {
            targets: input.peer_plus(offset).into_iter().collect(),
            slots: input.plan.map_or(c.port_count, |p| p.window),
            passes: 1,
            second_pass_after: Some(input.rtt / 2),
            timeout: timeout.min(c.round_timeout),
        }
    }
}
