//! The destination side of a postcopy migration (the pager).
//!
//! Guest memory is registered with userfaultfd before the guest runs here;
//! the fault loop turns faults into batched range requests on the control
//! connection and installs the replies; a bulk receiver installs the
//! background push; when every page is present the pager unregisters and
//! reports. After switchover a broken link pauses the migration until the
//! source reconnects. The guest is reached only through [`DestGuest`].
//!
//! Leaves first:
//! * [`error`]: why a run failed; [`config`]: how it behaves;
//!   [`metrics`]: counters and latencies; `shared`: run-wide flags.
//! * `uffd`: the typed userfaultfd (private: it writes to raw addresses).
//! * `install`: page installation and fault completion (private, as uffd).
//! * [`planner`]: faults to ranges (prefetch, dedup).
//! * `bulk`: the bulk receiver (precopy and push), one per connection.
//! * `rdma`: post-copy pages read from the source by RDMA (demand and background).
//! * `recover`: the resume handshake of a reconnecting source.
//! * `fault`: the fault loop (demand path, pause and reattach).
//! * [`migration`]: the run from handshake to completion, and its report.
#![deny(unsafe_code)]

mod bulk;
pub mod config;
pub mod error;
mod fault;
pub mod guest;
mod install;
pub mod metrics;
pub mod migration;
pub mod planner;
mod rdma;
mod recover;
mod shared;
mod uffd;
pub mod vmm;

pub use config::{PagerConfig, default_nice};
pub use error::PagerError;
pub use guest::{DestGuest, GuestError};
pub use metrics::{PagerMetrics, Phase};
pub use migration::{Outcome, PagerReport, run};
pub use planner::{Prefetch, PrefetchMode};
pub use uffd::UffdError;
