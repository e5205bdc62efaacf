//! The command line. Flag names and help texts are what docs/BENCHMARKS.md and docs/SECURITY.md
//! quote: change them there too.

use std::net::SocketAddrV4;

use clap::Parser;
use n4_core::Ident;

/// Load generator for the N4 rendezvous server: K pairs of v1 clients, waiting clients, abuse.
#[derive(Parser, Debug)]
#[command(name = "loadgen", max_term_width = 100)]
pub struct Cli {
    /// Server address (TCP and UDP)
    #[arg(long, default_value = "127.0.0.1:1721")]
    pub server: SocketAddrV4,

    /// Start the server with this command line (split on whitespace), measure its RSS, stop it
    /// at the end (SIGTERM). Example: 'target/release/n4 -s -l 17210 -q'
    #[arg(long, value_name = "CMD")]
    pub spawn: Option<String>,

    /// Append the spawned server's stderr to this file (default: discard)
    #[arg(long, value_name = "FILE", requires = "spawn")]
    pub server_log: Option<String>,

    /// Pid of an already running server, to read its RSS
    #[arg(long, value_name = "PID", conflicts_with = "spawn")]
    pub server_pid: Option<u32>,

    /// Pairs of clients to run
    #[arg(long, default_value_t = 10_000)]
    pub pairs: usize,

    /// Pairs in flight at once
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Start at most this many pairs per second (default: as fast as --concurrency allows)
    #[arg(long)]
    pub rate: Option<f64>,

    /// Every pair uses this identifier (default: a distinct identifier per pair). Pairing is
    /// then first come first served, so only the matching as a whole is checked.
    #[arg(long, value_name = "IDENT")]
    pub ident: Option<String>,

    /// EXCHANGE datagrams each client sends after READY (v1: 3)
    #[arg(long, default_value_t = 3)]
    pub exchanges: u32,

    /// Clients that say HELLO with a unique identifier and wait, opened before the pairs and
    /// held until the end
    #[arg(long, default_value_t = 0)]
    pub waiting: usize,

    /// Silent TCP connections (connect, never send), spread over the run, held until the end
    /// or until the server closes them
    #[arg(long, default_value_t = 0)]
    pub silent: usize,

    /// Garbage TCP connections (connect, send 8..16 bytes that are not a HELLO), spread over
    /// the run; each must be closed by the server
    #[arg(long, default_value_t = 0)]
    pub garbage_conns: usize,

    /// Garbage datagrams to the server's UDP port, spread over the run
    #[arg(long, default_value_t = 0)]
    pub garbage_datagrams: usize,

    /// Second octet of the first client address (clients use 127.N.0.1 upwards; abuse and
    /// waiting clients use 127.200 and up)
    #[arg(long, default_value_t = 1)]
    pub ip_base: u8,

    /// Give up on the pairs after this many seconds
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,

    /// After the pairs, wait this long for the server to close the garbage connections
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,

    /// With --waiting: wait this long after the last HELLO before reading the server's RSS
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,

    /// Retry a refused connection (a v1 server closes its listener between pairs) after this
    /// many milliseconds, up to 1000 times per client
    #[arg(long, default_value_t = 1.0)]
    pub retry_ms: f64,

    /// Also retry a connection closed or reset before READY: a v1 server resets the
    /// connections queued on its listener when it closes it after each pair
    #[arg(long)]
    pub retry_closed: bool,

    /// Each client sends its EXCHANGEs from a UDP socket of its own (v1's way; slower) instead
    /// of the shared sender (one port, the client's own source address, batched)
    #[arg(long)]
    pub udp_per_client: bool,

    /// Also print the result as one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// The identifier every pair uses (`--ident`), or `None` for a distinct one per pair. A bad
    /// one ends the program with status 2, as a bad flag.
    pub fn shared_ident(&self) -> Option<Ident> {
        self.ident.as_deref().map(|s| {
            Ident::new(s).unwrap_or_else(|e| {
                eprintln!("--ident {s:?}: {e}");
                std::process::exit(2)
            })
        })
    }
}
