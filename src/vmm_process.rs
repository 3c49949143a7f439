//! The engine's VM guest as a VMM of its own process, speaking Firecracker's
//! page-fault handler protocol from the VMM's side, so the whole path of
//! `dest --vmm-uffd-socket` runs end to end here:
//!
//! * `postcopy snapshot --out DIR` boots the VM guest, lets it run, pauses
//!   it and writes a full snapshot: `DIR/mem` (the memory file, regions
//!   packed in order), `DIR/vmstate` (vCPU and guest state) and
//!   `DIR/snapshot.json` (the region table);
//! * `postcopy vmm --snapshot DIR --uffd-socket PATH` restores it as
//!   Firecracker does with a UFFD memory backend: fresh anonymous memory,
//!   its own userfaultfd registered for MISSING faults (kernel-mode faults
//!   included: KVM's), the regions as JSON with the descriptor attached to
//!   the handler, then the vCPUs from `vmstate`; it runs the guest and has
//!   it check itself.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use guest::GuestMemory;
use guest::vm::{Vm, VmState};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use proto::{GuestOffset, MemLayout, PageSize, RegionDesc};
use sender::SourceGuest;
use serde::{Deserialize, Serialize};
use userfaultfd::{FeatureFlags, UffdBuilder};

use crate::adapters::VmSource;
use crate::cmd::GuestOpts;

/// `postcopy snapshot`.
#[derive(Args, Clone, Debug)]
pub struct SnapshotArgs {
    /// The guest (the VM guest: `--guest vm`).
    #[command(flatten)]
    pub guest: GuestOpts,
    /// Write the snapshot into this directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Let the guest run this long before pausing it.
    #[arg(long, default_value_t = 500)]
    pub run_ms: u64,
}

/// `postcopy vmm`.
#[derive(Args, Clone, Debug)]
pub struct VmmArgs {
    /// The snapshot directory (`postcopy snapshot --out`).
    #[arg(long)]
    pub snapshot: PathBuf,
    /// The page-fault handler's socket (`dest --vmm-uffd-socket`).
    #[arg(long)]
    pub uffd_socket: PathBuf,
    /// Run the restored guest this long, then stop it and verify it.
    #[arg(long, default_value_t = 1000)]
    pub run_ms: u64,
    /// Give up (exit 3) if the guest's memory has not all arrived and been
    /// verified within this many seconds of the handshake.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// One region of a snapshot: where the guest sees it, where the file has it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SnapshotRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub offset: u64,
}

/// `snapshot.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Page size.
    pub page_size: u64,
    /// Regions, in guest order.
    pub regions: Vec<SnapshotRegion>,
}

impl SnapshotMeta {
    /// The `--file-regions` value a `source --memory-file` needs.
    pub fn file_regions(&self) -> String {
        self.regions.iter().map(|r| format!("{}:{}", r.offset, r.size)).collect::<Vec<_>>().join(",")
    }

    fn layout(&self) -> Result<MemLayout> {
        if self.page_size != 4096 {
            bail!("snapshot page size {} (only 4 KiB VM snapshots are made here)", self.page_size);
        }
        let regions =
            self.regions.iter().map(|r| RegionDesc { guest: GuestOffset(r.gpa), len_bytes: r.size }).collect();
        MemLayout::new(PageSize::Size4K, regions).map_err(|e| anyhow!("snapshot regions: {e}"))
    }
}

/// Boot the VM guest, run it, pause it and write its snapshot.
pub fn snapshot(args: &SnapshotArgs) -> Result<i32> {
    if args.guest.guest != crate::cmd::GuestArg::Vm {
        bail!("snapshots are of the VM guest: pass --guest vm");
    }
    let layout = args.guest.layout()?;
    crate::host::check_room(layout.len_bytes(), "the guest")?;
    let mut src = VmSource::boot(layout.clone(), args.guest.vm()?, Duration::from_secs(5))
        .map_err(|e| anyhow!("booting the VM guest: {e}"))?;
    std::thread::sleep(Duration::from_millis(args.run_ms));
    let state = src.pause().map_err(|e| anyhow!("pausing the guest: {e}"))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mem = Arc::clone(src.memory());
    let mut offset = 0;
    let mut regions = Vec::new();
    for r in layout.regions() {
        regions.push(SnapshotRegion { gpa: r.guest.0, size: r.len_bytes, offset });
        offset += r.len_bytes;
    }
    // The guest is paused: its memory no longer changes. Read it through
    // the same atomic words its vCPUs use.
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(args.out.join("mem")).context("creating the memory file")?);
    let words = usize::try_from(layout.page_size().bytes() / 8)?;
    for p in 0..layout.n_pages() {
        use std::io::Write;
        let p = proto::PageIdx(p);
        for w in 0..words {
            out.write_all(&mem.word(p, w).load(std::sync::atomic::Ordering::Relaxed).to_le_bytes())
                .context("writing the memory file")?;
        }
    }
    out.into_inner().map_err(|e| anyhow!("writing the memory file: {e}"))?.sync_all()?;
    std::fs::write(args.out.join("vmstate"), &state).context("writing vmstate")?;
    let meta = SnapshotMeta { page_size: layout.page_size().bytes(), regions };
    std::fs::write(args.out.join("snapshot.json"), serde_json::to_vec_pretty(&meta)?)
        .context("writing snapshot.json")?;
    println!(
        "snapshot of {} MiB in {}: serve it with: postcopy source --memory-file {} --file-regions {}",
        layout.len_bytes() >> 20,
        args.out.display(),
        args.out.join("mem").display(),
        meta.file_regions()
    );
    drop(src);
    Ok(0)
}

/// Restore a snapshot through a page-fault handler, run it, verify it.
pub fn vmm(args: &VmmArgs) -> Result<i32> {
    let meta: SnapshotMeta =
        serde_json::from_slice(&std::fs::read(args.snapshot.join("snapshot.json")).context("reading snapshot.json")?)
            .context("parsing snapshot.json")?;
    let state = VmState::decode(&std::fs::read(args.snapshot.join("vmstate")).context("reading vmstate")?)
        .map_err(|e| anyhow!("decoding vmstate: {e}"))?;
    let layout = meta.layout()?;
    crate::host::check_room(layout.len_bytes(), "the restored guest")?;
    let mem = Arc::new(GuestMemory::new(layout.clone())?);
    // As Firecracker's UFFD backend: non-blocking, MISSING, REMOVE events;
    // not user-mode-only (KVM touches guest memory from the kernel).
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .context("creating a userfaultfd")?;
    let mut json = Vec::new();
    for (host, r) in mem.host_regions().iter().zip(&meta.regions) {
        let len = usize::try_from(r.size)?;
        uffd.register(host.host.0 as *mut _, len).context("registering guest memory")?;
        json.push(format!(
            r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{}}}"#,
            host.host.0, r.size, r.offset, meta.page_size
        ));
    }
    let json = format!("[{}]", json.join(","));
    let stream = connect(&args.uffd_socket, Duration::from_secs(10))?;
    let fds = [uffd.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(json.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("sending the handshake")?;
    if sent != json.len() {
        bail!("the handshake went out short ({sent} of {} bytes)", json.len());
    }
    drop(stream);
    let t0 = Instant::now();
    // A handler that dies leaves faulting threads waiting forever: bound it.
    let limit = Duration::from_secs(args.timeout_s);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("postcopy vmm: error: the guest's memory did not all arrive within {limit:?}");
        std::process::exit(3);
    });
    let vm = Vm::restore(Arc::clone(&mem), &state).map_err(|e| anyhow!("restoring the vCPUs: {e}"))?;
    std::thread::sleep(Duration::from_millis(args.run_ms));
    let g = crate::adapters::finish_vm(vm, &mem, &mut Vec::new());
    drop(uffd);
    let heartbeats: u64 = g.heartbeats.iter().sum();
    eprintln!(
        "postcopy vmm: restored {} MiB through the handler in {:.0} ms: {} heartbeats over {} vCPUs, {} violations, \
         {} pages verified: verification {}",
        layout.len_bytes() >> 20,
        t0.elapsed().as_secs_f64() * 1e3,
        heartbeats,
        g.vcpus,
        g.violations,
        g.verified_pages,
        if g.verify_ok { "passed" } else { "FAILED" }
    );
    for p in g.problems.iter().take(5) {
        eprintln!("postcopy vmm:   {p}");
    }
    let ok = g.verify_ok && g.violations == 0 && g.heartbeats.iter().all(|&h| h > 0);
    Ok(if ok { 0 } else { 2 })
}

fn connect(path: &std::path::Path, limit: Duration) -> Result<UnixStream> {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() < limit => {
                tracing::debug!("connecting to {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to the handler at {}", path.display())),
        }
    }
}
