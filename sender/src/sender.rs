//! The source's whole run: handshake, (precopy,) switchover, demand serving
//! alongside the background push, completion.
//!
//! Failure semantics, by phase (see [`FailPhase`]):
//! * before the Switchover message is fully written, the guest is unpaused
//!   and keeps running here: nothing was committed;
//! * after it is written and before the destination acknowledges it, the
//!   outcome is unknown: the guest stays paused and its memory is kept, since
//!   resuming could run it twice;
//! * after the acknowledgement the guest runs on the destination; the source
//!   keeps its memory (the authoritative copy of every page not yet
//!   confirmed) until the destination confirms completion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::session::{SessionError, SourceEvent, SourceOffer, SourceSession};
use proto::wire::{self, ErrorCode, MAX_OUTSTANDING_WORDS, Mode, Msg, PageKind, ResumeTimes, SourceStats};
use proto::{AtomicPageBitmap, PageBitmap, PageIdx, PageRange};
use transport::{Conn, IoSpan, TransportError, Wait};

use crate::guest::{GuestError, SourceGuest};
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;
use crate::precopy::{self, Policy, PrecopyReport};
use crate::push::{NO_HINT, Pusher};

/// Why the source's run failed.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// A connection failed.
    #[error("connection to the destination failed")]
    Transport(#[from] TransportError),
    /// The destination broke the protocol or reported an error.
    #[error("session with the destination failed")]
    Session(#[from] SessionError),
    /// The guest failed.
    #[error("guest failed: {0}")]
    Guest(GuestError),
    /// Nothing arrived from the destination for too long.
    #[error("no data from the destination for {0:?}: presumed dead")]
    PeerSilent(Duration),
    /// A step did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The pusher thread stopped with an error (reported separately).
    #[error("background push stopped")]
    PushStopped,
}

/// Where the run was when it failed: what became of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPhase {
    /// Before switchover: the guest was resumed and runs on the source.
    BeforeSwitchover,
    /// Switchover sent, not acknowledged: the guest is paused here, memory kept.
    InDoubt,
    /// After switchover: the guest runs on the destination.
    AfterSwitchover,
}

/// A failed run.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .phase {
    FailPhase::BeforeSwitchover => "migration failed before switchover; the guest keeps running on the source",
    FailPhase::InDoubt => "migration failed during switchover; the guest is paused on the source and its memory kept",
    FailPhase::AfterSwitchover => "migration failed after switchover; the guest was running on the destination",
})]
pub struct SendFailure {
    /// Where it failed.
    pub phase: FailPhase,
    /// Why.
    #[source]
    pub error: SenderError,
}

/// How the source behaves.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Migration mode.
    pub mode: Mode,
    /// Pre-shared key for the hello.
    pub key: Option<Vec<u8>>,
    /// Prefetch window to ask the destination for (0: it decides).
    pub prefetch_pages: u32,
    /// Whether that window is centered on the fault.
    pub prefetch_around: bool,
    /// Pages per background push frame.
    pub push_run_pages: u32,
    /// Longest wait for the destination's hello and acknowledgements.
    pub handshake_timeout: Duration,
    /// The destination is presumed dead after this long without a byte.
    pub peer_timeout: Duration,
    /// Send a keep-alive when idle this long.
    pub keepalive: Duration,
    /// How long the vCPUs may take to pause.
    pub pause_timeout: Duration,
    /// When to leave precopy (hybrid and precopy modes).
    pub policy: Policy,
    /// Nice value of the pusher (see `transport::sched`); `None` picks by
    /// mode: 10 in hybrid and precopy, 0 in pure postcopy (the destination's
    /// `pager::default_nice` says why).
    pub background_nice: Option<i32>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            mode: Mode::Postcopy,
            key: None,
            prefetch_pages: 0,
            prefetch_around: false,
            push_run_pages: 256,
            handshake_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            keepalive: Duration::from_millis(250),
            pause_timeout: Duration::from_secs(5),
            policy: Policy::default(),
            background_nice: None,
        }
    }
}

/// What the source measured.
#[derive(Clone, Debug, Default)]
pub struct SenderReport {
    /// Connect to completion acknowledged.
    pub total_time: Duration,
    /// Pause to SwitchoverAck received.
    pub downtime: Duration,
    /// Pause to the last byte of state and outstanding set written.
    pub pause_to_sent: Duration,
    /// The destination's own timings of its part.
    pub resume: ResumeTimes,
    /// Pages outstanding at switchover.
    pub outstanding_pages: u64,
    /// What was sent.
    pub stats: SourceStats,
    /// Precopy rounds (empty in pure postcopy).
    pub precopy: PrecopyReport,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn fail(phase: FailPhase) -> impl FnOnce(SenderError) -> SendFailure {
    move |error| SendFailure { phase, error }
}

/// Migrate `guest` to the destination at the other end of `control`;
/// `open_bulk` opens the second connection once the session is accepted.
pub fn run<G: SourceGuest>(
    mut control: Box<dyn Conn>,
    open_bulk: impl FnOnce() -> Result<Box<dyn Conn>, TransportError>,
    guest: &mut G,
    cfg: &SenderConfig,
    metrics: Arc<SenderMetrics>,
) -> Result<SenderReport, SendFailure> {
    let started = Instant::now();
    let layout = guest.layout().clone();
    let map = Arc::new(SourceMap::new(layout.clone(), guest.regions()));
    let mut session = SourceSession::new(SourceOffer {
        guest_kind: guest.kind(),
        mode: cfg.mode,
        layout: layout.clone(),
        key: cfg.key.clone(),
        prefetch_pages: cfg.prefetch_pages,
        prefetch_around: cfg.prefetch_around,
    });

    // Handshake. Any failure here leaves the guest running untouched.
    let before = fail(FailPhase::BeforeSwitchover);
    let session_id = handshake(&mut *control, &mut session, cfg).map_err(|e| {
        report_error(&mut *control, &e);
        before(e)
    })?;
    control.set_page_size(layout.page_size());
    let mut bulk = open_bulk().map_err(|e| fail(FailPhase::BeforeSwitchover)(e.into()))?;
    bulk.set_page_size(layout.page_size());
    bulk.send(&Msg::BulkHello { version: wire::VERSION, session: session_id })
        .map_err(|e| fail(FailPhase::BeforeSwitchover)(e.into()))?;

    // Precopy rounds while the guest runs (hybrid, precopy); in pure
    // postcopy every page is outstanding.
    let mut pre = PrecopyReport::default();
    let run_pages = u64::from(cfg.push_run_pages.max(1));
    let mut outstanding = match cfg.mode {
        Mode::Postcopy => PageBitmap::full(layout.n_pages()),
        Mode::Hybrid | Mode::Precopy => {
            let r = precopy::rounds(guest, &mut *control, &mut *bulk, &map, cfg, &metrics, &mut pre);
            match r {
                Ok(scanned) => scanned,
                Err(e) => {
                    guest.stop_dirty_tracking();
                    report_error(&mut *control, &e);
                    return Err(fail(FailPhase::BeforeSwitchover)(e));
                }
            }
        }
    };

    // Switchover. Until the Switchover frame is written, failure unpauses.
    let t_pause = Instant::now();
    let state = guest.pause().map_err(|e| fail(FailPhase::BeforeSwitchover)(SenderError::Guest(e)))?;
    let sent = (|| -> Result<(), SenderError> {
        if cfg.mode != Mode::Postcopy {
            // The final scan: what was written since the last one. Tracking
            // is left armed on the paused guest: unregistering walks every
            // page table entry (tens of ms per GiB), which must neither count
            // as downtime nor hold up demand serving; the guest object drops
            // it at the end (or a failure unpauses the guest untracked).
            guest.collect_dirty(&mut outstanding).map_err(SenderError::Guest)?;
            if cfg.mode == Mode::Precopy {
                // Stop-and-copy: everything left goes now, nothing stays outstanding.
                let n = precopy::send_set(&mut *bulk, &map, &outstanding, run_pages, &metrics)?;
                bulk.send(&Msg::PrecopyRound { round: pre.rounds, n_pages: n })?;
                pre.stop_and_copy_pages = n;
                pre.pages_sent += n;
                pre.round_pages.push(n);
                pre.rounds += 1;
                outstanding.clear_all();
            }
        }
        send_switchover(&mut *control, &state, &outstanding, pre.rounds)
    })();
    if let Err(e) = sent {
        report_error(&mut *control, &e);
        guest.stop_dirty_tracking();
        return Err(match guest.unpause() {
            Ok(()) => fail(FailPhase::BeforeSwitchover)(e),
            // The guest could not be resumed: it stays paused, memory kept.
            Err(g) => {
                tracing::error!("could not resume the guest after a failed switchover: {g}");
                fail(FailPhase::InDoubt)(e)
            }
        });
    }
    session.on_switchover_sent();
    let t_sent = Instant::now();
    let resume = await_resume(&mut *control, &mut session, cfg).map_err(|e| {
        report_error(&mut *control, &e);
        fail(FailPhase::InDoubt)(e)
    })?;
    let t_ack = Instant::now();
    let downtime = t_ack.duration_since(t_pause);

    // Postcopy: demand on this thread, push on its own.
    let served = Arc::new(AtomicPageBitmap::new(layout.n_pages()));
    let hint = Arc::new(AtomicU64::new(NO_HINT));
    let abort = Arc::new(AtomicBool::new(false));
    let mut pushed = PageBitmap::full(layout.n_pages());
    for r in outstanding.runs() {
        pushed.clear_range(r);
    }
    let pusher = Pusher {
        conn: bulk,
        map: Arc::clone(&map),
        pushed,
        served: Arc::clone(&served),
        hint: Arc::clone(&hint),
        abort: Arc::clone(&abort),
        run_pages: u64::from(cfg.push_run_pages.max(1)),
        metrics: Arc::clone(&metrics),
    };
    let push_failed = Arc::new(AtomicBool::new(false));
    let push_thread = {
        let failed = Arc::clone(&push_failed);
        let nice = cfg.background_nice.unwrap_or(if cfg.mode == Mode::Postcopy { 0 } else { 10 });
        std::thread::Builder::new()
            .name("sender-push".into())
            .spawn(move || {
                transport::sched::set_thread_nice(nice);
                let r = pusher.run();
                if r.is_err() {
                    failed.store(true, Ordering::Release);
                }
                r
            })
            .map_err(|e| fail(FailPhase::AfterSwitchover)(SenderError::Guest(Box::new(e))))?
    };

    let mut stats = SourceStats {
        downtime_ns: nanos(downtime),
        pause_to_sent_ns: nanos(t_sent.duration_since(t_pause)),
        ..SourceStats::default()
    };
    let mut demand = Demand {
        conn: &mut *control,
        session: &mut session,
        map: &map,
        served: &served,
        hint: &hint,
        cfg,
        metrics: &metrics,
        ranges: Vec::new(),
    };
    let served_result = demand.serve(&push_failed, &mut stats);
    abort.store(true, Ordering::Release);
    let push_result = push_thread.join();
    if let Err(mut e) = served_result {
        if let (SenderError::PushStopped, Ok(Err(pe))) = (&e, push_result) {
            e = pe;
        }
        report_error(&mut *control, &e);
        return Err(fail(FailPhase::AfterSwitchover)(e));
    }
    // The destination confirmed every page; a push error after that is moot.
    if let Ok(Err(e)) = push_result {
        tracing::debug!("push ended with {e} after completion");
    }
    Ok(SenderReport {
        total_time: started.elapsed(),
        downtime,
        pause_to_sent: t_sent.duration_since(t_pause),
        resume,
        outstanding_pages: outstanding.count_ones(),
        stats,
        precopy: pre,
    })
}

fn report_error(conn: &mut dyn Conn, e: &SenderError) {
    let code = match e {
        SenderError::Session(s) => s.code(),
        _ => ErrorCode::Internal,
    };
    let mut text = format!("source: {e}");
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    let _ = conn.send(&Msg::Error { code, message: &text });
}

fn handshake(control: &mut dyn Conn, session: &mut SourceSession, cfg: &SenderConfig) -> Result<u64, SenderError> {
    let deadline = Instant::now() + cfg.handshake_timeout;
    loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout { what: "the destination's handshake", after: cfg.handshake_timeout });
        };
        match session.on_recv(&msg)? {
            SourceEvent::SendHello(h) => control.send(&Msg::Hello(h))?,
            SourceEvent::Accepted { session, .. } => return Ok(session),
            SourceEvent::KeepAlive => {}
            // The session allows only handshake events here; an error, not a panic, if not.
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "in the handshake" }.into()),
        }
    }
}

fn send_switchover(
    control: &mut dyn Conn,
    state: &[u8],
    outstanding: &PageBitmap,
    rounds: u32,
) -> Result<(), SenderError> {
    control.send(&Msg::GuestState(state))?;
    let mut enc = Vec::new();
    for (i, chunk) in outstanding.words().chunks(MAX_OUTSTANDING_WORDS as usize).enumerate() {
        if chunk.iter().all(|w| *w == 0) {
            continue;
        }
        enc.clear();
        wire::encode_words(chunk, &mut enc);
        let first_word = (i * MAX_OUTSTANDING_WORDS as usize) as u64;
        control.send(&Msg::Outstanding { first_word, words: wire::word_list(&enc) })?;
    }
    control.send(&Msg::Switchover { n_outstanding: outstanding.count_ones(), precopy_rounds: rounds })?;
    Ok(())
}

fn await_resume(
    control: &mut dyn Conn,
    session: &mut SourceSession,
    cfg: &SenderConfig,
) -> Result<ResumeTimes, SenderError> {
    let deadline = Instant::now() + cfg.handshake_timeout;
    loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout {
                what: "the destination to resume the guest",
                after: cfg.handshake_timeout,
            });
        };
        match session.on_recv(&msg)? {
            SourceEvent::Resumed(t) => return Ok(t),
            SourceEvent::KeepAlive => {}
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting switchover ack" }.into()),
        }
    }
}

/// Longest the demand loop sleeps without looking at its timers.
const TICK: Duration = Duration::from_millis(20);

/// The demand server: answers range requests from guest memory directly on
/// the control connection, in the order the destination listed them (its
/// faulting pages first).
struct Demand<'a> {
    conn: &'a mut dyn Conn,
    session: &'a mut SourceSession,
    map: &'a SourceMap,
    served: &'a AtomicPageBitmap,
    hint: &'a AtomicU64,
    cfg: &'a SenderConfig,
    metrics: &'a SenderMetrics,
    ranges: Vec<PageRange>,
}

impl Demand<'_> {
    /// Serve until the destination confirms completion.
    fn serve(&mut self, push_failed: &AtomicBool, stats: &mut SourceStats) -> Result<(), SenderError> {
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut sent_seen = self.conn.bytes_sent();
        loop {
            if push_failed.load(Ordering::Acquire) {
                return Err(SenderError::PushStopped);
            }
            let now = Instant::now();
            if now.duration_since(last_rx) > self.cfg.peer_timeout {
                return Err(SenderError::PeerSilent(self.cfg.peer_timeout));
            }
            if now.duration_since(last_tx) >= self.cfg.keepalive {
                self.conn.send(&Msg::KeepAlive)?;
                last_tx = now;
            }
            let wait = (last_tx + self.cfg.keepalive).min(now + TICK);
            let Some(msg) = self.conn.recv(Wait::Until(wait))? else {
                continue;
            };
            last_rx = Instant::now();
            let event = self.session.on_recv(&msg)?;
            let msg_tag = msg.tag();
            if let Msg::RangeRequest { ranges, .. } = msg {
                // Copy out: the ranges borrow the receive buffer, the replies
                // need the connection.
                self.ranges.clear();
                self.ranges.extend(ranges.iter());
            }
            match event {
                SourceEvent::Request => {
                    self.answer()?;
                    last_tx = Instant::now();
                }
                SourceEvent::Complete => {
                    SenderMetrics::add(&self.metrics.bytes_sent, self.conn.bytes_sent() - sent_seen);
                    stats.pages_pushed = SenderMetrics::get(&self.metrics.pages_pushed);
                    stats.pages_demand = SenderMetrics::get(&self.metrics.pages_demand);
                    stats.requests = SenderMetrics::get(&self.metrics.requests);
                    stats.push_ns = SenderMetrics::get(&self.metrics.push_ns);
                    // The acknowledgement's own bytes are not in its count.
                    stats.bytes_sent = SenderMetrics::get(&self.metrics.bytes_sent);
                    self.conn.send(&Msg::CompleteAck(*stats))?;
                    return Ok(());
                }
                SourceEvent::KeepAlive => {}
                // The session allows only postcopy events here. After
                // switchover the source holds the only copy of the
                // outstanding pages: an error here, never a panic.
                _ => return Err(SessionError::Unexpected { tag: msg_tag, phase: "in postcopy" }.into()),
            }
            let now_sent = self.conn.bytes_sent();
            SenderMetrics::add(&self.metrics.bytes_sent, now_sent - sent_seen);
            sent_seen = now_sent;
        }
    }

    /// Send every page of `self.ranges` (validated by the session), one frame
    /// per range (split to stay within a frame's limit).
    fn answer(&mut self) -> Result<(), SenderError> {
        SenderMetrics::add(&self.metrics.requests, 1);
        let max_run = wire::MAX_RUN_BYTES / self.map.layout().page_size().bytes();
        let mut spans: Vec<IoSpan<'_>> = Vec::with_capacity(4);
        for r in &self.ranges {
            let mut first = r.first.0;
            while first < r.end() {
                let piece = PageRange::new(PageIdx(first), (r.end() - first).min(max_run));
                spans.clear();
                self.map.spans(piece, &mut spans);
                let n = u32::try_from(piece.n_pages).expect("bounded by MAX_RUN_BYTES");
                self.conn.send_pages(piece.first, n, PageKind::Demand, &spans)?;
                self.served.set_range(piece);
                first = piece.end();
            }
            SenderMetrics::add(&self.metrics.pages_demand, r.n_pages);
        }
        if let Some(last) = self.ranges.last() {
            // The guest tends to want the neighbours of what it just asked for.
            self.hint.store(last.end(), Ordering::Release);
        }
        Ok(())
    }
}
