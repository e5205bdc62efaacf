//! The run, in three phases: open the waiting clients and let them settle (`--waiting`); start
//! the pairs, `--concurrency` in flight (or `--rate` per second), with the abuse spread over
//! them, until every pair finished or `--timeout`; then give the server `--grace` to close the
//! garbage connections. Only the pairs phase is timed.

use std::time::{Duration, Instant};

use mio::Events;

use crate::abuse::AbuseKind;
use crate::generator::Generator;
use crate::proc::{own_cpu, Memory, ProcFiles};
use crate::waiting::OPEN_BATCH;

/// CPU used during the pairs phase.
#[derive(Clone, Copy)]
pub struct Cpu {
    /// By the server, if its pid is known.
    pub server: Option<Duration>,
    /// By the generator.
    pub own: Duration,
}

/// What the run measured, besides what the clients hold.
pub struct Measured {
    /// Length of the pairs phase.
    pub elapsed: Duration,
    pub cpu: Cpu,
    /// The server's memory with the waiting clients held, before the pairs.
    pub waiting_memory: Option<Memory>,
    /// The server's memory at the end.
    pub final_memory: Option<Memory>,
}

/// Runs the three phases.
pub fn run(g: &mut Generator, proc: Option<&ProcFiles>) -> Measured {
    let mut events = Events::with_capacity(4096);
    let waiting_memory = if g.cli.waiting > 0 {
        open_waiting(g, &mut events, proc)
    } else {
        None
    };
    let server_cpu0 = proc.and_then(ProcFiles::cpu);
    let own_cpu0 = own_cpu();
    let elapsed = pairs(g, &mut events);
    let cpu = Cpu {
        server: server_cpu0.and_then(|c0| Some(proc?.cpu()?.saturating_sub(c0))),
        own: own_cpu().saturating_sub(own_cpu0),
    };
    // Abuse launched after the last pair (pairs = 0, or rounding).
    g.abuse_up_to(1, 1);
    grace(g, &mut events);
    Measured {
        elapsed,
        cpu,
        waiting_memory,
        final_memory: proc.and_then(ProcFiles::memory),
    }
}

/// Phase 1: opens the waiting clients, at most [`OPEN_BATCH`] not yet past HELLO at a time,
/// waits `--settle`, and reads the server's memory.
fn open_waiting(
    g: &mut Generator,
    events: &mut Events,
    proc: Option<&ProcFiles>,
) -> Option<Memory> {
    let t0 = Instant::now();
    let mut next = 0;
    while next < g.cli.waiting || g.waiters.iter().any(|w| w.opening()) {
        let unsent = g.waiters.iter().filter(|w| w.opening()).count();
        for _ in unsent..OPEN_BATCH {
            if next == g.cli.waiting {
                break;
            }
            g.open_waiter(next);
            next += 1;
        }
        g.poll_once(events, Duration::from_millis(5));
        g.dispatch(events, Instant::now());
        assert!(
            t0.elapsed() < Duration::from_secs_f64(g.cli.timeout),
            "waiting clients not connected within --timeout"
        );
    }
    let opened = t0.elapsed();
    let settle_end = Instant::now() + Duration::from_secs_f64(g.cli.settle);
    while Instant::now() < settle_end {
        g.poll_once(events, Duration::from_millis(20));
        g.dispatch(events, Instant::now());
    }
    let memory = proc.and_then(ProcFiles::memory);
    let held = g.waiters.iter().filter(|w| w.stream.is_some()).count();
    eprintln!(
        "waiting: {held} of {} clients held after HELLO ({:.2} s to open){}",
        g.cli.waiting,
        opened.as_secs_f64(),
        memory.map_or(String::new(), |m| format!(
            "; server RSS {:.1} MiB",
            m.rss_kib as f64 / 1024.0
        ))
    );
    memory
}

/// Phase 2: the pairs, with abuse spread over the launches. Returns how long it took.
fn pairs(g: &mut Generator, events: &mut Events) -> Duration {
    let pairs = g.cli.pairs;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(g.cli.timeout);
    let retry = Duration::from_secs_f64(g.cli.retry_ms / 1000.0);
    let total_abuse_units = pairs.max(1);
    let mut launched = 0;
    let mut retry_queue: Vec<(Instant, usize)> = Vec::new();
    while g.pairs_finished < pairs || launched < pairs {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Refused connections go back in line.
        for i in g.refused.drain(..) {
            retry_queue.push((now + retry, i));
        }
        let mut k = 0;
        while k < retry_queue.len() {
            if retry_queue[k].0 <= now {
                let (_, i) = retry_queue.swap_remove(k);
                g.retries += 1;
                g.start_client(i, now);
                g.settle(i);
            } else {
                k += 1;
            }
        }
        // Launch pairs.
        while launched < pairs && g.in_flight < g.cli.concurrency {
            if let Some(rate) = g.cli.rate {
                if now < t0 + Duration::from_secs_f64(launched as f64 / rate) {
                    break;
                }
            }
            g.in_flight += 1;
            g.start_client(2 * launched, now);
            g.start_client(2 * launched + 1, now);
            g.settle(2 * launched);
            launched += 1;
            // Abuse in proportion to the pairs launched.
            g.abuse_up_to(launched, total_abuse_units);
            if pairs > 0 && launched % 64 == 0 {
                break; // let the loop breathe: read replies between bursts
            }
        }
        let mut timeout = Duration::from_millis(2);
        if g.cli.rate.is_some() || !retry_queue.is_empty() {
            timeout = Duration::from_micros(200);
        }
        if launched < pairs && g.in_flight < g.cli.concurrency && g.cli.rate.is_none() {
            timeout = Duration::ZERO;
        }
        g.poll_once(events, timeout);
        g.dispatch(events, Instant::now());
    }
    t0.elapsed()
}

/// Phase 3: waits up to `--grace` for the server to close every garbage connection.
fn grace(g: &mut Generator, events: &mut Events) {
    let grace_end = Instant::now() + Duration::from_secs_f64(g.cli.grace);
    while Instant::now() < grace_end
        && g.abuse
            .iter()
            .any(|a| a.kind == AbuseKind::Garbage && a.open())
    {
        g.poll_once(events, Duration::from_millis(10));
        g.dispatch(events, Instant::now());
    }
}
