//! Simulated N4 sessions per second: n4-sim running n4-core's server and two clients behind
//! two simulated NAT4s, from start to both clients' WIN (or to the round's LOSE).
//!
//! Two groups, the same sessions: `sim` by wall-clock time (the number), `sim_cpu` by
//! the bench thread's CPU time (Linux), which other load on a shared machine inflates less.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use n4_sim::{run, Scenario, Strategy};

/// Runs `base` with a fresh seed per iteration (seeds from 0: inputs are fixed).
fn sessions<M: Measurement>(c: &mut Criterion<M>, group: &str, name: &str, base: &Scenario) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    g.bench_function(name, |b| {
        let mut s = base.clone();
        let mut seed = 0u64;
        b.iter(|| {
            s.seed = seed;
            seed += 1;
            black_box(run(black_box(&s)).expect("valid scenario"))
        })
    });
    g.finish();
}

/// The v1 client, two sequential NAT4s, 50 ms RTT, no background: a winning round
/// (2 × 125 punches, the server's pairing, TCP leg).
fn v1_win() -> Scenario {
    Scenario::new(0).with_strategy(Strategy::V1)
}

/// The predicting client at λ = 400 flows/s per NAT: probes, hints, punches.
fn predict_win_under_load() -> Scenario {
    Scenario::new(0).with_background(400.0)
}

/// The v1 client on random-port NATs: one full losing round (10 s of virtual time).
fn v1_lose() -> Scenario {
    Scenario::new(0)
        .with_strategy(Strategy::V1)
        .with_nat(n4_sim::NatKind::Random.config())
        .map_clients(|c| c.max_rounds = Some(1))
}

fn all<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    sessions(c, group, "v1_nat4_win", &v1_win());
    sessions(
        c,
        group,
        "predict_nat4_lambda400",
        &predict_win_under_load(),
    );
    sessions(c, group, "v1_random_nat_lose", &v1_lose());
}

fn wall(c: &mut Criterion) {
    all(c, "sim");
}

fn cpu(c: &mut Criterion<ThreadCpu>) {
    if thread_cpu().is_some() {
        all(c, "sim_cpu");
    }
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), where there is one.
#[cfg(target_os = "linux")]
fn thread_cpu() -> Option<Duration> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable `struct timespec` (64-bit Linux layout).
    let ok = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    ok.then(|| Duration::new(ts.sec as u64, ts.nsec as u32))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu() -> Option<Duration> {
    None
}

/// Criterion measurement by thread CPU time; reported like wall time (µs, elem/s).
struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu().unwrap_or_default()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().unwrap_or_default().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        const WALL: &WallTime = &WallTime;
        WALL.formatter()
    }
}

criterion_group!(benches, wall);
criterion_group! {
    name = cpu_benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = cpu
}
criterion_main!(benches, cpu_benches);
