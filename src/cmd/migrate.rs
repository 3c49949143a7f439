//! `postcopy migrate`: both sides on this machine as two processes (over
//! loopback or the two-host lab), their reports merged; the child-process
//! plumbing (reaping, dying with the parent, signals, temporary files).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::args::{MigrateArgs, prefetch_of};
use super::progress::{DestProgress, ProgressView};
use crate::netlab::{LinkSpec, NetLab};
use crate::report::{LinkReport, Report, summary};

/// Wait for `child` until `deadline` (or until `interrupted`), killing it then.
fn wait_until(child: &mut Child, deadline: Instant, interrupted: &AtomicBool) -> Result<ExitStatus> {
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a child process if the parent bails out early.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Under `migrate`: if it dies without stopping us (SIGKILL), die too,
/// rather than run a guest and hold a port for nobody.
pub(crate) fn die_with_parent() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    // The parent may have died before the call.
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        std::process::exit(1);
    }
}

/// Check `migrate`'s options without running anything.
pub fn check_migrate(args: &MigrateArgs) -> Result<LinkSpec> {
    args.migration.policy()?;
    args.migration.push_rate()?;
    args.guest.check()?;
    prefetch_of(args.migration.prefetch, args.migration.prefetch_mode)?;
    args.link.parse().context("--link")
}

/// Run a whole migration on this machine: destination and source as two
/// processes, over loopback TCP or across the two-host lab (`--link`).
/// Returns the exit code.
pub fn migrate(args: &MigrateArgs) -> Result<i32> {
    // Validate here, so a bad option fails before any process starts.
    let link = check_migrate(args)?;
    args.transport.check()?;
    // Both sides live on this host: the source's guest and the destination's copy.
    let layout = args.guest.layout()?;
    let mem = layout.len_bytes();
    crate::host::check_room(mem.saturating_mul(2), "a migration on one host (source and destination)")?;
    // Transparent huge pages on the destination need no reserve.
    let copies = if args.dest.memory == super::args::MemoryArg::Thp { 1 } else { 2 };
    crate::host::check_huge_pages(&layout, copies, "a migration on one host (source and destination)")?;
    let exe = std::env::current_exe().context("locating the postcopy executable")?;
    // Ctrl-C or a TERM stops both sides and removes the lab's namespaces.
    let interrupted = Arc::new(AtomicBool::new(false));
    stop_on_signals(&interrupted)?;
    let mut lab = if link.veth { Some(NetLab::create(&link).context("setting up the two-host lab")?) } else { None };
    let mut link_report = LinkReport {
        name: args.link.clone(),
        #[allow(clippy::cast_precision_loss)]
        rate_gbit: link.rate_bps.map_or(0.0, |b| b as f64 / 1e9),
        added_rtt_us: link.rtt.map_or(0.0, |d| d.as_secs_f64() * 1e6),
        ..LinkReport::default()
    };
    if let Some(lab) = &mut lab {
        let m = lab.measure().context("measuring the lab's link")?;
        link_report.measured_rtt_us = m.rtt.as_secs_f64() * 1e6;
        link_report.measured_rtt_idle_us = m.rtt_idle.as_secs_f64() * 1e6;
        link_report.measured_gbit = m.gbit;
        if !args.quiet {
            eprintln!(
                "postcopy: link {}: round trip {:.1} us ({:.1} us 10 ms apart), one TCP stream {:.2} Gbit/s (measured)",
                args.link, link_report.measured_rtt_us, link_report.measured_rtt_idle_us, m.gbit
            );
        }
    }
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let dir = tempdir()?;
    let dest_report = dir.join("dest.json");
    let src_report = dir.join("source.json");
    let mut dest_cmd = match &lab {
        Some(l) => l.command(false, &exe),
        None => Command::new(&exe),
    };
    let listen = if lab.is_some() { "0.0.0.0:0" } else { "127.0.0.1:0" };
    dest_cmd
        .args(["dest", "--child", "--listen", listen, "--announce", "--progress-lines", "--report"])
        .arg(&dest_report)
        .args(args.timeline.to_args())
        .args([
            "--run-after-ms",
            &args.run_after_ms.to_string(),
            "--peer-timeout-ms",
            &args.migration.peer_timeout_ms.to_string(),
            "--recover-timeout",
            &args.migration.recover_timeout.to_string(),
        ])
        .args(["--dscp".to_string(), super::args::name_of(&args.migration.dscp)])
        .args(args.dest.to_args())
        .args(args.transport.to_args())
        .args(if args.no_prepare { Vec::new() } else { args.guest.prepare_args() })
        .stdout(Stdio::piped());
    if let Some(n) = args.migration.background_nice {
        dest_cmd.args(["--background-nice", &n.to_string()]);
    }
    dest_cmd.arg("--quiet");
    if let Some(k) = &args.migration.key_file {
        dest_cmd.arg("--key-file").arg(k);
    }
    let mut dest = Reaper(Some(dest_cmd.spawn().context("starting the destination process")?));
    let stdout = dest.0.as_mut().and_then(|c| c.stdout.take()).context("destination stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let latest = Arc::new(parking_lot::Mutex::new(None::<DestProgress>));
    {
        let latest = Arc::clone(&latest);
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(std::result::Result::ok).unwrap_or_default();
            let _ = tx.send(first);
            for line in lines.map_while(std::result::Result::ok) {
                if let Some(p) = DestProgress::parse(&line) {
                    *latest.lock() = Some(p);
                }
            }
        });
    }
    let line = rx.recv_timeout(Duration::from_secs(10)).context("the destination did not start listening")?;
    let addr = line.strip_prefix("LISTENING ").map(str::trim).context("unexpected destination output")?.to_string();
    let addr = match &mut lab {
        Some(l) => {
            let port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).context("destination address")?;
            l.route_to(port)?.to_string()
        }
        None => addr,
    };
    let mut src_cmd = match &lab {
        Some(l) => l.command(true, &exe),
        None => Command::new(&exe),
    };
    src_cmd
        .args(["source", "--child", "--connect", &addr, "--report"])
        .arg(&src_report)
        .args(["--run-before-ms", &args.run_before_ms.to_string()])
        .args(args.guest.to_args())
        .args(args.migration.to_args())
        .args(args.transport.to_args());
    let mut source = Reaper(Some(src_cmd.spawn().context("starting the source process")?));
    let mut bar = ProgressView::new(args.quiet);
    // Whichever ends first, the other gets a bounded time to finish.
    let grace = Duration::from_secs(30) + Duration::from_millis(args.run_after_ms);
    let (src_status, dest_status) = loop {
        if interrupted.load(Ordering::Relaxed) {
            drop(bar);
            // The reapers kill both sides; the lab's drop removes its namespaces.
            bail!("interrupted");
        }
        bar.update(latest.lock().as_ref());
        let s = source.0.as_mut().expect("spawned").try_wait()?;
        let d = dest.0.as_mut().expect("spawned").try_wait()?;
        match (s, d) {
            (Some(s), Some(d)) => break (s, d),
            (Some(s), None) => {
                break (s, wait_until(dest.0.as_mut().expect("spawned"), Instant::now() + grace, &interrupted)?);
            }
            (None, Some(d)) => {
                break (wait_until(source.0.as_mut().expect("spawned"), Instant::now() + grace, &interrupted)?, d);
            }
            (None, None) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    drop(bar);
    source.0 = None;
    dest.0 = None;
    if let Some(lab) = &lab {
        link_report.urgent_bytes = lab.urgent_bytes().unwrap_or_else(|e| {
            eprintln!("postcopy: warning: reading the link's queue counters: {e:#}");
            None
        });
    }
    drop(lab);
    let mut merged = Report::read(&dest_report).unwrap_or_else(|e| Report {
        status: "failed".into(),
        error: Some(format!("destination wrote no report ({e:#}); exit {dest_status}")),
        ..Default::default()
    });
    let src = Report::read(&src_report).ok();
    if let Some(src) = &src {
        if merged.status == "ok" && src.status != "ok" {
            merged.status = "failed".into();
            merged.error = src.error.clone();
        }
        if merged.error.is_none() && src.error.is_some() {
            merged.error = src.error.clone();
        }
    }
    merged.side = "migration".into();
    if let Some(src) = &src {
        // The source ran precopy; the destination saw its pages and evicted.
        let evicted = merged.precopy.pages_evicted;
        merged.precopy = src.precopy.clone();
        merged.precopy.pages_evicted = evicted;
    }
    merged.push_rate_gbit = src.as_ref().map_or(0.0, |s| s.push_rate_gbit);
    merged.postcopy.push_yields = src.as_ref().map_or(0, |s| s.postcopy.push_yields);
    merged.source = src.map(Box::new);
    merged.link = link_report;
    if !dest_status.success() || !src_status.success() {
        merged.status = "failed".into();
        if merged.error.is_none() {
            merged.error = Some(format!("destination exit {dest_status}, source exit {src_status}"));
        }
    }
    if let Some(p) = &args.report {
        merged.write(p)?;
    }
    if let Some(p) = &args.timeline.timeline_csv {
        crate::timeline::write_csv(p, &merged.timeline, merged.page_size.max(1))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{}", summary(&merged));
    Ok(if merged.clean() { 0 } else { 1 })
}

/// A temporary directory, removed on drop (also when `migrate` bails out).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let p = base.join(format!("postcopy-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(TempDir(p));
        }
    }
    bail!("could not create a temporary directory under {}", base.display())
}

/// Set `flag` on SIGINT and SIGTERM; a second one exits at once.
pub fn stop_on_signals(flag: &Arc<AtomicBool>) -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(flag))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(flag)))
            .context("installing a signal handler")?;
    }
    Ok(())
}
