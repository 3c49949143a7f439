//! The verbs the engine uses, as a small typed interface with two
//! implementations: the software device ([`crate::sim`]) and, with the
//! `rdma` feature, a real one through `ibverbs-sys` ([`crate::hw`]).
//!
//! The shape follows libibverbs closely, so the engine's logic is the logic
//! a NIC needs: reliable-connected queue pairs, one completion queue per
//! queue pair (send and receive), memory regions with local and remote
//! keys, work requests with caller-chosen ids, signaled or not.
//!
//! What a NIC leaves to its user, and this interface does too:
//! * a send-queue slot is free only once a completion at or after it has
//!   been *polled* (an unsignaled request is reclaimed by a later signaled
//!   one);
//! * completions come in order per queue pair, in any order across them;
//! * a SEND (or WRITE with immediate) needs a receive posted beforehand;
//! * a bad key, an access outside a region, or an overrun completion queue
//!   moves the queue pair to the error state: everything after fails;
//! * nothing times out: a peer that is gone and idle raises no error.

#![allow(unsafe_code)] // `Device::register` is unsafe to call: the memory must outlive its use.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// Why a verbs call failed (the call itself, not a work request: those end
/// in a [`Completion`] with a [`WcStatus`]).
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// No RDMA device on this host (or the kernel has no RDMA support).
    #[error("no RDMA device{}: {why}", name.as_ref().map(|n| format!(" named {n:?}")).unwrap_or_default())]
    NoDevice {
        /// The name asked for.
        name: Option<String>,
        /// What the verbs library said.
        why: String,
    },
    /// The send queue holds `depth` requests not yet reclaimed by a polled
    /// completion (ENOMEM from ibv_post_send).
    #[error("send queue full: {depth} work requests not yet reclaimed by a polled completion")]
    SendQueueFull {
        /// The queue's depth.
        depth: u32,
    },
    /// The receive queue is full.
    #[error("receive queue full ({depth})")]
    RecvQueueFull {
        /// The queue's depth.
        depth: u32,
    },
    /// A work request id is already in use by a request not yet reclaimed.
    #[error("work request id {0:#x} is still in flight")]
    DuplicateWrId(u64),
    /// A local buffer is not inside a registered region with that key.
    #[error("local buffer {addr:#x}+{len} is not in the region of lkey {lkey:#x}")]
    LocalProtection {
        /// Buffer start.
        addr: u64,
        /// Its length.
        len: u32,
        /// The key given.
        lkey: u32,
    },
    /// The queue pair is in the error state (after a failed request, a bad
    /// key, an overrun completion queue): it must be torn down.
    #[error("queue pair is in the error state: {0}")]
    QpError(String),
    /// The completion queue overran: completions were lost, which is fatal.
    #[error("completion queue overrun ({depth} entries)")]
    CqOverrun {
        /// Its depth.
        depth: u32,
    },
    /// Connecting the queue pair failed or did not finish in time.
    #[error("connecting the queue pair failed: {0}")]
    Connect(String),
    /// The peer's endpoint is malformed.
    #[error("bad endpoint: {0}")]
    BadEndpoint(String),
    /// Another verbs call failed.
    #[error("{op} failed")]
    Os {
        /// The call.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Access a memory region grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// The NIC may write it for local operations (the target of a READ or a receive).
    pub local_write: bool,
    /// A peer may READ it.
    pub remote_read: bool,
    /// A peer may WRITE it.
    pub remote_write: bool,
}

impl Access {
    /// Local use only, written by READs and receives.
    pub const LOCAL: Access = Access { local_write: true, remote_read: false, remote_write: false };
    /// Readable by the peer (the source's guest memory).
    pub const REMOTE_READ: Access = Access { local_write: false, remote_read: true, remote_write: false };
    /// Writable by the peer.
    pub const REMOTE_WRITE: Access = Access { local_write: true, remote_read: false, remote_write: true };
}

/// A registered memory region.
pub trait MemoryRegion: Send + Sync {
    /// Key for local scatter-gather entries.
    fn lkey(&self) -> u32;
    /// Key a peer names in one-sided operations.
    fn rkey(&self) -> u32;
    /// Start address.
    fn addr(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One local buffer of a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Local key of the region it lies in.
    pub lkey: u32,
}

/// Remote memory a one-sided operation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Address in the peer's address space.
    pub addr: u64,
    /// The peer region's remote key.
    pub rkey: u32,
}

/// What a send-queue work request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `remote` into the local buffer.
    Read(Remote),
    /// Write the local buffer to `remote`; the peer is not told.
    Write(Remote),
    /// Write, then consume one of the peer's receives with this immediate.
    WriteImm(Remote, u32),
    /// Send the buffer into the peer's next posted receive.
    Send,
}

/// A send-queue work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWr {
    /// The caller's id, echoed by the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: Op,
    /// The local buffer.
    pub sge: Sge,
    /// Whether it produces a completion when it succeeds.
    pub signaled: bool,
}

/// A receive-queue work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWr {
    /// The caller's id.
    pub wr_id: u64,
    /// Where a SEND's bytes land.
    pub sge: Sge,
}

/// How a work request ended (`ibv_wc_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcStatus {
    /// Done.
    Success,
    /// A received message did not fit the receive buffer.
    LocalLength,
    /// A local buffer outside its region.
    LocalProtection,
    /// The peer refused the access: bad rkey, out of its region, or not allowed.
    RemoteAccess,
    /// The peer had no receive posted (receiver not ready), retries exhausted.
    RnrRetryExceeded,
    /// The peer did not answer, retries exhausted.
    RetryExceeded,
    /// Flushed: the queue pair went to the error state before this ran.
    Flushed,
    /// Anything else.
    Other(u32),
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WcStatus::Success => f.write_str("success"),
            WcStatus::LocalLength => f.write_str("local length error"),
            WcStatus::LocalProtection => f.write_str("local protection error"),
            WcStatus::RemoteAccess => f.write_str("remote access error"),
            WcStatus::RnrRetryExceeded => f.write_str("receiver not ready, retries exceeded"),
            WcStatus::RetryExceeded => f.write_str("transport retries exceeded"),
            WcStatus::Flushed => f.write_str("flushed"),
            WcStatus::Other(v) => write!(f, "status {v}"),
        }
    }
}

/// Which kind of request a completion ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcOp {
    /// A READ.
    Read,
    /// A WRITE (with or without immediate).
    Write,
    /// A SEND.
    Send,
    /// A receive, with the immediate if the peer wrote one.
    Recv {
        /// The immediate of a WRITE with immediate.
        imm: Option<u32>,
    },
}

/// A completion (`ibv_wc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
    /// What it was.
    pub op: WcOp,
    /// Bytes received (receives only).
    pub byte_len: u32,
}

/// Sizes of a queue pair and its completion queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    /// Send-queue depth.
    pub max_send_wr: u32,
    /// Receive-queue depth.
    pub max_recv_wr: u32,
    /// Completion-queue depth (at least the two above together, or it can overrun).
    pub cq_depth: u32,
}

/// What one side tells the other to connect a queue pair: opaque to the
/// engine, at most [`MAX_ENDPOINT_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint(pub Vec<u8>);

/// Longest endpoint description.
pub const MAX_ENDPOINT_LEN: usize = 128;

/// An open device.
pub trait Device: Send + Sync {
    /// Its name.
    fn name(&self) -> &str;

    /// Register `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay mapped until the region is dropped, and every
    /// queue pair that may still touch it must be dropped before that.
    /// The device reads and writes it as a NIC would, concurrently with the
    /// process.
    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Box<dyn MemoryRegion>, VerbsError>;

    /// A reliable-connected queue pair with its own completion queue.
    fn create_qp(&self, caps: QpCaps) -> Result<Box<dyn QueuePair>, VerbsError>;
}

/// A reliable-connected queue pair and its completion queue.
pub trait QueuePair: Send {
    /// What the peer needs to connect to it.
    fn endpoint(&self) -> Endpoint;

    /// Connect to the peer's queue pair (both sides call this with the
    /// other's endpoint), by `deadline`.
    fn connect(&mut self, remote: &Endpoint, deadline: Instant) -> Result<(), VerbsError>;

    /// Post one send-queue request.
    fn post_send(&mut self, wr: &SendWr) -> Result<(), VerbsError>;

    /// Post one receive.
    fn post_recv(&mut self, wr: &RecvWr) -> Result<(), VerbsError>;

    /// Take up to `out.len()` completions; reclaims send-queue slots.
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, VerbsError>;

    /// Ask for the readiness descriptor to fire at the next completion
    /// (and consume what fired before). Poll again after arming: a
    /// completion that came in between did not fire.
    fn arm(&mut self) -> Result<(), VerbsError>;

    /// Polls readable once an armed completion queue got a completion.
    fn readiness(&self) -> BorrowedFd<'_>;
}
