//! Sweeps: run a grid of scenarios (λ, RTT, offset, count, loss, NAT kind, strategy) over many
//! seeds each, aggregate success rate and time-to-WIN per grid point, and write a table, a CSV
//! and an SVG plot.
//!
//! Every grid point uses the same seeds (`seed_base + k`), so points are compared on common
//! random numbers and a sweep is as reproducible as a single run.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;
use serde::Serialize;

use n4_sim::{run, NatConfig, NatKind, NatPair, Outcome, Scenario, ScenarioError, Strategy};

/// The axes of a sweep. Each list must be non-empty; the grid is their cross product.
#[derive(Clone, Debug)]
pub struct Grid {
    /// Background flows per second per NAT.
    pub lambda: Vec<f64>,
    /// RTT in ms between any two of server, A and B.
    pub rtt_ms: Vec<f64>,
    /// Peer port offset.
    pub offset: Vec<i32>,
    /// Port slots per round.
    pub count: Vec<u16>,
    /// End-to-end loss per path.
    pub loss: Vec<f64>,
    /// NAT kind (both sides).
    pub nat: Vec<NatPair>,
    /// Client strategy (both sides).
    pub strategy: Vec<Strategy>,
    /// Runs per grid point.
    pub seeds: u64,
    /// Seed of the first run; run `k` uses `seed_base + k`.
    pub seed_base: u64,
}

impl Default for Grid {
    /// One point: λ 0, 50 ms, offset 20, count 25, no loss, `seq`, `v1`, 20 seeds.
    fn default() -> Self {
        Self {
            lambda: vec![0.0],
            rtt_ms: vec![50.0],
            offset: vec![20],
            count: vec![25],
            loss: vec![0.0],
            nat: vec![NatPair::both(NatKind::Seq)],
            strategy: vec![Strategy::V1],
            seeds: 20,
            seed_base: 0,
        }
    }
}

/// One grid point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Background flows per second per NAT.
    pub lambda: f64,
    /// RTT in ms.
    pub rtt_ms: f64,
    /// Peer port offset.
    pub offset: i32,
    /// Port slots per round.
    pub count: u16,
    /// End-to-end loss.
    pub loss: f64,
    /// NAT kinds of site A and site B.
    pub nat: NatPair,
    /// Strategy.
    pub strategy: Strategy,
}

/// The aggregate of one grid point over its seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct PointResult {
    /// The point.
    pub point: Point,
    /// Runs.
    pub runs: u64,
    /// Runs in which both clients won.
    pub wins: u64,
    /// Median time-to-WIN (the later client's) over the winning runs.
    pub median: Option<Duration>,
    /// 90th percentile of the same.
    pub p90: Option<Duration>,
    /// Mean rounds of the winning runs.
    pub mean_rounds: Option<f64>,
    /// Mean UDP datagrams sent per run (both clients).
    pub mean_datagrams: f64,
}

impl PointResult {
    /// Fraction of runs won by both clients.
    pub fn success(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.wins as f64 / self.runs as f64
        }
    }
}

impl Grid {
    /// Every point, in a fixed order (strategy, NAT, loss, count, offset, RTT, λ; λ fastest).
    pub fn points(&self) -> Vec<Point> {
        let mut out = Vec::new();
        for &strategy in &self.strategy {
            for &nat in &self.nat {
                for &loss in &self.loss {
                    for &count in &self.count {
                        for &offset in &self.offset {
                            for &rtt_ms in &self.rtt_ms {
                                for &lambda in &self.lambda {
                                    out.push(Point {
                                        lambda,
                                        rtt_ms,
                                        offset,
                                        count,
                                        loss,
                                        nat,
                                        strategy,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Total runs.
    pub fn runs(&self) -> u64 {
        self.points().len() as u64 * self.seeds
    }
}

impl Point {
    /// The scenario of this point for one seed, built on `base` (whose NAT lifetime,
    /// background kind, links and client timing are kept).
    pub fn scenario(&self, base: &Scenario, seed: u64) -> Scenario {
        let mut s = base
            .clone()
            .with_rtt(Duration::from_secs_f64(self.rtt_ms / 1000.0))
            .with_loss(self.loss);
        s.seed = seed;
        for (site, kind) in s.sites.iter_mut().zip([self.nat.a, self.nat.b]) {
            let keep = site.nat;
            site.nat = NatConfig {
                lifetime: keep.lifetime,
                background: keep.background,
                port_range: keep.port_range,
                hairpin: keep.hairpin,
                background_rate: self.lambda,
                ..kind.config()
            };
            site.client.peer_port_offset = self.offset;
            site.client.port_count = self.count;
            site.client.strategy = self.strategy;
        }
        s
    }

    /// Runs this point over `seeds` seeds from `seed_base`; `tick` is called after each run.
    pub fn run(
        &self,
        base: &Scenario,
        seed_base: u64,
        seeds: u64,
        mut tick: impl FnMut(),
    ) -> Result<PointResult, ScenarioError> {
        let mut times = Vec::with_capacity(seeds as usize);
        let (mut rounds, mut datagrams) = (0u64, 0u64);
        for k in 0..seeds {
            let o: Outcome = run(&self.scenario(base, seed_base.wrapping_add(k)))?;
            datagrams += o.datagrams();
            if let (true, Some(t)) = (o.won(), o.time_to_win()) {
                times.push(t);
                rounds += u64::from(o.rounds());
            }
            tick();
        }
        times.sort();
        let pick = |q: f64| {
            (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * q).round() as usize])
        };
        Ok(PointResult {
            point: *self,
            runs: seeds,
            wins: times.len() as u64,
            median: pick(0.5),
            p90: pick(0.9),
            mean_rounds: (!times.is_empty()).then(|| rounds as f64 / times.len() as f64),
            mean_datagrams: if seeds == 0 {
                0.0
            } else {
                datagrams as f64 / seeds as f64
            },
        })
    }
}

/// Runs the whole grid on `jobs` threads (points are shared out; results keep grid order).
pub fn run_grid(
    grid: &Grid,
    base: &Scenario,
    jobs: usize,
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<PointResult>, ScenarioError> {
    let points = grid.points();
    let jobs = jobs.clamp(1, points.len().max(1));
    let mut results: Vec<Option<Result<PointResult, ScenarioError>>> = vec![None; points.len()];
    std::thread::scope(|scope| {
        let chunks: Vec<_> = results.chunks_mut(points.len().div_ceil(jobs)).collect();
        let per = points.len().div_ceil(jobs);
        for (c, chunk) in chunks.into_iter().enumerate() {
            let points = &points[c * per..];
            scope.spawn(move || {
                for (slot, p) in chunk.iter_mut().zip(points) {
                    *slot = Some(p.run(base, grid.seed_base, grid.seeds, tick));
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every point ran"))
        .collect()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

/// A fixed-width table, one line per point.
pub fn table(results: &[PointResult]) -> String {
    let mut out = format!(
        "{:>7} {:>6} {:>6} {:>5} {:>5} {:>10} {:>8} {:>5} {:>8} {:>9} {:>9} {:>6} {:>9}\n",
        "lambda",
        "rtt_ms",
        "offset",
        "count",
        "loss",
        "nat",
        "strategy",
        "runs",
        "success",
        "median_ms",
        "p90_ms",
        "rounds",
        "datagrams"
    );
    for r in results {
        let p = &r.point;
        out += &format!(
            "{:>7} {:>6} {:>6} {:>5} {:>5} {:>10} {:>8} {:>5} {:>7.1}% {:>9} {:>9} {:>6} {:>9.0}\n",
            p.lambda,
            p.rtt_ms,
            p.offset,
            p.count,
            p.loss,
            p.nat.name(),
            p.strategy.name(),
            r.runs,
            r.success() * 100.0,
            ms(r.median),
            ms(r.p90),
            r.mean_rounds.map_or("-".into(), |x| format!("{x:.2}")),
            r.mean_datagrams
        );
    }
    out
}

#[derive(Serialize)]
struct CsvRow<'a> {
    lambda: f64,
    rtt_ms: f64,
    offset: i32,
    count: u16,
    loss: f64,
    nat: String,
    strategy: &'a str,
    runs: u64,
    wins: u64,
    success: f64,
    median_ms: Option<f64>,
    p90_ms: Option<f64>,
    mean_rounds: Option<f64>,
    mean_datagrams: f64,
}

/// Writes one CSV row per point.
pub fn write_csv(results: &[PointResult], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut w = csv::Writer::from_path(path)?;
    for r in results {
        let p = &r.point;
        w.serialize(CsvRow {
            lambda: p.lambda,
            rtt_ms: p.rtt_ms,
            offset: p.offset,
            count: p.count,
            loss: p.loss,
            nat: p.nat.name(),
            strategy: p.strategy.name(),
            runs: r.runs,
            wins: r.wins,
            success: r.success(),
            median_ms: r.median.map(|d| d.as_secs_f64() * 1000.0),
            p90_ms: r.p90.map(|d| d.as_secs_f64() * 1000.0),
            mean_rounds: r.mean_rounds,
            mean_datagrams: r.mean_datagrams,
        })?;
    }
    w.flush()?;
    Ok(())
}

/// The axis a plot puts on x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// λ.
    Lambda,
    /// RTT.
    Rtt,
    /// Offset.
    Offset,
    /// Count.
    Count,
    /// Loss.
    Loss,
}

impl std::str::FromStr for XAxis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "lambda" => XAxis::Lambda,
            "rtt" | "rtt_ms" => XAxis::Rtt,
            "offset" => XAxis::Offset,
            "count" => XAxis::Count,
            "loss" => XAxis::Loss,
            _ => {
                return Err(format!(
                    "unknown axis '{s}' (lambda, rtt, offset, count, loss)"
                ))
            }
        })
    }
}

impl XAxis {
    fn value(self, p: &Point) -> f64 {
        match self {
            XAxis::Lambda => p.lambda,
            XAxis::Rtt => p.rtt_ms,
            XAxis::Offset => f64::from(p.offset),
            XAxis::Count => f64::from(p.count),
            XAxis::Loss => p.loss,
        }
    }

    fn label(self) -> &'static str {
        match self {
            XAxis::Lambda => "background flows per second per NAT (λ)",
            XAxis::Rtt => "RTT (ms)",
            XAxis::Offset => "peer port offset",
            XAxis::Count => "port count",
            XAxis::Loss => "loss",
        }
    }

    /// The axis with the most distinct values in the grid.
    pub fn widest(grid: &Grid) -> XAxis {
        let lens = [
            (grid.lambda.len(), XAxis::Lambda),
            (grid.rtt_ms.len(), XAxis::Rtt),
            (grid.offset.len(), XAxis::Offset),
            (grid.count.len(), XAxis::Count),
            (grid.loss.len(), XAxis::Loss),
        ];
        lens.iter()
            .max_by_key(|(n, _)| *n)
            .map_or(XAxis::Lambda, |&(_, a)| a)
    }
}

/// The label of a point's series: the values of every axis but `x` that vary in the results.
fn series_label(results: &[PointResult], p: &Point, x: XAxis) -> String {
    let varies = |f: &dyn Fn(&Point) -> String| {
        let first = f(&results[0].point);
        results.iter().any(|r| f(&r.point) != first)
    };
    let mut parts = Vec::new();
    type Field<'a> = (XAxis, &'a str, &'a dyn Fn(&Point) -> String);
    let fields: [Field; 5] = [
        (XAxis::Lambda, "λ", &|p| p.lambda.to_string()),
        (XAxis::Rtt, "rtt", &|p| format!("{}ms", p.rtt_ms)),
        (XAxis::Offset, "offset", &|p| p.offset.to_string()),
        (XAxis::Count, "count", &|p| p.count.to_string()),
        (XAxis::Loss, "loss", &|p| p.loss.to_string()),
    ];
    for (axis, name, f) in fields {
        if axis != x && varies(f) {
            parts.push(format!("{name} {}", f(p)));
        }
    }
    if varies(&|p| p.nat.name().to_string()) {
        parts.push(p.nat.name().to_string());
    }
    if varies(&|p| p.strategy.name().to_string()) {
        parts.push(p.strategy.name().to_string());
    }
    if parts.is_empty() {
        "all runs".into()
    } else {
        parts.join(", ")
    }
}

/// Distinct, readable line colours (ColorBrewer "Set1"), then plotters' palette.
fn color(i: usize) -> RGBAColor {
    const SET1: [(u8, u8, u8); 8] = [
        (228, 26, 28),
        (55, 126, 184),
        (77, 175, 74),
        (152, 78, 163),
        (255, 127, 0),
        (166, 86, 40),
        (247, 129, 191),
        (90, 90, 90),
    ];
    match SET1.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b).to_rgba(),
        None => Palette99::pick(i).to_rgba(),
    }
}

/// Draws success rate (top) and median time-to-WIN (bottom) against `x`, a line per series.
pub fn plot_svg(
    results: &[PointResult],
    x: XAxis,
    title: &str,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    if results.is_empty() {
        return Err("nothing to plot".into());
    }
    // Series in first-seen order.
    let mut series: Vec<(String, Vec<&PointResult>)> = Vec::new();
    for r in results {
        let label = series_label(results, &r.point, x);
        match series.iter_mut().find(|(l, _)| *l == label) {
            Some((_, v)) => v.push(r),
            None => series.push((label, vec![r])),
        }
    }
    let xs = results.iter().map(|r| x.value(&r.point));
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let x_hi = if x_hi > x_lo { x_hi } else { x_lo + 1.0 };
    let t_hi = results
        .iter()
        .filter_map(|r| r.median)
        .max()
        .map_or(1.0, |d| d.as_secs_f64() * 1000.0 * 1.1)
        .max(1.0);

    let root = SVGBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (top, bottom) = root.split_vertically(360);

    let mut c = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_lo..x_hi, 0.0..100.0)?;
    let x_fmt = |v: &f64| match x {
        XAxis::Loss => format!("{v:.2}"),
        _ => format!("{v:.0}"),
    };
    c.configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x.label())
        .x_label_formatter(&x_fmt)
        .y_desc("both WIN (%)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (label, rs)) in series.iter().enumerate() {
        let color = color(i);
        let pts: Vec<(f64, f64)> = rs
            .iter()
            .map(|r| (x.value(&r.point), r.success() * 100.0))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;

    let mut c = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_lo..x_hi, 0.0..t_hi)?;
    c.configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x.label())
        .x_label_formatter(&x_fmt)
        .y_desc("median time to WIN (ms)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (_, rs)) in series.iter().enumerate() {
        let color = color(i);
        let pts: Vec<(f64, f64)> = rs
            .iter()
            .filter_map(|r| Some((x.value(&r.point), r.median?.as_secs_f64() * 1000.0)))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    root.present()?;
    Ok(())
}

/// A number a sweep axis is made of.
pub trait AxisValue: std::str::FromStr + Copy {
    /// As a float, for ranges.
    fn to_f64(self) -> f64;
    /// Back from a float; `None` if it does not fit.
    fn from_f64(v: f64) -> Option<Self>;
}

impl AxisValue for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Option<Self> {
        // Round away binary noise from `lo + step * k`.
        Some((v * 1e9).round() / 1e9)
    }
}

macro_rules! int_axis {
    ($($t:ty),*) => {$(
        impl AxisValue for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Option<Self> {
                let r = v.round();
                ((r - v).abs() < 1e-9 && r >= <$t>::MIN as f64 && r <= <$t>::MAX as f64)
                    .then_some(r as $t)
            }
        }
    )*};
}
int_axis!(i32, u16, u64);

/// Parses a list like `0,100,200` or a range `0:600:50` (inclusive), or a mix of both.
pub fn parse_list<T: AxisValue>(s: &str) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let one = |x: &str| {
            x.parse::<T>()
                .map_err(|_| format!("'{x}' is not a valid value"))
        };
        match item.split(':').collect::<Vec<_>>().as_slice() {
            [v] => out.push(one(v)?),
            [lo, hi, step] => {
                let (lo, hi, step) = (one(lo)?.to_f64(), one(hi)?.to_f64(), one(step)?.to_f64());
                if step <= 0.0 {
                    return Err(format!("range '{item}' needs a positive step"));
                }
                let n = ((hi - lo) / step + 1e-9).floor();
                if !(0.0..=100_000.0).contains(&n) {
                    return Err(format!("range '{item}' is empty or too long"));
                }
                for k in 0..=(n as u64) {
                    let v = T::from_f64(lo + step * k as f64)
                        .ok_or_else(|| format!("bad range '{item}'"))?;
                    out.push(v);
                }
            }
            _ => return Err(format!("'{item}' is neither a value nor lo:hi:step")),
        }
    }
    if out.is_empty() {
        return Err("empty list".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges_parse() {
        assert_eq!(parse_list::<i32>("0,5:15:5").unwrap(), vec![0, 5, 10, 15]);
        assert_eq!(parse_list::<f64>("0:0.2:0.1").unwrap().len(), 3);
        assert_eq!(parse_list::<u16>("-1").ok(), None);
        assert!(parse_list::<i32>("3:1:1").is_err());
    }
}
