//! Guests for postcopy: what runs on top of guest memory and checks itself.
//!
//! * [`memory`]: guest memory regions ([`GuestMemory`]), mapped but never
//!   populated up front.
//! * [`workload`]: the workload guest, vCPU threads touching memory with a
//!   [`pattern`], pausable, migratable through its [`state`].
//! * [`stamp`]: the self-checking page format and full verification.
//! * [`rng`]: the generator whose state migrates with the guest.
//! * [`dirty`]: dirty-page tracking for precopy (write-protect async mode
//!   and PAGEMAP_SCAN).
//! * [`vm`]: the VM guest, a KVM virtual machine running the same stress in
//!   machine code, with its own dirty tracking (KVM's dirty log).
//!
//! The pager and sender never see these types; the CLI adapts them to the
//! pager's and sender's guest traits.
#![deny(unsafe_code)]

pub mod dirty;
pub mod memory;
pub mod pattern;
pub mod rng;
pub mod stamp;
pub mod state;
pub mod vm;
pub mod workload;

pub use memory::{Backing, GuestMemory, HostRegion, MemoryError};
pub use pattern::{Pattern, parse_size};
pub use state::{WorkloadConfig, WorkloadState};
pub use workload::{GuestStats, Workload, WorkloadError, WorkloadReport};
