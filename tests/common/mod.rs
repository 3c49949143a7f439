//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `postcopy` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postcopy"))
}

/// Run a command with a hard time limit; returns its output.
pub fn run_limited(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("command exceeded {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for a spawned child with a hard time limit (killed, and the test
/// failed, past it).
pub fn wait_limited(mut child: std::process::Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("process exceeded {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Start `postcopy dest` (quiet, announcing) on a free loopback port with
/// `extra` options; returns it and the address it listens on.
pub fn spawn_quiet_dest(extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(["dest", "--listen", "127.0.0.1:0", "--announce", "--quiet", "--accept-timeout-s", "20"])
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

/// Huge pages reserved for a test and given back when it ends.
pub struct HugePages {
    before: u64,
}

impl HugePages {
    /// Reserve `n` more huge pages; `None` if they cannot all be had.
    pub fn reserve(n: u64) -> Option<HugePages> {
        let path = "/proc/sys/vm/nr_hugepages";
        let before: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        std::fs::write(path, (before + n).to_string()).ok()?;
        let free = std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:").and_then(|v| v.trim().parse::<u64>().ok()))?;
        let h = HugePages { before };
        (free >= n).then_some(h)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.before.to_string());
    }
}

/// Transparent huge pages allowed for shared memory that asks for them
/// (`shmem_enabled` set to `advise`) for a test, the setting given back
/// when it ends.
pub struct ShmemThp {
    before: String,
}

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

impl ShmemThp {
    /// Allow them; `None` if this host has no such setting or refuses.
    pub fn allow() -> Option<ShmemThp> {
        let now = std::fs::read_to_string(SHMEM_ENABLED).ok()?;
        // "always within_size advise [never] deny force": the bracketed one.
        let before = now.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?.to_string();
        std::fs::write(SHMEM_ENABLED, "advise").ok()?;
        Some(ShmemThp { before })
    }
}

impl Drop for ShmemThp {
    fn drop(&mut self) {
        let _ = std::fs::write(SHMEM_ENABLED, &self.before);
    }
}
