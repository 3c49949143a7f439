//! The `dest`, `source` and `migrate` commands, one room each:
//!
//! * [`args`]: argument types, their checks, `to_args` for child processes;
//! * `progress`: progress lines and the bar;
//! * `dest`, `source`: one side each;
//! * `migrate`: both sides as child processes, reports merged.
//!
//! Report building and the summary live with the report types
//! (`crate::report`).

pub mod args;
mod dest;
mod migrate;
mod progress;
mod source;

pub use crate::report::{guest_name, summary};
pub use args::{
    DestArgs, DestOpts, GuestArg, GuestOpts, MemoryArg, MigrateArgs, MigrationOpts, ModeArg, PopulateArg,
    PrefetchModeArg, SourceArgs, TimelineOpts,
};
pub use dest::dest;
pub use migrate::{check_migrate, migrate, stop_on_signals};
pub use source::source;
