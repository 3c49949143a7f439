//! The postcopy protocol crate: what goes on the wire and the rules both ends
//! follow, with no I/O.
//!
//! * [`types`]: the newtypes every crate shares (`PageIdx`, `GuestOffset`,
//!   `PageSize`, `HostAddr`, `ViewAddr`) and the guest memory layout ([`MemLayout`]).
//! * [`wire`]: frame header and message encoding/decoding. This module's doc is
//!   the normative byte-level specification.
//! * [`session`]: sans-IO state machines that decide which message is legal
//!   when, on each connection of each side.
//! * [`bitmap`]: page bitmaps, plain and atomic.
//! * [`stats`]: latency histograms and their summaries.
//! * [`auth`]: the optional pre-shared-key authentication of the hello.
#![forbid(unsafe_code)]

pub mod auth;
pub mod bitmap;
pub mod session;
pub mod stats;
pub mod types;
pub mod wire;

pub use bitmap::{AtomicPageBitmap, PageBitmap};
pub use stats::{LatencyHist, LatencySummary};
pub use types::{GuestOffset, HostAddr, LayoutError, MemLayout, PageIdx, PageRange, PageSize, RegionDesc, ViewAddr};
