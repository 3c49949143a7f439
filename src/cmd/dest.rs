//! `postcopy dest`: listen, receive the guest, serve its faults, verify it.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use guest::parse_size;
use pager::{PagerConfig, PagerMetrics};
use proto::session::DestExpect;
use transport::tcp::{TcpListen, TcpOptions};

use super::args::{DestArgs, PopulateArg, prefetch_of, read_key};
use super::migrate::die_with_parent;
use super::progress::{Progress, progress_lines};
use crate::adapters::{DestAny, Populate};
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
    let listener = TcpListen::bind(&args.listen, TcpOptions { send_timeout: peer_timeout, ..TcpOptions::default() })
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
        None => crate::host::default_max_mem()?,
    };
    let metrics = Arc::new(PagerMetrics::default());
    let cfg = PagerConfig {
        prefetch,
        expect: DestExpect { key, max_mem_bytes: Some(max_mem_bytes), ..Default::default() },
        peer_timeout,
        recover_timeout: Duration::from_secs(args.recover_timeout),
        background_nice: args.background_nice,
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
    let populate = match args.opts.populate {
        PopulateArg::Before => Populate::Before,
        PopulateArg::Background => Populate::Background,
    };
    let outcome = pager::run(
        Box::new(control),
        &listener,
        |acc, cancel| {
            DestAny::new(acc.guest_kind, acc.layout.clone(), args.opts.memory.backing(), populate, cancel)
                .map_err(|e| pager::GuestError::Memory(Box::new(e)))
        },
        &cfg,
        Arc::clone(&metrics),
    );
    drop(progress);
    let (timeline, tick) = sampler.finish(outcome.as_ref().ok().map(|o| o.report.resumed));
    let page_size = outcome.as_ref().map_or(4096, |o| o.report.accepted.layout.page_size().bytes());
    if let Some(p) = &args.timeline.timeline_csv
        && let Err(e) = crate::timeline::write_csv(p, &timeline, page_size)
    {
        // Not worth failing a migration over: the series is in the report too.
        eprintln!("postcopy dest: warning: writing {}: {e}", p.display());
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("{:#}", anyhow::Error::new(e));
            eprintln!("postcopy dest: error: {msg}");
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
    let pr = &outcome.report;
    let kind = outcome.guest.kind();
    // The guest runs on with all memory local; then stop it and check every page.
    std::thread::sleep(Duration::from_millis(args.run_after_ms));
    let vcpu_failure = outcome.guest.error();
    let g = outcome.guest.finish();
    let mut report = Report::destination(pr, &metrics, &g, kind, vcpu_failure);
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
