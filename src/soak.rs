//! `postcopy soak`: one guest migrated back and forth on this machine,
//! round after round, judged by the guest itself.
//!
//! Each round runs a destination (the pager, in a thread of its own, on a
//! fresh loopback listener) and a source (the sender, on the guest as it is
//! now) over real TCP, optionally through the fault-injecting relay that
//! resets every connection once in the round (`--cut-every K`). The guest
//! continues across rounds: after a round the destination's guest is the
//! next round's source. Each round is judged twice: the copy the guest left
//! behind (frozen at the pause) is verified page by page against the state
//! that was sent (and, for the VM, each vCPU's generator is replayed), and
//! the guest's life counters must have grown. The soak stops at the first
//! failure or violation and keeps that round's record; the last guest is
//! stopped and verified on the host it ended on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use guest::{Backing, GuestMemory, Workload};
use pager::{PagerConfig, PagerMetrics};
use proto::session::DestExpect;
use proto::wire::Mode;
use sender::{FailPhase, SenderConfig, SenderMetrics};
use serde::{Deserialize, Serialize};
use transport::Conn;
use transport::tcp::{TcpConn, TcpListen, TcpOptions};

use crate::adapters::{DestAny, GuestSummary, Populate, SourceAny, VmSource, WorkloadSource};
use crate::cmd::{GuestArg, GuestOpts};
use crate::relay::{Action, Dir, Relay, Rule};
use crate::report::ms;

/// `postcopy soak`.
#[derive(Args, Clone, Debug)]
pub struct SoakArgs {
    /// Migrations to run (A to B, B to A, ...).
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Guest options (`--mem` defaults to 1G; a soak usually wants 64M).
    #[command(flatten)]
    pub guest: GuestOpts,
    /// Modes to cycle through, comma-separated (postcopy, hybrid, precopy).
    #[arg(long, default_value = "postcopy")]
    pub modes: String,
    /// Reset every connection once in every K-th round (0: never).
    #[arg(long, default_value_t = 0)]
    pub cut_every: u32,
    /// Write the summary (JSON) here; a failed round's record goes beside it.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Let the guest run this long on each host before it moves on.
    #[arg(long, default_value_t = 100)]
    pub run_ms: u64,
    /// A peer silent for this many milliseconds is presumed dead.
    #[arg(long, default_value_t = 1000)]
    pub peer_timeout_ms: u64,
    /// Seconds a broken link may stay broken before a round gives up.
    #[arg(long, default_value_t = 30)]
    pub recover_timeout: u64,
    /// No line per round.
    #[arg(long)]
    pub quiet: bool,
}

/// One round, as the summary records it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SoakRound {
    /// From 1.
    pub round: u32,
    /// Mode of this round.
    pub mode: String,
    /// "A->B" or "B->A".
    pub direction: String,
    /// "ok" or "failed".
    pub status: String,
    /// What went wrong.
    pub error: Option<String>,
    /// Whether the relay cut the link in this round, and how often it did.
    pub cuts: u64,
    /// Recoveries the destination counted.
    pub recoveries: u64,
    /// Connect to completion acknowledged (source).
    pub total_ms: f64,
    /// Pause to resume.
    pub downtime_ms: f64,
    /// Fault latency, destination view.
    pub fault_p99_us: f64,
    /// Faults served over the network.
    pub faults: u64,
    /// The guest's accesses over its life, at the pause.
    pub accesses_total: u64,
    /// Violations the guest counted over its life, at the pause.
    pub violations: u64,
    /// Pages of the frozen copy verified.
    pub verified_pages: u64,
}

/// The soak's summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SoakReport {
    /// Rounds that passed.
    pub rounds: u32,
    /// Rounds that failed (the soak stops at the first).
    pub failed_rounds: u32,
    /// Violations the guest counted over its whole life.
    pub violations: u64,
    /// Guest kind.
    pub guest: String,
    /// Guest memory.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Modes cycled.
    pub modes: Vec<String>,
    /// Cut period.
    pub cut_every: u32,
    /// Whole soak.
    pub total_time_ms: f64,
    /// The guest's final verification (on the host it ended on).
    pub final_verify_ok: bool,
    /// Pages verified at the end.
    pub final_verified_pages: u64,
    /// Every round.
    pub per_round: Vec<SoakRound>,
}

fn parse_modes(s: &str) -> Result<Vec<Mode>> {
    s.split(',')
        .map(|m| match m.trim() {
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            "precopy" => Ok(Mode::Precopy),
            other => Err(anyhow!("--modes: unknown mode {other:?} (postcopy, hybrid, precopy)")),
        })
        .collect()
}

/// The relay's cut for a round of `mode`: mid-push after switchover, or for
/// precopy (no push) the switchover acknowledgement, lost with the link, so
/// the source is in doubt until the resume settles it.
fn cut_rule(mode: Mode) -> Rule {
    match mode {
        Mode::Postcopy | Mode::Hybrid => {
            Rule { dir: Dir::ToDest, tag: 12, kind: Some(2), nth: 16, after: true, action: Action::Reset }
        }
        Mode::Precopy => Rule { dir: Dir::ToSource, tag: 10, kind: None, nth: 1, after: false, action: Action::Reset },
    }
}

/// Run the soak. Returns the exit code.
pub fn soak(args: &SoakArgs) -> Result<i32> {
    let modes = parse_modes(&args.modes)?;
    let layout = args.guest.layout()?;
    args.guest.check()?;
    // The guest lives on two "hosts" at once during a round.
    crate::host::check_room(layout.len_bytes().saturating_mul(2), "a soak (two copies of the guest)")?;
    let pause_timeout = Duration::from_secs(5);
    let mut guest = match args.guest.guest {
        GuestArg::Workload => {
            let mem = Arc::new(GuestMemory::new(layout.clone())?);
            SourceAny::Workload(WorkloadSource::new(Workload::boot(mem, args.guest.workload()?)?, pause_timeout))
        }
        GuestArg::Vm => SourceAny::Vm(
            VmSource::boot(layout.clone(), args.guest.vm()?, pause_timeout)
                .map_err(|e| anyhow!("booting the VM guest: {e}"))?,
        ),
    };
    let kind = guest.kind();
    let peer_timeout = Duration::from_millis(args.peer_timeout_ms.max(100));
    let recover_timeout = Duration::from_secs(args.recover_timeout);
    let mut report = SoakReport {
        guest: crate::cmd::guest_name(kind),
        mem_bytes: layout.len_bytes(),
        vcpus: args.guest.vcpus,
        modes: modes.iter().map(|m| m.name().to_string()).collect(),
        cut_every: args.cut_every,
        ..SoakReport::default()
    };
    let t0 = Instant::now();
    let mut last_accesses = 0;
    // Where each VM vCPU's generator was last verified: each round replays
    // only its own accesses.
    let mut checkpoints = Vec::new();
    for i in 0..args.count {
        let mode = modes[i as usize % modes.len()];
        let cut = args.cut_every > 0 && (i + 1) % args.cut_every == 0;
        std::thread::sleep(Duration::from_millis(args.run_ms));
        let mut round = SoakRound {
            round: i + 1,
            mode: mode.name().into(),
            direction: if i % 2 == 0 { "A->B".into() } else { "B->A".into() },
            ..SoakRound::default()
        };
        let t = Timeouts { peer: peer_timeout, recover: recover_timeout, pause: pause_timeout };
        let (outcome, next) = run_round(guest, mode, cut, t, &mut round, &mut checkpoints);
        let failed = outcome.is_err() || round.violations > 0 || round.accesses_total <= last_accesses;
        if let Err(e) = &outcome {
            round.error = Some(format!("{e:#}"));
        } else if round.accesses_total <= last_accesses {
            round.error = Some(format!(
                "the guest's life counters did not grow: {} accesses after {last_accesses}",
                round.accesses_total
            ));
        }
        last_accesses = round.accesses_total;
        round.status = if failed { "failed".into() } else { "ok".into() };
        if !args.quiet {
            eprintln!(
                "soak round {:4} {} {:8} {:6}: total {:7.1} ms, downtime {:6.2} ms, fault p99 {:7.1} us, {} cuts, {} recoveries{}",
                round.round,
                round.direction,
                round.mode,
                round.status,
                round.total_ms,
                round.downtime_ms,
                round.fault_p99_us,
                round.cuts,
                round.recoveries,
                round.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        report.violations = report.violations.max(round.violations);
        let record = round.clone();
        report.per_round.push(round);
        match next {
            Some(g) if !failed => {
                report.rounds += 1;
                guest = g;
            }
            rest => {
                report.failed_rounds += 1;
                if let Some(p) = &args.report {
                    let keep = p.with_extension(format!("round-{}.json", record.round));
                    std::fs::write(&keep, serde_json::to_string_pretty(&record)?)
                        .with_context(|| format!("writing {}", keep.display()))?;
                }
                if let Some(g) = rest {
                    finish_into(g, &mut report, &mut checkpoints);
                }
                return write(args, report, t0).map(|()| 1);
            }
        }
    }
    finish_into(guest, &mut report, &mut checkpoints);
    let ok = report.failed_rounds == 0 && report.final_verify_ok && report.violations == 0;
    write(args, report, t0)?;
    Ok(if ok { 0 } else { 1 })
}

fn finish_into(g: SourceAny, report: &mut SoakReport, checkpoints: &mut Vec<guest::vm::GenCheckpoint>) {
    let s = g.finish_from(checkpoints);
    report.final_verify_ok = s.verify_ok && s.violations == 0;
    report.final_verified_pages = s.verified_pages;
    report.violations = report.violations.max(s.violations);
    if !s.problems.is_empty() {
        eprintln!("soak: the guest's final check: {}", s.problems.join("; "));
    }
}

fn write(args: &SoakArgs, mut report: SoakReport, t0: Instant) -> Result<()> {
    report.total_time_ms = ms(t0.elapsed());
    if let Some(p) = &args.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !args.quiet {
        eprintln!(
            "soak: {} rounds passed, {} failed, {} violations, final verification {} ({} pages), {:.1} s",
            report.rounds,
            report.failed_rounds,
            report.violations,
            if report.final_verify_ok { "passed" } else { "FAILED" },
            report.final_verified_pages,
            report.total_time_ms / 1000.0
        );
    }
    Ok(())
}

/// One migration of `guest`. Returns the outcome and the guest to go on
/// with: the destination's on success, the source's when the migration
/// failed before switchover (it runs on there), none when it is lost.
/// The soak's timeouts.
#[derive(Clone, Copy)]
struct Timeouts {
    peer: Duration,
    recover: Duration,
    pause: Duration,
}

fn run_round(
    mut guest: SourceAny,
    mode: Mode,
    cut: bool,
    t: Timeouts,
    round: &mut SoakRound,
    checkpoints: &mut Vec<guest::vm::GenCheckpoint>,
) -> (Result<()>, Option<SourceAny>) {
    let opts = TcpOptions { send_timeout: t.peer, ..TcpOptions::default() };
    let listener = match TcpListen::bind("127.0.0.1:0", opts.clone()) {
        Ok(l) => l,
        Err(e) => return (Err(e.into()), Some(guest)),
    };
    let dest_addr = listener.local_addr().to_string();
    let relay = if cut {
        match Relay::start(&dest_addr, vec![cut_rule(mode)]) {
            Ok(r) => Some(r),
            Err(e) => return (Err(e.into()), Some(guest)),
        }
    } else {
        None
    };
    let addr = relay.as_ref().map_or_else(|| dest_addr.clone(), |r| r.addr.clone());
    let kind = guest.kind();
    let pm = Arc::new(PagerMetrics::default());
    let pcfg = PagerConfig {
        expect: DestExpect { max_mem_bytes: crate::host::default_max_mem().ok(), ..Default::default() },
        peer_timeout: t.peer,
        recover_timeout: t.recover,
        ..PagerConfig::default()
    };
    let dest = {
        let pm = Arc::clone(&pm);
        std::thread::Builder::new().name("soak-dest".into()).spawn(move || {
            let control = listener.accept(Instant::now() + Duration::from_secs(30))?;
            pager::run(
                Box::new(control),
                &listener,
                |acc, cancel| {
                    DestAny::new(kind, acc.layout.clone(), Backing::Anonymous, Populate::Before, cancel)
                        .map_err(|e| pager::GuestError::Memory(Box::new(e)))
                },
                &pcfg,
                pm,
            )
            .map_err(anyhow::Error::new)
        })
    };
    let dest = match dest {
        Ok(t) => t,
        Err(e) => return (Err(e.into()), Some(guest)),
    };
    let scfg = SenderConfig {
        mode,
        peer_timeout: t.peer,
        recover_timeout: t.recover,
        policy: sender::Policy { postcopy_after: Some(1), ..Default::default() },
        ..SenderConfig::default()
    };
    let sm = Arc::new(SenderMetrics::default());
    let sent = TcpConn::connect(&addr, Duration::from_secs(10), &opts).map_err(anyhow::Error::new).and_then(|c| {
        let bulk_opts = TcpOptions { notsent_lowat: Some(256 * 1024), ..opts.clone() };
        let mut dial = |ch: sender::Channel| {
            let o = if ch == sender::Channel::Bulk { &bulk_opts } else { &opts };
            TcpConn::connect(&addr, Duration::from_secs(2), o).map(|c| Box::new(c) as Box<dyn Conn>)
        };
        let r = match &mut guest {
            SourceAny::Workload(g) => sender::run(Box::new(c), &mut dial, g, &scfg, Arc::clone(&sm)),
            SourceAny::Vm(g) => sender::run(Box::new(c), &mut dial, g, &scfg, Arc::clone(&sm)),
            SourceAny::Snapshot(g) => sender::run(Box::new(c), &mut dial, g, &scfg, Arc::clone(&sm)),
        };
        r.map_err(|f| (f.phase, f)).map_err(|(phase, f)| anyhow::Error::new(f).context(format!("{phase:?}")))
    });
    let dest = dest.join().map_err(|_| anyhow!("the destination thread panicked")).and_then(|r| r);
    round.cuts = relay.as_ref().map_or(0, Relay::fired);
    round.recoveries = PagerMetrics::get(&pm.recoveries);
    drop(relay);
    match (sent, dest) {
        (Ok(s), Ok(d)) => {
            round.total_ms = ms(s.total_time);
            round.downtime_ms = ms(s.downtime);
            let f = d.report.fault_latency.summary();
            round.fault_p99_us = f.p99;
            round.faults = f.count;
            // The copy the guest left here, frozen at the pause: every page
            // against the state that was sent, generators replayed.
            let frozen: GuestSummary = guest.finish_from(checkpoints);
            round.accesses_total = frozen.accesses_total;
            round.violations = frozen.violations;
            round.verified_pages = frozen.verified_pages;
            if !frozen.verify_ok {
                let e = anyhow!("the frozen copy failed verification: {}", frozen.problems.join("; "));
                return (Err(e), d.guest.into_source(t.pause));
            }
            match d.guest.into_source(t.pause) {
                Some(g) => (Ok(()), Some(g)),
                None => (Err(anyhow!("the destination never resumed the guest")), None),
            }
        }
        (Err(e), Ok(d)) => {
            // The guest runs on the destination: go on with it there.
            (Err(e.context("source")), d.guest.into_source(t.pause))
        }
        (Err(e), Err(_)) => {
            let before = e.to_string().contains(&format!("{:?}", FailPhase::BeforeSwitchover));
            // Before switchover the guest runs on here; otherwise it is lost.
            (Err(e), before.then_some(guest))
        }
        (Ok(_), Err(e)) => (Err(e.context("destination")), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_cut_rules_exist_for_each() {
        assert_eq!(parse_modes("postcopy, hybrid,precopy").unwrap(), vec![Mode::Postcopy, Mode::Hybrid, Mode::Precopy]);
        assert!(parse_modes("postcopy,warp").is_err());
        assert_eq!(cut_rule(Mode::Precopy).tag, 10);
        assert_eq!(cut_rule(Mode::Hybrid).kind, Some(2));
    }

    #[test]
    fn report_round_trips() {
        let r = SoakReport {
            rounds: 3,
            per_round: vec![SoakRound { round: 1, ..Default::default() }],
            ..Default::default()
        };
        let back: SoakReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.rounds, 3);
        assert_eq!(back.per_round.len(), 1);
    }
}
