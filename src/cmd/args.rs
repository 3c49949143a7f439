//! The command line's argument types and their checks, and each options
//! group written back as arguments (`to_args`) for child processes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use guest::{Backing, Pattern, WorkloadConfig, parse_size};
use pager::{Prefetch, PrefetchMode};
use proto::wire::Mode;
use proto::{GuestOffset, MemLayout, PageSize, RegionDesc};

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
    pub(crate) fn mode(self) -> Mode {
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
    /// Shared memory as `shmem`, in transparent huge pages where the host's
    /// shmem_enabled allows (advise or always); needs no huge-page reserve,
    /// at 4 KiB or 2 MiB pages.
    Thp,
}

impl MemoryArg {
    pub(crate) fn backing(self) -> Backing {
        match self {
            MemoryArg::Shmem => Backing::Shmem,
            MemoryArg::Anon => Backing::Anonymous,
            MemoryArg::Thp => Backing::ShmemThp,
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
#[derive(Args, Clone, Debug, PartialEq)]
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
    /// Guest page size: 4K, or 2M (hugetlbfs: huge pages must be reserved
    /// on both hosts; the destination then uses anonymous hugetlbfs memory).
    #[arg(long, default_value = "4K")]
    pub page_size: String,
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
    /// Share of memory the guest ever touches (0 < FRACTION <= 1; workload
    /// guest): the rest is never written, as in real guests, and must read
    /// as zeros wherever the guest goes.
    #[arg(long, default_value_t = 1.0)]
    pub touch: f64,
    /// VM guest: milliseconds between heartbeats on each vCPU's console.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u32,
}

/// How the migration runs (source and migrate).
#[derive(Args, Clone, Debug, PartialEq)]
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
    /// Bulk connections for the push, each with its own thread over a
    /// stripe of the pages (1 to 8; after a broken link, one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub push_streams: u32,
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
    /// While the guest faults, pace the push at this share of the bandwidth
    /// the bulk connection measured, so demand replies do not wait behind
    /// it at the bottleneck (1: never yield; default 0.75 over a network,
    /// 1 over loopback, which has no bottleneck queue to share).
    #[arg(long)]
    pub push_yield: Option<f64>,
    /// Mark the control connection, which carries the demand replies, DSCP
    /// EF (socket priority 6) and the push's connections DSCP LE (priority
    /// 1), so that queues which tell them apart (a host's qdisc, a
    /// network's) serve demand first; `off` leaves the marks alone (under
    /// `migrate`, on both sides).
    #[arg(long, value_enum, default_value = "on")]
    pub dscp: Switch,
    /// After switchover, how long (seconds) a broken link may stay broken
    /// while the sides reconnect before giving up; 0 disables recovery.
    #[arg(long, default_value_t = 300)]
    pub recover_timeout: u64,
}

impl MigrationOpts {
    /// `--push-rate` in bytes per second.
    pub(crate) fn push_rate(&self) -> Result<Option<u64>> {
        self.push_rate
            .as_deref()
            .map(|r| crate::netlab::parse_rate(r).map(|bps| bps / 8))
            .transpose()
            .context("--push-rate")
    }

    pub(crate) fn policy(&self) -> Result<sender::Policy> {
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
    /// Serve a VMM's guest memory instead of a guest of our own: listen on
    /// this Unix socket for Firecracker's page-fault handler handshake (the
    /// regions as JSON, the VMM's userfaultfd attached); the source must
    /// serve the VMM's snapshot memory (`source --memory-file`).
    #[arg(long)]
    pub vmm_uffd_socket: Option<PathBuf>,
    /// What to do with the VMM when its memory cannot be served (the source
    /// is gone for good): kill it (its vCPUs would otherwise wait forever),
    /// or leave it.
    #[arg(long, value_enum, default_value = "kill", requires = "vmm_uffd_socket")]
    pub vmm_on_failure: VmmOnFailure,
    /// The destination's own options (also taken by `migrate`).
    #[command(flatten)]
    pub opts: DestOpts,
    /// How post-copy pages move.
    #[command(flatten)]
    pub transport: TransportOpts,
    /// Nice value of the bulk receiver and the page mapper (default: 0 in
    /// pure postcopy, 10 in hybrid and precopy).
    #[arg(long)]
    pub background_nice: Option<i32>,
    /// Keep the guest running this long after the migration, then verify it.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// Give up if no source connects within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub accept_timeout_s: u64,
    /// Mark the control connection, which carries the fault requests, DSCP
    /// EF (socket priority 6) and the bulk connections, which carry only
    /// their acknowledgements this way, DSCP LE (priority 1), as the source
    /// marks its side; `off` leaves the marks alone.
    #[arg(long, value_enum, default_value = "on")]
    pub dscp: Switch,
    /// After switchover, how long (seconds) to wait for a source whose
    /// link broke to reconnect before giving up; 0 disables recovery.
    #[arg(long, default_value_t = 300)]
    pub recover_timeout: u64,
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
    /// Guest memory made ready before the source connects.
    #[command(flatten)]
    pub prepare: PrepareOpts,
}

/// Guest memory the destination creates and populates at start, while it
/// waits for the source (as a VMM started for an incoming migration
/// allocates the memory it is configured with), so that the migration does
/// not wait for it. A source announcing another layout gets fresh memory.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct PrepareOpts {
    /// Prepare memory for a guest of this size (like 1G) at start.
    #[arg(long, conflicts_with = "vmm_uffd_socket")]
    pub prepare_mem: Option<String>,
    /// Its page size (4K or 2M).
    #[arg(long, default_value = "4K", requires = "prepare_mem")]
    pub prepare_page_size: String,
    /// Its regions (laid out as `--regions` lays out the source's).
    #[arg(long, default_value_t = 1, requires = "prepare_mem")]
    pub prepare_regions: u32,
}

impl PrepareOpts {
    /// The layout to prepare, if any.
    pub fn layout(&self) -> Result<Option<MemLayout>> {
        let Some(mem) = &self.prepare_mem else { return Ok(None) };
        let ps = parse_page_size(&self.prepare_page_size).context("--prepare-page-size")?;
        build_layout(mem, ps, self.prepare_regions).context("--prepare-mem").map(Some)
    }
}

/// A page size on the command line.
pub(crate) fn parse_page_size(s: &str) -> Result<PageSize> {
    match s.to_ascii_uppercase().as_str() {
        "4K" | "4096" => Ok(PageSize::Size4K),
        "2M" | "2097152" => Ok(PageSize::Size2M),
        other => bail!("the page size must be 4K or 2M, not {other:?}"),
    }
}

/// `bytes` of memory (a size like 1G) in `regions` regions of `page_size`
/// pages, each followed by a 1 GiB-aligned hole as a VM's memory map has.
fn build_layout(mem: &str, page_size: PageSize, regions: u32) -> Result<MemLayout> {
    let bytes = parse_size(mem).map_err(|e| anyhow!("--mem: {e}"))?;
    let ps = page_size.bytes();
    if bytes < 16 * ps || bytes % ps != 0 {
        bail!("--mem must be a multiple of the page size ({ps} bytes) and at least 16 pages, got {bytes} bytes");
    }
    if regions == 0 || u64::from(regions) > bytes / ps / 16 || regions > 64 {
        bail!("--regions must be 1..=64 and leave each region at least 16 pages");
    }
    let n_pages = bytes / ps;
    let per = n_pages / u64::from(regions);
    let mut descs = Vec::new();
    let mut guest = 0u64;
    for i in 0..u64::from(regions) {
        let pages = if i + 1 == u64::from(regions) { n_pages - per * i } else { per };
        descs.push(RegionDesc { guest: GuestOffset(guest), len_bytes: pages * ps });
        guest = (guest + pages * ps).next_multiple_of(1 << 30) + (1 << 30);
    }
    Ok(MemLayout::new(page_size, descs)?)
}

/// What `dest --vmm-uffd-socket` does with a VMM it cannot serve.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmOnFailure {
    /// SIGKILL it, through a pidfd taken at the handshake.
    Kill,
    /// Leave it (its faulting vCPUs wait until someone ends it).
    Leave,
}

/// What the destination's memory is and how much it accepts (`dest`, and
/// `migrate`, which passes them to its destination).
#[derive(Args, Clone, Debug, PartialEq)]
pub struct DestOpts {
    /// What the destination's guest memory is made of.
    #[arg(long, value_enum, default_value = "shmem")]
    pub memory: MemoryArg,
    /// When to allocate shared guest memory.
    #[arg(long, value_enum, default_value = "before")]
    pub populate: PopulateArg,
    /// Refuse a guest larger than this (like 16G), checked on the hello
    /// before anything is allocated (default: this host's available memory
    /// when the source connects, less a margin).
    #[arg(long)]
    pub max_mem: Option<String>,
}

/// How post-copy pages move (`source`, `dest`, and `migrate`, which passes
/// them to both sides).
#[derive(Args, Clone, Debug, PartialEq)]
pub struct TransportOpts {
    /// `tcp`, or `rdma`: the destination reads post-copy pages (demand and
    /// background) straight from the source's memory with RDMA READs; the
    /// handshake, precopy rounds and the switchover stay on TCP, and after a
    /// broken link the rest goes over TCP.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: TransportArg,
    /// The RDMA device: `sim` (the software device, carried over TCP between
    /// the hosts), or a NIC's name (default: the first one).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// The software device waits a seeded delay of up to this many
    /// microseconds before each request.
    #[arg(long, default_value_t = 0)]
    pub rdma_sim_delay_us: u32,
    /// Background RDMA reads in flight at most, in bytes (the destination's).
    #[arg(long, default_value = "4M")]
    pub rdma_window: String,
    /// Whether the destination's background reads yield to demand while the
    /// guest faults (a window that shrinks when demand reads slow down):
    /// `auto` is on, except over loopback.
    #[arg(long, value_enum, default_value = "auto")]
    pub rdma_yield: YieldArg,
    /// How the background crosses (the destination decides, the source
    /// follows): `read`, the destination READs every missing page behind
    /// demand; `write`, the source WRITEs runs into the destination's
    /// staging ring and is told which slots it may reuse.
    #[arg(long, value_enum, default_value = "read")]
    pub rdma_background: BackgroundArg,
}

/// `--rdma-background`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackgroundArg {
    /// The destination reads it.
    Read,
    /// The source writes it.
    Write,
}

/// `--rdma-yield`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum YieldArg {
    /// On, except over loopback.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl YieldArg {
    /// As the pager's setting.
    pub fn setting(self) -> Option<bool> {
        match self {
            YieldArg::Auto => None,
            YieldArg::On => Some(true),
            YieldArg::Off => Some(false),
        }
    }
}

/// `--transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// Every page over TCP.
    Tcp,
    /// Post-copy pages by RDMA READs.
    Rdma,
}

impl TransportOpts {
    /// The RDMA configuration, if any; `seed` seeds the software device's delays.
    pub fn rdma(&self, seed: u64) -> Result<Option<rdma::Config>> {
        match self.transport {
            TransportArg::Tcp => {
                if self.rdma_device.is_some() {
                    bail!("--rdma-device needs --transport rdma");
                }
                Ok(None)
            }
            TransportArg::Rdma => Ok(Some(rdma::Config {
                device: self.rdma_device.clone().unwrap_or_default(),
                sim_delay_us: self.rdma_sim_delay_us,
                seed,
                write_background: self.rdma_background == BackgroundArg::Write,
            })),
        }
    }

    /// `--rdma-window` in bytes.
    pub fn window(&self) -> Result<u64> {
        let b = parse_size(&self.rdma_window).map_err(|e| anyhow!("--rdma-window: {e}"))?;
        if b == 0 {
            bail!("--rdma-window must be more than 0");
        }
        Ok(b)
    }

    /// Check the options and that the device opens, before anything starts:
    /// RDMA asked for where there is none is a clear error at once.
    pub fn check(&self) -> Result<Option<rdma::Config>> {
        self.window()?;
        let rc = self.rdma(0)?;
        if let Some(rc) = &rc {
            rc.open(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)).map_err(|e| {
                anyhow!(
                    "--transport rdma: {e}{}",
                    if rc.device == "sim" { "" } else { " (--rdma-device sim uses the software device)" }
                )
            })?;
        }
        Ok(rc)
    }

    /// These options as command-line arguments (see [`GuestOpts::to_args`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--transport".into(),
            name_of(&self.transport),
            "--rdma-sim-delay-us".into(),
            self.rdma_sim_delay_us.to_string(),
            "--rdma-window".into(),
            self.rdma_window.clone(),
            "--rdma-yield".into(),
            name_of(&self.rdma_yield),
            "--rdma-background".into(),
            name_of(&self.rdma_background),
        ];
        push_opt(&mut a, "--rdma-device", self.rdma_device.as_ref());
        a
    }
}

/// The destination's time series (`dest`, `migrate`).
#[derive(Args, Clone, Debug, PartialEq)]
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
    /// Serve pages from this snapshot memory file (a Firecracker full
    /// snapshot's memory file) instead of a running guest; pure post-copy,
    /// to a `dest --vmm-uffd-socket`.
    #[arg(long)]
    pub memory_file: Option<PathBuf>,
    /// The memory file's regions, OFFSET:SIZE[,OFFSET:SIZE...] (default: one
    /// region over the whole file).
    #[arg(long, requires = "memory_file")]
    pub file_regions: Option<String>,
    /// Page size of the memory file's guest: 4K, or 2M (hugetlbfs).
    #[arg(long, default_value = "4K", requires = "memory_file")]
    pub file_page_size: String,
    /// Guest options.
    #[command(flatten)]
    pub guest: GuestOpts,
    /// Migration options.
    #[command(flatten)]
    pub migration: MigrationOpts,
    /// How post-copy pages move.
    #[command(flatten)]
    pub transport: TransportOpts,
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
    /// How post-copy pages move.
    #[command(flatten)]
    pub transport: TransportOpts,
    /// Write the merged JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 500)]
    pub run_before_ms: u64,
    /// Keep the guest running this long after the migration, then verify it.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// The destination's own options.
    #[command(flatten)]
    pub dest: DestOpts,
    /// Do not have the destination prepare guest memory while the source's
    /// guest runs before migrating (`dest --prepare-mem`): it is then
    /// created when the source's hello arrives.
    #[arg(long)]
    pub no_prepare: bool,
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

pub(crate) fn read_key(path: &Option<PathBuf>) -> Result<Option<Vec<u8>>> {
    let Some(p) = path else { return Ok(None) };
    let k = std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
    let k: Vec<u8> = k.trim_ascii().to_vec();
    if k.is_empty() {
        bail!("key file {} is empty", p.display());
    }
    Ok(Some(k))
}

pub(crate) fn prefetch_of(pages: Option<u32>, mode: PrefetchModeArg) -> Result<Option<Prefetch>> {
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
    /// The page size asked for.
    pub fn page_size(&self) -> Result<PageSize> {
        parse_page_size(&self.page_size).context("--page-size")
    }

    /// The memory layout these options describe.
    pub fn layout(&self) -> Result<MemLayout> {
        build_layout(&self.mem, self.page_size()?, self.regions)
    }

    /// `dest` options preparing memory for this guest's layout.
    pub fn prepare_args(&self) -> Vec<String> {
        vec![
            "--prepare-mem".into(),
            self.mem.clone(),
            "--prepare-page-size".into(),
            self.page_size.clone(),
            "--prepare-regions".into(),
            self.regions.to_string(),
        ]
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
        if self.touch != 1.0 {
            bail!("--touch applies to the workload guest only");
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
        if !(self.touch > 0.0 && self.touch <= 1.0) {
            bail!("--touch must be in (0, 1], got {}", self.touch);
        }
        Ok(WorkloadConfig {
            vcpus: self.vcpus,
            pattern,
            store_ratio: self.store_ratio,
            seed: self.seed,
            stall_threshold_ns: self.stall_threshold_us * 1000,
            access_rate: self.access_rate,
            touch: self.touch,
        })
    }
}

/// The command-line spelling of a value-enum value.
pub(crate) fn name_of(v: &impl ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

fn push_opt(a: &mut Vec<String>, flag: &str, v: Option<impl ToString>) {
    if let Some(v) = v {
        a.extend([flag.to_string(), v.to_string()]);
    }
}

impl GuestOpts {
    /// These options as command-line arguments: parsing them gives back
    /// the same options (tested), so a child process sees what we saw.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--guest", name_of(&self.guest)),
            ("--mem", self.mem.clone()),
            ("--vcpus", self.vcpus.to_string()),
            ("--pattern", self.pattern.clone()),
            ("--store-ratio", self.store_ratio.to_string()),
            ("--seed", self.seed.to_string()),
            ("--page-size", self.page_size.clone()),
            ("--regions", self.regions.to_string()),
            ("--stall-threshold-us", self.stall_threshold_us.to_string()),
            ("--access-rate", self.access_rate.to_string()),
            ("--touch", self.touch.to_string()),
            ("--heartbeat-ms", self.heartbeat_ms.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
    }
}

impl MigrationOpts {
    /// These options as command-line arguments (see [`GuestOpts::to_args`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            ("--mode", name_of(&self.mode)),
            ("--prefetch-mode", name_of(&self.prefetch_mode)),
            ("--push-run", self.push_run.to_string()),
            ("--push-streams", self.push_streams.to_string()),
            ("--peer-timeout-ms", self.peer_timeout_ms.to_string()),
            ("--max-rounds", self.max_rounds.to_string()),
            ("--downtime-budget-ms", self.downtime_budget_ms.to_string()),
            ("--precopy-budget-ms", self.precopy_budget_ms.to_string()),
            ("--recover-timeout", self.recover_timeout.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect();
        push_opt(&mut a, "--prefetch", self.prefetch);
        push_opt(&mut a, "--key-file", self.key_file.as_ref().map(|k| k.display()));
        push_opt(&mut a, "--postcopy-after", self.postcopy_after);
        push_opt(&mut a, "--background-nice", self.background_nice);
        push_opt(&mut a, "--push-rate", self.push_rate.as_ref());
        push_opt(&mut a, "--push-yield", self.push_yield);
        a.extend(["--dscp".into(), name_of(&self.dscp)]);
        a
    }
}

/// On or off, on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

impl DestOpts {
    /// These options as command-line arguments (see [`GuestOpts::to_args`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--memory".into(), name_of(&self.memory), "--populate".into(), name_of(&self.populate)];
        push_opt(&mut a, "--max-mem", self.max_mem.as_ref());
        a
    }
}

impl TimelineOpts {
    /// The destination's share of these options as command-line arguments
    /// (the CSV is written by whoever merges the report).
    pub fn to_args(&self) -> Vec<String> {
        vec!["--tick-ms".into(), self.tick_ms.to_string()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct All {
        #[command(flatten)]
        g: GuestOpts,
        #[command(flatten)]
        m: MigrationOpts,
        #[command(flatten)]
        d: DestOpts,
    }

    fn parse(args: &[String]) -> All {
        All::try_parse_from(std::iter::once("postcopy".to_string()).chain(args.iter().cloned())).expect("parses")
    }

    #[test]
    fn to_args_parses_back_to_the_same_options() {
        for line in [
            vec![],
            [
                "--guest",
                "vm",
                "--mem",
                "512M",
                "--vcpus",
                "3",
                "--pattern",
                "hotset:64M",
                "--store-ratio",
                "0.5",
                "--seed",
                "9",
                "--regions",
                "2",
                "--stall-threshold-us",
                "7",
                "--access-rate",
                "1000",
                "--touch",
                "0.25",
                "--heartbeat-ms",
                "20",
                "--mode",
                "hybrid",
                "--prefetch",
                "8",
                "--prefetch-mode",
                "around",
                "--push-run",
                "64",
                "--key-file",
                "/k",
                "--peer-timeout-ms",
                "900",
                "--postcopy-after",
                "2",
                "--max-rounds",
                "4",
                "--downtime-budget-ms",
                "50",
                "--precopy-budget-ms",
                "999",
                "--background-nice",
                "5",
                "--push-rate",
                "9gbit",
                "--push-yield",
                "0.5",
                "--recover-timeout",
                "7",
                "--memory",
                "anon",
                "--populate",
                "background",
                "--max-mem",
                "2G",
            ]
            .map(String::from)
            .to_vec(),
        ] {
            let first = parse(&line);
            let again: Vec<String> = [first.g.to_args(), first.m.to_args(), first.d.to_args()].concat();
            let second = parse(&again);
            assert_eq!(first.g, second.g);
            assert_eq!(first.m, second.m);
            assert_eq!(first.d, second.d);
        }
    }
}
