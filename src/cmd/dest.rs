//! `postcopy dest`: listen, receive the guest, serve its faults, verify it.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use guest::parse_size;
use pager::vmm::{VmmGuest, VmmListener, VmmPeer};
use pager::{PagerConfig, PagerMetrics};
use proto::session::DestExpect;
use proto::wire::{GuestKind, Mode};
use transport::tcp::{Marking, TcpListen, TcpOptions};

use super::args::{DestArgs, PopulateArg, VmmOnFailure, prefetch_of, read_key};
use super::migrate::die_with_parent;
use super::progress::{Progress, progress_lines};
use crate::adapters::{DestAny, GuestSummary, Populate, Prepared};
use crate::report::{Report, ms, summary};

/// Run the destination. Returns the process exit code.
pub fn dest(args: &DestArgs) -> Result<i32> {
    if args.child {
        die_with_parent();
    }
    let key = read_key(&args.key_file)?;
    let prefetch = prefetch_of(args.prefetch, args.prefetch_mode)?;
    let max_mem = args.opts.max_mem.as_deref().map(parse_size).transpose().map_err(|e| anyhow!("--max-mem: {e}"))?;
    let peer_timeout = Duration::from_millis(args.peer_timeout_ms.max(100));
    args.transport.check()?;
    let vmm = args.vmm_uffd_socket.as_deref().map(VmmListener::bind).transpose()?;
    let populate = match args.opts.populate {
        PopulateArg::Before => Populate::Before,
        PopulateArg::Background => Populate::Background,
    };
    // Memory prepared while no source is here yet: the hello then finds it ready.
    let prepared = match args.prepare.layout()? {
        Some(layout) => {
            // 2 MiB pages come from the huge-page reserve, but with THP.
            if layout.page_size() == proto::PageSize::Size2M && args.opts.memory.backing() != guest::Backing::ShmemThp {
                crate::host::check_huge_pages(&layout, 1, "--prepare-mem")?;
            } else {
                crate::host::check_room(layout.len_bytes(), "--prepare-mem")?;
            }
            Some(Prepared::start(layout, args.opts.memory.backing(), populate).context("starting to prepare memory")?)
        }
        None => None,
    };
    let prepared_bytes = prepared.as_ref().map_or(0, |p| p.layout().len_bytes());
    let prepared = RefCell::new(prepared);
    let prepare_took = std::cell::Cell::new(None::<Duration>);
    // Every connection is marked urgent as accepted (the first message says
    // what it is); the bulk ones then take the bulk marks.
    let marking = if args.dscp == super::args::Switch::On { Marking::Urgent } else { Marking::None };
    let listener =
        TcpListen::bind(&args.listen, TcpOptions { send_timeout: peer_timeout, marking, ..TcpOptions::default() })
            .with_context(|| format!("listening on {}", args.listen))?;
    if args.announce {
        println!("LISTENING {}", listener.local_addr());
        std::io::stdout().flush()?;
    }
    let control = listener
        .accept(Instant::now() + Duration::from_secs(args.accept_timeout_s))
        .context("waiting for the source to connect")?;
    // What this host can give is read when the source arrives, not at start.
    let max_mem_bytes = match max_mem {
        Some(b) => b,
        // A guest the size of the prepared memory fits: it is that memory if
        // the layout matches, and takes its place (freed first) if not.
        // Anything larger must fit in what is available besides.
        None => crate::host::default_max_mem()?.max(prepared_bytes),
    };
    let metrics = Arc::new(PagerMetrics::default());
    let cfg = PagerConfig {
        prefetch,
        expect: DestExpect { key, max_mem_bytes: Some(max_mem_bytes), ..Default::default() },
        peer_timeout,
        recover_timeout: Duration::from_secs(args.recover_timeout),
        background_nice: args.background_nice,
        rdma: args.transport.rdma(0x5eed)?,
        rdma_window: args.transport.window()?,
        rdma_yield: args.transport.rdma_yield.setting(),
        ..PagerConfig::default()
    };
    let sampler = crate::timeline::Sampler::start(Arc::clone(&metrics), Duration::from_millis(args.timeline.tick_ms));
    let _lines = args.progress_lines.then(|| progress_lines(Arc::clone(&metrics)));
    let progress = {
        let m = Arc::clone(&metrics);
        Progress::start(args.quiet || args.progress_lines, move |t| {
            let present = PagerMetrics::get(&m.pages_present);
            (present > 0).then(|| {
                let bytes = PagerMetrics::get(&m.bytes_received);
                format!(
                    "[dest {:5.1}s] {present} pages present, {:.2} GB received, {} faults, {} requests",
                    t.as_secs_f64(),
                    bytes as f64 / 1e9,
                    PagerMetrics::get(&m.faults),
                    PagerMetrics::get(&m.requests),
                )
            })
        })
    };
    // A VMM's peer pidfd, kept out here to end it if its memory cannot be served.
    let vmm_peer: RefCell<Option<(VmmPeer, Option<OwnedFd>)>> = RefCell::new(None);
    let outcome = match &vmm {
        None => pager::run(
            Box::new(control),
            &listener,
            |acc, cancel| {
                if acc.guest_kind == GuestKind::Snapshot {
                    return Err(pager::GuestError::Memory(
                        "the source serves a VMM's snapshot memory: run the destination with --vmm-uffd-socket".into(),
                    ));
                }
                if let Some(p) = prepared.borrow_mut().take() {
                    match p.take(&acc.layout, cancel) {
                        Some(Ok((mem, populator, took))) => {
                            prepare_took.set(Some(took));
                            return Ok(DestAny::with_memory(acc.guest_kind, mem, populator));
                        }
                        Some(Err(e)) => return Err(pager::GuestError::Memory(Box::new(e))),
                        None => tracing::warn!(
                            "memory was prepared for another layout than the source's ({} bytes in {} regions of {} \
                             byte pages): creating it afresh",
                            acc.layout.len_bytes(),
                            acc.layout.regions().len(),
                            acc.layout.page_size().bytes()
                        ),
                    }
                }
                DestAny::new(acc.guest_kind, acc.layout.clone(), args.opts.memory.backing(), populate, cancel)
                    .map_err(|e| pager::GuestError::Memory(Box::new(e)))
            },
            &cfg,
            Arc::clone(&metrics),
        )
        .map(Served::Own),
        Some(v) => pager::run(
            Box::new(control),
            &listener,
            |acc, cancel| {
                let memory = |e: Box<dyn std::error::Error + Send + Sync>| pager::GuestError::Memory(e);
                if acc.guest_kind != GuestKind::Snapshot || acc.mode != Mode::Postcopy {
                    return Err(memory(
                        "a VMM restores its own vCPUs from its snapshot: the source must serve its memory file \
                         (source --memory-file, pure post-copy)"
                            .into(),
                    ));
                }
                let hs =
                    v.accept(Duration::from_secs(args.accept_timeout_s), cancel).map_err(|e| memory(Box::new(e)))?;
                let (peer, pidfd) = (hs.peer, hs.pidfd.as_ref().and_then(|p| p.try_clone().ok()));
                if !args.quiet {
                    eprintln!(
                        "postcopy dest: VMM pid {} (uid {}) connected with {} regions",
                        hs.peer.pid,
                        hs.peer.uid,
                        hs.regions.len()
                    );
                }
                let g = VmmGuest::new(hs, &acc.layout).map_err(|e| memory(Box::new(e)))?;
                // Only a VMM whose handshake was accepted is ever signalled.
                *vmm_peer.borrow_mut() = Some((peer, pidfd));
                Ok(g)
            },
            &cfg,
            Arc::clone(&metrics),
        )
        .map(Served::Vmm),
    };
    drop(progress);
    let (timeline, tick) = sampler.finish(outcome.as_ref().ok().map(|o| o.report().resumed));
    let page_size = outcome.as_ref().map_or(4096, |o| o.report().accepted.layout.page_size().bytes());
    if let Some(p) = &args.timeline.timeline_csv
        && let Err(e) = crate::timeline::write_csv(p, &timeline, page_size)
    {
        // Not worth failing a migration over: the series is in the report too.
        eprintln!("postcopy dest: warning: writing {}: {e}", p.display());
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) if e.guest_gone() => {
            // The VMM ended (its microVM shut down, or it crashed): nothing
            // is left to serve, and that is not this session's failure.
            let pid = vmm_peer.borrow().as_ref().map_or(0, |(p, _)| p.pid);
            eprintln!(
                "postcopy dest: the VMM (pid {pid}) exited with {} of {} pages present: session ended",
                PagerMetrics::get(&metrics.pages_present),
                PagerMetrics::get(&metrics.pages_total)
            );
            if let Some(p) = &args.report {
                let r = Report {
                    status: "vmm-exited".into(),
                    side: "destination".into(),
                    timeline_tick_ms: ms(tick),
                    timeline,
                    ..Default::default()
                };
                r.write(p)?;
            }
            return Ok(0);
        }
        Err(e) => {
            let msg = format!("{:#}", anyhow::Error::new(e));
            eprintln!("postcopy dest: error: {msg}");
            if let Some((peer, Some(pidfd))) = vmm_peer.borrow().as_ref() {
                if args.vmm_on_failure == VmmOnFailure::Kill {
                    if pager::vmm::kill(pidfd) {
                        eprintln!(
                            "postcopy dest: killed the VMM (pid {}): its vCPUs would wait forever on memory that cannot arrive",
                            peer.pid
                        );
                    } else {
                        eprintln!(
                            "postcopy dest: could not signal the VMM (pid {}): {}",
                            peer.pid,
                            std::io::Error::last_os_error()
                        );
                    }
                } else {
                    eprintln!(
                        "postcopy dest: the VMM (pid {}) was left running; its vCPUs wait on missing memory",
                        peer.pid
                    );
                }
            }
            if let Some(p) = &args.report {
                let r = Report {
                    status: "failed".into(),
                    error: Some(msg),
                    side: "destination".into(),
                    timeline_tick_ms: ms(tick),
                    timeline,
                    ..Default::default()
                };
                r.write(p)?;
            }
            return Ok(1);
        }
    };
    let (pr, g, kind, vcpu_failure) = match outcome {
        Served::Own(o) => {
            let kind = o.guest.kind();
            // The guest runs on with all memory local; then stop it and check every page.
            std::thread::sleep(Duration::from_millis(args.run_after_ms));
            let vcpu_failure = o.guest.error();
            (o.report, o.guest.finish(), kind, vcpu_failure)
        }
        // The VMM runs its guest on; judging it is the VMM's business.
        Served::Vmm(o) => {
            let g = GuestSummary {
                pattern: format!("vmm pid {}", o.guest.peer.pid),
                verify_ok: true,
                ..GuestSummary::default()
            };
            (o.report, g, GuestKind::Snapshot, None)
        }
    };
    let pr = &pr;
    let mut report = Report::destination(pr, &metrics, &g, kind, vcpu_failure);
    report.prepare_ms = prepare_took.get().map_or(0.0, ms);
    if kind == GuestKind::Snapshot {
        // A VMM's vCPUs are not ours to watch: it judges its own guest.
        report.guest.heartbeats_ok = true;
    }
    report.timeline_tick_ms = ms(tick);
    report.timeline = timeline;
    if report.error.is_some() {
        report.status = "failed".into();
    }
    if let Some(p) = &args.report {
        report.write(p)?;
    }
    if !args.quiet && !args.child {
        eprintln!("{}", summary(&report));
    }
    Ok(if report.clean() { 0 } else { 2 })
}

/// What the pager served: a guest of ours, or a VMM's (one value per run:
/// its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Served {
    Own(pager::Outcome<DestAny>),
    Vmm(pager::Outcome<VmmGuest>),
}

impl Served {
    fn report(&self) -> &pager::PagerReport {
        match self {
            Served::Own(o) => &o.report,
            Served::Vmm(o) => &o.report,
        }
    }
}
