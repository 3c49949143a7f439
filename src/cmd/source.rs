//! `postcopy source`: start the guest, connect, migrate it; after a failure
//! before switchover, prove it runs on here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use guest::{GuestMemory, Workload};
use pager::PrefetchMode;
use sender::{FailPhase, SenderConfig, SenderMetrics};
use transport::Conn;
use transport::tcp::{Marking, TcpConn, TcpOptions};

use super::args::{GuestArg, SourceArgs, prefetch_of, read_key};
use super::migrate::die_with_parent;
use crate::adapters::{SourceAny, VmSource, WorkloadSource};
use crate::report::{
    DowntimeParts, GuestReport, PostcopyReport, PrecopyReport, Report, gbps, guest_name, guest_report, mode_name, ms,
    ns_ms,
};

/// Run the source. Returns the process exit code.
pub fn source(args: &SourceArgs) -> Result<i32> {
    if args.child {
        die_with_parent();
    }
    // RDMA asked for where there is none fails before anything starts.
    args.transport.check()?;
    if let Some(path) = &args.memory_file {
        if args.migration.mode.mode() != proto::wire::Mode::Postcopy {
            bail!("--memory-file serves a snapshot that does not change: only --mode postcopy applies");
        }
        let ps = super::args::parse_page_size(&args.file_page_size).context("--file-page-size")?;
        let regions = args.file_regions.as_deref().map(crate::snapshot::parse_regions).transpose()?;
        let snap = crate::snapshot::SnapshotSource::open(path, ps, regions.as_deref())?;
        let layout = sender::SourceGuest::layout(&snap).clone();
        return migrate_guest(args, SourceAny::Snapshot(snap), layout);
    }
    let layout = args.guest.layout()?;
    args.guest.check()?;
    crate::host::check_room(layout.len_bytes(), "the source's guest")?;
    crate::host::check_huge_pages(&layout, 1, "the source's guest")?;
    // Bad options fail before the guest boots.
    read_key(&args.migration.key_file)?;
    prefetch_of(args.migration.prefetch, args.migration.prefetch_mode)?;
    args.migration.push_rate()?;
    let pause_timeout = Duration::from_secs(5);
    let guest = match args.guest.guest {
        GuestArg::Workload => {
            let mem = Arc::new(GuestMemory::new(layout.clone())?);
            let w = Workload::boot(mem, args.guest.workload()?)?;
            SourceAny::Workload(WorkloadSource::new(w, pause_timeout))
        }
        GuestArg::Vm => SourceAny::Vm(
            VmSource::boot(layout.clone(), args.guest.vm()?, pause_timeout)
                .map_err(|e| anyhow!("booting the VM guest: {e}"))?,
        ),
    };
    std::thread::sleep(Duration::from_millis(args.run_before_ms));
    migrate_guest(args, guest, layout)
}

/// Migrate `guest` (over `layout`) to the destination and report.
fn migrate_guest(args: &SourceArgs, mut guest: SourceAny, layout: proto::MemLayout) -> Result<i32> {
    let key = read_key(&args.migration.key_file)?;
    let prefetch = prefetch_of(args.migration.prefetch, args.migration.prefetch_mode)?;
    let peer_timeout = Duration::from_millis(args.migration.peer_timeout_ms.max(100));
    let push_rate = args.migration.push_rate()?;
    let cfg = SenderConfig {
        mode: args.migration.mode.mode(),
        key,
        prefetch_pages: prefetch.map_or(0, |p| p.pages),
        prefetch_around: prefetch.is_some_and(|p| p.mode == PrefetchMode::Around),
        push_run_pages: args.migration.push_run.clamp(1, 2048),
        push_streams: args.migration.push_streams,
        peer_timeout,
        policy: args.migration.policy()?,
        background_nice: args.migration.background_nice,
        recover_timeout: Duration::from_secs(args.migration.recover_timeout),
        push_yield: push_yield(args.migration.push_yield, &args.connect)?,
        push_rate,
        rdma: args.transport.rdma(args.guest.seed)?,
        ..SenderConfig::default()
    };
    let metrics = Arc::new(SenderMetrics::default());
    let marks = args.migration.dscp == super::args::Switch::On;
    let opts = TcpOptions {
        send_timeout: peer_timeout,
        marking: if marks { Marking::Urgent } else { Marking::None },
        ..TcpOptions::default()
    };
    let before_accesses = guest.accesses();
    let base = Report {
        side: "source".into(),
        mode: mode_name(cfg.mode),
        guest_kind: guest_name(guest.kind()),
        mem_bytes: layout.len_bytes(),
        page_size: layout.page_size().bytes(),
        regions: layout.regions().len(),
        vcpus: args.guest.vcpus,
        pattern: args.guest.pattern.clone(),
        store_ratio: args.guest.store_ratio,
        #[allow(clippy::cast_precision_loss)]
        push_rate_gbit: push_rate.map_or(0.0, |b| b as f64 * 8.0 / 1e9),
        ..Default::default()
    };
    let connected = TcpConn::connect(&args.connect, Duration::from_secs(10), &opts)
        .with_context(|| format!("connecting to the destination at {}", args.connect));
    let result = match connected {
        Err(e) => Err((FailPhase::BeforeSwitchover, e)),
        Ok(control) => {
            let addr = args.connect.clone();
            let recover_addr = args.recover_addr.clone().unwrap_or_else(|| addr.clone());
            let bulk_opts = TcpOptions {
                notsent_lowat: Some(256 * 1024),
                max_pacing_rate: push_rate,
                marking: if marks { Marking::Bulk } else { Marking::None },
                ..opts.clone()
            };
            // The first bulk connection goes where the control one went; after
            // a broken link both go to the recovery address.
            let mut first_bulk = true;
            let mut dial = move |ch: sender::Channel| {
                let to = if first_bulk { &addr } else { &recover_addr };
                let (timeout, o) = match ch {
                    sender::Channel::Bulk => {
                        first_bulk = false;
                        (Duration::from_secs(10), &bulk_opts)
                    }
                    sender::Channel::Control => (Duration::from_secs(2), &opts),
                };
                TcpConn::connect(to, timeout, o).map(|c| Box::new(c) as Box<dyn Conn>)
            };
            let r = match &mut guest {
                SourceAny::Workload(g) => sender::run(Box::new(control), &mut dial, g, &cfg, Arc::clone(&metrics)),
                SourceAny::Vm(g) => sender::run(Box::new(control), &mut dial, g, &cfg, Arc::clone(&metrics)),
                SourceAny::Snapshot(g) => sender::run(Box::new(control), &mut dial, g, &cfg, Arc::clone(&metrics)),
            };
            r.map_err(|f| (f.phase, anyhow::Error::new(f)))
        }
    };
    match result {
        Ok(r) => {
            let report = Report {
                status: "ok".into(),
                total_time_ms: ms(r.total_time),
                downtime_ms: ms(r.downtime),
                downtime: DowntimeParts {
                    pause_to_sent_ms: ms(r.pause_to_sent),
                    dest_evict_ms: ns_ms(r.resume.evict_ns),
                    dest_restore_ms: ns_ms(r.resume.restore_ns),
                },
                bytes_transferred: SenderMetrics::get(&metrics.bytes_sent),
                outstanding_pages: r.outstanding_pages,
                precopy: PrecopyReport {
                    rounds: r.precopy.rounds,
                    pages_sent: r.precopy.pages_sent,
                    bytes: r.precopy.bytes,
                    time_ms: ms(r.precopy.time),
                    round_pages: r.precopy.round_pages.clone(),
                    dirty_pages: r.precopy.dirty_pages.clone(),
                    stop_reason: r.precopy.stop.map(|s| s.name().to_string()).unwrap_or_default(),
                    stop_and_copy_pages: r.precopy.stop_and_copy_pages,
                    pages_evicted: 0,
                },
                postcopy: PostcopyReport {
                    pages_total: layout.n_pages(),
                    pages_pushed: SenderMetrics::get(&metrics.pages_pushed),
                    pages_demand: SenderMetrics::get(&metrics.pages_demand),
                    pages_zero: SenderMetrics::get(&metrics.pages_zero),
                    requests: SenderMetrics::get(&metrics.requests),
                    push_yields: SenderMetrics::get(&metrics.push_yields),
                    push_time_ms: ns_ms(r.stats.push_ns),
                    push_gbps: gbps(r.stats.pages_pushed * layout.page_size().bytes(), r.stats.push_ns),
                    recoveries: r.recoveries,
                    paused_ms: ms(r.paused),
                    ..Default::default()
                },
                guest: GuestReport { accesses: before_accesses, verify_ok: true, ..Default::default() },
                transport: if r.rdma_device.is_some() { "rdma" } else { "tcp" }.into(),
                rdma: r.rdma_device.as_ref().map(|d| crate::report::RdmaReport {
                    device: d.clone(),
                    registration_ms: ms(r.rdma_registration),
                    background_writes: SenderMetrics::get(&metrics.rdma_writes),
                    background_write_bytes: SenderMetrics::get(&metrics.rdma_write_bytes),
                    write_completions: SenderMetrics::get(&metrics.rdma_write_wc),
                    credits: SenderMetrics::get(&metrics.rdma_credits),
                    ..Default::default()
                }),
                ..base
            };
            // The guest now runs on the destination; the paused copy here is dropped.
            drop(guest);
            if let Some(p) = &args.report {
                report.write(p)?;
            }
            Ok(0)
        }
        Err((phase, e)) => {
            let msg = format!("{e:#}");
            eprintln!("postcopy source: error: {msg}");
            let mut report = Report { status: "failed".into(), error: Some(msg), ..base };
            if phase == FailPhase::BeforeSwitchover {
                // Nothing was committed: the guest runs on here. Prove it.
                std::thread::sleep(Duration::from_millis(args.run_after_ms));
                let g = guest.finish();
                report.guest = guest_report(&g, true);
                eprintln!(
                    "postcopy source: the guest kept running on the source: {} accesses since, {} violations, verification {}",
                    g.accesses_total.saturating_sub(before_accesses),
                    g.violations,
                    if g.verify_ok { "passed" } else { "FAILED" }
                );
            }
            if let Some(p) = &args.report {
                report.write(p)?;
            }
            Ok(1)
        }
    }
}

/// `--push-yield`, or its default for where the destination is: over
/// loopback nothing is shared at a bottleneck and yielding only slows the
/// push (measured: 1.31-1.41 against 1.58-1.68 GB/s).
fn push_yield(given: Option<f64>, connect: &str) -> Result<f64> {
    match given {
        Some(y) if y > 0.0 && y <= 1.0 => Ok(y),
        Some(y) => bail!("--push-yield must be in (0, 1], got {y}"),
        None => {
            let loopback = std::net::ToSocketAddrs::to_socket_addrs(connect)
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| a.ip().is_loopback());
            Ok(if loopback { 1.0 } else { DEFAULT_PUSH_YIELD })
        }
    }
}

/// The push's share of the link while the guest faults, over a network.
const DEFAULT_PUSH_YIELD: f64 = 0.75;
