//! What the pager needs from the guest it serves, whoever built it.

use proto::{HostAddr, PageRange, ViewAddr};

/// What the guest side failed at (its own error is the source).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Creating or preparing guest memory.
    #[error("preparing guest memory failed")]
    Memory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Restoring the guest's state and starting its vCPUs.
    #[error("resuming the guest failed")]
    Resume(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Dropping pages from the guest's view.
    #[error("evicting pages {first}..+{n_pages} failed")]
    Evict {
        /// First page.
        first: u64,
        /// Pages.
        n_pages: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The destination's view of a guest.
///
/// # Safety
/// `regions()` must return, in layout order, the start of one mapping per
/// layout region, exactly as long as the region, that stays mapped for as
/// long as the guest object lives and that nothing but the guest's own vCPUs
/// reads or writes meanwhile: the pager registers these ranges with
/// userfaultfd and the kernel writes pages into them. Without an alias they
/// must be private anonymous mappings (installed with UFFDIO_COPY). With
/// `alias_regions()`, they must be shared mappings (of a memfd, say), and
/// each alias a second writable shared mapping of the same pages that only
/// the pager writes (populating it, from another thread or not at all, is
/// allowed: it changes no content): the pager writes arriving pages through
/// the alias and maps them into the guest's view.
#[allow(unsafe_code)]
pub unsafe trait DestGuest {
    /// Where each region's memory starts, in the guest's view.
    fn regions(&self) -> Vec<ViewAddr>;

    /// Where each region's alias starts, for shared memory; `None` for
    /// anonymous memory.
    fn alias_regions(&self) -> Option<Vec<HostAddr>>;

    /// Restore the guest from `state` and let its vCPUs run. Memory may still
    /// be missing: vCPUs fault on it and wait.
    fn resume(&mut self, state: &[u8]) -> Result<(), GuestError>;

    /// Drop pages held from precopy that were dirtied again on the source, so
    /// the guest faults on them.
    fn evict(&self, pages: PageRange) -> Result<(), GuestError>;

    /// The guest's own userfaultfd, if its VMM created one, negotiated its
    /// API and registered every region with it (MISSING; MINOR too with an
    /// alias), as Firecracker hands one to a page-fault handler. The pager
    /// then uses it as it is; by default it creates and registers its own.
    /// `regions()` may then be addresses in the VMM's process: the pager
    /// only passes them to the kernel through this descriptor.
    fn take_userfaultfd(&mut self) -> Option<std::os::fd::OwnedFd> {
        None
    }
}
