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
/// of requests served (the push governor sees the guest faulting).
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
    pub(crate) governor: Lane,
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
/// The slowest the push is ever paced (all streams together), bytes/s: an
/// estimate taken while the link stalled must not hold it near nothing (it
/// would take seconds of 1/32 steps to grow back).
const MIN_PACE: u64 = 1 << 20;

/// Yields the bottleneck to demand replies, for every push stream at once:
/// while the guest faults (a request was served in the last `BUSY_FOR`),
/// the bulk connections are paced at `share` of the bandwidth they measured
/// together (each stream's acknowledged bytes over its own `SAMPLE_WINDOW`,
/// summed; the maximum over `BW_WINDOW`, taken while unpaced), split evenly
/// among the streams still pushing; idle after the first fault, at the
/// whole estimate (before it, at the configured rate). While paced, round
/// trips well above the path's minimum (queueing, on any stream) lower the
/// estimate by a sixteenth, and deliveries that keep up with the pace
/// without queueing raise it (by a thirty-second up to what the path took
/// unpaced, by a 128th past it), so an estimate taken too early (slow
/// start, a burst) neither holds the push down nor lets it fill the queue
/// for good.
///
/// One governor for all streams, not one each: streams that share a
/// bottleneck each measure only their share of it, and a stream that
/// happened to measure while another took the link locked itself to that
/// (at 1 Gbit one of two streams pushed at a fifth of the link for 10 s
/// after the other had finished).
pub(crate) struct Governor {
    share: f64,
    /// Each connection's configured pacing (`--push-rate`), if any.
    base: Option<u64>,
    state: parking_lot::Mutex<GovState>,
}

struct GovState {
    bw_max: u64,
    /// The estimate as last measured unpaced: the paced estimate never
    /// falls below a quarter of it, and grows by at least a 256th of it, so
    /// round trips that stay high for reasons of their own (cross traffic,
    /// a busy CPU) cannot walk it down to nothing.
    bw_ref: u64,
    bw_at: Instant,
    last_demand: Option<Instant>,
    /// When the estimate was last corrected (once per `SAMPLE_WINDOW`,
    /// however many streams report).
    decided: Option<Instant>,
    /// The pace over all streams while yielding, bytes/s.
    total: Option<u64>,
    lanes: Vec<LaneSample>,
}

/// What one stream last measured of its connection.
#[derive(Clone, Copy, Default)]
struct LaneSample {
    pushing: bool,
    rate: Option<u64>,
    rtt_us: u32,
    min_rtt_us: u32,
}

/// One stream's handle on the shared [`Governor`]: its own sampling window
/// and the pace it last set on its connection.
pub(crate) struct Lane {
    gov: Arc<Governor>,
    index: usize,
    window: Option<(Instant, u64)>,
    applied: Option<u64>,
}

impl Governor {
    /// A governor over `streams` connections.
    pub(crate) fn new(share: f64, base: Option<u64>, streams: usize) -> Arc<Governor> {
        let now = Instant::now();
        // A stream counts from its first tick: stream 0 scans for zero pages
        // first, and the others must not wait for it to be paced.
        let lanes = vec![LaneSample::default(); streams.max(1)];
        Arc::new(Governor {
            share,
            base,
            state: parking_lot::Mutex::new(GovState {
                bw_max: 0,
                bw_ref: 0,
                bw_at: now,
                last_demand: None,
                decided: None,
                total: None,
                lanes,
            }),
        })
    }

    /// Stream `index`'s handle.
    pub(crate) fn lane(self: &Arc<Governor>, index: usize) -> Lane {
        Lane { gov: Arc::clone(self), index, window: None, applied: self.base }
    }

    /// A demand request was served.
    fn demand(&self, now: Instant) {
        let mut st = self.state.lock();
        st.last_demand = st.last_demand.max(Some(now));
    }

    /// Correct the estimate from what the streams last measured (false:
    /// not every stream has measured yet).
    fn decide(&self, st: &mut GovState, now: Instant) -> bool {
        // Every stream still pushing counts, or a sum would take one
        // stream's share for the path.
        if st.lanes.iter().any(|l| l.pushing && l.rate.is_none()) {
            return false;
        }
        // The streams cross the same queue: their mean round trip is its
        // delay (the largest of several noisy ones would read queueing
        // into noise), the smallest minimum the path's.
        // (TCP reports ~0 as the minimum before its first sample.)
        let (mut rate, mut rtt_sum, mut min, mut n) = (0u64, 0u64, u64::MAX, 0u64);
        for l in st.lanes.iter().filter(|l| l.pushing) {
            rate += l.rate.unwrap_or(0);
            rtt_sum += u64::from(l.rtt_us);
            min = min.min(u64::from(l.min_rtt_us));
            n += 1;
        }
        if n == 0 || min >= u64::from(u32::MAX) {
            return false;
        }
        let rtt = rtt_sum / n;
        let busy = st.last_demand.is_some_and(|t| now.duration_since(t) < BUSY_FOR);
        tracing::trace!(rate, rtt, min, bw = st.bw_max, total = ?st.total, busy, "push governor");
        match st.total {
            None => {
                if rate >= st.bw_max || now.duration_since(st.bw_at) > BW_WINDOW {
                    (st.bw_max, st.bw_at) = (rate, now);
                }
                st.bw_ref = st.bw_max;
            }
            Some(pace) => {
                // Queueing shows as round trips above the path's minimum:
                // then the estimate is too high. Keeping up with the pace
                // without queueing: the path may take more. Idle, anything
                // short of the queueing threshold lets the pace grow: the
                // push must keep (nearly) the whole link, and only a queue
                // that builds holds it.
                let clear = if busy { min + (min / 4).max(50) } else { 2 * min + 100 };
                if rtt > 2 * min + 100 {
                    st.bw_max = (st.bw_max - st.bw_max / 16).max(st.bw_ref / 4);
                } else if rate >= pace - pace / 10 && rtt <= clear {
                    // Back to what the path took unpaced in big steps (a
                    // queue that came and went lowered it), past it in
                    // small ones: the pace climbs to the link and a step
                    // past it builds a queue for a whole window.
                    let step = if st.bw_max < st.bw_ref { st.bw_max / 32 } else { st.bw_max / 128 };
                    st.bw_max += step.max(st.bw_ref / 256);
                }
            }
        }
        true
    }

    /// The pace for each stream now (counting each time the push starts
    /// being paced).
    fn want(&self, st: &mut GovState, now: Instant, metrics: &SenderMetrics) -> Option<u64> {
        let busy = st.last_demand.is_some_and(|t| now.duration_since(t) < BUSY_FOR);
        // Idle after the guest has faulted once, the push runs at the whole
        // estimate, which the round trips keep correcting: a queue that
        // builds lowers it, so the next rare fault does not meet a full one.
        let share = if busy { Some(self.share) } else { st.last_demand.map(|_| 1.0) };
        let streams = st.lanes.iter().filter(|l| l.pushing).count().max(1) as u64;
        let per = match share {
            Some(s) if st.bw_max > 0 => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
                let y = ((st.bw_max as f64 * s) as u64).max(MIN_PACE) / streams;
                Some(self.base.map_or(y, |b| b.min(y)))
            }
            _ => self.base,
        };
        let total = if per == self.base { None } else { per.map(|p| p * streams) };
        if st.total.is_none() && total.is_some() {
            SenderMetrics::add(&metrics.push_yields, 1);
        }
        st.total = total;
        per
    }
}

impl Lane {
    /// A demand request was served.
    pub(crate) fn demand(&self, now: Instant) {
        self.gov.demand(now);
    }

    /// Sample this stream's path, and set its pace for what comes next.
    pub(crate) fn tick(&mut self, conn: &mut dyn Conn, now: Instant, metrics: &SenderMetrics) {
        if self.gov.share >= 1.0 {
            return;
        }
        // TCP_INFO only once per window, not per frame.
        let due = self.window.is_none_or(|(t0, _)| now.duration_since(t0) >= SAMPLE_WINDOW);
        let mut sample = None;
        if let Some(p) = if due { conn.path_info() } else { None } {
            if let Some((t0, a0)) = self.window {
                let dt = now.duration_since(t0).as_secs_f64();
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
                let rate = (p.bytes_acked.saturating_sub(a0) as f64 / dt) as u64;
                sample =
                    Some(LaneSample { pushing: true, rate: Some(rate), rtt_us: p.rtt_us, min_rtt_us: p.min_rtt_us });
            }
            self.window = Some((now, p.bytes_acked));
        }
        let want = {
            let mut st = self.gov.state.lock();
            st.lanes[self.index].pushing = true;
            if let Some(s) = sample {
                st.lanes[self.index] = s;
                if st.decided.is_none_or(|t| now.duration_since(t) >= SAMPLE_WINDOW) && self.gov.decide(&mut st, now) {
                    st.decided = Some(now);
                }
            }
            self.gov.want(&mut st, now, metrics)
        };
        if want != self.applied && conn.set_pacing(want) {
            self.applied = want;
        }
    }
}

impl Drop for Lane {
    /// A stream that is done leaves its share to the others.
    fn drop(&mut self) {
        self.gov.state.lock().lanes[self.index].pushing = false;
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
        /// A path of 100 us round trips, nothing acknowledged yet, unpaced.
        fn new() -> Path {
            Path { info: PathInfo { rtt_us: 100, min_rtt_us: 100, bytes_acked: 0 }, pace: None }
        }

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
        let mut g = Governor::new(0.75, None, 1).lane(0);
        let mut p = Path::new();
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
        let mut g = Governor::new(0.75, Some(10_000_000), 1).lane(0);
        let mut p = Path { pace: Some(10_000_000), ..Path::new() };
        for i in 0..=2 {
            p.advance(2_500_000, 100);
            g.tick(&mut p, ms(25 * i), &m);
        }
        g.demand(ms(60));
        g.tick(&mut p, ms(60), &m);
        assert_eq!(p.pace, Some(10_000_000));
        // A share of 1 never touches the pacing.
        let mut g = Governor::new(1.0, None, 1).lane(0);
        g.demand(ms(0));
        p.pace = Some(1);
        g.tick(&mut p, ms(30), &m);
        assert_eq!(p.pace, Some(1));
    }

    #[test]
    fn streams_share_one_estimate_and_a_finished_stream_leaves_its_share() {
        let m = SenderMetrics::default();
        let gov = Governor::new(0.75, None, 2);
        let (mut a, mut b) = (gov.lane(0), gov.lane(1));
        let (mut pa, mut pb) = (Path::new(), Path::new());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Unpaced, the link split unevenly: 80 and 20 MB/s (2 and 0.5 MB
        // per 25 ms), 100 MB/s in all.
        for i in 0..=4 {
            pa.advance(2_000_000, 100);
            a.tick(&mut pa, ms(25 * i), &m);
            pb.advance(500_000, 100);
            b.tick(&mut pb, ms(25 * i), &m);
        }
        assert_eq!((pa.pace, pb.pace), (None, None));
        // A fault: three quarters of the whole path's 100 MB/s, half each,
        // not three quarters of what each stream happened to get.
        a.demand(ms(101));
        a.tick(&mut pa, ms(101), &m);
        b.tick(&mut pb, ms(101), &m);
        assert_eq!(pa.pace, Some(37_500_000));
        assert_eq!(pb.pace, Some(37_500_000));
        assert_eq!(SenderMetrics::get(&m.push_yields), 1, "one yield, however many streams");
        // Queueing (the streams' mean round trip far above the minimum)
        // lowers both alike.
        pa.advance(900_000, 300);
        pb.advance(900_000, 500);
        a.demand(ms(126));
        a.tick(&mut pa, ms(126), &m);
        b.tick(&mut pb, ms(127), &m);
        a.demand(ms(150));
        a.tick(&mut pa, ms(152), &m);
        b.tick(&mut pb, ms(152), &m);
        assert!(pa.pace.unwrap() < 37_500_000 && pa.pace == pb.pace, "{:?} {:?}", pa.pace, pb.pace);
        // The second stream is done: the first takes the whole share.
        let before = pa.pace.unwrap();
        drop(b);
        a.tick(&mut pa, ms(153), &m);
        assert_eq!(pa.pace, Some(before * 2));
    }

    #[test]
    fn the_governor_decides_on_every_pushing_stream_and_only_those() {
        let m = SenderMetrics::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Both streams push, only one has measured: no estimate yet (one
        // stream's 80 MB/s is not the path's), so a fault does not pace.
        let gov = Governor::new(0.75, None, 2);
        let (mut a, mut b) = (gov.lane(0), gov.lane(1));
        let (mut pa, mut pb) = (Path::new(), Path::new());
        a.tick(&mut pa, ms(0), &m);
        b.tick(&mut pb, ms(0), &m);
        pa.advance(2_000_000, 100);
        a.tick(&mut pa, ms(25), &m);
        a.demand(ms(26));
        a.tick(&mut pa, ms(26), &m);
        assert_eq!(pa.pace, None, "paced on one stream's share of the path");
        // A stream that has not started (stream 0 scans for zero pages
        // first) holds nothing up: the one pushing is paced on its own.
        let gov = Governor::new(0.75, None, 2);
        let mut a = gov.lane(0);
        let _b = gov.lane(1);
        let mut pa = Path::new();
        a.tick(&mut pa, ms(0), &m);
        pa.advance(2_000_000, 100);
        a.tick(&mut pa, ms(25), &m);
        a.demand(ms(26));
        a.tick(&mut pa, ms(26), &m);
        assert_eq!(pa.pace, Some(60_000_000));
        // An estimate taken while the link all but stalled (40 KB/s) does
        // not pace the push below the floor.
        let gov = Governor::new(0.75, None, 1);
        let mut a = gov.lane(0);
        let mut pa = Path::new();
        a.tick(&mut pa, ms(0), &m);
        pa.advance(1_000, 100);
        a.tick(&mut pa, ms(25), &m);
        a.demand(ms(26));
        a.tick(&mut pa, ms(26), &m);
        assert_eq!(pa.pace, Some(MIN_PACE));
    }

    #[test]
    fn past_what_the_path_took_unpaced_the_estimate_grows_in_small_steps() {
        let m = SenderMetrics::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut g = Governor::new(0.75, None, 1).lane(0);
        let mut p = Path::new();
        // Unpaced: 100 MB/s.
        for i in 0..=4 {
            p.advance(2_500_000, 100);
            g.tick(&mut p, ms(25 * i), &m);
        }
        g.demand(ms(101));
        g.tick(&mut p, ms(101), &m);
        assert_eq!(p.pace, Some(75_000_000));
        // Keeping up without queueing, the guest idle again: the estimate
        // grows by a 128th (a 32nd would put the pace 3 % past the link
        // for a whole window), and the push runs at all of it.
        p.advance(2_500_000, 100);
        g.tick(&mut p, ms(130), &m);
        assert_eq!(p.pace, Some(100_000_000 + 100_000_000 / 128));
    }
}
