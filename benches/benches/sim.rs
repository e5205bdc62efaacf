//! Simulated N4 sessions per second: n4-sim running n4-core's server and two clients behind
//! two simulated NAT4s, from start to both clients' WIN (or to the round's LOSE).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use n4_sim::{run, Scenario, Strategy};

/// Runs `base` with a fresh seed per iteration (seeds from 0: inputs are fixed).
fn sessions(c: &mut Criterion, name: &str, base: Scenario) {
    let mut g = c.benchmark_group("sim");
    g.throughput(Throughput::Elements(1));
    g.bench_function(name, |b| {
        let mut seed = 0u64;
        b.iter(|| {
            let mut s = base.clone();
            s.seed = seed;
            seed += 1;
            black_box(run(black_box(&s)).expect("valid scenario"))
        })
    });
    g.finish();
}

/// The v1 client, two sequential NAT4s, 50 ms RTT, no background: a winning round
/// (2 × 125 punches, the server's pairing, TCP leg).
fn v1_win(c: &mut Criterion) {
    sessions(
        c,
        "v1_nat4_win",
        Scenario::new(0).with_strategy(Strategy::V1),
    );
}

/// The predicting client at λ = 400 flows/s per NAT: probes, hints, punches.
fn predict_win_under_load(c: &mut Criterion) {
    sessions(
        c,
        "predict_nat4_lambda400",
        Scenario::new(0).with_background(400.0),
    );
}

/// The v1 client on random-port NATs: one full losing round (10 s of virtual time).
fn v1_lose(c: &mut Criterion) {
    let s = Scenario::new(0)
        .with_strategy(Strategy::V1)
        .with_nat(n4_sim::NatKind::Random.config())
        .map_clients(|c| c.max_rounds = Some(1));
    sessions(c, "v1_random_nat_lose", s);
}

criterion_group!(benches, v1_win, predict_win_under_load, v1_lose);
criterion_main!(benches);
