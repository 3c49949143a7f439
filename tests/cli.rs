//! End to end through the `postcopy` binary: real processes, real TCP on
//! loopback, real userfaultfd; every page verified; peers that die or lie.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, run_limited};
use postcopy::report::Report;
use proto::wire::{Msg, ServerHello};

/// Migrations use both cores: run them one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("postcopy-test-{}-{name}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn migrate(extra: &[&str], report: &Path) -> (Output, Report) {
    let mut c = bin();
    c.args(["migrate", "--quiet", "--run-before-ms", "300", "--run-after-ms", "300", "--report"])
        .arg(report)
        .args(extra);
    let out = run_limited(c, Duration::from_secs(120));
    let r = Report::read(report)
        .unwrap_or_else(|e| panic!("no report: {e}; stderr:\n{}", String::from_utf8_lossy(&out.stderr)));
    (out, r)
}

fn assert_clean(out: &Output, r: &Report) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {:?}\n{err}", r.error);
    assert_eq!(r.status, "ok", "{:?}", r.error);
    assert_eq!(r.guest.violations, 0, "{:?}", r.guest.problems);
    assert!(r.guest.verify_ok, "{:?}", r.guest.problems);
    assert_eq!(r.guest.verified_pages, r.postcopy.pages_total);
    // After switchover each outstanding page is installed exactly once.
    assert_eq!(r.postcopy.pages_pushed + r.postcopy.pages_demand, r.outstanding_pages, "each page installed once");
    assert!(r.guest.accesses > 0, "the guest ran on the destination");
    assert!(r.downtime_ms > 0.0 && r.total_time_ms > 0.0);
    let src = r.source.as_ref().expect("merged source report");
    assert_eq!(src.status, "ok");
    assert!(src.bytes_transferred >= r.postcopy.pages_total * 4096);
}

/// Start `postcopy dest` listening on a free port; returns it and its address.
fn spawn_dest(extra: &[&str]) -> (Child, String) {
    spawn_dest_with(&[&["--quiet"], extra].concat())
}

fn spawn_dest_with(extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(["dest", "--listen", "127.0.0.1:0", "--announce", "--accept-timeout-s", "20"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.strip_prefix("LISTENING ").expect("announce line").trim().to_string();
    (child, addr)
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("process did not exit within {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn pure_postcopy_every_pattern_256m() {
    let _g = SERIAL.lock();
    let d = scratch("patterns");
    for pattern in ["uniform", "sequential", "hotset:64M", "zipf:0.9"] {
        let report = d.join(format!("{}.json", pattern.replace(':', "_")));
        let (out, r) = migrate(&["--mem", "256M", "--vcpus", "2", "--pattern", pattern], &report);
        assert_clean(&out, &r);
        assert_eq!(r.pattern, pattern);
        assert_eq!(r.mem_bytes, 256 << 20);
        assert!(r.postcopy.faults > 0, "{pattern}: the guest faulted");
        assert!(r.postcopy.fault_latency_us.count > 0 && r.postcopy.fault_latency_us.p50 > 0.0);
        // Pretty JSON with the fields the issue names.
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        for k in ["status", "mode", "mem_bytes", "page_size", "total_time_ms", "downtime_ms", "bytes_transferred"] {
            assert!(v.get(k).is_some(), "report lacks {k}");
        }
        for k in ["pages_total", "pages_pushed", "pages_requested", "requests", "faults", "fault_latency_us"] {
            assert!(v["postcopy"].get(k).is_some(), "report lacks postcopy.{k}");
        }
        for k in ["p50", "p90", "p99", "max", "mean"] {
            assert!(v["postcopy"]["fault_latency_us"].get(k).is_some());
        }
        for k in ["accesses", "violations", "verified_pages"] {
            assert!(v["guest"].get(k).is_some(), "report lacks guest.{k}");
        }
    }
}

#[test]
fn regions_prefetch_and_key() {
    let _g = SERIAL.lock();
    let d = scratch("opts");
    let key = d.join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let (out, r) = migrate(
        &[
            "--mem",
            "100M",
            "--regions",
            "3",
            "--pattern",
            "sequential",
            "--prefetch",
            "16",
            "--prefetch-mode",
            "around",
            "--key-file",
            key.to_str().unwrap(),
        ],
        &d.join("r.json"),
    );
    assert_clean(&out, &r);
    assert_eq!(r.regions, 3);
    assert_eq!(r.prefetch.pages, 16);
    assert_eq!(r.prefetch.mode, "around");
    assert!(r.postcopy.pages_requested > r.postcopy.requests, "prefetch asks for more than the faulting pages");
}

#[test]
fn migrate_passes_the_destination_its_own_options() {
    let _g = SERIAL.lock();
    let d = scratch("destopts");
    let report = d.join("bg.json");
    let (out, r) = migrate(&["--mem", "128M", "--populate", "background", "--max-mem", "1G"], &report);
    assert_clean(&out, &r);
    // The destination's own limit reaches it: a guest above it is refused on the hello.
    let report = d.join("small.json");
    let (out, r) = migrate(&["--mem", "128M", "--max-mem", "64M"], &report);
    assert!(!out.status.success());
    assert_eq!(r.status, "failed");
    let err = r.error.unwrap_or_default();
    assert!(err.contains("exceeds the 67108864 bytes this destination accepts"), "{err}");
}

#[test]
fn source_killed_mid_run_fails_destination_after_the_recovery_window() {
    let _g = SERIAL.lock();
    let d = scratch("kill");
    // Not quiet: the progress line says when postcopy is under way.
    let report = d.join("dest.json");
    let (mut dest, addr) =
        spawn_dest_with(&["--report", report.to_str().unwrap(), "--recover-timeout", "3", "--peer-timeout-ms", "1000"]);
    let mut src = bin()
        .args(["source", "--connect", &addr, "--mem", "2G", "--push-run", "8", "--run-before-ms", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dest.stderr.take().unwrap()).lines();
    let t0 = Instant::now();
    let mut err_text = String::new();
    loop {
        let line = lines.next().expect("destination ended before postcopy began").unwrap();
        err_text += &line;
        if line.contains("pages present") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "postcopy never started");
    }
    src.kill().unwrap();
    // Keep draining the destination's stderr so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let _ = src.wait();
    let t0 = Instant::now();
    let out = wait_output(dest, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
    let err = drain.join().unwrap();
    assert!(err.contains("error") && err.contains("source"), "unclear message: {err_text}\n{err}");
    // It waited for the source to come back, said so, and says what was lost.
    assert!(err.contains("paused"), "{err}");
    assert!(err.contains("did not reconnect within 3s") && err.contains("pages never arrived"), "{err}");
    let r = Report::read(&d.join("dest.json")).unwrap();
    assert_eq!(r.status, "failed");
    assert!(r.error.is_some());
}

#[test]
fn garbage_and_oversized_frames_to_destination() {
    let _g = SERIAL.lock();
    for (name, bytes) in [
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("oversized", vec![12, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]),
        ("wrong magic hello", Msg::BulkHello { version: 1, session: 1, streams: 1 }.to_frame()),
    ] {
        let (dest, addr) = spawn_dest(&[]);
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut hello = [0u8; 36];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&bytes).unwrap();
        let out = wait_output(dest, Duration::from_secs(10));
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid frame") || err.contains("unexpected"), "{name}: {err}");
        // The destination told us why before closing.
        let mut rest = Vec::new();
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.read_to_end(&mut rest);
        let said = proto::wire::decode_frame(&rest, None).ok().flatten().map(|(m, _)| m.tag());
        assert_eq!(said, Some(proto::wire::Tag::Error), "{name}");
    }
}

/// A fake destination that sends `first` then whatever, to exercise the source.
fn fake_dest(first: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&first).unwrap();
        let mut sink = vec![0u8; 4096];
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (addr, t)
}

fn run_source(addr: &str, report: &Path) -> Output {
    let mut c = bin();
    c.args([
        "source",
        "--connect",
        addr,
        "--mem",
        "64M",
        "--run-before-ms",
        "100",
        "--run-after-ms",
        "200",
        "--report",
    ])
    .arg(report);
    run_limited(c, Duration::from_secs(30))
}

fn assert_guest_kept_on_source(out: &Output, report: &Path, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(err.contains("kept running on the source"), "{err}");
    let r = Report::read(report).unwrap();
    assert_eq!(r.status, "failed");
    assert!(r.guest.running_on_source && r.guest.verify_ok && r.guest.violations == 0, "{:?}", r.guest);
    assert!(r.guest.accesses_total > 0);
}

#[test]
fn source_survives_garbage_wrong_version_and_refusal() {
    let _g = SERIAL.lock();
    let d = scratch("src");
    let (addr, t) = fake_dest(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
    let out = run_source(&addr, &d.join("garbage.json"));
    assert_guest_kept_on_source(&out, &d.join("garbage.json"), "invalid frame");
    t.join().unwrap();

    let future =
        Msg::ServerHello(ServerHello { min_version: 50, max_version: 60, flags: 0, nonce: [0; 16] }).to_frame();
    let (addr, t) = fake_dest(future);
    let out = run_source(&addr, &d.join("version.json"));
    assert_guest_kept_on_source(&out, &d.join("version.json"), "versions 50..=60");
    t.join().unwrap();

    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = run_source(&closed, &d.join("refused.json"));
    assert_guest_kept_on_source(&out, &d.join("refused.json"), "connecting to the destination");
}

#[test]
fn unauthenticated_source_is_refused() {
    let _g = SERIAL.lock();
    let d = scratch("auth");
    let key = d.join("key");
    std::fs::write(&key, "right").unwrap();
    let wrong = d.join("wrong");
    std::fs::write(&wrong, "wrong").unwrap();
    for (name, src_key) in [("no key", None), ("wrong key", Some(&wrong))] {
        let (dest, addr) = spawn_dest(&["--key-file", key.to_str().unwrap()]);
        let mut c = bin();
        c.args(["source", "--connect", &addr, "--mem", "64M", "--run-before-ms", "50", "--run-after-ms", "50"]);
        if let Some(k) = src_key {
            c.arg("--key-file").arg(k);
        }
        let out = run_limited(c, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "{name}");
        let derr = String::from_utf8_lossy(&wait_output(dest, Duration::from_secs(10)).stderr).to_string();
        let serr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(derr.contains("not authenticated") || serr.contains("not authenticated"), "{name}: {derr} / {serr}");
    }
}

/// `dest --prepare-mem`: memory made ready before the source connects is
/// the guest's when the layouts match, and replaced by fresh memory when they
/// do not; either way every page arrives and verifies.
#[test]
fn prepared_memory_is_used_when_it_fits_and_replaced_when_not() {
    let _g = SERIAL.lock();
    let d = scratch("prepare");
    for (prepare, used) in [("128M", true), ("64M", false)] {
        let report = d.join(format!("prepare-{prepare}.json"));
        let (dest, addr) =
            spawn_dest(&["--prepare-mem", prepare, "--run-after-ms", "100", "--report", report.to_str().unwrap()]);
        let mut c = bin();
        c.args(["source", "--connect", &addr, "--mem", "128M", "--run-before-ms", "300", "--run-after-ms", "50"]);
        let out = run_limited(c, Duration::from_secs(60));
        let dout = wait_output(dest, Duration::from_secs(30));
        let derr = String::from_utf8_lossy(&dout.stderr);
        assert!(out.status.success() && dout.status.success(), "{prepare}: {derr}");
        let r = Report::read(&report).unwrap();
        assert!(
            r.guest.verify_ok && r.guest.verified_pages == r.postcopy.pages_total,
            "{prepare}: {:?}",
            r.guest.problems
        );
        assert_eq!(r.prepare_ms > 0.0, used, "{prepare}: prepared memory used");
        assert_eq!(derr.contains("prepared for another layout"), !used, "{prepare}: {derr}");
    }
    // migrate prepares by default; --no-prepare leaves it to the hello.
    for (extra, prepared) in [(&[][..], true), (&["--no-prepare"][..], false)] {
        let report = d.join(format!("migrate-{prepared}.json"));
        let (out, r) = migrate(&[&["--mem", "64M"], extra].concat(), &report);
        assert_clean(&out, &r);
        assert_eq!(r.prepare_ms > 0.0, prepared, "{extra:?}");
    }
}

#[test]
fn bad_command_lines_are_clear_errors() {
    for (args, needle) in [
        (vec!["migrate", "--mem", "12Q"], "--mem"),
        (vec!["migrate", "--pattern", "zipf:2"], "zipf theta"),
        (vec!["migrate", "--store-ratio", "1.5"], "--store-ratio"),
        (vec!["migrate", "--prefetch", "0"], "--prefetch"),
        (vec!["migrate", "--mem", "4K"], "--mem"),
        (vec!["migrate", "--tick-ms", "0"], "--tick-ms"),
        (vec!["migrate", "--link", "veth:fast"], "--link"),
        (vec!["dest", "--listen", "127.0.0.1:0", "--prepare-mem", "100000G"], "--prepare-mem"),
        (vec!["dest", "--listen", "127.0.0.1:0", "--prepare-mem", "64M", "--prepare-page-size", "8K"], "page size"),
        (
            vec!["dest", "--listen", "127.0.0.1:0", "--prepare-mem", "64M", "--vmm-uffd-socket", "/tmp/x"],
            "cannot be used",
        ),
        (
            vec!["source", "--connect", "127.0.0.1", "--mem", "1M", "--run-before-ms", "0", "--run-after-ms", "0"],
            "resolve",
        ),
    ] {
        let out = run_limited(
            {
                let mut c = bin();
                c.args(&args);
                c
            },
            Duration::from_secs(30),
        );
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn hybrid_with_a_hot_working_set() {
    let _g = SERIAL.lock();
    let d = scratch("hybrid");
    let (out, r) = migrate(
        &[
            "--mem",
            "512M",
            "--pattern",
            "hotset:64M",
            "--store-ratio",
            "0.9",
            "--mode",
            "hybrid",
            "--postcopy-after",
            "2",
        ],
        &d.join("hybrid.json"),
    );
    assert_clean(&out, &r);
    assert_eq!(r.mode, "hybrid");
    assert_eq!(r.precopy.rounds, 2);
    assert_eq!(r.precopy.dirty_pages.len(), 2, "a scan after each round");
    assert!(r.outstanding_pages > 0 && r.outstanding_pages < r.postcopy.pages_total, "{}", r.outstanding_pages);
    // The hot set is 64 MiB: what stayed outstanding is about it, not all memory.
    assert!(r.outstanding_pages <= (64 << 20) / 4096 + 1024, "{}", r.outstanding_pages);
    assert!(r.precopy.pages_sent >= r.postcopy.pages_total);
    assert!(r.precopy.pages_evicted > 0);
    // After switchover only outstanding pages travel.
    assert_eq!(r.postcopy.pages_pushed + r.postcopy.pages_demand, r.outstanding_pages);
}

#[test]
fn precopy_converges_on_a_quiet_guest() {
    let _g = SERIAL.lock();
    let d = scratch("precopy");
    let (out, r) = migrate(&["--mem", "256M", "--mode", "precopy", "--access-rate", "2000"], &d.join("precopy.json"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(r.clean(), "{:?}", r.error);
    assert_eq!(r.precopy.stop_reason, "converged");
    assert_eq!(r.outstanding_pages, 0);
    // Faults on pages held from precopy are mapped locally: nothing is asked for.
    assert_eq!(r.postcopy.requests, 0, "nothing left to ask the source for");
    assert_eq!(r.postcopy.pages_demand + r.postcopy.pages_pushed, 0);
    assert_eq!(r.guest.verified_pages, r.postcopy.pages_total);
}

#[test]
fn three_modes_on_the_same_guest() {
    let _g = SERIAL.lock();
    let d = scratch("modes");
    let guest = ["--mem", "256M", "--pattern", "hotset:32M", "--store-ratio", "0.9", "--seed", "7"];
    let mut outstanding = Vec::new();
    for (mode, extra) in
        [("postcopy", vec![]), ("hybrid", vec!["--postcopy-after", "1"]), ("precopy", vec!["--max-rounds", "3"])]
    {
        let args: Vec<&str> = guest.iter().copied().chain(["--mode", mode]).chain(extra).collect();
        let (out, r) = migrate(&args, &d.join(format!("{mode}.json")));
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(r.clean(), "{mode}: {:?} {:?}", r.error, r.guest.problems);
        assert_eq!(r.mode, mode);
        assert_eq!(r.guest.verified_pages, r.postcopy.pages_total, "{mode}");
        outstanding.push((mode, r.outstanding_pages, r.postcopy.pages_total, r.precopy.rounds));
    }
    let [(_, post, total, post_rounds), (_, hyb, _, hyb_rounds), (_, pre, _, pre_rounds)] = outstanding[..] else {
        unreachable!()
    };
    assert_eq!((post, post_rounds), (total, 0), "pure postcopy: everything outstanding, no rounds");
    assert!(hyb > 0 && hyb < total && hyb_rounds == 1, "hybrid: the dirty set outstanding ({hyb})");
    assert!(pre == 0 && pre_rounds >= 2, "precopy: nothing outstanding, a stop-and-copy round ({pre_rounds})");
}

#[test]
fn vm_guest_in_every_mode() {
    let _g = SERIAL.lock();
    let d = scratch("vm");
    let guest = ["--guest", "vm", "--mem", "256M", "--vcpus", "2", "--heartbeat-ms", "20"];
    for (mode, extra) in [
        ("postcopy", vec![]),
        ("hybrid", vec!["--pattern", "hotset:32M", "--postcopy-after", "1"]),
        ("precopy", vec!["--pattern", "hotset:8M", "--max-rounds", "4"]),
    ] {
        let args: Vec<&str> = guest.iter().copied().chain(["--mode", mode]).chain(extra).collect();
        let (out, r) = migrate(&args, &d.join(format!("{mode}.json")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {err}");
        assert!(r.clean(), "{mode}: {:?} {:?}", r.error, r.guest.problems);
        assert_eq!((r.guest_kind.as_str(), r.vcpus, r.mode.as_str()), ("vm", 2, mode));
        // Every page verified, including the boot image, and each vCPU's
        // counters replay from its generator (checked by `vm::verify`).
        assert_eq!(r.guest.verified_pages, r.postcopy.pages_total, "{mode}");
        assert_eq!(r.guest.violations, 0);
        // The console kept printing on the destination, on every vCPU.
        assert_eq!(r.guest.heartbeats.len(), 2, "{mode}");
        assert!(r.guest.heartbeats.iter().all(|&h| h >= 2), "{mode}: {:?}", r.guest.heartbeats);
        assert_eq!(r.postcopy.pages_pushed + r.postcopy.pages_demand, r.outstanding_pages, "{mode}");
        match mode {
            "postcopy" => {
                assert_eq!(r.outstanding_pages, r.postcopy.pages_total);
                assert!(r.postcopy.faults > 0 && r.postcopy.pages_demand > 0);
                // Both vCPUs faulted and their waits are reported by name.
                let names: Vec<&str> = r.postcopy.vcpu_blocktime_ms.keys().map(String::as_str).collect();
                assert_eq!(names, ["vcpu0", "vcpu1"], "{:?}", r.postcopy.vcpu_blocktime_ms);
                assert!(r.postcopy.vcpu_blocktime_ms.values().all(|&ms| ms > 0.0));
                let sum: f64 = r.postcopy.vcpu_blocktime_ms.values().sum();
                assert!((sum - r.postcopy.blocktime_ms).abs() < 1e-6 * sum.max(1.0));
            }
            "hybrid" => {
                // KVM's dirty log found the hot set: only it stayed outstanding.
                assert_eq!(r.precopy.rounds, 1);
                assert!(r.outstanding_pages > 0 && r.outstanding_pages < r.postcopy.pages_total / 2);
                assert!(r.precopy.pages_evicted > 0);
            }
            _ => {
                assert_eq!(r.outstanding_pages, 0);
                assert_eq!(r.postcopy.requests, 0);
            }
        }
    }
    // A VM whose migration fails before switchover keeps running on the source.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let report = d.join("refused.json");
    let mut c = bin();
    c.args(["source", "--connect", &closed, "--guest", "vm", "--mem", "64M", "--vcpus", "2"])
        .args(["--run-before-ms", "100", "--run-after-ms", "300", "--report"])
        .arg(&report);
    let out = run_limited(c, Duration::from_secs(30));
    assert_guest_kept_on_source(&out, &report, "connecting to the destination");
    let r = Report::read(&report).unwrap();
    assert!(r.guest.heartbeats.iter().all(|&h| h > 0), "{:?}", r.guest.heartbeats);
    assert_eq!(r.guest.verified_pages, (64 << 20) / 4096);
}
