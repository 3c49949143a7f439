//! The destination's front door, through the `postcopy` binary: nothing a
//! peer sends makes it allocate more than it was told to accept, an
//! unauthenticated hello allocates nothing, a peer that leaves while memory
//! is prepared stops that work, and a migration that cannot fit on this host
//! says so before allocating; what it accepts carries its DSCP marks.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use common::{bin, run_limited, wait_limited};
use proto::wire::{ErrorCode, GuestKind, Hello, MAC_LEN, Mode, Msg, VERSION, decode_frame};
use proto::{GuestOffset, PageSize, RegionDesc};

fn spawn_dest(extra: &[&str]) -> (Child, String) {
    common::spawn_quiet_dest(extra)
}

fn hello(len_bytes: u64) -> Vec<u8> {
    Msg::Hello(Hello {
        version: VERSION,
        guest_kind: GuestKind::Workload,
        mode: Mode::Postcopy,
        features: 0,
        page_size: PageSize::Size4K,
        prefetch_pages: 0,
        prefetch_around: false,
        regions: vec![RegionDesc { guest: GuestOffset(0), len_bytes }],
        mac: [0; MAC_LEN],
    })
    .to_frame()
}

/// Connect and read the server hello; returns the stream.
fn greeted(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut server_hello = [0u8; 36];
    s.read_exact(&mut server_hello).unwrap();
    s
}

/// Connect, read the server hello, send `hello`; returns the stream.
fn say_hello(addr: &str, hello: &[u8]) -> TcpStream {
    let mut s = greeted(addr);
    s.write_all(hello).unwrap();
    s
}

/// The first frame the destination sends after its hello.
fn answer(s: &mut TcpStream) -> Option<Msg<'static>> {
    let mut rest = Vec::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.read_to_end(&mut rest);
    let rest: &'static [u8] = Box::leak(rest.into_boxed_slice());
    decode_frame(rest, None).ok().flatten().map(|(m, _)| m)
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

#[test]
fn hostile_hello_of_60_gib_is_refused_before_any_allocation() {
    let (dest, addr) = spawn_dest(&[]);
    let pid = dest.id();
    let t0 = Instant::now();
    let mut s = say_hello(&addr, &hello(60 << 30));
    let said = answer(&mut s);
    let rss = rss_bytes(pid);
    let out = wait_limited(dest, Duration::from_secs(20));
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    match said {
        Some(Msg::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Capacity, "{message}");
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("64424509440 bytes exceeds"), "{err}");
    // Nothing sized by the peer was allocated (a 60 GiB bitmap alone would be 2 MiB;
    // the guest memory 60 GiB).
    assert!(rss < 256 << 20, "destination resident {rss} bytes");
}

#[test]
fn max_mem_is_the_limit_and_an_unkeyed_hello_allocates_nothing() {
    // An explicit limit below the guest.
    let (dest, addr) = spawn_dest(&["--max-mem", "64M"]);
    let mut s = say_hello(&addr, &hello(128 << 20));
    assert!(matches!(answer(&mut s), Some(Msg::Error { code: ErrorCode::Capacity, .. })));
    assert!(!wait_limited(dest, Duration::from_secs(20)).status.success());
    // With a key configured, an unauthenticated hello fails on the key, even
    // when its size would also be refused: nothing is looked at before it.
    let key = std::env::temp_dir().join(format!("postcopy-fd-key-{}", std::process::id()));
    std::fs::write(&key, "k").unwrap();
    let (dest, addr) = spawn_dest(&["--key-file", key.to_str().unwrap(), "--max-mem", "64M"]);
    let mut s = say_hello(&addr, &hello(128 << 20));
    assert!(matches!(answer(&mut s), Some(Msg::Error { code: ErrorCode::Auth, .. })));
    assert!(!wait_limited(dest, Duration::from_secs(20)).status.success());
    let _ = std::fs::remove_file(&key);
}

#[test]
fn a_peer_that_leaves_while_memory_is_prepared_stops_the_work() {
    // 4 GiB of shared memory takes seconds to populate here; the peer says
    // hello and hangs up at once.
    let (dest, addr) = spawn_dest(&["--max-mem", "8G"]);
    let pid = dest.id();
    let s = say_hello(&addr, &hello(4 << 30));
    drop(s);
    let out = wait_limited(dest, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("went away while guest memory was being prepared"), "{err}");
    assert_eq!(rss_bytes(pid), 0, "the process is gone");
}

#[test]
fn a_migration_larger_than_the_host_fails_at_once_with_sizes() {
    for (args, needle) in [
        (vec!["migrate", "--mem", "30G", "--quiet"], "a migration on one host"),
        (vec!["migrate", "--mem", "1T", "--quiet"], "a migration on one host"),
        (vec!["source", "--connect", "127.0.0.1:1", "--mem", "1T"], "the source's guest"),
    ] {
        let mut c = bin();
        c.args(&args);
        let t0 = Instant::now();
        let out = run_limited(c, Duration::from_secs(30));
        assert!(t0.elapsed() < Duration::from_secs(10), "{args:?} took {:?}", t0.elapsed());
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && err.contains("available") && err.contains("refusing"), "{args:?}: {err}");
    }
}

#[test]
fn a_destination_no_source_reaches_says_how_long_it_waited() {
    let mut c = bin();
    c.args(["dest", "--listen", "127.0.0.1:0", "--quiet", "--accept-timeout-s", "1"]);
    let out = run_limited(c, Duration::from_secs(20));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after 1"), "{err}");
    assert!(!err.contains("after 0ns"), "{err}");
}

/// A destination that takes longer to prepare memory than the source waits
/// for a silent peer keeps it waiting with keep-alives (10 GiB took 27 s to
/// prepare here, against a 30 s handshake limit). Over real TCP: the
/// keep-alives go straight to the socket while the pager prepares.
#[test]
fn a_slow_preparation_keeps_the_source_waiting_with_keepalives() {
    use std::sync::Arc;

    use guest::{GuestMemory, Workload, WorkloadConfig};
    use postcopy::adapters::{DestAny, Populate, WorkloadSource};
    use transport::tcp::{TcpConn, TcpListen, TcpOptions};

    let listener = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
    let addr = listener.local_addr().to_string();
    let layout = proto::MemLayout::single(PageSize::Size4K, 16 << 20).unwrap();
    let w = Workload::boot(Arc::new(GuestMemory::new(layout).unwrap()), WorkloadConfig::default()).unwrap();
    let mut src_guest = WorkloadSource::new(w, Duration::from_secs(5));
    let scfg = sender::SenderConfig { handshake_timeout: Duration::from_secs(2), ..Default::default() };
    let src = std::thread::spawn(move || {
        let control = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap();
        let mut dial = |_| {
            TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default())
                .map(|c| Box::new(c) as Box<dyn transport::Conn>)
        };
        let r = sender::run(Box::new(control), &mut dial, &mut src_guest, &scfg, Default::default());
        let chain = |e: &dyn std::error::Error| {
            let mut s = e.to_string();
            let mut c = e.source();
            while let Some(x) = c {
                s += &format!(": {x}");
                c = x.source();
            }
            s
        };
        (r.map(|_| ()).map_err(|e| chain(&e)), src_guest)
    });
    let control = listener.accept(Instant::now() + Duration::from_secs(5)).unwrap();
    let dest = pager::run(
        Box::new(control),
        &listener,
        |acc, cancel| {
            // Two and a half times the source's patience.
            std::thread::sleep(Duration::from_secs(5));
            DestAny::new(acc.guest_kind, acc.layout.clone(), guest::Backing::Shmem, Populate::Before, cancel)
                .map_err(|e| pager::GuestError::Memory(Box::new(e)))
        },
        &pager::PagerConfig::default(),
        Default::default(),
    );
    let (src_result, src_guest) = src.join().unwrap();
    assert!(src_result.is_ok(), "source: {src_result:?}");
    let o = dest.expect("destination");
    assert_eq!(o.report.accepted.layout.n_pages(), 4096);
    drop(o.guest.finish());
    drop(src_guest.into_workload().stop());
}

/// The TOS byte `ss` reports for the destination's end of the connection
/// `client` holds to it (its local port is the destination's peer port).
fn dest_side_tos(client: &TcpStream) -> Option<u8> {
    let port = client.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args(["-tnH", "--tos", "state", "established", "dport", "=", &format!(":{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `tos:0xb8`, or `tos:0` unmarked.
    let tos = text.split_whitespace().find_map(|w| w.strip_prefix("tos:"))?;
    u8::from_str_radix(tos.trim_start_matches("0x"), 16).ok()
}

/// The destination marks the connection fault requests leave on DSCP EF
/// (the TOS byte 0xb8) as it accepts it, and leaves it alone with `--dscp
/// off`: read off the destination's own socket with `ss`.
#[test]
fn the_destination_marks_its_control_connection_unless_told_not_to() {
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        eprintln!("SKIPPED: no ss command (iproute2) to read socket marks with");
        return;
    }
    for (dscp, want) in [("on", 0xb8), ("off", 0)] {
        let (mut dest, addr) = spawn_dest(&["--dscp", dscp]);
        // Once the server hello arrives the destination holds the socket.
        let s = greeted(&addr);
        let tos = dest_side_tos(&s);
        let _ = dest.kill();
        let _ = dest.wait();
        assert_eq!(tos, Some(want), "--dscp {dscp}");
    }
}
