//! The `dest`, `source` and `migrate` commands.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use guest::{Backing, GuestMemory, Pattern, Workload, WorkloadConfig, parse_size};
use pager::{PagerConfig, PagerMetrics, Prefetch, PrefetchMode};
use proto::session::DestExpect;
use proto::wire::{GuestKind, Mode};
use proto::{GuestOffset, MemLayout, PageSize, RegionDesc};
use sender::{FailPhase, SenderConfig, SenderMetrics};
use transport::Conn;
use transport::tcp::{TcpConn, TcpListen, TcpOptions};

use crate::adapters::{DestAny, GuestSummary, Populate, SourceAny, VmSource, WorkloadSource};
use crate::netlab::{LinkSpec, NetLab};
use crate::report::{
    DowntimeParts, GuestReport, LinkReport, PostcopyReport, PrecopyReport, PrefetchReport, Report, latency_of, ms,
    ns_ms,
};

/// Migration mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// No precopy: the guest moves first, every page follows.
    Postcopy,
    /// Precopy rounds while the guest runs, then switch to postcopy with the
    /// pages still dirty outstanding.
    Hybrid,
    /// Classic precopy: rounds until the dirty set fits the downtime budget
    /// (or the round limit), then stop-and-copy.
    Precopy,
}

impl ModeArg {
    fn mode(self) -> Mode {
        match self {
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid,
            ModeArg::Precopy => Mode::Precopy,
        }
    }
}

/// Destination memory on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryArg {
    /// Shared memory (memfd): pages are read from the socket straight into
    /// the page cache and mapped with UFFDIO_CONTINUE.
    Shmem,
    /// Private anonymous memory: pages are installed with UFFDIO_COPY.
    Anon,
}

impl MemoryArg {
    fn backing(self) -> Backing {
        match self {
            MemoryArg::Shmem => Backing::Shmem,
            MemoryArg::Anon => Backing::Anonymous,
        }
    }
}

/// When shared destination memory is allocated, on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PopulateArg {
    /// Before acknowledging the source (the guest runs on there meanwhile).
    Before,
    /// In the background: start at once, push slower.
    Background,
}

/// Prefetch placement on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrefetchModeArg {
    /// The pages after the faulting one.
    After,
    /// Centered on the faulting page.
    Around,
}

/// Which guest runs, on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestArg {
    /// Threads in this process touching guest memory.
    Workload,
    /// A KVM virtual machine running the same stress in machine code.
    Vm,
}

/// What the guest is and does (source and migrate).
#[derive(Args, Clone, Debug)]
pub struct GuestOpts {
    /// Which guest.
    #[arg(long, value_enum, default_value = "workload")]
    pub guest: GuestArg,
    /// Guest memory size (e.g. 256M, 1G, 1.5G).
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Access pattern: uniform, sequential, hotset:SIZE[:FRACTION], zipf:THETA.
    #[arg(long, default_value = "uniform")]
    pub pattern: String,
    /// Share of accesses that are stores.
    #[arg(long, default_value_t = 0.75)]
    pub store_ratio: f64,
    /// Seed of the guest's generators.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Split memory into this many regions (with holes between them).
    #[arg(long, default_value_t = 1)]
    pub regions: u32,
    /// An access slower than this many microseconds counts as a stall.
    #[arg(long, default_value_t = 5)]
    pub stall_threshold_us: u64,
    /// Accesses per second per vCPU (0: flat out). Lower rates model a guest
    /// that is not always busy. Workload guest only.
    #[arg(long, default_value_t = 0)]
    pub access_rate: u64,
    /// VM guest: milliseconds between heartbeats on each vCPU's console.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u32,
}

/// How the migration runs (source and migrate).
#[derive(Args, Clone, Debug)]
pub struct MigrationOpts {
    /// Migration mode.
    #[arg(long, value_enum, default_value = "postcopy")]
    pub mode: ModeArg,
    /// Pages requested per fault, the faulting page included (1: no prefetch).
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Where the prefetch window lies.
    #[arg(long, value_enum, default_value = "after")]
    pub prefetch_mode: PrefetchModeArg,
    /// Pages per background push frame.
    #[arg(long, default_value_t = 256)]
    pub push_run: u32,
    /// File holding a pre-shared key; both sides must use the same.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// A peer silent for this many milliseconds is presumed dead.
    #[arg(long, default_value_t = 5000)]
    pub peer_timeout_ms: u64,
    /// Hybrid: switch to postcopy after this many precopy rounds (default:
    /// when the dirty set stops shrinking or the time budget runs out).
    #[arg(long)]
    pub postcopy_after: Option<u32>,
    /// Most precopy rounds (precopy: then stop-and-copy anyway).
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Stop precopy when the dirty set could be sent within this many
    /// milliseconds with the guest paused.
    #[arg(long, default_value_t = 300)]
    pub downtime_budget_ms: u64,
    /// Hybrid: switch rather than let precopy run longer than this.
    #[arg(long, default_value_t = 60_000)]
    pub precopy_budget_ms: u64,
    /// Nice value of the threads moving bulk data (push, its receiver, the
    /// destination's page mapper), so demand serving preempts them (default:
    /// 0 in pure postcopy, 10 in hybrid and precopy).
    #[arg(long)]
    pub background_nice: Option<i32>,
    /// Pace the bulk connection (push and precopy) to this rate, e.g. 9gbit:
    /// below the link's rate, its data never queues at the bottleneck ahead
    /// of demand replies (default: unpaced).
    #[arg(long)]
    pub push_rate: Option<String>,
    /// After switchover, how long (seconds) a broken link may stay broken
    /// while the sides reconnect before giving up; 0 disables recovery.
    #[arg(long, default_value_t = 300)]
    pub recover_timeout: u64,
}

impl MigrationOpts {
    /// `--push-rate` in bytes per second.
    fn push_rate(&self) -> Result<Option<u64>> {
        self.push_rate
            .as_deref()
            .map(|r| crate::netlab::parse_rate(r).map(|bps| bps / 8))
            .transpose()
            .context("--push-rate")
    }

    fn policy(&self) -> Result<sender::Policy> {
        if self.postcopy_after.is_some() && self.mode != ModeArg::Hybrid {
            bail!("--postcopy-after needs --mode hybrid");
        }
        if self.postcopy_after == Some(0) || self.max_rounds == 0 {
            bail!("--postcopy-after and --max-rounds count rounds from 1");
        }
        Ok(sender::Policy {
            postcopy_after: self.postcopy_after,
            max_rounds: self.max_rounds,
            downtime_budget: Duration::from_millis(self.downtime_budget_ms),
            time_budget: Duration::from_millis(self.precopy_budget_ms),
            ..sender::Policy::default()
        })
    }
}

/// `postcopy dest`.
#[derive(Args, Clone, Debug)]
pub struct DestArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pages requested per fault (overrides what the source asks for).
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Where the prefetch window lies (with --prefetch).
    #[arg(long, value_enum, default_value = "after")]
    pub prefetch_mode: PrefetchModeArg,
    /// File holding a pre-shared key the source must prove it has.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// What the destination's guest memory is made of.
    #[arg(long, value_enum, default_value = "shmem")]
    pub memory: MemoryArg,
    /// Nice value of the bulk receiver and the page mapper (default: 0 in
    /// pure postcopy, 10 in hybrid and precopy).
    #[arg(long)]
    pub background_nice: Option<i32>,
    /// When to allocate shared guest memory.
    #[arg(long, value_enum, default_value = "before")]
    pub populate: PopulateArg,
    /// Keep the guest running this long after the migration, then verify it.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// Give up if no source connects within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub accept_timeout_s: u64,
    /// After switchover, how long (seconds) to wait for a source whose
    /// link broke to reconnect before giving up; 0 disables recovery.
    #[arg(long, default_value_t = 300)]
    pub recover_timeout: u64,
    /// Refuse a guest larger than this (like 16G), checked on the hello
    /// before anything is allocated (default: this host's available memory
    /// when the source connects, less a margin).
    #[arg(long)]
    pub max_mem: Option<String>,
    /// A source silent for this many milliseconds is presumed dead.
    #[arg(long, default_value_t = 5000)]
    pub peer_timeout_ms: u64,
    /// Print "LISTENING <addr>" on stdout once listening (for scripts).
    #[arg(long)]
    pub announce: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Run under `migrate`: no summary (the parent prints the merged one).
    #[arg(long, hide = true)]
    pub child: bool,
    /// Print machine-readable progress lines on stdout (for `migrate`'s bar).
    #[arg(long, hide = true)]
    pub progress_lines: bool,
    /// The destination's time series.
    #[command(flatten)]
    pub timeline: TimelineOpts,
}

/// The destination's time series (`dest`, `migrate`).
#[derive(Args, Clone, Debug)]
pub struct TimelineOpts {
    /// Also write the destination's time series as CSV here.
    #[arg(long)]
    pub timeline_csv: Option<PathBuf>,
    /// Sampling tick of the time series, milliseconds (1..=1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub tick_ms: u64,
}

/// `postcopy source`.
#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// Destination address.
    #[arg(long)]
    pub connect: String,
    /// Where to reconnect after a broken link (default: --connect).
    #[arg(long)]
    pub recover_addr: Option<String>,
    /// Guest options.
    #[command(flatten)]
    pub guest: GuestOpts,
    /// Migration options.
    #[command(flatten)]
    pub migration: MigrationOpts,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 500)]
    pub run_before_ms: u64,
    /// After a failed migration, keep the guest running this long, then verify it.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// Run under `migrate`: die with it.
    #[arg(long, hide = true)]
    pub child: bool,
}

/// `postcopy migrate`.
#[derive(Args, Clone, Debug)]
pub struct MigrateArgs {
    /// Guest options.
    #[command(flatten)]
    pub guest: GuestOpts,
    /// Migration options.
    #[command(flatten)]
    pub migration: MigrationOpts,
    /// Write the merged JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 500)]
    pub run_before_ms: u64,
    /// Keep the guest running this long after the migration, then verify it.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// What the destination's guest memory is made of.
    #[arg(long, value_enum, default_value = "shmem")]
    pub memory: MemoryArg,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// The destination's time series.
    #[command(flatten)]
    pub timeline: TimelineOpts,
    /// The link between the two sides: "loopback", or two network
    /// namespaces joined by a veth pair, "veth[:RATE][:RTT]" (RATE like
    /// 10gbit, shaped with tc tbf; RTT like 100us, added by a relay).
    #[arg(long, default_value = "loopback")]
    pub link: String,
}

fn read_key(path: &Option<PathBuf>) -> Result<Option<Vec<u8>>> {
    let Some(p) = path else { return Ok(None) };
    let k = std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
    let k: Vec<u8> = k.trim_ascii().to_vec();
    if k.is_empty() {
        bail!("key file {} is empty", p.display());
    }
    Ok(Some(k))
}

fn prefetch_of(pages: Option<u32>, mode: PrefetchModeArg) -> Result<Option<Prefetch>> {
    let Some(pages) = pages else { return Ok(None) };
    if pages == 0 || pages > 4096 {
        bail!("--prefetch must be 1..=4096 pages, got {pages}");
    }
    let mode = match mode {
        PrefetchModeArg::After => PrefetchMode::After,
        PrefetchModeArg::Around => PrefetchMode::Around,
    };
    Ok(Some(Prefetch { pages, mode }))
}

impl GuestOpts {
    /// The memory layout these options describe.
    pub fn layout(&self) -> Result<MemLayout> {
        let bytes = parse_size(&self.mem).map_err(|e| anyhow!("--mem: {e}"))?;
        let ps = PageSize::Size4K.bytes();
        if bytes < 16 * ps || bytes % ps != 0 {
            bail!("--mem must be a multiple of 4 KiB and at least 64 KiB, got {bytes} bytes");
        }
        if self.regions == 0 || u64::from(self.regions) > bytes / ps / 16 || self.regions > 64 {
            bail!("--regions must be 1..=64 and leave each region at least 16 pages");
        }
        let n_pages = bytes / ps;
        let per = n_pages / u64::from(self.regions);
        let mut regions = Vec::new();
        let mut guest = 0u64;
        for i in 0..u64::from(self.regions) {
            let pages = if i + 1 == u64::from(self.regions) { n_pages - per * i } else { per };
            regions.push(RegionDesc { guest: GuestOffset(guest), len_bytes: pages * ps });
            // Leave a 1 GiB-aligned hole after each region, as a VM's memory map would.
            guest = (guest + pages * ps).next_multiple_of(1 << 30) + (1 << 30);
        }
        Ok(MemLayout::new(PageSize::Size4K, regions)?)
    }

    /// The VM guest's configuration.
    pub fn vm(&self) -> Result<guest::vm::VmConfig> {
        let w = self.workload()?;
        if self.regions != 1 {
            bail!("the VM guest uses one memory region (--regions 1)");
        }
        if self.vcpus > guest::vm::boot::MAX_VCPUS {
            bail!("the VM guest runs at most {} vCPUs", guest::vm::boot::MAX_VCPUS);
        }
        if self.access_rate != 0 {
            bail!("--access-rate applies to the workload guest only");
        }
        let active_pages = match w.pattern {
            Pattern::Uniform => 0,
            Pattern::Hotset { bytes, fraction } if fraction >= 1.0 => bytes.div_ceil(4096),
            p => bail!("the VM guest runs uniform and hotset:SIZE patterns, not {p}"),
        };
        // A store when the generator's low 16 bits fall below ratio x 2^16.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let store_threshold = (self.store_ratio * 65536.0).round() as u32;
        Ok(guest::vm::VmConfig {
            vcpus: self.vcpus,
            active_pages,
            store_threshold,
            heartbeat_ms: self.heartbeat_ms.max(1),
            seed: self.seed,
        })
    }

    /// Validate the options for the chosen guest.
    pub fn check(&self) -> Result<()> {
        self.layout()?;
        match self.guest {
            GuestArg::Workload => self.workload().map(drop),
            GuestArg::Vm => self.vm().map(drop),
        }
    }

    /// The workload configuration.
    pub fn workload(&self) -> Result<WorkloadConfig> {
        let pattern: Pattern = self.pattern.parse().map_err(|e| anyhow!("--pattern: {e}"))?;
        if !(0.0..=1.0).contains(&self.store_ratio) {
            bail!("--store-ratio must be in 0..=1, got {}", self.store_ratio);
        }
        if self.vcpus == 0 || self.vcpus > 256 {
            bail!("--vcpus must be 1..=256, got {}", self.vcpus);
        }
        Ok(WorkloadConfig {
            vcpus: self.vcpus,
            pattern,
            store_ratio: self.store_ratio,
            seed: self.seed,
            stall_threshold_ns: self.stall_threshold_us * 1000,
            access_rate: self.access_rate,
        })
    }
}

/// Machine-readable progress on stdout every 100 ms until dropped:
/// `PROGRESS <phase> <present> <total> <faults> <requests> <bytes received>`.
fn progress_lines(m: Arc<PagerMetrics>) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut out = std::io::stdout();
            while !stop.load(Ordering::Acquire) {
                let g = PagerMetrics::get;
                let phase = match m.phase() {
                    pager::Phase::Precopy if g(&m.pages_precopy) == 0 => "ready",
                    p => p.name(),
                };
                let line = format!(
                    "PROGRESS {} {} {} {} {} {}",
                    phase,
                    g(&m.pages_present),
                    g(&m.pages_total),
                    g(&m.faults),
                    g(&m.requests),
                    g(&m.bytes_received)
                );
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    Progress { stop, thread: Some(thread) }
}

/// The destination's last progress line.
#[derive(Clone, Debug)]
struct DestProgress {
    phase: String,
    present: u64,
    total: u64,
    faults: u64,
    requests: u64,
    bytes: u64,
}

impl DestProgress {
    fn parse(line: &str) -> Option<DestProgress> {
        let mut f = line.strip_prefix("PROGRESS ")?.split_ascii_whitespace();
        let phase = f.next()?.to_string();
        let mut n = || f.next().and_then(|v| v.parse::<u64>().ok());
        Some(DestProgress { phase, present: n()?, total: n()?, faults: n()?, requests: n()?, bytes: n()? })
    }
}

/// `migrate`'s progress: a live bar on a terminal, a line a second
/// otherwise, nothing when quiet.
struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    t0: Instant,
    next_line: Instant,
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl ProgressView {
    fn new(quiet: bool) -> ProgressView {
        use std::io::IsTerminal;
        let tty = !quiet && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(1);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix:>10} [{bar:30}] {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b.set_prefix("starting");
            b
        });
        let now = Instant::now();
        ProgressView {
            bar,
            lines: !quiet && !tty,
            t0: now,
            next_line: now + Duration::from_secs(1),
            last: None,
            rate: 0.0,
        }
    }

    fn update(&mut self, p: Option<&DestProgress>) {
        let Some(p) = p else { return };
        let now = Instant::now();
        // The receive rate over the last half second or so.
        match self.last {
            Some((t, b)) if now.duration_since(t) >= Duration::from_millis(500) => {
                self.rate = p.bytes.saturating_sub(b) as f64 / now.duration_since(t).as_secs_f64() / 1e9;
                self.last = Some((now, p.bytes));
            }
            Some(_) => {}
            None => self.last = Some((now, p.bytes)),
        }
        if let Some(b) = &self.bar {
            b.set_length(p.total.max(1));
            b.set_position(p.present.min(p.total));
            b.set_prefix(p.phase.clone());
            if p.total == 0 {
                b.set_message("waiting for the source");
            } else {
                b.set_message(format!("{}/{} pages, {:.2} GB/s, {} faults", p.present, p.total, self.rate, p.faults));
            }
        } else if self.lines && now >= self.next_line {
            self.next_line += Duration::from_secs(1);
            eprintln!(
                "[{:5.1}s] {}: {}/{} pages present, {:.2} GB received, {} faults, {} requests",
                now.duration_since(self.t0).as_secs_f64(),
                p.phase,
                p.present,
                p.total,
                p.bytes as f64 / 1e9,
                p.faults,
                p.requests
            );
        }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A once-a-second progress line on stderr until dropped.
struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(quiet: bool, line: impl Fn(Duration) -> Option<String> + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!quiet).then(|| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut next = t0 + Duration::from_secs(1);
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    if Instant::now() >= next {
                        next += Duration::from_secs(1);
                        if let Some(l) = line(t0.elapsed()) {
                            eprintln!("{l}");
                        }
                    }
                }
            })
        });
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mode_name(m: Mode) -> String {
    m.name().to_string()
}

/// The guest section of a report.
fn guest_report(g: &GuestSummary, running_on_source: bool) -> GuestReport {
    let (stall_lat, stall_hist) = latency_of(&g.stalls);
    GuestReport {
        accesses: g.accesses_here,
        accesses_total: g.accesses_total,
        loads: g.loads_here,
        stores: g.stores_here,
        violations: g.violations,
        stalls: g.stalls.count(),
        stall_latency_us: stall_lat,
        stall_latency_hist: stall_hist,
        heartbeats: g.heartbeats.clone(),
        heartbeats_ok: !g.heartbeats.is_empty() && g.heartbeats.iter().all(|&h| h > 0),
        verified_pages: g.verified_pages,
        verify_ok: g.verify_ok,
        problems: g.problems.clone(),
        running_on_source,
    }
}

/// The guest kind as reports name it.
pub fn guest_name(k: GuestKind) -> String {
    match k {
        GuestKind::Workload => "workload".into(),
        GuestKind::Vm => "vm".into(),
    }
}

/// Run the destination. Returns the process exit code.
pub fn dest(args: &DestArgs) -> Result<i32> {
    if args.child {
        die_with_parent();
    }
    let key = read_key(&args.key_file)?;
    let prefetch = prefetch_of(args.prefetch, args.prefetch_mode)?;
    let max_mem = args.max_mem.as_deref().map(parse_size).transpose().map_err(|e| anyhow!("--max-mem: {e}"))?;
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
    let populate = match args.populate {
        PopulateArg::Before => Populate::Before,
        PopulateArg::Background => Populate::Background,
    };
    let outcome = pager::run(
        Box::new(control),
        &listener,
        |acc, cancel| {
            DestAny::new(acc.guest_kind, acc.layout.clone(), args.memory.backing(), populate, cancel)
                .map_err(|e| Box::new(e) as pager::GuestError)
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
    let layout = &pr.accepted.layout;
    let (fault_lat, fault_hist) = latency_of(&pr.fault_latency);
    let blocktime: u64 = pr.blocktime_ns.iter().map(|(_, ns)| ns).sum();
    let vcpu_name = |tid: u32| {
        g.vcpu_tids.iter().position(|&t| t == tid).map_or_else(|| format!("tid-{tid}"), |i| format!("vcpu{i}"))
    };
    let mut report = Report {
        status: "ok".into(),
        error: vcpu_failure,
        side: "destination".into(),
        mode: mode_name(pr.accepted.mode),
        guest_kind: guest_name(kind),
        mem_bytes: layout.len_bytes(),
        page_size: layout.page_size().bytes(),
        regions: layout.regions().len(),
        vcpus: g.vcpus,
        pattern: g.pattern.clone(),
        store_ratio: g.store_ratio,
        prefetch: PrefetchReport {
            pages: pr.prefetch.pages,
            mode: match pr.prefetch.mode {
                PrefetchMode::After => "after".into(),
                PrefetchMode::Around => "around".into(),
            },
        },
        total_time_ms: ms(pr.total_time),
        setup_ms: ms(pr.setup_time),
        completion_confirmed: pr.completion_confirmed,
        downtime_ms: ns_ms(pr.source.downtime_ns),
        downtime: DowntimeParts {
            pause_to_sent_ms: ns_ms(pr.source.pause_to_sent_ns),
            dest_evict_ms: ns_ms(pr.resume.evict_ns),
            dest_restore_ms: ns_ms(pr.resume.restore_ns),
        },
        bytes_transferred: pr.source.bytes_sent,
        outstanding_pages: pr.outstanding_pages,
        precopy: PrecopyReport {
            pages_sent: PagerMetrics::get(&metrics.pages_precopy),
            pages_evicted: PagerMetrics::get(&metrics.pages_evicted),
            ..PrecopyReport::default()
        },
        postcopy: PostcopyReport {
            pages_total: layout.n_pages(),
            pages_pushed: PagerMetrics::get(&metrics.pages_push),
            pages_requested: PagerMetrics::get(&metrics.pages_requested),
            pages_demand: PagerMetrics::get(&metrics.pages_demand),
            pages_duplicate: PagerMetrics::get(&metrics.pages_duplicate),
            pages_rerequested: PagerMetrics::get(&metrics.pages_rerequested),
            requests: PagerMetrics::get(&metrics.requests),
            faults: PagerMetrics::get(&metrics.faults),
            faults_local: PagerMetrics::get(&metrics.faults_local),
            pages_mapped_local: PagerMetrics::get(&metrics.pages_mapped_local),
            local_fault_latency_us: latency_of(&pr.fault_latency_local).0,
            faults_resolved_early: PagerMetrics::get(&metrics.faults_resolved_early),
            time_ms: ms(pr.postcopy_time),
            push_time_ms: ns_ms(pr.source.push_ns),
            push_gbps: gbps(pr.source.pages_pushed * layout.page_size().bytes(), pr.source.push_ns),
            fault_latency_us: fault_lat,
            fault_latency_hist: fault_hist,
            blocktime_ms: ns_ms(blocktime),
            vcpu_blocktime_ms: pr.blocktime_ns.iter().map(|(tid, ns)| (vcpu_name(*tid), ns_ms(*ns))).collect(),
            recoveries: PagerMetrics::get(&metrics.recoveries),
            paused_ms: ns_ms(PagerMetrics::get(&metrics.paused_ns)),
        },
        guest: guest_report(&g, false),
        timeline_tick_ms: ms(tick),
        timeline,
        ..Default::default()
    };
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

fn gbps(bytes: u64, ns: u64) -> f64 {
    if ns == 0 { 0.0 } else { bytes as f64 / ns as f64 }
}

/// Run the source. Returns the process exit code.
pub fn source(args: &SourceArgs) -> Result<i32> {
    if args.child {
        die_with_parent();
    }
    let layout = args.guest.layout()?;
    args.guest.check()?;
    crate::host::check_room(layout.len_bytes(), "the source's guest")?;
    let key = read_key(&args.migration.key_file)?;
    let prefetch = prefetch_of(args.migration.prefetch, args.migration.prefetch_mode)?;
    let peer_timeout = Duration::from_millis(args.migration.peer_timeout_ms.max(100));
    let pause_timeout = Duration::from_secs(5);
    let push_rate = args.migration.push_rate()?;
    let mut guest = match args.guest.guest {
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
    let cfg = SenderConfig {
        mode: args.migration.mode.mode(),
        key,
        prefetch_pages: prefetch.map_or(0, |p| p.pages),
        prefetch_around: prefetch.is_some_and(|p| p.mode == PrefetchMode::Around),
        push_run_pages: args.migration.push_run.clamp(1, 2048),
        peer_timeout,
        policy: args.migration.policy()?,
        background_nice: args.migration.background_nice,
        recover_timeout: Duration::from_secs(args.migration.recover_timeout),
        ..SenderConfig::default()
    };
    let metrics = Arc::new(SenderMetrics::default());
    let opts = TcpOptions { send_timeout: peer_timeout, ..TcpOptions::default() };
    let before_accesses = guest.accesses();
    let base = Report {
        side: "source".into(),
        mode: mode_name(cfg.mode),
        guest_kind: guest_name(match args.guest.guest {
            GuestArg::Workload => GuestKind::Workload,
            GuestArg::Vm => GuestKind::Vm,
        }),
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
            let bulk_opts = TcpOptions { notsent_lowat: Some(256 * 1024), max_pacing_rate: push_rate, ..opts.clone() };
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
                    requests: SenderMetrics::get(&metrics.requests),
                    push_time_ms: ns_ms(r.stats.push_ns),
                    push_gbps: gbps(r.stats.pages_pushed * layout.page_size().bytes(), r.stats.push_ns),
                    recoveries: r.recoveries,
                    paused_ms: ms(r.paused),
                    ..Default::default()
                },
                guest: GuestReport { accesses: before_accesses, verify_ok: true, ..Default::default() },
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

/// A human-readable summary of a report.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let gib = r.mem_bytes as f64 / f64::from(1u32 << 30);
    s += &format!(
        "postcopy {}: {} guest, {gib:.2} GiB, {} vCPU, {}, prefetch {} ({})\n",
        r.mode, r.guest_kind, r.vcpus, r.pattern, r.prefetch.pages, r.prefetch.mode
    );
    s += &format!("  status       {}{}\n", r.status, r.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default());
    s += &format!(
        "  time         total {:.1} ms (setup {:.1} ms), postcopy {:.1} ms, downtime {:.2} ms (pause to sent {:.2} ms, evict {:.2} ms, restore {:.2} ms)\n",
        r.total_time_ms,
        r.setup_ms,
        r.postcopy.time_ms,
        r.downtime_ms,
        r.downtime.pause_to_sent_ms,
        r.downtime.dest_evict_ms,
        r.downtime.dest_restore_ms
    );
    if r.precopy.rounds > 0 {
        s += &format!(
            "  precopy      {} rounds, {} pages, {:.1} ms, dirty per round {:?}, stopped: {}; {} pages outstanding\n",
            r.precopy.rounds,
            r.precopy.pages_sent,
            r.precopy.time_ms,
            r.precopy.dirty_pages,
            r.precopy.stop_reason,
            r.outstanding_pages
        );
    }
    s += &format!(
        "  transferred  {:.3} GB; pushed {} pages ({:.2} GB/s), demand {} pages in {} requests, duplicates {}\n",
        r.bytes_transferred as f64 / 1e9,
        r.postcopy.pages_pushed,
        r.postcopy.push_gbps,
        r.postcopy.pages_demand,
        r.postcopy.requests,
        r.postcopy.pages_duplicate
    );
    let f = &r.postcopy.fault_latency_us;
    s += &format!(
        "  faults       {} over the network (latency p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us)",
        r.postcopy.faults.saturating_sub(r.postcopy.faults_local),
        f.p50,
        f.p90,
        f.p99,
        f.max
    );
    if r.postcopy.faults_local > 0 {
        let l = &r.postcopy.local_fault_latency_us;
        s += &format!("; {} on held pages (p50 {:.1} us, p99 {:.1} us)", r.postcopy.faults_local, l.p50, l.p99);
    }
    s += "\n";
    if !r.postcopy.vcpu_blocktime_ms.is_empty() {
        let per: Vec<String> = r.postcopy.vcpu_blocktime_ms.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        s += &format!("  blocked      {:.1} ms in all ({} ms)\n", r.postcopy.blocktime_ms, per.join(", "));
    }
    s += &format!(
        "  guest        {} accesses here, {} violations, {} pages verified ({})",
        r.guest.accesses,
        r.guest.violations,
        r.guest.verified_pages,
        if r.guest.verify_ok { "ok" } else { "FAILED" },
    );
    if r.guest_kind == "vm" {
        s += &format!(", heartbeats per vCPU {:?}", r.guest.heartbeats);
    } else {
        let g = &r.guest.stall_latency_us;
        s += &format!(", stalls {} (p50 {:.1} us, p99 {:.1} us)", r.guest.stalls, g.p50, g.p99);
    }
    s
}

fn child_args(g: &GuestOpts, m: &MigrationOpts) -> Vec<String> {
    let mut a = vec![
        "--guest".into(),
        g.guest.to_possible_value().expect("no skipped values").get_name().into(),
        "--heartbeat-ms".into(),
        g.heartbeat_ms.to_string(),
        "--mem".into(),
        g.mem.clone(),
        "--vcpus".into(),
        g.vcpus.to_string(),
        "--pattern".into(),
        g.pattern.clone(),
        "--store-ratio".into(),
        g.store_ratio.to_string(),
        "--seed".into(),
        g.seed.to_string(),
        "--regions".into(),
        g.regions.to_string(),
        "--stall-threshold-us".into(),
        g.stall_threshold_us.to_string(),
        "--access-rate".into(),
        g.access_rate.to_string(),
        "--mode".into(),
        m.mode.to_possible_value().expect("no skipped values").get_name().into(),
        "--push-run".into(),
        m.push_run.to_string(),
        "--peer-timeout-ms".into(),
        m.peer_timeout_ms.to_string(),
        "--recover-timeout".into(),
        m.recover_timeout.to_string(),
        "--prefetch-mode".into(),
        m.prefetch_mode.to_possible_value().expect("no skipped values").get_name().into(),
        "--max-rounds".into(),
        m.max_rounds.to_string(),
        "--downtime-budget-ms".into(),
        m.downtime_budget_ms.to_string(),
        "--precopy-budget-ms".into(),
        m.precopy_budget_ms.to_string(),
    ];
    if let Some(n) = m.background_nice {
        a.extend(["--background-nice".into(), n.to_string()]);
    }
    if let Some(r) = &m.push_rate {
        a.extend(["--push-rate".into(), r.clone()]);
    }
    if let Some(n) = m.postcopy_after {
        a.extend(["--postcopy-after".into(), n.to_string()]);
    }
    if let Some(p) = m.prefetch {
        a.extend(["--prefetch".into(), p.to_string()]);
    }
    if let Some(k) = &m.key_file {
        a.extend(["--key-file".into(), k.display().to_string()]);
    }
    a
}

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
fn die_with_parent() {
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
    // Both sides live on this host: the source's guest and the destination's copy.
    let mem = args.guest.layout()?.len_bytes();
    crate::host::check_room(mem.saturating_mul(2), "a migration on one host (source and destination)")?;
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
        let (rtt, gbit) = lab.measure().context("measuring the lab's link")?;
        link_report.measured_rtt_us = rtt.as_secs_f64() * 1e6;
        link_report.measured_gbit = gbit;
        if !args.quiet {
            eprintln!(
                "postcopy: link {}: round trip {:.1} us, one TCP stream {:.2} Gbit/s (measured)",
                args.link, link_report.measured_rtt_us, gbit
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
        .args(["--tick-ms", &args.timeline.tick_ms.to_string()])
        .args([
            "--run-after-ms",
            &args.run_after_ms.to_string(),
            "--peer-timeout-ms",
            &args.migration.peer_timeout_ms.to_string(),
            "--recover-timeout",
            &args.migration.recover_timeout.to_string(),
            "--memory",
            args.memory.to_possible_value().expect("no skipped values").get_name(),
        ])
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
        .args(child_args(&args.guest, &args.migration));
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
