//! The fault loop: the one thread on the destination's demand path.
//!
//! It waits on the userfaultfd and the control connection together. Each
//! wake-up drains every pending fault event, plans one batched request and
//! sends it at once, then installs whatever demand replies have arrived. The
//! thread that reads a fault is the thread that sends its request and the
//! thread that installs its reply: no queue or hand-off between threads on
//! the demand path, because on this (virtual) machine each cross-CPU wake-up
//! costs tens of microseconds.
//!
//! Besides demand, it keeps the session alive (keep-alives out, liveness of
//! the source in), re-requests pages whose replies never came (lossy links,
//! reconnects), sweeps up pages the push did not deliver, and finishes with
//! the completion exchange.
//!
//! **Recovery.** A broken or silent link (either connection) does not end
//! the run when recovery was negotiated: the loop drops both connections
//! (so the source notices at once), keeps reading faults (they wait; the
//! rest of the guest runs), and waits on the listener for the source's new
//! pair. A new pair must pass the resume handshake (`recover`); then the
//! faults that waited are requested first, and the source pushes whatever
//! the Have bitmap does not name. Past `recover_timeout` the run fails with
//! what was lost. A loop that had sent Complete (every page is here) waits
//! only `completion_grace` for the source to come back and acknowledge.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::session::{DestEvent, DestSession, SessionError};
use proto::wire::{self, MAX_REQUEST_RANGES, Msg, PageKind, ResumeState, SourceStats};
use proto::{PageBitmap, PageIdx, PageRange, ViewAddr};
use transport::{Conn, Listener, TransportError, Wait};

use crate::bulk::{self, Bulks};
use crate::config::PagerConfig;
use crate::error::{PagerError, error_chain};
use crate::install::{Installer, PendingFault};
use crate::metrics::{PagerMetrics, Phase};
use crate::planner;
use crate::recover;
use crate::shared::Shared;
use crate::uffd::{Fault, MSG_LEN, OtherEvent};

/// Longest the loop sleeps without looking at its timers.
const TICK: Duration = Duration::from_millis(20);

pub(crate) struct FaultLoop<'a> {
    pub(crate) prefetch: planner::Prefetch,
    /// `None` while paused.
    pub(crate) control: &'a mut Option<Box<dyn Conn>>,
    /// The current bulk receiver (`None` while paused or after completion).
    pub(crate) bulk: Option<Bulks>,
    /// Receivers of broken links, still finishing; joined at the end.
    pub(crate) retired: Vec<Bulks>,
    pub(crate) session: &'a mut DestSession,
    pub(crate) listener: &'a dyn Listener,
    pub(crate) inst: &'a Arc<Installer>,
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) cfg: &'a PagerConfig,
    pub(crate) metrics: &'a Arc<PagerMetrics>,
    /// Nice value of bulk receivers started on reconnection.
    pub(crate) nice: i32,
    /// Demand READs by RDMA (first link only: after a broken link, TCP).
    pub(crate) rdma: Option<crate::rdma::DemandReader>,
    /// The background READs.
    pub(crate) puller: Option<crate::rdma::PullerHandle>,
}

/// What one turn of the loop decided.
enum Flow {
    Continue,
    /// The run is over; the source's figures if it acknowledged completion.
    Finished(Option<SourceStats>),
}

struct Paused {
    since: Instant,
    cause: String,
}

struct LoopState {
    requested: PageBitmap,
    /// Requested ranges in request order, for re-requests.
    inflight: VecDeque<(Instant, PageRange)>,
    msg_buf: Vec<u8>,
    faults: Vec<Fault>,
    other: Vec<OtherEvent>,
    pages: Vec<PageIdx>,
    ranges: Vec<PageRange>,
    enc: Vec<u8>,
    req_id: u32,
    last_tx: Instant,
    last_rx: Instant,
    swept: bool,
    complete_sent: Option<Instant>,
    rx_seen: u64,
    paused: Option<Paused>,
}

impl FaultLoop<'_> {
    /// Serve faults until every page is present and the source acknowledged
    /// completion (or, after a broken link, every page is present and the
    /// source did not come back to acknowledge it). Starts paused when the
    /// link already broke (`broken`).
    pub(crate) fn run(mut self, broken: Option<PagerError>) -> Result<Option<SourceStats>, PagerError> {
        let n = self.inst.map().layout().n_pages();
        let now = Instant::now();
        let rx_seen = self.control.as_deref().map_or(0, |c| c.bytes_received());
        let mut st = LoopState {
            requested: PageBitmap::new(n),
            inflight: VecDeque::new(),
            msg_buf: vec![0; 128 * MSG_LEN],
            faults: Vec::with_capacity(128),
            other: Vec::new(),
            pages: Vec::with_capacity(128),
            ranges: Vec::with_capacity(256),
            enc: Vec::with_capacity(4096),
            req_id: 0,
            last_tx: now,
            last_rx: now,
            swept: false,
            complete_sent: None,
            rx_seen,
            paused: None,
        };
        if let Some(e) = broken {
            self.pause(&mut st, &e);
        }
        let r = loop {
            let turn = if st.paused.is_some() { self.paused_turn(&mut st) } else { self.turn(&mut st) };
            match turn {
                Ok(Flow::Continue) => {}
                Ok(Flow::Finished(stats)) => break Ok(stats),
                Err(e) if st.paused.is_none() && e.is_link_failure() && self.session.recovery() => {
                    self.pause(&mut st, &e);
                }
                Err(e) => break Err(e),
            }
        };
        drop(self.bulk.take());
        self.retired.clear();
        // The demand queue pair before the background's: a remotely
        // writable ring must outlive every queue pair on the device.
        self.rdma = None;
        self.puller = None;
        r
    }

    /// One turn with the link up.
    fn turn(&mut self, st: &mut LoopState) -> Result<Flow, PagerError> {
        let (uffd_ready, conn_ready) = self.wait(st)?;
        if uffd_ready {
            self.handle_faults(st)?;
        }
        if let Some(r) = self.rdma.as_mut() {
            // Cheap when nothing completed (one lock, one empty queue).
            r.complete(self.inst, self.metrics)?;
        }
        let buffered = self.control.as_deref().is_some_and(|c| c.has_buffered());
        if (conn_ready || buffered)
            && let Some(stats) = self.drain_conn(st)?
        {
            return Ok(Flow::Finished(Some(stats)));
        }
        self.timers(st)?;
        Ok(Flow::Continue)
    }

    /// The link broke: drop both connections, so that the source notices
    /// at once, and wait for it.
    fn pause(&mut self, st: &mut LoopState, cause: &PagerError) {
        let cause = error_chain(cause);
        tracing::warn!(
            "link to the source lost ({cause}); migration paused, the guest runs on and faults wait; \
             waiting up to {:?} for the source to reconnect",
            if st.complete_sent.is_some() { self.cfg.completion_grace() } else { self.cfg.recover_timeout }
        );
        self.metrics.set_phase(Phase::Paused);
        *self.control = None;
        if let Some(b) = self.bulk.take() {
            b.stop();
            self.retired.push(b);
        }
        // Whatever the queue pairs had in flight is abandoned with them; the
        // reconnected link carries the rest over TCP.
        if self.rdma.take().is_some() {
            tracing::warn!("RDMA dropped with the link: the rest goes over TCP once the source reconnects");
        }
        self.puller = None;
        st.paused = Some(Paused { since: Instant::now(), cause });
    }

    /// One turn while paused: faults are read and wait, the listener is
    /// watched, the recovery window runs.
    fn paused_turn(&mut self, st: &mut LoopState) -> Result<Flow, PagerError> {
        self.shared.check()?;
        let (uffd_ready, listener_ready) = {
            let mut fds = vec![PollFd::new(self.inst.uffd().as_fd(), PollFlags::POLLIN)];
            if let Some(fd) = self.listener.readiness() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            let ms = u16::try_from(TICK.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(PagerError::Poll(e)),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_none_or(ready))
        };
        if uffd_ready {
            self.handle_faults(st)?;
        }
        if listener_ready {
            self.try_reattach(st)?;
        }
        let Some(p) = &st.paused else { return Ok(Flow::Continue) };
        let paused_for = p.since.elapsed();
        if st.complete_sent.is_some() && paused_for > self.cfg.completion_grace() {
            // The source heard Complete or will ask within its own grace:
            // nothing is lost without its acknowledgement.
            tracing::warn!("the source did not come back to acknowledge completion; every page is here, finishing");
            self.end_pause(st);
            return Ok(Flow::Finished(None));
        }
        if paused_for > self.cfg.recover_timeout && self.inst.complete() {
            // Every page arrived before Complete could be sent: the source
            // (which does not know) had the whole window to come back.
            tracing::warn!("the source did not come back; every page is here, finishing without its figures");
            self.end_pause(st);
            return Ok(Flow::Finished(None));
        }
        if paused_for > self.cfg.recover_timeout {
            return Err(PagerError::RecoveryTimeout {
                after: self.cfg.recover_timeout,
                cause: p.cause.clone(),
                missing_pages: self.inst.map().layout().n_pages() - self.inst.n_present(),
                waiting_faults: self.inst.n_pending(),
            });
        }
        Ok(Flow::Continue)
    }

    fn end_pause(&mut self, st: &mut LoopState) {
        if let Some(p) = st.paused.take() {
            let ns = u64::try_from(p.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            PagerMetrics::add(&self.metrics.paused_ns, ns);
        }
    }

    /// Take a waiting connection, if any, and resume the session on it; a
    /// connection that fails the handshake is dropped (and told why).
    fn try_reattach(&mut self, st: &mut LoopState) -> Result<(), PagerError> {
        let mut conn = match self.listener.accept(Instant::now()) {
            Ok(c) => c,
            Err(TransportError::Timeout { .. }) => return Ok(()),
            Err(e) => {
                tracing::warn!("accepting a reconnection failed: {}", error_chain(&e));
                return Ok(());
            }
        };
        let layout = self.inst.map().layout().clone();
        conn.set_page_size(layout.page_size());
        let inst = Arc::clone(self.inst);
        let state = match recover::resume_handshake(&mut *conn, self.session, self.cfg, move || inst.have()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("refused a connection that tried to resume: {}", error_chain(&e));
                return Ok(());
            }
        };
        let now = Instant::now();
        match state {
            ResumeState::Running => {
                let deadline = now + self.cfg.resume_step_timeout();
                let bulk = recover::accept_bulk(
                    self.listener,
                    self.session.session(),
                    &layout,
                    deadline,
                    self.cfg.resume_step_timeout(),
                )
                .and_then(|(c, s)| {
                    bulk::spawn(
                        c,
                        s,
                        Arc::clone(self.inst),
                        Arc::clone(self.shared),
                        Arc::clone(self.metrics),
                        self.nice,
                    )
                });
                match bulk {
                    Ok(b) => self.bulk = Some(Bulks(vec![b])),
                    Err(e) => {
                        // Dropping the control connection makes the source try again.
                        tracing::warn!("the reconnecting source's bulk connection failed: {}", error_chain(&e));
                        return Ok(());
                    }
                }
            }
            // Only the acknowledgement is left.
            ResumeState::Complete => st.complete_sent = Some(now),
            ResumeState::NotSwitched => {
                let e = SessionError::Mismatch("resume answered 'not switched' after switchover".into());
                return Err(e.into());
            }
        }
        st.rx_seen = conn.bytes_received();
        *self.control = Some(conn);
        self.end_pause(st);
        PagerMetrics::add(&self.metrics.recoveries, 1);
        self.metrics.set_phase(Phase::Postcopy);
        st.last_rx = now;
        st.last_tx = now;
        tracing::warn!("the source reconnected: migration resumed ({state:?})");
        if state == ResumeState::Running {
            // What was in flight on the old link is gone: ask again, the
            // faults that waited first; the push brings everything else.
            st.requested = PageBitmap::new(layout.n_pages());
            st.inflight.clear();
            st.swept = false;
            st.pages.clear();
            self.inst.waiting_pages(&mut st.pages);
            st.ranges.clear();
            let inst = self.inst;
            let here = |p: PageIdx| inst.is_held(p) || inst.present().get(p);
            if planner::plan(&st.pages, self.prefetch, here, &mut st.requested, &mut st.ranges) > 0 {
                self.send_ranges(st, now)?;
            }
        }
        Ok(())
    }

    /// Poll the userfaultfd and the connection until one is ready or a tick passes.
    fn wait(&self, st: &LoopState) -> Result<(bool, bool), PagerError> {
        let Some(conn) = self.control.as_deref() else { return Ok((false, false)) };
        if conn.has_buffered() {
            return Ok((false, true));
        }
        let next_keepalive = st.last_tx + self.cfg.keepalive;
        let timeout = next_keepalive.saturating_duration_since(Instant::now()).min(TICK);
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX).max(1);
        // With RDMA, its completion notification too (armed by `complete`:
        // readable once a READ completes).
        let third = self.rdma.as_ref().map_or(conn.readiness(), |r| r.readiness());
        let mut fds = [
            PollFd::new(self.inst.uffd().as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.readiness(), PollFlags::POLLIN),
            PollFd::new(third, PollFlags::POLLIN),
        ];
        let k = if self.rdma.is_some() { 3 } else { 2 };
        match poll(&mut fds[..k], PollTimeout::from(ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
            Err(e) => return Err(PagerError::Poll(e)),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        Ok((ready(&fds[0]), ready(&fds[1])))
    }

    fn handle_faults(&mut self, st: &mut LoopState) -> Result<(), PagerError> {
        st.faults.clear();
        st.other.clear();
        {
            // Events are read and acted on before any installer copies again
            // (see `Installer::events_gate`).
            let _gate = self.inst.events_gate();
            self.inst.uffd().read_events(&mut st.msg_buf, &mut st.faults, &mut st.other)?;
            for e in &st.other {
                match e.0 {
                    // A balloon's MADV_DONTNEED (or an unmapped range, which
                    // faults no more): those pages read as zeros and the
                    // source's copies of them are never installed.
                    ::uffd::Event::Remove { start, end } | ::uffd::Event::Unmap { start, end } => {
                        let (start, end) =
                            (usize::try_from(start).unwrap_or(usize::MAX), usize::try_from(end).unwrap_or(usize::MAX));
                        self.inst.remove(ViewAddr(start), ViewAddr(end))?;
                    }
                    _ => {}
                }
            }
        }
        // Installs put off for those events can go in now.
        self.inst.retry_deferred()?;
        if !st.other.is_empty() {
            // Read and reported, never dropped. This engine enables none of
            // them; a handed-over descriptor may (a balloon's REMOVE).
            let seen = PagerMetrics::get(&self.metrics.events_other);
            PagerMetrics::add(&self.metrics.events_other, st.other.len() as u64);
            if seen < 10 {
                tracing::info!("userfaultfd events other than faults: {:?}", st.other);
            }
        }
        if st.faults.is_empty() {
            return Ok(());
        }
        let t_read = Instant::now();
        PagerMetrics::add(&self.metrics.faults, st.faults.len() as u64);
        st.pages.clear();
        for f in &st.faults {
            let Some(page) = self.inst.map().page_of(f.addr) else {
                return Err(PagerError::StrayFault(f.addr.0));
            };
            if self.inst.is_removed(page) {
                // Dropped by the guest's owner: it reads as zeros.
                self.inst.zero_fault(page)?;
                continue;
            }
            let local = self.inst.is_held(page);
            self.inst.add_pending(PendingFault { page, t_read, tid: f.tid, local })?;
            if local {
                // Its content is here already (precopy): map it now.
                PagerMetrics::add(&self.metrics.faults_local, 1);
                self.inst.map_held(proto::PageRange::new(page, 1))?;
            } else {
                st.pages.push(page);
            }
        }
        if st.paused.is_some() {
            // They wait; the reconnection asks for every waiting page first.
            return Ok(());
        }
        st.ranges.clear();
        let inst = self.inst;
        // Held first (see `rerequest`).
        let here = |p: PageIdx| inst.is_held(p) || inst.present().get(p);
        let added = planner::plan(&st.pages, self.prefetch, here, &mut st.requested, &mut st.ranges);
        if added > 0 {
            match self.rdma.as_mut() {
                // Read from the source's memory ourselves: no request.
                Some(r) => {
                    r.read(&st.ranges, self.metrics)?;
                    st.ranges.clear();
                }
                None => self.send_ranges(st, t_read)?,
            }
        }
        Ok(())
    }

    /// Send `st.ranges` as one request (or several when over the limit).
    fn send_ranges(&mut self, st: &mut LoopState, now: Instant) -> Result<(), PagerError> {
        let ranges = std::mem::take(&mut st.ranges);
        let Some(conn) = self.control.as_deref_mut() else { return Ok(()) };
        for chunk in ranges.chunks(MAX_REQUEST_RANGES as usize) {
            st.enc.clear();
            wire::encode_ranges(chunk, &mut st.enc);
            st.req_id = st.req_id.wrapping_add(1);
            conn.send(&Msg::RangeRequest { req_id: st.req_id, ranges: wire::range_list(&st.enc) })?;
            PagerMetrics::add(&self.metrics.requests, 1);
            PagerMetrics::add(&self.metrics.pages_requested, chunk.iter().map(|r| r.n_pages).sum());
            st.inflight.extend(chunk.iter().map(|r| (now, *r)));
        }
        st.last_tx = Instant::now();
        st.ranges = ranges;
        st.ranges.clear();
        Ok(())
    }

    /// Process every whole message the connection holds. Returns the source's
    /// stats once the completion is acknowledged.
    fn drain_conn(&mut self, st: &mut LoopState) -> Result<Option<SourceStats>, PagerError> {
        let Some(conn) = self.control.as_deref_mut() else { return Ok(None) };
        // One read (poll said readable), then only what it already buffered:
        // anything arriving later is the next poll's news, so no read is
        // spent just to hear EAGAIN.
        loop {
            let Some(msg) = conn.recv(Wait::No)? else { break };
            st.last_rx = Instant::now();
            match self.session.on_recv(&msg)? {
                DestEvent::Data => match msg {
                    Msg::Pages { first, data, .. } => {
                        self.inst.install(first, data, PageKind::Demand)?;
                    }
                    Msg::Zeros { first, n_pages, .. } => {
                        self.inst.install_zeros(first, u64::from(n_pages), PageKind::Demand, true)?;
                    }
                    _ => {}
                },
                DestEvent::KeepAlive => {}
                DestEvent::Finished(stats) => {
                    account_rx(conn, st, self.metrics);
                    return Ok(Some(stats));
                }
                // The session rejects these after switchover; an error, not a panic, if not.
                DestEvent::Accepted(_) | DestEvent::SwitchoverReady { .. } | DestEvent::RdmaSetup => {
                    return Err(SessionError::Unexpected { tag: msg.tag(), phase: "in postcopy" }.into());
                }
            }
            if !conn.has_buffered() {
                break;
            }
        }
        account_rx(conn, st, self.metrics);
        Ok(None)
    }

    fn timers(&mut self, st: &mut LoopState) -> Result<(), PagerError> {
        let now = Instant::now();
        self.shared.check()?;
        // Liveness: either connection counts.
        let mut last_rx = st.last_rx;
        if let Some(b) = &self.bulk {
            b.check()?;
            last_rx = last_rx.max(b.last_rx());
        }
        if now.duration_since(last_rx) > self.cfg.peer_timeout {
            return Err(PagerError::PeerSilent(self.cfg.peer_timeout));
        }
        // RDMA never times out: a READ unanswered past the peer timeout is a dead link.
        if let Some(w) = self.rdma.as_ref().and_then(crate::rdma::DemandReader::oldest_wait)
            && w > self.cfg.peer_timeout
        {
            return Err(PagerError::Rdma(format!("a demand read had no completion for {w:?}")));
        }
        if let Some(p) = &self.puller {
            p.check()?;
        }
        let Some(conn) = self.control.as_deref_mut() else { return Ok(()) };
        if now.duration_since(st.last_tx) >= self.cfg.keepalive {
            conn.send(&Msg::KeepAlive)?;
            st.last_tx = now;
        }
        if let Some(t) = st.complete_sent {
            if now.duration_since(t) > self.cfg.peer_timeout {
                return Err(PagerError::Timeout { what: "completion acknowledgement", after: self.cfg.peer_timeout });
            }
            return Ok(());
        }
        if self.inst.complete() {
            conn.send(&Msg::Complete { n_present: self.inst.n_present() })?;
            self.session.on_complete_sent();
            st.complete_sent = Some(now);
            st.last_tx = now;
            return Ok(());
        }
        self.rerequest(st, now)
    }

    /// Ask again for pages whose replies did not come in time, and after the
    /// push ended, for every page still missing and not asked for.
    fn rerequest(&mut self, st: &mut LoopState, now: Instant) -> Result<(), PagerError> {
        st.ranges.clear();
        while let Some(&(t, r)) = st.inflight.front() {
            if now.duration_since(t) < self.cfg.retry_after {
                break;
            }
            st.inflight.pop_front();
            for q in r.first.0..r.end() {
                let q = PageIdx(q);
                if !self.inst.present().get(q) {
                    st.requested.clear(q);
                }
            }
        }
        let push_done = self.bulk.as_ref().is_some_and(Bulks::push_done);
        let sweep = push_done && !st.swept;
        let retry_due = st.inflight.front().is_none_or(|&(t, _)| now.duration_since(t) >= self.cfg.retry_after);
        if sweep || (st.swept && retry_due) {
            // Everything neither here (mapped or held) nor requested: lost in
            // flight, or never pushed.
            st.swept = true;
            let mut at = 0;
            let present = self.inst.present();
            let n = st.requested.len();
            while let Some(p) = present.next_with(at, false) {
                let end = present.next_with_below(p.0, n, true).map_or(n, |q| q.0);
                for q in p.0..end {
                    let q = PageIdx(q);
                    // Held first: the mapper sets present before clearing
                    // held, so this order cannot miss a page in between.
                    if self.inst.is_held(q) || self.inst.present().get(q) {
                        continue;
                    }
                    if !st.requested.set(q) {
                        match st.ranges.last_mut() {
                            Some(last) if last.end() == q.0 => last.n_pages += 1,
                            _ => st.ranges.push(PageRange::new(q, 1)),
                        }
                    }
                }
                at = end;
            }
        }
        if !st.ranges.is_empty() {
            let pages: u64 = st.ranges.iter().map(|r| r.n_pages).sum();
            PagerMetrics::add(&self.metrics.pages_rerequested, pages);
            tracing::debug!(pages, ranges = st.ranges.len(), "re-requesting missing pages");
            self.send_ranges(st, now)?;
        }
        Ok(())
    }
}

fn account_rx(conn: &dyn Conn, st: &mut LoopState, metrics: &PagerMetrics) {
    let now = conn.bytes_received();
    PagerMetrics::add(&metrics.bytes_received, now - st.rx_seen);
    st.rx_seen = now;
}
