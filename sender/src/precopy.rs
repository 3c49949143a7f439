//! Precopy rounds and the switchover decision.
//!
//! Round 0 sends every page while the guest runs; each later round sends the
//! pages written since the previous round's scan. Tracking is armed before
//! round 0 and every scan happens before its round's copy (clear before
//! copy), so a page written while being sent is caught by the next scan.
//!
//! The decision to stop, after each scan (`Policy::decide`):
//! * `precopy`: stop when the dirty set can be sent within the downtime
//!   budget at the bandwidth measured so far, or after `max_rounds`; the
//!   rest is sent with the guest paused (stop-and-copy), nothing outstanding;
//! * `hybrid` with `postcopy_after = N`: switch after N rounds;
//! * `hybrid` automatic: switch when the dirty set stops shrinking (more than
//!   `shrink` of the previous round's), when another round would overrun the
//!   time budget, or when it already fits the downtime budget;
//! * `postcopy`: no rounds.
//!
//! The pages scanned at the decision and not sent join the outstanding set
//! with those written after it (the final scan, guest paused).

use std::time::{Duration, Instant};

use proto::wire::{Mode, Msg, PageKind};
use proto::{PageBitmap, PageRange};
use transport::Conn;

use crate::config::SenderConfig;
use crate::error::SenderError;
use crate::guest::SourceGuest;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;

/// When to leave precopy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Hybrid: switch to postcopy after this many rounds (None: decide).
    pub postcopy_after: Option<u32>,
    /// Most rounds before switching (hybrid) or stop-and-copy (precopy).
    pub max_rounds: u32,
    /// Acceptable time to send the last dirty set with the guest paused.
    pub downtime_budget: Duration,
    /// Hybrid, automatic: switch rather than let precopy run past this.
    pub time_budget: Duration,
    /// Hybrid, automatic: the dirty set "stops shrinking" when a round's is
    /// more than this share of the previous one's.
    pub shrink: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            postcopy_after: None,
            max_rounds: 30,
            downtime_budget: Duration::from_millis(300),
            time_budget: Duration::from_secs(60),
            shrink: 0.9,
        }
    }
}

/// Why precopy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The dirty set fits the downtime budget.
    Converged,
    /// The round limit was reached.
    RoundLimit,
    /// Hybrid: the requested number of rounds ran.
    AfterRounds,
    /// Hybrid: the dirty set stopped shrinking.
    NotShrinking,
    /// Hybrid: another round would overrun the time budget.
    TimeBudget,
}

impl StopReason {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::RoundLimit => "round limit",
            StopReason::AfterRounds => "after requested rounds",
            StopReason::NotShrinking => "dirty set stopped shrinking",
            StopReason::TimeBudget => "time budget",
        }
    }
}

/// What precopy did.
#[derive(Clone, Debug, Default)]
pub struct PrecopyReport {
    /// Rounds sent (round 0 included).
    pub rounds: u32,
    /// Pages sent in all rounds (stop-and-copy included).
    pub pages_sent: u64,
    /// Bytes written on the bulk connection for them.
    pub bytes: u64,
    /// Start of round 0 to the decision to stop.
    pub time: Duration,
    /// Pages sent in each round.
    pub round_pages: Vec<u64>,
    /// Dirty pages found by each scan after round 0 (the last one is the
    /// set the decision was made on).
    pub dirty_pages: Vec<u64>,
    /// Why it ended.
    pub stop: Option<StopReason>,
    /// Precopy only: pages sent with the guest paused.
    pub stop_and_copy_pages: u64,
}

impl Policy {
    /// Decide after a scan found `dirty` pages, `rounds` rounds having run,
    /// `elapsed` since round 0 began, at `bytes_per_s`. `None`: run another round.
    fn decide(
        &self,
        mode: Mode,
        rounds: u32,
        dirty: &[u64],
        page_bytes: u64,
        bytes_per_s: f64,
        elapsed: Duration,
    ) -> Option<StopReason> {
        let now = *dirty.last().expect("a scan happened");
        #[allow(clippy::cast_precision_loss)]
        let send_time = Duration::from_secs_f64(now as f64 * page_bytes as f64 / bytes_per_s.max(1.0));
        let fits = send_time <= self.downtime_budget;
        match mode {
            Mode::Postcopy => Some(StopReason::AfterRounds),
            Mode::Precopy => {
                if fits {
                    Some(StopReason::Converged)
                } else if rounds >= self.max_rounds {
                    Some(StopReason::RoundLimit)
                } else {
                    None
                }
            }
            Mode::Hybrid => {
                if let Some(n) = self.postcopy_after {
                    return (rounds >= n.max(1)).then_some(StopReason::AfterRounds);
                }
                if fits {
                    return Some(StopReason::Converged);
                }
                if rounds >= self.max_rounds {
                    return Some(StopReason::RoundLimit);
                }
                #[allow(clippy::cast_precision_loss)]
                if dirty.len() >= 2 && now as f64 > self.shrink * dirty[dirty.len() - 2] as f64 {
                    return Some(StopReason::NotShrinking);
                }
                if elapsed + send_time > self.time_budget {
                    return Some(StopReason::TimeBudget);
                }
                None
            }
        }
    }
}

/// Send every page of `set` as Precopy frames of at most `run_pages`.
pub(crate) fn send_set(
    bulk: &mut dyn Conn,
    map: &SourceMap,
    set: &PageBitmap,
    run_pages: u64,
    metrics: &SenderMetrics,
) -> Result<u64, SenderError> {
    let mut sent = 0;
    let before = bulk.bytes_sent();
    for r in set.runs() {
        let mut at = r.first.0;
        while at < r.end() {
            let piece = PageRange::new(proto::PageIdx(at), (r.end() - at).min(run_pages));
            let zero = map.send_run(bulk, piece, PageKind::Precopy)?;
            SenderMetrics::add(&metrics.pages_zero, zero);
            sent += piece.n_pages;
            at = piece.end();
        }
    }
    SenderMetrics::add(&metrics.pages_precopy, sent);
    SenderMetrics::add(&metrics.bytes_sent, bulk.bytes_sent() - before);
    Ok(sent)
}

/// Run precopy rounds while the guest runs. Returns the pages scanned at the
/// decision (not sent: they are outstanding), with tracking still armed.
pub(crate) fn rounds<G: SourceGuest>(
    guest: &mut G,
    control: &mut dyn Conn,
    bulk: &mut dyn Conn,
    map: &SourceMap,
    cfg: &SenderConfig,
    metrics: &SenderMetrics,
    report: &mut PrecopyReport,
) -> Result<PageBitmap, SenderError> {
    let (mode, policy) = (cfg.mode, &cfg.policy);
    let run_pages = cfg.run_pages(map.layout().page_size());
    let n = map.layout().n_pages();
    let page_bytes = map.layout().page_size().bytes();
    guest.start_dirty_tracking().map_err(SenderError::Guest)?;
    let started = Instant::now();
    let mut set = PageBitmap::full(n);
    let mut bytes_per_s = 0.0;
    loop {
        let t = Instant::now();
        let before = bulk.bytes_sent();
        let sent = send_set(bulk, map, &set, run_pages, metrics)?;
        bulk.send(&Msg::PrecopyRound { round: report.rounds, n_pages: sent })?;
        // The control connection is idle meanwhile: say we are alive.
        control.send(&Msg::KeepAlive)?;
        report.rounds += 1;
        report.pages_sent += sent;
        report.bytes += bulk.bytes_sent() - before;
        report.round_pages.push(sent);
        let secs = t.elapsed().as_secs_f64();
        if sent > 0 && secs > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            let rate = (bulk.bytes_sent() - before) as f64 / secs;
            bytes_per_s = if bytes_per_s == 0.0 { rate } else { 0.5 * bytes_per_s + 0.5 * rate };
        }
        // Clear before copy: scan (and re-arm) now, send next round.
        set.clear_all();
        guest.collect_dirty(&mut set).map_err(SenderError::Guest)?;
        report.dirty_pages.push(set.count_ones());
        let elapsed = started.elapsed();
        if let Some(stop) = policy.decide(mode, report.rounds, &report.dirty_pages, page_bytes, bytes_per_s, elapsed) {
            report.stop = Some(stop);
            report.time = elapsed;
            tracing::debug!(rounds = report.rounds, dirty = set.count_ones(), ?stop, "precopy done");
            return Ok(set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn precopy_converges_or_gives_up() {
        let p = Policy { max_rounds: 5, downtime_budget: MS(100), ..Policy::default() };
        // 1 GB/s: 100 ms is 24414 pages of 4 KiB.
        let d = |v: &[u64]| p.decide(Mode::Precopy, u32::try_from(v.len()).unwrap(), v, 4096, 1e9, MS(10));
        assert_eq!(d(&[100_000]), None);
        assert_eq!(d(&[100_000, 20_000]), Some(StopReason::Converged));
        assert_eq!(d(&[90_000, 80_000, 70_000, 60_000, 50_000]), Some(StopReason::RoundLimit));
    }

    #[test]
    fn hybrid_after_rounds_or_when_stuck() {
        let p = Policy { postcopy_after: Some(2), downtime_budget: MS(1), ..Policy::default() };
        assert_eq!(p.decide(Mode::Hybrid, 1, &[50_000], 4096, 1e9, MS(10)), None);
        assert_eq!(p.decide(Mode::Hybrid, 2, &[50_000, 1], 4096, 1e9, MS(10)), Some(StopReason::AfterRounds));
        let auto = Policy { downtime_budget: MS(1), time_budget: MS(1000), ..Policy::default() };
        assert_eq!(auto.decide(Mode::Hybrid, 1, &[50_000], 4096, 1e9, MS(10)), None);
        assert_eq!(auto.decide(Mode::Hybrid, 2, &[50_000, 30_000], 4096, 1e9, MS(20)), None, "still shrinking");
        assert_eq!(
            auto.decide(Mode::Hybrid, 3, &[50_000, 30_000, 29_000], 4096, 1e9, MS(30)),
            Some(StopReason::NotShrinking)
        );
        assert_eq!(auto.decide(Mode::Hybrid, 2, &[50_000, 30_000], 4096, 1e9, MS(990)), Some(StopReason::TimeBudget));
        assert_eq!(auto.decide(Mode::Hybrid, 2, &[50_000, 10], 4096, 1e9, MS(20)), Some(StopReason::Converged));
    }
}
