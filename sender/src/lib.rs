//! The source side of a postcopy migration (the sender).
//!
//! The sender pauses the guest, sends its state and the set of outstanding
//! pages, and after the destination resumes the guest it serves range
//! requests on the control connection (never behind background data) while a
//! pusher streams every other outstanding page on the bulk connection. It
//! keeps the guest's memory until the destination confirms it holds every
//! page, reconnecting after a broken link. The guest is reached only through
//! [`SourceGuest`].
//!
//! Leaves first:
//! * [`error`]: failures and what became of the guest; [`config`]: how it
//!   behaves; [`metrics`]: counters; `map`: guest memory spans.
//! * [`guest`]: the guest trait.
//! * [`precopy`]: precopy rounds and the switchover policy.
//! * `push`: the background pusher; `demand`: the demand server.
//! * [`reconnect`]: restoring a broken link.
//! * [`rdma`]: guest memory offered for the destination's RDMA reads.
//! * [`migration`]: the run, its failure phases and report.
#![deny(unsafe_code)]

pub mod config;
mod demand;
pub mod error;
pub mod guest;
mod map;
pub mod metrics;
pub mod migration;
pub mod precopy;
mod push;
pub mod rdma;
pub mod reconnect;

pub use config::SenderConfig;
pub use error::{FailPhase, SendFailure, SenderError};
pub use guest::{GuestError, SourceGuest, ZeroScan};
pub use metrics::SenderMetrics;
pub use migration::{SenderReport, run};
pub use precopy::{Policy, PrecopyReport, StopReason};
pub use reconnect::{Channel, Dial};
