//! What the sender needs from the guest it migrates.

use proto::wire::GuestKind;
use proto::{HostAddr, MemLayout, PageBitmap};

/// What the guest side failed at (its own error is the source).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Pausing the vCPUs and taking the state.
    #[error("pausing the guest failed")]
    Pause(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Letting the vCPUs run again.
    #[error("resuming the guest here failed")]
    Unpause(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Starting dirty tracking or collecting what was written.
    #[error("dirty tracking failed")]
    Tracking(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The source's view of a guest.
///
/// # Safety
/// `regions()` must return, in layout order, the start of one mapping per
/// region of `layout()`, exactly as long as the region, that stays mapped and
/// readable for as long as the guest object lives: the kernel reads pages
/// from these addresses while sending.
#[allow(unsafe_code)]
pub unsafe trait SourceGuest {
    /// What kind of guest this is (the destination must build the same).
    fn kind(&self) -> GuestKind;

    /// Memory layout.
    fn layout(&self) -> &MemLayout;

    /// Where each region's memory starts.
    fn regions(&self) -> Vec<HostAddr>;

    /// Stop the vCPUs and return the guest's state. Memory must not change
    /// after this returns, until `unpause`.
    fn pause(&mut self) -> Result<Vec<u8>, GuestError>;

    /// Let the vCPUs run again (the migration failed before switchover).
    fn unpause(&mut self) -> Result<(), GuestError>;

    /// Begin tracking written pages: every page written after this call is
    /// reported by the next `collect_dirty`.
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError>;

    /// Add the pages written since the previous call (or since tracking
    /// started) to `into`, and re-arm tracking for them. Called before the
    /// pages are copied, so a write during the copy shows up next time.
    fn collect_dirty(&mut self, into: &mut PageBitmap) -> Result<(), GuestError>;

    /// Stop tracking (the guest runs untracked again).
    fn stop_dirty_tracking(&mut self);

    /// Once the guest is paused for good (after switchover): something the
    /// pusher can call, from its own thread, to learn which pages read as
    /// zero without reading them (never populated), so they go as Zeros
    /// frames without a read fault each. `None`: nothing known.
    fn zero_scanner(&self) -> Option<ZeroScan> {
        None
    }
}

/// Adds to the bitmap the pages known to read as zero (see
/// [`SourceGuest::zero_scanner`]).
pub type ZeroScan = Box<dyn FnOnce(&mut PageBitmap) + Send>;
