//! Serving a VMM that owns guest memory: Firecracker's page-fault handler
//! protocol (`docs/snapshotting/handling-page-faults-on-snapshot-resume.md`).
//!
//! The handler listens on a Unix stream socket. On restore the VMM connects
//! and sends one message: a JSON array of `{base_host_virt_addr, size,
//! offset, page_size}`, one per guest region (`offset` is the region's place
//! in the snapshot memory file; older VMMs send `page_size_kib`, in bytes
//! despite its name), with its userfaultfd attached as SCM_RIGHTS. The
//! descriptor is non-blocking, registered for MISSING faults, and may have
//! UFFD_EVENT_REMOVE enabled (a balloon). The memory is in the VMM's
//! process: the pager only passes its addresses to the kernel through that
//! descriptor (UFFDIO_COPY, UFFDIO_ZEROPAGE), never dereferences them.
//!
//! Everything in the handshake is checked before it is used: its size (at
//! most [`MAX_HANDSHAKE_BYTES`]), exactly one descriptor and that it is a
//! userfaultfd, the regions (count, page size, alignment, no overlap in
//! memory or in the file), and then the regions against the source's table.
#![allow(unsafe_code)]

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, sockopt};
use proto::{MemLayout, PageRange, ViewAddr};

use crate::guest::{DestGuest, GuestError};

/// The longest handshake accepted (Firecracker's own example handler reads
/// at most 1 KiB; 64 regions of JSON fit in well under 16 KiB).
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// The most regions a VMM may announce (the wire's limit).
pub const MAX_VMM_REGIONS: usize = 64;
/// Page sizes a VMM may back guest memory with: 4 KiB, or 2 MiB hugetlbfs.
pub const VMM_PAGE_SIZES: [u64; 2] = [4096, 2 << 20];

/// One guest region as the VMM announced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmRegion {
    /// Where the region starts in the VMM's address space.
    pub base: ViewAddr,
    /// Bytes.
    pub size: u64,
    /// Where the region's content starts in the snapshot memory file.
    pub offset: u64,
    /// Page size backing it.
    pub page_size: u64,
}

/// The process at the other end of the socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmPeer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Why a VMM's handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The socket could not be created.
    #[error("listening for the VMM on {path}")]
    Bind {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something is at the path that is not a socket left by a handler.
    #[error("{0} exists and is not a socket: refusing to replace it")]
    PathTaken(PathBuf),
    /// No VMM connected in time.
    #[error("no VMM connected to {path} within {after:?}")]
    AcceptTimeout {
        /// Where.
        path: PathBuf,
        /// The limit.
        after: Duration,
    },
    /// Waiting was cancelled (the source went away).
    #[error("cancelled while waiting for the VMM")]
    Cancelled,
    /// A socket call failed.
    #[error("{what} failed")]
    Io {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The message came without a descriptor.
    #[error("the VMM's handshake came without a userfaultfd (SCM_RIGHTS)")]
    NoFd,
    /// More than one descriptor came (all are closed).
    #[error("the VMM's handshake carried {0} descriptors; one userfaultfd was expected")]
    ExtraFds(usize),
    /// The descriptor is something else.
    #[error("the descriptor the VMM sent is not a userfaultfd (it is {0})")]
    NotUffd(String),
    /// The control data was cut short (too many descriptors).
    #[error("the VMM's handshake control data was truncated")]
    Truncated,
    /// Over the size limit.
    #[error("the VMM's handshake is longer than {MAX_HANDSHAKE_BYTES} bytes")]
    TooLong,
    /// Incomplete when the time ran out.
    #[error("the VMM's handshake was not complete within {0:?}")]
    Timeout(Duration),
    /// The VMM hung up first.
    #[error("the VMM hung up before its handshake was complete ({0} bytes read)")]
    Eof(usize),
    /// Not the JSON the protocol says.
    #[error("the VMM's handshake is not a JSON array of regions")]
    Json(#[source] serde_json::Error),
    /// A region is malformed.
    #[error("VMM region {index}: {why}")]
    Region {
        /// Which (in the VMM's order).
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The regions are not the source's.
    #[error("the VMM's regions do not match the source's memory: {0}")]
    Mismatch(String),
}

#[derive(serde::Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    /// Older Firecracker: bytes, despite the name.
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// Parse and check a handshake's JSON (see the module doc).
pub fn parse_regions(json: &[u8]) -> Result<Vec<VmmRegion>, VmmError> {
    let wire: Vec<WireRegion> = serde_json::from_slice(json).map_err(VmmError::Json)?;
    if wire.is_empty() || wire.len() > MAX_VMM_REGIONS {
        return Err(VmmError::Region {
            index: 0,
            why: format!("{} regions announced; 1 to {MAX_VMM_REGIONS} are accepted", wire.len()),
        });
    }
    let mut out = Vec::with_capacity(wire.len());
    for (index, w) in wire.iter().enumerate() {
        let bad = |why: String| VmmError::Region { index, why };
        let ps = w.page_size.or(w.page_size_kib).ok_or_else(|| bad("no page_size".into()))?;
        if !VMM_PAGE_SIZES.contains(&ps) {
            return Err(bad(format!("page size {ps} is neither 4 KiB nor 2 MiB")));
        }
        if index > 0 && ps != out.first().map_or(ps, |r: &VmmRegion| r.page_size) {
            return Err(bad("regions with different page sizes".into()));
        }
        if w.size == 0 || !w.size.is_multiple_of(ps) {
            return Err(bad(format!("size {} is not a positive multiple of the page size {ps}", w.size)));
        }
        if !w.base_host_virt_addr.is_multiple_of(ps) || w.base_host_virt_addr == 0 {
            return Err(bad(format!("address {:#x} is not a page-aligned user address", w.base_host_virt_addr)));
        }
        if !w.offset.is_multiple_of(ps) {
            return Err(bad(format!("file offset {} is not page-aligned", w.offset)));
        }
        // The user half of the x86-64 address space, and a file offset that
        // does not wrap.
        if w.base_host_virt_addr.checked_add(w.size).is_none_or(|end| end > 1 << 47)
            || w.offset.checked_add(w.size).is_none()
        {
            return Err(bad(format!("{:#x} + {} bytes runs past the address space", w.base_host_virt_addr, w.size)));
        }
        let base = usize::try_from(w.base_host_virt_addr).map_err(|_| bad("address too large".into()))?;
        out.push(VmmRegion { base: ViewAddr(base), size: w.size, offset: w.offset, page_size: ps });
    }
    for (what, key) in [("memory", 0usize), ("the snapshot file", 1)] {
        let span = |r: &VmmRegion| if key == 0 { r.base.0 as u64 } else { r.offset };
        let mut by: Vec<(usize, &VmmRegion)> = out.iter().enumerate().collect();
        by.sort_by_key(|(_, r)| span(r));
        for w in by.windows(2) {
            let ((_, a), (j, b)) = (w[0], w[1]);
            if span(a) + a.size > span(b) {
                return Err(VmmError::Region { index: j, why: format!("overlaps another region in {what}") });
            }
        }
    }
    Ok(out)
}

/// Match the VMM's regions to the source's layout, whose region `guest`
/// offsets are places in the snapshot memory file (a `source
/// --memory-file`). Returns each layout region's base in the VMM.
pub fn match_layout(regions: &[VmmRegion], layout: &MemLayout) -> Result<Vec<ViewAddr>, VmmError> {
    let ps = layout.page_size().bytes();
    if let Some(r) = regions.iter().find(|r| r.page_size != ps) {
        return Err(VmmError::Mismatch(format!("the VMM uses {} byte pages, the source {ps}", r.page_size)));
    }
    if regions.len() != layout.regions().len() {
        return Err(VmmError::Mismatch(format!(
            "the VMM has {} regions, the source {}",
            regions.len(),
            layout.regions().len()
        )));
    }
    layout
        .regions()
        .iter()
        .map(|want| {
            regions.iter().find(|r| r.offset == want.guest.0 && r.size == want.len_bytes).map(|r| r.base).ok_or_else(
                || {
                    VmmError::Mismatch(format!(
                        "the source has {} bytes at file offset {} and the VMM no such region",
                        want.len_bytes, want.guest.0
                    ))
                },
            )
        })
        .collect()
}

/// A Unix socket a VMM connects to.
#[derive(Debug)]
pub struct VmmListener {
    listener: UnixListener,
    path: PathBuf,
}

impl VmmListener {
    /// Listen at `path`, replacing a socket left there by an earlier handler
    /// (never a file of any other kind).
    pub fn bind(path: &Path) -> Result<VmmListener, VmmError> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(VmmError::PathTaken(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|source| VmmError::Bind { path: path.to_path_buf(), source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VmmError::Io { what: "setting the socket nonblocking", source })?;
        Ok(VmmListener { listener, path: path.to_path_buf() })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept one VMM and read its handshake, within `limit` (for the
    /// connection and again for the message), giving up when `cancel` is set.
    pub fn accept(&self, limit: Duration, cancel: &AtomicBool) -> Result<VmmHandshake, VmmError> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(source) => return Err(VmmError::Io { what: "accepting the VMM", source }),
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(VmmError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Err(VmmError::AcceptTimeout { path: self.path.clone(), after: limit });
            }
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(50u16));
        };
        read_handshake(stream, limit)
    }
}

impl Drop for VmmListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A VMM's accepted handshake.
#[derive(Debug)]
pub struct VmmHandshake {
    /// Its regions, checked (not yet against the source).
    pub regions: Vec<VmmRegion>,
    /// Its userfaultfd.
    pub uffd: OwnedFd,
    /// Who it is.
    pub peer: VmmPeer,
    /// A pidfd of the peer (to end it if its memory cannot be served), if
    /// one could be opened.
    pub pidfd: Option<OwnedFd>,
    /// The connection (kept: some VMMs watch it).
    pub stream: UnixStream,
}

fn io(what: &'static str) -> impl FnOnce(nix::Error) -> VmmError {
    move |e| VmmError::Io { what, source: std::io::Error::from(e) }
}

/// Read one handshake from `stream`: JSON bytes until they parse, the
/// descriptor from the control data of whichever read carried it.
pub fn read_handshake(stream: UnixStream, limit: Duration) -> Result<VmmHandshake, VmmError> {
    let deadline = Instant::now() + limit;
    let cred = nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials).map_err(io("SO_PEERCRED"))?;
    let peer = VmmPeer { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() };
    let mut buf = vec![0u8; MAX_HANDSHAKE_BYTES + 1];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    let mut extra = 0usize;
    let regions = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmmError::Timeout(limit));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX).max(1);
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(io("poll")(e)),
        }
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let (n, truncated, fds_in) = {
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let msg = match recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io("reading the VMM's handshake")(e)),
            };
            let mut fds_in = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds_in.extend(v);
                    }
                }
            }
            (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC), fds_in)
        };
        for raw in fds_in {
            // SAFETY: the kernel just installed `raw` in this process for us
            // (SCM_RIGHTS); nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            if fd.is_none() { fd = Some(owned) } else { extra += 1 }
        }
        if truncated {
            return Err(VmmError::Truncated);
        }
        if extra > 0 {
            return Err(VmmError::ExtraFds(extra + 1));
        }
        if n == 0 {
            return Err(VmmError::Eof(got));
        }
        got += n;
        if got > MAX_HANDSHAKE_BYTES {
            return Err(VmmError::TooLong);
        }
        match parse_regions(&buf[..got]) {
            Ok(r) => break r,
            Err(VmmError::Json(e)) if e.is_eof() => {}
            Err(e) => return Err(e),
        }
    };
    let uffd = fd.ok_or(VmmError::NoFd)?;
    let what = std::fs::read_link(format!("/proc/self/fd/{}", uffd.as_raw_fd()))
        .map_or_else(|e| format!("unreadable: {e}"), |p| p.display().to_string());
    if what != "anon_inode:[userfaultfd]" {
        return Err(VmmError::NotUffd(what));
    }
    Ok(VmmHandshake { regions, uffd, peer, pidfd: pidfd_open(peer.pid), stream })
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    let raw = RawFd::try_from(r).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `raw` is a descriptor the kernel just created for us.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A VMM's guest memory, served through the userfaultfd it handed over.
#[derive(Debug)]
pub struct VmmGuest {
    bases: Vec<ViewAddr>,
    uffd: Option<OwnedFd>,
    /// Who the VMM is.
    pub peer: VmmPeer,
    _stream: UnixStream,
}

impl VmmGuest {
    /// Serve `hs`'s memory for the source's `layout` (its regions matched
    /// by file offset and size).
    pub fn new(hs: VmmHandshake, layout: &MemLayout) -> Result<VmmGuest, VmmError> {
        let bases = match_layout(&hs.regions, layout)?;
        Ok(VmmGuest { bases, uffd: Some(hs.uffd), peer: hs.peer, _stream: hs.stream })
    }
}

/// End a VMM (SIGKILL through the pidfd taken at its handshake): its vCPUs
/// would otherwise wait forever on memory that can no longer arrive.
/// Returns whether the signal was sent.
pub fn kill(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null
    // siginfo and flags; no memory is passed.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            nix::libc::SIGKILL,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

// SAFETY: the regions are the VMM's mappings, registered with the descriptor
// it handed over; the pager only passes their addresses to the kernel
// through that descriptor (`regions()` is a view of another process), and
// the kernel refuses (ESRCH, ENOENT) rather than touching memory that is gone.
unsafe impl DestGuest for VmmGuest {
    fn regions(&self) -> Vec<ViewAddr> {
        self.bases.clone()
    }

    fn alias_regions(&self) -> Option<Vec<proto::HostAddr>> {
        None
    }

    fn resume(&mut self, _state: &[u8]) -> Result<(), GuestError> {
        // The VMM restored its vCPUs from its own snapshot and runs them:
        // they have been waiting on their faults since.
        Ok(())
    }

    fn evict(&self, pages: PageRange) -> Result<(), GuestError> {
        // Nothing is installed before switchover in a VMM's memory (only
        // pure post-copy is accepted), and another process's pages cannot
        // be dropped from here.
        Err(GuestError::Evict {
            first: pages.first.0,
            n_pages: pages.n_pages,
            source: "pages cannot be dropped from a VMM's memory (pure post-copy only)".into(),
        })
    }

    fn take_userfaultfd(&mut self) -> Option<OwnedFd> {
        self.uffd.take()
    }
}

#[cfg(test)]
mod tests {
    use proto::{GuestOffset, PageSize, RegionDesc};

    use super::*;

    fn region(base: u64, size: u64, offset: u64) -> String {
        format!(r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096}}"#)
    }

    #[test]
    fn a_well_formed_handshake_parses_both_spellings_of_the_page_size() {
        let j = format!("[{}]", region(0x7f00_0000_0000, 1 << 20, 0));
        let r = parse_regions(j.as_bytes()).unwrap();
        assert_eq!(r, vec![VmmRegion { base: ViewAddr(0x7f00_0000_0000), size: 1 << 20, offset: 0, page_size: 4096 }]);
        let old = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(parse_regions(old.as_bytes()).unwrap()[0].page_size, 4096);
    }

    #[test]
    fn malformed_regions_are_refused_with_the_reason() {
        let cases: Vec<(String, &str)> = vec![
            ("[]".into(), "regions announced"),
            (r#"{"a":1}"#.into(), "JSON"),
            (r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#.into(), "no page_size"),
            (r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]"#.into(), "neither"),
            (format!("[{}]", region(4096, 100, 0)), "multiple"),
            (format!("[{}]", region(4097, 4096, 0)), "page-aligned user"),
            (format!("[{}]", region(4096, 4096, 12)), "file offset"),
            (format!("[{}]", region(1 << 47, 4096, 0)), "address space"),
            (format!("[{},{}]", region(4096, 8192, 0), region(8192, 4096, 8192)), "in memory"),
            (format!("[{},{}]", region(4096, 8192, 0), region(1 << 30, 4096, 4096)), "in the snapshot file"),
        ];
        for (json, needle) in cases {
            let e = parse_regions(json.as_bytes()).unwrap_err();
            let msg = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            assert!(msg.contains(needle) || (needle == "JSON" && matches!(e, VmmError::Json(_))), "{json}: {msg}");
        }
    }

    #[test]
    fn regions_match_the_source_by_file_offset_not_by_order() {
        let layout = MemLayout::new(
            PageSize::Size4K,
            vec![
                RegionDesc { guest: GuestOffset(0), len_bytes: 8192 },
                RegionDesc { guest: GuestOffset(8192), len_bytes: 4096 },
            ],
        )
        .unwrap();
        let j = format!("[{},{}]", region(0x10_0000, 4096, 8192), region(0x20_0000, 8192, 0));
        let r = parse_regions(j.as_bytes()).unwrap();
        assert_eq!(match_layout(&r, &layout).unwrap(), vec![ViewAddr(0x20_0000), ViewAddr(0x10_0000)]);
        let j = format!("[{},{}]", region(0x10_0000, 4096, 16384), region(0x20_0000, 8192, 0));
        let e = match_layout(&parse_regions(j.as_bytes()).unwrap(), &layout).unwrap_err();
        assert!(e.to_string().contains("file offset 8192"), "{e}");
        let j = format!("[{}]", region(0x20_0000, 8192, 0));
        let e = match_layout(&parse_regions(j.as_bytes()).unwrap(), &layout).unwrap_err();
        assert!(e.to_string().contains("1 regions, the source 2"), "{e}");
    }
}
