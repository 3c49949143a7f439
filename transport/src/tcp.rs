//! TCP connections: nonblocking sockets driven with `poll`, frames gathered
//! with `writev` straight from guest memory, and a receive buffer that decodes
//! frames in place.
//!
//! Both connections use TCP_NODELAY: a range request or a demand reply is
//! one small write that must leave at once. The bulk connection may set
//! TCP_NOTSENT_LOWAT so the kernel holds little unsent push data: the pusher
//! then blocks early and re-reads its restart hint often, instead of having
//! megabytes committed in the socket when the guest faults elsewhere.
#![allow(unsafe_code)]

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use proto::wire::{self, FrameHeader, HEADER_LEN, Msg, PAGES_PREFIX_LEN, PageKind, Tag};
use proto::{PageIdx, PageSize};

use crate::conn::{Conn, IoSpan, PagePlacer, PathInfo, PlaceError, Placed, TransportError, Wait, poll_fd};
use crate::frames::RecvBuf;

/// Tunables of one TCP connection.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// A send that makes no progress for this long fails: the peer is gone or stuck.
    pub send_timeout: Duration,
    /// TCP_NOTSENT_LOWAT in bytes, if set.
    pub notsent_lowat: Option<u32>,
    /// Initial receive buffer in bytes (grows to fit a frame).
    pub recv_buf: usize,
    /// SO_MAX_PACING_RATE in bytes per second, if set: TCP then paces this
    /// connection itself (no fq needed), so it never fills the bottleneck's
    /// queue ahead of another connection's packets.
    pub max_pacing_rate: Option<u64>,
    /// How this connection's packets are marked.
    pub marking: Marking,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            send_timeout: Duration::from_secs(10),
            notsent_lowat: None,
            recv_buf: 4 << 20,
            max_pacing_rate: None,
            marking: Marking::None,
        }
    }
}

/// How a connection's packets are marked, for queues that tell traffic
/// apart: the DSCP field (IP_TOS, IPV6_TCLASS), which networks and a host's
/// classifiers read, and the socket priority (SO_PRIORITY), which a host's
/// qdiscs read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Marking {
    /// Left as the system marks it.
    #[default]
    None,
    /// Latency first: DSCP EF (46), priority 6 (TC_PRIO_INTERACTIVE).
    Urgent,
    /// Yields to everything: DSCP LE (1, RFC 8622), priority 1 (TC_PRIO_FILLER).
    Bulk,
}

impl Marking {
    /// The DSCP codepoint and the socket priority, if any.
    pub fn dscp_and_priority(self) -> Option<(u8, i32)> {
        match self {
            Marking::None => None,
            Marking::Urgent => Some((46, 6)),
            Marking::Bulk => Some((1, 1)),
        }
    }
}

/// Mark `stream`'s packets (nothing for [`Marking::None`]).
fn mark(stream: &TcpStream, marking: Marking) -> std::io::Result<()> {
    let Some((dscp, priority)) = marking.dscp_and_priority() else {
        return Ok(());
    };
    let tos = libc::c_int::from(dscp) << 2;
    match stream.local_addr() {
        Ok(SocketAddr::V4(_)) => set_int_opt(stream.as_fd(), libc::IPPROTO_IP, libc::IP_TOS, tos)?,
        Ok(SocketAddr::V6(_)) => {
            set_int_opt(stream.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos)?;
            // An IPv4-mapped peer's packets are IPv4: they take
            // IP_TOS (refused for a pure IPv6 socket, which is fine).
            let _ = set_int_opt(stream.as_fd(), libc::IPPROTO_IP, libc::IP_TOS, tos);
        }
        // No address to tell the family by: left unmarked.
        Err(_) => {}
    }
    // After IP_TOS, which sets a priority of its own.
    set_int_opt(stream.as_fd(), libc::SOL_SOCKET, libc::SO_PRIORITY, priority)
}

/// A framed TCP connection.
pub struct TcpConn {
    stream: TcpStream,
    /// How its packets are marked.
    marking: Marking,
    rb: RecvBuf,
    scratch: Vec<u8>,
    page_size: Option<PageSize>,
    peer: String,
    sent: u64,
    received: u64,
    send_timeout: Duration,
    /// A send failed, perhaps half way through a frame: nothing more may be
    /// written, or the next frame's bytes would complete the cut one into
    /// something the peer decodes (an Error header finishing a Switchover).
    tx_broken: bool,
    /// The last read returned less than it could take: the socket was empty
    /// then, so a waiting receive polls before reading (saving a read that
    /// would only say EAGAIN).
    drained: bool,
}

impl std::fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConn").field("peer", &self.peer).finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, peer: &str, source: std::io::Error) -> TransportError {
    match source.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            TransportError::Closed { peer: peer.to_string(), mid_frame: false }
        }
        _ => TransportError::Io { op, peer: peer.to_string(), source },
    }
}

fn set_int_opt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("small");
    // SAFETY: `fd` is an open socket for the call's duration; the option value
    // points at a live c_int of the length passed.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const v).cast(), len) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl TcpConn {
    fn from_stream(stream: TcpStream, opts: &TcpOptions) -> std::io::Result<TcpConn> {
        let peer = stream.peer_addr().map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        if let Some(lowat) = opts.notsent_lowat {
            let v = libc::c_int::try_from(lowat).unwrap_or(libc::c_int::MAX);
            set_int_opt(stream.as_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v)?;
        }
        mark(&stream, opts.marking)?;
        if let Some(rate) = opts.max_pacing_rate {
            let len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("small");
            // SAFETY: as in `set_int_opt`; the kernel reads a u64 when given 8 bytes.
            let r = unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MAX_PACING_RATE,
                    (&raw const rate).cast(),
                    len,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(TcpConn {
            stream,
            marking: opts.marking,
            rb: RecvBuf::new(opts.recv_buf),
            scratch: Vec::with_capacity(64 * 1024),
            page_size: None,
            peer,
            sent: 0,
            received: 0,
            send_timeout: opts.send_timeout,
            tx_broken: false,
            drained: false,
        })
    }

    /// Connect to `addr`, failing after `timeout`.
    pub fn connect(addr: &str, timeout: Duration, opts: &TcpOptions) -> Result<TcpConn, TransportError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Io { op: "resolve", peer: addr.to_string(), source })?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    return TcpConn::from_stream(s, opts).map_err(|source| TransportError::Io {
                        op: "configure socket",
                        peer: a.to_string(),
                        source,
                    });
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    last = Some(TransportError::Timeout { what: format!("connecting to {a}"), after: timeout });
                }
                Err(source) => last = Some(TransportError::Io { op: "connect", peer: a.to_string(), source }),
            }
        }
        Err(last.unwrap_or_else(|| TransportError::Io {
            op: "resolve",
            peer: addr.to_string(),
            source: std::io::Error::new(ErrorKind::NotFound, "no address"),
        }))
    }

    /// Apply TCP_NOTSENT_LOWAT after the fact (the bulk connection is set up
    /// as a normal one first).
    pub fn set_notsent_lowat(&mut self, bytes: u32) -> Result<(), TransportError> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        set_int_opt(self.stream.as_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v).map_err(|source| {
            TransportError::Io { op: "setsockopt TCP_NOTSENT_LOWAT", peer: self.peer.clone(), source }
        })
    }

    /// Write every byte of `iov`, waiting for room at most `send_timeout` at a
    /// time (the clock restarts whenever bytes move).
    fn write_all_vectored(&mut self, iov: &mut [libc::iovec]) -> Result<(), TransportError> {
        if self.tx_broken {
            return Err(TransportError::Closed { peer: self.peer.clone(), mid_frame: true });
        }
        let r = self.write_all_vectored_once(iov);
        if r.is_err() {
            self.tx_broken = true;
        }
        r
    }

    fn write_all_vectored_once(&mut self, iov: &mut [libc::iovec]) -> Result<(), TransportError> {
        let mut first = 0;
        let mut stalled_since: Option<Instant> = None;
        while first < iov.len() {
            let cnt = libc::c_int::try_from((iov.len() - first).min(1024)).expect("at most IOV_MAX");
            // SAFETY: every iovec points at memory the caller keeps readable for
            // this call (slices it borrows, or IoSpans whose constructor promised
            // it); the socket fd is open.
            let n = unsafe { libc::writev(self.stream.as_raw_fd(), iov[first..].as_ptr(), cnt) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock => {
                        let since = *stalled_since.get_or_insert_with(Instant::now);
                        let deadline = since + self.send_timeout;
                        let ready = poll_fd(self.stream.as_fd(), true, deadline)
                            .map_err(|source| io_err("poll", &self.peer, source))?;
                        if !ready {
                            return Err(TransportError::SendTimeout {
                                peer: self.peer.clone(),
                                after: self.send_timeout,
                            });
                        }
                        continue;
                    }
                    _ => return Err(io_err("writev", &self.peer, e)),
                }
            }
            stalled_since = None;
            let mut n = usize::try_from(n).expect("non-negative");
            self.sent += n as u64;
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: n < iov_len, so the advanced pointer stays inside
                    // the same readable span.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
        }
        Ok(())
    }
}

impl TcpConn {
    /// Read more bytes into the receive buffer, at most `max`. `Ok(false)` if
    /// nothing arrived within `wait`.
    fn fill(&mut self, max: usize, wait: Wait) -> Result<bool, TransportError> {
        loop {
            let space = self.rb.space();
            let n = space.len().min(max.max(1));
            match (&self.stream).read(&mut space[..n]) {
                Ok(0) => {
                    return Err(TransportError::Closed { peer: self.peer.clone(), mid_frame: self.rb.pending() > 0 });
                }
                Ok(n) => {
                    self.received += n as u64;
                    self.rb.commit(n);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => match wait {
                    Wait::No => return Ok(false),
                    Wait::Until(deadline) => {
                        if !poll_fd(self.stream.as_fd(), false, deadline).map_err(|e| io_err("poll", &self.peer, e))? {
                            return Ok(false);
                        }
                    }
                },
                Err(e) => return Err(io_err("read", &self.peer, e)),
            }
        }
    }

    /// Fill `spans` completely from the socket, waiting at most the
    /// connection's timeout between bytes.
    fn read_into(&mut self, spans: &mut [libc::iovec]) -> Result<(), TransportError> {
        let mut first = 0;
        while first < spans.len() && spans[first].iov_len == 0 {
            first += 1;
        }
        while first < spans.len() {
            let cnt = libc::c_int::try_from((spans.len() - first).min(1024)).expect("at most IOV_MAX");
            // SAFETY: each iovec points at memory the placer's IoSpanMut
            // promised writable for this call; the fd is an open socket.
            let n = unsafe { libc::readv(self.stream.as_raw_fd(), spans[first..].as_ptr(), cnt) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock => {
                        let deadline = Instant::now() + self.send_timeout;
                        if !poll_fd(self.stream.as_fd(), false, deadline).map_err(|e| io_err("poll", &self.peer, e))? {
                            return Err(TransportError::Timeout {
                                what: format!("the rest of a pages frame from {}", self.peer),
                                after: self.send_timeout,
                            });
                        }
                        continue;
                    }
                    _ => return Err(io_err("readv", &self.peer, e)),
                }
            }
            if n == 0 {
                return Err(TransportError::Closed { peer: self.peer.clone(), mid_frame: true });
            }
            let mut n = usize::try_from(n).expect("non-negative");
            self.received += n as u64;
            while n > 0 {
                let v = &mut spans[first];
                let k = n.min(v.iov_len);
                // SAFETY: k <= iov_len keeps the pointer inside the span.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
                v.iov_len -= k;
                n -= k;
                if v.iov_len == 0 {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Deliver the data of the Pages frame whose header and prefix are at the
    /// front of the buffer into the placer's spans, run by run.
    fn place_frame(
        &mut self,
        h: FrameHeader,
        placer: &mut dyn PagePlacer,
    ) -> Result<(PageIdx, u32, PageKind), TransportError> {
        let peer = self.peer.clone();
        let prefix = &self.rb.peek()[HEADER_LEN..HEADER_LEN + PAGES_PREFIX_LEN];
        let (first, n_pages, kind) = wire::decode_pages_prefix(h, prefix, self.page_size)
            .map_err(|source| TransportError::Decode { peer: peer.clone(), source })?;
        self.rb.consume(HEADER_LEN + PAGES_PREFIX_LEN);
        let ps = self.page_size.expect("checked by decode_pages_prefix").bytes_usize();
        let step = placer.max_pages().max(1);
        let mut done = 0;
        while done < n_pages {
            let n = step.min(n_pages - done);
            let at = PageIdx(first.0 + u64::from(done));
            self.place_run(at, n, kind, n as usize * ps, placer)?;
            done += n;
        }
        Ok((first, n_pages, kind))
    }

    /// Place one run of a frame: ask the placer, fill its spans from the
    /// buffer and then the socket, tell it how that went.
    fn place_run(
        &mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        data_len: usize,
        placer: &mut dyn PagePlacer,
    ) -> Result<(), TransportError> {
        let peer = self.peer.clone();
        let mut spans = Vec::with_capacity(8);
        placer
            .place(first, n_pages, kind, &mut spans)
            .map_err(|source| TransportError::Refused { peer: peer.clone(), source })?;
        let mut iov: Vec<libc::iovec> =
            spans.iter().map(|s| libc::iovec { iov_base: s.ptr().cast(), iov_len: s.len() }).collect();
        drop(spans);
        let given: usize = iov.iter().map(|v| v.iov_len).sum();
        let result = if given != data_len {
            Err(TransportError::Refused {
                peer: peer.clone(),
                source: PlaceError::failed(format!("placer gave {given} bytes for {data_len}")),
            })
        } else {
            // Bytes already buffered first, then straight from the socket.
            let mut have = self.rb.pending().min(data_len);
            let mut at = 0;
            let mut k = 0;
            while have > 0 {
                let v = &mut iov[k];
                let n = have.min(v.iov_len);
                // SAFETY: the destination is inside a placer span (writable
                // by contract), the source inside the receive buffer.
                unsafe { std::ptr::copy_nonoverlapping(self.rb.peek()[at..].as_ptr(), v.iov_base.cast::<u8>(), n) };
                // SAFETY: n <= iov_len keeps the pointer inside the span.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                at += n;
                have -= n;
                if v.iov_len == 0 {
                    k += 1;
                }
            }
            self.rb.consume(at);
            self.read_into(&mut iov[k..])
        };
        let ok = result.is_ok();
        placer.placed(first, n_pages, kind, ok).map_err(|source| TransportError::Refused { peer, source })?;
        result
    }
}

fn iovec_of(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: ptr.cast_mut().cast(), iov_len: len }
}

impl Conn for TcpConn {
    fn send(&mut self, msg: &Msg<'_>) -> Result<(), TransportError> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        msg.encode(&mut buf);
        let mut iov = [iovec_of(buf.as_ptr(), buf.len())];
        let r = self.write_all_vectored(&mut iov);
        self.scratch = buf;
        r
    }

    fn send_pages(
        &mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        data: &[IoSpan<'_>],
    ) -> Result<(), TransportError> {
        let ps = self.page_size.expect("page size set before pages are sent");
        debug_assert_eq!(data.iter().map(IoSpan::len).sum::<usize>() as u64, u64::from(n_pages) * ps.bytes());
        let prefix = wire::pages_prefix(first, n_pages, kind, ps);
        let mut iov = Vec::with_capacity(data.len() + 1);
        iov.push(iovec_of(prefix.as_ptr(), prefix.len()));
        iov.extend(data.iter().map(|s| iovec_of(s.ptr(), s.len())));
        self.write_all_vectored(&mut iov)
    }

    fn recv(&mut self, wait: Wait) -> Result<Option<Msg<'_>>, TransportError> {
        let range = loop {
            match self.rb.take_frame() {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(source) => {
                    return Err(TransportError::Decode { peer: self.peer.clone(), source });
                }
            }
            if let (true, Wait::Until(deadline)) = (self.drained, wait) {
                self.drained = false;
                if !poll_fd(self.stream.as_fd(), false, deadline)
                    .map_err(|source| io_err("poll", &self.peer, source))?
                {
                    return Ok(None);
                }
            }
            let space = self.rb.space();
            let offered = space.len();
            match (&self.stream).read(space) {
                Ok(0) => {
                    return Err(TransportError::Closed { peer: self.peer.clone(), mid_frame: self.rb.pending() > 0 });
                }
                Ok(n) => {
                    self.received += n as u64;
                    self.drained = n < offered;
                    self.rb.commit(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => match wait {
                    Wait::No => return Ok(None),
                    Wait::Until(deadline) => {
                        let ready = poll_fd(self.stream.as_fd(), false, deadline)
                            .map_err(|source| io_err("poll", &self.peer, source))?;
                        if !ready {
                            return Ok(None);
                        }
                    }
                },
                Err(e) => return Err(io_err("read", &self.peer, e)),
            }
        };
        let bytes = self.rb.bytes(range);
        let h = FrameHeader::decode(bytes).expect("validated by take_frame");
        wire::decode(h, &bytes[HEADER_LEN..], self.page_size)
            .map(Some)
            .map_err(|source| TransportError::Decode { peer: self.peer.clone(), source })
    }

    fn recv_placed(&mut self, wait: Wait, placer: &mut dyn PagePlacer) -> Result<Option<Placed<'_>>, TransportError> {
        // Never read past the frame being assembled: a Pages frame's data must
        // stay in the socket until the placer says where it goes.
        let whole = loop {
            let pending = self.rb.pending();
            let need = if pending >= HEADER_LEN {
                let h = FrameHeader::decode(self.rb.peek())
                    .map_err(|source| TransportError::Decode { peer: self.peer.clone(), source })?;
                if h.tag == Tag::Pages {
                    if pending >= HEADER_LEN + PAGES_PREFIX_LEN {
                        let (first, n_pages, kind) = self.place_frame(h, placer)?;
                        return Ok(Some(Placed::Pages { first, n_pages, kind }));
                    }
                    HEADER_LEN + PAGES_PREFIX_LEN - pending
                } else if pending >= h.frame_len() {
                    break h;
                } else {
                    h.frame_len() - pending
                }
            } else {
                // A header, and a Pages prefix if that is what follows.
                HEADER_LEN + PAGES_PREFIX_LEN - pending
            };
            if !self.fill(need, wait)? {
                return Ok(None);
            }
        };
        let range =
            self.rb.take_frame().map_err(|source| TransportError::Decode { peer: self.peer.clone(), source })?;
        let range = range.expect("a whole frame is buffered");
        debug_assert_eq!(range.len(), whole.frame_len());
        let bytes = self.rb.bytes(range);
        wire::decode(whole, &bytes[HEADER_LEN..], self.page_size)
            .map(|m| Some(Placed::Msg(m)))
            .map_err(|source| TransportError::Decode { peer: self.peer.clone(), source })
    }

    fn set_page_size(&mut self, ps: PageSize) {
        self.page_size = Some(ps);
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    fn has_buffered(&self) -> bool {
        self.rb.has_frame()
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.stream.local_addr().ok().map(|a| a.ip())
    }

    fn path_info(&self) -> Option<PathInfo> {
        // SAFETY: tcp_info is plain old data; zero is a valid value.
        let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).expect("small");
        // SAFETY: the socket is open; the kernel writes at most `len` bytes
        // into `ti` and says how many.
        let r = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut ti).cast(),
                &raw mut len,
            )
        };
        // Older kernels fill less: without bytes_acked there is nothing to say.
        let need = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        if r != 0 || (len as usize) < need {
            return None;
        }
        Some(PathInfo { rtt_us: ti.tcpi_rtt, min_rtt_us: ti.tcpi_min_rtt, bytes_acked: ti.tcpi_bytes_acked })
    }

    fn set_pacing(&mut self, bytes_per_s: Option<u64>) -> bool {
        let rate: u64 = bytes_per_s.unwrap_or(u64::MAX);
        let len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("small");
        // SAFETY: as in `from_stream`: the kernel reads a u64 when given 8 bytes.
        let r = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MAX_PACING_RATE,
                (&raw const rate).cast(),
                len,
            )
        };
        r == 0
    }

    fn mark_as_bulk(&mut self) {
        if self.marking != Marking::None && mark(&self.stream, Marking::Bulk).is_ok() {
            self.marking = Marking::Bulk;
        }
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

/// A listening socket that hands out framed connections.
#[derive(Debug)]
pub struct TcpListen {
    l: TcpListener,
    opts: TcpOptions,
}

impl TcpListen {
    /// Listen on `addr` (port 0 picks a free port).
    pub fn bind(addr: &str, opts: TcpOptions) -> Result<TcpListen, TransportError> {
        let l = TcpListener::bind(addr).map_err(|source| TransportError::Io {
            op: "bind",
            peer: addr.to_string(),
            source,
        })?;
        l.set_nonblocking(true).map_err(|source| TransportError::Io {
            op: "listen",
            peer: addr.to_string(),
            source,
        })?;
        Ok(TcpListen { l, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.l.local_addr().expect("a bound listener has an address")
    }

    /// Accept one connection, waiting at most until `deadline`.
    pub fn accept(&self, deadline: Instant) -> Result<TcpConn, TransportError> {
        let me = self.local_addr().to_string();
        let started = Instant::now();
        loop {
            match self.l.accept() {
                Ok((s, _)) => {
                    return TcpConn::from_stream(s, &self.opts).map_err(|source| TransportError::Io {
                        op: "configure socket",
                        peer: me,
                        source,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let ready = poll_fd(self.l.as_fd(), false, deadline).map_err(|source| TransportError::Io {
                        op: "poll",
                        peer: me.clone(),
                        source,
                    })?;
                    if !ready {
                        // Whole milliseconds: the limit as the user gave it.
                        let waited = deadline.saturating_duration_since(started);
                        let after =
                            Duration::from_millis(u64::try_from(waited.as_micros().div_ceil(1000)).unwrap_or(u64::MAX));
                        return Err(TransportError::Timeout {
                            what: format!("waiting for a connection on {me}"),
                            after,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransportError::Io { op: "accept", peer: me, source });
                }
            }
        }
    }
}

impl crate::Listener for TcpListen {
    fn accept(&self, deadline: Instant) -> Result<Box<dyn Conn>, TransportError> {
        TcpListen::accept(self, deadline).map(|c| Box::new(c) as Box<dyn Conn>)
    }

    fn readiness(&self) -> Option<BorrowedFd<'_>> {
        Some(self.l.as_fd())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_passes_the_conformance_suite() {
        let l = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
        let addr = l.local_addr().to_string();
        crate::conformance::run_all(&mut || {
            let a = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap();
            let b = l.accept(Instant::now() + Duration::from_secs(5)).unwrap();
            (Box::new(a) as Box<dyn Conn>, Box::new(b) as Box<dyn Conn>)
        });
    }

    use super::*;
    use crate::conn::IoSpanMut;

    fn pair() -> (TcpConn, TcpConn) {
        let l = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
        let addr = l.local_addr().to_string();
        let t = std::thread::spawn(move || {
            TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap()
        });
        let a = l.accept(Instant::now() + Duration::from_secs(5)).unwrap();
        (a, t.join().unwrap())
    }

    fn int_opt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
        // SAFETY: an open socket; `v` and `len` are live and of the length passed.
        let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &raw mut len) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v
    }

    #[test]
    fn marked_connections_carry_their_dscp_and_priority() {
        let l = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
        let addr = l.local_addr().to_string();
        for (marking, tos, priority) in [(Marking::Urgent, 0xb8, 6), (Marking::Bulk, 0x04, 1), (Marking::None, 0, 0)] {
            let c = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions { marking, ..TcpOptions::default() })
                .unwrap();
            let _peer = l.accept(Instant::now() + Duration::from_secs(5)).unwrap();
            let fd = c.readiness();
            assert_eq!(int_opt(fd, libc::IPPROTO_IP, libc::IP_TOS), tos, "{marking:?}");
            assert_eq!(int_opt(fd, libc::SOL_SOCKET, libc::SO_PRIORITY), priority, "{marking:?}");
        }
    }

    #[test]
    fn a_marking_listener_marks_what_it_accepts_urgent_until_it_turns_out_bulk() {
        for (marking, urgent, bulk) in [(Marking::Urgent, (0xb8, 6), (0x04, 1)), (Marking::None, (0, 0), (0, 0))] {
            let l = TcpListen::bind("127.0.0.1:0", TcpOptions { marking, ..TcpOptions::default() }).unwrap();
            let addr = l.local_addr().to_string();
            let _c = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap();
            let mut a = l.accept(Instant::now() + Duration::from_secs(5)).unwrap();
            let got = |a: &TcpConn| {
                let fd = a.readiness();
                (int_opt(fd, libc::IPPROTO_IP, libc::IP_TOS), int_opt(fd, libc::SOL_SOCKET, libc::SO_PRIORITY))
            };
            assert_eq!(got(&a), urgent, "{marking:?} as accepted");
            a.mark_as_bulk();
            assert_eq!(got(&a), bulk, "{marking:?} after mark_as_bulk");
        }
    }

    #[test]
    fn messages_and_gathered_pages_cross() {
        let (mut a, mut b) = pair();
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let p1 = vec![1u8; 4096];
        let p2 = vec![2u8; 8192];
        a.send(&Msg::KeepAlive).unwrap();
        a.send_pages(PageIdx(9), 3, PageKind::Push, &[IoSpan::from_slice(&p1), IoSpan::from_slice(&p2)]).unwrap();
        let deadline = Wait::for_(Duration::from_secs(5));
        assert_eq!(b.recv(deadline).unwrap(), Some(Msg::KeepAlive));
        match b.recv(deadline).unwrap() {
            Some(Msg::Pages { first, n_pages, kind, data }) => {
                assert_eq!((first, n_pages, kind), (PageIdx(9), 3, PageKind::Push));
                assert!(data[..4096].iter().all(|&x| x == 1) && data[4096..].iter().all(|&x| x == 2));
            }
            other => panic!("got {other:?}"),
        }
        assert_eq!(b.recv(Wait::No).unwrap(), None);
        assert_eq!(a.bytes_sent(), b.bytes_received());
    }

    /// Places every page's data into a flat buffer indexed by page.
    struct Flat {
        mem: Vec<u8>,
        placed: Vec<(u64, u32, bool)>,
        max: u32,
    }

    impl PagePlacer for Flat {
        fn place<'a>(
            &'a mut self,
            first: PageIdx,
            n: u32,
            _kind: PageKind,
            spans: &mut Vec<IoSpanMut<'a>>,
        ) -> Result<(), crate::PlaceError> {
            let at = usize::try_from(first.0).unwrap() * 4096;
            let len = n as usize * 4096;
            if at + len > self.mem.len() {
                return Err(crate::PlaceError::refused("out of range"));
            }
            // Two spans, to exercise gathering.
            let (a, b) = self.mem[at..at + len].split_at_mut(len / 2);
            spans.push(IoSpanMut::from_slice(a));
            spans.push(IoSpanMut::from_slice(b));
            Ok(())
        }

        fn placed(&mut self, first: PageIdx, n: u32, _kind: PageKind, ok: bool) -> Result<(), crate::PlaceError> {
            self.placed.push((first.0, n, ok));
            Ok(())
        }

        fn max_pages(&self) -> u32 {
            self.max
        }
    }

    #[test]
    fn placed_pages_land_in_place_and_messages_pass_through() {
        let (mut a, mut b) = pair();
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let pages: Vec<u8> = (0..64 * 4096).map(|i| u8::try_from(i / 4096).unwrap()).collect();
        let t = std::thread::spawn(move || {
            for (first, n) in [(0u64, 16u32), (16, 48)] {
                let at = usize::try_from(first).unwrap() * 4096;
                let data = &pages[at..at + n as usize * 4096];
                a.send_pages(PageIdx(first), n, PageKind::Push, &[IoSpan::from_slice(data)]).unwrap();
                a.send(&Msg::KeepAlive).unwrap();
            }
            a.send(&Msg::PushDone { n_pushed: 64 }).unwrap();
            a
        });
        let mut flat = Flat { mem: vec![0xee; 64 * 4096], placed: vec![], max: 20 };
        let mut msgs = 0;
        loop {
            match b.recv_placed(Wait::for_(Duration::from_secs(5)), &mut flat).unwrap() {
                Some(Placed::Pages { .. }) => {}
                Some(Placed::Msg(Msg::KeepAlive)) => msgs += 1,
                Some(Placed::Msg(Msg::PushDone { .. })) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(msgs, 2);
        // Frames placed in runs of at most 20 pages.
        assert_eq!(flat.placed, vec![(0, 16, true), (16, 20, true), (36, 20, true), (56, 8, true)]);
        for (p, chunk) in flat.mem.chunks(4096).enumerate() {
            assert!(chunk.iter().all(|&x| usize::from(x) == p), "page {p}");
        }
        drop(t.join().unwrap());
    }

    #[test]
    fn placer_refusal_and_cut_frames_are_errors() {
        let (mut a, mut b) = pair();
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let data = vec![1u8; 8 * 4096];
        a.send_pages(PageIdx(100), 8, PageKind::Push, &[IoSpan::from_slice(&data)]).unwrap();
        let mut flat = Flat { mem: vec![0; 16 * 4096], placed: vec![], max: 3 };
        assert!(matches!(
            b.recv_placed(Wait::for_(Duration::from_secs(5)), &mut flat),
            Err(TransportError::Refused { .. })
        ));
        // A frame cut short by the peer's close: the placer hears `ok = false`.
        let (a, mut b) = pair();
        b.set_page_size(PageSize::Size4K);
        let prefix = wire::pages_prefix(PageIdx(0), 8, PageKind::Push, PageSize::Size4K);
        use std::io::Write;
        (&a.stream).write_all(&prefix).unwrap();
        (&a.stream).write_all(&data[..14000]).unwrap();
        drop(a);
        let mut flat = Flat { mem: vec![0; 16 * 4096], placed: vec![], max: 3 };
        assert!(matches!(
            b.recv_placed(Wait::for_(Duration::from_secs(5)), &mut flat),
            Err(TransportError::Closed { .. })
        ));
        // Placed in runs of 3 pages: the first arrived whole, the second was cut.
        assert_eq!(flat.placed, vec![(0, 3, true), (3, 3, false)]);
    }

    #[test]
    fn large_frames_stream_through_a_small_buffer() {
        let (mut a, mut b) = pair();
        let blob = vec![7u8; 10 << 20];
        let t = std::thread::spawn(move || {
            for _ in 0..3 {
                a.send(&Msg::GuestState(&blob)).unwrap();
            }
            a
        });
        for _ in 0..3 {
            match b.recv(Wait::for_(Duration::from_secs(10))).unwrap() {
                Some(Msg::GuestState(s)) => {
                    assert!(s.len() == 10 << 20 && s.iter().all(|&x| x == 7))
                }
                other => panic!("got {:?}", other.map(|m| m.tag())),
            }
        }
        drop(t.join().unwrap());
    }

    #[test]
    fn close_garbage_and_timeouts_are_errors() {
        let (a, mut b) = pair();
        let t0 = Instant::now();
        assert_eq!(b.recv(Wait::for_(Duration::from_millis(50))).unwrap(), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        drop(a);
        assert!(matches!(b.recv(Wait::for_(Duration::from_secs(5))), Err(TransportError::Closed { .. })));

        let (a, mut b) = pair();
        use std::io::Write;
        (&a.stream).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(b.recv(Wait::for_(Duration::from_secs(5))), Err(TransportError::Decode { .. })));

        // A peer that never reads: the sender gives up after its timeout.
        let (a, mut b) = pair();
        b.send_timeout = Duration::from_millis(200);
        let blob = vec![0u8; 1 << 20];
        let r = (0..200).try_for_each(|_| b.send(&Msg::GuestState(&blob)));
        assert!(matches!(r, Err(TransportError::SendTimeout { .. })), "{r:?}");
        // The failed frame may be cut anywhere: nothing more goes out, or
        // the next frame's bytes would complete it into something else.
        let sent = b.bytes_sent();
        assert!(matches!(b.send(&Msg::KeepAlive), Err(TransportError::Closed { mid_frame: true, .. })));
        let page = vec![0u8; 4096];
        b.set_page_size(PageSize::Size4K);
        assert!(b.send_pages(PageIdx(0), 1, PageKind::Push, &[IoSpan::from_slice(&page)]).is_err());
        assert_eq!(b.bytes_sent(), sent, "nothing was written after the failure");
        drop(a);
    }

    #[test]
    fn refused_connection_is_a_clear_error() {
        let l = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
        let addr = l.local_addr().to_string();
        drop(l);
        let e = TcpConn::connect(&addr, Duration::from_secs(2), &TcpOptions::default()).unwrap_err();
        assert!(e.to_string().contains("connect"), "{e}");
    }
}
