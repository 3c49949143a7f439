//! Whole migrations with post-copy pages moved by RDMA READs over the
//! software verbs device, through the CLI, in real processes: every mode,
//! both guests, both destination backends; RDMA where there is none; a
//! side that does not speak it; a peer killed mid-run.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, run_limited, wait_limited};

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn migrations_over_the_software_rdma_device_in_every_mode_with_both_guests() {
    let dir = std::env::temp_dir().join(format!("postcopy-rdma-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, guest, memory, background) in [
        ("postcopy", "workload", "shmem", "read"),
        ("postcopy", "workload", "anon", "read"),
        ("hybrid", "workload", "shmem", "read"),
        ("precopy", "workload", "anon", "read"),
        ("postcopy", "vm", "shmem", "read"),
        ("hybrid", "vm", "anon", "read"),
        ("postcopy", "workload", "shmem", "write"),
        ("hybrid", "vm", "shmem", "write"),
    ] {
        let what = format!("{mode}/{guest}/{memory}/{background}");
        let path = dir.join(format!("{mode}-{guest}-{memory}-{background}.json"));
        let mut c = bin();
        c.args(["migrate", "--mem", "96M", "--vcpus", "2", "--guest", guest, "--mode", mode, "--memory", memory])
            .args(["--transport", "rdma", "--rdma-device", "sim", "--rdma-sim-delay-us", "30"])
            .args(["--rdma-background", background])
            .args(if mode == "hybrid" { &["--postcopy-after", "2"][..] } else { &[] })
            .args(["--run-after-ms", "200", "--quiet", "--report"])
            .arg(&path);
        let out = run_limited(c, Duration::from_secs(180));
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let r = report(&path);
        let total = r["postcopy"]["pages_total"].as_u64().unwrap();
        assert_eq!(r["transport"], "rdma", "{what}");
        assert_eq!(r["guest"]["violations"], 0, "{what}");
        assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
        assert_eq!(r["guest"]["verified_pages"], total, "{what}");
        let x = &r["rdma"];
        assert_eq!(x["device"], "sim", "{what}");
        let outstanding = r["outstanding_pages"].as_u64().unwrap();
        let read = x["demand_bytes"].as_u64().unwrap() + x["background_bytes"].as_u64().unwrap();
        let page = r["page_size"].as_u64().unwrap();
        // Every outstanding page came by RDMA (demand or background) or as
        // a zero run, and none by TCP: the source pushed nothing and served
        // no request.
        let zero = r["postcopy"]["pages_zero"].as_u64().unwrap();
        assert!(
            read + zero * page >= outstanding * page,
            "{what}: {read} bytes read and {zero} zero pages for {outstanding} outstanding pages"
        );
        let src = &r["source"];
        assert_eq!(src["transport"], "rdma", "{what}");
        assert_eq!(src["postcopy"]["pages_pushed"], 0, "{what}");
        assert_eq!(src["postcopy"]["requests"], 0, "{what}");
        assert!(src["rdma"]["registration_ms"].as_f64().is_some(), "{what}");
        // Nothing fell back to TCP (a queue pair that failed would have).
        assert_eq!(r["postcopy"]["recoveries"], 0, "{what}");
        if background == "write" {
            // The source wrote the background into the ring; every slot it
            // wrote was received here and given back.
            let slots = x["ring_slots_received"].as_u64().unwrap();
            assert!(slots > 0, "{what}: {x}");
            assert_eq!(x["background_reads"], 0, "{what}");
            // The run may end before the last slots' credits reach the source
            // (the ring has 16 slots).
            let credits = src["rdma"]["credits"].as_u64().unwrap();
            assert!(
                credits <= slots && credits + 16 >= slots,
                "{what}: {credits} credits, {slots} slots: {}",
                src["rdma"]
            );
            // Two WRITEs per slot (data, header); at the end up to a ring's
            // worth may land after the destination already had every page.
            let writes = src["rdma"]["background_writes"].as_u64().unwrap();
            assert!(writes >= 2 * slots && writes <= 2 * (slots + 16), "{what}: {writes} writes, {slots} slots");
        } else if mode == "postcopy" {
            assert!(x["background_reads"].as_u64().unwrap() > 0, "{what}");
            assert_eq!(src["rdma"]["background_writes"], 0, "{what}");
            // One completion covers a group of background READs.
            assert!(
                x["background_completions"].as_u64().unwrap() < x["background_reads"].as_u64().unwrap(),
                "{what}: {x}"
            );
            // The TCP connections carried the handshake and the state, not pages.
            let tcp = r["bytes_transferred"].as_u64().unwrap();
            assert!(tcp < total * page / 20, "{what}: {tcp} bytes over TCP");
        }
        if guest == "workload" && mode == "postcopy" {
            assert!(x["demand_reads"].as_u64().unwrap() > 0, "{what}: the guest faulted and nothing was read for it");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_pages_cross_as_zero_runs_not_as_rdma_data() {
    let dir = std::env::temp_dir().join(format!("postcopy-rdma-zeros-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (background, memory) in [("read", "shmem"), ("write", "anon")] {
        let what = format!("{background}/{memory}");
        let path = dir.join(format!("{background}.json"));
        let mut c = bin();
        c.args(["migrate", "--mem", "128M", "--touch", "0.25", "--memory", memory])
            .args(["--transport", "rdma", "--rdma-device", "sim", "--rdma-background", background])
            .args(["--run-after-ms", "200", "--quiet", "--report"])
            .arg(&path);
        let out = run_limited(c, Duration::from_secs(120));
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let r = report(&path);
        let total = r["postcopy"]["pages_total"].as_u64().unwrap();
        let zero = r["postcopy"]["pages_zero"].as_u64().unwrap();
        assert!(zero >= total * 3 / 4, "{what}: {zero} of {total} pages as zeros");
        assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
        assert_eq!(r["guest"]["verified_pages"], total, "{what}");
        // The touched quarter crossed by RDMA, and not most of the rest: the
        // zero runs race the destination's reads (a zero page read before
        // its run arrives crosses as data), so under load some do.
        let x = &r["rdma"];
        let moved = x["background_bytes"].as_u64().unwrap() + x["demand_bytes"].as_u64().unwrap();
        assert!(moved < (128 << 20) / 2, "{what}: {moved} bytes by RDMA for 32 MiB touched");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rdma_where_there_is_none_is_a_clear_error_before_anything_starts() {
    for device in [None, Some("mlx5_0")] {
        let mut c = bin();
        c.args(["migrate", "--mem", "16M", "--quiet", "--transport", "rdma"]);
        if let Some(d) = device {
            c.args(["--rdma-device", d]);
        }
        let t = Instant::now();
        let out = run_limited(c, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("no RDMA device"), "{device:?}: {err}");
        assert!(err.contains("--rdma-device sim"), "{device:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{device:?}: took {:?}", t.elapsed());
    }
    let out = run_limited(
        {
            let mut c = bin();
            c.args(["migrate", "--mem", "16M", "--quiet", "--rdma-device", "sim"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rdma-device needs --transport rdma"));
}

#[test]
fn sides_that_disagree_on_rdma_fail_before_switchover_and_the_guest_stays() {
    for (dest_rdma, src_rdma) in [(true, false), (false, true)] {
        let dir = std::env::temp_dir().join(format!("postcopy-rdma-mismatch-{}-{dest_rdma}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rdma = ["--transport", "rdma", "--rdma-device", "sim"];
        let (dest, addr) = common::spawn_quiet_dest(if dest_rdma { &rdma[..] } else { &[] });
        let path = dir.join("source.json");
        let mut c = bin();
        c.args(["source", "--connect", &addr, "--mem", "32M", "--run-before-ms", "100", "--run-after-ms", "200"])
            .args(if src_rdma { &rdma[..] } else { &[] })
            .arg("--report")
            .arg(&path);
        let out = run_limited(c, Duration::from_secs(60));
        let dout = wait_limited(dest, Duration::from_secs(30));
        let what = format!("dest rdma {dest_rdma}, source rdma {src_rdma}");
        assert!(!out.status.success(), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("RDMA"), "{what}: {err}");
        let r = report(&path);
        assert_eq!(r["guest"]["running_on_source"], true, "{what}: {r}");
        assert_eq!(r["guest"]["verify_ok"], true, "{what}");
        assert!(!dout.status.success(), "{what}: the destination should fail too");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Start an RDMA destination printing progress lines; returns it, its
/// address and a channel of its phases.
fn spawn_progress_dest(extra: &[&str]) -> (Child, String, std::sync::mpsc::Receiver<(String, u64, u64)>) {
    let mut child = bin()
        .args(["dest", "--listen", "127.0.0.1:0", "--announce", "--quiet", "--progress-lines"])
        .args(["--accept-timeout-s", "20", "--transport", "rdma", "--rdma-device", "sim"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("LISTENING ").expect("announce line").trim().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            if f.len() >= 4 && f[0] == "PROGRESS" {
                let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
                if tx.send((f[1].to_string(), n(2), n(3))).is_err() {
                    return;
                }
            }
        }
    });
    (child, addr, rx)
}

#[test]
fn a_peer_killed_mid_run_ends_the_other_side_in_bounded_time() {
    for (victim, background) in [("source", "read"), ("dest", "read"), ("source", "write"), ("dest", "write")] {
        // A slow software device (the destination's requests wait up to 3 ms
        // each): the post-copy phase takes seconds.
        let common = ["--peer-timeout-ms", "1000", "--recover-timeout", "2", "--rdma-sim-delay-us", "3000"];
        let (mut dest, addr, phases) = spawn_progress_dest(&[&common[..], &["--rdma-background", background]].concat());
        let mut src = bin()
            .args(["source", "--connect", &addr, "--mem", "256M", "--run-before-ms", "100"])
            .args(["--transport", "rdma", "--rdma-device", "sim"])
            .args(common)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (phase, present, total) = phases.recv_timeout(Duration::from_secs(30)).expect("progress");
            if phase == "postcopy" && present > 0 && present < total / 2 {
                break;
            }
            assert!(Instant::now() < deadline, "never saw the post-copy phase half done");
        }
        let (dead, other) = if victim == "source" { (&mut src, dest) } else { (&mut dest, src) };
        dead.kill().unwrap();
        let t = Instant::now();
        let out = wait_limited(other, Duration::from_secs(60));
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{victim} killed ({background}): the other side succeeded? {err}");
        // Liveness (1 s) plus the recovery window (2 s), with room to spare:
        // RDMA itself would have waited forever.
        assert!(took < Duration::from_secs(20), "{victim} killed ({background}): the other side took {took:?}: {err}");
        assert!(err.contains("within 2s"), "{victim} killed ({background}): {err}");
        let _ = dead.wait();
    }
}
