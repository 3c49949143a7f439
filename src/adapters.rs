//! The workload guest seen through the pager's and the sender's guest traits.
#![allow(unsafe_code)]

use std::sync::Arc;
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
}

impl WorkloadDest {
    /// Fresh memory for `layout`: anonymous and unpopulated, or shared memory
    /// populated through its alias (so the pager's writes never allocate).
    pub fn new(layout: MemLayout, backing: Backing) -> Result<Self, guest::MemoryError> {
        let mem = GuestMemory::with_backing(layout, backing)?;
        mem.populate_alias(2)?;
        Ok(WorkloadDest { mem: Arc::new(mem), workload: None, state: None })
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

// SAFETY: the regions are `GuestMemory`'s mappings (private anonymous, or
// shared with a populated alias: `new` populates it), held by the Arc in this
// object for its whole life; only the workload's vCPUs touch the guest view,
// and only after `resume`; nothing here writes the alias.
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
