//! The background push: every outstanding page not yet sent, in runs, on the
//! bulk connection, restarting just after the last requested range.
//!
//! The pusher owns `pushed` alone; the demand thread owns `served` and the
//! restart `hint`. A page is pushed if neither bit is set when the pusher
//! scans it; a page served on demand meanwhile goes twice, which the
//! destination absorbs (EEXIST). Sends block only on the bulk socket, whose
//! unsent queue is kept small (TCP_NOTSENT_LOWAT), so the pusher looks at the
//! hint often.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::wire::{Msg, PageKind};
use proto::{AtomicPageBitmap, PageBitmap, PageIdx, PageRange};
use transport::Conn;

use crate::error::SenderError;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;

/// No restart requested.
pub(crate) const NO_HINT: u64 = u64::MAX;

/// Where the demand server wants each push stream to restart, and a count
/// of requests served (each stream's governor sees the guest faulting).
/// With several streams (`--push-streams`) each pushes its own stripe of
/// the pages, and a hint goes to the stripe it falls in.
pub(crate) struct Hints {
    stripes: Vec<(u64, u64)>,
    slots: Vec<AtomicU64>,
    served: AtomicU64,
}

impl Hints {
    /// `streams` stripes over `n` pages, each a whole number of `run` pages.
    pub(crate) fn new(n: u64, streams: usize, run: u64) -> Hints {
        let streams = streams.max(1) as u64;
        let per = n.div_ceil(streams).div_ceil(run.max(1)) * run.max(1);
        let stripes: Vec<(u64, u64)> =
            (0..streams).map(|i| ((i * per).min(n), ((i + 1) * per).min(n))).filter(|(lo, hi)| lo < hi).collect();
        let slots = stripes.iter().map(|_| AtomicU64::new(NO_HINT)).collect();
        Hints { stripes, slots, served: AtomicU64::new(0) }
    }

    /// The stripes (a stream each).
    pub(crate) fn stripes(&self) -> &[(u64, u64)] {
        &self.stripes
    }

    /// A request was served ending at `page`.
    pub(crate) fn set(&self, page: u64) {
        self.served.fetch_add(1, Ordering::Release);
        if let Some(i) = self.stripes.iter().position(|&(lo, hi)| page >= lo && page < hi) {
            self.slots[i].store(page, Ordering::Release);
        }
    }

    fn take(&self, stripe: usize) -> u64 {
        self.slots[stripe].swap(NO_HINT, Ordering::AcqRel)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Acquire)
    }
}

pub(crate) struct Pusher {
    pub(crate) conn: Box<dyn Conn>,
    pub(crate) map: Arc<SourceMap>,
    /// Pages that need no push (sent in precopy and clean, or pushed).
    pub(crate) pushed: PageBitmap,
    pub(crate) served: Arc<AtomicPageBitmap>,
    pub(crate) hints: Arc<Hints>,
    /// Which stripe of the pages this stream pushes.
    pub(crate) stripe: usize,
    pub(crate) abort: Arc<AtomicBool>,
    pub(crate) run_pages: u64,
    pub(crate) governor: Governor,
    /// The guest's zero scan, run first (off the demand thread).
    pub(crate) zero_scan: Option<crate::guest::ZeroScan>,
    pub(crate) metrics: Arc<SenderMetrics>,
}

/// How long after a demand request the guest counts as faulting.
const BUSY_FOR: Duration = Duration::from_millis(20);
/// The window over which acknowledged bytes give a bandwidth sample.
const SAMPLE_WINDOW: Duration = Duration::from_millis(25);
/// How long a bandwidth maximum stands before a lower sample replaces it.
const BW_WINDOW: Duration = Duration::from_secs(2);

/// Yields the bottleneck to demand replies: while the guest faults (a
/// request was served in the last `BUSY_FOR`), the bulk connection is paced
/// at `share` of the bandwidth it measured (acknowledged bytes over
/// `SAMPLE_WINDOW`, the maximum over `BW_WINDOW`, taken while unpaced);
/// idle after the first fault, at the whole estimate (before it, at its
/// configured rate). While paced, round trips well above the path's
/// minimum (queueing) lower the estimate by a sixteenth, and
/// acknowledgements that keep up with the pace without queueing raise it by
/// a thirty-second, so an estimate taken too early (slow start, a burst)
/// neither holds the push down nor lets it fill the queue for good.
pub(crate) struct Governor {
    share: f64,
    base: Option<u64>,
    bw_max: u64,
    /// The estimate as last measured unpaced: the paced estimate never
    /// falls below a quarter of it, and grows by at least a 64th of it, so
    /// round trips that stay high for reasons of their own (cross traffic,
    /// a busy CPU) cannot walk it down to nothing.
    bw_ref: u64,
    bw_at: Instant,
    last_demand: Option<Instant>,
    window: Option<(Instant, u64)>,
    pace: Option<u64>,
}

impl Governor {
    pub(crate) fn new(share: f64, base: Option<u64>) -> Governor {
        let now = Instant::now();
        Governor { share, base, bw_max: 0, bw_ref: 0, bw_at: now, last_demand: None, window: None, pace: base }
    }

    /// A demand request was served.
    fn demand(&mut self, now: Instant) {
        self.last_demand = Some(now);
    }

    /// Sample the path and set the pace for what comes next.
    fn tick(&mut self, conn: &mut dyn Conn, now: Instant, metrics: &SenderMetrics) {
        if self.share >= 1.0 {
            return;
        }
        let yielding = self.pace != self.base;
        // TCP_INFO only once per window, not per frame.
        let due = self.window.is_none_or(|(t0, _)| now.duration_since(t0) >= SAMPLE_WINDOW);
        if let Some(p) = if due { conn.path_info() } else { None } {
            match self.window {
                None => self.window = Some((now, p.bytes_acked)),
                Some((t0, a0)) => {
                    let dt = now.duration_since(t0).as_secs_f64();
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
                    let rate = (p.bytes_acked.saturating_sub(a0) as f64 / dt) as u64;
                    self.window = Some((now, p.bytes_acked));
                    if !yielding {
                        if rate >= self.bw_max || now.duration_since(self.bw_at) > BW_WINDOW {
                            (self.bw_max, self.bw_at) = (rate, now);
                        }
                        self.bw_ref = self.bw_max;
                    } else if let Some(pace) = self.pace {
                        // Queueing shows as round trips above the path's
                        // minimum: then the estimate is too high. Keeping up
                        // with the pace without queueing: the path may take more.
                        let (rtt, min) = (p.rtt_us, p.min_rtt_us);
                        let busy = self.last_demand.is_some_and(|t| now.duration_since(t) < BUSY_FOR);
                        // Idle, anything short of the queueing threshold lets
                        // the pace grow: the push must keep (nearly) the
                        // whole link, and only a queue that builds holds it.
                        let clear = if busy { min + (min / 4).max(50) } else { 2 * min + 100 };
                        if rtt > 2 * min + 100 {
                            self.bw_max = (self.bw_max - self.bw_max / 16).max(self.bw_ref / 4);
                        } else if rate >= pace - pace / 10 && rtt <= clear {
                            self.bw_max += (self.bw_max / 32).max(self.bw_ref / 64);
                        }
                    }
                }
            }
        }
        let busy = self.last_demand.is_some_and(|t| now.duration_since(t) < BUSY_FOR);
        // Idle after the guest has faulted once, the push runs at the whole
        // estimate, which the round trips keep correcting: a queue that
        // builds lowers it, so the next rare fault does not meet a full one.
        let share = if busy { Some(self.share) } else { self.last_demand.map(|_| 1.0) };
        let want = match share {
            Some(s) if self.bw_max > 0 => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
                let y = (self.bw_max as f64 * s) as u64;
                Some(self.base.map_or(y, |b| b.min(y)))
            }
            _ => self.base,
        };
        if want != self.pace && conn.set_pacing(want) {
            if want != self.base {
                SenderMetrics::add(&metrics.push_yields, 1);
            }
            self.pace = want;
        }
    }
}

impl Pusher {
    /// First run of pages in `[from, below)` neither pushed nor served, at most
    /// `run_pages` long.
    fn next_run(&self, from: u64, below: u64) -> Option<PageRange> {
        let words = self.pushed.words();
        let mut w = usize::try_from(from / 64).expect("fits");
        let end_w = usize::try_from(below.div_ceil(64)).expect("fits");
        let mut skip_below = from % 64;
        let mut first = None;
        while w < end_w {
            let busy = words[w] | self.served.load_word(w);
            let free = !busy & !((1u64 << skip_below) - 1);
            skip_below = 0;
            if free != 0 {
                let p = w as u64 * 64 + u64::from(free.trailing_zeros());
                if p < below {
                    first = Some(p);
                }
                break;
            }
            w += 1;
        }
        let first = first?;
        let limit = below.min(first + self.run_pages);
        let mut end = first + 1;
        while end < limit {
            let w = usize::try_from(end / 64).expect("fits");
            let busy = words[w] | self.served.load_word(w);
            if busy & (1u64 << (end % 64)) != 0 {
                break;
            }
            end += 1;
        }
        Some(PageRange::new(PageIdx(first), end - first))
    }

    /// Push until every page of the stripe is pushed or served, then send PushDone.
    pub(crate) fn run(mut self) -> Result<u64, SenderError> {
        let (lo, n) = self.hints.stripes()[self.stripe];
        let mut cursor = lo;
        let mut seen = self.hints.served();
        let mut n_pushed = 0;
        let map = Arc::clone(&self.map);
        if let Some(scan) = self.zero_scan.take() {
            let t = std::time::Instant::now();
            let mut z = PageBitmap::new(self.pushed.len());
            scan(&mut z);
            let known = z.count_ones();
            map.set_known_zero(z);
            tracing::debug!(known, took = ?t.elapsed(), "zero scan");
            SenderMetrics::add(&self.metrics.pages_known_zero, known);
        }
        let mut sent_before = self.conn.bytes_sent();
        let started = std::time::Instant::now();
        loop {
            if self.abort.load(Ordering::Acquire) {
                return Ok(n_pushed);
            }
            let h = self.hints.take(self.stripe);
            let now = Instant::now();
            let s = self.hints.served();
            if s != seen {
                seen = s;
                self.governor.demand(now);
            }
            self.governor.tick(&mut *self.conn, now, &self.metrics);
            if h != NO_HINT && h >= lo && h < n {
                cursor = h;
                SenderMetrics::add(&self.metrics.push_restarts, 1);
            }
            let Some(run) = self.next_run(cursor, n).or_else(|| self.next_run(lo, cursor.min(n))) else {
                break;
            };
            let zero = map.send_run(&mut *self.conn, run, PageKind::Push)?;
            SenderMetrics::add(&self.metrics.pages_zero, zero);
            self.pushed.set_range(run);
            n_pushed += run.n_pages;
            SenderMetrics::add(&self.metrics.pages_pushed, run.n_pages);
            let sent = self.conn.bytes_sent();
            SenderMetrics::add(&self.metrics.bytes_sent, sent - sent_before);
            sent_before = sent;
            cursor = run.end();
            // Kept current: the destination may complete on this run's pages
            // (the rest came by demand) and the source acknowledge with its
            // figures before this loop ends. The longest stream's time.
            let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.metrics.push_ns.fetch_max(ns, Ordering::Relaxed);
        }
        self.conn.send(&Msg::PushDone { n_pushed })?;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.metrics.push_ns.fetch_max(ns, Ordering::Relaxed);
        SenderMetrics::add(&self.metrics.bytes_sent, self.conn.bytes_sent() - sent_before);
        tracing::debug!(n_pushed, "push done");
        Ok(n_pushed)
    }
}

#[cfg(test)]
mod tests {
    use transport::PathInfo;

    use super::*;

    /// The path as TCP reports it, scripted: the governor's decisions
    /// depend only on these figures (the real path is measured in
    /// `DESIGN.md`'s shaped-link table).
    struct Path {
        info: PathInfo,
        pace: Option<u64>,
    }

    impl Path {
        fn advance(&mut self, bytes: u64, rtt_us: u32) {
            self.info.bytes_acked += bytes;
            self.info.rtt_us = rtt_us;
        }
    }

    impl Conn for Path {
        fn send(&mut self, _: &Msg<'_>) -> Result<(), transport::TransportError> {
            Ok(())
        }
        fn send_pages(
            &mut self,
            _: PageIdx,
            _: u32,
            _: PageKind,
            _: &[transport::IoSpan<'_>],
        ) -> Result<(), transport::TransportError> {
            Ok(())
        }
        fn recv(&mut self, _: transport::Wait) -> Result<Option<Msg<'_>>, transport::TransportError> {
            Ok(None)
        }
        fn recv_placed(
            &mut self,
            _: transport::Wait,
            _: &mut dyn transport::PagePlacer,
        ) -> Result<Option<transport::Placed<'_>>, transport::TransportError> {
            Ok(None)
        }
        fn set_page_size(&mut self, _: proto::PageSize) {}
        fn readiness(&self) -> std::os::fd::BorrowedFd<'_> {
            unreachable!("not polled")
        }
        fn has_buffered(&self) -> bool {
            false
        }
        fn bytes_sent(&self) -> u64 {
            0
        }
        fn bytes_received(&self) -> u64 {
            0
        }
        fn peer(&self) -> &str {
            "scripted path"
        }
        fn path_info(&self) -> Option<PathInfo> {
            Some(self.info)
        }
        fn set_pacing(&mut self, r: Option<u64>) -> bool {
            self.pace = r;
            true
        }
    }

    #[test]
    fn the_push_yields_while_the_guest_faults_and_tracks_the_path() {
        let m = SenderMetrics::default();
        let mut g = Governor::new(0.75, None);
        let mut p = Path { info: PathInfo { rtt_us: 100, min_rtt_us: 100, bytes_acked: 0 }, pace: None };
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Idle: unpaced, measuring 100 MB/s (2.5 MB per 25 ms).
        for i in 0..=4 {
            p.advance(2_500_000, 100);
            g.tick(&mut p, ms(25 * i), &m);
        }
        assert_eq!(p.pace, None);
        // A fault: paced at three quarters of what was measured.
        g.demand(ms(101));
        g.tick(&mut p, ms(101), &m);
        assert_eq!(p.pace, Some(75_000_000));
        assert_eq!(SenderMetrics::get(&m.push_yields), 1);
        // Queueing (round trips far above the minimum) lowers the pace.
        p.advance(1_900_000, 400);
        g.demand(ms(126));
        g.tick(&mut p, ms(126), &m);
        let lowered = p.pace.unwrap();
        assert!(lowered < 75_000_000, "{lowered}");
        // Keeping up without queueing raises it again.
        p.advance(2_000_000, 110);
        g.demand(ms(151));
        g.tick(&mut p, ms(151), &m);
        assert!(p.pace.unwrap() > lowered);
        // No fault for the busy window: the whole estimate, still corrected
        // by round trips (a queue that builds lowers it).
        g.tick(&mut p, ms(200), &m);
        let idle = p.pace.expect("paced when idle after a fault");
        assert!(idle > 75_000_000, "the whole estimate, not the busy share: {idle}");
        p.advance(2_000_000, 500);
        g.tick(&mut p, ms(230), &m);
        assert!(p.pace.unwrap() < idle, "queueing lowers the idle pace");
        // Round trips that stay high for seconds (cross traffic, a busy CPU)
        // do not walk the pace down to nothing: a quarter of the last
        // unpaced measurement (100 MB/s) is the floor.
        for i in 0..400 {
            p.advance(500_000, 5_000);
            g.tick(&mut p, ms(260 + 25 * i), &m);
        }
        assert!(p.pace.unwrap() >= 25_000_000, "{:?}", p.pace);
        // Never faster than the configured rate.
        let mut g = Governor::new(0.75, Some(10_000_000));
        let mut p = Path { info: PathInfo { rtt_us: 100, min_rtt_us: 100, bytes_acked: 0 }, pace: Some(10_000_000) };
        for i in 0..=2 {
            p.advance(2_500_000, 100);
            g.tick(&mut p, ms(25 * i), &m);
        }
        g.demand(ms(60));
        g.tick(&mut p, ms(60), &m);
        assert_eq!(p.pace, Some(10_000_000));
        // A share of 1 never touches the pacing.
        let mut g = Governor::new(1.0, None);
        g.demand(ms(0));
        p.pace = Some(1);
        g.tick(&mut p, ms(30), &m);
        assert_eq!(p.pace, Some(1));
    }
}
