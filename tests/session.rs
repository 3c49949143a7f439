//! Pager and sender in one process over the in-memory transport, with real
//! workload guests and a real userfaultfd: the session logic under delay,
//! loss, reordering and disconnection.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use guest::{GuestMemory, Workload, WorkloadConfig};
use pager::{PagerConfig, PagerMetrics, Prefetch, PrefetchMode};
use postcopy::adapters::{DestAny, GuestSummary, WorkloadSource};
use proto::{MemLayout, PageSize};
use sender::{FailPhase, SenderConfig, SenderMetrics};
use transport::mem::{MemConn, MemLink, MemListener, pair};
use transport::{Conn, TransportError};

#[derive(Debug)]
struct Links {
    ctl_to_dest: MemLink,
    ctl_to_src: MemLink,
    bulk: MemLink,
    /// Destination memory.
    backing: guest::Backing,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            ctl_to_dest: MemLink::default(),
            ctl_to_src: MemLink::default(),
            bulk: MemLink::default(),
            backing: guest::Backing::Shmem,
        }
    }
}

/// A listener that hands out `c` (the destination's end of the first bulk
/// connection).
fn listener_of(c: MemConn) -> Arc<MemListener> {
    let l = Arc::new(MemListener::default());
    l.push(Box::new(c));
    l
}

/// A source's dialer: the first bulk connection is `bulk`; every later
/// connection (a reconnection) is a fresh clean in-memory pair whose far end
/// goes to `listener`.
fn dialer(
    bulk: MemConn,
    listener: Arc<MemListener>,
) -> impl FnMut(sender::Channel) -> Result<Box<dyn Conn>, TransportError> {
    let mut bulk = Some(bulk);
    move |ch| {
        if ch == sender::Channel::Bulk
            && let Some(b) = bulk.take()
        {
            return Ok(Box::new(b) as Box<dyn Conn>);
        }
        let (near, far) = pair(MemLink::default(), MemLink::default());
        listener.push(Box::new(far));
        Ok(Box::new(near) as Box<dyn Conn>)
    }
}

struct Outcome {
    dest: Result<pager::Outcome<DestAny>, pager::PagerError>,
    src: Result<sender::SenderReport, sender::SendFailure>,
    pm: Arc<PagerMetrics>,
    sm: Arc<SenderMetrics>,
    src_guest: WorkloadSource,
}

/// Migrate a `mb`-MiB workload guest over in-memory links; fails the test if
/// either side takes longer than `limit`.
fn migrate(
    mb: u64,
    wcfg: WorkloadConfig,
    links: Links,
    pcfg: PagerConfig,
    scfg: SenderConfig,
    limit: Duration,
) -> Outcome {
    let layout = MemLayout::single(PageSize::Size4K, mb << 20).unwrap();
    let mem = Arc::new(GuestMemory::new(layout).unwrap());
    let w = Workload::boot(mem, wcfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let backing = links.backing;
    let (src_ctl, dest_ctl) = pair(links.ctl_to_dest, links.ctl_to_src);
    let (src_bulk, dest_bulk) = pair(links.bulk, MemLink::default());
    let pm = Arc::new(PagerMetrics::default());
    let sm = Arc::new(SenderMetrics::default());
    let (tx, rx) = mpsc::channel();
    let listener = listener_of(dest_bulk);
    let mut dial = dialer(src_bulk, Arc::clone(&listener));
    {
        let pm = Arc::clone(&pm);
        std::thread::spawn(move || {
            let r = pager::run(
                Box::new(dest_ctl),
                &*listener,
                |acc, cancel| {
                    DestAny::new(
                        acc.guest_kind,
                        acc.layout.clone(),
                        backing,
                        postcopy::adapters::Populate::Before,
                        cancel,
                    )
                    .map_err(|e| pager::GuestError::Memory(Box::new(e)))
                },
                &pcfg,
                pm,
            );
            let _ = tx.send(r);
        });
    }
    let (stx, srx) = mpsc::channel();
    {
        let sm = Arc::clone(&sm);
        std::thread::spawn(move || {
            let r = sender::run(Box::new(src_ctl), &mut dial, &mut src_guest, &scfg, sm);
            let _ = stx.send((r, src_guest));
        });
    }
    let t0 = Instant::now();
    let dest = rx.recv_timeout(limit).expect("destination hung");
    let left = limit.saturating_sub(t0.elapsed()).max(Duration::from_secs(5));
    let (src, src_guest) = srx.recv_timeout(left).expect("source hung");
    Outcome { dest, src, pm, sm, src_guest }
}

fn wcfg(pattern: &str, vcpus: u32) -> WorkloadConfig {
    WorkloadConfig { vcpus, pattern: pattern.parse().unwrap(), ..Default::default() }
}

/// Stop the destination guest and verify every page; returns pages verified.
fn verify_dest(o: pager::Outcome<DestAny>) -> u64 {
    let g = o.guest.finish();
    assert_eq!(g.violations, 0, "violations: {:?}", g.problems);
    assert!(g.verify_ok, "verification failed: {:?}", g.problems);
    g.verified_pages
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn clean_link_every_page_once_demand_and_push() {
    for backing in [guest::Backing::Shmem, guest::Backing::Anonymous] {
        clean_link(backing);
    }
}

fn clean_link(backing: guest::Backing) {
    let links = Links { backing, ..Default::default() };
    let o = migrate(32, wcfg("uniform", 2), links, PagerConfig::default(), SenderConfig::default(), LIMIT);
    let d = o.dest.expect("destination");
    let s = o.src.expect("source");
    let n = d.report.accepted.layout.n_pages();
    assert_eq!(verify_dest(d), n);
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // Every page arrived, each counted once, by demand or push.
    assert_eq!(g(&o.pm.pages_present), n);
    assert_eq!(g(&o.pm.pages_demand) + g(&o.pm.pages_push), n);
    assert!(g(&o.pm.pages_demand) > 0, "the guest faulted, so some pages came on demand");
    assert!(g(&o.pm.faults) > 0 && g(&o.pm.requests) > 0);
    // The source pushed what was not served on demand, never a page twice by push.
    assert_eq!(s.stats.pages_pushed, g(&o.sm.pages_pushed));
    assert!(s.stats.pages_pushed + s.stats.pages_demand >= n);
    assert!(g(&o.sm.push_restarts) > 0, "the push restarts after requested ranges");
    assert!(g(&o.sm.bytes_sent) >= n * 4096);
    assert!(g(&o.pm.bytes_received) >= n * 4096);
    assert_eq!(s.outstanding_pages, n);
    assert!(d_ok_latency(&o.pm));
    drop(o.src_guest.into_workload().stop());
}

fn d_ok_latency(pm: &PagerMetrics) -> bool {
    let h = pm.fault_latency.lock();
    h.count() > 0 && !pm.blocktime_ns.lock().is_empty()
}

#[test]
fn demand_does_not_wait_for_the_push() {
    // The bulk link delivers nothing for 20 s: every page the guest touches
    // in the meantime must come on demand, and the guest must make progress.
    let links =
        Links { bulk: MemLink { pages_delay: Duration::from_secs(20), ..Default::default() }, ..Default::default() };
    let pcfg = PagerConfig { peer_timeout: Duration::from_secs(30), ..Default::default() };
    let scfg = SenderConfig { peer_timeout: Duration::from_secs(30), ..Default::default() };
    let layout = MemLayout::single(PageSize::Size4K, 8 << 20).unwrap();
    let mem = Arc::new(GuestMemory::new(layout).unwrap());
    let w = Workload::boot(mem, wcfg("hotset:512K", 1)).unwrap();
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let (src_ctl, dest_ctl) = pair(links.ctl_to_dest, links.ctl_to_src);
    let (src_bulk, dest_bulk) = pair(links.bulk, MemLink::default());
    let pm = Arc::new(PagerMetrics::default());
    let (tx, rx) = mpsc::channel();
    let pm2 = Arc::clone(&pm);
    let listener = listener_of(dest_bulk);
    let mut dial = dialer(src_bulk, Arc::clone(&listener));
    std::thread::spawn(move || {
        let r = pager::run(
            Box::new(dest_ctl),
            &*listener,
            |acc, cancel| {
                DestAny::new(
                    acc.guest_kind,
                    acc.layout.clone(),
                    guest::Backing::Shmem,
                    postcopy::adapters::Populate::Background,
                    cancel,
                )
                .map_err(|e| pager::GuestError::Memory(Box::new(e)))
            },
            &pcfg,
            pm2,
        );
        let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
    });
    let sm = Arc::new(SenderMetrics::default());
    let sm2 = Arc::clone(&sm);
    std::thread::spawn(move || {
        let _ = sender::run(Box::new(src_ctl), &mut dial, &mut src_guest, &scfg, sm2);
    });
    // Wait until the hot set (128 pages + table) has come in on demand.
    let t0 = Instant::now();
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    while g(&pm.pages_demand) < 100 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "demand stalled behind the push: {} demand pages",
            g(&pm.pages_demand)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(g(&pm.pages_push), 0, "nothing can have come by push yet");
    // Let the run finish (the push eventually arrives) so threads end cleanly.
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("destination hung");
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn lost_push_frames_are_rerequested() {
    for backing in [guest::Backing::Shmem, guest::Backing::Anonymous] {
        lost_push_frames(backing);
    }
}

fn lost_push_frames(backing: guest::Backing) {
    let links =
        Links { bulk: MemLink { drop_pages_every: Some(7), ..Default::default() }, backing, ..Default::default() };
    let pcfg = PagerConfig { retry_after: Duration::from_millis(200), ..Default::default() };
    let o = migrate(
        16,
        wcfg("sequential", 1),
        links,
        pcfg,
        SenderConfig { push_run_pages: 16, ..Default::default() },
        LIMIT,
    );
    let d = o.dest.expect("destination completes despite losses");
    o.src.expect("source");
    let n = d.report.accepted.layout.n_pages();
    assert_eq!(verify_dest(d), n);
    assert!(o.pm.pages_rerequested.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(o.pm.pages_push_lost.load(std::sync::atomic::Ordering::Relaxed) > 0);
    drop(o.src_guest.into_workload().stop());
}

#[test]
fn lost_demand_replies_are_rerequested_and_delays_and_reordering_are_harmless() {
    for backing in [guest::Backing::Shmem, guest::Backing::Anonymous] {
        lossy_links(backing);
    }
}

fn lossy_links(backing: guest::Backing) {
    let links = Links {
        backing,
        ctl_to_dest: MemLink {
            drop_pages_every: Some(5),
            reorder_every: Some(3),
            delay: Duration::from_millis(1),
            ..Default::default()
        },
        ctl_to_src: MemLink { delay: Duration::from_millis(1), ..Default::default() },
        // The push lags far behind, so only re-requests can make up for the drops.
        bulk: MemLink {
            delay: Duration::from_millis(2),
            pages_delay: Duration::from_secs(1),
            reorder_every: Some(4),
            ..Default::default()
        },
    };
    let pcfg = PagerConfig {
        retry_after: Duration::from_millis(100),
        prefetch: Some(Prefetch { pages: 4, mode: PrefetchMode::Around }),
        ..Default::default()
    };
    let o = migrate(16, wcfg("zipf:0.9", 2), links, pcfg, SenderConfig::default(), LIMIT);
    let d = o.dest.expect("destination");
    o.src.expect("source");
    let n = d.report.accepted.layout.n_pages();
    assert_eq!(verify_dest(d), n);
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(g(&o.pm.pages_rerequested) > 0, "dropped demand replies must be asked for again");
    drop(o.src_guest.into_workload().stop());
}

/// Recovery on, short timeouts: the migration must finish with every page
/// verified after the link fails as `links` says.
fn survives(links: Links, what: &str) -> WorkloadSource {
    let t = |ms| Duration::from_millis(ms);
    let pcfg = PagerConfig { peer_timeout: t(600), recover_timeout: t(20_000), ..Default::default() };
    let scfg = SenderConfig { peer_timeout: t(600), recover_timeout: t(20_000), ..Default::default() };
    let o = migrate(64, wcfg("uniform", 2), links, pcfg, scfg, Duration::from_secs(60));
    let d = o.dest.expect(what);
    let s = o.src.as_ref().expect(what);
    let n = d.report.accepted.layout.n_pages();
    assert!(d.report.completion_confirmed, "{what}");
    assert_eq!(verify_dest(d), n, "{what}");
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(g(&o.pm.recoveries) >= 1, "{what}: the destination saw no recovery");
    assert!(s.recoveries >= 1 && g(&o.sm.recoveries) == s.recoveries, "{what}");
    assert!(g(&o.pm.paused_ns) > 0 && s.paused > Duration::ZERO, "{what}");
    // Each page present once, whatever crossed twice.
    assert_eq!(g(&o.pm.pages_present), n, "{what}");
    o.src_guest
}

#[test]
fn a_broken_link_after_switchover_is_recovered() {
    // The control connection breaks during demand serving (reset: both
    // ends see it), the bulk connection during the push.
    for links in [
        Links { ctl_to_dest: MemLink { disconnect_after: Some(40), ..Default::default() }, ..Default::default() },
        Links { ctl_to_src: MemLink { disconnect_after: Some(30), ..Default::default() }, ..Default::default() },
        Links { bulk: MemLink { disconnect_after: Some(20), ..Default::default() }, ..Default::default() },
        Links {
            backing: guest::Backing::Anonymous,
            bulk: MemLink { disconnect_after: Some(20), ..Default::default() },
            ..Default::default()
        },
    ] {
        let what = format!("{links:?}");
        drop(survives(links, &what).into_workload());
    }
}

#[test]
fn a_silent_link_after_switchover_is_noticed_and_recovered() {
    // Frames stop arriving without the connection closing: only liveness
    // checks can tell, on whichever side notices first.
    for links in [
        Links { ctl_to_src: MemLink { blackhole_after: Some(20), ..Default::default() }, ..Default::default() },
        Links { bulk: MemLink { blackhole_after: Some(30), ..Default::default() }, ..Default::default() },
    ] {
        let what = format!("{links:?}");
        drop(survives(links, &what).into_workload());
    }
}

#[test]
fn a_lost_switchover_ack_is_settled_by_the_resume() {
    // Destination to source: ServerHello, HelloAck, then the SwitchoverAck
    // is the first frame lost; the source is in doubt until it reconnects.
    let links = Links { ctl_to_src: MemLink { disconnect_after: Some(2), ..Default::default() }, ..Default::default() };
    drop(survives(links, "lost switchover ack").into_workload());
}

#[test]
fn a_bulk_link_lost_before_the_last_round_lands_cancels_and_the_source_takes_the_guest_back() {
    // Hybrid, one precopy round: the bulk connection swallows everything
    // from the round's end marker on (32 MiB = 32 frames of 1 MiB after the
    // BulkHello). The Switchover reaches the destination, which cannot
    // resume without the round: it cancels, the source (in doubt) asks, is
    // told "not switched", and resumes the guest. Neither side runs it twice.
    let links = Links { bulk: MemLink { blackhole_after: Some(33), ..Default::default() }, ..Default::default() };
    let t = |ms| Duration::from_millis(ms);
    let pcfg = PagerConfig { peer_timeout: t(600), recover_timeout: t(10_000), ..Default::default() };
    let scfg = SenderConfig {
        mode: proto::wire::Mode::Hybrid,
        policy: sender::Policy { postcopy_after: Some(1), ..Default::default() },
        peer_timeout: t(600),
        handshake_timeout: t(3000),
        recover_timeout: t(10_000),
        ..Default::default()
    };
    let o = migrate(32, wcfg("uniform", 1), links, pcfg, scfg, Duration::from_secs(60));
    let d = o.dest.err().expect("the destination must not run the guest").to_string();
    assert!(d.contains("cancelled before switchover"), "{d}");
    let f = o.src.expect_err("the source must say so");
    assert_eq!(f.phase, FailPhase::BeforeSwitchover, "{f}");
    assert!(matches!(f.error, sender::SenderError::NotSwitched), "{:?}", f.error);
    // The guest runs on here, and checks out.
    let w = o.src_guest.into_workload();
    let a0 = w.stats().accesses;
    let t0 = Instant::now();
    while w.stats().accesses < a0 + 10_000 {
        assert!(t0.elapsed() < Duration::from_secs(10), "guest not running on the source");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(w.stop().total.violations, 0);
}

#[test]
fn an_error_before_the_acknowledgement_gives_the_guest_back_to_the_source() {
    // The destination refuses the switchover (a miscounted outstanding set)
    // before resuming anything and says so; the source, reading an Error
    // where the acknowledgement should be, resumes the guest itself.
    let layout = MemLayout::single(PageSize::Size4K, 8 << 20).unwrap();
    let w = Workload::boot(Arc::new(GuestMemory::new(layout).unwrap()), wcfg("uniform", 1)).unwrap();
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let (src_ctl, dest_ctl) = pair(MemLink::default(), MemLink::default());
    let (src_bulk, dest_bulk) = pair(MemLink::default(), MemLink::default());
    let listener = listener_of(dest_bulk);
    let (tx, rx) = mpsc::channel();
    {
        let listener = Arc::clone(&listener);
        std::thread::spawn(move || {
            let r = pager::run(
                Box::new(dest_ctl),
                &*listener,
                |acc, cancel| {
                    DestAny::new(
                        acc.guest_kind,
                        acc.layout.clone(),
                        guest::Backing::Shmem,
                        postcopy::adapters::Populate::Before,
                        cancel,
                    )
                    .map_err(|e| pager::GuestError::Memory(Box::new(e)))
                },
                &PagerConfig::default(),
                Arc::new(PagerMetrics::default()),
            );
            let _ = tx.send(r.map(|_| ()).map_err(|e| format!("{e:?}")));
        });
    }
    let mut dial = dialer(src_bulk, Arc::clone(&listener));
    let control: Box<dyn Conn> = Box::new(HideOutstanding(src_ctl, Lie::Miscount));
    let f =
        sender::run(control, &mut dial, &mut src_guest, &SenderConfig::default(), Arc::new(SenderMetrics::default()))
            .expect_err("the switchover was refused");
    assert_eq!(f.phase, FailPhase::BeforeSwitchover, "{f}");
    let d = rx.recv_timeout(LIMIT).expect("destination hung").expect_err("the destination refused");
    assert!(d.contains("outstanding pages") && d.contains("Count"), "{d}");
    let w = src_guest.into_workload();
    let a0 = w.stats().accesses;
    let t0 = Instant::now();
    while w.stats().accesses < a0 + 10_000 {
        assert!(t0.elapsed() < Duration::from_secs(10), "guest not running on the source");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(w.stop().total.violations, 0);
}

#[test]
fn disconnect_after_switchover_fails_both_sides_quickly() {
    // The control link dies after a few frames from the source: after the
    // switchover, during demand serving.
    let links =
        Links { ctl_to_dest: MemLink { disconnect_after: Some(40), ..Default::default() }, ..Default::default() };
    let t0 = Instant::now();
    // Recovery off: a broken link ends both sides.
    let o = migrate(
        64,
        wcfg("uniform", 1),
        links,
        PagerConfig { recover_timeout: Duration::ZERO, ..Default::default() },
        SenderConfig { recover_timeout: Duration::ZERO, ..Default::default() },
        Duration::from_secs(30),
    );
    assert!(o.dest.is_err(), "destination must fail");
    let f = o.src.expect_err("source must fail");
    assert_eq!(f.phase, FailPhase::AfterSwitchover);
    assert!(t0.elapsed() < Duration::from_secs(20));
    drop(o.src_guest.into_workload());
}

#[test]
fn disconnect_before_switchover_keeps_the_guest_on_the_source() {
    // The source's third frame (after Hello and BulkHello... the guest state)
    // never leaves: the link closes.
    let links =
        Links { ctl_to_dest: MemLink { disconnect_after: Some(1), ..Default::default() }, ..Default::default() };
    let o =
        migrate(8, wcfg("uniform", 1), links, PagerConfig::default(), SenderConfig::default(), Duration::from_secs(30));
    assert!(o.dest.is_err());
    let f = o.src.expect_err("source must fail");
    assert_eq!(f.phase, FailPhase::BeforeSwitchover, "{f}");
    // The guest still runs here, and checks out.
    let w = o.src_guest.into_workload();
    let a0 = w.stats().accesses;
    let t0 = Instant::now();
    while w.stats().accesses < a0 + 10_000 {
        assert!(t0.elapsed() < Duration::from_secs(10), "guest not running on the source");
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = w.stop();
    assert_eq!(r.total.violations, 0);
}

#[test]
fn silent_source_is_detected() {
    // Everything from the source is delayed far beyond the peer timeout after
    // the handshake: the destination must give up on its own.
    let links =
        Links { ctl_to_dest: MemLink { delay: Duration::from_secs(30), ..Default::default() }, ..Default::default() };
    let pcfg = PagerConfig {
        peer_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let t0 = Instant::now();
    let o = migrate(
        4,
        wcfg("uniform", 1),
        links,
        pcfg,
        SenderConfig { handshake_timeout: Duration::from_secs(3), ..Default::default() },
        Duration::from_secs(20),
    );
    let e = o.dest.err().expect("destination must fail").to_string();
    assert!(e.contains("timed out") || e.contains("presumed dead"), "{e}");
    assert!(o.src.is_err());
    assert!(t0.elapsed() < Duration::from_secs(15));
    drop(o.src_guest.into_workload());
}

#[test]
fn prefetch_and_regions_do_not_change_the_outcome() {
    let layout = MemLayout::new(
        PageSize::Size4K,
        vec![
            proto::RegionDesc { guest: proto::GuestOffset(0), len_bytes: 6 << 20 },
            proto::RegionDesc { guest: proto::GuestOffset(1 << 32), len_bytes: 5 << 20 },
        ],
    )
    .unwrap();
    // Two regions: pages and requests that span them must land right.
    let mem = Arc::new(GuestMemory::new(layout).unwrap());
    let w = Workload::boot(mem, wcfg("sequential", 2)).unwrap();
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let (src_ctl, dest_ctl) = pair(MemLink::default(), MemLink::default());
    let (src_bulk, dest_bulk) = pair(MemLink::default(), MemLink::default());
    let pcfg = PagerConfig { prefetch: Some(Prefetch { pages: 64, mode: PrefetchMode::After }), ..Default::default() };
    let pm = Arc::new(PagerMetrics::default());
    let (tx, rx) = mpsc::channel();
    let listener = listener_of(dest_bulk);
    let mut dial = dialer(src_bulk, Arc::clone(&listener));
    std::thread::spawn(move || {
        let r = sender::run(
            Box::new(src_ctl),
            &mut dial,
            &mut src_guest,
            &SenderConfig { push_run_pages: 100, ..Default::default() },
            Arc::new(SenderMetrics::default()),
        );
        let _ = tx.send((r.is_ok(), src_guest));
    });
    let d = pager::run(
        Box::new(dest_ctl),
        &*listener,
        |acc, cancel| {
            DestAny::new(
                acc.guest_kind,
                acc.layout.clone(),
                guest::Backing::Shmem,
                postcopy::adapters::Populate::Background,
                cancel,
            )
            .map_err(|e| pager::GuestError::Memory(Box::new(e)))
        },
        &pcfg,
        pm,
    )
    .expect("destination");
    let n = d.report.accepted.layout.n_pages();
    assert_eq!(d.report.prefetch.pages, 64);
    assert_eq!(verify_dest(d), n);
    let (ok, g) = rx.recv_timeout(LIMIT).expect("source hung");
    assert!(ok);
    drop(g.into_workload().stop());
}

/// A control connection that hides the outstanding set from the destination:
/// it drops Outstanding frames and rewrites Switchover to name no page. A
/// destination fooled this way keeps its stale precopy copies, and the guest
/// must notice.
/// A source control connection that lies in its switchover: it hides the
/// outstanding set (`Hide`), or miscounts it (`Miscount`, which the
/// destination refuses before resuming anything).
struct HideOutstanding(transport::mem::MemConn, Lie);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lie {
    Hide,
    Miscount,
}

impl Conn for HideOutstanding {
    fn send(&mut self, msg: &proto::wire::Msg<'_>) -> Result<(), transport::TransportError> {
        use proto::wire::Msg;
        match (msg, self.1) {
            (Msg::Outstanding { .. }, Lie::Hide) => Ok(()),
            (Msg::Switchover { precopy_rounds, .. }, Lie::Hide) => {
                self.0.send(&Msg::Switchover { n_outstanding: 0, precopy_rounds: *precopy_rounds })
            }
            (Msg::Switchover { n_outstanding, precopy_rounds }, Lie::Miscount) => {
                self.0.send(&Msg::Switchover { n_outstanding: n_outstanding + 1, precopy_rounds: *precopy_rounds })
            }
            (m, _) => self.0.send(m),
        }
    }
    fn send_pages(
        &mut self,
        first: proto::PageIdx,
        n: u32,
        kind: proto::wire::PageKind,
        data: &[transport::IoSpan<'_>],
    ) -> Result<(), transport::TransportError> {
        self.0.send_pages(first, n, kind, data)
    }
    fn recv(&mut self, wait: transport::Wait) -> Result<Option<proto::wire::Msg<'_>>, transport::TransportError> {
        self.0.recv(wait)
    }
    fn recv_placed(
        &mut self,
        wait: transport::Wait,
        placer: &mut dyn transport::PagePlacer,
    ) -> Result<Option<transport::Placed<'_>>, transport::TransportError> {
        self.0.recv_placed(wait, placer)
    }
    fn set_page_size(&mut self, ps: PageSize) {
        self.0.set_page_size(ps);
    }
    fn readiness(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.readiness()
    }
    fn has_buffered(&self) -> bool {
        self.0.has_buffered()
    }
    fn bytes_sent(&self) -> u64 {
        self.0.bytes_sent()
    }
    fn bytes_received(&self) -> u64 {
        self.0.bytes_received()
    }
    fn peer(&self) -> &str {
        self.0.peer()
    }
}

/// Hybrid migration of a store-only hot-set guest; returns the destination's
/// guest report, its metrics and the source's report.
fn hybrid(backing: guest::Backing, hide: bool) -> (GuestSummary, Arc<PagerMetrics>, sender::SenderReport) {
    let layout = MemLayout::single(PageSize::Size4K, 32 << 20).unwrap();
    let mem = Arc::new(GuestMemory::new(layout).unwrap());
    let cfg =
        WorkloadConfig { vcpus: 1, pattern: "hotset:1M".parse().unwrap(), store_ratio: 1.0, ..Default::default() };
    let w = Workload::boot(mem, cfg).unwrap();
    // The guest must be running (on a loaded machine a new thread may wait):
    // it has to dirty its hot set while round 0 sends all 8192 pages.
    let t0 = Instant::now();
    while w.stats().stores < 100_000 {
        assert!(t0.elapsed() < Duration::from_secs(20), "guest never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let (src_ctl, dest_ctl) = pair(MemLink::default(), MemLink::default());
    let (src_bulk, dest_bulk) = pair(MemLink::default(), MemLink::default());
    let pm = Arc::new(PagerMetrics::default());
    let (tx, rx) = mpsc::channel();
    let listener = listener_of(dest_bulk);
    {
        let pm = Arc::clone(&pm);
        let listener = Arc::clone(&listener);
        std::thread::spawn(move || {
            let r = pager::run(
                Box::new(dest_ctl),
                &*listener,
                |acc, cancel| {
                    DestAny::new(
                        acc.guest_kind,
                        acc.layout.clone(),
                        backing,
                        postcopy::adapters::Populate::Before,
                        cancel,
                    )
                    .map_err(|e| pager::GuestError::Memory(Box::new(e)))
                },
                &PagerConfig::default(),
                pm,
            );
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    }
    let control: Box<dyn Conn> = if hide { Box::new(HideOutstanding(src_ctl, Lie::Hide)) } else { Box::new(src_ctl) };
    let mut dial = dialer(src_bulk, Arc::clone(&listener));
    let scfg = SenderConfig {
        mode: proto::wire::Mode::Hybrid,
        policy: sender::Policy { postcopy_after: Some(1), ..Default::default() },
        ..Default::default()
    };
    let s = sender::run(control, &mut dial, &mut src_guest, &scfg, Arc::new(SenderMetrics::default())).expect("source");
    let d = rx.recv_timeout(LIMIT).expect("destination hung").expect("destination");
    // Let the guest run on with all memory local, then stop and verify it.
    std::thread::sleep(Duration::from_millis(100));
    let r = d.guest.finish();
    drop(src_guest.into_workload().stop());
    (r, pm, s)
}

#[test]
fn pages_dirtied_after_precopy_are_evicted_and_fetched_again() {
    for backing in [guest::Backing::Shmem, guest::Backing::Anonymous] {
        let (r, pm, s) = hybrid(backing, false);
        assert_eq!(r.violations, 0, "{backing:?}: {:?}", r.problems);
        assert!(r.verify_ok, "{backing:?}: {:?}", r.problems);
        assert_eq!(r.verified_pages, 8192, "{backing:?}: every page verified");
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.precopy.rounds, 1);
        assert!(s.outstanding_pages > 0 && s.outstanding_pages < 8192, "{} {:?}", s.outstanding_pages, s.precopy);
        assert!(g(&pm.pages_precopy) >= 8192, "round 0 sent every page");
        assert!(g(&pm.pages_evicted) > 0, "{backing:?}: outstanding pages held from precopy were dropped");
        // The evicted pages came back with their new contents.
        assert_eq!(g(&pm.pages_demand) + g(&pm.pages_push), s.outstanding_pages);
        if backing == guest::Backing::Shmem {
            // The clean precopy pages were held and mapped here after resume.
            assert_eq!(g(&pm.pages_mapped_local), 8192 - s.outstanding_pages);
        }
    }
}

#[test]
fn a_stale_precopy_copy_is_caught_by_the_guest() {
    // The same migration with the outstanding set hidden from the
    // destination: it keeps pages the source dirtied after sending them.
    let (r, pm, s) = hybrid(guest::Backing::Shmem, true);
    assert!(s.outstanding_pages > 0);
    assert_eq!(pm.pages_evicted.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(r.violations > 0 || !r.verify_ok, "stale pages went unnoticed");
}
