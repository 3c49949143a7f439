//! The destination's half of RDMA: it reads every post-copy page itself.
//!
//! * **Demand** (`DemandReader`, owned by the fault thread): the ranges
//!   the planner makes of a batch of faults become RDMA READs from the
//!   source's guest memory into registered staging slots, on a queue pair
//!   of their own, posted by the thread that read the faults; the same
//!   thread polls their completions and installs them (UFFDIO_COPY, or
//!   the alias and UFFDIO_CONTINUE). The source's CPU is not involved.
//! * **Background** (`Puller`, thread `pager-pull`): READs of every page
//!   neither present nor held, in address order, at most `rdma_window`
//!   bytes in flight on a second queue pair, so demand never queues
//!   behind them on the NIC.
//!
//! The claim rule holds because no READ ever targets guest memory: both
//! land in staging slots and go through the installer, which writes a
//! page only while it is missing and claimed (a late background copy of a
//! page the guest has written since is dropped). A slot is posted again
//! only after its completion was polled and its data installed. Every
//! request has its own id, the last of each batch is signaled (the send
//! queue guard, `rdma::queue`), and a READ outstanding past the peer
//! timeout is a dead link: RDMA itself never times out.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use parking_lot::Mutex;
use proto::session::{DestEvent, DestSession, SessionError};
use proto::wire::{Msg, PageKind};
use proto::{MemLayout, PageIdx, PageRange};
use rdma::queue::{SendQueue, WaitEnd};
use rdma::setup::{Answer, HEADER_BYTES, Offer, Ring};
use rdma::{Access, Device, MemoryRegion, Op, QpCaps, Remote, Sge, WcStatus};
use transport::{Conn, Wait};

use crate::error::PagerError;
use crate::install::Installer;
use crate::metrics::PagerMetrics;
use crate::shared::Shared;

/// What the fault thread tells the puller about demand: when it last read
/// for a fault, and how long demand READs take (the latest and the least).
#[derive(Debug, Default)]
pub(crate) struct DemandSignal {
    /// `Instant` of the last demand READ, as ns since `epoch`.
    last_ns: AtomicU64,
    /// Latency of the latest completed demand READ, ns.
    latest_ns: AtomicU64,
    /// Demand READs completed (a new sample when it moves).
    samples: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl DemandSignal {
    fn now_ns(&self) -> u64 {
        let e = *self.epoch.get_or_init(Instant::now);
        u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn read_posted(&self) {
        self.last_ns.store(self.now_ns().max(1), Ordering::Relaxed);
    }

    fn read_done(&self, latency: Duration) {
        self.latest_ns.store(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Release);
    }

    /// Whether the guest read for a fault within `within`.
    fn active(&self, within: Duration) -> bool {
        let last = self.last_ns.load(Ordering::Relaxed);
        last != 0 && self.now_ns().saturating_sub(last) < u64::try_from(within.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How the background yields to demand: while the guest faults (a demand
/// READ in the last `BUSY_FOR`), background bytes in flight are held to a
/// window that halves whenever a demand READ took more than twice the
/// least seen plus `SLACK`, and grows by a step for each one that did not
/// (a delay-based scavenger: the side that measures demand is the side
/// that schedules the background); it starts small each time the guest
/// starts faulting, so the least latency is learned on an empty queue.
/// Idle, the whole window is used.
const BUSY_FOR: Duration = Duration::from_millis(20);
const SLACK: Duration = Duration::from_micros(100);
const YIELD_STEP: u64 = 16 << 10;
/// Idle (no fault for `BUSY_FOR`), the background still keeps the queue it
/// builds short, so that the next fault, whenever it comes, does not meet
/// a full one: READs no longer than what the background delivers in
/// `IDLE_SERVICE` (the most a demand reply should wait behind one READ in
/// service: 32 KiB at 1 Gbit, a whole slot at 10), and a window that
/// shrinks by one READ when a background READ took more than the least of
/// the last two seconds plus `IDLE_TARGET`, and grows by one READ per
/// window's worth of READs that did not (LEDBAT's rule, on the READs' own
/// latency). The delivery rate is the most bytes completed in a
/// `RATE_WINDOW` over the last two seconds.
const IDLE_TARGET: Duration = Duration::from_micros(300);
const IDLE_SERVICE: Duration = Duration::from_micros(200);
const RATE_WINDOW: Duration = Duration::from_millis(50);

/// Demand staging slots (READs in flight at most).
const DEMAND_SLOTS: u32 = 32;
/// Bytes per staging slot (at least one page).
const SLOT_BYTES: u64 = 256 << 10;
/// One background completion per this many READs.
const BG_SIGNAL_EVERY: u32 = 4;

fn rdma_err(what: &str, e: impl std::fmt::Display) -> PagerError {
    PagerError::Rdma(format!("{what}: {e}"))
}

/// Registered staging memory cut into slots.
struct Staging {
    // The region first: deregistered before the memory goes.
    mr: Box<dyn MemoryRegion>,
    _mem: MmapMut,
    /// The mapping's start: slots are read through raw pointers, never a
    /// reference to the whole mapping (the NIC writes other slots meanwhile).
    base: usize,
    slot_bytes: u64,
    free: Vec<u32>,
}

impl Staging {
    fn new(dev: &dyn Device, slots: u32, slot_bytes: u64) -> Result<Staging, PagerError> {
        Staging::with_access(dev, slots, slot_bytes, Access::LOCAL)
    }

    fn with_access(dev: &dyn Device, slots: u32, slot_bytes: u64, access: Access) -> Result<Staging, PagerError> {
        let len = usize::try_from(u64::from(slots) * slot_bytes).map_err(|e| rdma_err("staging", e))?;
        let mut mem = MmapMut::map_anon(len).map_err(|e| rdma_err("staging", e))?;
        // SAFETY: the mapping lives in this struct next to its region, and
        // every queue pair that may write it is dropped first (field order of
        // the owners: queue before staging).
        let mr = unsafe { dev.register(mem.as_mut_ptr(), len, access) }
            .map_err(|e| rdma_err("registering staging memory", e))?;
        let base = mem.as_mut_ptr() as usize;
        Ok(Staging { mr, _mem: mem, base, slot_bytes, free: (0..slots).rev().collect() })
    }

    fn sge(&self, slot: u32, len: u64) -> Sge {
        debug_assert!(len <= self.slot_bytes);
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        Sge { addr: self.mr.addr() + u64::from(slot) * self.slot_bytes, len, lkey: self.mr.lkey() }
    }

    /// Write `v` at the start of a slot no request targets now.
    fn write_u32(&self, slot: u32, v: u32) {
        let at = usize::try_from(u64::from(slot) * self.slot_bytes).unwrap_or(usize::MAX);
        debug_assert!(self.slot_bytes >= 4);
        // SAFETY: inside the mapping (slot < slots); no request targets the
        // slot (the caller waited for its last SEND to complete).
        unsafe { std::ptr::write_unaligned((self.base + at) as *mut [u8; 4], v.to_le_bytes()) };
    }

    /// The bytes of a slot whose READ completed (no request targets it now).
    fn data(&self, slot: u32, len: u64) -> &[u8] {
        let at = usize::try_from(u64::from(slot) * self.slot_bytes).unwrap_or(usize::MAX);
        debug_assert!(len <= self.slot_bytes);
        // SAFETY: the slot lies inside the mapping, which lives as long as
        // `self`; its READ completed and the slot is not posted again until
        // the caller is done with these bytes (it holds `&self`, and posting
        // takes `&mut self` of the owner).
        unsafe { std::slice::from_raw_parts((self.base + at) as *const u8, usize::try_from(len).unwrap_or(0)) }
    }
}

/// Set-up state before switchover: both queue pairs connected.
pub(crate) struct DestRdma {
    pub(crate) demand: DemandReader,
    pub(crate) background: Option<Background>,
    pub(crate) device: String,
    pub(crate) registration: Duration,
}

/// Receive the source's offer, answer it, connect.
pub(crate) fn set_up(
    control: &mut dyn Conn,
    session: &mut DestSession,
    layout: &MemLayout,
    rc: &rdma::Config,
    key: Option<&[u8]>,
    window: u64,
    timeout: Duration,
) -> Result<DestRdma, PagerError> {
    let deadline = Instant::now() + timeout;
    let page_bytes = layout.page_size().bytes();
    let offer = loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(PagerError::Timeout { what: "the source's RDMA offer", after: timeout });
        };
        match session.on_recv(&msg)? {
            DestEvent::KeepAlive => {}
            DestEvent::RdmaSetup => {
                let Msg::RdmaSetup(b) = msg else { unreachable!("the session said RdmaSetup") };
                let body = proto::auth::open_setup(key, session.session(), 1, b).map_err(|e| rdma_err("offer", e))?;
                break Offer::decode(body, layout.n_pages(), page_bytes).map_err(|e| rdma_err("offer", e))?;
            }
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting the RDMA offer" }.into()),
        }
    };
    if offer.endpoints.len() != 2 {
        return Err(rdma_err("offer", format!("{} queue pairs, expected 2", offer.endpoints.len())));
    }
    let bind = control.local_ip().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let dev = rc.open(bind).map_err(|e| rdma_err("device", e))?;
    if (offer.device == "sim") != (dev.name() == "sim") {
        return Err(rdma_err(
            "device",
            format!(
                "the source uses {:?} and this side {:?}: both must use the software device, or both a real one",
                offer.device,
                dev.name()
            ),
        ));
    }
    let bg_slots = background_slots(window, page_bytes);
    let slot_bytes = SLOT_BYTES.max(page_bytes);
    let mut dq = dev.create_qp(qp_caps(DEMAND_SLOTS)).map_err(|e| rdma_err("queue pair", e))?;
    let (mut bq, ring) = if rc.write_background {
        // Receives for the WRITEs' immediates, and credit SENDs back.
        let caps = QpCaps { max_send_wr: bg_slots, max_recv_wr: bg_slots, cq_depth: 2 * bg_slots + 4 };
        let mut bq = dev.create_qp(caps).map_err(|e| rdma_err("queue pair", e))?;
        let mem = RingMem::new(&*dev, bg_slots, slot_bytes)?;
        // Every receive is posted before the source can write: a WRITE
        // with immediate that finds none fails the queue pair.
        mem.post_receives(&mut *bq)?;
        (bq, Some(mem))
    } else {
        (dev.create_qp(qp_caps(bg_slots)).map_err(|e| rdma_err("queue pair", e))?, None)
    };
    let answer = Answer { endpoints: vec![dq.endpoint(), bq.endpoint()], ring: ring.as_ref().map(RingMem::ring) };
    let sealed = proto::auth::seal_setup(key, session.session(), 2, &answer.encode());
    control.send(&Msg::RdmaSetup(&sealed))?;
    dq.connect(&offer.endpoints[0], deadline).map_err(|e| rdma_err("connecting", e))?;
    bq.connect(&offer.endpoints[1], deadline).map_err(|e| rdma_err("connecting", e))?;
    tracing::info!(
        device = dev.name(),
        background = if ring.is_some() { "written by the source" } else { "read" },
        "RDMA set up: post-copy pages come from the source's memory"
    );
    assemble(dev, offer, dq, bq, page_bytes, bg_slots, ring)
}

fn background_slots(window: u64, page_bytes: u64) -> u32 {
    u32::try_from((window / SLOT_BYTES.max(page_bytes)).clamp(1, 256)).unwrap_or(1)
}

fn qp_caps(slots: u32) -> QpCaps {
    QpCaps { max_send_wr: slots, max_recv_wr: 1, cq_depth: 2 * slots + 4 }
}

/// The readers over connected queue pairs (`dq` with [`DEMAND_SLOTS`]
/// send slots, `bq` with `bg_slots`): staging registered here.
fn assemble(
    dev: Arc<dyn Device>,
    offer: Offer,
    dq: Box<dyn rdma::QueuePair>,
    bq: Box<dyn rdma::QueuePair>,
    page_bytes: u64,
    bg_slots: u32,
    ring: Option<RingMem>,
) -> Result<DestRdma, PagerError> {
    let slot_bytes = SLOT_BYTES.max(page_bytes);
    let t = Instant::now();
    let d_stage = Staging::new(&*dev, DEMAND_SLOTS, slot_bytes)?;
    let b_stage = if ring.is_none() { Some(Staging::new(&*dev, bg_slots, slot_bytes)?) } else { None };
    let registration = t.elapsed();
    let offer = Arc::new(offer);
    let slot_pages = slot_bytes / page_bytes;
    let signal = Arc::new(DemandSignal::default());
    Ok(DestRdma {
        demand: DemandReader {
            signal: Arc::clone(&signal),
            sq: SendQueue::new(dq, DEMAND_SLOTS, 1, 1),
            stage: d_stage,
            offer: Arc::clone(&offer),
            page_bytes,
            slot_pages,
            backlog: VecDeque::new(),
            inflight: VecDeque::new(),
            done: Vec::new(),
            _dev: Arc::clone(&dev),
        },
        background: Some(match (ring, b_stage) {
            // Every credit SEND is signaled: a slot's credit buffer is reused
            // only once its last SEND completed, and that must come.
            (Some(mem), _) => Background::Written(RingReceiver {
                sq: SendQueue::new(bq, bg_slots, 1, 2),
                mem,
                slot_pages,
                page_bytes,
                _dev: Arc::clone(&dev),
            }),
            (None, Some(stage)) => Background::Read(Puller {
                signal,
                yield_to_demand: true,
                sq: SendQueue::new(bq, bg_slots, BG_SIGNAL_EVERY, 2),
                stage,
                offer,
                page_bytes,
                slot_pages,
                _dev: Arc::clone(&dev),
            }),
            (None, None) => unreachable!("staging is made when there is no ring"),
        }),
        device: dev.name().to_string(),
        registration,
    })
}

/// Cut `r` into READs of at most `slot_pages` that stay inside one source region.
fn pieces(offer: &Offer, r: PageRange, slot_pages: u64, page_bytes: u64, out: &mut VecDeque<PageRange>) {
    let mut p = r.first.0;
    while p < r.end() {
        let n = (r.end() - p).min(slot_pages);
        let n = offer.locate(p, n, page_bytes).map_or(n, |(_, _, n)| n);
        out.push_back(PageRange::new(PageIdx(p), n));
        p += n;
    }
}

/// The fault thread's READs.
pub(crate) struct DemandReader {
    // The queue first: gone before the staging it writes.
    sq: SendQueue<(u32, PageRange)>,
    signal: Arc<DemandSignal>,
    stage: Staging,
    offer: Arc<Offer>,
    page_bytes: u64,
    slot_pages: u64,
    /// Pieces waiting for a slot.
    backlog: VecDeque<PageRange>,
    /// When each READ in flight was posted, in order.
    inflight: VecDeque<Instant>,
    done: Vec<((u32, PageRange), WcStatus)>,
    _dev: Arc<dyn Device>,
}

impl DemandReader {
    /// Read `ranges` (faulting pages first: they are posted first).
    pub(crate) fn read(&mut self, ranges: &[PageRange], metrics: &PagerMetrics) -> Result<(), PagerError> {
        for r in ranges {
            pieces(&self.offer, *r, self.slot_pages, self.page_bytes, &mut self.backlog);
        }
        self.post(metrics)
    }

    fn post(&mut self, metrics: &PagerMetrics) -> Result<(), PagerError> {
        while let Some(r) = self.backlog.front().copied() {
            let Some(slot) = self.stage.free.pop() else { break };
            self.backlog.pop_front();
            let (addr, rkey, _) = self
                .offer
                .locate(r.first.0, r.n_pages, self.page_bytes)
                .ok_or_else(|| rdma_err("read", format!("page {} is in no region", r.first.0)))?;
            let len = r.n_pages * self.page_bytes;
            let last = self.backlog.is_empty() || self.stage.free.is_empty();
            // Stamped before posting: the NIC threads the post wakes may
            // preempt this one, and the stamp must not wait with it.
            let t = Instant::now();
            self.sq
                .post(Op::Read(Remote { addr, rkey }), self.stage.sge(slot, len), (slot, r), last)
                .map_err(|e| rdma_err("posting a demand read", e))?;
            self.inflight.push_back(t);
            self.signal.read_posted();
            PagerMetrics::add(&metrics.rdma_demand_reads, 1);
            PagerMetrics::add(&metrics.rdma_demand_bytes, len);
        }
        Ok(())
    }

    /// Install every READ that completed, post what waited for a slot, and
    /// arm the completion notification. Returns pages installed.
    pub(crate) fn complete(&mut self, inst: &Installer, metrics: &PagerMetrics) -> Result<u64, PagerError> {
        let mut newly = 0;
        loop {
            self.done.clear();
            let before = self.sq.completions;
            let n = self.sq.poll(&mut self.done).map_err(|e| rdma_err("demand completions", e))?;
            PagerMetrics::add(&metrics.rdma_demand_wc, self.sq.completions - before);
            if n == 0 {
                // Armed, then polled again: a completion in between is not lost.
                self.sq.arm().map_err(|e| rdma_err("arming", e))?;
                self.done.clear();
                let before = self.sq.completions;
                if self.sq.poll(&mut self.done).map_err(|e| rdma_err("demand completions", e))? == 0 {
                    return Ok(newly);
                }
                PagerMetrics::add(&metrics.rdma_demand_wc, self.sq.completions - before);
            }
            for i in 0..self.done.len() {
                let ((slot, r), status) = self.done[i];
                if status != WcStatus::Success {
                    return Err(rdma_err("demand read", format!("pages {}+{}: {status}", r.first.0, r.n_pages)));
                }
                if let Some(t) = self.inflight.pop_front() {
                    self.signal.read_done(t.elapsed());
                }
                let data = self.stage.data(slot, r.n_pages * self.page_bytes);
                newly += inst.install(r.first, data, PageKind::Demand)?;
                self.stage.free.push(slot);
            }
            self.post(metrics)?;
        }
    }

    /// How long the oldest READ in flight has waited.
    pub(crate) fn oldest_wait(&self) -> Option<Duration> {
        self.inflight.front().map(Instant::elapsed)
    }

    /// Polls readable once an armed completion arrived.
    pub(crate) fn readiness(&self) -> BorrowedFd<'_> {
        self.sq.readiness()
    }
}

/// The background READs, before they start.
pub(crate) struct Puller {
    signal: Arc<DemandSignal>,
    /// Whether to hold back while the guest faults (off over loopback,
    /// where there is no bottleneck queue to share).
    pub(crate) yield_to_demand: bool,
    sq: SendQueue<(u32, PageRange)>,
    stage: Staging,
    offer: Arc<Offer>,
    page_bytes: u64,
    slot_pages: u64,
    _dev: Arc<dyn Device>,
}

/// The running puller.
pub(crate) struct PullerHandle {
    stop: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl PullerHandle {
    /// Why it failed, if it did.
    pub(crate) fn check(&self) -> Result<(), PagerError> {
        match &*self.failed.lock() {
            Some(e) => Err(PagerError::Rdma(e.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for PullerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Puller {
    /// The next stretch of pages neither present nor held at or after `at`.
    fn next_missing(&self, inst: &Installer, mut at: u64, max_pages: u64) -> Option<PageRange> {
        let n = inst.map().layout().n_pages();
        let (present, held) = (inst.present(), inst.held());
        let p = loop {
            let p = present.next_with(at, false)?;
            if !held.get(p) {
                break p;
            }
            at = held.next_with_below(p.0, n, false)?.0;
        };
        let mut end = (p.0 + max_pages.clamp(1, self.slot_pages)).min(n);
        if let Some(q) = present.next_with_below(p.0, end, true) {
            end = q.0;
        }
        if let Some(q) = held.next_with_below(p.0, end, true) {
            end = q.0;
        }
        let len = self.offer.locate(p.0, end - p.0, self.page_bytes).map_or(end - p.0, |(_, _, k)| k);
        Some(PageRange::new(p, len))
    }

    fn run(
        mut self,
        inst: &Installer,
        shared: &Shared,
        metrics: &PagerMetrics,
        stop: &AtomicBool,
        peer_timeout: Duration,
    ) -> Result<(), PagerError> {
        let n = inst.map().layout().n_pages();
        let full = u64::from(self.sq.room()) * self.slot_pages * self.page_bytes;
        let mut cursor = 0u64;
        // (posted, bytes) of each READ in flight, in order.
        let mut inflight: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut in_bytes = 0u64;
        let mut done = Vec::new();
        let mut window = full;
        let (mut least, mut seen) = (u64::MAX, 0u64);
        let mut was_active = false;
        // The idle window, and the least background latency of this second and the last.
        let mut idle_window = full;
        let (mut bg_min, mut bg_min_prev, mut bg_min_at) = (u64::MAX, u64::MAX, Instant::now());
        let mut grow = 0u64;
        // Bytes completed in the current rate window, and the best rate (bytes/s) lately.
        let (mut rate_bytes, mut rate_at, mut rate_best, mut rate_best_at) =
            (0u64, Instant::now(), 0u64, Instant::now());
        let slot_bytes = self.slot_pages * self.page_bytes;
        loop {
            if stop.load(Ordering::Acquire) || shared.check().is_err() {
                return Ok(());
            }
            let active = self.yield_to_demand && self.signal.active(BUSY_FOR);
            if active && !was_active {
                // Start small when the guest starts faulting: a window that
                // starts full would queue the first demand READs behind it,
                // and the least latency seen (the baseline) would be learned
                // from a full queue and never let the window shrink.
                window = window.min(4 * YIELD_STEP);
            }
            was_active = active;
            let budget = if active {
                let s = self.signal.samples.load(Ordering::Acquire);
                if s != seen {
                    seen = s;
                    let lat = self.signal.latest_ns.load(Ordering::Relaxed);
                    least = least.min(lat);
                    let slack = u64::try_from(SLACK.as_nanos()).unwrap_or(0);
                    window = if lat > 2 * least + slack {
                        (window / 2).max(YIELD_STEP)
                    } else {
                        (window + YIELD_STEP).min(full)
                    };
                }
                window
            } else if self.yield_to_demand {
                idle_window
            } else {
                full
            };
            // While faulting the window bounds each READ already.
            let idle_read = if rate_best == 0 {
                slot_bytes
            } else {
                let b =
                    u64::try_from(u128::from(rate_best) * IDLE_SERVICE.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX);
                b.clamp(YIELD_STEP, slot_bytes)
            };
            let read_cap = if self.yield_to_demand && !active { idle_read } else { u64::MAX };
            // Post while slots are free and the budget allows. The next READ
            // is found before this one is posted: the last of a batch must be
            // signaled, or the unsignaled ones before it never complete.
            let max_pages = |in_bytes: u64| ((budget.saturating_sub(in_bytes)).min(read_cap) / self.page_bytes).max(1);
            let mut next = None;
            if !self.stage.free.is_empty() && in_bytes < budget {
                next = self.next_missing(inst, cursor, max_pages(in_bytes));
                if next.is_none() {
                    // Nothing missing from here to the end.
                    cursor = n;
                }
            }
            while let Some(r) = next.take() {
                let slot = self.stage.free.pop().expect("a free slot: checked before looking");
                let (addr, rkey, _) = self
                    .offer
                    .locate(r.first.0, r.n_pages, self.page_bytes)
                    .ok_or_else(|| rdma_err("read", format!("page {} is in no region", r.first.0)))?;
                let len = r.n_pages * self.page_bytes;
                cursor = r.end();
                if !self.stage.free.is_empty() && in_bytes + len < budget {
                    next = self.next_missing(inst, cursor, max_pages(in_bytes + len));
                    if next.is_none() {
                        cursor = n;
                    }
                }
                let last = next.is_none();
                let t = Instant::now();
                self.sq
                    .post(Op::Read(Remote { addr, rkey }), self.stage.sge(slot, len), (slot, r), last)
                    .map_err(|e| rdma_err("posting a background read", e))?;
                inflight.push_back((t, len));
                in_bytes += len;
                PagerMetrics::add(&metrics.rdma_bg_reads, 1);
                PagerMetrics::add(&metrics.rdma_bg_bytes, len);
            }
            if inflight.is_empty() {
                if inst.complete() {
                    return Ok(());
                }
                // Every page was read once; what is still missing waits on a
                // demand read or an install in progress. Look again shortly.
                std::thread::sleep(Duration::from_millis(5));
                cursor = 0;
                continue;
            }
            // Wait for completions.
            done.clear();
            let before = self.sq.completions;
            let mut k = self.sq.poll(&mut done).map_err(|e| rdma_err("background completions", e))?;
            if k == 0 {
                self.sq.arm().map_err(|e| rdma_err("arming", e))?;
                k = self.sq.poll(&mut done).map_err(|e| rdma_err("background completions", e))?;
                if k == 0 {
                    let mut fds = [nix::poll::PollFd::new(self.sq.readiness(), nix::poll::PollFlags::POLLIN)];
                    // Short while yielding: the budget may grow again soon.
                    let ms: u8 = if budget < full { 1 } else { 20 };
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
                    if inflight.front().is_some_and(|(t, _)| t.elapsed() > peer_timeout) {
                        return Err(rdma_err(
                            "background read",
                            format!("no completion for {peer_timeout:?}: the source is presumed dead"),
                        ));
                    }
                    continue;
                }
            }
            PagerMetrics::add(&metrics.rdma_bg_wc, self.sq.completions - before);
            let mut latency = None;
            for &((slot, r), status) in &done {
                if status != WcStatus::Success {
                    return Err(rdma_err("background read", format!("pages {}+{}: {status}", r.first.0, r.n_pages)));
                }
                if let Some((t, b)) = inflight.pop_front() {
                    in_bytes -= b;
                    rate_bytes += b;
                    // The last of a group is the signaled one: its latency is exact.
                    latency = Some(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                let data = self.stage.data(slot, r.n_pages * self.page_bytes);
                inst.install_background(r.first, data, PageKind::Push)?;
                self.stage.free.push(slot);
            }
            if rate_at.elapsed() >= RATE_WINDOW {
                let r = u64::try_from(u128::from(rate_bytes) * 1_000_000_000 / rate_at.elapsed().as_nanos().max(1))
                    .unwrap_or(u64::MAX);
                if r >= rate_best || rate_best_at.elapsed() > Duration::from_secs(2) {
                    (rate_best, rate_best_at) = (r, Instant::now());
                }
                (rate_bytes, rate_at) = (0, Instant::now());
            }
            if let (Some(d), true) = (latency, self.yield_to_demand) {
                if bg_min_at.elapsed() > Duration::from_secs(1) {
                    (bg_min_prev, bg_min, bg_min_at) = (bg_min, u64::MAX, Instant::now());
                }
                bg_min = bg_min.min(d);
                let base = bg_min.min(bg_min_prev);
                if d > base.saturating_add(u64::try_from(IDLE_TARGET.as_nanos()).unwrap_or(0)) {
                    idle_window = idle_window.saturating_sub(idle_read).max(idle_read);
                    grow = 0;
                } else {
                    grow += idle_read;
                    if grow >= idle_window {
                        idle_window = (idle_window + idle_read).min(full);
                        grow = 0;
                    }
                }
            }
        }
    }
}

/// How the background arrives.
pub(crate) enum Background {
    /// This side READs it (`pager-pull`).
    Read(Puller),
    /// The source WRITEs it into the staging ring (`pager-ring`).
    Written(RingReceiver),
}

impl Background {
    /// Start it on its own thread.
    pub(crate) fn spawn(
        self,
        inst: Arc<Installer>,
        shared: Arc<Shared>,
        metrics: Arc<PagerMetrics>,
        peer_timeout: Duration,
        nice: i32,
        yield_to_demand: bool,
    ) -> Result<PullerHandle, PagerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (s, f) = (Arc::clone(&stop), Arc::clone(&failed));
        let name = match &self {
            Background::Read(_) => "pager-pull",
            Background::Written(_) => "pager-ring",
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                transport::sched::set_thread_nice(nice);
                let r = match self {
                    Background::Read(mut p) => {
                        p.yield_to_demand = yield_to_demand;
                        p.run(&inst, &shared, &metrics, &s, peer_timeout)
                    }
                    Background::Written(r) => r.run(&inst, &shared, &metrics, &s, peer_timeout),
                };
                if let Err(e) = r {
                    tracing::warn!("background RDMA stopped: {}", crate::error::error_chain(&e));
                    *f.lock() = Some(crate::error::error_chain(&e));
                }
            })
            .map_err(|e| PagerError::Spawn { what: name, source: e })?;
        Ok(PullerHandle { stop, failed, thread: Some(thread) })
    }
}

/// The staging ring the source WRITEs into: `slots` data slots and after
/// them (in the same region, one key) a 16-byte header per slot; and a
/// buffer per slot for the credit SEND that gives it back.
pub(crate) struct RingMem {
    data: Staging,
    credits: Staging,
    slots: u32,
}

impl RingMem {
    fn new(dev: &dyn Device, slots: u32, slot_bytes: u64) -> Result<RingMem, PagerError> {
        // One slot more holds the headers (256 * 16 bytes fit any slot).
        debug_assert!(u64::from(slots) * HEADER_BYTES <= slot_bytes);
        Ok(RingMem {
            data: Staging::with_access(dev, slots + 1, slot_bytes, Access::REMOTE_WRITE)?,
            credits: Staging::new(dev, slots, 16)?,
            slots,
        })
    }

    fn header_at(&self, slot: u32) -> u64 {
        u64::from(self.slots) * self.data.slot_bytes + u64::from(slot) * HEADER_BYTES
    }

    fn ring(&self) -> Ring {
        Ring {
            addr: self.data.mr.addr(),
            headers: self.data.mr.addr() + self.header_at(0),
            rkey: self.data.mr.rkey(),
            slots: self.slots,
            slot_bytes: self.data.slot_bytes,
        }
    }

    /// A receive for a WRITE with immediate (it carries no bytes).
    fn recv_wr(&self, slot: u32) -> rdma::RecvWr {
        rdma::RecvWr {
            wr_id: u64::from(slot),
            sge: Sge { addr: self.data.mr.addr(), len: 0, lkey: self.data.mr.lkey() },
        }
    }

    /// One receive per slot (a WRITE with immediate consumes one).
    fn post_receives(&self, qp: &mut dyn rdma::QueuePair) -> Result<(), PagerError> {
        for s in 0..self.slots {
            qp.post_recv(&self.recv_wr(s)).map_err(|e| rdma_err("posting a receive", e))?;
        }
        Ok(())
    }

    /// The header the source wrote for `slot` (its WRITE completed: the
    /// receive for it did).
    fn header(&self, slot: u32) -> (u64, u32) {
        let at = usize::try_from(self.header_at(slot)).unwrap_or(usize::MAX);
        // SAFETY: inside the ring's mapping; the source writes this header
        // only for a slot it holds, and it gave `slot` to us.
        let h: [u8; 16] = unsafe { std::ptr::read_unaligned((self.data.base + at) as *const [u8; 16]) };
        Ring::parse_header(&h)
    }
}

/// The background written by the source: each WRITE with immediate names
/// a slot whose pages are installed (checked against the guest first: the
/// header is the peer's), then the slot goes back with a SEND of its index.
pub(crate) struct RingReceiver {
    // The queue first: gone before the ring the source writes.
    sq: SendQueue<u32>,
    mem: RingMem,
    slot_pages: u64,
    page_bytes: u64,
    _dev: Arc<dyn Device>,
}

impl RingReceiver {
    fn run(
        mut self,
        inst: &Installer,
        shared: &Shared,
        metrics: &PagerMetrics,
        stop: &AtomicBool,
        peer_timeout: Duration,
    ) -> Result<(), PagerError> {
        let layout = inst.map().layout().clone();
        let mut done = Vec::new();
        let mut recvs = Vec::new();
        let mut last_rx = Instant::now();
        loop {
            if stop.load(Ordering::Acquire) || shared.check().is_err() {
                return Ok(());
            }
            if inst.complete() {
                // The ring stays registered until the run ends (the handle
                // stops this thread): the source may still be writing into
                // it, and its key must not name freed memory meanwhile.
                while !stop.load(Ordering::Acquire) && shared.check().is_ok() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(());
            }
            done.clear();
            recvs.clear();
            let mut k = self.sq.poll_with_recvs(&mut done, Some(&mut recvs)).map_err(|e| rdma_err("ring", e))?;
            if k == 0 {
                self.sq.arm().map_err(|e| rdma_err("arming", e))?;
                k = self.sq.poll_with_recvs(&mut done, Some(&mut recvs)).map_err(|e| rdma_err("ring", e))?;
            }
            if k == 0 {
                let mut fds = [nix::poll::PollFd::new(self.sq.readiness(), nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u8));
                if last_rx.elapsed() > peer_timeout {
                    return Err(rdma_err(
                        "background writes",
                        format!("none for {peer_timeout:?} with pages missing: the source is presumed dead"),
                    ));
                }
                continue;
            }
            for &(slot, st) in &done {
                if st != WcStatus::Success {
                    return Err(rdma_err("giving back ring slot", format!("{slot}: {st}")));
                }
            }
            let mut pending: VecDeque<rdma::Completion> = recvs.drain(..).collect();
            while let Some(c) = pending.pop_front() {
                if c.status != WcStatus::Success {
                    return Err(rdma_err("ring receive", c.status));
                }
                last_rx = Instant::now();
                let rdma::WcOp::Recv { imm: Some(slot) } = c.op else {
                    return Err(rdma_err("ring", "a receive without an immediate"));
                };
                if slot >= self.mem.slots {
                    return Err(rdma_err("ring", format!("the source wrote slot {slot} of {}", self.mem.slots)));
                }
                let (first, n) = self.mem.header(slot);
                let n = u64::from(n);
                if n == 0 || n > self.slot_pages || !layout.contains_range(PageIdx(first), n) {
                    return Err(rdma_err("ring", format!("the source wrote pages {first}+{n} in a slot")));
                }
                let data = self.mem.data.data(slot, n * self.page_bytes);
                inst.install_background(PageIdx(first), data, PageKind::Push)?;
                PagerMetrics::add(&metrics.rdma_ring_receives, 1);
                PagerMetrics::add(&metrics.rdma_bg_bytes, n * self.page_bytes);
                // The receive goes back before the slot does: the source can
                // then never write into a slot without one waiting.
                self.sq.post_recv(&self.mem.recv_wr(slot)).map_err(|e| rdma_err("posting a receive", e))?;
                // The slot's credit buffer is reused only once its last SEND
                // completed (the NIC may still be reading it).
                let end = self
                    .sq
                    .wait_for(|s| *s == slot, &mut recvs, stop, peer_timeout)
                    .map_err(|e| rdma_err("giving back a ring slot", e))?;
                pending.extend(recvs.drain(..));
                match end {
                    WaitEnd::Done => {}
                    WaitEnd::Stopped => return Ok(()),
                    WaitEnd::TimedOut => {
                        let why = format!("a slot's credit SEND had no completion for {peer_timeout:?}");
                        return Err(rdma_err("ring", why));
                    }
                }
                self.mem.credits.write_u32(slot, slot);
                let last = pending.is_empty();
                self.sq
                    .post(Op::Send, self.mem.credits.sge(slot, 4), slot, last)
                    .map_err(|e| rdma_err("giving back a ring slot", e))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::tests::{N, PG, fixture, read};
    use rdma::setup::RemoteRegion;
    use rdma::sim::{SimConfig, SimDevice};
    use std::net::{IpAddr, Ipv4Addr};

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// The source's memory (page p holds `p % 251 + 1`) and the queue
    /// pairs the destination reads it through; the destination's
    /// background queue pair waits `bg_delay_us` before each READ.
    fn connected(bg_delay_us: u32) -> (Vec<u8>, Box<dyn MemoryRegion>, Vec<rdma::sim::SimQp>, DestRdma) {
        connected_with(bg_delay_us, 9, 50)
    }

    fn connected_with(
        bg_delay_us: u32,
        seed: u64,
        max_delay_us: u32,
    ) -> (Vec<u8>, Box<dyn MemoryRegion>, Vec<rdma::sim::SimQp>, DestRdma) {
        let sdev = SimDevice::open(LO, SimConfig { seed, max_delay_us });
        let ddev = SimDevice::open(LO, SimConfig { seed: seed + 1, max_delay_us });
        let len = usize::try_from(N).unwrap() * PG;
        let mut src: Vec<u8> = (0..len).map(|i| u8::try_from((i / PG) % 251).unwrap() + 1).collect();
        // SAFETY: `src` outlives the region and the queue pairs (returned together, dropped by the test after).
        let mr = unsafe { rdma::Device::register(&*sdev, src.as_mut_ptr(), len, Access::REMOTE_READ) }.unwrap();
        let mut sq: Vec<_> = (0..2).map(|_| sdev.create_sim_qp(qp_caps(4)).unwrap()).collect();
        let dq = ddev.create_sim_qp(qp_caps(DEMAND_SLOTS)).unwrap();
        let bq = ddev.create_sim_qp(qp_caps(4)).unwrap();
        bq.set_delay_us(bg_delay_us);
        let (mut dq, mut bq): (Box<dyn rdma::QueuePair>, Box<dyn rdma::QueuePair>) = (Box::new(dq), Box::new(bq));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (e0, e1) = (rdma::QueuePair::endpoint(&sq[0]), rdma::QueuePair::endpoint(&sq[1]));
        let (d0, d1) = (dq.endpoint(), bq.endpoint());
        let t = std::thread::spawn(move || {
            rdma::QueuePair::connect(&mut sq[0], &d0, deadline).unwrap();
            rdma::QueuePair::connect(&mut sq[1], &d1, deadline).unwrap();
            sq
        });
        dq.connect(&e0, deadline).unwrap();
        bq.connect(&e1, deadline).unwrap();
        let sq = t.join().unwrap();
        let offer = Offer {
            device: "sim".into(),
            endpoints: vec![],
            regions: vec![RemoteRegion { first_page: 0, n_pages: N, addr: mr.addr(), rkey: mr.rkey() }],
        };
        let dev: Arc<dyn Device> = ddev;
        let r = assemble(dev, offer, dq, bq, PG as u64, 4, None).unwrap();
        (src, mr, sq, r)
    }

    #[test]
    fn a_late_background_read_never_lands_on_a_page_the_guest_wrote_and_demand_does_not_wait_for_it() {
        for shmem in [false, true] {
            let f = fixture(shmem);
            f.inst.begin_postcopy();
            // The background READs (page 0 among the first) are held up on
            // their queue pair, as a slow queue or a long path would.
            let (_src, _mr, _sq, mut r) = connected(200_000);
            let puller = r
                .background
                .take()
                .unwrap()
                .spawn(
                    Arc::clone(&f.inst),
                    Arc::new(Shared::default()),
                    Arc::clone(&f.metrics),
                    Duration::from_secs(10),
                    0,
                    false,
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            assert!(PagerMetrics::get(&f.metrics.rdma_bg_reads) > 0, "the background READs are posted");
            // A fault on page 0: its READ goes on the demand queue pair and
            // completes while the background READ of the same page waits.
            r.demand.read(&[PageRange::new(PageIdx(0), 1)], &f.metrics).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !f.inst.present().get(PageIdx(0)) {
                r.demand.complete(&f.inst, &f.metrics).unwrap();
                assert!(Instant::now() < deadline, "the demand READ did not complete");
            }
            assert_eq!(PagerMetrics::get(&f.metrics.rdma_bg_wc), 0, "demand waited behind the background");
            assert_eq!(read(&f, 0), 1);
            // The guest writes the page it was given.
            // SAFETY: page 0 is present (mapped): an ordinary store by "the guest".
            unsafe { std::ptr::write_volatile(f.guest.as_mut_ptr(), 0xEE) };
            // The late background copy of page 0 lands in its staging slot
            // and is dropped by the installer; the rest arrives.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !f.inst.complete() {
                puller.check().unwrap();
                std::thread::sleep(Duration::from_millis(5));
                assert!(Instant::now() < deadline, "the background did not finish");
            }
            drop(puller);
            assert_eq!(read(&f, 0), 0xEE, "shmem={shmem}: a late READ clobbered the guest's write");
            for p in 1..N {
                assert_eq!(read(&f, p), u8::try_from(p % 251).unwrap() + 1, "shmem={shmem} page {p}");
            }
            assert!(PagerMetrics::get(&f.metrics.pages_duplicate) >= 1, "shmem={shmem}");
        }
    }

    /// Under seeded random delays on both queue pairs, with faults at
    /// random pages while the background runs: every page lands exactly
    /// once with the source's bytes, and no demand READ waits for the
    /// background (whose every READ is held back 50 ms more).
    #[test]
    fn every_page_lands_once_and_demand_never_waits_for_the_background() {
        for seed in [1u64, 7, 42, 1234] {
            for shmem in [false, true] {
                let f = fixture(shmem);
                f.inst.begin_postcopy();
                let (_src, _mr, _sq, mut r) = connected_with(50_000, seed, 300);
                let bg = r.background.take().unwrap();
                let puller = bg
                    .spawn(
                        Arc::clone(&f.inst),
                        Arc::new(Shared::default()),
                        Arc::clone(&f.metrics),
                        Duration::from_secs(20),
                        0,
                        false,
                    )
                    .unwrap();
                let mut x = seed;
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut worst = Duration::ZERO;
                for _ in 0..40 {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let p = PageIdx((x >> 33) % N);
                    if f.inst.present().get(p) {
                        continue;
                    }
                    let t = Instant::now();
                    r.demand.read(&[PageRange::new(p, (1 + (x >> 60)).min(N - p.0))], &f.metrics).unwrap();
                    while !f.inst.present().get(p) {
                        r.demand.complete(&f.inst, &f.metrics).unwrap();
                        assert!(Instant::now() < deadline);
                    }
                    worst = worst.max(t.elapsed());
                }
                // Every demand READ came back well inside one held-back
                // background READ.
                assert!(worst < Duration::from_millis(50), "seed {seed}: a demand read took {worst:?}");
                while !f.inst.complete() {
                    puller.check().unwrap();
                    r.demand.complete(&f.inst, &f.metrics).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    assert!(Instant::now() < deadline, "seed {seed}: the background did not finish");
                }
                drop(puller);
                for p in 0..N {
                    assert_eq!(read(&f, p), u8::try_from(p % 251).unwrap() + 1, "seed {seed} shmem={shmem} page {p}");
                }
                // Installed exactly once each: the rest were counted as duplicates.
                let once = PagerMetrics::get(&f.metrics.pages_demand) + PagerMetrics::get(&f.metrics.pages_push);
                assert_eq!(once, N, "seed {seed} shmem={shmem}");
                assert_eq!(PagerMetrics::get(&f.metrics.pages_present), N);
            }
        }
    }
}
