//! The `postcopy` command: wires the pager, the sender, the transports and
//! the guests into migrations, and writes their reports.
//!
//! * [`adapters`]: guests as the pager and sender see them.
//! * [`report`]: the JSON report both sides write.
//! * [`cmd`]: the `dest`, `source` and `migrate` commands.
#![deny(unsafe_code)]

pub mod adapters;
pub mod cmd;
pub mod report;
