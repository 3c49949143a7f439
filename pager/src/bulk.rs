//! The bulk receiver: precopy rounds and the background push, read from the
//! socket straight into guest memory (shared memory) or a scratch buffer
//! (anonymous memory) and installed as they arrive, on a thread of its own
//! so that large frames never delay the fault loop's demand replies.
//!
//! Each bulk connection has its own [`BulkLink`] of flags: after a
//! reconnect the old receiver may still be finishing (a frame cut short
//! waits out its timeout), and what it reports must not touch the new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::session::{BulkEvent, DestBulk};
use transport::{Conn, Placed, Wait};

use crate::error::PagerError;
use crate::install::{BulkPlacer, Installer};
use crate::metrics::PagerMetrics;
use crate::shared::Shared;

/// How often the receiver looks at its stop flags while the link is idle.
const IDLE_CHECK: Duration = Duration::from_millis(50);

/// What one bulk connection's receiver tells the fault loop.
#[derive(Debug)]
pub(crate) struct BulkLink {
    epoch: Instant,
    stop: AtomicBool,
    push_done: AtomicBool,
    last_rx_ms: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<PagerError>>,
}

impl BulkLink {
    fn new() -> Self {
        BulkLink {
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            push_done: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub(crate) fn push_done(&self) -> bool {
        self.push_done.load(Ordering::Acquire)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection last delivered anything.
    pub(crate) fn last_rx(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed))
    }

    fn fail(&self, e: PagerError) {
        *self.error.lock() = Some(e);
        self.failed.store(true, Ordering::Release);
    }

    /// Surface the receiver's failure in the caller's thread.
    pub(crate) fn check(&self) -> Result<(), PagerError> {
        if self.failed.load(Ordering::Acquire)
            && let Some(e) = self.error.lock().take()
        {
            return Err(PagerError::Bulk(Box::new(e)));
        }
        Ok(())
    }
}

/// A running receiver; dropping it stops the receiver and waits for it.
pub(crate) struct BulkHandle {
    pub(crate) link: Arc<BulkLink>,
    thread: Option<JoinHandle<()>>,
}

impl BulkHandle {
    /// Tell the receiver to stop, without waiting for it.
    pub(crate) fn stop(&self) {
        self.link.stop.store(true, Ordering::Release);
    }
}

impl Drop for BulkHandle {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receivers of one link's bulk connections (several with
/// `--push-streams`): the link is as alive as its liveliest connection, has
/// failed when any has, and its push is done when every stream's is.
pub(crate) struct Bulks(pub(crate) Vec<BulkHandle>);

impl Bulks {
    /// The first receiver's failure, if any.
    pub(crate) fn check(&self) -> Result<(), PagerError> {
        self.0.iter().try_for_each(|b| b.link.check())
    }

    /// When any of the connections last delivered anything.
    pub(crate) fn last_rx(&self) -> Instant {
        self.0.iter().map(|b| b.link.last_rx()).max().unwrap_or_else(Instant::now)
    }

    /// Whether every stream sent PushDone.
    pub(crate) fn push_done(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|b| b.link.push_done())
    }

    /// Tell every receiver to stop, without waiting.
    pub(crate) fn stop(&self) {
        self.0.iter().for_each(BulkHandle::stop);
    }
}

/// Start receiving `conn` (bound to the session as `session`) on a thread of
/// its own at `nice`.
pub(crate) fn spawn(
    conn: Box<dyn Conn>,
    session: DestBulk,
    inst: Arc<Installer>,
    shared: Arc<Shared>,
    metrics: Arc<PagerMetrics>,
    nice: i32,
) -> Result<BulkHandle, PagerError> {
    let link = Arc::new(BulkLink::new());
    link.touch();
    let l = Arc::clone(&link);
    let thread = std::thread::Builder::new()
        .name("pager-bulk".into())
        .spawn(move || {
            transport::sched::set_thread_nice(nice);
            run(conn, session, &inst, &shared, &l, &metrics);
        })
        .map_err(|e| PagerError::Spawn { what: "pager-bulk", source: e })?;
    Ok(BulkHandle { link, thread: Some(thread) })
}

/// Receive until PushDone, a stop, or an error (which it hands to the fault
/// loop through `link`).
fn run(
    mut conn: Box<dyn Conn>,
    mut session: DestBulk,
    inst: &Installer,
    shared: &Shared,
    link: &BulkLink,
    metrics: &PagerMetrics,
) {
    let mut placer = BulkPlacer::new(inst, &mut session);
    if let Err(e) = receive(&mut *conn, &mut placer, shared, link, metrics) {
        link.fail(e);
    }
}

fn receive(
    conn: &mut dyn Conn,
    placer: &mut BulkPlacer<'_>,
    shared: &Shared,
    link: &BulkLink,
    metrics: &PagerMetrics,
) -> Result<(), PagerError> {
    let mut switched = false;
    let mut seen = conn.bytes_received();
    loop {
        if shared.aborted() || link.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if !switched && shared.switched() {
            placer.session().on_switchover();
            switched = true;
        }
        let got = conn.recv_placed(Wait::for_(IDLE_CHECK), placer)?;
        let event = match got {
            None => continue,
            Some(Placed::Pages { .. }) => BulkEvent::Pages,
            Some(Placed::Msg(msg)) => placer.session().on_recv(&msg)?,
        };
        link.touch();
        let now = conn.bytes_received();
        PagerMetrics::add(&metrics.bytes_received, now - seen);
        seen = now;
        match event {
            BulkEvent::RoundEnd => shared.round_done(),
            BulkEvent::PushDone { lost } => {
                PagerMetrics::add(&metrics.pages_push_lost, lost);
                link.push_done.store(true, Ordering::Release);
                return Ok(());
            }
            BulkEvent::Zeros { first, n_pages, kind } => {
                placer.install_zeros(first, n_pages, kind)?;
            }
            BulkEvent::Pages | BulkEvent::Bound => {}
        }
    }
}
