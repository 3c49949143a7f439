//! The software device enforces what a NIC enforces, and the engine's send
//! queue keeps to it: each hazard with an interleaving that breaks a user
//! without the guard.

#![allow(unsafe_code)]
#![allow(clippy::cast_possible_truncation)] // test patterns: values taken modulo a byte

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::queue::SendQueue;
use rdma::sim::{SimConfig, SimDevice, SimQp};
use rdma::{
    Access, Completion, Device, MemoryRegion, Op, QpCaps, QueuePair, RecvWr, Remote, SendWr, Sge, VerbsError, WcOp,
    WcStatus,
};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn caps(sq: u32, cq: u32) -> QpCaps {
    QpCaps { max_send_wr: sq, max_recv_wr: 16, cq_depth: cq }
}

/// A queue pair on each device, connected to each other.
fn connect(da: &SimDevice, db: &SimDevice, c: QpCaps) -> (SimQp, SimQp) {
    let mut a = da.create_sim_qp(c).unwrap();
    let mut b = db.create_sim_qp(c).unwrap();
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let deadline = Instant::now() + Duration::from_secs(5);
    let t = std::thread::spawn(move || {
        b.connect(&ea, deadline).unwrap();
        b
    });
    a.connect(&eb, deadline).unwrap();
    (a, t.join().unwrap())
}

/// Two connected queue pairs on two devices ("hosts").
fn pair(cfg: SimConfig, c: QpCaps) -> (Arc<SimDevice>, SimQp, Arc<SimDevice>, SimQp) {
    let (da, db) = (SimDevice::open(LO, cfg), SimDevice::open(LO, SimConfig { seed: cfg.seed + 1, ..cfg }));
    let (a, b) = connect(&da, &db, c);
    (da, a, db, b)
}

struct Buf {
    v: Vec<u8>,
    mr: Box<dyn MemoryRegion>,
}

fn buf(dev: &SimDevice, len: usize, fill: u8, access: Access) -> Buf {
    let mut v = vec![fill; len];
    // SAFETY: `v` outlives the region (dropped together, region first: see Drop order of Buf fields? The
    // region is only a table entry in the software device; queue pairs are dropped before buffers in every test).
    let mr = unsafe { dev.register(v.as_mut_ptr(), len, access) }.unwrap();
    Buf { v, mr }
}

impl Buf {
    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge { addr: self.mr.addr() + off as u64, len: len as u32, lkey: self.mr.lkey() }
    }
    fn remote(&self, off: usize) -> Remote {
        Remote { addr: self.mr.addr() + off as u64, rkey: self.mr.rkey() }
    }
    fn read(&self, i: usize) -> u8 {
        // SAFETY: in bounds; the device may write it concurrently only while
        // a request targets it, and tests read after its completion.
        unsafe { std::ptr::read_volatile(self.v.as_ptr().add(i)) }
    }
}

fn wait_wc(qp: &mut dyn QueuePair, n: usize) -> Result<Vec<Completion>, VerbsError> {
    let mut out = Vec::new();
    let mut wc = [Completion { wr_id: 0, status: WcStatus::Success, op: WcOp::Read, byte_len: 0 }; 16];
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n {
        let k = qp.poll(&mut wc)?;
        out.extend_from_slice(&wc[..k]);
        assert!(Instant::now() < deadline, "completions did not come: {out:?}");
        if k == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(out)
}

#[test]
fn read_write_and_send_move_bytes_without_the_passive_side() {
    let (da, mut a, db, mut b) = pair(SimConfig::default(), caps(16, 64));
    let src = buf(&db, 1 << 20, 0, Access::REMOTE_READ);
    for i in 0..src.v.len() {
        // SAFETY: no request targets it yet.
        unsafe { *src.v.as_ptr().cast_mut().add(i) = (i % 251) as u8 };
    }
    let dst = buf(&da, 1 << 20, 0, Access::LOCAL);
    // b's engine does nothing from here: its NIC threads serve the READ.
    a.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(4096)), sge: dst.sge(0, 65536), signaled: true }).unwrap();
    let wc = wait_wc(&mut a, 1).unwrap();
    assert_eq!(wc[0].status, WcStatus::Success);
    assert!((0..65536).all(|i| dst.read(i) == ((i + 4096) % 251) as u8));

    let target = buf(&db, 8192, 0, Access::REMOTE_WRITE);
    let rbuf = buf(&db, 64, 0, Access::LOCAL);
    b.post_recv(&RecvWr { wr_id: 9, sge: rbuf.sge(0, 64) }).unwrap();
    a.post_send(&SendWr { wr_id: 2, op: Op::WriteImm(target.remote(0), 77), sge: dst.sge(0, 8192), signaled: true })
        .unwrap();
    assert_eq!(wait_wc(&mut a, 1).unwrap()[0].status, WcStatus::Success);
    let r = wait_wc(&mut b, 1).unwrap();
    assert_eq!((r[0].wr_id, r[0].op), (9, WcOp::Recv { imm: Some(77) }));
    assert!((0..8192).all(|i| target.read(i) == ((i + 4096) % 251) as u8));
    drop((a, b));
}

#[test]
fn hazard_1_a_work_request_id_in_flight_is_refused_and_the_guard_never_reuses_one() {
    let (da, mut a, db, b) = pair(SimConfig::default(), caps(8, 32));
    let src = buf(&db, 65536, 5, Access::REMOTE_READ);
    let dst = buf(&da, 65536, 0, Access::LOCAL);
    // A user that names requests by their staging slot reuses the id of a
    // slot whose READ has not completed (the peer is slow).
    a.set_delay_us(50_000);
    a.post_send(&SendWr { wr_id: 3, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }).unwrap();
    let again =
        a.post_send(&SendWr { wr_id: 3, op: Op::Read(src.remote(0)), sge: dst.sge(4096, 4096), signaled: true });
    assert!(matches!(again, Err(VerbsError::DuplicateWrId(3))), "{again:?}");
    wait_wc(&mut a, 1).unwrap();
    a.set_delay_us(0);
    // The guard numbers every request and traces each completion back to
    // its context, exactly once.
    let mut q: SendQueue<usize> = SendQueue::new(Box::new(a), 8, 3, 1);
    let mut done = Vec::new();
    let mut next = 0usize;
    while done.len() < 500 {
        while q.room() > 0 && next < 500 {
            let k = next % 16;
            q.post(Op::Read(src.remote(k * 4096)), dst.sge(k * 4096, 4096), next, next == 499 || q.room() == 1)
                .unwrap();
            next += 1;
        }
        q.poll(&mut done).unwrap();
    }
    let mut ids: Vec<usize> = done
        .iter()
        .map(|(c, s)| {
            assert_eq!(*s, WcStatus::Success);
            *c
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..500).collect::<Vec<_>>());
    drop((q, b));
}

#[test]
fn hazard_2_slots_are_reclaimed_only_by_a_polled_signaled_completion() {
    let (da, mut a, db, b) = pair(SimConfig::default(), caps(4, 16));
    let src = buf(&db, 65536, 1, Access::REMOTE_READ);
    let dst = buf(&da, 65536, 0, Access::LOCAL);
    // Without grouping: four unsignaled requests fill the queue, they all
    // complete on the wire, and still no slot comes back.
    for i in 0..4 {
        a.post_send(&SendWr { wr_id: i, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: false }).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut wc = [Completion { wr_id: 0, status: WcStatus::Success, op: WcOp::Read, byte_len: 0 }; 4];
    assert_eq!(a.poll(&mut wc).unwrap(), 0);
    let full = a.post_send(&SendWr { wr_id: 9, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true });
    assert!(matches!(full, Err(VerbsError::SendQueueFull { depth: 4 })), "{full:?}");
    assert_eq!(a.unreclaimed(), 4);
    drop(a);

    // With the guard: one in three signaled, the last free slot always
    // signaled, so a queue of 4 carries thousands of requests.
    let (da, a, db, b2) = pair(SimConfig { seed: 7, max_delay_us: 30 }, caps(4, 16));
    let src = buf(&db, 65536, 1, Access::REMOTE_READ);
    let dst = buf(&da, 65536, 0, Access::LOCAL);
    let mut q: SendQueue<u32> = SendQueue::new(Box::new(a), 4, 3, 2);
    let (mut posted, mut done) = (0u32, Vec::new());
    while done.len() < 2000 {
        while q.room() > 0 && posted < 2000 {
            q.post(Op::Read(src.remote(0)), dst.sge(0, 4096), posted, posted == 1999).unwrap();
            posted += 1;
        }
        q.poll(&mut done).unwrap();
    }
    assert!(q.completions < 2000, "grouped: {} completions for 2000 requests", q.completions);
    drop((q, b, b2));
}

#[test]
fn hazard_3_writes_on_two_queue_pairs_land_out_of_order() {
    // Two queue pairs to the same host; the first is slow. An older write
    // posted on it lands after a newer one on the other and clobbers it:
    // why a write that overlaps one in flight must wait for it (and why
    // the engine never writes into a page it does not own).
    let da = SimDevice::open(LO, SimConfig::default());
    let db = SimDevice::open(LO, SimConfig { seed: 2, ..SimConfig::default() });
    let mk = || connect(&da, &db, caps(8, 32));
    let (mut slow, s_peer) = mk();
    let (mut fast, f_peer) = mk();
    let old = buf(&da, 4096, 0xAA, Access::LOCAL);
    let new = buf(&da, 4096, 0xBB, Access::LOCAL);
    let page = buf(&db, 4096, 0, Access::REMOTE_WRITE);
    slow.set_delay_us(30_000);
    slow.post_send(&SendWr { wr_id: 1, op: Op::Write(page.remote(0)), sge: old.sge(0, 4096), signaled: true }).unwrap();
    fast.post_send(&SendWr { wr_id: 2, op: Op::Write(page.remote(0)), sge: new.sge(0, 4096), signaled: true }).unwrap();
    wait_wc(&mut fast, 1).unwrap();
    assert_eq!(page.read(0), 0xBB);
    wait_wc(&mut slow, 1).unwrap();
    assert_eq!(page.read(0), 0xAA, "the older write landed last");
    drop((slow, fast, s_peer, f_peer));
}

#[test]
fn a_buffer_reused_before_its_completion_is_corrupted_later() {
    // A user that frees a staging buffer when it posts the next READ into
    // it, not when the first READ's completion is polled: the first READ,
    // slow on its queue pair, lands after the second and overwrites the
    // bytes the user already took for the second. (The engine's slots go
    // back to the free list only after their completion is polled.)
    let da = SimDevice::open(LO, SimConfig::default());
    let db = SimDevice::open(LO, SimConfig { seed: 3, ..SimConfig::default() });
    let mk = || connect(&da, &db, caps(8, 32));
    let (mut slow, sp) = mk();
    let (mut fast, fp) = mk();
    let src = buf(&db, 8192, 0, Access::REMOTE_READ);
    // SAFETY: no request targets the source buffer yet.
    unsafe {
        std::ptr::write_bytes(src.v.as_ptr().cast_mut(), 0x11, 4096);
        std::ptr::write_bytes(src.v.as_ptr().cast_mut().add(4096), 0x22, 4096);
    }
    let slot = buf(&da, 4096, 0, Access::LOCAL);
    slow.set_delay_us(30_000);
    slow.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(0)), sge: slot.sge(0, 4096), signaled: true }).unwrap();
    fast.post_send(&SendWr { wr_id: 2, op: Op::Read(src.remote(4096)), sge: slot.sge(0, 4096), signaled: true })
        .unwrap();
    wait_wc(&mut fast, 1).unwrap();
    assert_eq!(slot.read(0), 0x22, "the second READ's bytes, as the user takes them");
    wait_wc(&mut slow, 1).unwrap();
    assert_eq!(slot.read(0), 0x11, "and then the first READ lands on them");
    drop((slow, fast, sp, fp));
}

#[test]
fn receiver_not_ready_fails_the_queue_pair() {
    let (da, mut a, db, mut b) = pair(SimConfig::default(), caps(8, 32));
    let msg = buf(&da, 64, 3, Access::LOCAL);
    a.post_send(&SendWr { wr_id: 1, op: Op::Send, sge: msg.sge(0, 64), signaled: true }).unwrap();
    a.post_send(&SendWr { wr_id: 2, op: Op::Send, sge: msg.sge(0, 64), signaled: true }).unwrap();
    let wc = wait_wc(&mut a, 2).unwrap();
    assert_eq!(wc[0].status, WcStatus::RnrRetryExceeded);
    assert_eq!(wc[1].status, WcStatus::Flushed);
    let after = a.post_send(&SendWr { wr_id: 3, op: Op::Send, sge: msg.sge(0, 64), signaled: true });
    assert!(matches!(after, Err(VerbsError::QpError(_))), "{after:?}");
    // Posted first, the same SEND arrives.
    let (da, mut a, db2, mut b2) = pair(SimConfig::default(), caps(8, 32));
    let msg = buf(&da, 64, 3, Access::LOCAL);
    let rb = buf(&db2, 64, 0, Access::LOCAL);
    b2.post_recv(&RecvWr { wr_id: 5, sge: rb.sge(0, 64) }).unwrap();
    a.post_send(&SendWr { wr_id: 1, op: Op::Send, sge: msg.sge(0, 64), signaled: true }).unwrap();
    assert_eq!(wait_wc(&mut a, 1).unwrap()[0].status, WcStatus::Success);
    assert_eq!(wait_wc(&mut b2, 1).unwrap()[0].byte_len, 64);
    assert_eq!(rb.read(63), 3);
    let _ = (&mut b, db);
}

#[test]
fn bad_keys_and_out_of_range_accesses_fail_the_queue_pair() {
    for case in 0..3 {
        let (da, mut a, db, b) = pair(SimConfig::default(), caps(8, 32));
        let src = buf(&db, 8192, 1, Access::REMOTE_READ);
        let dst = buf(&da, 8192, 0, Access::LOCAL);
        let remote = match case {
            0 => Remote { rkey: src.mr.rkey() ^ 1, ..src.remote(0) },
            1 => src.remote(4097),
            _ => Remote { rkey: src.mr.rkey(), addr: src.mr.addr() - 4096 },
        };
        a.post_send(&SendWr { wr_id: 1, op: Op::Read(remote), sge: dst.sge(0, 4096), signaled: true }).unwrap();
        assert_eq!(wait_wc(&mut a, 1).unwrap()[0].status, WcStatus::RemoteAccess, "case {case}");
        assert!(matches!(
            a.post_send(&SendWr { wr_id: 2, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }),
            Err(VerbsError::QpError(_))
        ));
        // Writing into a region that only grants reads is refused too.
        drop((a, b));
    }
    // A local buffer outside its region is refused at post.
    let (da, mut a, db, _b) = pair(SimConfig::default(), caps(8, 32));
    let src = buf(&db, 8192, 1, Access::REMOTE_READ);
    let dst = buf(&da, 4096, 0, Access::LOCAL);
    let r = a.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(0)), sge: dst.sge(0, 8192), signaled: true });
    assert!(matches!(r, Err(VerbsError::LocalProtection { .. })), "{r:?}");
    let ro = buf(&da, 4096, 0, Access::REMOTE_READ);
    let r = a.post_send(&SendWr { wr_id: 2, op: Op::Read(src.remote(0)), sge: ro.sge(0, 4096), signaled: true });
    assert!(matches!(r, Err(VerbsError::LocalProtection { .. })), "a READ into memory not locally writable: {r:?}");
}

#[test]
fn a_completion_queue_overrun_is_fatal() {
    let (da, mut a, db, _b) = pair(SimConfig::default(), caps(16, 4));
    let src = buf(&db, 4096, 1, Access::REMOTE_READ);
    let dst = buf(&da, 4096, 0, Access::LOCAL);
    for i in 0..6 {
        a.post_send(&SendWr { wr_id: i, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut wc = [Completion { wr_id: 0, status: WcStatus::Success, op: WcOp::Read, byte_len: 0 }; 8];
    assert!(matches!(a.poll(&mut wc), Err(VerbsError::CqOverrun { depth: 4 })));
}

#[test]
fn a_dead_peer_raises_nothing() {
    let (da, mut a, db, b) = pair(SimConfig::default(), caps(8, 32));
    let src = buf(&db, 4096, 1, Access::REMOTE_READ);
    let dst = buf(&da, 4096, 0, Access::LOCAL);
    drop(b);
    a.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut wc = [Completion { wr_id: 0, status: WcStatus::Success, op: WcOp::Read, byte_len: 0 }; 8];
    // No error and no completion: the engine's own liveness must notice.
    assert_eq!(a.poll(&mut wc).unwrap(), 0);
}

#[test]
fn arming_fires_the_readiness_descriptor_once() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (da, mut a, db, _b) = pair(SimConfig::default(), caps(8, 32));
    let src = buf(&db, 4096, 1, Access::REMOTE_READ);
    let dst = buf(&da, 4096, 0, Access::LOCAL);
    a.arm().unwrap();
    a.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }).unwrap();
    let mut fds = [PollFd::new(a.readiness(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
    wait_wc(&mut a, 1).unwrap();
    a.arm().unwrap();
    let mut fds = [PollFd::new(a.readiness(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(50u8)).unwrap(), 0, "nothing completed since arming");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, ..Default::default() })]
    /// Under random delays on two queue pairs, every READ lands once with
    /// the right bytes.
    #[test]
    fn every_read_lands_once_with_its_bytes(seed in 0u64..1000, n in 50usize..200) {
        let cfg = SimConfig { seed, max_delay_us: 200 };
        let (da, a1, db, b1) = pair(cfg, caps(16, 64));
        let (a2, b2) = connect(&da, &db, caps(16, 64));
        let pages = 256usize;
        let src = buf(&db, pages * 4096, 0, Access::REMOTE_READ);
        for p in 0..pages {
            // SAFETY: no request targets it yet.
            unsafe { std::ptr::write_bytes(src.v.as_ptr().cast_mut().add(p * 4096), (p % 255) as u8 + 1, 4096) };
        }
        let dst = buf(&da, n * 4096, 0, Access::LOCAL);
        let mut qs = [SendQueue::<(usize, usize)>::new(Box::new(a1), 16, 4, 1), SendQueue::new(Box::new(a2), 16, 4, 2)];
        let mut x = seed;
        let mut next = 0;
        let mut got = vec![0u32; n];
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.contains(&0) {
            proptest::prop_assert!(Instant::now() < deadline);
            for (qi, q) in qs.iter_mut().enumerate() {
                let go = |next: usize, room: u32| next < n && room > 0 && (next % 2 == qi || room > 8);
                while go(next, q.room()) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let p = (x >> 33) as usize % pages;
                    // The last request of a batch is signaled, or its completion never comes.
                    let last = !go(next + 1, q.room() - 1);
                    q.post(Op::Read(src.remote(p * 4096)), dst.sge(next * 4096, 4096), (next, p), last).unwrap();
                    next += 1;
                }
                proptest::prop_assert!(!q.needs_signal());
                done.clear();
                q.poll(&mut done).unwrap();
                for &((slot, p), st) in &done {
                    proptest::prop_assert_eq!(st, WcStatus::Success);
                    got[slot] += 1;
                    let want = (p % 255) as u8 + 1;
                    proptest::prop_assert!((0..4096).all(|i| dst.read(slot * 4096 + i) == want));
                }
            }
        }
        proptest::prop_assert!(got.iter().all(|&g| g == 1));
        drop((qs, b1, b2));
    }
}
