//! The verdict and what is printed: the matching check, pairs/s, latency percentiles, CPU per
//! pair, failures, abuse, memory, and `--json`. The text is what docs/BENCHMARKS.md quotes.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use crate::abuse::AbuseKind;
use crate::generator::{Generator, Phase};
use crate::run::Measured;

struct Matching {
    matched_pairs: usize,
    wrong: usize,
    incomplete: usize,
}

/// Checks that the PEERINFOs form a perfect matching: each client learned the exchange address
/// of exactly one other client, who learned its own; unless the identifier is `shared`, of its
/// own partner.
fn check_matching(g: &Generator, shared: bool) -> Matching {
    let by_addr: HashMap<SocketAddrV4, usize> = g
        .clients
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.exchange_addr.map(|a| (a, i)))
        .collect();
    let (mut good, mut wrong, mut incomplete) = (0, 0, 0);
    for (i, c) in g.clients.iter().enumerate() {
        let Some(peer) = c.peer else {
            incomplete += 1;
            continue;
        };
        let ok = by_addr.get(&peer).is_some_and(|&j| {
            j != i && g.clients[j].peer == c.exchange_addr && (shared || j == Generator::partner(i))
        });
        if ok {
            good += 1;
        } else {
            wrong += 1;
        }
    }
    Matching {
        matched_pairs: good / 2,
        wrong,
        incomplete,
    }
}

/// Passed: every pair matched, none wrong, every garbage connection closed by the server.
pub fn verdict(g: &Generator) -> bool {
    let m = check_matching(g, g.cli.ident.is_some());
    let garbage_open = g
        .abuse
        .iter()
        .filter(|a| a.kind == AbuseKind::Garbage && !a.closed_by_server)
        .count();
    m.matched_pairs == g.cli.pairs && m.wrong == 0 && garbage_open == 0
}

/// How the failures line counts a client still under way at `--timeout`.
const UNFINISHED: &str = "unfinished at --timeout";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the results on stdout (and one JSON line with `--json`).
pub fn print(g: &Generator, measured: &Measured, fd_limit: u64) {
    let &Measured {
        elapsed,
        cpu,
        waiting_memory,
        final_memory,
    } = measured;
    let shared = g.cli.ident.is_some();
    let m = check_matching(g, shared);
    let mut latencies: Vec<Duration> = g.clients.iter().filter_map(|c| c.latency).collect();
    latencies.sort_unstable();
    let mut failures: HashMap<String, usize> = HashMap::new();
    for c in &g.clients {
        match &c.phase {
            Phase::Failed(why) => *failures.entry(why.to_string()).or_default() += 1,
            Phase::Done => {}
            _ => *failures.entry(UNFINISHED.into()).or_default() += 1,
        }
    }
    let count = |kind: AbuseKind, closed: bool| {
        g.abuse
            .iter()
            .filter(|a| a.kind == kind && (!closed || a.closed_by_server))
            .count()
    };
    let abuse_failed = g.abuse.iter().filter(|a| a.failed).count();
    let pairs_per_s = m.matched_pairs as f64 / elapsed.as_secs_f64();
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
    );
    let waiting_held = g.waiters.iter().filter(|w| w.stream.is_some()).count();
    println!(
        "pairs: {} of {} matched ({} ident{}), {} wrong, {} incomplete, in {:.3} s: {:.0} pairs/s",
        m.matched_pairs,
        g.cli.pairs,
        if shared { "one" } else { "distinct" },
        if shared { "" } else { "s" },
        m.wrong,
        m.incomplete,
        elapsed.as_secs_f64(),
        pairs_per_s
    );
    println!(
        "latency (HELLO -> PEERINFO, per client): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
    let per_pair = |d: Duration| d.as_secs_f64() * 1e6 / (m.matched_pairs.max(1) as f64);
    // /proc counts CPU in clock ticks (10 ms): below a few ticks the figure means nothing.
    if let Some(server) = cpu.server.filter(|c| *c >= Duration::from_millis(50)) {
        println!(
            "CPU during the pairs: server {:.2} s ({:.1} us/pair: {:.0} pairs per server CPU-second), \
             generator {:.2} s ({:.1} us/pair)",
            server.as_secs_f64(),
            per_pair(server),
            1e6 / per_pair(server).max(1e-9),
            cpu.own.as_secs_f64(),
            per_pair(cpu.own)
        );
    } else {
        println!(
            "CPU during the pairs: generator {:.2} s ({:.1} us/pair)",
            cpu.own.as_secs_f64(),
            per_pair(cpu.own)
        );
    }
    if !failures.is_empty() {
        let mut f: Vec<_> = failures.iter().collect();
        f.sort();
        println!("client failures: {f:?}");
    }
    if g.retries > 0 {
        println!(
            "connections retried (refused, or reset before READY): {}",
            g.retries
        );
    }
    if !g.abuse.is_empty() || g.garbage_sent > 0 {
        println!(
            "abuse: silent {} (closed by server {}), garbage conns {} (closed by server {}), \
             garbage datagrams {}, abuse sockets that failed to open {}",
            count(AbuseKind::Silent, false),
            count(AbuseKind::Silent, true),
            count(AbuseKind::Garbage, false),
            count(AbuseKind::Garbage, true),
            g.garbage_sent,
            abuse_failed
        );
    }
    if g.cli.waiting > 0 {
        println!(
            "waiting clients held to the end: {waiting_held} of {}",
            g.cli.waiting
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    if let Some(w) = waiting_memory {
        println!(
            "server RSS with {} waiting clients: {:.1} MiB",
            g.cli.waiting,
            mib(w.rss_kib)
        );
    }
    if let Some(f) = final_memory {
        println!(
            "server RSS at the end: {:.1} MiB (peak {:.1} MiB)",
            mib(f.rss_kib),
            mib(f.peak_kib)
        );
    }
    if g.cli.json {
        let kib = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        println!(
            "{{\"pairs\":{},\"matched\":{},\"wrong\":{},\"incomplete\":{},\"shared_ident\":{},\
             \"seconds\":{:.4},\"pairs_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\
             \"max_ms\":{:.3},\"silent\":{},\"garbage_conns\":{},\"garbage_conns_closed\":{},\
             \"garbage_datagrams\":{},\"waiting\":{},\"waiting_held\":{},\
             \"rss_waiting_kib\":{},\"rss_end_kib\":{},\"rss_peak_kib\":{},\"fd_limit\":{},\
             \"server_cpu_s\":{},\"generator_cpu_s\":{:.3}}}",
            g.cli.pairs,
            m.matched_pairs,
            m.wrong,
            m.incomplete,
            shared,
            elapsed.as_secs_f64(),
            pairs_per_s,
            ms(p50),
            ms(p99),
            ms(max),
            count(AbuseKind::Silent, false),
            count(AbuseKind::Garbage, false),
            count(AbuseKind::Garbage, true),
            g.garbage_sent,
            g.cli.waiting,
            waiting_held,
            kib(waiting_memory.map(|m| m.rss_kib)),
            kib(final_memory.map(|m| m.rss_kib)),
            kib(final_memory.map(|m| m.peak_kib)),
            fd_limit,
            cpu.server
                .map_or("null".to_string(), |c| format!("{:.3}", c.as_secs_f64())),
            cpu.own.as_secs_f64()
        );
    }
}
