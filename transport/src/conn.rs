//! The connection trait every transport implements, and its error type.
//!
//! A connection is owned by one thread at a time (`Send`, not `Sync`): the
//! destination's fault thread owns the control connection, its push receiver
//! owns the bulk connection, and so on. Nothing here queues data in user
//! space on the way out: `send*` returns once the kernel (or the peer's queue)
//! holds the bytes, so a demand reply is never stuck behind our own backlog.

use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use proto::wire::{DecodeError, Msg, PageKind};
use proto::{HostAddr, PageIdx, PageSize};

/// How long a receive may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Return at once if no whole message is buffered or readable.
    No,
    /// Wait until this instant at most.
    Until(Instant),
}

impl Wait {
    /// Wait at most `d` from now.
    pub fn for_(d: Duration) -> Wait {
        Wait::Until(Instant::now() + d)
    }
}

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection (or it was reset).
    #[error("connection to {peer} closed{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed {
        /// Who the peer was.
        peer: String,
        /// Whether a partial frame was pending.
        mid_frame: bool,
    },
    /// A send could not complete in time: the peer stopped reading.
    #[error("sending to {peer} made no progress for {after:?}")]
    SendTimeout {
        /// Who the peer was.
        peer: String,
        /// The limit that expired.
        after: Duration,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("invalid frame from {peer}")]
    Decode {
        /// Who the peer was.
        peer: String,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// An operating-system call failed.
    #[error("{op} failed for {peer}")]
    Io {
        /// The operation.
        op: &'static str,
        /// Who the peer was.
        peer: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The placer refused a Pages frame (out of range, out of order) or
    /// failed to take it.
    #[error("pages frame from {peer} refused")]
    Refused {
        /// Who the peer was.
        peer: String,
        /// Why.
        #[source]
        source: PlaceError,
    },
    /// Connecting or accepting did not succeed in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was attempted.
        what: String,
        /// The limit.
        after: Duration,
    },
}

impl TransportError {
    /// Whether the link itself failed (closed, reset, stalled, timed out),
    /// as opposed to the peer sending bytes that break the protocol: only
    /// the first is worth reconnecting for.
    pub fn is_link_failure(&self) -> bool {
        match self {
            TransportError::Closed { .. }
            | TransportError::SendTimeout { .. }
            | TransportError::Io { .. }
            | TransportError::Timeout { .. } => true,
            TransportError::Decode { .. } | TransportError::Refused { .. } => false,
        }
    }
}

/// A span of memory the kernel reads from when sending: guest memory on the
/// source, which Rust code never dereferences while the guest may write it.
#[derive(Clone, Copy, Debug)]
pub struct IoSpan<'a> {
    ptr: *const u8,
    len: usize,
    _life: PhantomData<&'a [u8]>,
}

impl<'a> IoSpan<'a> {
    /// A span over a slice.
    pub fn from_slice(s: &'a [u8]) -> Self {
        IoSpan { ptr: s.as_ptr(), len: s.len(), _life: PhantomData }
    }

    /// A span over raw memory.
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay mapped and readable for `'a`. Concurrent
    /// writes to it are allowed: only the kernel (or a `copy_nonoverlapping`
    /// in the in-memory transport) reads it, and a torn page is the caller's
    /// concern (the source sends a page again if it was dirtied meanwhile).
    #[allow(unsafe_code)]
    pub unsafe fn from_raw(addr: HostAddr, len: usize) -> Self {
        IoSpan { ptr: addr.0 as *const u8, len, _life: PhantomData }
    }

    /// Start address.
    pub fn ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A span of memory the kernel writes received bytes into: guest memory
/// (through the destination's alias mapping) or a scratch buffer.
#[derive(Debug)]
pub struct IoSpanMut<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> IoSpanMut<'a> {
    /// A span over a slice.
    pub fn from_slice(s: &'a mut [u8]) -> Self {
        IoSpanMut { ptr: s.as_mut_ptr(), len: s.len(), _life: PhantomData }
    }

    /// A span over raw memory.
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay mapped and writable for `'a`, and no
    /// one may rely on its content while bytes land in it (the pager claims a
    /// page before pointing a span at it).
    #[allow(unsafe_code)]
    pub unsafe fn from_raw(addr: HostAddr, len: usize) -> Self {
        IoSpanMut { ptr: addr.0 as *mut u8, len, _life: PhantomData }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a placer did not take a Pages frame.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The frame is not acceptable (out of range, out of order, a kind not
    /// legal now): the peer broke the protocol.
    #[error("frame refused")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Putting the pages in place failed here (installing them, say).
    #[error("placing the pages failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl PlaceError {
    /// A refusal for `why`.
    pub fn refused(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        PlaceError::Refused(why.into())
    }

    /// A local failure for `why`.
    pub fn failed(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        PlaceError::Failed(why.into())
    }
}

/// Decides where the data of each received Pages frame goes, so it can be
/// read from the socket straight into guest memory.
///
/// A frame may be placed in pieces: the transport calls `place` and
/// `placed` for consecutive runs of at most `max_pages()` pages, reading
/// each run's bytes in between, so whatever the placer holds for a run (a
/// claim on the pages) is held only while that run's bytes arrive.
pub trait PagePlacer {
    /// Largest run placed at once.
    fn max_pages(&self) -> u32 {
        u32::MAX
    }

    /// Check the run and append spans totalling `n_pages * page_size` bytes
    /// for its data.
    fn place<'a>(
        &'a mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        spans: &mut Vec<IoSpanMut<'a>>,
    ) -> Result<(), PlaceError>;

    /// The data is in the spans (`ok`), or the frame was cut short (`!ok`):
    /// the placer finishes or undoes what `place` began.
    fn placed(&mut self, first: PageIdx, n_pages: u32, kind: PageKind, ok: bool) -> Result<(), PlaceError>;
}

/// What `recv_placed` received.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed<'a> {
    /// A message other than Pages (or a Pages frame, when placing is not
    /// possible for it).
    Msg(Msg<'a>),
    /// A Pages frame whose data went where the placer said.
    Pages {
        /// First page.
        first: PageIdx,
        /// Pages.
        n_pages: u32,
        /// Why they were sent.
        kind: PageKind,
    },
}

/// One framed connection.
pub trait Conn: Send {
    /// Send one message. Blocks at most the connection's send timeout.
    fn send(&mut self, msg: &Msg<'_>) -> Result<(), TransportError>;

    /// Send a Pages frame whose data is gathered from `data` (total
    /// `n_pages * page_size` bytes) without copying it in user space.
    fn send_pages(
        &mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        data: &[IoSpan<'_>],
    ) -> Result<(), TransportError>;

    /// Receive one message, waiting as `wait` allows: `Ok(None)` when nothing
    /// whole arrived in time.
    fn recv(&mut self, wait: Wait) -> Result<Option<Msg<'_>>, TransportError>;

    /// Receive one message as `recv` does, except that the data of a Pages
    /// frame is read straight into the memory `placer` names, without passing
    /// through the connection's buffer. Once a frame's data has begun, the
    /// call waits for all of it (up to the connection's timeout).
    fn recv_placed(&mut self, wait: Wait, placer: &mut dyn PagePlacer) -> Result<Option<Placed<'_>>, TransportError>;

    /// Tell the decoder the negotiated page size (Pages frames are rejected
    /// before it is known).
    fn set_page_size(&mut self, ps: PageSize);

    /// A descriptor that polls readable when `recv` may have something.
    fn readiness(&self) -> BorrowedFd<'_>;

    /// Whether a whole frame is already buffered (poll would not say so).
    fn has_buffered(&self) -> bool;

    /// Bytes sent so far, frames included.
    fn bytes_sent(&self) -> u64;

    /// Bytes received so far.
    fn bytes_received(&self) -> u64;

    /// Who the peer is, for messages.
    fn peer(&self) -> &str;

    /// The local address this connection leaves from, if it has one (a
    /// peer can reach this host there).
    fn local_ip(&self) -> Option<std::net::IpAddr> {
        None
    }

    /// What the transport knows of the path (TCP_INFO), if anything.
    fn path_info(&self) -> Option<PathInfo> {
        None
    }

    /// Pace sending to at most `bytes_per_s` (`None`: unpaced). Returns
    /// whether the transport could.
    fn set_pacing(&mut self, bytes_per_s: Option<u64>) -> bool {
        let _ = bytes_per_s;
        false
    }

    /// This connection carries bulk traffic: if its packets are marked (a
    /// listener marks what it accepts as urgent, before the first message
    /// says which connection it is), they take the bulk marks. Nothing for
    /// an unmarked connection, or where the transport has no marks.
    fn mark_as_bulk(&mut self) {}
}

/// The path as a TCP sender sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathInfo {
    /// Smoothed round-trip time, us.
    pub rtt_us: u32,
    /// Smallest round-trip time seen, us.
    pub min_rtt_us: u32,
    /// Bytes the peer acknowledged so far.
    pub bytes_acked: u64,
}

/// Where a destination takes its connections: the first pair, and every
/// pair a reconnecting source opens later.
pub trait Listener: Send + Sync {
    /// Accept one connection, waiting until `deadline` at most
    /// ([`TransportError::Timeout`] past it; a deadline already passed only
    /// takes a connection that is waiting).
    fn accept(&self, deadline: Instant) -> Result<Box<dyn Conn>, TransportError>;

    /// A descriptor that polls readable when a connection waits, where the
    /// listener has one (callers without it try `accept` on a tick).
    fn readiness(&self) -> Option<BorrowedFd<'_>>;
}

/// Wait for `fd` to be readable (or writable) until `deadline`; `Ok(false)` on timeout.
pub(crate) fn poll_fd(fd: BorrowedFd<'_>, writable: bool, deadline: Instant) -> std::io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let flags = if writable { PollFlags::POLLOUT } else { PollFlags::POLLIN };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis().min(u128::from(u16::MAX))).unwrap_or(u16::MAX);
        // Round up so a sub-millisecond remainder still waits.
        let ms = if left > Duration::ZERO && ms == 0 { 1 } else { ms };
        let mut fds = [PollFd::new(fd, flags)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
