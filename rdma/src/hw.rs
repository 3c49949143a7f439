//! The real device: the [`crate::verbs`] interface over libibverbs, through
//! the raw bindings of `ibverbs-sys` (feature `rdma`).
//!
//! One [`HwDevice`] is one opened device context and one protection domain;
//! every memory region and queue pair keeps it alive through an [`Arc`], so
//! the teardown order is always queue pair, completion queue, completion
//! channel (per queue pair), then the regions, then the protection domain
//! and the context.
//!
//! libibverbs' data path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`,
//! `ibv_req_notify_cq`) is `static inline` in `verbs.h`, so bindgen emits no
//! symbol for it: each is a call through the provider's function table,
//! `context->ops`, exactly as the inline functions do. The table's entries
//! are read once when a queue pair is created.
//!
//! What this adds to the verbs, so the device behaves like the software one
//! where a NIC would only fail later, or not at all:
//! * the send and receive queues are bounded by the *requested* depths
//!   ([`VerbsError::SendQueueFull`], [`VerbsError::RecvQueueFull`]), whatever
//!   larger queues the provider rounded them up to;
//! * a work request id may be in flight only once
//!   ([`VerbsError::DuplicateWrId`]), which is also how a completion in
//!   error (whose opcode the NIC leaves undefined) is told apart;
//! * a local buffer must lie in a region of this device with that key
//!   ([`VerbsError::LocalProtection`]);
//! * once a completion in error was polled, posting fails
//!   ([`VerbsError::QpError`]);
//! * the completion queue is made large enough for both queues together,
//!   so it cannot overrun (this device never reports
//!   [`VerbsError::CqOverrun`]).

#![allow(unsafe_code)]

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, c_int, c_uint, c_void};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ibverbs_sys as ffi;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use parking_lot::RwLock;

use crate::verbs::{
    Access, Completion, Device, Endpoint, MAX_ENDPOINT_LEN, MemoryRegion, Op, QpCaps, QueuePair, RecvWr, SendWr, Sge,
    VerbsError, WcOp, WcStatus,
};

/// Which port and GID of the device to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwConfig {
    /// The physical port (1 on a single-port NIC).
    pub port: u8,
    /// The index in the port's GID table of the source GID (RoCE; on
    /// RoCE v2 this is often not 0: see `show_gids`).
    pub gid_index: u8,
}

impl Default for HwConfig {
    fn default() -> Self {
        HwConfig { port: 1, gid_index: 0 }
    }
}

/// Open the device named `name`, or the first one when `None`, on port 1
/// with GID index 0.
pub fn open(name: Option<&str>) -> Result<Arc<HwDevice>, VerbsError> {
    open_with(name, HwConfig::default())
}

/// Open the device named `name`, or the first one when `None`.
pub fn open_with(name: Option<&str>, config: HwConfig) -> Result<Arc<HwDevice>, VerbsError> {
    let no_device = |why: String| VerbsError::NoDevice { name: name.map(str::to_string), why };
    let list = DeviceList::get().map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSYS) => {
                ": the kernel has no RDMA support (no uverbs, /sys/class/infiniband_verbs is missing)"
            }
            Some(libc::EPERM) | Some(libc::EACCES) => ": not allowed to open the RDMA devices",
            _ => "",
        };
        no_device(format!("ibv_get_device_list failed: {e}{hint}"))
    })?;
    let names = list.names();
    if names.is_empty() {
        return Err(no_device("ibv_get_device_list found no RDMA device".into()));
    }
    let index = match name {
        None => 0,
        Some(want) => names
            .iter()
            .position(|n| n == want)
            .ok_or_else(|| no_device(format!("not among the devices found: {}", names.join(", "))))?,
    };
    let dev_name = names[index].clone();
    // The device list may be freed once the context is open.
    // SAFETY: `index` is within the list, which is alive; `ibv_open_device`
    // takes a device of a live list and returns a context or NULL.
    let ctx = unsafe { ffi::ibv_open_device(list.devices()[index]) };
    if ctx.is_null() {
        let e = io::Error::last_os_error();
        return Err(no_device(format!("ibv_open_device({dev_name}) failed: {e}")));
    }
    drop(list);
    let mut dev = DevInner {
        name: dev_name,
        ctx,
        pd: ptr::null_mut(),
        port: config.port,
        gid_index: config.gid_index,
        lid: 0,
        gid: [0; 16],
        active_mtu: ffi::IBV_MTU_1024,
        ethernet: false,
        max_rd_atomic: 16,
        max_dest_rd_atomic: 16,
        regions: RwLock::new(HashMap::new()),
    };
    // From here on, dropping `dev` closes what was opened.
    dev.query(config).map_err(|why| no_device(format!("{}: {why}", dev.name)))?;
    // SAFETY: `ctx` is an open context; `ibv_alloc_pd` returns a protection
    // domain or NULL.
    dev.pd = unsafe { ffi::ibv_alloc_pd(dev.ctx) };
    if dev.pd.is_null() {
        return Err(os("ibv_alloc_pd"));
    }
    Ok(Arc::new(HwDevice { inner: Arc::new(dev) }))
}

/// The list `ibv_get_device_list` returns, freed on drop.
struct DeviceList {
    list: *mut *mut ffi::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> io::Result<DeviceList> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out pointer; the call returns a
        // NULL-terminated array of `n` devices, or NULL with errno set.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(DeviceList { list, len: usize::try_from(n).unwrap_or(0) })
    }

    fn devices(&self) -> &[*mut ffi::ibv_device] {
        // SAFETY: `list` holds `len` device pointers and lives as long as
        // `self` (freed only in drop).
        unsafe { std::slice::from_raw_parts(self.list, self.len) }
    }

    fn names(&self) -> Vec<String> {
        self.devices()
            .iter()
            .map(|&d| {
                // SAFETY: `d` is a device of the live list; the name it
                // returns is a NUL-terminated string owned by the device (or
                // NULL).
                let p = unsafe { ffi::ibv_get_device_name(d) };
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: a non-NULL name is a valid C string while the
                    // list lives; it is copied out at once.
                    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                }
            })
            .collect()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from `ibv_get_device_list` and is freed once.
        unsafe { ffi::ibv_free_device_list(self.list) };
    }
}

/// An open RDMA device: its context and one protection domain.
pub struct HwDevice {
    inner: Arc<DevInner>,
}

/// The device proper, shared by the device and its regions and queue pairs.
struct DevInner {
    name: String,
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    port: u8,
    gid_index: u8,
    lid: u16,
    gid: [u8; 16],
    active_mtu: ffi::ibv_mtu,
    ethernet: bool,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
    /// The regions registered and not yet dropped: lkey => (start, length).
    regions: RwLock<HashMap<u32, (u64, u64)>>,
}

// SAFETY: libibverbs is thread safe (its objects may be used from any
// thread, concurrently); the context and protection domain are only
// destroyed in drop, when no region or queue pair refers to them any more
// (each holds an `Arc` of it).
unsafe impl Send for DevInner {}
// SAFETY: as above; the only interior mutability is the `RwLock`.
unsafe impl Sync for DevInner {}

impl DevInner {
    /// Read the port's LID, state, MTU and link layer, the source GID and
    /// the device's RDMA READ limits.
    fn query(&mut self, config: HwConfig) -> Result<(), String> {
        let mut dattr = ffi::ibv_device_attr::default();
        // SAFETY: `ctx` is an open context and `dattr` a writable attribute
        // struct of the size the call expects.
        let rc = unsafe { ffi::ibv_query_device(self.ctx, &mut dattr) };
        if rc != 0 {
            return Err(format!("ibv_query_device failed: {}", rc_error(rc)));
        }
        if config.port == 0 || config.port > dattr.phys_port_cnt {
            return Err(format!("no port {} (the device has {})", config.port, dattr.phys_port_cnt));
        }
        let clamp = |n: c_int| u8::try_from(n.clamp(1, 16)).unwrap_or(16);
        self.max_rd_atomic = clamp(dattr.max_qp_init_rd_atom);
        self.max_dest_rd_atomic = clamp(dattr.max_qp_rd_atom);

        // `ibv_query_port` is a macro over the inline `___ibv_query_port`,
        // which calls the provider's extended query or, failing that, this
        // exported compat symbol. The compat attribute struct is a prefix of
        // `ibv_port_attr` that ends after `link_layer` (and `flags`), which
        // is all that is read here; the rest stays zeroed.
        let mut pattr = ffi::ibv_port_attr::default();
        // SAFETY: `pattr` is zeroed and larger than the compat struct the
        // call fills.
        let rc = unsafe {
            ffi::ibv_query_port(self.ctx, config.port, (&raw mut pattr).cast::<ffi::_compat_ibv_port_attr>())
        };
        if rc != 0 {
            return Err(format!("ibv_query_port({}) failed: {}", config.port, rc_error(rc)));
        }
        match pattr.state {
            ffi::ibv_port_state::IBV_PORT_ACTIVE | ffi::ibv_port_state::IBV_PORT_ARMED => {}
            s => return Err(format!("port {} is not active (state {s}: is the link up?)", config.port)),
        }
        self.lid = pattr.lid;
        self.active_mtu = pattr.active_mtu;
        self.ethernet = u32::from(pattr.link_layer) == ffi::IBV_LINK_LAYER_ETHERNET;

        let mut gid = ffi::ibv_gid { raw: [0; 16] };
        // SAFETY: `gid` is a writable 16-byte GID.
        let rc = unsafe { ffi::ibv_query_gid(self.ctx, config.port, c_int::from(config.gid_index), &mut gid) };
        if rc != 0 {
            return Err(format!("ibv_query_gid({}, {}) failed: {}", config.port, config.gid_index, rc_error(rc)));
        }
        // SAFETY: every bit pattern is a valid `[u8; 16]`.
        self.gid = unsafe { gid.raw };
        if self.ethernet && self.gid == [0; 16] {
            return Err(format!(
                "GID {} of port {} is empty: RoCE needs an address on the port's interface (or another gid index)",
                config.gid_index, config.port
            ));
        }
        Ok(())
    }

    fn check_local(&self, sge: &Sge) -> Result<(), VerbsError> {
        let err = || VerbsError::LocalProtection { addr: sge.addr, len: sge.len, lkey: sge.lkey };
        let regions = self.regions.read();
        let &(start, len) = regions.get(&sge.lkey).ok_or_else(err)?;
        let end = sge.addr.checked_add(u64::from(sge.len)).ok_or_else(err)?;
        if sge.addr < start || end > start + len {
            return Err(err());
        }
        Ok(())
    }
}

impl HwDevice {
    /// The port's LID (0 on RoCE).
    pub fn lid(&self) -> u16 {
        self.inner.lid
    }

    /// The source GID.
    pub fn gid(&self) -> [u8; 16] {
        self.inner.gid
    }

    /// Whether the port is Ethernet (RoCE) rather than InfiniBand.
    pub fn is_roce(&self) -> bool {
        self.inner.ethernet
    }
}

impl Drop for DevInner {
    fn drop(&mut self) {
        if !self.pd.is_null() {
            // SAFETY: every region and queue pair of this domain holds an
            // `Arc` of the device, so none is left.
            let rc = unsafe { ffi::ibv_dealloc_pd(self.pd) };
            if rc != 0 {
                tracing::warn!(device = %self.name, error = %rc_error(rc), "ibv_dealloc_pd failed");
            }
        }
        // SAFETY: the context is open and nothing of it is left.
        let rc = unsafe { ffi::ibv_close_device(self.ctx) };
        if rc != 0 {
            tracing::warn!(device = %self.name, error = %rc_error(rc), "ibv_close_device failed");
        }
    }
}

/// The access flags of a region. Remote write needs local write, so it
/// implies it.
fn access_flags(access: Access) -> c_uint {
    let mut f = 0;
    if access.local_write || access.remote_write {
        f |= ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if access.remote_read {
        f |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    if access.remote_write {
        f |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    f
}

impl Device for HwDevice {
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Register `[addr, addr + len)` with `ibv_reg_mr`.
    ///
    /// # Safety
    /// As [`Device::register`]: the memory stays mapped until the region is
    /// dropped, and every queue pair that may touch it is dropped first.
    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Box<dyn MemoryRegion>, VerbsError> {
        let flags = access_flags(access).cast_signed();
        // SAFETY: the protection domain is alive; the caller keeps the
        // memory mapped for the region's life. `ibv_reg_mr` pins it and
        // returns a region or NULL.
        let mr = unsafe { ffi::ibv_reg_mr(self.inner.pd, addr.cast::<c_void>(), len, flags) };
        if mr.is_null() {
            return Err(os("ibv_reg_mr"));
        }
        // SAFETY: `mr` is the valid region just returned; its keys and
        // bounds do not change.
        let (lkey, rkey, start) = unsafe { ((*mr).lkey, (*mr).rkey, (*mr).addr.addr() as u64) };
        self.inner.regions.write().insert(lkey, (start, len as u64));
        // Each region holds the device (and so the protection domain).
        Ok(Box::new(HwMr { mr, lkey, rkey, addr: start, len, dev: self.inner.clone() }))
    }

    fn create_qp(&self, caps: QpCaps) -> Result<Box<dyn QueuePair>, VerbsError> {
        Ok(Box::new(HwQp::create(self.inner.clone(), caps)?))
    }
}

/// A registered memory region.
struct HwMr {
    mr: *mut ffi::ibv_mr,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: usize,
    dev: Arc<DevInner>,
}

// SAFETY: the region is only read (its keys are cached) and deregistered
// once in drop; libibverbs allows that from any thread.
unsafe impl Send for HwMr {}
// SAFETY: as above: `&HwMr` gives access to plain cached values only.
unsafe impl Sync for HwMr {}

impl MemoryRegion for HwMr {
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

impl Drop for HwMr {
    fn drop(&mut self) {
        self.dev.regions.write().remove(&self.lkey);
        // SAFETY: `mr` was registered by `register` and is deregistered
        // once; the caller of `register` dropped the queue pairs using it.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(device = %self.dev.name, error = %rc_error(rc), "ibv_dereg_mr failed");
        }
    }
}

/// What a queue pair tells its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EndpointInfo {
    lid: u16,
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
    /// The port's active MTU (an `ibv_mtu`, 1 = 256 ... 5 = 4096).
    mtu: u8,
}

/// First byte of an endpoint of this device ('H', version 1).
const ENDPOINT_TAG: u8 = 0x48;
/// tag, lid, qpn, psn, gid, mtu.
const ENDPOINT_LEN: usize = 1 + 2 + 4 + 4 + 16 + 1;
const _: () = assert!(ENDPOINT_LEN <= MAX_ENDPOINT_LEN);

impl EndpointInfo {
    fn encode(&self) -> Endpoint {
        let mut b = Vec::with_capacity(ENDPOINT_LEN);
        b.push(ENDPOINT_TAG);
        b.extend_from_slice(&self.lid.to_le_bytes());
        b.extend_from_slice(&self.qpn.to_le_bytes());
        b.extend_from_slice(&self.psn.to_le_bytes());
        b.extend_from_slice(&self.gid);
        b.push(self.mtu);
        Endpoint(b)
    }

    fn decode(e: &Endpoint) -> Result<EndpointInfo, VerbsError> {
        let b = &e.0;
        let bad = |why: String| VerbsError::BadEndpoint(why);
        if b.len() != ENDPOINT_LEN {
            return Err(bad(format!("{} bytes, an RDMA device's endpoint has {ENDPOINT_LEN}", b.len())));
        }
        if b[0] != ENDPOINT_TAG {
            return Err(bad(format!("format tag {:#04x}, not an RDMA device's ({ENDPOINT_TAG:#04x})", b[0])));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut gid = [0; 16];
        gid.copy_from_slice(&b[11..27]);
        let info =
            EndpointInfo { lid: u16::from_le_bytes([b[1], b[2]]), qpn: u32_at(3), psn: u32_at(7), gid, mtu: b[27] };
        if info.qpn == 0 || info.qpn > 0xff_ffff {
            return Err(bad(format!("queue pair number {:#x} is not a 24-bit QPN", info.qpn)));
        }
        if info.psn > 0xff_ffff {
            return Err(bad(format!("packet sequence number {:#x} is not 24-bit", info.psn)));
        }
        if !(1..=5).contains(&info.mtu) {
            return Err(bad(format!("MTU code {} (1..=5 expected)", info.mtu)));
        }
        if info.lid == 0 && info.gid == [0; 16] {
            return Err(bad("neither a LID nor a GID".into()));
        }
        Ok(info)
    }
}

/// A random 24-bit packet sequence number.
fn random_psn() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    (h.finish() & 0xff_ffff) as u32
}

/// The provider's data-path entries, as the inline functions of `verbs.h`
/// call them (`qp->context->ops.post_send` and so on).
#[derive(Clone, Copy)]
struct Ops {
    post_send: unsafe extern "C" fn(*mut ffi::ibv_qp, *mut ffi::ibv_send_wr, *mut *mut ffi::ibv_send_wr) -> c_int,
    post_recv: unsafe extern "C" fn(*mut ffi::ibv_qp, *mut ffi::ibv_recv_wr, *mut *mut ffi::ibv_recv_wr) -> c_int,
    poll_cq: unsafe extern "C" fn(*mut ffi::ibv_cq, c_int, *mut ffi::ibv_wc) -> c_int,
    req_notify_cq: unsafe extern "C" fn(*mut ffi::ibv_cq, c_int) -> c_int,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QpState {
    /// Created, in INIT: receives may be posted.
    Init,
    /// Connected (RTS).
    Ready,
    /// A completion in error was polled.
    Error,
}

/// A request posted and not yet reclaimed.
#[derive(Clone, Copy, Debug)]
struct Pending {
    op: WcOp,
    send: bool,
}

/// A reliable-connected queue pair with its completion queue and channel.
struct HwQp {
    dev: Arc<DevInner>,
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
    qp: *mut ffi::ibv_qp,
    ops: Ops,
    caps: QpCaps,
    qpn: u32,
    psn: u32,
    state: QpState,
    /// Every request in flight by id.
    pending: HashMap<u64, Pending>,
    /// The send queue's requests in flight, in order (unsignaled ones are
    /// reclaimed by the completion of a later one).
    sends: VecDeque<u64>,
    /// How many receives are posted.
    recvs: u32,
    /// A buffer for `ibv_poll_cq`.
    wcs: Vec<ffi::ibv_wc>,
}

// SAFETY: the queue pair's objects are used through `&mut self` (or, for
// the channel fd, `&self`) only; libibverbs allows using them from any
// thread, one call at a time per queue, which `&mut` guarantees.
unsafe impl Send for HwQp {}

impl HwQp {
    fn create(dev: Arc<DevInner>, caps: QpCaps) -> Result<HwQp, VerbsError> {
        let invalid = |what: &str| VerbsError::Os {
            op: "ibv_create_qp",
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("{what} out of range: {caps:?}")),
        };
        if caps.max_send_wr == 0 || caps.max_recv_wr == 0 {
            return Err(invalid("a queue depth of 0"));
        }
        // Large enough for everything both queues can hold: with the queue
        // bounds enforced in `post_*`, the completion queue cannot overrun.
        let cqe = caps.cq_depth.max(caps.max_send_wr.saturating_add(caps.max_recv_wr));
        let cqe = c_int::try_from(cqe).map_err(|_| invalid("cq_depth"))?;
        // The inline functions call through `qp->context->ops` and
        // `cq->context->ops`: that context is the device's.
        // SAFETY: the context is open; its function table is the provider's
        // and stays valid while the context lives.
        let table = unsafe { &(*dev.ctx).ops };
        let missing = |name: &str| VerbsError::Os {
            op: "ibv_context_ops",
            source: io::Error::new(io::ErrorKind::Unsupported, format!("the provider has no {name}")),
        };
        let ops = Ops {
            post_send: table.post_send.ok_or_else(|| missing("post_send"))?,
            post_recv: table.post_recv.ok_or_else(|| missing("post_recv"))?,
            poll_cq: table.poll_cq.ok_or_else(|| missing("poll_cq"))?,
            req_notify_cq: table.req_notify_cq.ok_or_else(|| missing("req_notify_cq"))?,
        };
        let mut q = HwQp {
            dev,
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            ops,
            caps,
            qpn: 0,
            psn: random_psn(),
            state: QpState::Init,
            pending: HashMap::new(),
            sends: VecDeque::new(),
            recvs: 0,
            wcs: vec![ffi::ibv_wc::default(); 32],
        };
        // From here on, dropping `q` destroys what was created.
        // SAFETY: the context is open; the call returns a channel or NULL.
        q.channel = unsafe { ffi::ibv_create_comp_channel(q.dev.ctx) };
        if q.channel.is_null() {
            return Err(os("ibv_create_comp_channel"));
        }
        let fd = q.readiness();
        let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| nix_err("fcntl(F_GETFL)", e))?;
        fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK))
            .map_err(|e| nix_err("fcntl(F_SETFL, O_NONBLOCK)", e))?;

        // SAFETY: context and channel are alive; the call returns a CQ or NULL.
        q.cq = unsafe { ffi::ibv_create_cq(q.dev.ctx, cqe, ptr::null_mut(), q.channel, 0) };
        if q.cq.is_null() {
            return Err(os("ibv_create_cq"));
        }

        let mut init = ffi::ibv_qp_init_attr {
            send_cq: q.cq,
            recv_cq: q.cq,
            cap: ffi::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: caps.max_recv_wr,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: the protection domain and the CQ are alive; `init` is a
        // valid attribute struct (the call may update its `cap`).
        q.qp = unsafe { ffi::ibv_create_qp(q.dev.pd, &mut init) };
        if q.qp.is_null() {
            return Err(os("ibv_create_qp"));
        }
        // SAFETY: `qp` is the queue pair just created.
        q.qpn = unsafe { (*q.qp).qp_num };
        debug_assert!(
            // SAFETY: as above.
            ptr::eq(unsafe { (*q.qp).context }, q.dev.ctx),
            "a queue pair of another context"
        );

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: q.dev.port,
            qp_access_flags: access_flags(Access { local_write: true, remote_read: true, remote_write: true }),
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ffi::ibv_qp_attr_mask::IBV_QP_PORT
            | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        q.modify(&mut attr, mask, "ibv_modify_qp(INIT)")?;
        Ok(q)
    }

    fn modify(
        &mut self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: `qp` is alive and `attr` a valid attribute struct with
        // the fields `mask` names set.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0.cast_signed()) };
        if rc != 0 {
            return Err(VerbsError::Os { op: what, source: rc_error(rc) });
        }
        Ok(())
    }

    fn info(&self) -> EndpointInfo {
        EndpointInfo {
            lid: self.dev.lid,
            qpn: self.qpn,
            psn: self.psn,
            gid: self.dev.gid,
            mtu: u8::try_from(self.dev.active_mtu).unwrap_or(1),
        }
    }

    fn check_post(&self, wr_id: u64, sge: &Sge) -> Result<(), VerbsError> {
        if self.state == QpState::Error {
            return Err(VerbsError::QpError("a work request completed in error".into()));
        }
        if self.pending.contains_key(&wr_id) {
            return Err(VerbsError::DuplicateWrId(wr_id));
        }
        self.dev.check_local(sge)
    }
}

impl QueuePair for HwQp {
    fn endpoint(&self) -> Endpoint {
        self.info().encode()
    }

    fn connect(&mut self, remote: &Endpoint, deadline: Instant) -> Result<(), VerbsError> {
        let r = EndpointInfo::decode(remote)?;
        if self.state != QpState::Init {
            return Err(VerbsError::Connect("the queue pair is already connected (or in error)".into()));
        }
        if Instant::now() > deadline {
            return Err(VerbsError::Connect("deadline passed before connecting".into()));
        }
        // On RoCE there are no LIDs: the path is the GID (a GRH on every
        // packet). On InfiniBand the LID is enough within the subnet.
        let global = self.dev.ethernet || r.lid == 0;
        if global && r.gid == [0; 16] {
            return Err(VerbsError::BadEndpoint("the peer has no GID, which RoCE needs".into()));
        }
        let mut ah =
            ffi::ibv_ah_attr { dlid: r.lid, sl: 0, src_path_bits: 0, port_num: self.dev.port, ..Default::default() };
        if global {
            ah.is_global = 1;
            ah.grh = ffi::ibv_global_route {
                dgid: ffi::ibv_gid { raw: r.gid },
                flow_label: 0,
                sgid_index: self.dev.gid_index,
                hop_limit: 64,
                traffic_class: 0,
            };
        }
        let mtu = ffi::IBV_MTU_4096.min(self.dev.active_mtu).min(ffi::ibv_mtu::from(r.mtu));
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: mtu,
            dest_qp_num: r.qpn,
            rq_psn: r.psn,
            max_dest_rd_atomic: self.dev.max_dest_rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ah,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_AV
            | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTR)").map_err(|e| VerbsError::Connect(error_chain(&e)))?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            timeout: 14,
            retry_cnt: 7,
            // Receiver not ready is an error at once: the engine posts its
            // receives before the peer may send.
            rnr_retry: 0,
            sq_psn: self.psn,
            max_rd_atomic: self.dev.max_rd_atomic,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTS)").map_err(|e| VerbsError::Connect(error_chain(&e)))?;
        self.state = QpState::Ready;
        Ok(())
    }

    fn post_send(&mut self, wr: &SendWr) -> Result<(), VerbsError> {
        self.check_post(wr.wr_id, &wr.sge)?;
        if self.state != QpState::Ready {
            return Err(VerbsError::Connect("post_send on a queue pair that is not connected".into()));
        }
        let depth = self.caps.max_send_wr;
        if self.sends.len() >= depth as usize {
            return Err(VerbsError::SendQueueFull { depth });
        }
        let mut sge = ffi::ibv_sge { addr: wr.sge.addr, length: wr.sge.len, lkey: wr.sge.lkey };
        let mut w = ffi::ibv_send_wr {
            wr_id: wr.wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            send_flags: if wr.signaled { ffi::ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 },
            ..Default::default()
        };
        let rdma = |r: &crate::verbs::Remote| ffi::ibv_send_wr__bindgen_ty_2 {
            rdma: ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr: r.addr, rkey: r.rkey },
        };
        let op = match wr.op {
            Op::Read(r) => {
                w.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_READ;
                w.wr = rdma(&r);
                WcOp::Read
            }
            Op::Write(r) => {
                w.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                w.wr = rdma(&r);
                WcOp::Write
            }
            Op::WriteImm(r, imm) => {
                w.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                w.wr = rdma(&r);
                // The immediate travels in network byte order.
                w.__bindgen_anon_1 = ffi::ibv_send_wr__bindgen_ty_1 { imm_data: imm.to_be() };
                WcOp::Write
            }
            Op::Send => {
                w.opcode = ffi::ibv_wr_opcode::IBV_WR_SEND;
                WcOp::Send
            }
        };
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: `qp` is alive and connected; `w` is one complete work
        // request (`next` NULL) whose scatter-gather list `sge` outlives the
        // call (the provider copies it into the send queue).
        let rc = unsafe { (self.ops.post_send)(self.qp, &mut w, &mut bad) };
        match rc {
            0 => {}
            libc::ENOMEM => return Err(VerbsError::SendQueueFull { depth }),
            rc => return Err(VerbsError::Os { op: "ibv_post_send", source: rc_error(rc) }),
        }
        self.pending.insert(wr.wr_id, Pending { op, send: true });
        self.sends.push_back(wr.wr_id);
        Ok(())
    }

    fn post_recv(&mut self, wr: &RecvWr) -> Result<(), VerbsError> {
        self.check_post(wr.wr_id, &wr.sge)?;
        let depth = self.caps.max_recv_wr;
        if self.recvs >= depth {
            return Err(VerbsError::RecvQueueFull { depth });
        }
        let mut sge = ffi::ibv_sge { addr: wr.sge.addr, length: wr.sge.len, lkey: wr.sge.lkey };
        let mut w = ffi::ibv_recv_wr { wr_id: wr.wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: `qp` is alive (INIT or later, where receives may be
        // posted); `w` is one complete work request whose list `sge`
        // outlives the call.
        let rc = unsafe { (self.ops.post_recv)(self.qp, &mut w, &mut bad) };
        match rc {
            0 => {}
            libc::ENOMEM => return Err(VerbsError::RecvQueueFull { depth }),
            rc => return Err(VerbsError::Os { op: "ibv_post_recv", source: rc_error(rc) }),
        }
        self.pending.insert(wr.wr_id, Pending { op: WcOp::Recv { imm: None }, send: false });
        self.recvs += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, VerbsError> {
        let poll_cq = self.ops.poll_cq;
        let mut done = 0;
        while done < out.len() {
            let want = (out.len() - done).min(self.wcs.len());
            let want_c = c_int::try_from(want).unwrap_or(c_int::MAX);
            // SAFETY: `cq` is alive and `wcs` has room for `want` entries.
            let n = unsafe { poll_cq(self.cq, want_c, self.wcs.as_mut_ptr()) };
            let n = usize::try_from(n).map_err(|_| VerbsError::Os { op: "ibv_poll_cq", source: rc_error(n) })?;
            for i in 0..n {
                let wc = self.wcs[i];
                out[done] = self.completion(&wc);
                done += 1;
            }
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    fn arm(&mut self) -> Result<(), VerbsError> {
        let mut events: c_uint = 0;
        let mut ev_cq: *mut ffi::ibv_cq = ptr::null_mut();
        loop {
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: the channel is alive and its fd non-blocking, so the
            // call returns at once: 0 with an event of our CQ, or -1 with
            // errno (EAGAIN when none is pending).
            let rc = unsafe { ffi::ibv_get_cq_event(self.channel, &mut ev_cq, &mut ctx) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                self.ack(events);
                return Err(VerbsError::Os { op: "ibv_get_cq_event", source: e });
            }
            events += 1;
        }
        self.ack(events);
        // SAFETY: `cq` is alive; 0 asks for an event at any next completion.
        let rc = unsafe { (self.ops.req_notify_cq)(self.cq, 0) };
        if rc != 0 {
            return Err(VerbsError::Os { op: "ibv_req_notify_cq", source: rc_error(rc) });
        }
        Ok(())
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel is alive for as long as `self`, and its fd with it.
        let fd: RawFd = unsafe { (*self.channel).fd };
        // SAFETY: `fd` is open until the channel is destroyed in drop, which
        // cannot happen while `&self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(fd) }
    }
}

impl HwQp {
    fn ack(&mut self, events: c_uint) {
        if events > 0 {
            // SAFETY: `events` events of this CQ (the channel's only one)
            // were taken by `ibv_get_cq_event` and not yet acknowledged.
            unsafe { ffi::ibv_ack_cq_events(self.cq, events) };
        }
    }

    /// Turn a work completion into the interface's, reclaiming what it ends.
    fn completion(&mut self, wc: &ffi::ibv_wc) -> Completion {
        let wr_id = wc.wr_id();
        let status = match wc.error() {
            None => WcStatus::Success,
            Some((s, _vendor)) => map_status(s),
        };
        if status != WcStatus::Success {
            self.state = QpState::Error;
        }
        // A completion in error leaves the opcode undefined: what the
        // request was is known from its id.
        let op = match self.pending.remove(&wr_id) {
            Some(Pending { op, send: true }) => {
                // Completions come in order: the unsignaled requests before
                // this one are done too.
                while let Some(id) = self.sends.pop_front() {
                    if id == wr_id {
                        break;
                    }
                    self.pending.remove(&id);
                }
                op
            }
            Some(Pending { op: _, send: false }) => {
                self.recvs = self.recvs.saturating_sub(1);
                WcOp::Recv { imm: None }
            }
            None => {
                tracing::warn!(wr_id, opcode = wc.opcode(), "completion of a work request not posted here");
                map_opcode(wc.opcode())
            }
        };
        let (op, byte_len) = match op {
            WcOp::Recv { .. } => {
                let imm = if wc.opcode() == ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                    wc.imm_data().map(u32::from_be)
                } else {
                    None
                };
                (WcOp::Recv { imm }, u32::try_from(wc.len()).unwrap_or(u32::MAX))
            }
            op => (op, 0),
        };
        Completion { wr_id, status, op, byte_len }
    }
}

impl Drop for HwQp {
    fn drop(&mut self) {
        if !self.qp.is_null() {
            // SAFETY: the queue pair is alive and destroyed once.
            let rc = unsafe { ffi::ibv_destroy_qp(self.qp) };
            if rc != 0 {
                tracing::warn!(qpn = self.qpn, error = %rc_error(rc), "ibv_destroy_qp failed");
            }
        }
        if !self.cq.is_null() {
            // SAFETY: its queue pair is gone and every event taken from the
            // channel was acknowledged in `arm`.
            let rc = unsafe { ffi::ibv_destroy_cq(self.cq) };
            if rc != 0 {
                tracing::warn!(qpn = self.qpn, error = %rc_error(rc), "ibv_destroy_cq failed");
            }
        }
        if !self.channel.is_null() {
            // SAFETY: its CQ is gone.
            let rc = unsafe { ffi::ibv_destroy_comp_channel(self.channel) };
            if rc != 0 {
                tracing::warn!(qpn = self.qpn, error = %rc_error(rc), "ibv_destroy_comp_channel failed");
            }
        }
    }
}

fn map_status(s: ffi::ibv_wc_status::Type) -> WcStatus {
    use ffi::ibv_wc_status as s_;
    match s {
        s_::IBV_WC_SUCCESS => WcStatus::Success,
        s_::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLength,
        s_::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtection,
        s_::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
        s_::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        s_::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        s_::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        other => WcStatus::Other(other),
    }
}

fn map_opcode(o: ffi::ibv_wc_opcode::Type) -> WcOp {
    use ffi::ibv_wc_opcode as o_;
    match o {
        o_::IBV_WC_RDMA_READ => WcOp::Read,
        o_::IBV_WC_RDMA_WRITE => WcOp::Write,
        o_::IBV_WC_SEND => WcOp::Send,
        _ => WcOp::Recv { imm: None },
    }
}

/// A verbs call's error code: libibverbs returns errno values (positive),
/// some providers their negation, a few -1 with errno set.
fn rc_error(rc: c_int) -> io::Error {
    match rc {
        -1 => io::Error::last_os_error(),
        rc => io::Error::from_raw_os_error(rc.abs()),
    }
}

fn os(op: &'static str) -> VerbsError {
    VerbsError::Os { op, source: io::Error::last_os_error() }
}

fn nix_err(op: &'static str, e: nix::errno::Errno) -> VerbsError {
    VerbsError::Os { op, source: io::Error::from(e) }
}

fn error_chain(e: &VerbsError) -> String {
    match e {
        VerbsError::Os { op, source } => format!("{op}: {source}"),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verbs::Remote;
    use std::time::Duration;

    #[test]
    fn open_without_a_device_is_an_error_not_a_panic() {
        match open(None) {
            Ok(dev) => assert!(!dev.name().is_empty()),
            Err(e) => {
                assert!(matches!(e, VerbsError::NoDevice { name: None, .. }), "{e:?}");
                let msg = e.to_string();
                eprintln!("open(None): {msg}");
                assert!(msg.starts_with("no RDMA device: ") && msg.len() > "no RDMA device: ".len(), "{msg}");
            }
        }
    }

    #[test]
    fn open_by_an_unknown_name_says_so() {
        match open(Some("no-such-rdma-device-0")) {
            Ok(_) => panic!("opened a device that does not exist"),
            Err(e) => {
                let VerbsError::NoDevice { name, why } = &e else { panic!("{e:?}") };
                assert_eq!(name.as_deref(), Some("no-such-rdma-device-0"));
                assert!(!why.is_empty());
                assert!(e.to_string().contains("\"no-such-rdma-device-0\""), "{e}");
                eprintln!("open(Some(..)): {e}");
            }
        }
    }

    #[test]
    fn endpoint_round_trips() {
        let info = EndpointInfo {
            lid: 0x1234,
            qpn: 0xab_cdef,
            psn: 0x12_3456,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            mtu: 5,
        };
        let e = info.encode();
        assert_eq!(e.0.len(), ENDPOINT_LEN);
        assert_eq!(e.0[0], ENDPOINT_TAG);
        assert_eq!(&e.0[1..3], &[0x34, 0x12]);
        assert_eq!(EndpointInfo::decode(&e).unwrap(), info);
        let roce = EndpointInfo { lid: 0, ..info };
        assert_eq!(EndpointInfo::decode(&roce.encode()).unwrap(), roce);
    }

    #[test]
    fn malformed_endpoints_are_refused() {
        let good = EndpointInfo { lid: 7, qpn: 0x11, psn: 1, gid: [0; 16], mtu: 3 };
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.encode().0;
            f(&mut b);
            assert!(matches!(EndpointInfo::decode(&Endpoint(b)), Err(VerbsError::BadEndpoint(_))));
        };
        bad(&|b| b.clear());
        bad(&|b| b.truncate(ENDPOINT_LEN - 1));
        bad(&|b| b.push(0));
        bad(&|b| b[0] = b'S');
        bad(&|b| b[3..7].copy_from_slice(&0u32.to_le_bytes()));
        bad(&|b| b[3..7].copy_from_slice(&0x100_0000u32.to_le_bytes()));
        bad(&|b| b[7..11].copy_from_slice(&0x100_0000u32.to_le_bytes()));
        bad(&|b| b[27] = 0);
        bad(&|b| b[27] = 6);
        bad(&|b| b[1..3].copy_from_slice(&[0, 0]));
    }

    #[test]
    fn psns_are_24_bit() {
        for _ in 0..100 {
            assert!(random_psn() <= 0xff_ffff);
        }
    }

    #[test]
    fn statuses_and_access_map() {
        use ffi::ibv_wc_status as s;
        assert_eq!(map_status(s::IBV_WC_SUCCESS), WcStatus::Success);
        assert_eq!(map_status(s::IBV_WC_LOC_LEN_ERR), WcStatus::LocalLength);
        assert_eq!(map_status(s::IBV_WC_LOC_PROT_ERR), WcStatus::LocalProtection);
        assert_eq!(map_status(s::IBV_WC_REM_ACCESS_ERR), WcStatus::RemoteAccess);
        assert_eq!(map_status(s::IBV_WC_RNR_RETRY_EXC_ERR), WcStatus::RnrRetryExceeded);
        assert_eq!(map_status(s::IBV_WC_RETRY_EXC_ERR), WcStatus::RetryExceeded);
        assert_eq!(map_status(s::IBV_WC_WR_FLUSH_ERR), WcStatus::Flushed);
        assert_eq!(map_status(s::IBV_WC_REM_OP_ERR), WcStatus::Other(s::IBV_WC_REM_OP_ERR));
        let a = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let rr = ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        let rw = ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        assert_eq!(access_flags(Access::LOCAL), a);
        assert_eq!(access_flags(Access::REMOTE_READ), rr);
        assert_eq!(access_flags(Access::REMOTE_WRITE), a | rw);
        assert_eq!(access_flags(Access { local_write: false, remote_read: false, remote_write: true }), a | rw);
    }

    // What follows needs an RDMA device (a NIC, or a software one such as
    // rxe: `rdma link add rxe0 type rxe netdev lo`).

    const PAGE: usize = 4096;

    struct Buf {
        mem: Vec<u8>,
        mr: Box<dyn MemoryRegion>,
    }

    fn buf(dev: &HwDevice, len: usize, fill: u8) -> Buf {
        let mut mem = vec![fill; len];
        let access = Access { local_write: true, remote_read: true, remote_write: true };
        // SAFETY: `mem` is kept with its region and outlives every queue
        // pair of a test (the queue pairs are dropped first, being declared
        // after the buffers).
        let mr = unsafe { dev.register(mem.as_mut_ptr(), len, access) }.unwrap();
        Buf { mem, mr }
    }

    impl Buf {
        fn sge(&self, off: usize, len: u32) -> Sge {
            Sge { addr: self.mr.addr() + off as u64, len, lkey: self.mr.lkey() }
        }
        fn remote(&self, off: usize) -> Remote {
            Remote { addr: self.mr.addr() + off as u64, rkey: self.mr.rkey() }
        }
        /// The bytes as the NIC left them.
        fn read(&self, off: usize, len: usize) -> Vec<u8> {
            // SAFETY: within the buffer; a volatile read so the compiler
            // does not assume the NIC's writes away.
            (off..off + len).map(|i| unsafe { ptr::read_volatile(self.mem.as_ptr().add(i)) }).collect()
        }
    }

    const CAPS: QpCaps = QpCaps { max_send_wr: 16, max_recv_wr: 16, cq_depth: 32 };

    fn pair(dev: &HwDevice) -> (Box<dyn QueuePair>, Box<dyn QueuePair>) {
        let mut a = dev.create_qp(CAPS).unwrap();
        let mut b = dev.create_qp(CAPS).unwrap();
        let (ea, eb) = (a.endpoint(), b.endpoint());
        assert!(ea.0.len() <= MAX_ENDPOINT_LEN);
        let deadline = Instant::now() + Duration::from_secs(5);
        a.connect(&eb, deadline).unwrap();
        b.connect(&ea, deadline).unwrap();
        (a, b)
    }

    fn wait(qp: &mut dyn QueuePair) -> Completion {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = [Completion { wr_id: 0, status: WcStatus::Other(0), op: WcOp::Send, byte_len: 0 }; 1];
        loop {
            if qp.poll(&mut out).unwrap() == 1 {
                return out[0];
            }
            assert!(Instant::now() < deadline, "no completion in 10 s");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn device() -> Arc<HwDevice> {
        open(std::env::var("POSTCOPY_RDMA_DEVICE").ok().as_deref()).expect("an RDMA device")
    }

    #[test]
    #[ignore = "needs an RDMA device"]
    fn hw_read_write_and_write_with_immediate() {
        let dev = device();
        let src = buf(&dev, 2 * PAGE, 0xa5);
        let dst = buf(&dev, 2 * PAGE, 0);
        let (mut a, mut b) = pair(&dev);

        // READ: a pulls a page of src (b's side) into dst.
        a.post_send(&SendWr { wr_id: 1, op: Op::Read(src.remote(0)), sge: dst.sge(0, 4096), signaled: true }).unwrap();
        let c = wait(a.as_mut());
        assert_eq!((c.wr_id, c.status, c.op), (1, WcStatus::Success, WcOp::Read));
        assert_eq!(dst.read(0, PAGE), vec![0xa5; PAGE]);

        // WRITE, unsignaled, then a signaled one reclaims both.
        a.post_send(&SendWr { wr_id: 2, op: Op::Write(dst.remote(PAGE)), sge: src.sge(0, 100), signaled: false })
            .unwrap();
        a.post_send(&SendWr { wr_id: 3, op: Op::Write(dst.remote(PAGE + 100)), sge: src.sge(0, 28), signaled: true })
            .unwrap();
        let c = wait(a.as_mut());
        assert_eq!((c.wr_id, c.status, c.op), (3, WcStatus::Success, WcOp::Write));
        assert_eq!(dst.read(PAGE, 128), vec![0xa5; 128]);
        // Both ids are free again.
        a.post_send(&SendWr { wr_id: 2, op: Op::Write(dst.remote(PAGE)), sge: src.sge(0, 1), signaled: true }).unwrap();
        assert_eq!(wait(a.as_mut()).wr_id, 2);

        // WRITE with immediate into a posted receive, with readiness.
        b.post_recv(&RecvWr { wr_id: 10, sge: dst.sge(0, 16) }).unwrap();
        b.arm().unwrap();
        a.post_send(&SendWr {
            wr_id: 4,
            op: Op::WriteImm(dst.remote(2 * PAGE - 64), 0xdead_beef),
            sge: src.sge(0, 64),
            signaled: true,
        })
        .unwrap();
        let c = wait(a.as_mut());
        assert_eq!((c.wr_id, c.status, c.op), (4, WcStatus::Success, WcOp::Write));
        let mut fds = [nix::poll::PollFd::new(b.readiness(), nix::poll::PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap(), 1);
        let c = wait(b.as_mut());
        assert_eq!(c.wr_id, 10);
        assert_eq!(c.status, WcStatus::Success);
        assert_eq!(c.op, WcOp::Recv { imm: Some(0xdead_beef) });
        assert_eq!(c.byte_len, 64);
        assert_eq!(dst.read(2 * PAGE - 64, 64), vec![0xa5; 64]);
        b.arm().unwrap();

        // SEND into a posted receive.
        b.post_recv(&RecvWr { wr_id: 11, sge: dst.sge(0, 64) }).unwrap();
        a.post_send(&SendWr { wr_id: 5, op: Op::Send, sge: src.sge(0, 48), signaled: true }).unwrap();
        assert_eq!(wait(a.as_mut()).op, WcOp::Send);
        let c = wait(b.as_mut());
        assert_eq!((c.wr_id, c.status, c.op, c.byte_len), (11, WcStatus::Success, WcOp::Recv { imm: None }, 48));
        drop((a, b));
    }

    #[test]
    #[ignore = "needs an RDMA device"]
    fn hw_send_without_a_receive_is_receiver_not_ready() {
        let dev = device();
        let src = buf(&dev, PAGE, 1);
        let (mut a, _b) = pair(&dev);
        a.post_send(&SendWr { wr_id: 1, op: Op::Send, sge: src.sge(0, 8), signaled: true }).unwrap();
        let c = wait(a.as_mut());
        assert_eq!((c.wr_id, c.status, c.op), (1, WcStatus::RnrRetryExceeded, WcOp::Send));
        // The queue pair is in error now.
        let e = a.post_send(&SendWr { wr_id: 2, op: Op::Send, sge: src.sge(0, 8), signaled: true }).unwrap_err();
        assert!(matches!(e, VerbsError::QpError(_)), "{e:?}");
    }

    #[test]
    #[ignore = "needs an RDMA device"]
    fn hw_bad_rkey_is_remote_access() {
        let dev = device();
        let src = buf(&dev, PAGE, 1);
        let dst = buf(&dev, PAGE, 0);
        let (mut a, _b) = pair(&dev);
        let mut r = src.remote(0);
        r.rkey ^= 0x5a5a_0000;
        a.post_send(&SendWr { wr_id: 1, op: Op::Read(r), sge: dst.sge(0, 64), signaled: true }).unwrap();
        let c = wait(a.as_mut());
        assert_eq!((c.wr_id, c.status, c.op), (1, WcStatus::RemoteAccess, WcOp::Read));
    }

    #[test]
    #[ignore = "needs an RDMA device"]
    fn hw_local_checks_and_queue_bounds() {
        let dev = device();
        let src = buf(&dev, PAGE, 1);
        let dst = buf(&dev, PAGE, 0);
        let (mut a, _b) = pair(&dev);
        // Outside the region, and an unknown key.
        let e = a
            .post_send(&SendWr { wr_id: 1, op: Op::Write(dst.remote(0)), sge: src.sge(PAGE - 4, 8), signaled: true })
            .unwrap_err();
        assert!(matches!(e, VerbsError::LocalProtection { .. }), "{e:?}");
        let mut sge = src.sge(0, 8);
        sge.lkey ^= 0x5a5a_0000;
        let e = a.post_send(&SendWr { wr_id: 1, op: Op::Write(dst.remote(0)), sge, signaled: true }).unwrap_err();
        assert!(matches!(e, VerbsError::LocalProtection { .. }), "{e:?}");
        // The send queue holds its depth of unreclaimed requests, and ids are unique.
        for i in 0..CAPS.max_send_wr {
            let signaled = i + 1 == CAPS.max_send_wr;
            a.post_send(&SendWr { wr_id: u64::from(i), op: Op::Write(dst.remote(0)), sge: src.sge(0, 8), signaled })
                .unwrap();
        }
        let e = a.post_send(&SendWr { wr_id: 99, op: Op::Write(dst.remote(0)), sge: src.sge(0, 8), signaled: true });
        assert!(matches!(e, Err(VerbsError::SendQueueFull { depth: 16 })), "{e:?}");
        assert_eq!(wait(a.as_mut()).wr_id, u64::from(CAPS.max_send_wr - 1));
        a.post_send(&SendWr { wr_id: 0, op: Op::Write(dst.remote(0)), sge: src.sge(0, 8), signaled: false }).unwrap();
        let e = a.post_send(&SendWr { wr_id: 0, op: Op::Write(dst.remote(0)), sge: src.sge(0, 8), signaled: true });
        assert!(matches!(e, Err(VerbsError::DuplicateWrId(0))), "{e:?}");
    }
}
