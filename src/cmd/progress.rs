//! Progress: the destination's machine-readable lines for `migrate`, the
//! bar (or a line a second) `migrate` draws from them, and a side's own
//! once-a-second line.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pager::PagerMetrics;

/// Machine-readable progress on stdout every 100 ms until dropped:
/// `PROGRESS <phase> <present> <total> <faults> <requests> <bytes received>`.
pub(crate) fn progress_lines(m: Arc<PagerMetrics>) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut out = std::io::stdout();
            while !stop.load(Ordering::Acquire) {
                let g = PagerMetrics::get;
                let phase = match m.phase() {
                    pager::Phase::Precopy if g(&m.pages_precopy) == 0 => "ready",
                    p => p.name(),
                };
                let line = format!(
                    "PROGRESS {} {} {} {} {} {}",
                    phase,
                    g(&m.pages_present),
                    g(&m.pages_total),
                    g(&m.faults),
                    g(&m.requests),
                    g(&m.bytes_received)
                );
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    Progress { stop, thread: Some(thread) }
}

/// The destination's last progress line.
#[derive(Clone, Debug)]
pub(crate) struct DestProgress {
    phase: String,
    present: u64,
    total: u64,
    faults: u64,
    requests: u64,
    bytes: u64,
}

impl DestProgress {
    pub(crate) fn parse(line: &str) -> Option<DestProgress> {
        let mut f = line.strip_prefix("PROGRESS ")?.split_ascii_whitespace();
        let phase = f.next()?.to_string();
        let mut n = || f.next().and_then(|v| v.parse::<u64>().ok());
        Some(DestProgress { phase, present: n()?, total: n()?, faults: n()?, requests: n()?, bytes: n()? })
    }
}

/// `migrate`'s progress: a live bar on a terminal, a line a second
/// otherwise, nothing when quiet.
pub(crate) struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    t0: Instant,
    next_line: Instant,
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl ProgressView {
    pub(crate) fn new(quiet: bool) -> ProgressView {
        use std::io::IsTerminal;
        let tty = !quiet && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(1);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix:>10} [{bar:30}] {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b.set_prefix("starting");
            b
        });
        let now = Instant::now();
        ProgressView {
            bar,
            lines: !quiet && !tty,
            t0: now,
            next_line: now + Duration::from_secs(1),
            last: None,
            rate: 0.0,
        }
    }

    pub(crate) fn update(&mut self, p: Option<&DestProgress>) {
        let Some(p) = p else { return };
        let now = Instant::now();
        // The receive rate over the last half second or so.
        match self.last {
            Some((t, b)) if now.duration_since(t) >= Duration::from_millis(500) => {
                self.rate = p.bytes.saturating_sub(b) as f64 / now.duration_since(t).as_secs_f64() / 1e9;
                self.last = Some((now, p.bytes));
            }
            Some(_) => {}
            None => self.last = Some((now, p.bytes)),
        }
        if let Some(b) = &self.bar {
            b.set_length(p.total.max(1));
            b.set_position(p.present.min(p.total));
            b.set_prefix(p.phase.clone());
            if p.total == 0 {
                b.set_message("waiting for the source");
            } else {
                b.set_message(format!("{}/{} pages, {:.2} GB/s, {} faults", p.present, p.total, self.rate, p.faults));
            }
        } else if self.lines && now >= self.next_line {
            self.next_line += Duration::from_secs(1);
            eprintln!(
                "[{:5.1}s] {}: {}/{} pages present, {:.2} GB received, {} faults, {} requests",
                now.duration_since(self.t0).as_secs_f64(),
                p.phase,
                p.present,
                p.total,
                p.bytes as f64 / 1e9,
                p.faults,
                p.requests
            );
        }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A once-a-second progress line on stderr until dropped.
pub(crate) struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(quiet: bool, line: impl Fn(Duration) -> Option<String> + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!quiet).then(|| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut next = t0 + Duration::from_secs(1);
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    if Instant::now() >= next {
                        next += Duration::from_secs(1);
                        if let Some(l) = line(t0.elapsed()) {
                            eprintln!("{l}");
                        }
                    }
                }
            })
        });
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
