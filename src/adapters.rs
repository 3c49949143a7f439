//! The guests seen through the pager's and the sender's guest traits, and
//! what each reports when it is stopped and verified.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guest::vm::{Vm, VmConfig, VmState};
use guest::{Backing, GuestMemory, Workload, WorkloadState};
use pager::DestGuest;
use proto::wire::GuestKind;
use proto::{HostAddr, LatencyHist, MemLayout, PageBitmap, PageRange};
use sender::SourceGuest;

/// What a stopped guest reports, whichever kind it was.
#[derive(Debug, Default)]
pub struct GuestSummary {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory held in 2 MiB pages when the guest stopped (destination).
    pub huge_bytes: u64,
    /// Access pattern.
    pub pattern: String,
    /// Share of accesses that are stores.
    pub store_ratio: f64,
    /// Accesses over the guest's life.
    pub accesses_total: u64,
    /// Accesses on this host.
    pub accesses_here: u64,
    /// Loads on this host.
    pub loads_here: u64,
    /// Stores on this host.
    pub stores_here: u64,
    /// Violations over the guest's life.
    pub violations: u64,
    /// Accesses on this host slower than the stall threshold (workload only).
    pub stalls: LatencyHist,
    /// Heartbeats per vCPU on this host (VM: console lines; workload: 1 if
    /// that vCPU made progress here, else 0).
    pub heartbeats: Vec<u64>,
    /// Pages that passed verification.
    pub verified_pages: u64,
    /// Whether verification passed.
    pub verify_ok: bool,
    /// The first problems found.
    pub problems: Vec<String>,
    /// Thread id of each vCPU.
    pub vcpu_tids: Vec<u32>,
}

/// Allocates shared guest memory in the background at the lowest priority.
pub struct Populator {
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Populator {
    fn start(mem: &Arc<GuestMemory>) -> Populator {
        let cancel = Arc::new(AtomicBool::new(false));
        let (m, c) = (Arc::clone(mem), Arc::clone(&cancel));
        let thread = std::thread::Builder::new()
            .name("populate".into())
            .spawn(move || {
                transport::sched::set_thread_nice(19);
                if let Err(e) = m.populate_alias(1, &c) {
                    tracing::warn!("populating guest memory in the background: {e}");
                }
            })
            .expect("spawning a thread");
        Populator { cancel, thread: Some(thread) }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When the destination allocates shared guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populate {
    /// Before acknowledging the hello (the guest runs on the source
    /// meanwhile): the push then writes into ready pages.
    Before,
    /// In a background thread at the lowest priority: the migration starts
    /// at once, but pages written before it gets there are allocated by that
    /// write, which slows the push (measured: 0.5-0.8 GB/s against 2.3 GB/s,
    /// ten times the faults, for 2 GiB).
    Background,
}

/// Fresh destination memory for `layout` (see [`Populate`]).
/// Populating before stops early when `cancel` is set (the pager sets it
/// when the source hangs up meanwhile).
fn dest_memory(
    layout: MemLayout,
    backing: Backing,
    populate: Populate,
    cancel: &AtomicBool,
) -> Result<(Arc<GuestMemory>, Option<Populator>), guest::MemoryError> {
    let mem = Arc::new(GuestMemory::with_backing(layout, backing)?);
    if populate == Populate::Before {
        mem.populate_alias(2, cancel)?;
    }
    let populator = (backing.is_shared() && populate == Populate::Background).then(|| Populator::start(&mem));
    Ok((mem, populator))
}

/// Prepared memory and how long preparing it took.
type PreparedMemory = (Arc<GuestMemory>, Option<Populator>, Duration);

/// Destination memory created and populated in a thread of its own before
/// the source's hello says what it needs (`dest --prepare-mem`).
pub struct Prepared {
    layout: MemLayout,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<PreparedMemory, guest::MemoryError>>>,
}

impl Prepared {
    /// Start preparing memory for `layout`.
    pub fn start(layout: MemLayout, backing: Backing, populate: Populate) -> std::io::Result<Prepared> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (l, c) = (layout.clone(), Arc::clone(&cancel));
        let thread = std::thread::Builder::new().name("prepare".into()).spawn(move || {
            let t = std::time::Instant::now();
            let (mem, populator) = dest_memory(l, backing, populate, &c)?;
            Ok((mem, populator, t.elapsed()))
        })?;
        Ok(Prepared { layout, cancel, thread: Some(thread) })
    }

    /// The layout being prepared.
    pub fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// The memory, once ready, if it was prepared for `layout` (`None`
    /// otherwise: it is dropped). Waiting stops early when `cancel` is set.
    pub fn take(
        mut self,
        layout: &MemLayout,
        cancel: &AtomicBool,
    ) -> Option<Result<PreparedMemory, guest::MemoryError>> {
        if *layout != self.layout {
            return None;
        }
        let thread = self.thread.take()?;
        while !thread.is_finished() {
            if cancel.load(Ordering::Relaxed) {
                self.cancel.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // A panic there is a bug here: pass it on.
        Some(thread.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn regions_of(mem: &GuestMemory) -> Vec<HostAddr> {
    mem.host_regions().iter().map(|r| r.host).collect()
}

/// The source's workload guest: running until paused for switchover.
pub struct WorkloadSource {
    mem: Arc<GuestMemory>,
    workload: Option<Workload>,
    pause_timeout: Duration,
    tracker: Option<guest::dirty::DirtyTracker>,
}

impl WorkloadSource {
    /// Wrap a running workload.
    pub fn new(workload: Workload, pause_timeout: Duration) -> Self {
        WorkloadSource { mem: Arc::clone(workload.memory()), workload: Some(workload), pause_timeout, tracker: None }
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        self.workload.as_ref().expect("present until taken")
    }

    /// Take the workload back (to stop it and report).
    pub fn into_workload(mut self) -> Workload {
        self.workload.take().expect("present until taken")
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
}

// SAFETY: the regions are `GuestMemory`'s mappings, held by the Arc in this
// object for its whole life, in layout order and of the layout's lengths.
unsafe impl SourceGuest for WorkloadSource {
    fn kind(&self) -> GuestKind {
        GuestKind::Workload
    }

    fn layout(&self) -> &MemLayout {
        self.mem.layout()
    }

    fn regions(&self) -> Vec<HostAddr> {
        regions_of(&self.mem)
    }

    fn pause(&mut self) -> Result<Vec<u8>, sender::GuestError> {
        let st = self.workload().pause(self.pause_timeout).map_err(|e| sender::GuestError::Pause(Box::new(e)))?;
        Ok(st.encode())
    }

    fn unpause(&mut self) -> Result<(), sender::GuestError> {
        self.workload().unpause();
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> Result<(), sender::GuestError> {
        let t = guest::dirty::DirtyTracker::start(&self.mem).map_err(|e| sender::GuestError::Tracking(Box::new(e)))?;
        self.tracker = Some(t);
        Ok(())
    }

    fn collect_dirty(&mut self, into: &mut PageBitmap) -> Result<(), sender::GuestError> {
        let t = self.tracker.as_mut().ok_or_else(|| sender::GuestError::Tracking("tracking was not started".into()))?;
        t.collect(into).map(drop).map_err(|e| sender::GuestError::Tracking(Box::new(e)))
    }

    fn stop_dirty_tracking(&mut self) {
        self.tracker = None;
    }

    fn zero_scanner(&self) -> Option<sender::ZeroScan> {
        let mem = Arc::clone(&self.mem);
        Some(Box::new(move |into: &mut PageBitmap| {
            if let Err(e) = mem.zero_pages(into) {
                tracing::warn!("finding never-populated guest pages: {e}");
            }
        }))
    }
}

/// The source's VM guest.
pub struct VmSource {
    mem: Arc<GuestMemory>,
    vm: Option<Vm>,
    pause_timeout: Duration,
}

impl VmSource {
    /// Boot a VM guest over fresh anonymous memory.
    pub fn boot(
        layout: MemLayout,
        config: VmConfig,
        pause_timeout: Duration,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mem = Arc::new(GuestMemory::new(layout)?);
        let vm = Vm::boot(Arc::clone(&mem), config)?;
        Ok(VmSource { mem, vm: Some(vm), pause_timeout })
    }

    fn vm(&self) -> &Vm {
        self.vm.as_ref().expect("present until taken")
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
}

// SAFETY: as for WorkloadSource: GuestMemory's mappings, held by the Arc.
unsafe impl SourceGuest for VmSource {
    fn kind(&self) -> GuestKind {
        GuestKind::Vm
    }

    fn layout(&self) -> &MemLayout {
        self.mem.layout()
    }

    fn regions(&self) -> Vec<HostAddr> {
        regions_of(&self.mem)
    }

    fn pause(&mut self) -> Result<Vec<u8>, sender::GuestError> {
        let st = self.vm().pause(self.pause_timeout).map_err(|e| sender::GuestError::Pause(Box::new(e)))?;
        Ok(st.encode())
    }

    fn unpause(&mut self) -> Result<(), sender::GuestError> {
        self.vm().unpause();
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> Result<(), sender::GuestError> {
        self.vm().start_dirty_log().map_err(|e| sender::GuestError::Tracking(Box::new(e)))
    }

    fn collect_dirty(&mut self, into: &mut PageBitmap) -> Result<(), sender::GuestError> {
        self.vm().collect_dirty(into).map(drop).map_err(|e| sender::GuestError::Tracking(Box::new(e)))
    }

    fn stop_dirty_tracking(&mut self) {
        if let Err(e) = self.vm().stop_dirty_log() {
            tracing::warn!("stopping the dirty log: {e}");
        }
    }

    fn zero_scanner(&self) -> Option<sender::ZeroScan> {
        let mem = Arc::clone(&self.mem);
        Some(Box::new(move |into: &mut PageBitmap| {
            if let Err(e) = mem.zero_pages(into) {
                tracing::warn!("finding never-populated guest pages: {e}");
            }
        }))
    }
}

/// A source guest of either kind.
pub enum SourceAny {
    /// The workload guest.
    Workload(WorkloadSource),
    /// The VM guest.
    Vm(VmSource),
    /// A VMM's snapshot memory file.
    Snapshot(crate::snapshot::SnapshotSource),
}

impl SourceAny {
    /// The guest kind.
    pub fn kind(&self) -> GuestKind {
        match self {
            SourceAny::Workload(_) => GuestKind::Workload,
            SourceAny::Vm(_) => GuestKind::Vm,
            SourceAny::Snapshot(_) => GuestKind::Snapshot,
        }
    }

    /// Counters over the guest's life so far (at the last heartbeat for a VM).
    pub fn accesses(&self) -> u64 {
        match self {
            SourceAny::Workload(w) => w.workload().stats().accesses,
            SourceAny::Vm(v) => v.vm().stats().accesses,
            SourceAny::Snapshot(_) => 0,
        }
    }

    /// Stop the guest here and verify it (after a migration that failed
    /// before switchover, the guest must still check out on the source).
    pub fn finish(self) -> GuestSummary {
        self.finish_from(&mut Vec::new())
    }

    /// As [`SourceAny::finish`], for a guest verified before: the VM's
    /// generators are replayed from `checkpoints` (updated), not from boot.
    pub fn finish_from(self, checkpoints: &mut Vec<guest::vm::GenCheckpoint>) -> GuestSummary {
        match self {
            SourceAny::Workload(w) => {
                let mem = Arc::clone(&w.mem);
                finish_workload(w.into_workload(), &mem)
            }
            SourceAny::Vm(mut v) => {
                let vm = v.vm.take().expect("present until taken");
                finish_vm(vm, &v.mem, checkpoints)
            }
            // A file: nothing ran, nothing can have gone wrong with it.
            SourceAny::Snapshot(_) => GuestSummary { verify_ok: true, ..GuestSummary::default() },
        }
    }
}

fn finish_workload(w: Workload, mem: &GuestMemory) -> GuestSummary {
    let tids = w.vcpu_tids();
    let vcpus = u32::try_from(tids.len()).expect("bounded");
    let (pattern, store_ratio) = (w.config().pattern.to_string(), w.config().store_ratio);
    let r = w.stop();
    let verify = r.state.as_ref().map(|s| guest::workload::verify(mem, s));
    let mut problems = r.violation_log.clone();
    problems.extend(verify.iter().flat_map(|v| v.problems.iter().cloned()));
    if r.state.is_none() {
        problems.push("a vCPU thread panicked".into());
    }
    GuestSummary {
        vcpus,
        huge_bytes: 0,
        pattern,
        store_ratio,
        accesses_total: r.total.accesses,
        accesses_here: r.here.accesses,
        loads_here: r.here.loads,
        stores_here: r.here.stores,
        violations: r.total.violations,
        stalls: r.stalls,
        heartbeats: r.here_per_vcpu.iter().map(|&a| u64::from(a > 0)).collect(),
        verified_pages: verify.as_ref().map_or(0, |v| v.verified_pages),
        verify_ok: verify.as_ref().is_some_and(guest::stamp::VerifyReport::ok),
        problems,
        vcpu_tids: tids,
    }
}

pub(crate) fn finish_vm(vm: Vm, mem: &GuestMemory, checkpoints: &mut Vec<guest::vm::GenCheckpoint>) -> GuestSummary {
    let tids = vm.vcpu_tids();
    let c = vm.config();
    let pattern = match c.active_pages {
        0 => "uniform".to_string(),
        n => guest::Pattern::Hotset { bytes: n * 4096, fraction: 1.0 }.to_string(),
    };
    let store_ratio = f64::from(c.store_threshold) / 65536.0;
    let r = vm.stop();
    let verify = r.state.as_ref().map(|s| {
        guest::vm::verify_from(mem, s, checkpoints).map(|(v, next)| {
            *checkpoints = next;
            v
        })
    });
    let mut problems: Vec<String> = r.error.iter().cloned().collect();
    let (verified_pages, verify_ok) = match &verify {
        Some(Ok(v)) => {
            problems.extend(v.problems.iter().cloned());
            (v.verified_pages, v.ok())
        }
        Some(Err(e)) => {
            problems.push(e.to_string());
            (0, false)
        }
        None => (0, false),
    };
    GuestSummary {
        vcpus: u32::try_from(tids.len()).expect("bounded"),
        huge_bytes: 0,
        pattern,
        store_ratio,
        accesses_total: r.total.accesses,
        accesses_here: r.here.accesses,
        loads_here: r.here.accesses.saturating_sub(r.here.stores),
        stores_here: r.here.stores,
        violations: r.total.violations,
        stalls: LatencyHist::new(),
        heartbeats: r.heartbeats,
        verified_pages,
        verify_ok: verify_ok && r.error.is_none(),
        problems,
        vcpu_tids: tids,
    }
}

/// The destination's guest of either kind: memory first, vCPUs once the
/// state arrives.
pub struct DestAny {
    mem: Arc<GuestMemory>,
    kind: GuestKind,
    workload: Option<Workload>,
    vm: Option<Vm>,
    /// Declared last: dropped after the guest stops touching memory.
    _populate: Option<Populator>,
}

impl DestAny {
    /// Fresh memory for a guest of `kind` over `layout`; populating stops
    /// early once `cancel` is set.
    pub fn new(
        kind: GuestKind,
        layout: MemLayout,
        backing: Backing,
        populate: Populate,
        cancel: &AtomicBool,
    ) -> Result<Self, guest::MemoryError> {
        let (mem, populator) = dest_memory(layout, backing, populate, cancel)?;
        Ok(DestAny::with_memory(kind, mem, populator))
    }

    /// A guest of `kind` over memory made ready before (see [`Prepared`]).
    pub fn with_memory(kind: GuestKind, mem: Arc<GuestMemory>, populator: Option<Populator>) -> Self {
        DestAny { mem, kind, workload: None, vm: None, _populate: populator }
    }

    /// The guest kind.
    pub fn kind(&self) -> GuestKind {
        self.kind
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// vCPU thread ids (for naming block time).
    pub fn vcpu_tids(&self) -> Vec<u32> {
        match (&self.workload, &self.vm) {
            (Some(w), _) => w.vcpu_tids(),
            (_, Some(v)) => v.vcpu_tids(),
            _ => Vec::new(),
        }
    }

    /// A vCPU failure so far, if any (the VM guest can fail on its own).
    pub fn error(&self) -> Option<String> {
        self.vm.as_ref().and_then(Vm::error)
    }

    /// Accesses so far (for progress lines).
    pub fn accesses(&self) -> u64 {
        match (&self.workload, &self.vm) {
            (Some(w), _) => w.stats().accesses,
            (_, Some(v)) => v.stats().accesses,
            _ => 0,
        }
    }

    /// The migrated guest, running here with all memory local, as the
    /// source of the next migration (back and forth, as the soak does).
    /// `None` if it was never resumed.
    pub fn into_source(mut self, pause_timeout: Duration) -> Option<SourceAny> {
        if let Some(w) = self.workload.take() {
            return Some(SourceAny::Workload(WorkloadSource::new(w, pause_timeout)));
        }
        let vm = self.vm.take()?;
        Some(SourceAny::Vm(VmSource { mem: Arc::clone(&self.mem), vm: Some(vm), pause_timeout }))
    }

    /// Stop the guest and verify every page.
    pub fn finish(mut self) -> GuestSummary {
        let huge_bytes = self.mem.huge_bytes().unwrap_or(0);
        let summary = if let Some(w) = self.workload.take() {
            finish_workload(w, &self.mem)
        } else if let Some(v) = self.vm.take() {
            finish_vm(v, &self.mem, &mut Vec::new())
        } else {
            GuestSummary { problems: vec!["the guest was never resumed".into()], ..GuestSummary::default() }
        };
        GuestSummary { huge_bytes, ..summary }
    }
}

// SAFETY: the regions are `GuestMemory`'s mappings (private anonymous, or
// shared with an alias), held by the Arc in this object for its whole life;
// only the guest's vCPUs touch the guest view, and only after `resume`;
// nothing here writes the alias (populating maps pages, it changes none).
unsafe impl DestGuest for DestAny {
    fn regions(&self) -> Vec<proto::ViewAddr> {
        // Our own memory: the guest's view is this process's mapping.
        regions_of(&self.mem).into_iter().map(|h| proto::ViewAddr(h.0)).collect()
    }

    fn alias_regions(&self) -> Option<Vec<HostAddr>> {
        self.mem.alias_regions().map(<[HostAddr]>::to_vec)
    }

    fn resume(&mut self, state: &[u8]) -> Result<(), pager::GuestError> {
        let resume = |e: Box<dyn std::error::Error + Send + Sync>| pager::GuestError::Resume(e);
        match self.kind {
            GuestKind::Workload => {
                let st = WorkloadState::decode(state).map_err(|e| resume(Box::new(e)))?;
                self.workload = Some(Workload::resume(Arc::clone(&self.mem), &st).map_err(|e| resume(Box::new(e)))?);
            }
            GuestKind::Vm => {
                let st = VmState::decode(state).map_err(|e| resume(Box::new(e)))?;
                self.vm = Some(Vm::restore(Arc::clone(&self.mem), &st).map_err(|e| resume(Box::new(e)))?);
            }
            GuestKind::Snapshot => {
                return Err(resume("a snapshot's memory is for a VMM that restores its own vCPUs: run the destination with --vmm-uffd-socket".into()));
            }
        }
        Ok(())
    }

    fn evict(&self, pages: PageRange) -> Result<(), pager::GuestError> {
        self.mem.evict(pages).map_err(|e| pager::GuestError::Evict {
            first: pages.first.0,
            n_pages: pages.n_pages,
            source: Box::new(e),
        })
    }
}
