//! `n4`: UDP hole punching between two hosts behind port-incrementing NATs — a drop-in for the
//! original `n4.py` (same flags, defaults, wire protocol and log lines), and more.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::{ArgAction, Parser};
use n4_core::{ClientConfig, Ident, Key, ServerConfig, Strategy};
use n4_mio::{
    exit, init_logging, run_link, run_probe, run_server, AfterWin, ClientOptions, ClientOutcome,
    Error, ProbeOptions, ServerOptions, WireGuardOptions,
};
use tracing::{error, Level};

const AFTER_HELP: &str = "\
Examples:
  n4 -s                              server on TCP+UDP port 1721
  n4 probe -h 192.0.2.2              what does my NAT do? (mapping, filtering, port allocation)
  n4 -c -h 192.0.2.2                 client: punch, print [ WIN ] and the nc line, exit
  n4 -c -h 192.0.2.2 --json          ... and print the result as one JSON object on stdout
  n4 -c -h 192.0.2.2 --key-file k   only a partner holding the key k (N4_KEY works too)
  n4 -c -h 192.0.2.2 --key-file k --wg wg0
                                     a lasting WireGuard link, punched again when it dies
  n4 -c -h 192.0.2.2 --forward 127.0.0.1:51820
                                     keep the hole and relay it to a local UDP program

Identifier: v1's server served only its -a identifier (default n4n4n4). This server serves
any identifier, one room per identifier, unless -a is given: then only that one.

Keys: --key-file FILE (or N4_KEY=the key itself) on both clients pairs only holders of the
key, authenticated through the server; on the server it serves only them.

Every flag can also come from its environment variable (shown as [env: N4_...]).

Exit codes:
  0    WIN (client); clean stop on Ctrl-C/SIGTERM (server, or client after WIN)
  1    gave up: --rounds or --timeout passed without WIN, or a NAT pair unlikely to punch
  2    bad flags or flag values
  3    network error: server unreachable, port in use, host not resolved; the server refused
       our key or cannot serve a keyed session; the WireGuard interface cannot be used
  130  stopped by Ctrl-C/SIGTERM before WIN";

/// UDP hole punching between two hosts behind port-incrementing NATs (NAT4 <-> NAT4).
#[derive(Parser, Debug)]
#[command(
    name = "n4",
    version,
    disable_help_flag = true,
    after_help = AFTER_HELP,
    max_term_width = 100
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Print help (-h is the server host, as in the original)
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,

    /// Identifier, at most 6 ASCII characters [default: n4n4n4; server: any]
    #[arg(short = 'a', long = "ident", value_name = "IDENT", env = "N4_IDENT")]
    ident: Option<String>,

    /// Log more (-v: debug, -vv: trace); RUST_LOG overrides
    #[arg(short = 'v', long, action = ArgAction::Count, global = true)]
    verbose: u8,

    /// Log only warnings and errors
    #[arg(short = 'q', long, conflicts_with = "verbose", global = true)]
    quiet: bool,

    /// Run in server mode
    #[arg(
        short = 's',
        long,
        help_heading = "Server",
        conflicts_with = "client",
        env = "N4_SERVER",
        value_parser = FalseyValueParser::new()
    )]
    server: bool,

    /// TCP and UDP port to listen on (UDP PORT+1 answers probes)
    #[arg(
        short = 'l',
        long,
        value_name = "PORT",
        default_value_t = 1721,
        help_heading = "Server",
        env = "N4_LISTEN"
    )]
    listen: u16,

    /// A connection must say HELLO within this
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        help_heading = "Server",
        env = "N4_HELLO_TIMEOUT"
    )]
    hello_timeout: f64,

    /// A seated client waits this long for a partner, then its seat is freed (our clients
    /// say HELLO again by themselves)
    #[arg(
        long,
        value_name = "SECS",
        default_value = "60",
        help_heading = "Server",
        env = "N4_WAIT_TIMEOUT"
    )]
    wait_timeout: f64,

    /// After READY, both EXCHANGEs must arrive within this
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        help_heading = "Server",
        env = "N4_EXCHANGE_TIMEOUT"
    )]
    exchange_timeout: f64,

    /// Open connections in all
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100_000,
        help_heading = "Server",
        env = "N4_MAX_CONNS"
    )]
    max_conns: usize,

    /// Open connections from one IP address
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        help_heading = "Server",
        env = "N4_MAX_PER_IP"
    )]
    max_per_ip: usize,

    /// Clients from one IP address waiting for a partner at once
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        help_heading = "Server",
        env = "N4_MAX_WAITING_PER_IP"
    )]
    max_waiting_per_ip: usize,

    /// Probe answers per second to one IP address
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50,
        help_heading = "Server",
        env = "N4_PROBE_RATE"
    )]
    probe_rate: u32,

    /// Pure v1: no token in READY (server); no probes, fixed offset (client)
    #[arg(long, env = "N4_NO_EXT",
        value_parser = FalseyValueParser::new())]
    no_ext: bool,

    /// Shared key, read from FILE (the environment variable N4_KEY holds it instead; never
    /// put a secret on the command line). Client: pair only with a partner holding it,
    /// authenticated through the server, and punch with authenticated datagrams. Server: a
    /// private server, serving only clients holding it
    #[arg(long, value_name = "FILE", env = "N4_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,

    /// Run in client mode
    #[arg(short = 'c', long, help_heading = "Client", env = "N4_CLIENT",
        value_parser = FalseyValueParser::new())]
    client: bool,

    /// Hostname of the N4 server (required with -c)
    #[arg(
        short = 'h',
        long,
        value_name = "HOST",
        help_heading = "Client",
        env = "N4_HOST"
    )]
    host: Option<String>,

    /// Port of the N4 server
    #[arg(
        short = 'p',
        long,
        value_name = "PORT",
        default_value_t = 1721,
        help_heading = "Client",
        env = "N4_PORT"
    )]
    port: u16,

    /// Source port start (0: ephemeral ports)
    #[arg(
        short = 'b',
        long,
        value_name = "PORT",
        default_value_t = 30000,
        help_heading = "Client",
        env = "N4_START"
    )]
    start: u16,

    /// Source port count (with the extension at least 64 ports are opened)
    #[arg(
        short = 'n',
        long,
        value_name = "COUNT",
        default_value_t = 25,
        help_heading = "Client",
        env = "N4_COUNT"
    )]
    count: u16,

    /// Peer port offset
    #[arg(
        short = 'o',
        long,
        value_name = "OFFSET",
        default_value_t = 20,
        allow_negative_numbers = true,
        help_heading = "Client",
        env = "N4_OFFSET"
    )]
    offset: i32,

    /// Accept the peer's punch from any IP, not only the server-given one
    #[arg(short = 'x', long, help_heading = "Client", env = "N4_ANY_IP",
        value_parser = FalseyValueParser::new())]
    any_ip: bool,

    /// Give up after N rounds (exit 1) [default: never]
    #[arg(long, value_name = "N", help_heading = "Client", env = "N4_ROUNDS")]
    rounds: Option<u32>,

    /// Give up (exit 1) when no WIN came within SECS of the start, waiting for a partner
    /// included [default: never]
    #[arg(long, value_name = "SECS", help_heading = "Client", env = "N4_TIMEOUT")]
    timeout: Option<f64>,

    /// How long a round waits for the peer's punch (at least 0.5)
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        help_heading = "Client",
        env = "N4_ROUND_TIMEOUT"
    )]
    round_timeout: f64,

    /// On WIN, print the result as one JSON object on stdout
    #[arg(long, help_heading = "Client", env = "N4_JSON",
        value_parser = FalseyValueParser::new())]
    json: bool,

    /// After WIN, keep the hole open: a keepalive every SECS [15, at least 1] until Ctrl-C
    #[arg(
        long,
        value_name = "SECS",
        num_args = 0..=1,
        default_missing_value = "15",
        help_heading = "Client", env = "N4_KEEPALIVE")]
    keepalive: Option<f64>,

    /// After WIN, relay the hole to/from the local UDP program at HOST:PORT
    #[arg(
        long,
        value_name = "HOST:PORT",
        help_heading = "Client",
        env = "N4_FORWARD"
    )]
    forward: Option<String>,

    /// Address of the relay socket the local program talks to [default: 127.0.0.1:0; only
    /// datagrams from the --forward address are relayed]
    #[arg(
        long,
        value_name = "ADDR:PORT",
        requires = "forward",
        help_heading = "Client",
        env = "N4_FORWARD_BIND"
    )]
    forward_bind: Option<SocketAddr>,

    /// Hand the hole to the WireGuard interface IFACE and keep the link: after each WIN,
    /// set its listen port to the punched port and the peer's endpoint to the punched peer
    /// (with a persistent keepalive), watch the peer, punch again when the hole dies
    #[arg(long, value_name = "IFACE", help_heading = "Lasting link", env = "N4_WG",
        conflicts_with_all = ["forward", "keepalive"])]
    wg: Option<String>,

    /// The peer's WireGuard public key [default: handed over in the keyed handshake]
    #[arg(
        long,
        value_name = "PUBKEY",
        help_heading = "Lasting link",
        env = "N4_WG_PEER",
        requires = "wg"
    )]
    wg_peer: Option<String>,

    /// WireGuard persistent keepalive; 3 silent intervals mean the hole died
    #[arg(
        long,
        value_name = "SECS",
        default_value = "1",
        help_heading = "Lasting link",
        env = "N4_WG_KEEPALIVE"
    )]
    wg_keepalive: f64,

    /// Allowed IPs to set on the WireGuard peer, e.g. 10.44.0.2/32 [default: as configured;
    /// a new peer alone on the interface: 0.0.0.0/0,::/0]
    #[arg(
        long,
        value_name = "CIDRS",
        help_heading = "Lasting link",
        env = "N4_WG_ALLOWED_IPS",
        requires = "wg"
    )]
    wg_allowed_ips: Option<String>,

    /// After each WIN, run CMD (with sh -c): the result JSON on its stdin and in N4_LOCAL_PORT,
    /// N4_PEER, N4_PEER_IP, N4_PEER_PORT, N4_ROUND, N4_ELAPSED_MS, N4_STRATEGY (N4_PEER_WG_KEY,
    /// N4_FORWARD_VIA when known)
    #[arg(
        long,
        value_name = "CMD",
        help_heading = "Lasting link",
        env = "N4_EXEC"
    )]
    exec: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Report what the local NAT does (mapping, filtering, port allocation step, direction and
    /// rate), asked of an n4 server of ours (it answers probes on its port + 1)
    #[command(disable_help_flag = true)]
    Probe {
        /// Print help
        #[arg(long, action = ArgAction::Help)]
        help: Option<bool>,
        /// Hostname of the N4 server (required)
        #[arg(short = 'h', long, value_name = "HOST")]
        host: Option<String>,
        /// Port of the N4 server (probes also go to PORT+1)
        #[arg(short = 'p', long, value_name = "PORT", default_value_t = 1721)]
        port: u16,
        /// Fresh sockets used to measure port allocation
        #[arg(long, value_name = "N", default_value_t = 10)]
        samples: u16,
        /// Print the report as one JSON object on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout
    Man,
}

/// A usage error: one line on stderr, exit 2.
struct Usage(String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first paragraph says what is wrong (a missing argument's name on the
            // lines below the first); its usage and tips follow after a blank line.
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let what = if what.is_empty() {
                "error: bad arguments".to_string()
            } else {
                what.join(" ")
            };
            eprintln!("n4: {what} (see --help)");
            return code(exit::USAGE);
        }
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => Level::WARN,
        (false, 0) => Level::INFO,
        (false, 1) => Level::DEBUG,
        (false, _) => Level::TRACE,
    };
    match run(cli, level) {
        Ok(c) => code(c),
        Err(Failure::Usage(Usage(msg))) => {
            eprintln!("n4: error: {msg}");
            code(exit::USAGE)
        }
        Err(Failure::Network(e)) => {
            error!("{e}");
            code(exit::NETWORK)
        }
    }
}

enum Failure {
    Usage(Usage),
    Network(Error),
}

impl From<Usage> for Failure {
    fn from(u: Usage) -> Self {
        Self::Usage(u)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Network(e)
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(c as u8)
}

fn run(cli: Cli, level: Level) -> Result<i32, Failure> {
    init_logging(level);
    match &cli.command {
        Some(Command::Completions { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "n4", &mut std::io::stdout());
            return Ok(exit::WIN);
        }
        Some(Command::Man) => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                // `n4 man | head`: the reader left; nothing is wrong.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(Usage(format!("man: {e}")).into())
                }
                _ => {}
            }
            return Ok(exit::WIN);
        }
        _ => {}
    }
    if let Some(Command::Probe {
        host,
        port,
        samples,
        json,
        ..
    }) = &cli.command
    {
        let Some(host) = host else {
            return Err(Usage("probe needs the server: n4 probe -h HOST".into()).into());
        };
        if *port == 0 || *port == u16::MAX {
            return Err(Usage(format!(
                "probe -p {port}: the server port must be 1-65534 (probes go to port + 1)"
            ))
            .into());
        }
        if *samples < 2 {
            return Err(Usage(format!("probe --samples {samples}: at least 2 are needed")).into());
        }
        let report = run_probe(&ProbeOptions {
            server: resolve_v4(host, *port)?,
            samples: *samples,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        })?;
        if *json {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report always serializes")
            );
        } else {
            print!("{}", report.to_text());
        }
        return Ok(exit::WIN);
    }
    match (cli.server, cli.client) {
        (true, _) => {
            let options = server_options(&cli)?;
            run_server(options)?;
            Ok(exit::WIN)
        }
        (false, true) => {
            let options = client_options(&cli)?;
            let wireguard = wireguard_options(&cli, &options)?;
            Ok(match run_link(options, wireguard)? {
                ClientOutcome::Won(_) => exit::WIN,
                ClientOutcome::GaveUp { rounds } => {
                    let s = if rounds == 1 { "" } else { "s" };
                    error!("Gave up after {rounds} round{s} without a punch from the peer");
                    exit::GAVE_UP
                }
                ClientOutcome::TimedOut { after, rounds } => {
                    let s = if rounds == 1 { "" } else { "s" };
                    error!(
                        "Timed out: no WIN within {} s (--timeout), {rounds} round{s} started",
                        after.as_secs_f64()
                    );
                    exit::GAVE_UP
                }
                ClientOutcome::Interrupted => exit::INTERRUPTED,
                // run_link punches again; it never hands this back.
                ClientOutcome::HoleDied(_) => exit::GAVE_UP,
            })
        }
        (false, false) => Err(Usage(
            "choose a mode: -s (server) or -c (client), or the subcommand probe (n4 probe -h HOST)"
                .into(),
        )
        .into()),
    }
}

fn ident(cli: &Cli) -> Result<Option<Ident>, Usage> {
    cli.ident
        .as_deref()
        .map(|s| Ident::new(s).map_err(|e| Usage(format!("-a {s:?}: {e}"))))
        .transpose()
}

/// The longest a time flag may say: a year. Deadlines are `now + flag`, and a clock cannot
/// count arbitrarily far ahead (`1e19` seconds overflows it); "forever" is leaving the flag out.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Floors of the time flags: below them a flag only burns datagrams or CPU (a keepalive
/// every 10 ms, a round shorter than a round trip).
const MIN_SECS: f64 = 1.0;
const MIN_ROUND_SECS: f64 = 0.5;

/// A time flag of at least [`MIN_SECS`].
fn secs(flag: &str, v: f64) -> Result<Duration, Usage> {
    secs_from(flag, v, MIN_SECS)
}

fn secs_from(flag: &str, v: f64, min: f64) -> Result<Duration, Usage> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|_| (min..=MAX_SECS).contains(&v))
        .ok_or_else(|| {
            Usage(format!(
                "{flag} {v}: must be a number of seconds, at least {min} and at most {MAX_SECS} (a year)"
            ))
        })
}

fn server_options(cli: &Cli) -> Result<ServerOptions, Usage> {
    if cli.max_conns == 0 || cli.max_per_ip == 0 || cli.max_waiting_per_ip == 0 {
        return Err(Usage(
            "--max-conns, --max-per-ip and --max-waiting-per-ip must be at least 1".into(),
        ));
    }
    if cli.no_ext && (cli.key_file.is_some() || std::env::var_os(KEY_ENV).is_some()) {
        return Err(Usage(
            "a private server (--key-file / N4_KEY) needs the extension; drop --no-ext".into(),
        ));
    }
    if cli.probe_rate == 0 {
        return Err(Usage("--probe-rate must be at least 1".into()));
    }
    let config = ServerConfig {
        key: key(cli)?,
        only_ident: ident(cli)?,
        hello_timeout: secs("--hello-timeout", cli.hello_timeout)?,
        wait_timeout: Some(secs("--wait-timeout", cli.wait_timeout)?),
        exchange_timeout: secs("--exchange-timeout", cli.exchange_timeout)?,
        max_connections: cli.max_conns,
        max_per_ip: cli.max_per_ip,
        max_waiting_per_ip: cli.max_waiting_per_ip,
        probes_per_ip: cli.probe_rate,
        extensions: !cli.no_ext,
        rng_seed: u64::from_le_bytes(random_bytes()),
        ..ServerConfig::default()
    };
    Ok(ServerOptions {
        listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, cli.listen)),
        config,
    })
}

fn client_options(cli: &Cli) -> Result<ClientOptions, Failure> {
    let Some(host) = cli.host.as_deref() else {
        return Err(Usage("client mode needs the server: -h HOST".into()).into());
    };
    if cli.port == 0 {
        return Err(Usage("-p 0: the server port must be 1-65535".into()).into());
    }
    if cli.count == 0 {
        return Err(Usage("-n 0: the source port count must be at least 1".into()).into());
    }
    if cli.offset.unsigned_abs() >= 65535 {
        return Err(Usage(format!(
            "-o {}: peer port + offset would always be outside 1-65535",
            cli.offset
        ))
        .into());
    }
    if cli.rounds == Some(0) {
        return Err(Usage("--rounds 0: at least one round is needed".into()).into());
    }
    let round_timeout = secs_from("--round-timeout", cli.round_timeout, MIN_ROUND_SECS)?;
    let timeout = cli.timeout.map(|v| secs("--timeout", v)).transpose()?;
    let keepalive = cli.keepalive.map(|v| secs("--keepalive", v)).transpose()?;
    let after_win = match (&cli.forward, keepalive) {
        (Some(target), keepalive) => {
            let to = resolve_any(target)
                .map_err(|reason| Usage(format!("--forward {target:?}: {reason}")))?;
            // Loopback unless told otherwise: the relay socket must not be reachable from
            // the network (it sends what it hears through the hole). A program elsewhere
            // cannot be reached from loopback: then the address must be chosen.
            if cli.forward_bind.is_none() && !to.ip().is_loopback() {
                return Err(Usage(format!(
                    "--forward {target}: not on this machine; say where the relay socket \
                     listens with --forward-bind ADDR:PORT (it relays only {to})"
                ))
                .into());
            }
            let bind = cli.forward_bind.unwrap_or_else(|| {
                let ip = match to.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                };
                SocketAddr::new(ip, 0)
            });
            AfterWin::Forward {
                to,
                bind,
                keepalive: keepalive.unwrap_or(Duration::from_secs(15)),
            }
        }
        (None, Some(interval)) => AfterWin::KeepAlive { interval },
        (None, None) => AfterWin::Exit,
    };
    if cli.no_ext && (cli.key_file.is_some() || std::env::var_os(KEY_ENV).is_some()) {
        return Err(
            Usage("a key (--key-file / N4_KEY) needs the extension; drop --no-ext".into()).into(),
        );
    }
    let key = key(cli)?;
    let mut config = ClientConfig {
        key,
        rng_seed: n4_mio::random_seed(),
        ident: ident(cli)?.unwrap_or_default(),
        server: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cli.port),
        port_start: cli.start,
        port_count: cli.count,
        peer_port_offset: cli.offset,
        accept_any_ip: cli.any_ip,
        round_timeout,
        max_rounds: cli.rounds,
        strategy: if cli.no_ext {
            Strategy::V1
        } else {
            Strategy::Predict
        },
        ..ClientConfig::default()
    };
    let slots = config.window_slots();
    let last = u32::from(cli.start) + u32::from(slots) - 1;
    if cli.start != 0 && last > 65535 {
        let why = if slots > cli.count {
            format!(" (the window holds {slots} ports unless --no-ext)")
        } else {
            String::new()
        };
        return Err(Usage(format!(
            "-b {} -n {}: source ports would run to {last}, past 65535{why}",
            cli.start, cli.count
        ))
        .into());
    }
    // Resolve last: a usage error is reported before any network trouble.
    config.server = resolve_v4(host, cli.port)?;
    Ok(ClientOptions {
        config,
        after_win,
        json: cli.json,
        connect_timeout: round_timeout,
        timeout,
        exec: cli.exec.clone(),
    })
}

/// `--wg`: what WireGuard needs (checked before anything starts).
fn wireguard_options(
    cli: &Cli,
    options: &ClientOptions,
) -> Result<Option<WireGuardOptions>, Usage> {
    let Some(iface) = cli.wg.clone() else {
        return Ok(None);
    };
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
        return Err(Usage(format!("--wg {iface:?}: not an interface name")));
    }
    if let Some(peer) = &cli.wg_peer {
        if n4_mio::parse_wg_key(peer).is_none() {
            return Err(Usage(format!(
                "--wg-peer {peer:?}: not a WireGuard public key (44 characters of base64)"
            )));
        }
    } else if options.config.key.is_none() {
        return Err(Usage(
            "--wg needs the peer's WireGuard key: a shared key (--key-file / N4_KEY) hands it \
             over in the handshake, or give it with --wg-peer"
                .into(),
        ));
    }
    Ok(Some(WireGuardOptions {
        iface,
        peer: cli.wg_peer.clone(),
        keepalive: secs("--wg-keepalive", cli.wg_keepalive)?,
        allowed_ips: cli.wg_allowed_ips.clone(),
    }))
}

/// The server's IPv4 address (the v1 wire format carries IPv4 only).
fn resolve_v4(host: &str, port: u16) -> Result<SocketAddrV4, Error> {
    let failed = |reason: String| Error::Resolve {
        host: host.to_string(),
        reason,
    };
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| failed(e.to_string()))?;
    addrs
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| failed("no IPv4 address".into()))
}

fn resolve_any(target: &str) -> Result<SocketAddr, String> {
    let mut addrs = target.to_socket_addrs().map_err(|e| e.to_string())?;
    addrs.next().ok_or_else(|| "no address".into())
}

/// Seed bytes from the operating system's RNG (tokens come from a CSPRNG seeded with them).
fn random_bytes<const N: usize>() -> [u8; N] {
    let seed = n4_mio::random_seed();
    let mut out = [0u8; N];
    out.copy_from_slice(&seed[..N]);
    out
}

/// The environment variable that may hold the key itself.
const KEY_ENV: &str = "N4_KEY";

/// The shared key from `--key-file` or `N4_KEY`, if either is given.
fn key(cli: &Cli) -> Result<Option<Key>, Usage> {
    let from_env = std::env::var_os(KEY_ENV);
    let (secret, source) = match (&cli.key_file, from_env) {
        (Some(_), Some(_)) => {
            return Err(Usage(format!(
                "give the key once: --key-file or {KEY_ENV}, not both"
            )))
        }
        (Some(path), None) => {
            let secret = std::fs::read(path).map_err(|e| {
                Usage(format!(
                    "--key-file {}: cannot read it: {e}",
                    path.display()
                ))
            })?;
            warn_if_others_can_read(path);
            (secret, format!("--key-file {}", path.display()))
        }
        (None, Some(v)) => (v.into_encoded_bytes(), KEY_ENV.to_string()),
        (None, None) => return Ok(None),
    };
    let key = Key::new(&secret).map_err(|e| Usage(format!("{source}: {e}")))?;
    if secret.trim_ascii().len() < 16 {
        tracing::warn!(
            "{source}: the key is shorter than 16 bytes; a longer random one is safer \
             (e.g. `head -c 32 /dev/urandom | base64 > n4.key`)"
        );
    }
    Ok(Some(key))
}

#[cfg(unix)]
fn warn_if_others_can_read(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "--key-file {}: other users may read it (chmod 600 {})",
                path.display(),
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_others_can_read(_path: &std::path::Path) {}
