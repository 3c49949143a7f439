//! A VMM client of `dest --vmm-uffd-socket`, written from Firecracker's
//! description of its page-fault handler protocol
//! (`docs/snapshotting/handling-page-faults-on-snapshot-resume.md`), not
//! from our handler: the "VMM" (this test process, or a child of it)
//! creates the userfaultfd itself, registers anonymous memory for MISSING
//! faults with UFFD_EVENT_REMOVE enabled, connects to the handler's Unix
//! socket and sends one message: a JSON array of `{base_host_virt_addr,
//! size, offset, page_size}` with the descriptor as SCM_RIGHTS. The source
//! serves a snapshot memory file (`source --memory-file`), and every byte
//! the VMM reads is checked against that file.
#![allow(unsafe_code, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

mod common;

use common::{bin, wait_limited};

const PAGE: usize = 4096;
const MB: usize = 1 << 20;

/// Migrations use both cores: one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("postcopy-vmm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A memory file of `len` bytes: every page different (its index and a
/// pattern), except a stretch of zero pages and a hole, as snapshots have.
fn write_memory_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        if (100..164).contains(&i) || (300..400).contains(&i) {
            continue; // zero pages, and (below) a hole
        }
        for (j, b) in page.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) ^ j.wrapping_mul(7) ^ 0x5a) as u8;
        }
        page[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, page) in data.chunks(PAGE).enumerate() {
        if !(300..400).contains(&i) {
            f.write_all_at(page, (i * PAGE) as u64).unwrap();
        }
    }
    data
}

fn spawn_dest(sock: &Path, extra: &[&str]) -> (Child, String) {
    let sock = sock.to_str().expect("a UTF-8 socket path");
    let args: Vec<&str> = ["--vmm-uffd-socket", sock].into_iter().chain(extra.iter().copied()).collect();
    common::spawn_quiet_dest(&args)
}

fn spawn_source(addr: &str, file: &Path, extra: &[&str]) -> Child {
    bin()
        .args(["source", "--connect", addr, "--memory-file"])
        .arg(file)
        .args(["--peer-timeout-ms", "1000"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A userfaultfd as Firecracker creates one for its UFFD backend:
/// non-blocking, with UFFD_EVENT_REMOVE (a balloon). These clients touch
/// memory from user mode only.
fn client_uffd() -> Uffd {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .expect("creating a userfaultfd")
}

/// The VMM's guest memory: anonymous regions registered with its own
/// userfaultfd, as Firecracker sets them up for a UFFD memory backend.
struct VmmMemory {
    regions: Vec<(MmapMut, u64)>,
    uffd: Uffd,
}

impl VmmMemory {
    /// Regions of (file offset, bytes).
    fn new(layout: &[(u64, usize)]) -> VmmMemory {
        let uffd = client_uffd();
        let regions: Vec<(MmapMut, u64)> =
            layout.iter().map(|&(off, size)| (MmapMut::map_anon(size).unwrap(), off)).collect();
        for (m, _) in &regions {
            uffd.register(m.as_ptr() as *mut _, m.len()).expect("registering guest memory");
        }
        VmmMemory { regions, uffd }
    }

    fn json(&self, page_size: usize) -> String {
        let parts: Vec<String> = self
            .regions
            .iter()
            .map(|(m, off)| {
                format!(
                    r#"{{"base_host_virt_addr":{},"size":{},"offset":{off},"page_size":{page_size}}}"#,
                    m.as_ptr() as usize,
                    m.len()
                )
            })
            .collect();
        format!("[{}]", parts.join(","))
    }

    /// The handshake: connect, send the JSON with the descriptor attached.
    fn hand_over(&self, sock: &Path, json: &str, with_fd: bool) {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(10), "connecting to {}: {e}", sock.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let fds = [self.uffd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(json.as_bytes())];
        let n = sendmsg::<()>(s.as_raw_fd(), &iov, if with_fd { &cmsg } else { &[] }, MsgFlags::empty(), None)
            .expect("sending the handshake");
        assert_eq!(n, json.len());
        // The VMM keeps its descriptor and drops the socket, as Firecracker does.
    }

    /// Stop the userfaultfd from blocking readers (missing pages then read
    /// as zeros), so a final check can never hang on a page never served.
    fn unregister(&self) {
        for (m, _) in &self.regions {
            let _ = self.uffd.unregister(m.as_ptr() as *mut _, m.len());
        }
    }
}

fn page_of(m: &MmapMut, i: usize) -> &[u8] {
    // Volatile-free plain reads: each first touch of a page faults and
    // blocks until the handler installs it.
    &m[i * PAGE..(i + 1) * PAGE]
}

/// Where the expected bytes of region page `i` start in the file.
fn file_page(file: &[u8], off: u64, i: usize) -> &[u8] {
    let at = off as usize + i * PAGE;
    &file[at..at + PAGE]
}

#[test]
fn a_vmm_restores_lazily_from_a_remote_memory_file_and_a_balloon_reads_zeros() {
    let _g = SERIAL.lock();
    let d = scratch("restore");
    let (file_path, sock, report) = (d.join("mem"), d.join("uffd.sock"), d.join("dest.json"));
    let file = write_memory_file(&file_path, 24 * MB);
    let (dest, addr) = spawn_dest(&sock, &["--report", report.to_str().unwrap()]);
    // Two regions, announced in the other order than the file holds them.
    // A paced push (about a second) keeps the session open while the balloon
    // inflates: once every page is present the handler unregisters, and
    // REMOVE events stop coming (the kernel then zero-fills by itself).
    let src = spawn_source(&addr, &file_path, &["--file-regions", "0:16M,16M:8M", "--push-rate", "200mbit"]);
    let vmm = VmmMemory::new(&[(16 * MB as u64, 8 * MB), (0, 16 * MB)]);
    vmm.hand_over(&sock, &vmm.json(PAGE), true);

    // The balloon: pages of the 16 MiB region, some read first, some not.
    let balloon_read = 2000..2100;
    let balloon_unread = 3000..3256;
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (vmm, file) = (&vmm, &file);
            let (balloon_read, balloon_unread) = (balloon_read.clone(), balloon_unread.clone());
            s.spawn(move || {
                let (big, big_off) = (&vmm.regions[1].0, vmm.regions[1].1);
                if t == 0 {
                    for i in balloon_read.clone() {
                        assert_eq!(page_of(big, i), file_page(file, big_off, i), "page {i} before the balloon");
                    }
                    // SAFETY: an madvise on our own anonymous mapping.
                    let r = unsafe {
                        nix::libc::madvise(
                            big.as_ptr().add(balloon_read.start * PAGE) as *mut _,
                            (balloon_unread.end - balloon_read.start) * PAGE,
                            nix::libc::MADV_DONTNEED,
                        )
                    };
                    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
                    for i in balloon_read.clone().chain(balloon_unread.clone()).chain(2100..3000) {
                        assert!(page_of(big, i).iter().all(|&b| b == 0), "page {i}: removed, must read zeros");
                    }
                    return;
                }
                // The others touch every page of both regions, strided.
                for (ri, (m, off)) in vmm.regions.iter().enumerate() {
                    for i in (t..m.len() / PAGE).step_by(threads) {
                        if ri == 1 && (2000..3256).contains(&i) {
                            continue;
                        }
                        assert_eq!(page_of(m, i), file_page(file, *off, i), "region {ri} page {i}");
                    }
                }
            });
        }
    });
    let dest_out = wait_limited(dest, Duration::from_secs(60));
    let src_out = wait_limited(src, Duration::from_secs(20));
    let derr = String::from_utf8_lossy(&dest_out.stderr);
    assert!(
        dest_out.status.success(),
        "dest {}: {derr}\n{}",
        dest_out.status,
        std::fs::read_to_string(&report).unwrap_or_default()
    );
    assert!(src_out.status.success(), "source: {}", String::from_utf8_lossy(&src_out.stderr));
    // Every page is here: the file's bytes, the balloon's zeros.
    vmm.unregister();
    for (ri, (m, off)) in vmm.regions.iter().enumerate() {
        for i in 0..m.len() / PAGE {
            let removed = ri == 1 && (2000..3256).contains(&i);
            if removed {
                assert!(page_of(m, i).iter().all(|&b| b == 0), "region {ri} page {i}: removed");
            } else {
                assert_eq!(page_of(m, i), file_page(&file, *off, i), "region {ri} page {i} at the end");
            }
        }
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["guest_kind"], "snapshot");
    let pc = &r["postcopy"];
    assert_eq!(pc["pages_total"], (24 * MB / PAGE) as u64);
    assert!(pc["faults"].as_u64().unwrap() > 0, "{pc}");
    // The file's zero pages and its hole (164 pages) crossed as Zeros frames.
    assert!(pc["pages_zero"].as_u64().unwrap() >= 164, "{pc}");
    // The balloon's pages were dropped and faulted back in as zeros.
    assert_eq!(pc["pages_removed"], 1256, "{pc}");
    assert!(pc["faults_zero"].as_u64().unwrap() > 0, "{pc}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Pages of `m` resident in memory (mincore: no page is touched).
fn resident_pages(m: &MmapMut) -> usize {
    let mut v = vec![0u8; m.len() / PAGE];
    // SAFETY: `m` is a live mapping of `m.len()` bytes and `v` has one byte
    // per page of it.
    let r = unsafe { nix::libc::mincore(m.as_ptr() as *mut _, m.len(), v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn malformed_handshakes_get_a_clear_error_and_nothing_is_served() {
    let _g = SERIAL.lock();
    let d = scratch("malformed");
    let file_path = d.join("mem");
    write_memory_file(&file_path, 8 * MB);
    let vmm = VmmMemory::new(&[(0, 8 * MB)]);
    let base = vmm.regions[0].0.as_ptr() as usize;
    let region = |base: usize, size: usize, off: usize| {
        format!(r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{off},"page_size":4096}}"#)
    };
    let not_a_uffd = std::fs::File::open(&file_path).unwrap();
    let cases: Vec<(&str, String, Option<i32>, &str)> = vec![
        ("bad JSON", "{not json".into(), Some(vmm.uffd.as_raw_fd()), "not a JSON array"),
        ("no descriptor", vmm.json(PAGE), None, "without a userfaultfd"),
        ("not a userfaultfd", vmm.json(PAGE), Some(not_a_uffd.as_raw_fd()), "not a userfaultfd"),
        (
            "overlapping regions",
            format!("[{},{}]", region(base, 4 * MB, 0), region(base + 2 * MB, 4 * MB, 4 * MB)),
            Some(vmm.uffd.as_raw_fd()),
            "overlaps another region in memory",
        ),
        (
            "a region not in the file",
            format!("[{}]", region(base, 8 * MB, 16 * MB)),
            Some(vmm.uffd.as_raw_fd()),
            "do not match the source",
        ),
        ("oversized", format!("[{}", " ".repeat(70 * 1024)), Some(vmm.uffd.as_raw_fd()), "longer than"),
    ];
    for (what, json, fd, needle) in cases {
        let sock = d.join("uffd.sock");
        let (dest, addr) = spawn_dest(&sock, &[]);
        let src = spawn_source(&addr, &file_path, &[]);
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(10), "{what}: connecting: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let fds: Vec<i32> = fd.into_iter().collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        // Oversized handshakes go out in pieces (the handler stops reading).
        let mut sent = 0;
        for (i, chunk) in json.as_bytes().chunks(16 * 1024).enumerate() {
            let c: &[ControlMessage<'_>] = if i == 0 && !fds.is_empty() { &cmsg } else { &[] };
            match sendmsg::<()>(s.as_raw_fd(), &[IoSlice::new(chunk)], c, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent > 0, "{what}: nothing sent");
        let out = wait_limited(dest, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(needle), "{what}: expected {needle:?} in:\n{err}");
        let sout = wait_limited(src, Duration::from_secs(20));
        assert!(!sout.status.success(), "{what}: the source must fail too");
        assert_eq!(resident_pages(&vmm.regions[0].0), 0, "{what}: a page was served");
        drop(s);
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Run as a child VMM (POSTCOPY_VMM_CHILD names the socket): hand over
/// 16 MiB, touch its first pages, say TOUCHED, then go on faulting slowly
/// until killed.
#[test]
fn vmm_child() {
    let Ok(sock) = std::env::var("POSTCOPY_VMM_CHILD") else { return };
    let vmm = VmmMemory::new(&[(0, 16 * MB)]);
    vmm.hand_over(Path::new(&sock), &vmm.json(PAGE), true);
    let m = &vmm.regions[0].0;
    for i in 0..16 {
        assert_eq!(&page_of(m, i)[..8], &(i as u64).to_le_bytes());
    }
    println!("TOUCHED");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    for i in (16..m.len() / PAGE).cycle() {
        std::hint::black_box(page_of(m, i)[0]);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn spawn_vmm_child(sock: &Path) -> Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "vmm_child", "--nocapture", "--test-threads=1"])
        .env("POSTCOPY_VMM_CHILD", sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let t0 = Instant::now();
    let mut line = String::new();
    while !line.contains("TOUCHED") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the child VMM ended before touching its memory");
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    c
}

#[test]
fn a_vmm_that_exits_ends_the_session_cleanly() {
    let _g = SERIAL.lock();
    let d = scratch("exit");
    let (file_path, sock) = (d.join("mem"), d.join("uffd.sock"));
    write_memory_file(&file_path, 16 * MB);
    let (dest, addr) = spawn_dest(&sock, &[]);
    // Slow enough that the push is far from done when the VMM goes.
    let src = spawn_source(&addr, &file_path, &["--push-rate", "20mbit"]);
    let mut vmm = spawn_vmm_child(&sock);
    vmm.kill().unwrap();
    let _ = vmm.wait();
    let t_kill = Instant::now();
    let out = wait_limited(dest, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("exited with") && err.contains("session ended"), "{err}");
    assert!(t_kill.elapsed() < Duration::from_secs(10), "took {:?}", t_kill.elapsed());
    // The source hears why and ends: no reconnecting to a session that ended.
    let sout = wait_limited(src, Duration::from_secs(10));
    let serr = String::from_utf8_lossy(&sout.stderr);
    assert!(serr.contains("VMM") && serr.contains("exited"), "{serr}");
    assert!(t_kill.elapsed() < Duration::from_secs(10), "the source took {:?}", t_kill.elapsed());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_vmm_whose_memory_cannot_arrive_is_killed_not_left_blocked() {
    let _g = SERIAL.lock();
    let d = scratch("lost");
    let (file_path, sock) = (d.join("mem"), d.join("uffd.sock"));
    write_memory_file(&file_path, 16 * MB);
    let (dest, addr) = spawn_dest(&sock, &["--recover-timeout", "1", "--peer-timeout-ms", "1000"]);
    let mut src = spawn_source(&addr, &file_path, &["--push-rate", "20mbit", "--recover-timeout", "1"]);
    let vmm = spawn_vmm_child(&sock);
    // The source dies after switchover: its pages can never arrive.
    src.kill().unwrap();
    let _ = src.wait();
    let out = wait_limited(dest, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not reconnect") && err.contains("killed the VMM"), "{err}");
    let st = wait_limited(vmm, Duration::from_secs(10)).status;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "the VMM: {st:?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_vmm_on_2mib_hugetlbfs_pages_restores_every_byte() {
    let _g = SERIAL.lock();
    const HUGE: usize = 2 * MB;
    let Some(_huge) = common::HugePages::reserve(16) else {
        eprintln!("SKIPPED: 16 huge pages could not be reserved (not root, or no hugetlbfs)");
        return;
    };
    let d = scratch("huge");
    let (file_path, sock, report) = (d.join("mem"), d.join("uffd.sock"), d.join("dest.json"));
    let file = write_memory_file(&file_path, 16 * HUGE);
    let (dest, addr) = spawn_dest(&sock, &["--report", report.to_str().unwrap()]);
    let src = spawn_source(&addr, &file_path, &["--file-page-size", "2M", "--push-run", "2", "--push-rate", "400mbit"]);
    // The VMM's memory: anonymous hugetlbfs pages, as Firecracker maps them
    // with a 2 MiB hugetlbfs backing.
    let m = memmap2::MmapOptions::new().len(16 * HUGE).huge(Some(21)).map_anon().expect("a hugetlbfs mapping");
    let uffd = client_uffd();
    uffd.register(m.as_ptr() as *mut _, m.len()).expect("registering hugetlbfs memory");
    let vmm = VmmMemory { regions: vec![(m, 0)], uffd };
    vmm.hand_over(&sock, &vmm.json(HUGE), true);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (vmm, file) = (&vmm, &file);
            s.spawn(move || {
                let m = &vmm.regions[0].0;
                // Touch one 4 KiB piece of each huge page, from three threads.
                for hp in (t..16).step_by(3) {
                    let i = hp * (HUGE / PAGE) + 17;
                    assert_eq!(page_of(m, i), file_page(file, 0, i), "huge page {hp}");
                }
            });
        }
    });
    let out = wait_limited(dest, Duration::from_secs(60));
    assert!(out.status.success(), "dest: {}", String::from_utf8_lossy(&out.stderr));
    let sout = wait_limited(src, Duration::from_secs(20));
    assert!(sout.status.success(), "source: {}", String::from_utf8_lossy(&sout.stderr));
    vmm.unregister();
    assert!(vmm.regions[0].0[..] == file[..], "the VMM's memory differs from the file");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["page_size"], HUGE as u64);
    assert!(r["postcopy"]["faults"].as_u64().unwrap() > 0);
    drop(vmm);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_vm_guest_restores_in_its_own_vmm_process_and_survives_a_cut_link() {
    use postcopy::relay::{Action, Dir, Relay, Rule};
    let _g = SERIAL.lock();
    let d = scratch("own-vmm");
    let snap = d.join("snap");
    let out = common::run_limited(
        {
            let mut c = bin();
            c.args(["snapshot", "--guest", "vm", "--mem", "64M", "--vcpus", "2", "--run-ms", "300", "--out"])
                .arg(&snap);
            c
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "snapshot: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let regions = printed.split("--file-regions ").nth(1).expect("the source command").trim().to_string();
    let (sock, report) = (d.join("uffd.sock"), d.join("dest.json"));
    let (dest, addr) = spawn_dest(&sock, &["--report", report.to_str().unwrap(), "--peer-timeout-ms", "1000"]);
    // The link is cut in the middle of the push: the source reconnects and
    // the VMM's faults wait meanwhile.
    let cut = Rule { dir: Dir::ToDest, tag: 12, kind: Some(2), nth: 100, after: true, action: Action::Reset };
    let relay = Relay::start(&addr, vec![cut]).unwrap();
    let src = spawn_source(&relay.addr, &snap.join("mem"), &["--file-regions", &regions, "--push-rate", "400mbit"]);
    let mut vmm = bin();
    vmm.args(["vmm", "--run-ms", "1000", "--timeout-s", "60", "--snapshot"]).arg(&snap).arg("--uffd-socket").arg(&sock);
    let vout = common::run_limited(vmm, Duration::from_secs(90));
    let verr = String::from_utf8_lossy(&vout.stderr);
    assert!(vout.status.success(), "vmm: {verr}");
    assert!(verr.contains("verification passed") && verr.contains("0 violations"), "{verr}");
    let dout = wait_limited(dest, Duration::from_secs(30));
    assert!(dout.status.success(), "dest: {}", String::from_utf8_lossy(&dout.stderr));
    let sout = wait_limited(src, Duration::from_secs(30));
    assert!(sout.status.success(), "source: {}", String::from_utf8_lossy(&sout.stderr));
    assert_eq!(relay.fired(), 1, "the cut never happened");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["postcopy"]["recoveries"], 1, "{}", r["postcopy"]);
    assert!(r["postcopy"]["faults"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&d);
}
