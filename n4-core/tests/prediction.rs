//! Port prediction from observed mappings (n4-core's `prediction.rs`).

use std::time::{Duration, Instant};

use n4_core::{Hint, NatBehaviour, PortPredictor};

fn predictor(samples: &[(u64, u16)]) -> PortPredictor {
    let mut p = PortPredictor::default();
    // Any fixed origin works: only differences are used.
    let origin = ORIGIN.with(|o| *o);
    for (seq, &(ms, port)) in (0u32..).zip(samples) {
        p.observe(seq, origin + Duration::from_millis(ms), port);
    }
    p
}

thread_local! {
    static ORIGIN: Instant = Instant::now();
}

#[test]
fn quiet_sequential_nat_gets_a_small_window_just_ahead() {
    let p = predictor(&[(0, 1000), (20, 1001), (40, 1002), (60, 1003)]);
    assert_eq!(
        p.behaviour(),
        NatBehaviour::Sequential {
            step: 1,
            rate: 0.0,
            counted: 0
        }
    );
    let plan = p.plan(Duration::from_millis(50), 64).unwrap();
    // 2·ceil(3·sd)+4, sd from the rate's uncertainty alone (one mapping per 60 ms).
    assert_eq!(plan.window, 10);
    assert_eq!(plan.hint, Hint(6)); // 1 + 0 others + the window's middle
}

#[test]
fn busy_nat_measures_its_rate_and_aims_past_the_others() {
    // 400 other mappings per second: 8 per 20 ms between our probes.
    let p = predictor(&[(0, 1000), (20, 1009), (40, 1018), (60, 1027)]);
    let NatBehaviour::Sequential { step, rate, .. } = p.behaviour() else {
        panic!("sequential expected");
    };
    assert_eq!(step, 1);
    assert!((rate - 400.0).abs() < 1.0, "{rate}");
    let plan = p.plan(Duration::from_millis(50), 64).unwrap();
    // 20 others expected before our first punch; the window's middle lies beyond that.
    let offset = i32::from(plan.hint.0);
    assert!(
        offset > 20 && offset < 20 + i32::from(plan.window),
        "{plan:?}"
    );
}

#[test]
fn decrementing_and_stepped_nats_keep_their_sign_and_step() {
    let p = predictor(&[(0, 5000), (0, 4996), (20, 4992), (40, 4980)]);
    assert_eq!(
        p.behaviour(),
        NatBehaviour::Sequential {
            step: -4,
            rate: 50.0,
            counted: 2
        }
    );
    assert!(p.plan(Duration::from_millis(50), 64).unwrap().hint.0 < 0);
}

#[test]
fn random_ports_ask_the_peer_to_spray() {
    let p = predictor(&[(0, 40000), (20, 12000), (40, 55000)]);
    assert_eq!(p.behaviour(), NatBehaviour::Random);
    assert_eq!(
        p.plan(Duration::from_millis(50), 64).unwrap().hint,
        Hint::RANDOM
    );
    assert_eq!(predictor(&[(0, 1)]).plan(Duration::ZERO, 64), None);
}

#[test]
fn our_own_unanswered_probes_are_not_taken_for_others_or_for_the_step() {
    // Probes 0..4 at 0, 0, 20, 40, 60 ms on a quiet step-1 NAT; the answers to 1 and 3 were lost.
    let origin = ORIGIN.with(|o| *o);
    let mut p = PortPredictor::default();
    for (seq, ms, port) in [(0, 0, 1000), (2, 20, 1002), (4, 60, 1004)] {
        p.observe(seq, origin + Duration::from_millis(ms), port);
    }
    assert_eq!(
        p.behaviour(),
        NatBehaviour::Sequential {
            step: 1,
            rate: 0.0,
            counted: 0
        }
    );
}

/// Found by the fuzz `client` target: a plan whose offset clamped to −32767 read as the
/// INDEPENDENT sentinel ("aim at my port exactly").
#[test]
fn no_plan_hint_is_a_sentinel() {
    let t0 = std::time::Instant::now();
    let mut p = PortPredictor::default();
    // A decreasing NAT that others drain at ~a million ports a second: the offset for a
    // one-second horizon would pass -32767.
    for (i, port) in [60000u16, 59000, 58000, 57000].into_iter().enumerate() {
        p.observe(
            i as u32,
            t0 + std::time::Duration::from_millis(i as u64),
            port,
        );
    }
    assert!(matches!(
        p.behaviour(),
        NatBehaviour::Sequential { step: -1, .. }
    ));
    let plan = p
        .plan(std::time::Duration::from_secs(1), 64)
        .expect("a plan");
    assert!(
        plan.hint != Hint::INDEPENDENT && plan.hint != Hint::RANDOM,
        "{plan:?}"
    );
}
