//! The raw kernel ABI of userfaultfd and PAGEMAP_SCAN that the `userfaultfd`
//! crate (0.9) does not cover, in one place for the pager and the guest:
//!
//! * feature bits it has no flags for (MINOR_SHMEM, MISSING_SHMEM,
//!   WP_UNPOPULATED, WP_ASYNC), requested through `from_bits_retain`;
//! * UFFDIO_COPY and UFFDIO_CONTINUE, wrapped directly because the crate
//!   loses the partial count of a copy that stops half way;
//! * `struct uffd_msg` parsing for every event type, so non-fault events
//!   (REMOVE, UNMAP, REMAP, FORK) are read and reported, never dropped;
//! * PAGEMAP_SCAN (`struct pm_scan_arg`, `struct page_region`), which neither
//!   the crate nor libc nor nix knows.
//!
//! Structs are `#[repr(C)]` with compile-time size checks; numbers are from
//! `include/uapi/linux/userfaultfd.h` and `fs.h` (Linux 6.18). Callers own
//! the typed, safe wrappers (`pager`'s `Userfault`, `guest`'s `DirtyTracker`).
#![deny(unsafe_code)]

mod abi;
mod msg;

pub use abi::*;
pub use msg::{Event, MSG_LEN, parse};
