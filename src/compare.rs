//! `postcopy report`: runs side by side, as a table and as pictures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use crate::report::Report;

/// `postcopy report`.
#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// Reports written by `migrate --report` or `dest --report`.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Write pictures (SVG and PNG) into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write each run's time series as CSV into this directory.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Names for the runs, comma-separated (default: the file names).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
}

/// Labels for `paths`: file stems, with the parent directory added where
/// two stems collide.
pub fn labels_for(paths: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let stems: Vec<String> = paths.iter().map(|p| stem(p)).collect();
    paths
        .iter()
        .zip(&stems)
        .map(|(p, s)| {
            if stems.iter().filter(|t| *t == s).count() > 1 {
                let parent = p.parent().and_then(Path::file_name).map(|d| d.to_string_lossy().to_string());
                parent.map_or_else(|| s.clone(), |d| format!("{d}/{s}"))
            } else {
                s.clone()
            }
        })
        .collect()
}

/// One row of the table: a name and how to read it off a report.
type Row = (&'static str, fn(&Report) -> String);

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

const ROWS: &[Row] = &[
    ("status", |r| r.status.clone()),
    ("mode", |r| r.mode.clone()),
    ("guest", |r| format!("{} x{}", r.guest_kind, r.vcpus)),
    ("memory MiB", |r| (r.mem_bytes >> 20).to_string()),
    ("pattern", |r| r.pattern.clone()),
    ("prefetch", |r| format!("{} {}", r.prefetch.pages, r.prefetch.mode)),
    ("link", |r| if r.link.name.is_empty() { "loopback".into() } else { r.link.name.clone() }),
    ("push paced to Gbit/s", |r| if r.push_rate_gbit > 0.0 { f1(r.push_rate_gbit) } else { "-".into() }),
    ("link rtt us (measured)", |r| if r.link.measured_rtt_us > 0.0 { f1(r.link.measured_rtt_us) } else { "-".into() }),
    ("link rtt us, probes 10 ms apart", |r| {
        if r.link.measured_rtt_idle_us > 0.0 { f1(r.link.measured_rtt_idle_us) } else { "-".into() }
    }),
    ("total ms", |r| f1(r.total_time_ms)),
    ("postcopy ms", |r| f1(r.postcopy.time_ms)),
    ("downtime ms", |r| format!("{:.2}", r.downtime_ms)),
    ("precopy rounds", |r| r.precopy.rounds.to_string()),
    ("outstanding pages", |r| r.outstanding_pages.to_string()),
    ("GB transferred", |r| format!("{:.3}", r.bytes_transferred as f64 / 1e9)),
    ("push GB/s", |r| format!("{:.2}", r.postcopy.push_gbps)),
    ("pages pushed", |r| r.postcopy.pages_pushed.to_string()),
    ("pages on demand", |r| r.postcopy.pages_demand.to_string()),
    ("requests", |r| r.postcopy.requests.to_string()),
    ("faults (network)", |r| (r.postcopy.faults - r.postcopy.faults_local.min(r.postcopy.faults)).to_string()),
    ("fault p50 us", |r| f1(r.postcopy.fault_latency_us.p50)),
    ("fault p90 us", |r| f1(r.postcopy.fault_latency_us.p90)),
    ("fault p99 us", |r| f1(r.postcopy.fault_latency_us.p99)),
    ("fault p99.9 us", |r| f1(r.postcopy.fault_latency_us.p999)),
    ("fault max us", |r| f1(r.postcopy.fault_latency_us.max)),
    ("guest stalls", |r| r.guest.stalls.to_string()),
    ("stall p50 us", |r| f1(r.guest.stall_latency_us.p50)),
    ("stall p99 us", |r| f1(r.guest.stall_latency_us.p99)),
    ("stall p99.9 us", |r| f1(r.guest.stall_latency_us.p999)),
    ("vCPU block time ms", |r| f1(r.postcopy.blocktime_ms)),
    ("guest accesses here", |r| r.guest.accesses.to_string()),
    ("violations", |r| r.guest.violations.to_string()),
    ("verified", |r| if r.guest.verify_ok { format!("{} ok", r.guest.verified_pages) } else { "FAILED".into() }),
];

/// The runs side by side, one column each, as a Markdown table.
pub fn table(runs: &[(String, Report)]) -> String {
    let mut cells: Vec<Vec<String>> = Vec::with_capacity(ROWS.len() + 1);
    cells.push(std::iter::once(String::new()).chain(runs.iter().map(|(l, _)| l.clone())).collect());
    for (name, get) in ROWS {
        cells.push(std::iter::once((*name).to_string()).chain(runs.iter().map(|(_, r)| get(r))).collect());
    }
    markdown(&cells)
}

/// Cells as an aligned Markdown table (first row is the header).
pub fn markdown(cells: &[Vec<String>]) -> String {
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| cells.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0).max(3))
        .collect();
    let mut out = String::new();
    for (i, row) in cells.iter().enumerate() {
        out.push('|');
        for (c, w) in width.iter().enumerate() {
            let s = row.get(c).map_or("", String::as_str);
            if c == 0 {
                let _ = write!(out, " {s:<w$} |");
            } else {
                let _ = write!(out, " {s:>w$} |");
            }
        }
        out.push('\n');
        if i == 0 {
            out.push('|');
            for (c, w) in width.iter().enumerate() {
                let dashes = "-".repeat(*w);
                if c == 0 {
                    let _ = write!(out, " {dashes} |");
                } else {
                    let _ = write!(out, " {}: |", &dashes[1..]);
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Run `postcopy report`. Returns the exit code.
pub fn report(args: &ReportArgs) -> Result<i32> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        bail!("--labels names {} runs, but {} reports were given", args.labels.len(), args.runs.len());
    }
    let labels = if args.labels.is_empty() { labels_for(&args.runs) } else { args.labels.clone() };
    let mut runs = Vec::with_capacity(args.runs.len());
    for (p, l) in args.runs.iter().zip(labels) {
        runs.push((l, Report::read(p)?));
    }
    print!("{}", table(&runs));
    if let Some(dir) = &args.csv {
        std::fs::create_dir_all(dir)?;
        for (l, r) in &runs {
            let p = dir.join(format!("{}.timeline.csv", l.replace('/', "_")));
            crate::timeline::write_csv(&p, &r.timeline, r.page_size.max(1))?;
            println!("wrote {}", p.display());
        }
    }
    if let Some(dir) = &args.plot {
        for f in crate::plot::write_all(dir, None, &runs)? {
            println!("wrote {}", f.display());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_column_per_run_and_aligned_rows() {
        let mut a = Report { status: "ok".into(), mode: "postcopy".into(), ..Default::default() };
        a.postcopy.fault_latency_us.p50 = 31.25;
        let b = Report { status: "failed".into(), mode: "hybrid".into(), ..Default::default() };
        let t = table(&[("a".into(), a), ("b".into(), b)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), ROWS.len() + 2);
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].chars().count()), "{t}");
        assert!(lines[0].contains(" a |") && lines[0].contains(" b |"));
        let p50 = lines.iter().find(|l| l.starts_with("| fault p50 us")).unwrap();
        assert!(p50.contains("31.2") || p50.contains("31.3"), "{p50}");
        assert!(lines.iter().any(|l| l.contains("failed")));
    }

    #[test]
    fn labels_disambiguate_equal_file_names() {
        let p = [PathBuf::from("x/run.json"), PathBuf::from("y/run.json"), PathBuf::from("z/other.json")];
        assert_eq!(labels_for(&p), ["x/run", "y/run", "other"]);
    }
}
