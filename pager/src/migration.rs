//! The destination's whole run: handshake, guest memory registration,
//! switchover, the fault loop (with its recovery from broken links) and
//! completion.
//!
//! Threads: the caller's thread runs the handshake and then the fault loop;
//! one more thread receives each bulk connection (`bulk`), one maps pages
//! held from precopy (`pager-map`). Before switchover any failure ends the
//! run with an error (sent to the source too, best effort); if the source
//! had already paused the guest, the destination first waits out the
//! recovery window for it to ask what happened, and answers "not switched".
//! After switchover a broken link pauses the migration (see `fault`).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::session::{Accepted, DestEvent, DestSession, SessionError};
use proto::wire::{Msg, ResumeState, ResumeTimes, SourceStats};
use proto::{LatencyHist, PageBitmap};
use transport::{Conn, Listener, TransportError, Wait};

use crate::bulk::{self, Bulks};
use crate::config::{PagerConfig, default_nice};
use crate::error::PagerError;
use crate::fault::FaultLoop;
use crate::guest::{DestGuest, GuestError};
use crate::install::{GuestMap, Installer};
use crate::metrics::{PagerMetrics, Phase};
use crate::planner::{Prefetch, PrefetchMode};
use crate::recover::{self, random_bytes, send_error};
use crate::shared::Shared;
use crate::uffd::Userfault;

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
    /// The source's figures (zero if it never confirmed completion).
    pub source: SourceStats,
    /// Whether the source acknowledged completion (it may not have, when
    /// the link broke after every page was here and it did not come back).
    pub completion_confirmed: bool,
    /// Fault latency (event read to page installed), faults served over the network.
    pub fault_latency: LatencyHist,
    /// Fault latency of faults on held pages (mapped locally).
    pub fault_latency_local: LatencyHist,
    /// Block time per faulting thread id, ns.
    pub blocktime_ns: Vec<(u32, u64)>,
    /// The RDMA device, when post-copy pages were read by RDMA.
    pub rdma_device: Option<String>,
    /// Registering the staging memory took this long.
    pub rdma_registration: Duration,
    /// Whether pages were written through an alias of shared memory and
    /// mapped by UFFDIO_CONTINUE (minor faults) rather than installed by
    /// UFFDIO_COPY.
    pub minor_faults: bool,
}

/// A finished run: the guest (running on, all memory local) and the report.
pub struct Outcome<G> {
    /// The guest.
    pub guest: G,
    /// The figures.
    pub report: PagerReport,
}

/// Run the destination side over `control` (already accepted from
/// `listener`, which hands out the bulk connection and, after a broken
/// link, the source's new pair); `make_guest` builds the guest (and its
/// memory) once the layout is known.
///
/// `make_guest` must stop early (and may return anything) once its cancel
/// flag is set: the pager sets it when the source hangs up meanwhile, so a
/// peer that announces a guest and leaves does not keep the host busy.
pub fn run<G: DestGuest>(
    control: Box<dyn Conn>,
    listener: &dyn Listener,
    make_guest: impl FnOnce(&Accepted, &AtomicBool) -> Result<G, GuestError>,
    cfg: &PagerConfig,
    metrics: Arc<PagerMetrics>,
) -> Result<Outcome<G>, PagerError> {
    let mut expect = cfg.expect.clone();
    expect.recovery = !cfg.recover_timeout.is_zero();
    expect.rdma = cfg.rdma.is_some();
    let session = DestSession::new(expect, random_bytes(), u64::from_le_bytes(random_bytes()));
    let mut run = Run {
        control: Some(control),
        session,
        listener,
        cfg,
        metrics,
        shared: Arc::new(Shared::default()),
        started: Instant::now(),
    };
    // An install failing because the VMM exited may surface wrapped (in the
    // bulk receiver's error): name it for what it is.
    let r = run.go(make_guest).map_err(|e| match e {
        e @ PagerError::GuestGone(_) => e,
        e if e.guest_gone() => PagerError::GuestGone(Box::new(e)),
        e => e,
    });
    run.shared.abort();
    if let (Err(e), Some(c)) = (&r, run.control.as_deref_mut()) {
        send_error(c, e);
    }
    r
}

struct Run<'a> {
    /// `None` while the link is broken (after switchover).
    control: Option<Box<dyn Conn>>,
    session: DestSession,
    listener: &'a dyn Listener,
    cfg: &'a PagerConfig,
    metrics: Arc<PagerMetrics>,
    shared: Arc<Shared>,
    started: Instant,
}

/// Run `prepare` (allocating and populating guest memory: seconds per GiB)
/// while a watcher polls the control connection for a hang-up; a hang-up
/// sets the cancel flag `prepare` watches, and the run fails with
/// [`PagerError::SourceGone`] instead of finishing work no one will use.
/// How often the destination says it is alive while it prepares memory
/// (first after one interval: a small guest is ready before, and its
/// handshake stays the same frames).
const PREPARE_KEEPALIVE: Duration = Duration::from_secs(1);

fn prepare_watching<G>(
    control: &mut dyn Conn,
    prepare: impl FnOnce(&AtomicBool) -> Result<G, GuestError>,
) -> Result<G, PagerError> {
    let cancel = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        // The watcher has the connection to itself: the main thread does not
        // use it while it prepares.
        let watch = || {
            let mut last_alive = Instant::now();
            while !done.load(Ordering::Acquire) {
                if hung_up(control.readiness(), PollTimeout::from(50u8)) {
                    tracing::warn!("the source hung up while guest memory was being prepared: stopping");
                    cancel.store(true, Ordering::Release);
                    return;
                }
                // Preparing takes seconds per GiB: tell the source we are
                // alive, or its wait for HelloAck would run out on a large
                // guest (27 s for 10 GiB here). A failed send shows as a
                // hang-up next turn.
                if last_alive.elapsed() >= PREPARE_KEEPALIVE {
                    last_alive = Instant::now();
                    let _ = control.send(&Msg::KeepAlive);
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
        return Err(PagerError::SourceGone("guest memory was being prepared"));
    }
    r.map_err(PagerError::Guest)
}

/// Whether the peer of `fd` shuts its side or the socket fails within
/// `wait`. nix names no POLLRDHUP (Linux 0x2000), and its `revents()` is
/// None for a bit it does not know: only RDHUP is asked for, and HUP and ERR
/// are always reported, so any event at all means the peer is gone.
fn hung_up(fd: BorrowedFd<'_>, wait: PollTimeout) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::from_bits_retain(0x2000))];
    poll(&mut fds, wait).is_ok_and(|n| n > 0)
}

/// Stops the background mapper when the run ends.
struct MapperGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MapperGuard {
    fn drop(&mut self) {
        self.shared.abort();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whatever we have on the control connection, as a transport error when
/// there is none (the link broke and nothing replaced it).
fn ctl(c: &mut Option<Box<dyn Conn>>) -> Result<&mut dyn Conn, PagerError> {
    match c.as_deref_mut() {
        Some(c) => Ok(c),
        None => Err(TransportError::Closed { peer: "source".into(), mid_frame: false }.into()),
    }
}

impl Run<'_> {
    fn go<G: DestGuest>(
        &mut self,
        make_guest: impl FnOnce(&Accepted, &AtomicBool) -> Result<G, GuestError>,
    ) -> Result<Outcome<G>, PagerError> {
        let hello = self.session.server_hello();
        ctl(&mut self.control)?.send(&hello)?;
        let accepted = self.await_hello()?;
        let layout = accepted.layout.clone();
        ctl(&mut self.control)?.set_page_size(layout.page_size());
        let t_setup = Instant::now();
        let mut guest = prepare_watching(ctl(&mut self.control)?, |cancel| make_guest(&accepted, cancel))?;

        // Register all of guest memory before the guest can run: every page is
        // missing until installed.
        let alias = guest.alias_regions();
        let minor_faults = alias.is_some();
        let map = GuestMap::new(layout.clone(), guest.regions());
        let handed_over = guest.take_userfaultfd();
        let view_is_local = handed_over.is_none();
        let uffd = match handed_over {
            // A VMM's own descriptor, its regions registered by the VMM.
            Some(fd) => Userfault::from_handed_over(fd),
            None => {
                let uffd = Userfault::new(alias.is_some())?;
                for (base, len) in map.spans() {
                    if alias.is_some() {
                        uffd.register_shared(base, len)?;
                    } else {
                        uffd.register(base, len)?;
                    }
                }
                uffd
            }
        };
        let inst = Arc::new(Installer::new(uffd, map, alias, view_is_local, Arc::clone(&self.metrics)));
        let setup_time = t_setup.elapsed();
        self.metrics.pages_total.store(layout.n_pages(), Ordering::Relaxed);
        self.metrics.set_phase(Phase::Precopy);
        let ack = Msg::HelloAck { session: self.session.session(), features: accepted.features };
        ctl(&mut self.control)?.send(&ack)?;

        let nice = self.cfg.background_nice.unwrap_or(default_nice(accepted.mode));
        // RDMA: the source offers its memory before it opens the bulk connection.
        let mut rdma = match &self.cfg.rdma {
            Some(rc) if self.session.rdma() => Some(crate::rdma::set_up(
                ctl(&mut self.control)?,
                &mut self.session,
                &layout,
                rc,
                self.cfg.expect.key.as_deref(),
                self.cfg.rdma_window,
                self.cfg.handshake_timeout,
            )?),
            _ => None,
        };
        let rdma_device = rdma.as_ref().map(|r| r.device.clone());
        let rdma_registration = rdma.as_ref().map_or(Duration::ZERO, |r| r.registration);
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        let (bulk_conn, bulk_session) = self.accept_first_bulk(&layout, deadline)?;
        // With several push streams the source opens the rest right after
        // the first, each bound to the session the same way.
        let streams = bulk_session.streams();
        self.metrics.push_streams.store(u64::from(streams), Ordering::Relaxed);
        let mut conns = vec![(bulk_conn, bulk_session)];
        for _ in 1..streams {
            conns.push(self.accept_first_bulk(&layout, deadline)?);
        }
        let bulk = Bulks(
            conns
                .into_iter()
                .map(|(c, s)| {
                    bulk::spawn(c, s, Arc::clone(&inst), Arc::clone(&self.shared), Arc::clone(&self.metrics), nice)
                })
                .collect::<Result<Vec<_>, _>>()?,
        );

        let pre = self.await_switchover(&bulk).and_then(|(state, outstanding, rounds)| {
            self.wait_rounds(&bulk, rounds)?;
            Ok((state, outstanding))
        });
        let (state, outstanding) = match pre {
            Ok(v) => v,
            Err(e) if e.is_link_failure() && self.session.recovery() => {
                // The guest will not run here, whatever arrived: the source
                // may be in doubt and come back to ask.
                drop(bulk);
                self.control = None;
                self.session.cancel();
                return Err(self.settle_cancelled(e));
            }
            Err(e) => return Err(e),
        };
        let t_switch = Instant::now();
        self.metrics.set_phase(Phase::Switchover);
        let resume = self.switch(&mut guest, &inst, &state, &outstanding)?;
        self.shared.set_switched();
        let t_resumed = Instant::now();
        self.metrics.set_phase(Phase::Postcopy);
        // From here the guest runs here: a broken link pauses, never ends, the run.
        let broken = match ctl(&mut self.control).and_then(|c| Ok(c.send(&Msg::SwitchoverAck(resume))?)) {
            Ok(()) => None,
            Err(e) if e.is_link_failure() && self.session.recovery() => Some(e),
            Err(e) => return Err(e),
        };
        let _mapper = self.spawn_mapper(&inst, nice)?;

        let prefetch = self.cfg.prefetch.unwrap_or(match accepted.prefetch_pages {
            0 => Prefetch::default(),
            pages => Prefetch {
                pages,
                mode: if accepted.prefetch_around { PrefetchMode::Around } else { PrefetchMode::After },
            },
        });
        // With RDMA the background comes on its own queue pair, behind demand:
        // read by this side, or written by the source into the ring.
        let over_loopback = self.control.as_deref().and_then(|c| c.local_ip()).is_some_and(|ip| ip.is_loopback());
        let puller = match rdma.as_mut().and_then(|r| r.background.take()) {
            Some(b) if broken.is_none() => Some(b.spawn(
                Arc::clone(&inst),
                Arc::clone(&self.shared),
                Arc::clone(&self.metrics),
                self.cfg.peer_timeout,
                nice,
                self.cfg.rdma_yield.unwrap_or(!over_loopback),
            )?),
            _ => None,
        };
        let source = FaultLoop {
            rdma: rdma.map(|r| r.demand),
            puller,
            prefetch,
            control: &mut self.control,
            bulk: Some(bulk),
            retired: Vec::new(),
            session: &mut self.session,
            listener: self.listener,
            inst: &inst,
            shared: &self.shared,
            cfg: self.cfg,
            metrics: &self.metrics,
            nice,
        }
        .run(broken)?;
        let postcopy_time = t_resumed.elapsed();
        self.metrics.set_phase(Phase::Done);
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
            completion_confirmed: source.is_some(),
            source: source.unwrap_or_default(),
            fault_latency,
            fault_latency_local,
            blocktime_ns,
            rdma_device,
            rdma_registration,
            minor_faults,
        };
        Ok(Outcome { guest, report })
    }

    /// Accept the first bulk connection, watching the control connection
    /// meanwhile: a source that hangs up is not waited for.
    fn accept_first_bulk(
        &mut self,
        layout: &proto::MemLayout,
        deadline: Instant,
    ) -> Result<(Box<dyn Conn>, proto::session::DestBulk), PagerError> {
        loop {
            let slice = deadline.min(Instant::now() + Duration::from_millis(50));
            match recover::accept_bulk(self.listener, self.session.session(), layout, slice, self.cfg.handshake_timeout)
            {
                Err(PagerError::Transport(TransportError::Timeout { .. })) if Instant::now() < deadline => {
                    if hung_up(ctl(&mut self.control)?.readiness(), PollTimeout::ZERO) {
                        return Err(PagerError::SourceGone("the destination waited for the bulk connection"));
                    }
                }
                Err(PagerError::Transport(TransportError::Timeout { .. })) => {
                    return Err(PagerError::Timeout { what: "the bulk connection", after: self.cfg.handshake_timeout });
                }
                r => return r,
            }
        }
    }

    fn await_hello(&mut self) -> Result<Accepted, PagerError> {
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        let control = ctl(&mut self.control)?;
        loop {
            let Some(msg) = control.recv(Wait::Until(deadline))? else {
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
    fn await_switchover(&mut self, bulk: &Bulks) -> Result<(Vec<u8>, PageBitmap, u32), PagerError> {
        let mut state = Vec::new();
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let control = ctl(&mut self.control)?;
        loop {
            bulk.check()?;
            let now = Instant::now();
            if now.duration_since(last_rx.max(bulk.last_rx())) > self.cfg.peer_timeout {
                return Err(PagerError::PeerSilent(self.cfg.peer_timeout));
            }
            if now.duration_since(last_tx) >= self.cfg.keepalive {
                control.send(&Msg::KeepAlive)?;
                last_tx = now;
            }
            let Some(msg) = control.recv(Wait::for_(self.cfg.keepalive))? else {
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
                DestEvent::Accepted(_) | DestEvent::Finished(_) | DestEvent::RdmaSetup => {
                    return Err(SessionError::Unexpected { tag: msg.tag(), phase: "before switchover" }.into());
                }
            }
        }
    }

    /// The link broke after the source paused the guest and before the
    /// switchover arrived here. The source may have sent it and now be in
    /// doubt: wait (up to the recovery window) for it to come back and tell
    /// it that no switchover happened, so it resumes the guest; then end.
    ///
    /// The window is the recovery timeout once the guest state is here (the
    /// source has paused the guest); before that only a short one (the
    /// source may have paused and be sending it), so that a source that
    /// died in precopy is not waited for long. After an answer the
    /// destination keeps answering for a grace, in case that answer was
    /// lost with another break.
    fn settle_cancelled(&mut self, cause: PagerError) -> PagerError {
        // Before the state, the source may still be waiting for the
        // acknowledgement: it gives up on a silent destination after twice
        // the peer timeout and a second (see the sender's `await_resume`).
        let window = if self.session.got_state() {
            self.cfg.recover_timeout
        } else {
            self.cfg.recover_timeout.min(3 * self.cfg.peer_timeout + Duration::from_secs(1))
        };
        tracing::warn!(
            "link to the source lost before switchover ({}); waiting up to {window:?} to tell it the guest stays there",
            crate::error::error_chain(&cause)
        );
        let mut deadline = Instant::now() + window;
        while Instant::now() < deadline {
            let mut conn = match self.listener.accept(deadline) {
                Ok(c) => c,
                Err(TransportError::Timeout { .. }) => break,
                Err(e) => {
                    // EMFILE, ECONNABORTED and the like: keep waiting.
                    tracing::warn!("accepting a reconnection failed: {}", crate::error::error_chain(&e));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let empty = || PageBitmap::new(0);
            match recover::resume_handshake(&mut *conn, &mut self.session, self.cfg, empty) {
                Ok(ResumeState::NotSwitched) => {
                    tracing::warn!("the source reconnected and was told to keep the guest");
                    // Keep answering for a grace, in case the answer was lost.
                    deadline = Instant::now() + self.cfg.completion_grace();
                }
                Ok(state) => tracing::error!("resume answered {state:?} after a cancellation"),
                Err(e) => tracing::warn!("refused a reconnecting connection: {}", crate::error::error_chain(&e)),
            }
        }
        PagerError::Cancelled(Box::new(cause))
    }

    /// Map the pages held from precopy (shared memory) in the background,
    /// in 1 MiB runs, while the guest runs and faults on the others.
    fn spawn_mapper(&self, inst: &Arc<Installer>, nice: i32) -> Result<Option<MapperGuard>, PagerError> {
        if inst.held().count_ones() == 0 {
            return Ok(None);
        }
        let (inst, sh) = (Arc::clone(inst), Arc::clone(&self.shared));
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
                        sh.fail(e.into());
                        return;
                    }
                    at = r.end().min(n);
                }
            })
            .map_err(|e| PagerError::Spawn { what: "pager-map", source: e })?;
        Ok(Some(MapperGuard { shared: Arc::clone(&self.shared), thread: Some(thread) }))
    }

    /// Every precopy round must be installed before the guest runs here.
    /// The wait ends when the bulk link is silent for the peer timeout (not
    /// after a fixed time: the last round may still be arriving), and keeps
    /// the source, which waits for the acknowledgement, hearing from us.
    fn wait_rounds(&mut self, bulk: &Bulks, rounds: u32) -> Result<(), PagerError> {
        let started = Instant::now();
        let mut last_tx = Instant::now();
        // In slices, so that a receiver that failed is noticed.
        while !self.shared.wait_rounds(rounds, Instant::now() + Duration::from_millis(20)) {
            bulk.check()?;
            let now = Instant::now();
            if now.duration_since(bulk.last_rx().max(started)) > self.cfg.peer_timeout {
                return Err(PagerError::Timeout { what: "the last precopy round", after: self.cfg.peer_timeout });
            }
            if now.duration_since(last_tx) >= self.cfg.keepalive {
                ctl(&mut self.control)?.send(&Msg::KeepAlive)?;
                last_tx = now;
            }
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
        })
    }
}
