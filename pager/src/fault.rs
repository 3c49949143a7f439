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

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::session::{DestEvent, DestSession};
use proto::wire::{self, MAX_REQUEST_RANGES, Msg, PageKind, SourceStats};
use proto::{PageBitmap, PageIdx, PageRange};
use transport::{Conn, Wait};

use crate::install::{Installer, PendingFault};
use crate::metrics::PagerMetrics;
use crate::pager::{PagerConfig, PagerError, Shared};
use crate::planner;
use crate::uffd::{Fault, MSG_LEN};

/// Longest the loop sleeps without looking at its timers.
const TICK: Duration = Duration::from_millis(20);

pub(crate) struct FaultLoop<'a> {
    pub(crate) prefetch: planner::Prefetch,
    pub(crate) conn: &'a mut dyn Conn,
    pub(crate) session: &'a mut DestSession,
    pub(crate) inst: &'a Installer,
    pub(crate) shared: &'a Shared,
    pub(crate) cfg: &'a PagerConfig,
    pub(crate) metrics: &'a PagerMetrics,
}

struct LoopState {
    requested: PageBitmap,
    /// Requested ranges in request order, for re-requests.
    inflight: VecDeque<(Instant, PageRange)>,
    msg_buf: Vec<u8>,
    faults: Vec<Fault>,
    pages: Vec<PageIdx>,
    ranges: Vec<PageRange>,
    enc: Vec<u8>,
    req_id: u32,
    last_tx: Instant,
    last_rx: Instant,
    swept: bool,
    complete_sent: Option<Instant>,
    rx_seen: u64,
}

impl FaultLoop<'_> {
    /// Serve faults until every page is present and the source acknowledged
    /// completion. Returns the source's figures.
    pub(crate) fn run(&mut self) -> Result<SourceStats, PagerError> {
        let n = self.inst.map().layout().n_pages();
        let now = Instant::now();
        let mut st = LoopState {
            requested: PageBitmap::new(n),
            inflight: VecDeque::new(),
            msg_buf: vec![0; 128 * MSG_LEN],
            faults: Vec::with_capacity(128),
            pages: Vec::with_capacity(128),
            ranges: Vec::with_capacity(256),
            enc: Vec::with_capacity(4096),
            req_id: 0,
            last_tx: now,
            last_rx: now,
            swept: false,
            complete_sent: None,
            rx_seen: self.conn.bytes_received(),
        };
        loop {
            let (uffd_ready, conn_ready) = self.wait(&st)?;
            if uffd_ready {
                self.handle_faults(&mut st)?;
            }
            if (conn_ready || self.conn.has_buffered())
                && let Some(stats) = self.drain_conn(&mut st)?
            {
                return Ok(stats);
            }
            self.timers(&mut st)?;
        }
    }

    /// Poll the userfaultfd and the connection until one is ready or a tick passes.
    fn wait(&self, st: &LoopState) -> Result<(bool, bool), PagerError> {
        if self.conn.has_buffered() {
            return Ok((false, true));
        }
        let next_keepalive = st.last_tx + self.cfg.keepalive;
        let timeout = next_keepalive.saturating_duration_since(Instant::now()).min(TICK);
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX).max(1);
        let mut fds = [
            PollFd::new(self.inst.uffd().as_fd(), PollFlags::POLLIN),
            PollFd::new(self.conn.readiness(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
            Err(e) => return Err(PagerError::Poll(e)),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        Ok((ready(&fds[0]), ready(&fds[1])))
    }

    fn handle_faults(&mut self, st: &mut LoopState) -> Result<(), PagerError> {
        st.faults.clear();
        self.inst.uffd().read_faults(&mut st.msg_buf, &mut st.faults)?;
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
            let local = self.inst.is_held(page);
            self.inst.add_pending(PendingFault { page, t_read, tid: f.tid, local });
            if local {
                // Its content is here already (precopy): map it now.
                PagerMetrics::add(&self.metrics.faults_local, 1);
                self.inst.map_held(proto::PageRange::new(page, 1))?;
            } else {
                st.pages.push(page);
            }
        }
        st.ranges.clear();
        let inst = self.inst;
        // Held first (see `rerequest`).
        let here = |p: PageIdx| inst.is_held(p) || inst.present().get(p);
        let added = planner::plan(&st.pages, self.prefetch, here, &mut st.requested, &mut st.ranges);
        if added > 0 {
            self.send_ranges(st, t_read)?;
        }
        Ok(())
    }

    /// Send `st.ranges` as one request (or several when over the limit).
    fn send_ranges(&mut self, st: &mut LoopState, now: Instant) -> Result<(), PagerError> {
        let ranges = std::mem::take(&mut st.ranges);
        for chunk in ranges.chunks(MAX_REQUEST_RANGES as usize) {
            st.enc.clear();
            wire::encode_ranges(chunk, &mut st.enc);
            st.req_id = st.req_id.wrapping_add(1);
            self.conn.send(&Msg::RangeRequest { req_id: st.req_id, ranges: wire::range_list(&st.enc) })?;
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
        // One read (poll said readable), then only what it already buffered:
        // anything arriving later is the next poll's news, so no read is
        // spent just to hear EAGAIN.
        loop {
            let Some(msg) = self.conn.recv(Wait::No)? else { break };
            st.last_rx = Instant::now();
            match self.session.on_recv(&msg)? {
                DestEvent::Data => {
                    if let Msg::Pages { first, data, .. } = msg {
                        self.inst.install(first, data, PageKind::Demand)?;
                    }
                }
                DestEvent::KeepAlive => {}
                DestEvent::Finished(stats) => {
                    self.account_rx(st);
                    return Ok(Some(stats));
                }
                // The session rejects these after switchover; an error, not a panic, if not.
                DestEvent::Accepted(_) | DestEvent::SwitchoverReady { .. } => {
                    let e = proto::session::SessionError::Unexpected { tag: msg.tag(), phase: "in postcopy" };
                    return Err(e.into());
                }
            }
            if !self.conn.has_buffered() {
                break;
            }
        }
        self.account_rx(st);
        Ok(None)
    }

    fn account_rx(&self, st: &mut LoopState) {
        let now = self.conn.bytes_received();
        PagerMetrics::add(&self.metrics.bytes_received, now - st.rx_seen);
        st.rx_seen = now;
    }

    fn timers(&mut self, st: &mut LoopState) -> Result<(), PagerError> {
        let now = Instant::now();
        self.shared.check_bulk()?;
        // Liveness: either connection counts.
        let last_rx = st.last_rx.max(self.shared.bulk_last_rx());
        if now.duration_since(last_rx) > self.cfg.peer_timeout {
            return Err(PagerError::PeerSilent(self.cfg.peer_timeout));
        }
        if now.duration_since(st.last_tx) >= self.cfg.keepalive {
            self.conn.send(&Msg::KeepAlive)?;
            st.last_tx = now;
        }
        if let Some(t) = st.complete_sent {
            if now.duration_since(t) > self.cfg.peer_timeout {
                return Err(PagerError::Timeout { what: "completion acknowledgement", after: self.cfg.peer_timeout });
            }
            return Ok(());
        }
        if self.inst.complete() {
            self.conn.send(&Msg::Complete { n_present: self.inst.n_present() })?;
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
        let sweep = self.shared.push_done() && !st.swept;
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
