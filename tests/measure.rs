//! Measurement runs through the `postcopy` binary: `report` on fixture
//! reports, a small `lab` grid end to end, and the two-host lab in network
//! namespaces (real veth, tc and relay), including its clean-up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, processes_mentioning, run_limited, wait_limited};
use postcopy::report::Report;

/// Migrations use both cores: run them one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("postcopy-measure-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn nonempty(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn report_compares_fixture_runs_in_a_table_csv_and_pictures() {
    let d = scratch("report");
    let (a, b) = (fixture("postcopy-64m.json"), fixture("hybrid-64m.json"));
    let mut c = bin();
    c.args(["report", "--labels", "pure,hybrid", "--plot"]).arg(d.join("plots")).arg("--csv").arg(d.join("csv"));
    c.arg(&a).arg(&b);
    let out = run_limited(c, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The table: a column per run, the figures read off each report.
    let (ra, rb) = (Report::read(&a).unwrap(), Report::read(&b).unwrap());
    let header = text.lines().next().unwrap();
    assert!(header.contains("pure") && header.contains("hybrid"), "{header}");
    let row =
        |name: &str| text.lines().find(|l| l.starts_with(&format!("| {name} "))).unwrap_or_else(|| panic!("{text}"));
    assert!(row("mode").contains("postcopy") && row("mode").contains("hybrid"));
    let p50 = row("fault p50 us");
    assert!(p50.contains(&format!("{:.1}", ra.postcopy.fault_latency_us.p50)), "{p50}");
    assert!(p50.contains(&format!("{:.1}", rb.postcopy.fault_latency_us.p50)), "{p50}");
    // Time series as CSV, one row per sample.
    let csv = std::fs::read_to_string(d.join("csv/pure.timeline.csv")).unwrap();
    assert_eq!(csv.lines().count(), ra.timeline.len() + 1);
    assert!(csv.starts_with("t_ms,pages_present,"));
    // Pictures, SVG and PNG.
    for name in ["fault_latency_cdf", "guest_stall_cdf", "pages_present", "fault_rate"] {
        let svg = d.join(format!("plots/{name}.svg"));
        assert!(nonempty(&svg), "{name}.svg");
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.contains("<svg") && s.contains("pure") && s.contains("hybrid"), "{name}: legend names both runs");
        assert!(is_png(&d.join(format!("plots/{name}.png"))), "{name}.png");
    }
    // Bad input: a clear error, nothing written.
    let junk = d.join("junk.json");
    std::fs::write(&junk, "{not json").unwrap();
    let mut c = bin();
    c.arg("report").arg(&junk);
    let out = run_limited(c, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("parsing"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn lab_runs_a_small_grid_end_to_end() {
    let _g = SERIAL.lock();
    let d = scratch("lab");
    let spec = d.join("tiny.toml");
    std::fs::write(
        &spec,
        "name = \"tiny\"\nrepetitions = 2\n[fixed]\nmem = \"64M\"\nrun-before-ms = 100\nrun-after-ms = 100\n[grid]\nprefetch = [1, 16]\n",
    )
    .unwrap();
    let out_dir = d.join("out");
    let mut c = bin();
    c.arg("lab").arg(&spec).arg("--out").arg(&out_dir);
    let out = run_limited(c, Duration::from_secs(300));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // One report per run, every run clean.
    let runs: Vec<PathBuf> = std::fs::read_dir(out_dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(runs.len(), 4, "{runs:?}");
    for r in &runs {
        let rep = Report::read(r).unwrap();
        assert!(rep.clean(), "{}: {:?}", r.display(), rep.error);
        let want = if r.to_string_lossy().contains("prefetch-16") { 16 } else { 1 };
        assert_eq!(rep.prefetch.pages, want, "{}", r.display());
    }
    // The summary: a row per cell with medians over both repetitions.
    let csv = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let head: Vec<&str> = lines[0].split(',').collect();
    for l in &lines[1..] {
        let row: Vec<&str> = l.split(',').collect();
        assert_eq!(row.len(), head.len());
        let col = |n: &str| row[head.iter().position(|h| *h == n).unwrap()];
        assert_eq!((col("runs"), col("ok")), ("2", "2"));
        let (med, lo, hi): (f64, f64, f64) = (
            col("fault_p50_us_median").parse().unwrap(),
            col("fault_p50_us_min").parse().unwrap(),
            col("fault_p50_us_max").parse().unwrap(),
        );
        assert!(lo <= med && med <= hi && lo > 0.0, "{l}");
    }
    let md = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(md.contains("| prefetch") && md.contains("2/2"), "{md}");
    for name in ["fault_latency_cdf", "pages_present", "fault_rate"] {
        assert!(is_png(&out_dir.join(format!("plots/{name}.png"))), "{name}");
    }
    // A spec with a bad cell fails before any run.
    std::fs::write(&spec, "[grid]\npattern = [\"uniform\", \"nonsense\"]\n").unwrap();
    let mut c = bin();
    c.arg("lab").arg(&spec).arg("--out").arg(d.join("bad"));
    let out = run_limited(c, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonsense"));
    assert!(!d.join("bad/runs").exists(), "nothing ran");
}

fn namespaces_of(pid: u32) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
                .filter(|n| n.starts_with(&format!("pcl-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether this machine lets us make network namespaces (root, iproute2).
fn netns_available() -> Result<(), String> {
    let name = format!("pcl-probe-{}", std::process::id());
    let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| format!("no ip command: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    Ok(())
}

/// The lab tests one at a time, or `None` (said) where namespaces cannot
/// be made.
fn lab_ready() -> Option<parking_lot::MutexGuard<'static, ()>> {
    if let Err(why) = netns_available() {
        eprintln!("SKIPPED: network namespaces cannot be created here: {why}");
        return None;
    }
    Some(SERIAL.lock())
}

/// A 64 MiB migration across the lab with `args`, which must end clean;
/// its report.
fn lab_migrate(report: &Path, args: &[&str]) -> Report {
    let mut c = bin();
    c.args(["migrate", "--quiet", "--mem", "64M", "--run-before-ms", "100", "--run-after-ms", "100"])
        .args(args)
        .arg("--report")
        .arg(report);
    let out = run_limited(c, Duration::from_secs(120));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let r = Report::read(report).unwrap();
    assert!(r.clean(), "{args:?}: {:?} {:?}", r.error, r.guest.problems);
    r
}

#[test]
fn two_host_lab_shapes_delays_carries_a_migration_and_cleans_up() {
    let Some(_g) = lab_ready() else { return };
    let d = scratch("netns");
    let report = d.join("veth.json");
    let mut c = bin();
    c.args(["migrate", "--quiet", "--mem", "64M", "--run-before-ms", "100", "--run-after-ms", "100"])
        .args(["--link", "veth:1gbit:300us", "--push-rate", "400mbit", "--report"])
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    let out = wait_limited(child, Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = Report::read(&report).unwrap();
    assert!(r.clean(), "{:?} {:?}", r.error, r.guest.problems);
    assert_eq!(r.link.name, "veth:1gbit:300us");
    assert_eq!((r.link.rate_gbit, r.link.added_rtt_us), (1.0, 300.0));
    // Not timings of the engine: the relay holds each chunk for the delay
    // (a sleep never ends early), and tbf never lets a stream past its rate
    // by much. Loose bounds that only a broken link would miss.
    assert!(r.link.measured_rtt_us >= 150.0, "the relay adds its delay: {:?}", r.link);
    assert!(r.link.measured_rtt_idle_us >= 150.0, "spaced probes cross the relay too: {:?}", r.link);
    assert!(r.link.measured_gbit > 0.0 && r.link.measured_gbit < 2.0, "tbf shapes the link: {:?}", r.link);
    // The push was paced below the link (TCP's own pacing: a rate cap the
    // kernel enforces, checked loosely).
    assert_eq!(r.push_rate_gbit, 0.4);
    assert!(r.postcopy.push_gbps > 0.0 && r.postcopy.push_gbps < 2.0 * 0.4 / 8.0, "{}", r.postcopy.push_gbps);
    // Every demand round trip crossed the relay.
    assert!(r.postcopy.faults > 0 && r.postcopy.fault_latency_us.p50 >= 150.0, "{:?}", r.postcopy.fault_latency_us);
    assert!(namespaces_of(pid).is_empty(), "namespaces left behind: {:?}", namespaces_of(pid));

    // Interrupted mid-run (TERM while both sides run, the guest before
    // switchover): no namespaces, temporary files or processes left, a
    // clear error.
    let mut c = bin();
    c.args(["migrate", "--quiet", "--mem", "64M", "--run-before-ms", "20000", "--link", "veth:10gbit"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    // Its temporary directory appears once the link is measured and the
    // destination is about to start.
    let tmp = std::env::temp_dir().join(format!("postcopy-{pid}-0"));
    let t0 = Instant::now();
    while processes_mentioning(&tmp.to_string_lossy()).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the two sides never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(namespaces_of(pid).len(), 2);
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let out = wait_limited(child, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(namespaces_of(pid).is_empty(), "namespaces left behind: {:?}", namespaces_of(pid));
    assert!(!tmp.exists(), "temporary directory left behind");
    let t0 = Instant::now();
    while !processes_mentioning(&tmp.to_string_lossy()).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the destination or source outlived migrate");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A lab interrupted from its terminal (SIGINT to its process group)
    // stops its run with one TERM: the run's lab is removed too.
    let spec = d.join("long.toml");
    std::fs::write(&spec, "repetitions = 1\n[fixed]\nmem = \"64M\"\nrun-before-ms = 20000\nlink = \"veth\"\n").unwrap();
    let mut c = bin();
    c.arg("lab").arg(&spec).arg("--out").arg(d.join("long")).stdout(Stdio::piped()).stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let child = c.spawn().unwrap();
    let lab_pid = child.id();
    let t0 = Instant::now();
    let run_ns = loop {
        let all: Vec<String> = std::fs::read_dir("/var/run/netns")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        if let Some(n) = all.into_iter().find(|n| n.starts_with("pcl-") && n.ends_with("-d")) {
            break n;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the run's lab never came up");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").args(["-INT", "--", &format!("-{lab_pid}")]).status();
    let out = wait_limited(child, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!std::path::Path::new("/var/run/netns").join(&run_ns).exists(), "{run_ns} left behind");

    // Killed outright (no chance to clean up): the next lab removes them.
    let mut c = bin();
    c.args(["migrate", "--quiet", "--mem", "64M", "--run-before-ms", "20000", "--link", "veth"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let pid = child.id();
    let t0 = Instant::now();
    while namespaces_of(pid).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the lab never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(namespaces_of(pid).len(), 2, "SIGKILL leaves them");
    let mut c = bin();
    c.args(["migrate", "--quiet", "--mem", "64M", "--run-before-ms", "50", "--run-after-ms", "50", "--link", "veth"]);
    let out = run_limited(c, Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(namespaces_of(pid).is_empty(), "stale namespaces of a dead lab were removed");
}

/// A `:prio` link serves the engine's DSCP EF marks from their own class:
/// with marks on, the control connection (which carries every demand reply)
/// crosses the urgent class; with them off, nothing does.
#[test]
fn marked_demand_crosses_the_urgent_class_of_a_prio_link() {
    let Some(_g) = lab_ready() else { return };
    let d = scratch("prio");
    for dscp in ["on", "off"] {
        let r = lab_migrate(&d.join(format!("{dscp}.json")), &["--link", "veth:1gbit:100us:prio", "--dscp", dscp]);
        let urgent = r.link.urgent_bytes.expect("a prio link counts its urgent class");
        if dscp == "on" {
            assert!(r.postcopy.pages_demand > 0, "the guest faulted");
            assert!(
                urgent >= r.postcopy.pages_demand * 4096,
                "{urgent} bytes for {} demand pages",
                r.postcopy.pages_demand
            );
            // The push (marked LE) stays out of it.
            assert!(urgent < r.bytes_transferred / 2, "{urgent} of {}", r.bytes_transferred);
        } else {
            assert_eq!(urgent, 0, "unmarked traffic is not urgent");
        }
    }
}

/// Several push streams over a shaped link share one governor: it yields
/// the link to demand (the source counts the paces it set), every stripe
/// arrives, and nothing has to be asked for again.
#[test]
fn several_push_streams_yield_a_shaped_link_together() {
    let Some(_g) = lab_ready() else { return };
    let d = scratch("streams");
    let r = lab_migrate(
        &d.join("streams.json"),
        &["--link", "veth:1gbit:100us", "--push-streams", "3", "--access-rate", "2000"],
    );
    assert_eq!(r.postcopy.push_streams, 3);
    let p = &r.postcopy;
    assert!(p.faults > 0, "the guest faulted");
    assert!(
        p.pages_pushed + p.pages_demand >= p.pages_total,
        "{} + {} of {}",
        p.pages_pushed,
        p.pages_demand,
        p.pages_total
    );
    assert_eq!(p.pages_rerequested, 0);
    assert!(p.push_yields > 0, "the streams' governor never yielded to the faulting guest");
}

#[test]
fn migrate_prints_progress_when_not_on_a_terminal() {
    let _g = SERIAL.lock();
    let mut c = bin();
    c.args(["migrate", "--mem", "256M", "--run-before-ms", "1500", "--run-after-ms", "100"]);
    let out = run_limited(c, Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    // The guest ran 1.5 s on the source first: at least one line while the
    // destination waited, naming the phase and the page counts.
    let phases = ["handshake:", "ready:", "precopy:", "switchover:", "postcopy:", "done:"];
    assert!(err.lines().any(|l| l.contains("pages present") && phases.iter().any(|p| l.contains(p))), "{err}");
    // No terminal, so no bar's control characters.
    assert!(!err.contains('\u{1b}'), "{err}");
}
