//! The destination side of a postcopy migration (the pager).
//!
//! Guest memory is registered with userfaultfd before the guest runs here;
//! the fault loop turns faults into batched range requests on the control
//! connection and installs the replies; a bulk receiver installs the
//! background push; when every page is present the pager unregisters and
//! reports. The guest is reached only through [`DestGuest`].
//!
//! * [`pager`]: the run from handshake to completion, and its report.
//! * [`fault`]: the fault loop (demand path).
//! * [`bulk`]: the bulk receiver (precopy and push).
//! * `install`: page installation and fault completion, shared by both.
//! * [`planner`]: faults to ranges (prefetch, dedup).
//! * `uffd`: the typed userfaultfd (private: it writes to raw addresses).
//! * [`metrics`]: counters and latencies.
#![deny(unsafe_code)]

mod bulk;
mod fault;
pub mod guest;
mod install;
pub mod metrics;
pub mod pager;
pub mod planner;
mod uffd;

pub use guest::{DestGuest, GuestError};
pub use metrics::{PagerMetrics, Phase};
pub use pager::{Outcome, PagerConfig, PagerError, PagerReport, run};
pub use planner::{Prefetch, PrefetchMode};
pub use uffd::UffdError;
