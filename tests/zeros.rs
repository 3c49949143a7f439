//! Memory the guest never touched crosses the wire as Zeros frames, without
//! data, in every mode and with both destination backends, and the guest
//! still verifies every page (the untouched ones must read as zeros).

use std::time::Duration;

mod common;

use common::{bin, run_limited};

#[test]
fn untouched_memory_crosses_as_zero_runs_in_every_mode_and_backend() {
    let dir = std::env::temp_dir().join(format!("postcopy-zeros-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, memory) in [("postcopy", "shmem"), ("postcopy", "anon"), ("hybrid", "shmem"), ("precopy", "anon")] {
        let report = dir.join(format!("{mode}-{memory}.json"));
        let mut c = bin();
        c.args(["migrate", "--mem", "128M", "--touch", "0.25", "--vcpus", "2", "--mode", mode, "--memory", memory])
            .args(if mode == "hybrid" { &["--postcopy-after", "2"][..] } else { &[] })
            .args(["--run-after-ms", "200", "--report"])
            .arg(&report);
        let out = run_limited(c, Duration::from_secs(120));
        let what = format!("{mode}/{memory}");
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let total = r["postcopy"]["pages_total"].as_u64().unwrap();
        let zero = r["postcopy"]["pages_zero"].as_u64().unwrap();
        // Three quarters were never touched: at least those arrive as zeros.
        assert!(zero >= total * 3 / 4, "{what}: {zero} of {total} pages came as zeros");
        assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
        assert_eq!(r["guest"]["verified_pages"], total, "{what}");
        if mode == "postcopy" {
            // One pass over memory: the touched quarter's data and little else.
            let bytes = r["bytes_transferred"].as_u64().unwrap();
            assert!(bytes < (128 << 20) * 35 / 100, "{what}: {bytes} bytes for a guest that touched 32 MiB");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
