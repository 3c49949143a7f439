//! `postcopy`: post-copy live migration of a guest's memory.

use clap::{Parser, Subcommand};

/// Post-copy live-migration paging engine.
#[derive(Parser, Debug)]
#[command(name = "postcopy", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate a guest on this machine: destination and source as two processes over loopback.
    Migrate(postcopy::cmd::MigrateArgs),
    /// Run the destination: listen, receive the guest, serve its faults.
    Dest(postcopy::cmd::DestArgs),
    /// Run the source: start the guest, connect to the destination, migrate it.
    Source(postcopy::cmd::SourceArgs),
    /// Compare runs: a table side by side, pictures with --plot.
    Report(postcopy::compare::ReportArgs),
    /// Run an experiment: a grid of migrations from a TOML spec, repeated, summarised and plotted.
    Lab(postcopy::lab::LabArgs),
    /// Migrate one guest back and forth, round after round, checking it each time.
    Soak(postcopy::soak::SoakArgs),
    /// Snapshot the VM guest to files (memory, vCPU state, region table), for `source --memory-file` and `vmm`.
    Snapshot(postcopy::vmm_process::SnapshotArgs),
    /// Restore a snapshot as a separate VMM whose memory a page-fault handler (`dest --vmm-uffd-socket`) serves.
    Vmm(postcopy::vmm_process::VmmArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("POSTCOPY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Migrate(a) => postcopy::cmd::migrate(a),
        Cmd::Dest(a) => postcopy::cmd::dest(a),
        Cmd::Source(a) => postcopy::cmd::source(a),
        Cmd::Report(a) => postcopy::compare::report(a),
        Cmd::Lab(a) => postcopy::lab::lab(a),
        Cmd::Soak(a) => postcopy::soak::soak(a),
        Cmd::Snapshot(a) => postcopy::vmm_process::snapshot(a),
        Cmd::Vmm(a) => postcopy::vmm_process::vmm(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("postcopy: error: {e:#}");
            std::process::exit(1);
        }
    }
}
