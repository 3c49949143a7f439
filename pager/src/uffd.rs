//! A typed userfaultfd for the pager.
//!
//! The `userfaultfd` crate creates the descriptor (via /dev/userfaultfd),
//! negotiates the API and registers ranges: MISSING for anonymous memory;
//! MISSING and MINOR for shared memory, where a page may already be in the
//! page cache (minor fault) or not yet (missing fault). Both are resolved the
//! same way: write the page through the alias, then UFFDIO_CONTINUE, which
//! maps it and wakes the waiters of either kind (checked on 6.18). Fault messages are read here as
//! raw 32-byte `uffd_msg`s (parsed by the `uffd` crate, which owns the raw
//! ABI: every event type, so non-fault events are reported, not dropped).
//! Page installation wraps UFFDIO_COPY and UFFDIO_CONTINUE directly,
//! because the crate loses the partial-copy count: on this kernel (checked on
//! 6.18) a copy that runs into a present page *after* copying some pages
//! fails with EAGAIN and a positive `copy`; one that starts on a present page
//! fails with EEXIST and `copy = -EEXIST`; a copy racing a mapping change
//! fails with EAGAIN and `copy = -EAGAIN`. Callers never see errno: they get
//! a [`CopyOutcome`].
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::errno::Errno;
use proto::ViewAddr;
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use ::uffd::{
    COPY_MODE_DONTWAKE, Event, FEATURE_MINOR_HUGETLBFS, FEATURE_MINOR_SHMEM, FEATURE_MISSING_SHMEM, UffdioContinue,
    UffdioCopy,
};

/// Size of one `struct uffd_msg`.
pub const MSG_LEN: usize = ::uffd::MSG_LEN;

/// Why a userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Creating the descriptor or negotiating the API failed.
    #[error("creating a userfaultfd failed (is /dev/userfaultfd accessible?)")]
    Create(#[source] userfaultfd::Error),
    /// Registering a range failed.
    #[error("registering {len_bytes} bytes at {addr:#x} with userfaultfd failed")]
    Register {
        /// Start.
        addr: usize,
        /// Length.
        len_bytes: usize,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// Unregistering failed.
    #[error("unregistering {len_bytes} bytes at {addr:#x} failed")]
    Unregister {
        /// Start.
        addr: usize,
        /// Length.
        len_bytes: usize,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// Reading fault messages failed.
    #[error("reading userfaultfd messages failed")]
    Read(#[source] Errno),
    /// A page install failed for a reason other than "present" or "retry".
    #[error("{op} of {len_bytes} bytes at {addr:#x} failed")]
    Install {
        /// UFFDIO_COPY or UFFDIO_CONTINUE.
        op: &'static str,
        /// Destination.
        addr: usize,
        /// Length.
        len_bytes: usize,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// Waking waiters failed.
    #[error("UFFDIO_WAKE at {addr:#x} failed")]
    Wake {
        /// Start.
        addr: usize,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
}

/// How an install call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Every byte was installed.
    Done,
    /// The first `copied` bytes were installed, then the page at
    /// `dst + copied` was already present.
    Exists {
        /// Bytes installed before it.
        copied: usize,
    },
    /// The first `copied` bytes were installed, then the kernel asked for a
    /// retry at `dst + copied` (the mapping was changing, or a present page
    /// follows: the retry will say which).
    Again {
        /// Bytes installed before it.
        copied: usize,
    },
}

/// One missing-page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (not page-aligned).
    pub addr: ViewAddr,
    /// Faulting thread id (UFFD_FEATURE_THREAD_ID).
    pub tid: u32,
}

/// An event other than a page fault (REMOVE, UNMAP, REMAP, FORK): never
/// enabled on a descriptor this engine creates, possible on one a VMM hands
/// over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtherEvent(pub Event);

/// A userfaultfd registered for missing faults.
#[derive(Debug)]
pub struct Userfault {
    uffd: Uffd,
}

fn classify(copied: i64, errno: Errno, op: &'static str, dst: ViewAddr, len: usize) -> Result<CopyOutcome, UffdError> {
    let done = usize::try_from(copied).unwrap_or(0);
    match errno {
        Errno::EEXIST => Ok(CopyOutcome::Exists { copied: done }),
        Errno::EAGAIN => Ok(CopyOutcome::Again { copied: done }),
        source => Err(UffdError::Install { op, addr: dst.0, len_bytes: len, source }),
    }
}

impl Userfault {
    /// A nonblocking userfaultfd reporting faulting thread ids; with
    /// `shared`, also able to report missing and minor faults on shared
    /// memory (shmem, and hugetlbfs for 2 MiB pages). Not user-mode-only: a KVM vCPU's faults on guest memory are
    /// taken in kernel mode.
    pub fn new(shared: bool) -> Result<Userfault, UffdError> {
        let mut features = FeatureFlags::THREAD_ID;
        if shared {
            features |=
                FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM | FEATURE_MINOR_HUGETLBFS | FEATURE_MISSING_SHMEM);
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(UffdError::Create)?;
        Ok(Userfault { uffd })
    }

    /// A userfaultfd created, negotiated and registered by someone else (a
    /// VMM handing over its guest's descriptor): used as it is, its API
    /// already negotiated (a second UFFDIO_API would fail).
    pub fn from_handed_over(fd: std::os::fd::OwnedFd) -> Userfault {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `fd` is an owned, open descriptor whose ownership moves
        // into the `Uffd` (closed on its drop, exactly once).
        let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
        Userfault { uffd }
    }

    /// Register `[addr, addr + len)` of shared memory for missing and minor
    /// faults.
    pub fn register_shared(&self, addr: ViewAddr, len_bytes: usize) -> Result<(), UffdError> {
        self.uffd
            .register_with_mode(addr.0 as *mut c_void, len_bytes, RegisterMode::MISSING | RegisterMode::MINOR)
            .map(drop)
            .map_err(|source| UffdError::Register { addr: addr.0, len_bytes, source })
    }

    /// Register `[addr, addr + len)` for missing faults.
    pub fn register(&self, addr: ViewAddr, len_bytes: usize) -> Result<(), UffdError> {
        self.uffd
            .register_with_mode(addr.0 as *mut c_void, len_bytes, RegisterMode::MISSING)
            .map(drop)
            .map_err(|source| UffdError::Register { addr: addr.0, len_bytes, source })
    }

    /// Unregister a range (blocked threads, if any, are woken and retry without it).
    pub fn unregister(&self, addr: ViewAddr, len_bytes: usize) -> Result<(), UffdError> {
        self.uffd.unregister(addr.0 as *mut c_void, len_bytes).map_err(|source| UffdError::Unregister {
            addr: addr.0,
            len_bytes,
            source,
        })
    }

    /// Wake threads waiting on `[addr, addr + len)`.
    pub fn wake(&self, addr: ViewAddr, len_bytes: usize) -> Result<(), UffdError> {
        self.uffd.wake(addr.0 as *mut c_void, len_bytes).map_err(|source| UffdError::Wake { addr: addr.0, source })
    }

    /// Read every pending message without blocking, appending page faults to
    /// `out` and any other event to `other`. Returns how many messages were
    /// read.
    pub fn read_events(
        &self,
        buf: &mut [u8],
        out: &mut Vec<Fault>,
        other: &mut Vec<OtherEvent>,
    ) -> Result<usize, UffdError> {
        debug_assert!(buf.len() >= MSG_LEN && buf.len().is_multiple_of(MSG_LEN));
        let mut total = 0;
        loop {
            let n = match nix::unistd::read(self.uffd.as_fd(), buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(total),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(UffdError::Read(e)),
            };
            for m in buf[..n - n % MSG_LEN].chunks_exact(MSG_LEN) {
                let m: &[u8; MSG_LEN] = m.try_into().expect("chunks of MSG_LEN");
                match ::uffd::parse(m) {
                    Event::Fault { addr, tid, .. } => {
                        let addr = usize::try_from(addr).expect("64-bit host");
                        out.push(Fault { addr: ViewAddr(addr), tid });
                    }
                    e => other.push(OtherEvent(e)),
                }
                total += 1;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    /// Install `len` bytes from `src` at `dst` atomically, waking waiters
    /// unless `wake` is false.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be page-aligned, inside a range registered with
    /// this userfaultfd and owned by the caller's guest (the kernel writes it);
    /// `[src, src + len)` must be readable.
    pub unsafe fn copy(&self, dst: ViewAddr, src: *const u8, len: usize, wake: bool) -> Result<CopyOutcome, UffdError> {
        let mut c = UffdioCopy {
            dst: dst.0 as u64,
            src: src as u64,
            len: len as u64,
            mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: the fd is a live userfaultfd; `c` is a valid uffdio_copy the
        // kernel reads and updates; the caller guarantees both ranges.
        match unsafe { ::uffd::ioctl_copy(self.uffd.as_raw_fd(), &raw mut c) } {
            Ok(_) => Ok(CopyOutcome::Done),
            Err(e) => classify(c.copy, e, "UFFDIO_COPY", dst, len),
        }
    }

    /// Map the page-cache pages behind `[dst, dst + len)` into the registered
    /// (guest) view and wake waiters: the pages must already hold their
    /// content (written through another mapping).
    ///
    /// # Safety
    /// `[dst, dst + len)` must be page-aligned, inside a range registered for
    /// minor faults with this userfaultfd and owned by the caller's guest.
    pub unsafe fn cont(&self, dst: ViewAddr, len: usize) -> Result<CopyOutcome, UffdError> {
        let mut c = UffdioContinue { start: dst.0 as u64, len: len as u64, mode: 0, mapped: 0 };
        // SAFETY: live fd, valid struct, caller-guaranteed range.
        match unsafe { ::uffd::ioctl_continue(self.uffd.as_raw_fd(), &raw mut c) } {
            Ok(_) => Ok(CopyOutcome::Done),
            Err(e) => classify(c.mapped, e, "UFFDIO_CONTINUE", dst, len),
        }
    }
}

impl Userfault {
    /// Map the zero page at `[dst, dst + len)` (anonymous memory registered
    /// for missing faults) and wake waiters: what a page dropped by the
    /// guest's own MADV_DONTNEED must read as.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be page-aligned, inside a range registered with
    /// this userfaultfd and owned by the caller's guest.
    pub unsafe fn zeropage(&self, dst: ViewAddr, len: usize) -> Result<CopyOutcome, UffdError> {
        let mut z = ::uffd::UffdioZeropage { start: dst.0 as u64, len: len as u64, mode: 0, zeropage: 0 };
        // SAFETY: live fd, valid struct, caller-guaranteed range.
        match unsafe { ::uffd::ioctl_zeropage(self.uffd.as_raw_fd(), &raw mut z) } {
            Ok(_) => Ok(CopyOutcome::Done),
            Err(e) => classify(z.zeropage, e, "UFFDIO_ZEROPAGE", dst, len),
        }
    }
}

impl UffdError {
    /// Whether the memory's owner is gone: the process that created the
    /// descriptor exited (the kernel answers ESRCH once its address space is
    /// torn down). A VMM that exits ends its session; this is not a fault
    /// of ours or of the source's.
    pub fn owner_gone(&self) -> bool {
        matches!(self, UffdError::Install { source: Errno::ESRCH, .. })
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::MmapOptions;

    const PG: usize = 4096;

    #[test]
    fn copy_reports_present_pages_and_partial_copies() {
        let n = 8;
        let m = MmapOptions::new().len(n * PG).map_anon().unwrap();
        let base = ViewAddr(m.as_ptr() as usize);
        let u = Userfault::new(false).unwrap();
        u.register(base, n * PG).unwrap();
        let src = vec![0x5au8; n * PG];
        // SAFETY: the destination is inside the registered mapping `m`, which
        // outlives the calls; `src` is readable for the lengths used.
        unsafe {
            assert_eq!(u.copy(base.offset_by(4 * PG), src.as_ptr(), PG, true).unwrap(), CopyOutcome::Done);
            // Pages 0..4 go in, then page 4 is present: EAGAIN with a count.
            assert_eq!(u.copy(base, src.as_ptr(), n * PG, true).unwrap(), CopyOutcome::Again { copied: 4 * PG });
            // Starting on a present page: EEXIST, nothing copied.
            assert_eq!(
                u.copy(base.offset_by(4 * PG), src.as_ptr(), PG, true).unwrap(),
                CopyOutcome::Exists { copied: 0 }
            );
            // An unaligned source is fine.
            assert_eq!(u.copy(base.offset_by(5 * PG), src.as_ptr().add(24), PG, true).unwrap(), CopyOutcome::Done);
            // A misaligned destination is an error, not a silent success.
            assert!(u.copy(base.offset_by(7 * PG + 8), src.as_ptr(), PG, true).is_err());
        }
        assert!(m[..4 * PG].iter().all(|&b| b == 0x5a));
        // No faults happened: all of the above was installed from outside.
        let mut buf = [0u8; 64 * MSG_LEN];
        let mut faults = Vec::new();
        assert_eq!(u.read_events(&mut buf, &mut faults, &mut Vec::new()).unwrap(), 0);
    }

    #[test]
    fn a_handed_over_descriptor_serves_and_reports_remove_events() {
        // A "VMM" creates the descriptor with REMOVE events on, registers its
        // memory and hands the descriptor over, as Firecracker does.
        let n = 4;
        let m = MmapOptions::new().len(n * PG).map_anon().unwrap();
        let base = ViewAddr(m.as_ptr() as usize);
        let theirs = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .unwrap();
        theirs.register(m.as_ptr() as *mut c_void, n * PG).unwrap();
        // What SCM_RIGHTS delivers: a descriptor of our own for the same
        // userfaultfd. (Not `into_raw_fd`: in userfaultfd 0.9 it returns the
        // number and then closes it in `Drop`.)
        let fd = nix::unistd::dup(theirs.as_fd()).unwrap();
        drop(theirs);
        let u = Userfault::from_handed_over(fd);
        let src = vec![0x33u8; 2 * PG];
        // SAFETY: inside the registered mapping `m`, which outlives the call.
        let r = unsafe { u.copy(base, src.as_ptr(), 2 * PG, true) }.unwrap();
        assert_eq!(r, CopyOutcome::Done);
        assert!(m[..2 * PG].iter().all(|&b| b == 0x33));
        // A balloon drops page 1: the descriptor's owner must hear of it.
        // REMOVE is synchronous: madvise returns only once the event is read,
        // so it runs on a thread of its own.
        let page1 = m.as_ptr() as usize + PG;
        let balloon = std::thread::spawn(move || {
            let ptr = std::ptr::NonNull::new(page1 as *mut c_void).unwrap();
            // SAFETY: page 1 of the mapping `m`, which outlives this thread
            // (joined below); nothing holds a reference into it.
            unsafe { nix::sys::mman::madvise(ptr, PG, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }.unwrap();
        });
        let (mut buf, mut faults, mut other) = ([0u8; 8 * MSG_LEN], Vec::new(), Vec::new());
        let t0 = std::time::Instant::now();
        while other.is_empty() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "no REMOVE event");
            u.read_events(&mut buf, &mut faults, &mut other).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        balloon.join().unwrap();
        assert!(faults.is_empty());
        let (start, end) = (base.0 as u64 + PG as u64, base.0 as u64 + 2 * PG as u64);
        assert_eq!(other, vec![OtherEvent(Event::Remove { start, end })]);
    }

    #[test]
    fn missing_faults_on_shared_memory_are_served_by_continue() {
        // Nothing populated: the guest's access to page 2 is a missing fault;
        // writing the page through the alias then CONTINUE resolves it.
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4 * PG as u64).unwrap();
        let guest = MmapOptions::new().len(4 * PG).map_raw(&file).unwrap();
        let alias = MmapOptions::new().len(4 * PG).map_raw(&file).unwrap();
        let base = ViewAddr(guest.as_mut_ptr() as usize);
        let u = Userfault::new(true).unwrap();
        u.register_shared(base, 4 * PG).unwrap();
        let addr = base.offset_by(2 * PG).0;
        // SAFETY: the mapping outlives the thread (joined below).
        let t = std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
        let mut buf = [0u8; 64 * MSG_LEN];
        let mut faults = Vec::new();
        let t0 = std::time::Instant::now();
        while faults.is_empty() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no missing fault event");
            u.read_events(&mut buf, &mut faults, &mut Vec::new()).unwrap();
            std::thread::yield_now();
        }
        // SAFETY: writing one byte of the alias, a live shared mapping.
        unsafe { std::ptr::write_volatile((alias.as_mut_ptr() as usize + 2 * PG) as *mut u8, 77) };
        // SAFETY: page-aligned, inside the registered guest view.
        assert_eq!(unsafe { u.cont(base.offset_by(2 * PG), PG) }.unwrap(), CopyOutcome::Done);
        assert_eq!(t.join().unwrap(), 77);
    }

    #[test]
    fn minor_faults_on_shared_memory_are_served_by_continue() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4 * PG as u64).unwrap();
        let guest = MmapOptions::new().len(4 * PG).map_raw(&file).unwrap();
        let mut alias = unsafe_map_mut(&file);
        alias.fill(0);
        let base = ViewAddr(guest.as_mut_ptr() as usize);
        let u = Userfault::new(true).unwrap();
        u.register_shared(base, 4 * PG).unwrap();
        let addr = base.offset_by(PG).0;
        let t = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below).
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let mut buf = [0u8; 64 * MSG_LEN];
        let mut faults = Vec::new();
        let t0 = std::time::Instant::now();
        while faults.is_empty() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no minor fault event");
            u.read_events(&mut buf, &mut faults, &mut Vec::new()).unwrap();
            std::thread::yield_now();
        }
        alias[PG..2 * PG].fill(42);
        // SAFETY: page-aligned, inside the minor-registered guest view.
        assert_eq!(unsafe { u.cont(base.offset_by(PG), PG) }.unwrap(), CopyOutcome::Done);
        assert_eq!(t.join().unwrap(), 42);
        // SAFETY: as above; the page is mapped now.
        assert_eq!(unsafe { u.cont(base.offset_by(PG), PG) }.unwrap(), CopyOutcome::Exists { copied: 0 });
    }

    /// A writable shared mapping of the whole file (test helper).
    fn unsafe_map_mut(file: &std::fs::File) -> memmap2::MmapMut {
        // SAFETY: the memfd is private to this test; no one else resizes it.
        unsafe { MmapOptions::new().map_mut(file) }.unwrap()
    }

    #[test]
    fn faults_arrive_with_thread_ids_and_copy_wakes() {
        let m = MmapOptions::new().len(4 * PG).map_anon().unwrap();
        let base = ViewAddr(m.as_ptr() as usize);
        let u = Userfault::new(false).unwrap();
        u.register(base, 4 * PG).unwrap();
        let addr = base.offset_by(2 * PG + 100).0;
        let t = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below); reading a
            // registered missing page blocks until the pager installs it.
            let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
            (v, nix::unistd::gettid().as_raw())
        });
        let mut buf = [0u8; 64 * MSG_LEN];
        let mut faults = Vec::new();
        let t0 = std::time::Instant::now();
        while faults.is_empty() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no fault event");
            u.read_events(&mut buf, &mut faults, &mut Vec::new()).unwrap();
            std::thread::yield_now();
        }
        // The page address: UFFD_FEATURE_EXACT_ADDRESS is not requested.
        assert_eq!(faults[0].addr.0, addr & !(PG - 1));
        let src = vec![9u8; PG];
        // SAFETY: page-aligned destination inside the registered mapping.
        let r = unsafe { u.copy(base.offset_by(2 * PG), src.as_ptr(), PG, true) }.unwrap();
        assert_eq!(r, CopyOutcome::Done);
        let (v, tid) = t.join().unwrap();
        assert_eq!(v, 9);
        assert_eq!(faults[0].tid, u32::try_from(tid).unwrap());
    }
}
