//! The destination's whole run: handshake, guest memory registration,
//! switchover, the fault loop and the bulk receiver, completion.
//!
//! Threads: the caller's thread runs the handshake and then the fault loop;
//! one more thread receives the bulk connection. They share an [`Installer`]
//! and a [`Shared`] block of flags. Any failure of either ends the run with
//! an error (sent to the source too, best effort): a pager that cannot serve
//! faults must not leave the guest hanging without saying so.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::session::{Accepted, DestBulk, DestEvent, DestExpect, DestSession, SessionError};
use proto::wire::{ErrorCode, Msg, ResumeTimes, SourceStats};
use proto::{LatencyHist, PageBitmap};
use transport::{Conn, TransportError, Wait};

use crate::fault::FaultLoop;
use crate::guest::{DestGuest, GuestError};
use crate::install::{GuestMap, Installer};
use crate::metrics::{PagerMetrics, Phase};
use crate::planner::{Prefetch, PrefetchMode};
use crate::uffd::{UffdError, Userfault};

/// Why the destination's run failed.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// A connection failed.
    #[error("connection to the source failed")]
    Transport(#[from] TransportError),
    /// The source broke the protocol, or reported an error.
    #[error("session with the source failed")]
    Session(#[from] SessionError),
    /// userfaultfd failed.
    #[error("userfaultfd failed")]
    Uffd(#[from] UffdError),
    /// The guest failed.
    #[error("guest failed: {0}")]
    Guest(GuestError),
    /// Nothing arrived from the source for too long.
    #[error("no data from the source for {0:?}: presumed dead")]
    PeerSilent(Duration),
    /// A step did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A fault arrived for memory that is not the guest's.
    #[error("fault at {0:#x}, outside guest memory")]
    StrayFault(usize),
    /// poll failed.
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    /// The bulk receiver failed.
    #[error("bulk connection failed")]
    Bulk(#[source] Box<PagerError>),
    /// The source hung up while guest memory was being prepared; the work
    /// stopped there.
    #[error("the source went away while guest memory was being prepared")]
    SourceGone,
}

impl PagerError {
    fn code(&self) -> ErrorCode {
        match self {
            PagerError::Session(e) => e.code(),
            _ => ErrorCode::Internal,
        }
    }
}

/// How the destination behaves.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Pages asked for per fault; `None` takes what the source asked for
    /// (and the default if it asked for nothing).
    pub prefetch: Option<Prefetch>,
    /// What the source must offer.
    pub expect: DestExpect,
    /// Longest wait for the hello and the bulk connection.
    pub handshake_timeout: Duration,
    /// The source is presumed dead after this long without a byte.
    pub peer_timeout: Duration,
    /// Send a keep-alive when idle this long.
    pub keepalive: Duration,
    /// Ask again for pages whose reply has not come after this long.
    pub retry_after: Duration,
    /// Nice value of the bulk receiver and the page mapper (see
    /// `transport::sched`); `None` picks by mode (see [`default_nice`]).
    pub background_nice: Option<i32>,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            prefetch: None,
            expect: DestExpect::default(),
            handshake_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            keepalive: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            background_nice: None,
        }
    }
}

/// The bulk threads' nice value when none is configured. Measured here (two
/// CPUs): in hybrid and precopy modes the guest runs flat out next to the
/// push, its receiver and the page mapper, and a demand-path thread sometimes
/// waits out a CPU-bound thread's slice: fault p99 1.1-3.3 ms at nice 0,
/// 85-152 us at nice 10. In pure postcopy the vCPU mostly waits on faults,
/// and nice 10 made p99 worse (84-235 us against 64-67 us), so it stays 0.
pub fn default_nice(mode: proto::wire::Mode) -> i32 {
    match mode {
        proto::wire::Mode::Postcopy => 0,
        proto::wire::Mode::Hybrid | proto::wire::Mode::Precopy => 10,
    }
}

/// Flags shared by the fault loop and the bulk receiver.
#[derive(Debug)]
pub(crate) struct Shared {
    epoch: Instant,
    abort: AtomicBool,
    switched: AtomicBool,
    push_done: AtomicBool,
    rounds_done: AtomicU32,
    bulk_last_rx_ms: AtomicU64,
    bulk_failed: AtomicBool,
    bulk_error: Mutex<Option<PagerError>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            epoch: Instant::now(),
            abort: AtomicBool::new(false),
            switched: AtomicBool::new(false),
            push_done: AtomicBool::new(false),
            rounds_done: AtomicU32::new(0),
            bulk_last_rx_ms: AtomicU64::new(0),
            bulk_failed: AtomicBool::new(false),
            bulk_error: Mutex::new(None),
        }
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }
    pub(crate) fn switched(&self) -> bool {
        self.switched.load(Ordering::Acquire)
    }
    pub(crate) fn push_done(&self) -> bool {
        self.push_done.load(Ordering::Acquire)
    }
    pub(crate) fn set_push_done(&self) {
        self.push_done.store(true, Ordering::Release);
    }
    pub(crate) fn round_done(&self) {
        self.rounds_done.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn touch_bulk(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.bulk_last_rx_ms.store(ms, Ordering::Relaxed);
    }
    pub(crate) fn bulk_last_rx(&self) -> Instant {
        self.epoch + Duration::from_millis(self.bulk_last_rx_ms.load(Ordering::Relaxed))
    }
    pub(crate) fn fail_bulk(&self, e: PagerError) {
        *self.bulk_error.lock() = Some(e);
        self.bulk_failed.store(true, Ordering::Release);
    }
    /// Surface a bulk receiver failure in the caller's thread.
    pub(crate) fn check_bulk(&self) -> Result<(), PagerError> {
        if self.bulk_failed.load(Ordering::Acquire) {
            let e = self.bulk_error.lock().take();
            return Err(PagerError::Bulk(Box::new(
                e.unwrap_or(PagerError::Timeout { what: "bulk error", after: Duration::ZERO }),
            )));
        }
        Ok(())
    }
}

/// What the destination measured.
#[derive(Clone, Debug)]
pub struct PagerReport {
    /// What was negotiated.
    pub accepted: Accepted,
    /// The prefetch window in force.
    pub prefetch: Prefetch,
    /// Pages outstanding at switchover.
    pub outstanding_pages: u64,
    /// First byte of the handshake to the completion acknowledgement.
    pub total_time: Duration,
    /// Creating (and populating) guest memory and registering it, before
    /// the hello is acknowledged (the guest still runs on the source).
    pub setup_time: Duration,
    /// Switchover received to guest resumed.
    pub resume_time: Duration,
    /// Guest resumed to every page present.
    pub postcopy_time: Duration,
    /// When the run started (the server hello).
    pub started: Instant,
    /// When the guest resumed here.
    pub resumed: Instant,
    /// The parts of the destination's downtime.
    pub resume: ResumeTimes,
    /// The source's figures.
    pub source: SourceStats,
    /// Fault latency (event read to page installed), faults served over the network.
    pub fault_latency: LatencyHist,
    /// Fault latency of faults on held pages (mapped locally).
    pub fault_latency_local: LatencyHist,
    /// Block time per faulting thread id, ns.
    pub blocktime_ns: Vec<(u32, u64)>,
}

/// A finished run: the guest (running on, all memory local) and the report.
pub struct Outcome<G> {
    /// The guest.
    pub guest: G,
    /// The figures.
    pub report: PagerReport,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    u64::from_le_bytes(b)
}

/// Best effort: tell the source why we stop.
fn send_error(conn: &mut dyn Conn, e: &PagerError) {
    let text = format!("destination: {}", error_chain(e));
    let _ = conn.send(&Msg::Error { code: e.code(), message: &text });
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Run the destination side over `control` (already connected); the bulk
/// connection comes from `accept_bulk`; `make_guest` builds the guest (and
/// its memory) once the layout is known.
///
/// `make_guest` must stop early (and may return anything) once its cancel
/// flag is set: the pager sets it when the source hangs up meanwhile, so a
/// peer that announces a guest and leaves does not keep the host busy.
pub fn run<G: DestGuest>(
    mut control: Box<dyn Conn>,
    accept_bulk: impl FnOnce(Instant) -> Result<Box<dyn Conn>, TransportError>,
    make_guest: impl FnOnce(&Accepted, &AtomicBool) -> Result<G, GuestError>,
    cfg: &PagerConfig,
    metrics: Arc<PagerMetrics>,
) -> Result<Outcome<G>, PagerError> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let mut session = DestSession::new(cfg.expect.clone(), nonce, random_u64());
    let mut run = Run { control: &mut *control, session: &mut session, cfg, metrics, started: Instant::now() };
    match run.go(accept_bulk, make_guest) {
        Ok(o) => Ok(o),
        Err(e) => {
            send_error(&mut *control, &e);
            Err(e)
        }
    }
}

/// Run `prepare` (allocating and populating guest memory: seconds per GiB)
/// while a watcher polls the control connection for a hang-up; a hang-up
/// sets the cancel flag `prepare` watches, and the run fails with
/// [`PagerError::SourceGone`] instead of finishing work no one will use.
fn prepare_watching<G>(
    fd: BorrowedFd<'_>,
    prepare: impl FnOnce(&AtomicBool) -> Result<G, GuestError>,
) -> Result<G, PagerError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let cancel = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let watch = || {
            // nix names no POLLRDHUP (the peer shut its side; Linux 0x2000),
            // and its `revents()` is None for a bit it does not know: only
            // RDHUP is asked for, and HUP and ERR are always reported, so
            // any event at all means the source is gone.
            let rdhup = PollFlags::from_bits_retain(0x2000);
            while !done.load(Ordering::Acquire) {
                let mut fds = [PollFd::new(fd, rdhup)];
                if let Ok(n) = poll(&mut fds, PollTimeout::from(50u8))
                    && n > 0
                {
                    tracing::warn!("the source hung up while guest memory was being prepared: stopping");
                    cancel.store(true, Ordering::Release);
                    return;
                }
            }
        };
        // Without a watcher thread the work still finishes, only unwatched.
        let _watcher = std::thread::Builder::new().name("pager-watch".into()).spawn_scoped(s, watch);
        let r = prepare(&cancel);
        done.store(true, Ordering::Release);
        r
    });
    if cancel.load(Ordering::Acquire) {
        return Err(PagerError::SourceGone);
    }
    r.map_err(PagerError::Guest)
}

struct Run<'a> {
    control: &'a mut dyn Conn,
    session: &'a mut DestSession,
    cfg: &'a PagerConfig,
    metrics: Arc<PagerMetrics>,
    started: Instant,
}

/// Stops the bulk receiver when the run ends, however it ends.
struct BulkGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Stops the background mapper when the run ends.
struct MapperGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MapperGuard {
    fn drop(&mut self) {
        self.shared.abort.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BulkGuard {
    fn drop(&mut self) {
        self.shared.abort.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Run<'_> {
    fn go<G: DestGuest>(
        &mut self,
        accept_bulk: impl FnOnce(Instant) -> Result<Box<dyn Conn>, TransportError>,
        make_guest: impl FnOnce(&Accepted, &AtomicBool) -> Result<G, GuestError>,
    ) -> Result<Outcome<G>, PagerError> {
        self.control.send(&self.session.server_hello())?;
        let accepted = self.await_hello()?;
        let layout = accepted.layout.clone();
        self.control.set_page_size(layout.page_size());
        let t_setup = Instant::now();
        let mut guest = prepare_watching(self.control.readiness(), |cancel| make_guest(&accepted, cancel))?;

        // Register all of guest memory before the guest can run: every page is
        // missing until installed.
        let alias = guest.alias_regions();
        let uffd = Userfault::new(alias.is_some())?;
        let map = GuestMap::new(layout.clone(), guest.regions());
        for (base, len) in map.spans() {
            if alias.is_some() {
                uffd.register_shared(base, len)?;
            } else {
                uffd.register(base, len)?;
            }
        }
        let inst = Arc::new(Installer::new(uffd, map, alias, Arc::clone(&self.metrics)));
        let setup_time = t_setup.elapsed();
        self.metrics.pages_total.store(layout.n_pages(), std::sync::atomic::Ordering::Relaxed);
        self.metrics.set_phase(Phase::Precopy);
        self.control.send(&Msg::HelloAck { session: self.session.session(), features: accepted.features })?;

        let deadline = Instant::now() + self.cfg.handshake_timeout;
        let mut bulk = accept_bulk(deadline)?;
        bulk.set_page_size(layout.page_size());
        let mut bulk_session = DestBulk::new(self.session.session(), layout.clone());
        match bulk.recv(Wait::Until(deadline))? {
            Some(m) => {
                bulk_session.on_recv(&m)?;
            }
            None => {
                return Err(PagerError::Timeout { what: "bulk connection hello", after: self.cfg.handshake_timeout });
            }
        }
        let shared = Arc::new(Shared::new());
        shared.touch_bulk();
        let thread = {
            let (inst, shared, metrics) = (Arc::clone(&inst), Arc::clone(&shared), Arc::clone(&self.metrics));
            let nice = self.cfg.background_nice.unwrap_or(default_nice(accepted.mode));
            std::thread::Builder::new()
                .name("pager-bulk".into())
                .spawn(move || {
                    transport::sched::set_thread_nice(nice);
                    crate::bulk::run(bulk, bulk_session, inst, shared, metrics)
                })
                .map_err(|e| PagerError::Guest(Box::new(e)))?
        };
        let _bulk = BulkGuard { shared: Arc::clone(&shared), thread: Some(thread) };

        let (state, outstanding, rounds) = self.await_switchover(&shared)?;
        let t_switch = Instant::now();
        self.metrics.set_phase(Phase::Switchover);
        self.wait_rounds(&shared, rounds)?;
        let resume = self.switch(&mut guest, &inst, &state, &outstanding)?;
        shared.switched.store(true, Ordering::Release);
        let t_resumed = Instant::now();
        self.metrics.set_phase(Phase::Postcopy);
        self.control.send(&Msg::SwitchoverAck(resume))?;
        let _mapper = self.spawn_mapper(&inst, &shared, accepted.mode)?;

        let prefetch = self.cfg.prefetch.unwrap_or(match accepted.prefetch_pages {
            0 => Prefetch::default(),
            pages => Prefetch {
                pages,
                mode: if accepted.prefetch_around { PrefetchMode::Around } else { PrefetchMode::After },
            },
        });
        let source = FaultLoop {
            prefetch,
            conn: &mut *self.control,
            session: &mut *self.session,
            inst: &inst,
            shared: &shared,
            cfg: self.cfg,
            metrics: &self.metrics,
        }
        .run()?;
        let postcopy_time = t_resumed.elapsed();
        self.metrics.set_phase(Phase::Done);
        drop(_bulk);
        // Every page is present: the guest runs on without userfaultfd.
        for (base, len) in inst.map().spans() {
            inst.uffd().unregister(base, len)?;
        }
        let fault_latency = self.metrics.fault_latency.lock().clone();
        let fault_latency_local = self.metrics.fault_latency_local.lock().clone();
        let blocktime_ns = self.metrics.blocktime_ns.lock().iter().map(|(k, v)| (*k, *v)).collect();
        let report = PagerReport {
            accepted,
            prefetch,
            outstanding_pages: outstanding.count_ones(),
            total_time: self.started.elapsed(),
            started: self.started,
            resumed: t_resumed,
            setup_time,
            resume_time: t_resumed.duration_since(t_switch),
            postcopy_time,
            resume,
            source,
            fault_latency,
            fault_latency_local,
            blocktime_ns,
        };
        Ok(Outcome { guest, report })
    }

    fn await_hello(&mut self) -> Result<Accepted, PagerError> {
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        loop {
            let Some(msg) = self.control.recv(Wait::Until(deadline))? else {
                return Err(PagerError::Timeout { what: "the source's hello", after: self.cfg.handshake_timeout });
            };
            match self.session.on_recv(&msg)? {
                DestEvent::Accepted(a) => return Ok(a),
                DestEvent::KeepAlive => {}
                // The session accepts only a hello first; never trust that here.
                _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting hello" }.into()),
            }
        }
    }

    /// Collect the guest state and outstanding set until Switchover, keeping
    /// the source alive meanwhile (precopy may run for a long time).
    fn await_switchover(&mut self, shared: &Shared) -> Result<(Vec<u8>, PageBitmap, u32), PagerError> {
        let mut state = Vec::new();
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        loop {
            shared.check_bulk()?;
            let now = Instant::now();
            if now.duration_since(last_rx.max(shared.bulk_last_rx())) > self.cfg.peer_timeout {
                return Err(PagerError::PeerSilent(self.cfg.peer_timeout));
            }
            if now.duration_since(last_tx) >= self.cfg.keepalive {
                self.control.send(&Msg::KeepAlive)?;
                last_tx = now;
            }
            let Some(msg) = self.control.recv(Wait::for_(self.cfg.keepalive))? else {
                continue;
            };
            last_rx = Instant::now();
            match self.session.on_recv(&msg)? {
                DestEvent::Data => {
                    if let Msg::GuestState(s) = msg {
                        state = s.to_vec();
                    }
                }
                DestEvent::KeepAlive => {}
                DestEvent::SwitchoverReady { outstanding, precopy_rounds } => {
                    return Ok((state, outstanding, precopy_rounds));
                }
                // Rejected by the session before switchover; an error, not a panic, if not.
                DestEvent::Accepted(_) | DestEvent::Finished(_) => {
                    return Err(SessionError::Unexpected { tag: msg.tag(), phase: "before switchover" }.into());
                }
            }
        }
    }

    /// Map the pages held from precopy (shared memory) in the background,
    /// in 1 MiB runs, while the guest runs and faults on the others.
    fn spawn_mapper(
        &self,
        inst: &Arc<Installer>,
        shared: &Arc<Shared>,
        mode: proto::wire::Mode,
    ) -> Result<Option<MapperGuard>, PagerError> {
        if inst.held().count_ones() == 0 {
            return Ok(None);
        }
        let (inst, sh) = (Arc::clone(inst), Arc::clone(shared));
        let nice = self.cfg.background_nice.unwrap_or(default_nice(mode));
        let thread = std::thread::Builder::new()
            .name("pager-map".into())
            .spawn(move || {
                transport::sched::set_thread_nice(nice);
                let n = inst.map().layout().n_pages();
                let mut at = 0;
                while let Some(r) = inst.held().run_from(at, true, 256) {
                    if sh.aborted() {
                        return;
                    }
                    if let Err(e) = inst.map_held(r) {
                        sh.fail_bulk(e.into());
                        return;
                    }
                    at = r.end().min(n);
                }
            })
            .map_err(|e| PagerError::Guest(Box::new(e)))?;
        Ok(Some(MapperGuard { shared: Arc::clone(shared), thread: Some(thread) }))
    }

    /// Every precopy round must be installed before the guest runs here.
    fn wait_rounds(&self, shared: &Shared, rounds: u32) -> Result<(), PagerError> {
        let deadline = Instant::now() + self.cfg.peer_timeout;
        while shared.rounds_done.load(Ordering::Acquire) < rounds {
            shared.check_bulk()?;
            if Instant::now() > deadline {
                return Err(PagerError::Timeout { what: "the last precopy round", after: self.cfg.peer_timeout });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Evict outstanding pages held from precopy, resume the guest.
    fn switch<G: DestGuest>(
        &mut self,
        guest: &mut G,
        inst: &Installer,
        state: &[u8],
        outstanding: &PageBitmap,
    ) -> Result<ResumeTimes, PagerError> {
        let t0 = Instant::now();
        let mut evicted = 0;
        for r in outstanding.runs() {
            // A held page (shared memory) is just forgotten; a mapped one
            // (anonymous memory) must leave the guest's view too. Dropping a
            // whole run in one call is cheaper than finding the held pages.
            let (dropped, mapped) = inst.forget(r);
            evicted += dropped;
            if mapped {
                guest.evict(r).map_err(PagerError::Guest)?;
            }
        }
        // Pages never sent in precopy but not outstanding cannot exist: the
        // source names every page it did not send as outstanding.
        inst.begin_postcopy();
        let t1 = Instant::now();
        guest.resume(state).map_err(PagerError::Guest)?;
        let t2 = Instant::now();
        PagerMetrics::add(&self.metrics.pages_evicted, evicted);
        tracing::debug!(evicted, "switchover: guest resumed");
        Ok(ResumeTimes {
            restore_ns: u64::try_from(t2.duration_since(t1).as_nanos()).unwrap_or(u64::MAX),
            evict_ns: u64::try_from(t1.duration_since(t0).as_nanos()).unwrap_or(u64::MAX),
            arm_ns: 0,
        })
    }
}
