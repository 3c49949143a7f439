//! The `postcopy` command: wires the pager, the sender, the transports and
//! the guests into migrations, and writes their reports.
//!
//! * [`adapters`]: guests as the pager and sender see them.
//! * [`report`]: the JSON report both sides write.
//! * [`cmd`]: the `dest`, `source` and `migrate` commands.
//! * [`timeline`]: the destination's counters over time.
//! * [`compare`], [`plot`]: `postcopy report`, tables and pictures of runs.
//! * [`netlab`]: the two-host lab (network namespaces, shaping, delay).
//! * [`lab`]: `postcopy lab`, grids of migrations.
//! * [`host`]: what this host's memory allows.
//! * [`relay`]: a fault-injecting frame relay (tests, `soak --cut-every`).
//! * [`soak`]: `postcopy soak`, one guest back and forth, judged by itself.

#![deny(unsafe_code)]

pub mod adapters;
pub mod cmd;
pub mod compare;
pub mod host;
pub mod lab;
pub mod netlab;
pub mod plot;
pub mod relay;
pub mod report;
pub mod snapshot;
pub mod soak;
pub mod timeline;
pub mod vmm_process;
