//! Kill -9 of either side at each phase (handshake, precopy, switchover,
//! post-copy, completion). The relay freezes the protocol at the phase (it
//! black-holes the link at a chosen frame), the victim is killed, and the
//! survivor must end in bounded time with a clear message: before
//! switchover the guest runs on, on the source; after it the survivor waits
//! out the recovery window and says what was lost; never a hang, never a
//! silent exit 0.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, wait_limited};
use postcopy::relay::{Action, Dir, Relay, Rule};

/// Migrations use both cores: one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Source,
    Dest,
}

fn spawn_dest() -> (Child, String) {
    common::spawn_quiet_dest(&["--peer-timeout-ms", "1000", "--recover-timeout", "3", "--run-after-ms", "200"])
}

/// Run a migration through a relay that freezes it at `rule`, kill the
/// victim there, and return the survivor's output and how long it took.
fn kill_at(mode: &str, rule: Rule, victim: Victim) -> (Output, Duration) {
    let (dest, addr) = spawn_dest();
    let relay = Relay::start(&addr, vec![rule]).unwrap();
    let src = bin()
        .args(["source", "--connect", &relay.addr, "--mem", "128M", "--vcpus", "1", "--mode", mode])
        .args(if mode == "hybrid" { &["--postcopy-after", "3"][..] } else { &[] })
        .args(["--push-run", "16", "--peer-timeout-ms", "1000", "--recover-timeout", "3"])
        .args(["--run-before-ms", "100", "--run-after-ms", "200"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut src = src;
    let mut dest = dest;
    while relay.fired() == 0 {
        // Either side ending first, or the phase never coming, fails at once
        // and says what each side printed.
        let ended = src.try_wait().unwrap().is_some() || dest.try_wait().unwrap().is_some();
        if ended || t0.elapsed() > Duration::from_secs(60) {
            let _ = src.kill();
            let _ = dest.kill();
            let s = src.wait_with_output().unwrap();
            let d = dest.wait_with_output().unwrap();
            panic!(
                "{rule:?}: the migration never reached the phase (after {:?}, counts {:?})\nsource {}:\n{}\ndest {}:\n{}",
                t0.elapsed(),
                relay.counts(),
                s.status,
                String::from_utf8_lossy(&s.stderr),
                d.status,
                String::from_utf8_lossy(&d.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut dead, survivor) = match victim {
        Victim::Source => (src, dest),
        Victim::Dest => (dest, src),
    };
    dead.kill().unwrap();
    let _ = dead.wait();
    let t_kill = Instant::now();
    let out = wait_limited(survivor, Duration::from_secs(40));
    (out, t_kill.elapsed())
}

fn rule(dir: Dir, tag: u8, kind: Option<u8>, nth: u64) -> Rule {
    Rule { dir, tag, kind, nth, after: false, action: Action::Blackhole }
}

fn check(what: &str, out: &Output, took: Duration, exit_ok: bool, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.success(), exit_ok, "{what}: exit {:?}\n{err}", out.status);
    assert!(out.status.code().is_some(), "{what}: the survivor died of a signal\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: expected {n:?} in:\n{err}");
    }
    assert!(took < Duration::from_secs(30), "{what}: took {took:?}");
}

const HELLO_ACK: u8 = 3;
const SWITCHOVER: u8 = 9;
const PAGES: u8 = 12;
const COMPLETE: u8 = 14;

#[test]
fn kill_before_switchover_leaves_the_guest_on_the_source() {
    let _g = SERIAL.lock();
    for (phase, mode, r) in [
        ("handshake", "postcopy", rule(Dir::ToSource, HELLO_ACK, None, 1)),
        // Precopy goes on while the kill happens (a black hole would let it
        // run into the switchover): mark the phase only.
        ("precopy", "hybrid", Rule { action: Action::Mark, ..rule(Dir::ToDest, PAGES, Some(3), 40) }),
    ] {
        // The destination dies: the source says so and the guest runs on there, verified.
        let (out, took) = kill_at(mode, r, Victim::Dest);
        check(&format!("{phase}, dest killed"), &out, took, false, &["kept running on the source", "passed"]);
        // The source dies: the destination had nothing committed and ends at once.
        let (out, took) = kill_at(mode, r, Victim::Source);
        check(&format!("{phase}, source killed"), &out, took, false, &["error", "source"]);
        assert!(took < Duration::from_secs(10), "{phase}: the destination took {took:?}");
    }
}

#[test]
fn kill_during_switchover_is_never_resolved_by_guessing() {
    let _g = SERIAL.lock();
    // The guest state is on the destination, the Switchover frame is not.
    let r = rule(Dir::ToDest, SWITCHOVER, None, 1);
    // The destination dies: the source cannot know whether it resumed the
    // guest, so after the window the guest stays paused, its memory kept.
    let (out, took) = kill_at("postcopy", r, Victim::Dest);
    check("switchover, dest killed", &out, took, false, &["paused on the source and its memory kept", "reconnect"]);
    // The source dies: the destination waits the window for it to ask, then
    // cancels (it never resumed the guest).
    let (out, took) = kill_at("postcopy", r, Victim::Source);
    check("switchover, source killed", &out, took, false, &["cancelled before switchover"]);
}

#[test]
fn kill_after_switchover_waits_out_the_window_and_says_what_was_lost() {
    let _g = SERIAL.lock();
    let r = rule(Dir::ToDest, PAGES, Some(2), 30);
    let (out, took) = kill_at("postcopy", r, Victim::Source);
    check(
        "post-copy, source killed",
        &out,
        took,
        false,
        &["paused", "did not reconnect within 3s", "pages never arrived"],
    );
    let (out, took) = kill_at("postcopy", r, Victim::Dest);
    check("post-copy, dest killed", &out, took, false, &["could not reconnect to the destination within 3s"]);
    // Completion: the destination holds every page when the source dies, so
    // it finishes (saying the source never confirmed); a source whose
    // destination dies before it heard Complete cannot know that.
    let r = rule(Dir::ToSource, COMPLETE, None, 1);
    let (out, took) = kill_at("postcopy", r, Victim::Source);
    check("completion, source killed", &out, took, true, &["did not come back to acknowledge completion"]);
    let (out, took) = kill_at("postcopy", r, Victim::Dest);
    check("completion, dest killed", &out, took, false, &["could not reconnect"]);
}
