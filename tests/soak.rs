//! `postcopy soak`: one guest migrated back and forth, in every mode, with
//! the link cut every third round; the guest checks itself each round.

use std::time::Duration;

mod common;

use common::{bin, run_limited};
use postcopy::soak::SoakReport;

/// Soaks use both cores: one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn soak(guest: &str) {
    let _g = SERIAL.lock();
    let report = std::env::temp_dir().join(format!("postcopy-soak-{}-{guest}.json", std::process::id()));
    let mut c = bin();
    c.args(["soak", "--guest", guest, "--count", "6", "--mem", "64M", "--vcpus", "2", "--quiet"])
        .args(["--modes", "postcopy,hybrid,precopy", "--cut-every", "3", "--report"])
        .arg(&report);
    let out = run_limited(c, Duration::from_secs(240));
    let err = String::from_utf8_lossy(&out.stderr);
    let r: SoakReport = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(out.status.success(), "{guest}: {err}\n{:#?}", r.per_round);
    assert_eq!((r.rounds, r.failed_rounds, r.violations), (6, 0, 0), "{guest}: {err}");
    assert!(r.final_verify_ok && r.final_verified_pages == 64 << 8, "{guest}");
    assert_eq!(r.per_round.len(), 6);
    let mut last = 0;
    for (i, round) in r.per_round.iter().enumerate() {
        assert_eq!(round.status, "ok", "{guest} round {}: {:?}", i + 1, round.error);
        assert_eq!(round.mode, ["postcopy", "hybrid", "precopy"][i % 3]);
        assert_eq!(round.direction, if i % 2 == 0 { "A->B" } else { "B->A" });
        // The guest went on where it was: its life counters only grow.
        assert!(round.accesses_total > last, "{guest} round {}", i + 1);
        last = round.accesses_total;
        // The copy it left behind checks out, page by page.
        assert_eq!(round.verified_pages, 64 << 8, "{guest} round {}", i + 1);
        let cut = (i + 1) % 3 == 0;
        assert_eq!(round.cuts, u64::from(cut), "{guest} round {}", i + 1);
        if cut {
            assert!(round.recoveries >= 1, "{guest} round {} was cut and not recovered", i + 1);
        }
    }
    let _ = std::fs::remove_file(&report);
}

#[test]
fn workload_guest_soak_in_every_mode_with_cuts() {
    soak("workload");
}

#[test]
fn vm_guest_soak_in_every_mode_with_cuts() {
    soak("vm");
}
