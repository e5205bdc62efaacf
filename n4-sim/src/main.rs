//! `n4-sim`: run one simulated N4 session and print its trace, or sweep a grid of scenarios
//! and write a table, a CSV and an SVG plot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
mod sweep;

use n4_sim::{
    parse_strategy, ClientSpec, NatKind, NatSpec, ScenarioFile, Sim, SimOptions, Strategy,
    TraceLevel,
};
use sweep::{parse_list, Grid, XAxis};

#[derive(Parser)]
#[command(
    name = "n4-sim",
    version,
    about = "Deterministic simulator of N4 hole punching behind port-incrementing NATs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario and print its trace.
    Run(RunArgs),
    /// Run a grid of scenarios over many seeds; print a table, write CSV and SVG.
    Sweep(SweepArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Scenario file (TOML, or JSON if it ends in .json); flags below override it.
    #[arg(long)]
    file: Option<PathBuf>,
    /// RNG seed.
    #[arg(long)]
    seed: Option<u64>,
    /// RTT between any two of server, A and B, in ms.
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// End-to-end loss on every path, 0–1.
    #[arg(long)]
    loss: Option<f64>,
    /// Up to this much extra delay on every path, in ms.
    #[arg(long)]
    jitter_ms: Option<f64>,
    /// Background flows per second per NAT.
    #[arg(long)]
    lambda: Option<f64>,
    /// NAT kind on both sides: seq, seq-down, random, preserving, cone, full-cone, blocks.
    #[arg(long)]
    nat: Option<NatKind>,
    /// Peer port offset (`-o`).
    #[arg(long, allow_hyphen_values = true)]
    offset: Option<i32>,
    /// Port slots per round (`-n`).
    #[arg(long)]
    count: Option<u16>,
    /// First local port (`-b`; 0 = ephemeral).
    #[arg(long)]
    port_start: Option<u16>,
    /// Client strategy: v1, predict.
    #[arg(long, value_parser = parse_strategy)]
    strategy: Option<Strategy>,
    /// Rounds before a client gives up.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Virtual time limit in seconds.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// Run until both clients finished their acknowledgement burst.
    #[arg(long)]
    finished: bool,
    /// Put host B behind site A's NAT, next to host A (two clients behind one NAT).
    #[arg(long)]
    one_nat: bool,
    /// The NATs turn datagrams to their own public IP back inwards (hairpinning).
    #[arg(long)]
    hairpin: bool,
    /// Also trace every dropped or lost datagram.
    #[arg(long)]
    packets: bool,
    /// Print the seed README's port tables for the last round of each client.
    #[arg(long)]
    table: bool,
    /// Write the trace here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SweepArgs {
    /// Base scenario file; the grid's axes override it.
    #[arg(long)]
    file: Option<PathBuf>,
    /// λ values: a list `0,200,400` or a range `0:600:50`.
    #[arg(long, default_value = "0")]
    lambda: String,
    /// RTT values in ms.
    #[arg(long, default_value = "50")]
    rtt_ms: String,
    /// Offsets.
    #[arg(long, default_value = "20", allow_hyphen_values = true)]
    offset: String,
    /// Counts.
    #[arg(long, default_value = "25")]
    count: String,
    /// Loss values.
    #[arg(long, default_value = "0")]
    loss: String,
    /// NAT kinds, comma-separated; `a/b` puts kind a at site A and b at site B (e.g. random/preserving).
    #[arg(long, default_value = "seq")]
    nat: String,
    /// Strategies, comma-separated.
    #[arg(long, default_value = "v1")]
    strategy: String,
    /// Runs per grid point.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Seed of each point's first run.
    #[arg(long, default_value_t = 0)]
    seed_base: u64,
    /// Rounds before a client gives up (0 = as the base scenario says).
    #[arg(long, default_value_t = 1)]
    max_rounds: u32,
    /// Virtual time limit per run, in seconds.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// Put host B behind site A's NAT, next to host A (two clients behind one NAT).
    #[arg(long)]
    one_nat: bool,
    /// The NATs turn datagrams to their own public IP back inwards (hairpinning).
    #[arg(long)]
    hairpin: bool,
    /// Write the table as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The plot's x axis (lambda, rtt, offset, count, loss); default: the longest axis.
    #[arg(long)]
    x: Option<XAxis>,
    /// Plot title.
    #[arg(long)]
    title: Option<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Run(a) => run(a),
        Cmd::Sweep(a) => sweep(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("n4-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn load(file: &Option<PathBuf>) -> Result<ScenarioFile, Box<dyn std::error::Error>> {
    Ok(match file {
        Some(p) => ScenarioFile::load(p)?,
        None => ScenarioFile::default(),
    })
}

fn run(a: RunArgs) -> Res {
    let mut f = load(&a.file)?;
    f.seed = a.seed.or(f.seed);
    f.rtt_ms = a.rtt_ms.or(f.rtt_ms);
    f.loss = a.loss.or(f.loss);
    f.jitter_ms = a.jitter_ms.or(f.jitter_ms);
    f.time_limit_s = a.time_limit_s.or(f.time_limit_s);
    if let Some(s) = a.strategy {
        f.strategy = Some(s.name().into());
    }
    if a.finished {
        f.stop = Some("finished".into());
    }
    if a.one_nat {
        f.one_nat = Some(true);
    }
    let nat = f.nat.get_or_insert_with(NatSpec::default);
    if a.hairpin {
        nat.hairpin = Some(true);
    }
    if let Some(k) = a.nat {
        nat.kind = Some(k.name().into());
    }
    nat.lambda = a.lambda.or(nat.lambda);
    let c = f.client.get_or_insert_with(ClientSpec::default);
    c.offset = a.offset.or(c.offset);
    c.count = a.count.or(c.count);
    c.port_start = a.port_start.or(c.port_start);
    c.max_rounds = a.max_rounds.or(c.max_rounds);

    let scenario = f.to_scenario()?;
    let level = if a.packets {
        TraceLevel::Packets
    } else {
        TraceLevel::Events
    };
    let mut sim = Sim::new(
        &scenario,
        SimOptions {
            trace: Some(level),
            record_mappings: true,
        },
    )?;
    let outcome = sim.run();
    let mut text = sim.trace().to_owned();
    if a.table {
        for (i, name) in ["A", "B"].iter().enumerate() {
            text += &format!("\nclient {name}:\n{}", sim.punch_table(i));
        }
    }
    text += &format!(
        "\nresult: {}\n",
        match outcome.time_to_win() {
            Some(t) => format!(
                "WIN (both) after {:.1} ms, {} rounds, {} datagrams",
                t.as_secs_f64() * 1000.0,
                outcome.rounds(),
                outcome.datagrams()
            ),
            None => format!(
                "no WIN for both (A {}, B {}) after {} rounds",
                if outcome.clients[0].won {
                    "won"
                } else {
                    "lost"
                },
                if outcome.clients[1].won {
                    "won"
                } else {
                    "lost"
                },
                outcome.rounds()
            ),
        }
    );
    match &a.out {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Res {
    let names = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    };
    let grid = Grid {
        lambda: parse_list(&a.lambda).map_err(|e| format!("--lambda: {e}"))?,
        rtt_ms: parse_list(&a.rtt_ms).map_err(|e| format!("--rtt-ms: {e}"))?,
        offset: parse_list(&a.offset).map_err(|e| format!("--offset: {e}"))?,
        count: parse_list(&a.count).map_err(|e| format!("--count: {e}"))?,
        loss: parse_list(&a.loss).map_err(|e| format!("--loss: {e}"))?,
        nat: names(&a.nat)
            .iter()
            .map(|n| n.parse())
            .collect::<Result<_, _>>()?,
        strategy: names(&a.strategy)
            .iter()
            .map(|n| parse_strategy(n))
            .collect::<Result<_, _>>()?,
        seeds: a.seeds,
        seed_base: a.seed_base,
    };
    if grid.nat.is_empty() || grid.strategy.is_empty() {
        return Err("--nat and --strategy need at least one value".into());
    }
    let mut f = load(&a.file)?;
    if a.one_nat {
        f.one_nat = Some(true);
    }
    if a.hairpin {
        f.nat.get_or_insert_with(NatSpec::default).hairpin = Some(true);
    }
    let mut base = f.to_scenario()?;
    if a.max_rounds > 0 {
        base = base.map_clients(|c| c.max_rounds = Some(a.max_rounds));
    }
    if let Some(t) = a.time_limit_s {
        base.time_limit = std::time::Duration::from_secs_f64(t);
    }
    let total = grid.runs();
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} runs, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let results = sweep::run_grid(&grid, &base, a.jobs, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    print!("{}", sweep::table(&results));
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!(
        "{total} runs in {secs:.2} s ({:.0} runs/s)",
        total as f64 / secs.max(1e-9)
    );
    if let Some(p) = &a.csv {
        sweep::write_csv(&results, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &a.svg {
        let x = a.x.unwrap_or_else(|| XAxis::widest(&grid));
        let title = a.title.clone().unwrap_or_else(|| {
            format!(
                "N4 simulation: {} seeds per point, max {} round(s)",
                grid.seeds, a.max_rounds
            )
        });
        sweep::plot_svg(&results, x, &title, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
