//! Named timers (after quinn-proto's `TimerTable`): a machine keeps every deadline in one
//! table indexed by what it is for, so `poll_timeout` is the earliest entry and
//! `handle_timeout` asks each timer by name whether it is due.

use std::time::Instant;

/// The client's timers, in the order [`crate::Client::handle_timeout`] serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The next probe of our NAT.
    Probe,
    /// The easy side's next birthday spray batch.
    Spray,
    /// Not the leader: take the pair the leader's ACK proved if its CONFIRMs never come.
    ConfirmWait,
    /// No ACK after the peer's PUNCH: the peer is v1, win the v1 way.
    V1Fallback,
    /// A predicted attempt's second punch pass.
    Pass,
    /// The phase's own deadline: what it does depends on the phase (connect, READY, PEERINFO,
    /// the punch attempt, the acknowledgement burst, the pause before the next round).
    Phase,
}

impl Timer {
    /// `Phase` is the last variant.
    const COUNT: usize = Timer::Phase as usize + 1;
}

/// At most one deadline per [`Timer`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TimerTable([Option<Instant>; Timer::COUNT]);

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.0[timer as usize] = Some(at);
    }

    /// Sets `timer` to `at`, or stops it if `at` is `None`.
    pub(crate) fn set_or_stop(&mut self, timer: Timer, at: Option<Instant>) {
        self.0[timer as usize] = at;
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.0[timer as usize] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }

    pub(crate) fn is_due(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// True (and the timer stopped) if `timer` is due at `now`.
    pub(crate) fn expire(&mut self, timer: Timer, now: Instant) -> bool {
        let due = self.is_due(timer, now);
        if due {
            self.stop(timer);
        }
        due
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}
