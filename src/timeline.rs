//! The destination's time series: its counters sampled at a fixed tick for
//! the whole run, kept in the report and written as CSV.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pager::PagerMetrics;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The default tick.
pub const TICK: Duration = Duration::from_millis(10);

/// At most this many samples are kept: past it, every other one is dropped
/// and the tick doubles (an hour at 10 ms would otherwise be 360 000).
pub const MAX_SAMPLES: usize = 20_000;

/// The destination's counters at one instant (cumulative since the start).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    /// Milliseconds since the guest resumed here (negative before: setup and precopy).
    pub t_ms: f64,
    /// Pages present in guest memory.
    pub pages_present: u64,
    /// Pages that arrived in precopy rounds.
    pub pages_precopy: u64,
    /// Pages installed from the background push.
    pub pages_pushed: u64,
    /// Pages installed from demand replies.
    pub pages_demand: u64,
    /// Pages named in range requests.
    pub pages_requested: u64,
    /// Fault events.
    pub faults: u64,
    /// Range requests sent.
    pub requests: u64,
    /// Bytes received on both connections.
    pub bytes_received: u64,
}

struct Raw {
    at: Instant,
    s: Sample,
}

fn read(m: &PagerMetrics) -> Sample {
    let g = PagerMetrics::get;
    Sample {
        t_ms: 0.0,
        pages_present: g(&m.pages_present),
        pages_precopy: g(&m.pages_precopy),
        pages_pushed: g(&m.pages_push),
        pages_demand: g(&m.pages_demand),
        pages_requested: g(&m.pages_requested),
        faults: g(&m.faults),
        requests: g(&m.requests),
        bytes_received: g(&m.bytes_received),
    }
}

/// Samples a run's counters in a thread until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Raw>>>,
    thread: Option<std::thread::JoinHandle<Duration>>,
    metrics: Arc<PagerMetrics>,
}

impl Sampler {
    /// Start sampling `metrics` every `tick`.
    pub fn start(metrics: Arc<PagerMetrics>, tick: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples, m) = (Arc::clone(&stop), Arc::clone(&samples), Arc::clone(&metrics));
            std::thread::Builder::new()
                .name("timeline".into())
                .spawn(move || {
                    let mut tick = tick.max(Duration::from_millis(1));
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        let at = Instant::now();
                        let mut v = samples.lock();
                        v.push(Raw { at, s: read(&m) });
                        if v.len() >= MAX_SAMPLES {
                            let mut i = 0;
                            v.retain(|_| {
                                i += 1;
                                i % 2 == 1
                            });
                            tick *= 2;
                        }
                        drop(v);
                        next += tick;
                        let now = Instant::now();
                        if next > now {
                            // `finish` unparks: stopping never waits out a tick.
                            std::thread::park_timeout(next - now);
                        } else {
                            next = now;
                        }
                    }
                    tick
                })
                .expect("spawning a thread")
        };
        Sampler { stop, samples, thread: Some(thread), metrics }
    }

    /// Stop, take a last sample, and return the series with times relative
    /// to `resumed` (or to the first sample), and the tick it ended at.
    pub fn finish(mut self, resumed: Option<Instant>) -> (Vec<Sample>, Duration) {
        let tick = self.stop_thread();
        let mut v = std::mem::take(&mut *self.samples.lock());
        v.push(Raw { at: Instant::now(), s: read(&self.metrics) });
        let zero = resumed.or_else(|| v.first().map(|r| r.at)).unwrap_or_else(Instant::now);
        let series = v
            .into_iter()
            .map(|r| {
                let t = if r.at >= zero {
                    r.at.duration_since(zero).as_secs_f64()
                } else {
                    -zero.duration_since(r.at).as_secs_f64()
                };
                Sample { t_ms: t * 1e3, ..r.s }
            })
            .collect();
        (series, tick)
    }

    fn stop_thread(&mut self) -> Duration {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| {
                t.thread().unpark();
                t.join().ok()
            })
            .unwrap_or(TICK)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The CSV header, in column order.
pub const CSV_HEADER: &str = "t_ms,pages_present,pages_precopy,pages_pushed,pages_demand,pages_requested,faults,requests,bytes_received,bytes_pushed,bytes_demand,bytes_requested";

/// Write `series` as CSV (`page_size` turns page counts into byte columns).
pub fn write_csv(path: &Path, series: &[Sample], page_size: u64) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "{CSV_HEADER}")?;
    for s in series {
        writeln!(
            w,
            "{:.3},{},{},{},{},{},{},{},{},{},{},{}",
            s.t_ms,
            s.pages_present,
            s.pages_precopy,
            s.pages_pushed,
            s.pages_demand,
            s.pages_requested,
            s.faults,
            s.requests,
            s.bytes_received,
            s.pages_pushed.saturating_mul(page_size),
            s.pages_demand.saturating_mul(page_size),
            s.pages_requested.saturating_mul(page_size),
        )?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_counters_and_are_relative_to_resume() {
        let m = Arc::new(PagerMetrics::default());
        let s = Sampler::start(Arc::clone(&m), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        let resumed = Instant::now();
        PagerMetrics::add(&m.pages_present, 100);
        PagerMetrics::add(&m.faults, 3);
        std::thread::sleep(Duration::from_millis(20));
        let (v, tick) = s.finish(Some(resumed));
        assert_eq!(tick, Duration::from_millis(1));
        assert!(v.len() >= 3, "{}", v.len());
        assert!(v.first().unwrap().t_ms < 0.0, "samples before the resume are negative");
        let last = v.last().unwrap();
        assert!(last.t_ms > 0.0);
        assert_eq!((last.pages_present, last.faults), (100, 3));
        assert!(v.windows(2).all(|w| w[0].t_ms <= w[1].t_ms && w[0].pages_present <= w[1].pages_present));
        let p = std::env::temp_dir().join(format!("timeline-{}.csv", std::process::id()));
        write_csv(&p, &v, 4096).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert_eq!(text.lines().next(), Some(CSV_HEADER));
        assert_eq!(text.lines().count(), v.len() + 1);
        let cols: Vec<&str> = text.lines().last().unwrap().split(',').collect();
        assert_eq!(cols.len(), CSV_HEADER.split(',').count());
        assert_eq!(cols[1], "100");
    }

    #[test]
    fn long_runs_are_thinned_not_grown() {
        let m = Arc::new(PagerMetrics::default());
        let s = Sampler::start(Arc::clone(&m), Duration::from_micros(1));
        // 1 us ticks (really the 1 ms floor) for long enough to pass the cap
        // would take 20 s; instead fill the buffer directly.
        {
            let mut v = s.samples.lock();
            let now = Instant::now();
            v.extend((0..MAX_SAMPLES - 1).map(|_| Raw { at: now, s: Sample::default() }));
        }
        std::thread::sleep(Duration::from_millis(10));
        let (v, tick) = s.finish(None);
        assert!(v.len() < MAX_SAMPLES, "{}", v.len());
        assert!(tick >= Duration::from_millis(2), "{tick:?}");
    }
}
