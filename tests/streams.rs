//! Several push streams (`--push-streams`): the destination takes every
//! bulk connection the source announces, each stream pushes its stripe,
//! and the guest verifies in every mode and with both backends.

use std::time::Duration;

mod common;

use common::{bin, run_limited};

#[test]
fn several_push_streams_carry_every_page_in_every_mode() {
    let dir = std::env::temp_dir().join(format!("postcopy-streams-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, memory, streams) in
        [("postcopy", "shmem", "3"), ("postcopy", "anon", "2"), ("hybrid", "shmem", "4"), ("precopy", "anon", "2")]
    {
        let what = format!("{mode}/{memory}/{streams} streams");
        let path = dir.join(format!("{mode}-{memory}-{streams}.json"));
        let mut c = bin();
        c.args(["migrate", "--mem", "128M", "--vcpus", "2", "--mode", mode, "--memory", memory])
            .args(["--push-streams", streams, "--access-rate", "2000"])
            .args(if mode == "hybrid" { &["--postcopy-after", "2"][..] } else { &[] })
            .args(["--run-after-ms", "200", "--quiet", "--report"])
            .arg(&path);
        let out = run_limited(c, Duration::from_secs(120));
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let total = r["postcopy"]["pages_total"].as_u64().unwrap();
        assert_eq!(r["postcopy"]["push_streams"].as_u64().unwrap(), streams.parse::<u64>().unwrap(), "{what}");
        assert_eq!(r["guest"]["violations"], 0, "{what}");
        assert_eq!(r["guest"]["verify_ok"], true, "{what}: {}", r["guest"]);
        assert_eq!(r["guest"]["verified_pages"], total, "{what}");
        if mode == "postcopy" {
            // Nothing lost between the stripes: the push and demand brought
            // every page, and nothing had to be asked for again after it.
            let pushed = r["postcopy"]["pages_pushed"].as_u64().unwrap();
            let demand = r["postcopy"]["pages_demand"].as_u64().unwrap();
            assert!(pushed + demand >= total, "{what}: {pushed} pushed + {demand} demanded of {total}");
            assert_eq!(r["postcopy"]["pages_rerequested"], 0, "{what}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
