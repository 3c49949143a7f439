//! The workload guest seen through the pager's and the sender's guest traits.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guest::{Backing, GuestMemory, Workload, WorkloadState};
use pager::DestGuest;
use proto::wire::GuestKind;
use proto::{HostAddr, MemLayout, PageBitmap, PageRange};
use sender::SourceGuest;

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
        self.mem.host_regions().iter().map(|r| r.host).collect()
    }

    fn pause(&mut self) -> Result<Vec<u8>, sender::GuestError> {
        Ok(self.workload().pause(self.pause_timeout)?.encode())
    }

    fn unpause(&mut self) -> Result<(), sender::GuestError> {
        self.workload().unpause();
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> Result<(), sender::GuestError> {
        self.tracker = Some(guest::dirty::DirtyTracker::start(&self.mem)?);
        Ok(())
    }

    fn collect_dirty(&mut self, into: &mut PageBitmap) -> Result<(), sender::GuestError> {
        let t = self.tracker.as_mut().ok_or("dirty tracking was not started")?;
        t.collect(into)?;
        Ok(())
    }

    fn stop_dirty_tracking(&mut self) {
        self.tracker = None;
    }
}

/// The destination's workload guest: memory first, vCPUs once the state arrives.
pub struct WorkloadDest {
    mem: Arc<GuestMemory>,
    workload: Option<Workload>,
    state: Option<WorkloadState>,
    populate: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
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

impl WorkloadDest {
    /// Fresh memory for `layout`: anonymous and unpopulated, or shared
    /// memory whose alias is populated as `populate` says (populating costs
    /// about 1.4 s per GiB here: the pages are new to the host).
    pub fn new(layout: MemLayout, backing: Backing, populate: Populate) -> Result<Self, guest::MemoryError> {
        let mem = Arc::new(GuestMemory::with_backing(layout, backing)?);
        if populate == Populate::Before {
            mem.populate_alias(2, &AtomicBool::new(false))?;
        }
        let populate = (backing == Backing::Shmem && populate == Populate::Background).then(|| {
            let cancel = Arc::new(AtomicBool::new(false));
            let (m, c) = (Arc::clone(&mem), Arc::clone(&cancel));
            let t = std::thread::Builder::new()
                .name("populate".into())
                .spawn(move || {
                    transport::sched::set_thread_nice(19);
                    if let Err(e) = m.populate_alias(1, &c) {
                        tracing::warn!("populating guest memory in the background: {e}");
                    }
                })
                .expect("spawning a thread");
            (cancel, t)
        });
        Ok(WorkloadDest { mem, workload: None, state: None, populate })
    }

    /// The running workload, once resumed.
    pub fn workload(&self) -> Option<&Workload> {
        self.workload.as_ref()
    }

    /// Take the running workload.
    pub fn take_workload(&mut self) -> Option<Workload> {
        self.workload.take()
    }

    /// The state it was resumed from.
    pub fn resumed_state(&self) -> Option<&WorkloadState> {
        self.state.as_ref()
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
}

impl Drop for WorkloadDest {
    fn drop(&mut self) {
        if let Some((cancel, t)) = self.populate.take() {
            cancel.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
    }
}

// SAFETY: the regions are `GuestMemory`'s mappings (private anonymous, or
// shared with an alias), held by the Arc in this object for its whole life;
// only the workload's vCPUs touch the guest view, and only after `resume`;
// nothing here writes the alias (populating maps pages, it changes none).
unsafe impl DestGuest for WorkloadDest {
    fn regions(&self) -> Vec<HostAddr> {
        self.mem.host_regions().iter().map(|r| r.host).collect()
    }

    fn alias_regions(&self) -> Option<Vec<HostAddr>> {
        self.mem.alias_regions().map(<[HostAddr]>::to_vec)
    }

    fn resume(&mut self, state: &[u8]) -> Result<(), pager::GuestError> {
        let st = WorkloadState::decode(state)?;
        self.workload = Some(Workload::resume(Arc::clone(&self.mem), &st)?);
        self.state = Some(st);
        Ok(())
    }

    fn evict(&self, pages: PageRange) -> Result<(), pager::GuestError> {
        Ok(self.mem.evict(pages)?)
    }
}
