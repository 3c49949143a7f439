//! The source's whole run: handshake, (precopy,) switchover, demand serving
//! alongside the background push, recovery from broken links, completion.
//!
//! Failure semantics, by phase (see [`FailPhase`]):
//! * before the Switchover message is fully written, the guest is unpaused
//!   and keeps running here: nothing was committed;
//! * after it is written and before the destination acknowledges it, the
//!   outcome is unknown: with recovery the source reconnects and asks (the
//!   destination either runs the guest, or says it never switched and the
//!   guest is resumed here); without an answer the guest stays paused and
//!   its memory is kept, since resuming could run it twice;
//! * after the acknowledgement the guest runs on the destination; the source
//!   keeps its memory (the authoritative copy of every page not yet
//!   confirmed) until the destination confirms completion, reconnecting
//!   after a broken link for up to `recover_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::session::{SessionError, SourceEvent, SourceOffer, SourceSession};
use proto::wire::{self, ErrorCode, Mode, Msg, ResumeState, ResumeTimes, SourceStats};
use proto::{AtomicPageBitmap, PageBitmap};
use transport::{Conn, Wait};

use crate::config::SenderConfig;
use crate::demand::{Demand, acknowledge};
use crate::error::{FailPhase, SendFailure, SenderError, fail};
use crate::guest::SourceGuest;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;
use crate::precopy::{self, PrecopyReport};
use crate::push::{Hints, Pusher};
use crate::reconnect::{Channel, Dial, Reattached, reconnect};

/// What the source measured.
#[derive(Clone, Debug, Default)]
pub struct SenderReport {
    /// Connect to completion acknowledged.
    pub total_time: Duration,
    /// Pause to SwitchoverAck received (or to the resume that settled it).
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
    /// Broken links restored.
    pub recoveries: u64,
    /// Time spent reconnecting.
    pub paused: Duration,
    /// The RDMA device, when post-copy pages went by RDMA.
    pub rdma_device: Option<String>,
    /// Registering guest memory for RDMA took this long.
    pub rdma_registration: Duration,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Migrate `guest` to the destination at the other end of `control`;
/// `dial` opens the bulk connection once the session is accepted, and both
/// connections again after a broken link.
pub fn run<G: SourceGuest>(
    mut control: Box<dyn Conn>,
    dial: &mut Dial<'_>,
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
        recovery: !cfg.recover_timeout.is_zero(),
        rdma: cfg.rdma.is_some(),
    });

    // Handshake. Any failure here leaves the guest running untouched.
    let before = fail(FailPhase::BeforeSwitchover);
    let session_id = handshake(&mut *control, &mut session, cfg).map_err(|e| {
        report_error(&mut *control, &e);
        before(e)
    })?;
    control.set_page_size(layout.page_size());
    map.allow_zeros(session.zeros());
    // RDMA: guest memory registered and offered before the bulk connection,
    // so the destination can read from the moment the guest resumes there.
    let mut rdma = match &cfg.rdma {
        Some(rc) => {
            let r = crate::rdma::set_up(
                &mut *control,
                &mut session,
                &map,
                rc,
                cfg.key.as_deref(),
                session_id,
                cfg.handshake_timeout,
            );
            Some(r.map_err(|e| {
                report_error(&mut *control, &e);
                fail(FailPhase::BeforeSwitchover)(e)
            })?)
        }
        None => None,
    };
    // One bulk connection per push stream (`--push-streams`), all bound to
    // the session; precopy uses the first.
    let streams = cfg.push_streams.clamp(1, u32::from(wire::MAX_STREAMS));
    let mut bulks = Vec::new();
    for _ in 0..streams {
        let mut b = dial(Channel::Bulk).map_err(|e| fail(FailPhase::BeforeSwitchover)(e.into()))?;
        b.set_page_size(layout.page_size());
        let streams = u16::try_from(streams).unwrap_or(1);
        b.send(&Msg::BulkHello { version: wire::VERSION, session: session_id, streams })
            .map_err(|e| fail(FailPhase::BeforeSwitchover)(e.into()))?;
        bulks.push(b);
    }
    let mut bulk = bulks.remove(0);

    // Precopy rounds while the guest runs (hybrid, precopy); in pure
    // postcopy every page is outstanding.
    let mut pre = PrecopyReport::default();
    let run_pages = cfg.run_pages(layout.page_size());
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
        return Err(take_back(guest, e));
    }
    session.on_switchover_sent();
    let t_sent = Instant::now();

    // Without the acknowledgement the outcome is unknown: a reconnection
    // settles it.
    let mut link = Link { control, bulk: Some(bulk), extra: bulks, zero_scan: None, push: true };
    let mut pushed = PageBitmap::full(layout.n_pages());
    for r in outstanding.runs() {
        pushed.clear_range(r);
    }
    let mut stats = SourceStats { pause_to_sent_ns: nanos(t_sent.duration_since(t_pause)), ..SourceStats::default() };
    let mut resume = ResumeTimes::default();
    let mut settled = None;
    match await_resume(&mut *link.control, &mut session, cfg) {
        Ok(t) => resume = t,
        Err(e) if e.is_link_failure() && session.on_link_lost() => {
            drop(link);
            let r = reconnect(dial, &mut session, cfg, &metrics, &e).map_err(fail(FailPhase::InDoubt))?;
            match r.state {
                ResumeState::NotSwitched => return Err(take_back(guest, SenderError::NotSwitched)),
                ResumeState::Running | ResumeState::Complete => {
                    pushed = r.have.clone();
                    link = Link { control: r.control, bulk: r.bulk, extra: Vec::new(), zero_scan: None, push: true };
                    settled = Some(r.state);
                }
            }
        }
        // The destination reports an error before acknowledging: it never
        // resumed the guest (it acknowledges before anything else can fail
        // there, and its frames arrive in order), so the guest is ours again.
        Err(e @ SenderError::Session(SessionError::Peer { .. })) => return Err(take_back(guest, e)),
        Err(e) => {
            report_error(&mut *link.control, &e);
            return Err(fail(FailPhase::InDoubt)(e));
        }
    }
    // With a reconnection in between, an upper bound: the guest may have run there sooner.
    let downtime = t_pause.elapsed();
    stats.downtime_ns = nanos(downtime);

    // Postcopy: demand on this thread, push on its own, until the
    // destination confirms every page; a broken link is reconnected.
    let after = || fail(FailPhase::AfterSwitchover);
    let mut state = settled.unwrap_or(ResumeState::Running);
    // Once the destination said Complete, only the acknowledgement is left:
    // one bound for all attempts to deliver it, not one per reconnection.
    let mut ack_deadline: Option<Instant> = None;
    // The guest is paused for good: what never held data is known now.
    link.zero_scan = guest.zero_scanner();
    // With RDMA the destination reads every page itself on the first link;
    // after a broken link the rest goes over TCP (the pusher).
    link.push = rdma.is_none() || settled.is_some();
    if !link.push
        && let Some(r) = rdma.as_mut()
    {
        // Zero pages go as Zeros frames, not as data read or written.
        let mut done = pushed.clone();
        if session.zeros() {
            let scan = link.zero_scan.take();
            let (covered, sent) =
                crate::rdma::send_zero_runs(&mut *link.control, &map, scan, &pushed, &metrics).map_err(after())?;
            tracing::debug!(sent, "zero runs sent ahead of the RDMA reads");
            done = covered;
        }
        // The destination may have asked for the background to be written
        // into its ring rather than read.
        r.start_writer(done, &metrics, cfg.peer_timeout).map_err(fail(FailPhase::AfterSwitchover))?;
    }
    loop {
        let served = if state == ResumeState::Complete {
            // The destination holds every page and only waits for this.
            acknowledge(&mut *link.control, &mut stats, &metrics)
        } else {
            serve_link(&mut link, &mut session, &map, &pushed, cfg, &metrics, &mut stats)
        };
        let served = match served {
            Ok(()) => break,
            Err(e) => e,
        };
        // The rest goes over TCP once the link is back.
        if let Some(r) = rdma.as_mut() {
            r.stop_writer();
        }
        if !(served.is_link_failure() && session.on_link_lost()) {
            report_error(&mut *link.control, &served);
            return Err(fail(FailPhase::AfterSwitchover)(served));
        }
        if session.completed() {
            let grace = cfg.recover_timeout.min((2 * cfg.peer_timeout).max(Duration::from_secs(5)));
            let d = *ack_deadline.get_or_insert_with(|| Instant::now() + grace);
            if Instant::now() >= d {
                tracing::warn!("every page is on the destination; its completion acknowledgement was not delivered");
                break;
            }
        }
        let r: Reattached = match reconnect(dial, &mut session, cfg, &metrics, &served) {
            Ok(r) => r,
            Err(e) if session.completed() => {
                // The destination said it holds every page: nothing is lost
                // without the acknowledgement (it finishes after a grace).
                tracing::warn!(
                    "every page is on the destination; its completion acknowledgement was not delivered: {}",
                    crate::error::error_chain(&e)
                );
                break;
            }
            Err(e) => return Err(after()(e)),
        };
        pushed = r.have;
        state = r.state;
        // After a broken link, one stream.
        link = Link { control: r.control, bulk: r.bulk, extra: Vec::new(), zero_scan: None, push: true };
    }
    Ok(SenderReport {
        total_time: started.elapsed(),
        downtime,
        pause_to_sent: t_sent.duration_since(t_pause),
        resume,
        outstanding_pages: outstanding.count_ones(),
        stats,
        precopy: pre,
        recoveries: SenderMetrics::get(&metrics.recoveries),
        paused: Duration::from_nanos(SenderMetrics::get(&metrics.paused_ns)),
        rdma_device: rdma.as_ref().map(|r| r.device.clone()),
        rdma_registration: rdma.as_ref().map_or(Duration::ZERO, |r| r.registration),
    })
}

/// The two connections of one link.
struct Link {
    control: Box<dyn Conn>,
    /// Taken by the pusher.
    bulk: Option<Box<dyn Conn>>,
    /// More push streams (`--push-streams`, first link only).
    extra: Vec<Box<dyn Conn>>,
    /// The guest's zero scan, for the first pusher (the result stays in
    /// the map across reconnections).
    zero_scan: Option<crate::guest::ZeroScan>,
    /// Whether to push on it (not when the destination reads by RDMA).
    push: bool,
}

/// The switchover failed before it was committed (or the destination said
/// it never happened): resume the guest here.
fn take_back<G: SourceGuest>(guest: &mut G, e: SenderError) -> SendFailure {
    guest.stop_dirty_tracking();
    match guest.unpause() {
        Ok(()) => fail(FailPhase::BeforeSwitchover)(e),
        // The guest could not be resumed: it stays paused, memory kept.
        Err(g) => {
            tracing::error!("could not resume the guest after a failed switchover: {g}");
            fail(FailPhase::InDoubt)(e)
        }
    }
}

/// Serve one link until completion or its failure: the pusher on its own
/// thread sends every page not in `pushed`, the demand server answers
/// requests here.
fn serve_link(
    link: &mut Link,
    session: &mut SourceSession,
    map: &Arc<SourceMap>,
    pushed: &PageBitmap,
    cfg: &SenderConfig,
    metrics: &Arc<SenderMetrics>,
    stats: &mut SourceStats,
) -> Result<(), SenderError> {
    let n = map.layout().n_pages();
    let served = Arc::new(AtomicPageBitmap::new(n));
    let abort = Arc::new(AtomicBool::new(false));
    let push_failed = Arc::new(AtomicBool::new(false));
    // Without a push (RDMA) the bulk connections stay open and idle.
    let conns: Vec<Box<dyn Conn>> =
        if link.push { link.bulk.take().into_iter().chain(link.extra.drain(..)).collect() } else { Vec::new() };
    let run_pages = cfg.run_pages(map.layout().page_size());
    let hints = Arc::new(Hints::new(n, conns.len(), run_pages));
    let governor = crate::push::Governor::new(cfg.push_yield, cfg.push_rate, hints.stripes().len());
    let mut push_threads = Vec::new();
    for (stripe, conn) in conns.into_iter().enumerate() {
        if stripe >= hints.stripes().len() {
            // More streams than stripes (a tiny guest): nothing for it.
            let mut conn = conn;
            conn.send(&Msg::PushDone { n_pushed: 0 })?;
            continue;
        }
        push_threads.push(spawn_pusher(
            Pusher {
                conn,
                map: Arc::clone(map),
                pushed: pushed.clone(),
                served: Arc::clone(&served),
                hints: Arc::clone(&hints),
                stripe,
                abort: Arc::clone(&abort),
                run_pages,
                governor: governor.lane(stripe),
                // The first stream scans for zero pages (the others read
                // each page's words as they send it, as before the scan).
                zero_scan: if stripe == 0 { link.zero_scan.take() } else { None },
                metrics: Arc::clone(metrics),
            },
            &push_failed,
            cfg,
        )?);
    }
    let mut demand = Demand {
        conn: &mut *link.control,
        session,
        map,
        served: &served,
        hints: &hints,
        cfg,
        metrics,
        ranges: Vec::new(),
    };
    let served_result = demand.serve(&push_failed, stats);
    abort.store(true, Ordering::Release);
    // The first failure among the streams, if any.
    let push_result = push_threads.into_iter().map(JoinHandle::join).fold(None, |first, r| match (first, r) {
        (Some(Ok(Err(e))), _) => Some(Ok(Err(e))),
        (_, r) => Some(r),
    });
    match served_result {
        Err(SenderError::PushStopped) => {
            // A destination that gives up drops the bulk connection and says
            // why on the control one; the hang-up may come first. Its reason
            // decides (no reconnecting to a side that ended on purpose).
            if let Some(e) = peer_reason(&mut *link.control, session, Duration::from_millis(250)) {
                return Err(e);
            }
            match push_result {
                Some(Ok(Err(pe))) => Err(pe),
                _ => Err(SenderError::PushStopped),
            }
        }
        Err(e) => Err(e),
        Ok(()) => {
            // The destination confirmed every page; a push error after that is moot.
            if let Some(Ok(Err(e))) = push_result {
                tracing::debug!("push ended with {e} after completion");
            }
            Ok(())
        }
    }
}

/// An Error frame the destination sends within `grace`, as the session's
/// error; anything else read meanwhile is dropped (a reconnection asks
/// again for whatever it still needs).
fn peer_reason(control: &mut dyn Conn, session: &mut SourceSession, grace: Duration) -> Option<SenderError> {
    let deadline = Instant::now() + grace;
    while let Ok(Some(msg)) = control.recv(Wait::Until(deadline)) {
        if matches!(msg, Msg::Error { .. })
            && let Err(e) = session.on_recv(&msg)
        {
            return Some(SenderError::Session(e));
        }
    }
    None
}

fn spawn_pusher(
    pusher: Pusher,
    failed: &Arc<AtomicBool>,
    cfg: &SenderConfig,
) -> Result<JoinHandle<Result<u64, SenderError>>, SenderError> {
    let failed = Arc::clone(failed);
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
        .map_err(|e| SenderError::Spawn { what: "sender-push", source: e })
}

fn report_error(conn: &mut dyn Conn, e: &SenderError) {
    let code = match e {
        SenderError::Session(s) => s.code(),
        _ => ErrorCode::Internal,
    };
    let text = format!("source: {}", crate::error::error_chain(e));
    let _ = conn.send(&Msg::Error { code, message: &text });
}

fn handshake(control: &mut dyn Conn, session: &mut SourceSession, cfg: &SenderConfig) -> Result<u64, SenderError> {
    let mut deadline = Instant::now() + cfg.handshake_timeout;
    loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout { what: "the destination's handshake", after: cfg.handshake_timeout });
        };
        match session.on_recv(&msg)? {
            SourceEvent::SendHello(h) => control.send(&Msg::Hello(h))?,
            SourceEvent::Accepted { session, .. } => return Ok(session),
            // The destination is preparing memory for the hello (seconds
            // per GiB) and says it is alive: wait on.
            SourceEvent::KeepAlive => deadline = Instant::now() + cfg.handshake_timeout,
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
    for (first_word, chunk) in wire::bitmap_chunks(outstanding.words()) {
        enc.clear();
        wire::encode_words(chunk, &mut enc);
        control.send(&Msg::Outstanding { first_word, words: wire::word_list(&enc) })?;
    }
    control.send(&Msg::Switchover { n_outstanding: outstanding.count_ones(), precopy_rounds: rounds })?;
    Ok(())
}

/// Wait for the switchover acknowledgement. The destination keeps talking
/// meanwhile (keep-alives while it waits for the last precopy round), so
/// silence for twice the peer timeout and a second means a broken link,
/// well before the overall limit; the destination lingers that long (and
/// more) to answer a source that comes back in doubt.
fn await_resume(
    control: &mut dyn Conn,
    session: &mut SourceSession,
    cfg: &SenderConfig,
) -> Result<ResumeTimes, SenderError> {
    let limit = Instant::now() + cfg.handshake_timeout;
    let silence = 2 * cfg.peer_timeout + Duration::from_secs(1);
    loop {
        let deadline = limit.min(Instant::now() + silence);
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout {
                what: "the destination to resume the guest",
                after: if Instant::now() >= limit { cfg.handshake_timeout } else { silence },
            });
        };
        match session.on_recv(&msg)? {
            SourceEvent::Resumed(t) => return Ok(t),
            SourceEvent::KeepAlive => {}
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting switchover ack" }.into()),
        }
    }
}
