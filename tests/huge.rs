//! 2 MiB pages end to end with the workload guest: hugetlbfs memory on both
//! sides (reserved by the test and given back), shared (minor faults) and
//! anonymous on the destination, every mode, both guests, every page
//! verified; and a migration the reserve cannot hold is refused up front.

use std::path::Path;
use std::time::Duration;

mod common;

use common::{HugePages, ShmemThp, bin, run_limited};

/// Migrate a 64 MiB guest (2 vCPUs) in `mode` with `memory` at `ps`
/// pages; the run must succeed, and its report is returned.
fn migrate_64m(dir: &Path, guest: &str, memory: &str, ps: &str, mode: &str, what: &str) -> serde_json::Value {
    let report = dir.join(format!("{}.json", what.replace(' ', "-")));
    let mut c = bin();
    c.args(["migrate", "--mem", "64M", "--page-size", ps, "--vcpus", "2", "--mode", mode])
        .args(["--guest", guest, "--memory", memory])
        .args(if mode == "hybrid" { &["--postcopy-after", "2"][..] } else { &[] })
        .args(["--run-after-ms", "200", "--report"])
        .arg(&report);
    let out = run_limited(c, Duration::from_secs(120));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

#[test]
fn two_mib_pages_migrate_in_every_mode() {
    // Two copies of a 64 MiB guest.
    let Some(_huge) = HugePages::reserve(64) else {
        eprintln!("SKIPPED: 64 huge pages could not be reserved (not root, or no hugetlbfs)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("postcopy-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Shared memory (a hugetlbfs memfd: minor faults, UFFDIO_CONTINUE) and
    // anonymous huge pages (UFFDIO_COPY), in every mode.
    // The VM guest too: its program strides 4 KiB units inside the huge
    // pages, and KVM's dirty log (one bit per 4 KiB) dirties whole pages.
    let runs = [("workload", "shmem"), ("workload", "anon"), ("vm", "shmem"), ("vm", "anon")];
    for (guest, memory) in runs {
        let install = if memory == "shmem" { "continue" } else { "copy" };
        for mode in ["postcopy", "hybrid", "precopy"] {
            if guest == "vm" && memory == "anon" && mode != "postcopy" {
                continue;
            }
            let what = format!("{guest} {memory} {mode}");
            let r = migrate_64m(&dir, guest, memory, "2M", mode, &what);
            assert_eq!(r["page_size"], 2 << 20, "{what}");
            assert_eq!(r["install"], install, "{what}");
            assert_eq!(r["postcopy"]["pages_total"], 32, "{what}");
            assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
            assert_eq!(r["guest"]["verified_pages"], 32, "{what}");
            assert_eq!(r["memory_huge_bytes"], 64 << 20, "{what}: held in huge pages");
            assert_eq!(r["guest"]["violations"], 0, "{what}");
            if mode == "postcopy" {
                assert!(r["postcopy"]["faults"].as_u64().unwrap() > 0, "{what}: the guest faulted on huge pages");
            }
        }
    }
    // Transparent huge pages of shared memory (no reserve on the
    // destination), at 2 MiB and at 4 KiB pages: the page cache really holds
    // huge pages, and the guest verifies.
    match ShmemThp::allow() {
        None => eprintln!("SKIPPED (thp): shmem_enabled cannot be set here"),
        Some(_thp) => {
            for (guest, ps, mode) in [
                ("workload", "2M", "postcopy"),
                ("workload", "2M", "hybrid"),
                ("vm", "2M", "hybrid"),
                ("workload", "4K", "hybrid"),
            ] {
                let what = format!("thp {guest} {ps} {mode}");
                let r = migrate_64m(&dir, guest, "thp", ps, mode, &what);
                assert_eq!(r["install"], "continue", "{what}");
                assert_eq!(r["memory_huge_bytes"], 64 << 20, "{what}: the page cache holds huge pages");
                assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
                assert_eq!(r["guest"]["verified_pages"], r["postcopy"]["pages_total"], "{what}");
            }
        }
    }
    // More than the reserve holds: refused before anything starts.
    let mut c = bin();
    c.args(["migrate", "--mem", "1G", "--page-size", "2M"]);
    let out = run_limited(c, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs 1024 free 2 MiB huge pages"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
