//! `loadgen`: a load generator for the rendezvous server (`n4 -s`, or any v1 server).
//!
//! It plays K pairs of v1 clients — TCP HELLO, READY, UDP EXCHANGE (three times, as v1), PEERINFO;
//! no punching — each client from its own loopback address (127.x.y.z: Linux routes all of 127/8
//! to `lo`), optionally mixed with abuse: silent TCP connections, garbage TCP connections and
//! garbage datagrams to the server's UDP port, spread over the run. It can also hold N *waiting*
//! clients (a HELLO with a unique identifier, then nothing) before and during the pairs.
//!
//! At the end it checks that the PEERINFOs form a perfect matching (every client learned the
//! exchange address of exactly one other client, who learned its own; with distinct identifiers,
//! that other client is its own partner) and prints pairs/s, the p50/p99/max pairing latency
//! (HELLO sent → PEERINFO received, per client) and the server's RSS (`/proc/PID/status`) when it
//! knows the server's pid (`--spawn` or `--server-pid`).
//!
//! One thread, one mio poll, nonblocking sockets. Exit status 0 when every pair was matched
//! correctly and every garbage connection was closed by the server, 1 otherwise.
//!
//! ```text
//! cargo build --release -p n4-mio --bin n4 --example loadgen
//! target/release/examples/loadgen --spawn 'target/release/n4 -s -l 17210 -q' \
//!     --server 127.0.0.1:17210 --pairs 50000 --concurrency 500
//! ```
//!
//! The pieces: [`cli`] (the flags), [`generator`] (the generator and its v1 pair clients),
//! [`waiting`] and [`abuse`] (the other traffic it makes), [`run`] (the three phases),
//! [`net`] and [`sender`] (sockets), [`server`] and [`proc`] (the server under test),
//! [`report`] (the verdict and what is printed).

mod abuse;
mod cli;
mod generator;
mod net;
mod proc;
mod report;
mod run;
mod sender;
mod server;
mod waiting;

use clap::Parser;

/// What the generator asks for: far more descriptors than a run needs. Unprivileged, it gets
/// the hard limit.
const OPEN_FILES: u64 = 1 << 20;

fn main() {
    let cli = cli::Cli::parse();
    let fd_limit = n4_mio::raise_fd_limit(OPEN_FILES);
    let shared = cli.shared_ident();
    let child = cli
        .spawn
        .as_deref()
        .map(|cmd| server::spawn(cmd, cli.server_log.as_deref(), cli.server));
    let proc = proc::ProcFiles::of(child.as_ref().map(|c| c.id()).or(cli.server_pid));

    let mut g = generator::Generator::new(cli, shared);
    let measured = run::run(&mut g, proc.as_ref());

    report::print(&g, &measured, fd_limit);
    let ok = report::verdict(&g);
    if let Some(child) = child {
        server::stop(child);
    }
    std::process::exit(if ok { 0 } else { 1 });
}
