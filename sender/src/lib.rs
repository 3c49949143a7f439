//! The source side of a postcopy migration (the sender).
//!
//! The sender pauses the guest, sends its state and the set of outstanding
//! pages, and after the destination resumes the guest it serves range
//! requests on the control connection (never behind background data) while a
//! pusher streams every other outstanding page on the bulk connection. It
//! keeps the guest's memory until the destination confirms it holds every
//! page. The guest is reached only through [`SourceGuest`].
//!
//! * [`sender`]: the run, its failure phases and report.
//! * [`precopy`]: precopy rounds and the switchover policy.
//! * `push`: the background pusher; `map`: guest memory spans.
//! * [`guest`]: the guest trait; [`metrics`]: counters.
#![deny(unsafe_code)]

pub mod guest;
mod map;
pub mod metrics;
pub mod precopy;
mod push;
pub mod sender;

pub use guest::{GuestError, SourceGuest};
pub use metrics::SenderMetrics;
pub use precopy::{Policy, PrecopyReport, StopReason};
pub use sender::{FailPhase, SendFailure, SenderConfig, SenderError, SenderReport, run};
