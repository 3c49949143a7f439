//! Surviving the network, end to end through the `postcopy` binary: a
//! fault-injecting relay between source and destination cuts every
//! connection (resets) or black-holes it at chosen frames, before, during
//! and after switchover and during the completion exchange, several times
//! per migration, with both guests; each migration must end with zero
//! violations and every page verified, or (before switchover) with the
//! guest running on, verified, on the source.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

mod common;

use common::{bin, wait_limited};
use postcopy::relay::{Action, Dir, Relay, Rule};
use postcopy::report::Report;

/// Migrations use both cores: run them one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

const SWITCHOVER: u8 = 9;
const SWITCHOVER_ACK: u8 = 10;
const RANGE_REQUEST: u8 = 11;
const PAGES: u8 = 12;
const COMPLETE: u8 = 14;
const PUSH: Option<u8> = Some(2);
const PRECOPY: Option<u8> = Some(3);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("postcopy-survive-{}-{name}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn spawn_dest(report: &Path) -> (Child, String) {
    let report = report.to_str().expect("utf-8 path");
    let timeouts = ["--peer-timeout-ms", "1000", "--recover-timeout", "30", "--run-after-ms", "300"];
    common::spawn_quiet_dest(&[&timeouts[..], &["--report", report]].concat())
}

struct Run {
    dest: Report,
    src: Report,
    dest_ok: bool,
    src_ok: bool,
    dest_err: String,
    src_err: String,
}

fn migrate_through(name: &str, guest: &str, mode: &str, rules: Vec<Rule>) -> (Run, u64) {
    migrate_through_with(name, guest, mode, rules, &[])
}

/// As [`migrate_through`], the source taking `extra` options too.
fn migrate_through_with(name: &str, guest: &str, mode: &str, rules: Vec<Rule>, extra: &[&str]) -> (Run, u64) {
    let d = scratch(name);
    let (dest_report, src_report) = (d.join("dest.json"), d.join("src.json"));
    let (dest, addr) = spawn_dest(&dest_report);
    let relay = Relay::start(&addr, rules).unwrap();
    let src = bin()
        .args(["source", "--connect", &relay.addr, "--guest", guest, "--mem", "128M", "--vcpus", "2"])
        .args(["--mode", mode, "--push-run", "64"])
        .args(if mode == "hybrid" { &["--postcopy-after", "1"][..] } else { &[] })
        .args(["--peer-timeout-ms", "1000", "--recover-timeout", "30"])
        .args(["--run-before-ms", "200", "--run-after-ms", "300"])
        .args(extra)
        .arg("--report")
        .arg(&src_report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let src_out = wait_limited(src, Duration::from_secs(90));
    let dest_out = wait_limited(dest, Duration::from_secs(60));
    let fired = relay.fired();
    drop(relay);
    let read = |p: &Path, err: &[u8]| {
        Report::read(p)
            .unwrap_or_else(|e| panic!("{name}: no report {}: {e}\n{}", p.display(), String::from_utf8_lossy(err)))
    };
    let run = Run {
        dest: read(&dest_report, &dest_out.stderr),
        src: read(&src_report, &src_out.stderr),
        dest_ok: dest_out.status.success(),
        src_ok: src_out.status.success(),
        dest_err: String::from_utf8_lossy(&dest_out.stderr).into_owned(),
        src_err: String::from_utf8_lossy(&src_out.stderr).into_owned(),
    };
    (run, fired)
}

fn assert_recovered(name: &str, r: &Run, fired: u64, at_least: u64) {
    let ctx = || format!("{name}: dest: {}\nsource: {}", r.dest_err, r.src_err);
    assert!(fired >= at_least, "{name}: only {fired} cuts happened\n{}", ctx());
    assert!(r.dest_ok && r.src_ok, "{}", ctx());
    assert_eq!(r.dest.status, "ok", "{:?}\n{}", r.dest.error, ctx());
    assert_eq!(r.dest.guest.violations, 0, "{:?}", r.dest.guest.problems);
    assert!(r.dest.guest.verify_ok, "{:?}", r.dest.guest.problems);
    assert_eq!(r.dest.guest.verified_pages, r.dest.postcopy.pages_total, "{}", ctx());
    assert!(r.dest.guest.heartbeats_ok, "{name}: the guest stopped reporting");
    assert!(r.dest.postcopy.recoveries >= 1, "{name}: no recovery counted\n{}", ctx());
    assert_eq!(r.src.status, "ok", "{:?}", r.src.error);
    assert!(r.src.postcopy.recoveries >= 1, "{name}: the source counted no recovery");
    assert!(r.dest.postcopy.paused_ms > 0.0 && r.src.postcopy.paused_ms > 0.0, "{name}");
}

/// A relay rule, positionally.
fn r(dir: Dir, tag: u8, kind: Option<u8>, nth: u64, after: bool, action: Action) -> Rule {
    Rule { dir, tag, kind, nth, after, action }
}

/// Cuts after switchover, each in a place of its own.
fn post_switchover_cases() -> Vec<(&'static str, Vec<Rule>, u64)> {
    vec![
        (
            // The switchover reaches the destination, the link dies before the
            // acknowledgement comes back: the source is in doubt.
            "switchover ack lost",
            vec![r(Dir::ToSource, SWITCHOVER_ACK, None, 1, false, Action::Reset)],
            1,
        ),
        (
            // Several resets during the push and demand serving.
            "three resets mid-push",
            vec![
                r(Dir::ToDest, PAGES, PUSH, 40, true, Action::Reset),
                r(Dir::ToDest, PAGES, PUSH, 200, true, Action::Reset),
                r(Dir::ToSource, RANGE_REQUEST, None, 150, true, Action::Reset),
            ],
            2,
        ),
        (
            // Traffic stops without a close: only liveness notices.
            "black hole mid-push",
            vec![r(Dir::ToDest, PAGES, PUSH, 60, true, Action::Blackhole)],
            1,
        ),
        (
            // Every page is there and Complete went out; the ack is lost.
            "completion exchange cut",
            vec![r(Dir::ToSource, COMPLETE, None, 1, true, Action::Reset)],
            1,
        ),
    ]
}

fn survive_after_switchover(guest: &str) {
    let _g = SERIAL.lock();
    for (name, rules, at_least) in post_switchover_cases() {
        let label = format!("{guest}: {name}");
        let (run, fired) = migrate_through(&label.replace([' ', ':'], "_"), guest, "postcopy", rules);
        if name == "completion exchange cut" {
            // The source may have sent its acknowledgement into the cut; if
            // it did, the destination finishes without it after a grace.
            let ctx = format!("{label}: dest: {}\nsource: {}", run.dest_err, run.src_err);
            assert!(fired >= 1 && run.dest_ok && run.src_ok, "{ctx}");
            assert_eq!(run.dest.guest.violations, 0);
            assert!(
                run.dest.guest.verify_ok && run.dest.guest.verified_pages == run.dest.postcopy.pages_total,
                "{ctx}"
            );
            continue;
        }
        assert_recovered(&label, &run, fired, at_least);
    }
}

#[test]
fn workload_guest_survives_cuts_after_switchover() {
    survive_after_switchover("workload");
}

#[test]
fn vm_guest_survives_cuts_after_switchover() {
    survive_after_switchover("vm");
}

#[test]
fn hybrid_survives_a_cut_during_switchover_and_the_push() {
    let _g = SERIAL.lock();
    // The Switchover frame is lost with the link (reset before it is
    // forwarded): the destination holds the guest state, not the switchover;
    // the source is in doubt, asks, is told "not switched", and resumes the
    // guest. Nothing runs twice.
    let (run, fired) = migrate_through(
        "hybrid_switchover_lost",
        "workload",
        "hybrid",
        vec![r(Dir::ToDest, SWITCHOVER, None, 1, false, Action::Reset)],
    );
    let ctx = format!("dest: {}\nsource: {}", run.dest_err, run.src_err);
    assert_eq!(fired, 1, "{ctx}");
    assert!(!run.dest_ok && !run.src_ok, "{ctx}");
    assert!(run.src.guest.running_on_source && run.src.guest.verify_ok && run.src.guest.violations == 0, "{ctx}");
    assert!(run.src_err.contains("had not switched over"), "{ctx}");
    assert!(run.dest_err.contains("cancelled before switchover"), "{ctx}");
    // A hybrid migration cut during precopy and during the push.
    let (run, fired) = migrate_through(
        "hybrid_precopy_cut",
        "workload",
        "hybrid",
        vec![r(Dir::ToDest, PAGES, PRECOPY, 100, true, Action::Reset)],
    );
    let ctx = format!("dest: {}\nsource: {}", run.dest_err, run.src_err);
    assert_eq!(fired, 1, "{ctx}");
    // Before switchover a broken link cancels: the guest runs on, on the source.
    assert!(!run.src_ok && run.src.guest.running_on_source && run.src.guest.verify_ok, "{ctx}");
    assert_eq!(run.src.guest.violations, 0);
    let (run, fired) = migrate_through(
        "hybrid_push_cut",
        "workload",
        "hybrid",
        vec![r(Dir::ToDest, PAGES, PUSH, 30, true, Action::Reset)],
    );
    assert_recovered("hybrid push cut", &run, fired, 1);
}

/// With several push streams a reset mid-push cuts every connection; the
/// sides reconnect (with one stream, as after any broken link) and every
/// page still arrives.
#[test]
fn several_push_streams_survive_resets_mid_push() {
    let _g = SERIAL.lock();
    let (run, fired) = migrate_through_with(
        "streams_push_cut",
        "workload",
        "postcopy",
        vec![
            r(Dir::ToDest, PAGES, PUSH, 40, true, Action::Reset),
            r(Dir::ToDest, PAGES, PUSH, 300, true, Action::Reset),
        ],
        &["--push-streams", "3"],
    );
    assert_recovered("streams push cut", &run, fired, 2);
    assert_eq!(run.dest.postcopy.push_streams, 3, "the first link carried three streams");
}
