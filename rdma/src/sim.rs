//! A software verbs device that behaves like a NIC, across processes.
//!
//! As soft-RoCE carries verbs over Ethernet, this carries them over one TCP
//! connection per queue pair (loopback, or a veth between namespaces). Each
//! queue pair has two "NIC" threads: `sim-tx` executes posted send requests
//! in order (after a seeded delay) and `sim-rx` takes what the peer sends:
//! responses to our requests, and the peer's requests, which it carries out
//! against registered memory itself. The passive side's engine threads are
//! never involved in a READ or WRITE, as with a NIC.
//!
//! What it enforces, each as a NIC reports it:
//! * a work request id that is still in flight: refused at post
//!   ([`VerbsError::DuplicateWrId`]; real NICs do not check ids, so this is
//!   stricter, to make completions traceable);
//! * a send queue whose slots were not reclaimed by a *polled* completion
//!   at or after them: [`VerbsError::SendQueueFull`] (ENOMEM);
//! * a local buffer outside its region: refused at post;
//! * a bad rkey, an access outside the peer's region or not granted:
//!   [`WcStatus::RemoteAccess`], and the queue pair goes to the error state
//!   (every other request flushed);
//! * a SEND or WRITE with immediate that finds no receive posted:
//!   [`WcStatus::RnrRetryExceeded`] (the engine connects with no RNR
//!   retries), error state;
//! * a completion queue that overruns: [`VerbsError::CqOverrun`] at the
//!   next poll, error state.
//!
//! Registration pins the memory as a NIC's does (see `pin`), so the
//! registration time it reports is the host's share of a real one.
//!
//! Completions are in order per queue pair (the requests of one queue pair
//! go down one stream, answered in order) and in any order across queue
//! pairs. Nothing times out: a peer that is gone leaves its requests
//! pending forever, as a NIC's would be until its retries ran out.

#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::verbs::{
    Access, Completion, Device, Endpoint, MemoryRegion, Op, QpCaps, QueuePair, RecvWr, SendWr, VerbsError, WcOp,
    WcStatus,
};

/// How the software device behaves.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    /// Seed of the delays.
    pub seed: u64,
    /// Each send request waits a seeded delay in `[0, max_delay_us]` before
    /// it runs (0: none).
    pub max_delay_us: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { seed: 1, max_delay_us: 0 }
    }
}

#[derive(Clone, Copy, Debug)]
struct MrEntry {
    addr: u64,
    len: usize,
    access: Access,
}

impl MrEntry {
    fn covers(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= self.addr + self.len as u64)
    }
}

struct DevInner {
    bind: IpAddr,
    cfg: SimConfig,
    /// By lkey.
    local: RwLock<HashMap<u32, MrEntry>>,
    /// By rkey.
    remote: RwLock<HashMap<u32, MrEntry>>,
    next_key: AtomicU32,
    next_qp: AtomicU64,
}

/// The software device.
pub struct SimDevice {
    inner: Arc<DevInner>,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Fall back on the clock and pid: tokens only need to differ.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs());
        return t ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

impl SimDevice {
    /// Open a software device whose queue pairs listen on `bind`.
    pub fn open(bind: IpAddr, cfg: SimConfig) -> Arc<SimDevice> {
        // Keys start somewhere random so a peer cannot guess them.
        let k = (random_u64() >> 32) as u32 | 1;
        Arc::new(SimDevice {
            inner: Arc::new(DevInner {
                bind,
                cfg,
                local: RwLock::new(HashMap::new()),
                remote: RwLock::new(HashMap::new()),
                next_key: AtomicU32::new(k),
                next_qp: AtomicU64::new(0),
            }),
        })
    }

    /// A queue pair of the concrete type (tests use its extra knobs).
    pub fn create_sim_qp(&self, caps: QpCaps) -> Result<SimQp, VerbsError> {
        SimQp::new(Arc::clone(&self.inner), caps)
    }
}

/// A registered region of the software device.
pub struct SimMr {
    dev: Arc<DevInner>,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: usize,
    /// The pin, as a NIC's registration pins: an io_uring whose fixed
    /// buffers hold the pages (closing it unpins them).
    _pin: Option<std::os::fd::OwnedFd>,
}

/// Pin `[addr, addr + len)` the way `ibv_reg_mr` does (pin_user_pages with
/// FOLL_LONGTERM), through io_uring's fixed buffers (at most 1 GiB each),
/// so that registering here costs the host what it costs with a NIC (less
/// the NIC's own translation table). `None` if the kernel refuses.
fn pin(addr: *mut u8, len: usize) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes a struct io_uring_params (120 bytes).
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor io_uring_setup just returned, owned from here.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    const CHUNK: usize = 1 << 30;
    let iov: Vec<libc::iovec> = (0..len.div_ceil(CHUNK))
        // SAFETY: each piece lies inside the caller's range.
        .map(|i| libc::iovec { iov_base: unsafe { addr.add(i * CHUNK) }.cast(), iov_len: CHUNK.min(len - i * CHUNK) })
        .collect();
    let n = u32::try_from(iov.len()).ok()?;
    // SAFETY: `iov` describes memory the caller keeps mapped while registered
    // (the `Device::register` contract); IORING_REGISTER_BUFFERS is 0.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_register, fd, 0u32, iov.as_ptr(), n) };
    (r == 0).then_some(owned)
}

impl MemoryRegion for SimMr {
    fn lkey(&self) -> u32 {
        self.lkey
    }
    fn rkey(&self) -> u32 {
        self.rkey
    }
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SimMr {
    fn drop(&mut self) {
        self.dev.local.write().remove(&self.lkey);
        self.dev.remote.write().remove(&self.rkey);
    }
}

impl Device for SimDevice {
    fn name(&self) -> &str {
        "sim"
    }

    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Box<dyn MemoryRegion>, VerbsError> {
        if addr.is_null() || len == 0 || (addr as u64).checked_add(len as u64).is_none() {
            return Err(VerbsError::Os { op: "register", source: std::io::Error::from_raw_os_error(libc::EINVAL) });
        }
        let step = 0x9E37_79B9u32;
        let lkey = self.inner.next_key.fetch_add(step, Ordering::Relaxed);
        let rkey = lkey.rotate_left(16) ^ 0xA5A5_0000;
        let e = MrEntry { addr: addr as u64, len, access };
        let pinned = pin(addr, len);
        if pinned.is_none() {
            tracing::debug!("the software device could not pin {len} bytes (io_uring): registered unpinned");
        }
        self.inner.local.write().insert(lkey, e);
        self.inner.remote.write().insert(rkey, e);
        Ok(Box::new(SimMr { dev: Arc::clone(&self.inner), lkey, rkey, addr: addr as u64, len, _pin: pinned }))
    }

    fn create_qp(&self, caps: QpCaps) -> Result<Box<dyn QueuePair>, VerbsError> {
        Ok(Box::new(self.create_sim_qp(caps)?))
    }
}

// ---- packets -------------------------------------------------------------

const T_READ: u8 = 1;
const T_WRITE: u8 = 2;
const T_SEND: u8 = 3;
const T_ACK: u8 = 4;
const T_READ_RESP: u8 = 5;

const F_IMM: u8 = 1;

const S_OK: u8 = 0;
const S_REMOTE_ACCESS: u8 = 1;
const S_RNR: u8 = 2;
const S_INVALID: u8 = 3;

const HDR: usize = 32;

#[derive(Clone, Copy, Debug, Default)]
struct Hdr {
    ty: u8,
    status: u8,
    flags: u8,
    len: u32,
    raddr: u64,
    rkey: u32,
    imm: u32,
    psn: u64,
}

impl Hdr {
    fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0] = self.ty;
        b[1] = self.status;
        b[2] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.raddr.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b[20..24].copy_from_slice(&self.imm.to_le_bytes());
        b[24..32].copy_from_slice(&self.psn.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HDR]) -> Hdr {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Hdr {
            ty: b[0],
            status: b[1],
            flags: b[2],
            len: u32_at(4),
            raddr: u64_at(8),
            rkey: u32_at(16),
            imm: u32_at(20),
            psn: u64_at(24),
        }
    }
}

/// Largest single transfer (a real RC message is up to 2 GiB; ours are runs).
const MAX_MSG: u32 = 64 << 20;

fn os(op: &'static str, e: std::io::Error) -> VerbsError {
    VerbsError::Os { op, source: e }
}

/// Write `len` bytes at `ptr` to `fd`.
///
/// # Safety
/// `[ptr, ptr + len)` must be readable for the call (registered memory).
unsafe fn write_raw(fd: &TcpStream, ptr: *const u8, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees the range is readable.
        let n = unsafe { libc::write(fd.as_raw_fd(), ptr.add(done).cast(), len - done) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n.cast_unsigned();
    }
    Ok(())
}

/// Read exactly `len` bytes from `fd` into `ptr`.
///
/// # Safety
/// `[ptr, ptr + len)` must be writable for the call (registered memory).
unsafe fn read_raw(fd: &TcpStream, ptr: *mut u8, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees the range is writable.
        let n = unsafe { libc::read(fd.as_raw_fd(), ptr.add(done).cast(), len - done) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n.cast_unsigned();
    }
    Ok(())
}

fn discard(s: &mut TcpStream, mut len: usize) -> std::io::Result<()> {
    let mut buf = [0u8; 16 << 10];
    while len > 0 {
        let k = len.min(buf.len());
        s.read_exact(&mut buf[..k])?;
        len -= k;
    }
    Ok(())
}

// ---- queue pair ----------------------------------------------------------

struct Pending {
    wr: SendWr,
    psn: u64,
}

#[derive(Default)]
struct QpState {
    /// Posted, not yet started by the NIC.
    sq: VecDeque<Pending>,
    /// Started, waiting for the peer's answer (in order).
    awaiting: VecDeque<Pending>,
    rq: VecDeque<RecvWr>,
    cq: VecDeque<Completion>,
    error: Option<String>,
    cq_overrun: bool,
    armed: bool,
    stop: bool,
}

struct QpShared {
    st: Mutex<QpState>,
    work: Condvar,
    event: EventFd,
    caps: QpCaps,
    /// Extra delay before each request (tests inject interleavings with it).
    delay_us: AtomicU32,
}

impl QpShared {
    fn push_cq(&self, st: &mut QpState, c: Completion) {
        if st.cq_overrun {
            return;
        }
        if st.cq.len() >= self.caps.cq_depth as usize {
            st.cq_overrun = true;
            self.to_error(st, format!("completion queue overrun ({} entries)", self.caps.cq_depth));
            self.notify(st, true);
            return;
        }
        st.cq.push_back(c);
        self.notify(st, false);
    }

    fn notify(&self, st: &mut QpState, always: bool) {
        if st.armed || always {
            st.armed = false;
            let _ = self.event.write(1);
        }
    }

    /// Error state: everything not done is flushed.
    fn to_error(&self, st: &mut QpState, why: String) {
        if st.error.is_some() {
            return;
        }
        tracing::debug!("sim queue pair to error: {why}");
        st.error = Some(why);
        let mut flushed: Vec<Completion> = Vec::new();
        for p in st.awaiting.drain(..).chain(st.sq.drain(..)) {
            flushed.push(Completion { wr_id: p.wr.wr_id, status: WcStatus::Flushed, op: wc_op(p.wr.op), byte_len: 0 });
        }
        for r in st.rq.drain(..) {
            flushed.push(Completion {
                wr_id: r.wr_id,
                status: WcStatus::Flushed,
                op: WcOp::Recv { imm: None },
                byte_len: 0,
            });
        }
        for c in flushed {
            if st.cq.len() >= self.caps.cq_depth as usize {
                st.cq_overrun = true;
                break;
            }
            st.cq.push_back(c);
        }
        self.notify(st, true);
        self.work.notify_all();
    }
}

fn wc_op(op: Op) -> WcOp {
    match op {
        Op::Read(_) => WcOp::Read,
        Op::Write(_) | Op::WriteImm(..) => WcOp::Write,
        Op::Send => WcOp::Send,
    }
}

/// A queue pair of the software device.
pub struct SimQp {
    dev: Arc<DevInner>,
    shared: Arc<QpShared>,
    token: u64,
    listener: Option<TcpListener>,
    port: u16,
    stream: Option<TcpStream>,
    threads: Vec<JoinHandle<()>>,
    /// Posted and not reclaimed, in post order: (wr_id).
    unreclaimed: VecDeque<u64>,
    ids: HashSet<u64>,
    psn: u64,
    rng: u64,
}

impl SimQp {
    fn new(dev: Arc<DevInner>, caps: QpCaps) -> Result<SimQp, VerbsError> {
        if caps.max_send_wr == 0 || caps.cq_depth == 0 {
            return Err(os("create_qp", std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let listener = TcpListener::bind(SocketAddr::new(dev.bind, 0)).map_err(|e| os("bind", e))?;
        let port = listener.local_addr().map_err(|e| os("getsockname", e))?.port();
        let event =
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| os("eventfd", e.into()))?;
        let n = dev.next_qp.fetch_add(1, Ordering::Relaxed);
        let rng = dev.cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D;
        Ok(SimQp {
            shared: Arc::new(QpShared {
                st: Mutex::new(QpState::default()),
                work: Condvar::new(),
                event,
                caps,
                delay_us: AtomicU32::new(0),
            }),
            dev,
            token: random_u64(),
            listener: Some(listener),
            port,
            stream: None,
            threads: Vec::new(),
            unreclaimed: VecDeque::new(),
            ids: HashSet::new(),
            psn: 0,
            rng,
        })
    }

    /// Delay every request of this queue pair by `us` more (tests).
    pub fn set_delay_us(&self, us: u32) {
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }

    /// Send-queue slots not yet reclaimed.
    pub fn unreclaimed(&self) -> usize {
        self.unreclaimed.len()
    }

    fn check_local(&self, addr: u64, len: u32, lkey: u32, write: bool) -> Result<(), VerbsError> {
        let ok = self
            .dev
            .local
            .read()
            .get(&lkey)
            .is_some_and(|e| e.covers(addr, u64::from(len)) && (!write || e.access.local_write));
        if ok { Ok(()) } else { Err(VerbsError::LocalProtection { addr, len, lkey }) }
    }

    fn start(&mut self, stream: TcpStream) -> Result<(), VerbsError> {
        stream.set_nodelay(true).map_err(|e| os("TCP_NODELAY", e))?;
        let rx = stream.try_clone().map_err(|e| os("dup", e))?;
        let tx = stream.try_clone().map_err(|e| os("dup", e))?;
        let writer = Arc::new(Mutex::new(tx));
        let (sh, dev, w) = (Arc::clone(&self.shared), Arc::clone(&self.dev), Arc::clone(&writer));
        let mut rng = self.rng;
        let max_delay = self.dev.cfg.max_delay_us;
        self.threads.push(
            std::thread::Builder::new()
                .name("sim-tx".into())
                .spawn(move || tx_loop(&sh, &w, max_delay, &mut rng))
                .map_err(|e| os("spawn", e))?,
        );
        let sh = Arc::clone(&self.shared);
        self.threads.push(
            std::thread::Builder::new()
                .name("sim-rx".into())
                .spawn(move || rx_loop(&sh, &dev, rx, &writer))
                .map_err(|e| os("spawn", e))?,
        );
        self.stream = Some(stream);
        Ok(())
    }
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The requester: runs posted requests in order.
fn tx_loop(sh: &QpShared, w: &Mutex<TcpStream>, max_delay: u32, rng: &mut u64) {
    loop {
        let p = {
            let mut st = sh.st.lock();
            loop {
                if st.stop {
                    return;
                }
                if st.error.is_none()
                    && let Some(p) = st.sq.pop_front()
                {
                    break p;
                }
                sh.work.wait(&mut st);
            }
        };
        let extra = sh.delay_us.load(Ordering::Relaxed);
        let jitter =
            if max_delay > 0 { u32::try_from(splitmix(rng) % (u64::from(max_delay) + 1)).unwrap_or(0) } else { 0 };
        if extra + jitter > 0 {
            std::thread::sleep(Duration::from_micros(u64::from(extra + jitter)));
        }
        let (ty, raddr, rkey, flags, imm) = match p.wr.op {
            Op::Read(r) => (T_READ, r.addr, r.rkey, 0, 0),
            Op::Write(r) => (T_WRITE, r.addr, r.rkey, 0, 0),
            Op::WriteImm(r, imm) => (T_WRITE, r.addr, r.rkey, F_IMM, imm),
            Op::Send => (T_SEND, 0, 0, 0, 0),
        };
        let h = Hdr { ty, status: S_OK, flags, len: p.wr.sge.len, raddr, rkey, imm, psn: p.psn };
        let (addr, len, carries) = (p.wr.sge.addr, p.wr.sge.len as usize, ty != T_READ);
        {
            let mut st = sh.st.lock();
            if st.stop {
                continue;
            }
            if st.error.is_some() {
                // The queue pair failed while this one waited: it is flushed
                // like the rest.
                let c = Completion { wr_id: p.wr.wr_id, status: WcStatus::Flushed, op: wc_op(p.wr.op), byte_len: 0 };
                sh.push_cq(&mut st, c);
                continue;
            }
            st.awaiting.push_back(p);
        }
        let s = w.lock();
        let r = (&*s).write_all(&h.encode()).and_then(|()| {
            if carries {
                // SAFETY: the buffer was checked against a registered region
                // at post, and regions outlive the queue pairs using them.
                unsafe { write_raw(&s, addr as *const u8, len) }
            } else {
                Ok(())
            }
        });
        if r.is_err() {
            // The peer is gone: its requests stay pending (nothing times out).
            drop(s);
            let mut st = sh.st.lock();
            while !st.stop {
                sh.work.wait(&mut st);
            }
            return;
        }
    }
}

/// The responder and completer: the peer's requests against our memory,
/// the answers to ours.
fn rx_loop(sh: &QpShared, dev: &DevInner, mut s: TcpStream, w: &Mutex<TcpStream>) {
    let _ = rx_serve(sh, dev, &mut s, w);
    // Peer gone or torn down: nothing more completes.
}

fn rx_serve(sh: &QpShared, dev: &DevInner, s: &mut TcpStream, w: &Mutex<TcpStream>) -> std::io::Result<()> {
    let mut hb = [0u8; HDR];
    loop {
        s.read_exact(&mut hb)?;
        let h = Hdr::decode(&hb);
        if h.len > MAX_MSG {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let len = h.len as usize;
        match h.ty {
            T_READ => {
                let mr = dev.remote.read().get(&h.rkey).copied();
                let ok = mr.is_some_and(|m| m.access.remote_read && m.covers(h.raddr, u64::from(h.len)));
                let ws = w.lock();
                let resp = Hdr {
                    ty: T_READ_RESP,
                    status: if ok { S_OK } else { S_REMOTE_ACCESS },
                    psn: h.psn,
                    len: if ok { h.len } else { 0 },
                    ..Hdr::default()
                };
                (&*ws).write_all(&resp.encode())?;
                if ok {
                    // SAFETY: the range lies in a registered region (checked
                    // above), which stays mapped while registered.
                    unsafe { write_raw(&ws, h.raddr as *const u8, len)? };
                }
            }
            T_WRITE | T_SEND => {
                let status = if h.ty == T_WRITE {
                    let mr = dev.remote.read().get(&h.rkey).copied();
                    let ok = mr.is_some_and(|m| m.access.remote_write && m.covers(h.raddr, u64::from(h.len)));
                    if !ok { S_REMOTE_ACCESS } else { S_OK }
                } else {
                    S_OK
                };
                // A receive is needed for a SEND and a WRITE with immediate.
                let needs_recv = h.ty == T_SEND || h.flags & F_IMM != 0;
                let recv = if status == S_OK && needs_recv {
                    let mut st = sh.st.lock();
                    if st.error.is_some() { None } else { st.rq.pop_front() }
                } else {
                    None
                };
                let status = if status == S_OK && needs_recv && recv.is_none() { S_RNR } else { status };
                let mut status = status;
                if status == S_OK {
                    if h.ty == T_WRITE {
                        // SAFETY: checked against a registered, remotely writable region.
                        unsafe { read_raw(s, h.raddr as *mut u8, len)? };
                    } else if let Some(r) = &recv {
                        if r.sge.len < h.len {
                            discard(s, len)?;
                            status = S_INVALID;
                        } else {
                            // SAFETY: the receive's buffer was checked at post
                            // against a locally writable region.
                            unsafe { read_raw(s, r.sge.addr as *mut u8, len)? };
                        }
                    }
                } else {
                    discard(s, len)?;
                }
                if let Some(r) = recv {
                    let mut st = sh.st.lock();
                    let (wst, imm) = match status {
                        S_OK => (WcStatus::Success, (h.flags & F_IMM != 0).then_some(h.imm)),
                        _ => (WcStatus::LocalLength, None),
                    };
                    sh.push_cq(
                        &mut st,
                        Completion { wr_id: r.wr_id, status: wst, op: WcOp::Recv { imm }, byte_len: h.len },
                    );
                    if wst != WcStatus::Success {
                        sh.to_error(&mut st, "a received message did not fit its buffer".into());
                    }
                }
                let ws = w.lock();
                (&*ws).write_all(&Hdr { ty: T_ACK, status, psn: h.psn, ..Hdr::default() }.encode())?;
            }
            T_ACK | T_READ_RESP => {
                let p = {
                    let mut st = sh.st.lock();
                    match st.awaiting.front() {
                        Some(p) if p.psn == h.psn => st.awaiting.pop_front(),
                        // Flushed (error state) or out of order: drop it.
                        _ => None,
                    }
                };
                let Some(p) = p else {
                    if h.ty == T_READ_RESP {
                        discard(s, len)?;
                    }
                    continue;
                };
                if h.ty == T_READ_RESP && h.status == S_OK {
                    if h.len != p.wr.sge.len {
                        return Err(std::io::ErrorKind::InvalidData.into());
                    }
                    // SAFETY: the READ's local buffer was checked at post
                    // against a locally writable region.
                    unsafe { read_raw(s, p.wr.sge.addr as *mut u8, len)? };
                }
                let status = match h.status {
                    S_OK => WcStatus::Success,
                    S_REMOTE_ACCESS => WcStatus::RemoteAccess,
                    S_RNR => WcStatus::RnrRetryExceeded,
                    v => WcStatus::Other(u32::from(v)),
                };
                let mut st = sh.st.lock();
                if status != WcStatus::Success || p.wr.signaled {
                    sh.push_cq(&mut st, Completion { wr_id: p.wr.wr_id, status, op: wc_op(p.wr.op), byte_len: 0 });
                }
                if status != WcStatus::Success {
                    sh.to_error(&mut st, format!("work request {:#x} failed: {status}", p.wr.wr_id));
                }
            }
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        }
    }
}

const EP_TAG: u8 = b'S';

fn encode_endpoint(ip: IpAddr, port: u16, token: u64) -> Endpoint {
    let mut b = vec![EP_TAG, 1];
    match ip {
        IpAddr::V4(v) => {
            b.push(4);
            b.extend_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            b.push(6);
            b.extend_from_slice(&v.octets());
        }
    }
    b.extend_from_slice(&port.to_le_bytes());
    b.extend_from_slice(&token.to_le_bytes());
    Endpoint(b)
}

fn decode_endpoint(e: &Endpoint) -> Result<(SocketAddr, u64), VerbsError> {
    let b = &e.0;
    let bad = |w: &str| VerbsError::BadEndpoint(format!("software device endpoint: {w}"));
    if b.len() < 3 || b[0] != EP_TAG || b[1] != 1 {
        return Err(bad("not a software device's (is the peer using a real device?)"));
    }
    let (ip, rest): (IpAddr, &[u8]) = match b[2] {
        4 if b.len() == 3 + 4 + 10 => {
            (IpAddr::from(<[u8; 4]>::try_from(&b[3..7]).map_err(|_| bad("length"))?), &b[7..])
        }
        6 if b.len() == 3 + 16 + 10 => {
            (IpAddr::from(<[u8; 16]>::try_from(&b[3..19]).map_err(|_| bad("length"))?), &b[19..])
        }
        _ => return Err(bad("length or address family")),
    };
    let port = u16::from_le_bytes([rest[0], rest[1]]);
    let token = u64::from_le_bytes(rest[2..10].try_into().map_err(|_| bad("length"))?);
    Ok((SocketAddr::new(ip, port), token))
}

impl QueuePair for SimQp {
    fn endpoint(&self) -> Endpoint {
        encode_endpoint(self.dev.bind, self.port, self.token)
    }

    fn connect(&mut self, remote: &Endpoint, deadline: Instant) -> Result<(), VerbsError> {
        if self.stream.is_some() {
            return Err(VerbsError::Connect("already connected".into()));
        }
        let (addr, token) = decode_endpoint(remote)?;
        if token == self.token {
            return Err(VerbsError::Connect("the peer's endpoint is this queue pair's own".into()));
        }
        let hello = |a: u64, b: u64| {
            let mut h = [0u8; 24];
            h[..8].copy_from_slice(b"PCSIMQP1");
            h[8..16].copy_from_slice(&a.to_le_bytes());
            h[16..].copy_from_slice(&b.to_le_bytes());
            h
        };
        let left = || deadline.saturating_duration_since(Instant::now());
        let stream = if self.token < token {
            // Active side.
            let t = left();
            if t.is_zero() {
                return Err(VerbsError::Connect("timed out".into()));
            }
            let mut s =
                TcpStream::connect_timeout(&addr, t).map_err(|e| VerbsError::Connect(format!("{addr}: {e}")))?;
            s.write_all(&hello(self.token, token)).map_err(|e| VerbsError::Connect(e.to_string()))?;
            s
        } else {
            // Passive side: the peer connects to our listener.
            let l = self.listener.as_ref().ok_or_else(|| VerbsError::Connect("no listener".into()))?;
            l.set_nonblocking(true).map_err(|e| os("fcntl", e))?;
            loop {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| os("fcntl", e))?;
                        s.set_read_timeout(Some(left().max(Duration::from_millis(1))))
                            .map_err(|e| os("setsockopt", e))?;
                        let mut h = [0u8; 24];
                        if s.read_exact(&mut h).is_ok() && h == hello(token, self.token) {
                            s.set_read_timeout(None).map_err(|e| os("setsockopt", e))?;
                            break s;
                        }
                        // A stray connection: keep waiting for the peer.
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if left().is_zero() {
                            return Err(VerbsError::Connect("timed out waiting for the peer's queue pair".into()));
                        }
                        let mut fds = [nix::poll::PollFd::new(l.as_fd(), nix::poll::PollFlags::POLLIN)];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u8));
                    }
                    Err(e) => return Err(os("accept", e)),
                }
            }
        };
        self.listener = None;
        self.start(stream)
    }

    fn post_send(&mut self, wr: &SendWr) -> Result<(), VerbsError> {
        if let Some(e) = &self.shared.st.lock().error {
            return Err(VerbsError::QpError(e.clone()));
        }
        if self.ids.contains(&wr.wr_id) {
            return Err(VerbsError::DuplicateWrId(wr.wr_id));
        }
        if self.unreclaimed.len() >= self.shared.caps.max_send_wr as usize {
            return Err(VerbsError::SendQueueFull { depth: self.shared.caps.max_send_wr });
        }
        if wr.sge.len > MAX_MSG {
            return Err(os("post_send", std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        self.check_local(wr.sge.addr, wr.sge.len, wr.sge.lkey, matches!(wr.op, Op::Read(_)))?;
        self.psn += 1;
        self.ids.insert(wr.wr_id);
        self.unreclaimed.push_back(wr.wr_id);
        let mut st = self.shared.st.lock();
        st.sq.push_back(Pending { wr: *wr, psn: self.psn });
        self.shared.work.notify_one();
        Ok(())
    }

    fn post_recv(&mut self, wr: &RecvWr) -> Result<(), VerbsError> {
        self.check_local(wr.sge.addr, wr.sge.len, wr.sge.lkey, true)?;
        let mut st = self.shared.st.lock();
        if let Some(e) = &st.error {
            return Err(VerbsError::QpError(e.clone()));
        }
        if st.rq.len() >= self.shared.caps.max_recv_wr as usize {
            return Err(VerbsError::RecvQueueFull { depth: self.shared.caps.max_recv_wr });
        }
        st.rq.push_back(*wr);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, VerbsError> {
        let mut st = self.shared.st.lock();
        if st.cq_overrun {
            return Err(VerbsError::CqOverrun { depth: self.shared.caps.cq_depth });
        }
        let mut n = 0;
        while n < out.len() {
            let Some(c) = st.cq.pop_front() else { break };
            if !matches!(c.op, WcOp::Recv { .. }) {
                // This completion reclaims its slot and every earlier one.
                while let Some(id) = self.unreclaimed.pop_front() {
                    self.ids.remove(&id);
                    if id == c.wr_id {
                        break;
                    }
                }
            }
            out[n] = c;
            n += 1;
        }
        Ok(n)
    }

    fn arm(&mut self) -> Result<(), VerbsError> {
        let _ = self.shared.event.read();
        self.shared.st.lock().armed = true;
        Ok(())
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.shared.event.as_fd()
    }
}

impl Drop for SimQp {
    fn drop(&mut self) {
        {
            let mut st = self.shared.st.lock();
            st.stop = true;
            self.shared.work.notify_all();
        }
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
