//! `postcopy lab SPEC.toml`: a grid of real migrations, repeated, with a
//! summary (medians and spread) as CSV and Markdown, and comparison plots.
//!
//! A spec names `migrate` options: `[fixed]` ones given to every run and
//! `[grid]` ones whose values are crossed. For example:
//!
//! ```toml
//! name = "prefetch"
//! repetitions = 3
//! [fixed]
//! mem = "512M"
//! [grid]
//! prefetch = [1, 8, 64]
//! pattern = ["uniform", "sequential"]
//! link = ["loopback", "veth:10gbit:100us"]
//! ```
//!
//! Every cell is checked with `migrate`'s own option parser before the
//! first run starts. Repetitions are interleaved (all cells once, then all
//! again) so that a slow minute on this noisy machine spreads over the cells
//! instead of landing on one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser};

use crate::cmd::MigrateArgs;
use crate::compare::markdown;
use crate::report::Report;

/// `postcopy lab`.
#[derive(Args, Clone, Debug)]
pub struct LabArgs {
    /// The experiment (TOML; see `examples/lab/`).
    pub spec: PathBuf,
    /// Output directory (default: lab-out/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the runs and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Run nothing: summarise and plot the reports already in the output
    /// directory (after an interruption, or to redraw).
    #[arg(long)]
    pub resummarize: bool,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub run_timeout_s: u64,
}

/// Options that the lab sets itself.
const RESERVED: &[&str] = &["report", "quiet", "timeline-csv"];
/// Bounds on a spec, so a typo cannot start a week of runs.
const MAX_CELLS: usize = 512;
const MAX_REPETITIONS: u32 = 100;

/// A parsed experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// Name (default: the file's stem).
    pub name: String,
    /// Runs per cell.
    pub repetitions: u32,
    /// Options given to every run, as (key, value); value "" for a bare flag.
    pub fixed: Vec<(String, String)>,
    /// The grid: each key with its values, in the spec's order.
    pub grid: Vec<(String, Vec<String>)>,
}

/// One cell of the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The grid's (key, value) for this cell.
    pub params: Vec<(String, String)>,
}

impl Cell {
    /// A file-name-safe name, e.g. `prefetch-8_pattern-uniform`.
    pub fn slug(&self) -> String {
        let s: Vec<String> = self.params.iter().map(|(k, v)| format!("{k}-{v}")).collect();
        let s = s.join("_");
        let s: String =
            s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect();
        if s.is_empty() { "all".into() } else { s }
    }

    /// The grid's values, e.g. `8 / uniform` (for legends titled with the keys).
    pub fn values(&self) -> String {
        let s: Vec<&str> = self.params.iter().map(|(_, v)| v.as_str()).collect();
        if s.is_empty() { "all".into() } else { s.join(" / ") }
    }

    /// A label naming what varies.
    pub fn label(&self) -> String {
        let s: Vec<String> = self.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if s.is_empty() { "all".into() } else { s.join(" ") }
    }
}

fn scalar(key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(true) => String::new(),
        toml::Value::Boolean(false) => bail!("{key} = false: leave the option out instead"),
        _ => bail!("{key}: expected a string, number or true"),
    })
}

fn check_key(k: &str) -> Result<()> {
    if RESERVED.contains(&k) {
        bail!("{k}: the lab sets this option itself");
    }
    let ok = k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("{k:?}: not an option name");
    }
    Ok(())
}

impl Spec {
    /// Parse a spec from TOML text; `default_name` when it names none.
    pub fn parse(text: &str, default_name: &str) -> Result<Spec> {
        let t: toml::Table = text.parse().context("not valid TOML")?;
        for k in t.keys() {
            if !["name", "repetitions", "fixed", "grid"].contains(&k.as_str()) {
                bail!("unknown key {k:?} (expected name, repetitions, [fixed], [grid])");
            }
        }
        let name = match t.get("name") {
            None => default_name.to_string(),
            Some(toml::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => bail!("name: expected a non-empty string"),
        };
        let repetitions = match t.get("repetitions") {
            None => 3,
            Some(toml::Value::Integer(n)) if (1..=i64::from(MAX_REPETITIONS)).contains(n) => {
                u32::try_from(*n).expect("checked")
            }
            Some(_) => bail!("repetitions: expected 1..={MAX_REPETITIONS}"),
        };
        let table = |k: &str| -> Result<toml::Table> {
            match t.get(k) {
                None => Ok(toml::Table::new()),
                Some(toml::Value::Table(t)) => Ok(t.clone()),
                Some(_) => bail!("{k}: expected a table"),
            }
        };
        let mut fixed = Vec::new();
        for (k, v) in table("fixed")? {
            check_key(&k)?;
            fixed.push((k.replace('_', "-"), scalar(&k, &v).with_context(|| "in [fixed]")?));
        }
        let mut grid = Vec::new();
        let mut cells = 1usize;
        for (k, v) in table("grid")? {
            check_key(&k)?;
            let toml::Value::Array(a) = v else { bail!("grid.{k}: expected a list of values") };
            if a.is_empty() {
                bail!("grid.{k}: empty list");
            }
            let vals = a.iter().map(|x| scalar(&k, x)).collect::<Result<Vec<_>>>().with_context(|| "in [grid]")?;
            cells = cells.saturating_mul(vals.len());
            let key = k.replace('_', "-");
            if fixed.iter().any(|(f, _)| *f == key) {
                bail!("{key} is both fixed and in the grid");
            }
            grid.push((key, vals));
        }
        if cells > MAX_CELLS {
            bail!("the grid has {cells} cells (at most {MAX_CELLS})");
        }
        Ok(Spec { name, repetitions, fixed, grid })
    }

    /// Read a spec file.
    pub fn read(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let stem = path.file_stem().map_or("lab".into(), |s| s.to_string_lossy().to_string());
        Spec::parse(&text, &stem).with_context(|| format!("in {}", path.display()))
    }

    /// The grid's cells, the first key varying slowest.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = vec![Cell { params: Vec::new() }];
        for (k, vals) in &self.grid {
            cells = cells
                .into_iter()
                .flat_map(|c| {
                    vals.iter().map(move |v| {
                        let mut p = c.params.clone();
                        p.push((k.clone(), v.clone()));
                        Cell { params: p }
                    })
                })
                .collect();
        }
        cells
    }

    /// `migrate`'s arguments for `cell`.
    pub fn args(&self, cell: &Cell) -> Vec<String> {
        let mut a = Vec::new();
        for (k, v) in self.fixed.iter().chain(&cell.params) {
            a.push(format!("--{k}"));
            if !v.is_empty() {
                a.push(v.clone());
            }
        }
        a
    }

    /// Check every cell with `migrate`'s own parser and checks.
    pub fn check(&self) -> Result<()> {
        #[derive(Parser)]
        struct M {
            #[command(flatten)]
            m: MigrateArgs,
        }
        for c in self.cells() {
            let args = self.args(&c);
            let m = M::try_parse_from(std::iter::once("migrate".to_string()).chain(args.iter().cloned()))
                .map_err(|e| anyhow!("cell {}: {}", c.label(), e.render().to_string().trim()))?;
            crate::cmd::check_migrate(&m.m).with_context(|| format!("cell {}", c.label()))?;
        }
        Ok(())
    }
}

/// Median, min and max of some values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Of `v` (all zero when empty).
    pub fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Spread { median, min: s[0], max: s[n - 1] }
    }
}

/// The summary's figures: name, and how to read each off a report.
type Metric = (&'static str, fn(&Report) -> f64);

#[allow(clippy::cast_precision_loss)]
const METRICS: &[Metric] = &[
    ("total_ms", |r| r.total_time_ms),
    ("postcopy_ms", |r| r.postcopy.time_ms),
    ("downtime_ms", |r| r.downtime_ms),
    ("faults", |r| r.postcopy.faults.saturating_sub(r.postcopy.faults_local) as f64),
    ("requests", |r| r.postcopy.requests as f64),
    ("fault_p50_us", |r| r.postcopy.fault_latency_us.p50),
    ("fault_p99_us", |r| r.postcopy.fault_latency_us.p99),
    ("fault_p999_us", |r| r.postcopy.fault_latency_us.p999),
    ("stall_p50_us", |r| r.guest.stall_latency_us.p50),
    ("stall_p99_us", |r| r.guest.stall_latency_us.p99),
    ("blocktime_ms", |r| r.postcopy.blocktime_ms),
    ("push_gbps", |r| r.postcopy.push_gbps),
    ("gb_transferred", |r| r.bytes_transferred as f64 / 1e9),
    ("link_rtt_us", |r| r.link.measured_rtt_us),
    ("link_rtt_idle_us", |r| r.link.measured_rtt_idle_us),
];

/// The summary's Markdown columns (a subset of [`METRICS`]).
const MD_COLUMNS: &[(&str, &str)] = &[
    ("total_ms", "total ms"),
    ("downtime_ms", "downtime ms"),
    ("faults", "faults"),
    ("fault_p50_us", "fault p50 us"),
    ("fault_p99_us", "fault p99 us"),
    ("stall_p99_us", "guest stall p99 us"),
    ("push_gbps", "push GB/s"),
];

/// One cell's results.
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Runs attempted.
    pub runs: usize,
    /// Clean runs' reports.
    pub ok: Vec<Report>,
}

impl CellResult {
    fn spread(&self, name: &str) -> Spread {
        let f = METRICS.iter().find(|m| m.0 == name).expect("a known metric").1;
        Spread::of(&self.ok.iter().map(f).collect::<Vec<_>>())
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// The summary as CSV: grid parameters, runs, clean runs, then median, min
/// and max of every metric.
pub fn summary_csv(spec: &Spec, results: &[CellResult]) -> String {
    let mut out = String::new();
    let mut head: Vec<String> = spec.grid.iter().map(|(k, _)| k.clone()).collect();
    head.extend(["runs".into(), "ok".into()]);
    for (m, _) in METRICS {
        head.extend([format!("{m}_median"), format!("{m}_min"), format!("{m}_max")]);
    }
    let _ = writeln!(out, "{}", head.join(","));
    for r in results {
        let mut row: Vec<String> = r.cell.params.iter().map(|(_, v)| v.clone()).collect();
        row.extend([r.runs.to_string(), r.ok.len().to_string()]);
        for (m, _) in METRICS {
            let s = r.spread(m);
            row.extend([format!("{:.3}", s.median), format!("{:.3}", s.min), format!("{:.3}", s.max)]);
        }
        let _ = writeln!(out, "{}", row.join(","));
    }
    out
}

/// The summary as Markdown: "median (min-max)" per cell.
pub fn summary_md(spec: &Spec, results: &[CellResult]) -> String {
    let mut cells = Vec::new();
    let mut head: Vec<String> = spec.grid.iter().map(|(k, _)| k.clone()).collect();
    head.push("ok".into());
    head.extend(MD_COLUMNS.iter().map(|(_, h)| (*h).to_string()));
    cells.push(head);
    for r in results {
        let mut row: Vec<String> = r.cell.params.iter().map(|(_, v)| v.clone()).collect();
        row.push(format!("{}/{}", r.ok.len(), r.runs));
        for (m, _) in MD_COLUMNS {
            let s = r.spread(m);
            row.push(if r.ok.is_empty() {
                "-".into()
            } else if r.ok.len() == 1 {
                fmt_num(s.median)
            } else {
                format!("{} ({}-{})", fmt_num(s.median), fmt_num(s.min), fmt_num(s.max))
            });
        }
        cells.push(row);
    }
    let fixed: Vec<String> =
        spec.fixed.iter().map(|(k, v)| if v.is_empty() { format!("--{k}") } else { format!("--{k} {v}") }).collect();
    format!(
        "# {}\n\n{} repetitions per cell; median (min-max) over clean runs. Fixed: {}\n\n{}",
        spec.name,
        spec.repetitions,
        if fixed.is_empty() { "none".into() } else { fixed.join(" ") },
        markdown(&cells)
    )
}

/// A cell's runs as one report for plotting: the run with the median total
/// time, with the fault and stall histograms of all its clean runs merged.
fn representative(r: &CellResult) -> Option<Report> {
    let mut ok: Vec<&Report> = r.ok.iter().collect();
    ok.sort_by(|a, b| a.total_time_ms.total_cmp(&b.total_time_ms));
    let mut rep = (*ok.get(ok.len() / 2)?).clone();
    let merge = |get: fn(&Report) -> &Vec<(u64, u64)>| {
        let mut m: BTreeMap<u64, u64> = BTreeMap::new();
        for x in &ok {
            for &(v, n) in get(x) {
                *m.entry(v).or_default() += n;
            }
        }
        m.into_iter().collect::<Vec<_>>()
    };
    rep.postcopy.fault_latency_hist = merge(|r| &r.postcopy.fault_latency_hist);
    rep.guest.stall_latency_hist = merge(|r| &r.guest.stall_latency_hist);
    Some(rep)
}

/// Run `exe migrate` for one run; returns its report if it wrote one.
fn run_one(
    exe: &Path,
    args: &[String],
    report: &Path,
    log: &Path,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Report> {
    // A report left by an earlier lab in this directory must not stand in
    // for this run's.
    let _ = std::fs::remove_file(report);
    let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe)
        .arg("migrate")
        .arg("--quiet")
        .arg("--report")
        .arg(report)
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        // Its own process group: a terminal's Ctrl-C reaches only the lab,
        // which then stops the run with one TERM (a second signal would make
        // `migrate` exit without cleaning up).
        .process_group(0)
        .spawn()
        .context("starting postcopy migrate")?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if stop.load(Ordering::Relaxed) || t0.elapsed() > timeout {
            // TERM first: `migrate` then stops its children and removes its
            // namespaces.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t1 = Instant::now();
            while child.try_wait()?.is_none() && t1.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let Some(status) = status else { bail!("timed out after {timeout:?}") };
    let r = Report::read(report).with_context(|| format!("exit {status}; see {}", log.display()))?;
    Ok(r)
}

/// Run `postcopy lab`. Returns the exit code (0: every run clean).
pub fn lab(args: &LabArgs) -> Result<i32> {
    let spec = Spec::read(&args.spec)?;
    spec.check()?;
    let cells = spec.cells();
    let total = cells.len() * spec.repetitions as usize;
    if args.dry_run {
        for c in &cells {
            println!("{}: postcopy migrate {}", c.label(), spec.args(c).join(" "));
        }
        println!("{} cells x {} repetitions = {total} runs", cells.len(), spec.repetitions);
        return Ok(0);
    }
    let out = args.out.clone().unwrap_or_else(|| Path::new("lab-out").join(&spec.name));
    let runs_dir = out.join("runs");
    if args.resummarize {
        if !runs_dir.is_dir() {
            bail!("{} holds no runs to summarise", runs_dir.display());
        }
    } else {
        std::fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
        std::fs::copy(&args.spec, out.join("spec.toml")).context("copying the spec")?;
    }
    let exe = std::env::current_exe().context("locating the postcopy executable")?;
    let stop = Arc::new(AtomicBool::new(false));
    crate::cmd::stop_on_signals(&stop)?;
    let bar = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "[{elapsed_precise}] [{wide_bar}] {pos}/{len} runs, eta {eta} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b
        })
    };
    let mut results: Vec<CellResult> =
        cells.iter().map(|c| CellResult { cell: c.clone(), runs: 0, ok: Vec::new() }).collect();
    let timeout = Duration::from_secs(args.run_timeout_s.max(10));
    let mut n = 0;
    'reps: for rep in 1..=spec.repetitions {
        for (i, r) in results.iter_mut().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break 'reps;
            }
            n += 1;
            // The cell's number keeps names apart that the slug would merge
            // (zipf:0.9 and zipf-0.9).
            let base = runs_dir.join(format!("{:03}-{}-r{rep}", i + 1, r.cell.slug()));
            let (json, log) = (base.with_extension("json"), base.with_extension("log"));
            let res = if args.resummarize {
                if !json.exists() {
                    continue;
                }
                Report::read(&json)
            } else {
                run_one(&exe, &spec.args(&r.cell), &json, &log, timeout, &stop)
            };
            r.runs += 1;
            let line = match res {
                Ok(rep) if rep.clean() => {
                    let l = format!(
                        "ok: total {:.0} ms, fault p50 {:.1} us, p99 {:.1} us",
                        rep.total_time_ms, rep.postcopy.fault_latency_us.p50, rep.postcopy.fault_latency_us.p99
                    );
                    r.ok.push(rep);
                    l
                }
                Ok(rep) => format!("FAILED: {}", rep.error.unwrap_or_else(|| "the guest did not check out".into())),
                Err(e) => format!("FAILED: {e:#}"),
            };
            let msg = format!("[{n}/{total}] {} r{rep}: {line}", r.cell.label());
            match &bar {
                Some(b) => {
                    b.println(&msg);
                    b.inc(1);
                }
                None => eprintln!("{msg}"),
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let csv = summary_csv(&spec, &results);
    let md = summary_md(&spec, &results);
    std::fs::write(out.join("summary.csv"), &csv)?;
    std::fs::write(out.join("summary.md"), &md)?;
    let plots: Vec<(String, Report)> =
        results.iter().filter_map(|r| representative(r).map(|rep| (r.cell.values(), rep))).collect();
    if !plots.is_empty() {
        let keys: Vec<&str> = spec.grid.iter().map(|(k, _)| k.as_str()).collect();
        crate::plot::write_all(&out.join("plots"), Some(&keys.join(" / ")), &plots)?;
    }
    print!("{md}");
    println!("\nwrote {}/summary.md, summary.csv, plots/, runs/", out.display());
    std::io::stdout().flush()?;
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted after {n} of {total} runs");
    }
    let clean = results.iter().all(|r| r.ok.len() == r.runs);
    Ok(if clean { 0 } else { 2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_cross_and_reject() {
        let s = Spec::parse(
            "repetitions = 2\n[fixed]\nmem = \"64M\"\nvcpus = 2\n[grid]\nprefetch = [1, 8]\npattern = [\"uniform\", \"zipf:0.9\"]\n",
            "x",
        )
        .unwrap();
        assert_eq!(s.name, "x");
        assert_eq!(s.repetitions, 2);
        let cells = s.cells();
        assert_eq!(cells.len(), 4);
        assert_eq!(cells[1].label(), "prefetch=1 pattern=zipf:0.9");
        assert_eq!(cells[1].slug(), "prefetch-1_pattern-zipf-0.9");
        assert_eq!(s.args(&cells[3]), ["--mem", "64M", "--vcpus", "2", "--prefetch", "8", "--pattern", "zipf:0.9"]);
        s.check().unwrap();
        for (bad, why) in [
            ("[grid]\nreport = [\"a\"]", "sets this option itself"),
            ("[grid]\nprefetch = []", "empty"),
            ("[fixed]\nmem = \"64M\"\n[grid]\nmem = [\"1G\"]", "both fixed"),
            ("repetitions = 0", "repetitions"),
            ("colour = 1", "unknown key"),
            ("[grid]\na = [1,2,3,4,5,6,7,8,9]\nb = [1,2,3,4,5,6,7,8]\nc = [1,2,3,4,5,6,7,8]", "cells"),
            ("[fixed]\nquiet = true", "sets this option itself"),
            ("[fixed]\n\"--x\" = 1", "not an option name"),
            ("not toml = = 1", "TOML"),
        ] {
            let e = format!("{:#}", Spec::parse(bad, "x").unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A bad value is caught by migrate's own checks, before any run.
        let s = Spec::parse("[grid]\npattern = [\"uniform\", \"zipf:7\"]", "x").unwrap();
        let e = format!("{:#}", s.check().unwrap_err());
        assert!(e.contains("zipf"), "{e}");
        let s = Spec::parse("[grid]\nbogus-flag = [1]", "x").unwrap();
        assert!(s.check().is_err());
    }

    #[test]
    fn spreads_and_summaries() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Spread { median: 2.0, min: 1.0, max: 3.0 });
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Spread::of(&[]), Spread::default());
        let spec = Spec::parse("[grid]\nprefetch = [1, 8]", "t").unwrap();
        let mk = |p50: f64| {
            let mut r = Report { status: "ok".into(), ..Default::default() };
            r.postcopy.fault_latency_us.p50 = p50;
            r
        };
        let cells = spec.cells();
        let results = vec![
            CellResult { cell: cells[0].clone(), runs: 3, ok: vec![mk(30.0), mk(40.0), mk(35.0)] },
            CellResult { cell: cells[1].clone(), runs: 2, ok: vec![] },
        ];
        let csv = summary_csv(&spec, &results);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        let head: Vec<&str> = lines[0].split(',').collect();
        let row: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(head.len(), row.len());
        let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
        assert_eq!((row[col("prefetch")], row[col("runs")], row[col("ok")]), ("1", "3", "3"));
        assert_eq!(row[col("fault_p50_us_median")], "35.000");
        assert_eq!(row[col("fault_p50_us_min")], "30.000");
        assert_eq!(row[col("fault_p50_us_max")], "40.000");
        let md = summary_md(&spec, &results);
        assert!(md.contains("35.00 (30.00-40.00)"), "{md}");
        assert!(md.contains("| 0/2 "), "{md}");
    }
}
