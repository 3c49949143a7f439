//! Installing received pages and completing the faults that wait on them.
//!
//! Shared by the fault thread (demand replies) and the bulk receiver (push and
//! precopy). Two backends:
//!
//! * **Copy** (anonymous memory): UFFDIO_COPY allocates, fills and maps a page
//!   atomically; the kernel refuses a second install (EEXIST), so races
//!   between the two threads resolve themselves.
//! * **Continue** (shared memory): the page's bytes are written through the
//!   alias mapping (by `memcpy` for demand replies, or by the socket read
//!   itself for the push: see [`BulkPlacer`]), then UFFDIO_CONTINUE maps it
//!   into the guest's view. The kernel cannot refuse a second write through
//!   the alias, so a page is *claimed* first: only the thread that sets its
//!   `claimed` bit writes it; anyone else discards their copy. Without this,
//!   a late duplicate could overwrite a page the guest has written since.
//!
//! Invariants:
//! * a page's `present` bit is set only after it is mapped with its content,
//!   and each page is counted once (bits count, not installs);
//! * before switchover (precopy) the guest does not run here, so pages may be
//!   overwritten freely; after it, only missing, unclaimed pages are written;
//! * shared memory, precopy: pages are written through the alias but not
//!   mapped into the guest's view: they are *held*. At switchover an
//!   outstanding held page is simply forgotten (its stale page-cache content
//!   is overwritten when the new one arrives): nothing to unmap inside the
//!   downtime. After resume, held pages are mapped in large runs by a
//!   background mapper, and a fault on one is mapped on the spot, without a
//!   network round trip;
//! * a fault registered in `pending` is completed exactly once, by whichever
//!   thread sees both its `waiting` bit and the page present: the fault thread
//!   sets `waiting` then checks `present`, installers set `present` then check
//!   `waiting`, each with a SeqCst fence between (Dekker), and the entry's
//!   removal under the lock makes it at most once.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::Instant;

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use proto::session::DestBulk;
use proto::wire::PageKind;
use proto::{AtomicPageBitmap, HostAddr, MemLayout, PageIdx, PageRange, ViewAddr};
use transport::{IoSpanMut, PagePlacer, PlaceError};

use crate::metrics::PagerMetrics;
use crate::uffd::{CopyOutcome, UffdError, Userfault};

/// How many times in a row an install may be asked to retry before the pager
/// gives up (the kernel says EAGAIN while a mapping changes; nothing in this
/// process changes guest mappings during postcopy, so this is a safety net).
const MAX_RETRIES: u32 = 10_000;

/// Pages per UFFDIO_COPY while the REMOVE gate is held (32 KiB of 4 KiB
/// pages): the fault thread waits for at most one such copy before it reads
/// its events. Measured with a 1 MiB push run held whole: VMM fault p99
/// 0.5-1.7 ms against 0.2-0.3 ms for the engine's own anonymous guest.
const GATED_COPY_PAGES: u64 = 8;

/// A fault whose page has not arrived yet.
#[derive(Clone, Copy, Debug)]
pub struct PendingFault {
    /// The page.
    pub page: PageIdx,
    /// When the fault event was read.
    pub t_read: Instant,
    /// Faulting thread.
    pub tid: u32,
    /// Served from a page held here (precopy), not over the network.
    pub local: bool,
}

/// An address type a [`GuestMap`] hands out: [`ViewAddr`] for the guest's
/// view (maybe another process's, never dereferenced), [`HostAddr`] for the
/// alias this process writes.
pub trait MapAddr: Copy {
    /// From a raw address.
    fn at(raw: usize) -> Self;
    /// The raw address.
    fn raw(self) -> usize;
}

impl MapAddr for ViewAddr {
    fn at(raw: usize) -> Self {
        ViewAddr(raw)
    }
    fn raw(self) -> usize {
        self.0
    }
}

impl MapAddr for HostAddr {
    fn at(raw: usize) -> Self {
        HostAddr(raw)
    }
    fn raw(self) -> usize {
        self.0
    }
}

/// Where guest memory lives, by layout region: the guest's view
/// (`GuestMap<ViewAddr>`) or the alias (`GuestMap<HostAddr>`).
#[derive(Clone, Debug)]
pub struct GuestMap<A: MapAddr = ViewAddr> {
    layout: MemLayout,
    bases: Vec<A>,
}

impl<A: MapAddr> GuestMap<A> {
    /// A map of `layout` whose regions start at `bases`.
    pub fn new(layout: MemLayout, bases: Vec<A>) -> Self {
        assert_eq!(layout.regions().len(), bases.len(), "one base per region");
        GuestMap { layout, bases }
    }

    /// The layout.
    pub fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// Region bases and lengths.
    pub fn spans(&self) -> impl Iterator<Item = (A, usize)> + '_ {
        self.bases.iter().zip(self.layout.regions()).map(|(b, r)| (*b, usize::try_from(r.len_bytes).expect("mapped")))
    }

    /// Address of `page` (in range).
    #[inline]
    pub fn addr(&self, page: PageIdx) -> A {
        let (i, within) = self.layout.locate(page).expect("validated page");
        A::at(self.bases[i].raw() + usize::try_from(within << self.layout.page_size().shift()).expect("mapped"))
    }

    /// The page runs (one per region touched) that lie wholly inside the
    /// address range `[start, end)`.
    pub fn pages_within(&self, start: A, end: A) -> Vec<PageRange> {
        let ps = self.layout.page_size().bytes();
        let mut out = Vec::new();
        for (i, (b, r)) in self.bases.iter().zip(self.layout.regions()).enumerate() {
            let lo = (start.raw().max(b.raw()) - b.raw()) as u64;
            let hi = (end.raw().min(b.raw().saturating_add(usize::try_from(r.len_bytes).expect("mapped")))) as u64;
            let hi = hi.saturating_sub(b.raw() as u64);
            let (first, last) = (lo.div_ceil(ps), hi / ps);
            if end.raw() > b.raw() && last > first {
                out.push(PageRange::new(PageIdx(self.layout.region_pages(i).first.0 + first), last - first));
            }
        }
        out
    }

    /// Page holding address `addr`, if it is guest memory.
    #[inline]
    pub fn page_of(&self, addr: A) -> Option<PageIdx> {
        let shift = self.layout.page_size().shift();
        for (i, (b, r)) in self.bases.iter().zip(self.layout.regions()).enumerate() {
            let off = addr.raw().wrapping_sub(b.raw()) as u64;
            if addr.raw() >= b.raw() && off < r.len_bytes {
                return Some(PageIdx(self.layout.region_pages(i).first.0 + (off >> shift)));
            }
        }
        None
    }
}

/// A deferred install: the run, its bytes (`None`: zeros), its kind.
type Deferred = (PageRange, Option<Vec<u8>>, PageKind);

/// What an install writes: received bytes, or zeros (a Zeros frame).
#[derive(Clone, Copy)]
enum Src<'d> {
    Data(&'d [u8]),
    Zeros,
}

/// How pages get into guest memory.
#[derive(Debug)]
enum Backend {
    /// Anonymous memory: UFFDIO_COPY.
    Copy,
    /// Shared memory: write through `alias`, then UFFDIO_CONTINUE.
    Continue {
        alias: GuestMap<HostAddr>,
        claimed: AtomicPageBitmap,
        /// Pages ever written through the alias: the others still hold the
        /// zeros they were allocated with, so a zero run needs no writing.
        written: AtomicPageBitmap,
    },
}

/// Installs pages into guest memory and tracks what is present.
#[derive(Debug)]
pub struct Installer {
    uffd: Userfault,
    map: GuestMap,
    view_is_local: bool,
    backend: Backend,
    /// Set at switchover: from then on the guest runs here.
    postcopy: AtomicBool,
    present: AtomicPageBitmap,
    /// Shared memory: pages whose content is in the page cache (precopy)
    /// but not yet mapped into the guest's view.
    held: AtomicPageBitmap,
    waiting: AtomicPageBitmap,
    pending: Mutex<Vec<PendingFault>>,
    /// Pages the guest's owner dropped (a balloon's MADV_DONTNEED, reported
    /// as REMOVE on a handed-over descriptor): they count as present, are
    /// never written from the source again, and fault back in as zeros.
    removed: AtomicPageBitmap,
    /// With a handed-over descriptor (REMOVE events possible): installers
    /// hold it shared around each check-then-copy, the fault thread
    /// exclusively around reading events and marking removed pages. Without
    /// it, a copy landing between the REMOVE being read (the kernel then
    /// zaps the range) and the pages being marked would put source content
    /// where the guest must read zeros.
    gate: Option<RwLock<()>>,
    /// Installs the fault thread could not finish because the kernel said
    /// EAGAIN while a REMOVE waits to be read (which only that thread can
    /// do): the run and its bytes (`None`: zeros), retried once the events
    /// are read.
    deferred: Mutex<Vec<Deferred>>,
    metrics: std::sync::Arc<PagerMetrics>,
}

/// Calls `f(run)` for each maximal run of set bits of `mask` within the word
/// holding pages `[base, base + 64)`.
fn for_each_run(base: u64, mut mask: u64, mut f: impl FnMut(PageRange)) {
    while mask != 0 {
        let lo = u64::from(mask.trailing_zeros());
        let len = u64::from((mask >> lo).trailing_ones());
        f(PageRange::new(PageIdx(base + lo), len));
        mask &= if lo + len >= 64 { 0 } else { !((1u64 << (lo + len)) - 1) };
    }
}

impl Installer {
    /// An installer over `map`, whose memory is registered with `uffd`
    /// (missing mode if `alias` is `None`, minor mode otherwise, with `alias`
    /// mapping the same pages writably and populated). `view_is_local` says
    /// whether the guest's view is this process's memory (not a VMM's): only
    /// then may a later precopy round rewrite a page already installed.
    pub fn new(
        uffd: Userfault,
        map: GuestMap,
        alias: Option<Vec<HostAddr>>,
        view_is_local: bool,
        metrics: std::sync::Arc<PagerMetrics>,
    ) -> Self {
        let n = map.layout().n_pages();
        let backend = match alias {
            None => Backend::Copy,
            Some(bases) => Backend::Continue {
                alias: GuestMap::new(map.layout().clone(), bases),
                claimed: AtomicPageBitmap::new(n),
                written: AtomicPageBitmap::new(n),
            },
        };
        Installer {
            uffd,
            map,
            view_is_local,
            backend,
            postcopy: AtomicBool::new(false),
            present: AtomicPageBitmap::new(n),
            held: AtomicPageBitmap::new(n),
            waiting: AtomicPageBitmap::new(n),
            pending: Mutex::new(Vec::new()),
            removed: AtomicPageBitmap::new(n),
            gate: (!view_is_local).then(|| RwLock::new(())),
            deferred: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// Hold while reading userfaultfd events and acting on REMOVE ones (see
    /// `gate`); `None` when no REMOVE can come (the engine's own descriptor).
    pub fn events_gate(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        let g = self.gate.as_ref()?;
        // Spin out the one short copy that may hold it: parking would make
        // the wake-up cost a cross-CPU hand-off (65-70 us on this VM).
        let t0 = Instant::now();
        loop {
            if let Some(w) = g.try_write() {
                return Some(w);
            }
            if t0.elapsed() > std::time::Duration::from_micros(200) {
                return Some(g.write());
            }
            std::hint::spin_loop();
        }
    }

    /// The guest's owner dropped `[start, end)` (a REMOVE event, read under
    /// [`Installer::events_gate`]): its pages read as zeros from now on and
    /// are never written from the source. Returns the pages marked.
    pub fn remove(&self, start: ViewAddr, end: ViewAddr) -> Result<u64, UffdError> {
        let mut marked = 0;
        for r in self.map.pages_within(start, end) {
            marked += r.n_pages;
            self.removed.set_range(r);
            let newly = self.present.set_range(r);
            PagerMetrics::add(&self.metrics.pages_present, newly);
            PagerMetrics::add(&self.metrics.pages_removed, r.n_pages);
            fence(Ordering::SeqCst);
            if self.waiting.any_in(r) {
                // Their threads fault again and are answered with zeros.
                let ps = self.map.layout().page_size().bytes_usize();
                self.uffd.wake(self.map.addr(r.first), usize::try_from(r.n_pages).expect("mapped") * ps)?;
                self.complete_waiting(r);
            }
        }
        Ok(marked)
    }

    /// Whether the guest's owner dropped `page` (it reads as zeros).
    pub fn is_removed(&self, page: PageIdx) -> bool {
        self.removed.get(page)
    }

    /// Answer a fault on a removed page with a zero page. A retry the kernel
    /// asks for (the range is changing again) wakes the thread, which faults
    /// anew.
    pub fn zero_fault(&self, page: PageIdx) -> Result<(), UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let dst = self.map.addr(page);
        PagerMetrics::add(&self.metrics.faults_zero, 1);
        let outcome = if ps == 4096 {
            // SAFETY: `dst` is one page of registered guest memory (the
            // DestGuest contract keeps it mapped).
            unsafe { self.uffd.zeropage(dst, ps) }?
        } else {
            // Huge pages have no UFFDIO_ZEROPAGE: copy zeros.
            let zeros = vec![0u8; ps];
            // SAFETY: as above; `zeros` is readable for `ps` bytes.
            unsafe { self.uffd.copy(dst, zeros.as_ptr(), ps, true) }?
        };
        match outcome {
            CopyOutcome::Done => Ok(()),
            CopyOutcome::Exists { .. } | CopyOutcome::Again { .. } => self.uffd.wake(dst, ps),
        }
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Userfault {
        &self.uffd
    }

    /// Guest memory placement.
    pub fn map(&self) -> &GuestMap {
        &self.map
    }

    /// The present set.
    pub fn present(&self) -> &AtomicPageBitmap {
        &self.present
    }

    /// Pages present.
    pub fn n_present(&self) -> u64 {
        PagerMetrics::get(&self.metrics.pages_present)
    }

    /// Whether every page is present.
    pub fn complete(&self) -> bool {
        self.n_present() == self.map.layout().n_pages()
    }

    /// The guest is about to run here: from now on a present page is never
    /// written again, and (shared memory) pages are claimed before writing.
    pub fn begin_postcopy(&self) {
        if let Backend::Continue { claimed, .. } = &self.backend {
            // Present and held pages are taken; the rest is up for claiming.
            for bm in [&self.present, &self.held] {
                for r in bm.snapshot().runs() {
                    claimed.set_range(r);
                }
            }
        }
        self.postcopy.store(true, Ordering::Release);
    }

    /// Forget outstanding pages before switchover: their precopy copies are
    /// stale. Returns (pages that were held or present, whether any was
    /// mapped: only then must the caller unmap `r` from the guest's view).
    /// Bits go before pages do: an install racing in between then finds
    /// either the old page (skipped) or the hole (installed, bit set).
    pub fn forget(&self, r: PageRange) -> (u64, bool) {
        let held = self.held.clear_range(r);
        let mapped = self.present.clear_range(r);
        self.metrics.pages_present.fetch_sub(mapped, Ordering::Relaxed);
        (held + mapped, mapped > 0)
    }

    /// Whether `page` is held (content in place, not mapped).
    #[inline]
    pub fn is_held(&self, page: PageIdx) -> bool {
        self.held.get(page)
    }

    /// The held set (for the background mapper).
    pub fn held(&self) -> &AtomicPageBitmap {
        &self.held
    }

    /// Map the held, unmapped pages of `r` into the guest's view (after
    /// switchover). Returns pages newly present.
    pub fn map_held(&self, r: PageRange) -> Result<u64, UffdError> {
        let mut newly = 0;
        let mut at = r.first.0;
        while let Some(p) = self.held.next_with_below(at, r.end(), true) {
            let end = self.held.next_with_below(p.0, r.end(), false).map_or(r.end(), |q| q.0);
            newly += self.map_written(PageRange::new(p, end - p.0))?;
            at = end;
        }
        PagerMetrics::add(&self.metrics.pages_mapped_local, newly);
        self.finish(r, newly, None);
        Ok(newly)
    }

    /// Record a fault; completes it at once if its page is already present.
    pub fn add_pending(&self, f: PendingFault) -> Result<(), UffdError> {
        {
            let mut p = self.pending.lock();
            p.push(f);
            self.waiting.set(f.page);
        }
        fence(Ordering::SeqCst);
        if self.present.get(f.page) {
            PagerMetrics::add(&self.metrics.faults_resolved_early, 1);
            self.remap_present(f.page)?;
            self.complete_waiting(PageRange::new(f.page, 1));
        }
        Ok(())
    }

    /// A fault on a page already present. Usually it raced the install
    /// that woke its thread, which has retried by now; but the kernel may
    /// also have dropped the mapping of a shared-memory page whose content
    /// stays in the page cache (swapped out and in, or collapsed into a huge
    /// page by khugepaged), and then nothing but a new UFFDIO_CONTINUE
    /// resolves the fault. So map it again where that is how pages are
    /// installed (EEXIST: it is still mapped), and wake the page's waiters.
    fn remap_present(&self, page: PageIdx) -> Result<(), UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let dst = self.map.addr(page);
        if let Backend::Continue { .. } = &self.backend {
            // SAFETY: one page of the guest's view, registered for minor
            // faults with this uffd; its content is in the page cache (it
            // was written before it was marked present).
            if unsafe { self.uffd.cont(dst, ps) }? == CopyOutcome::Done {
                return Ok(());
            }
        }
        self.uffd.wake(dst, ps)
    }

    fn kind_counter(&self, kind: PageKind) -> &std::sync::atomic::AtomicU64 {
        match kind {
            PageKind::Demand => &self.metrics.pages_demand,
            PageKind::Push => &self.metrics.pages_push,
            PageKind::Precopy => &self.metrics.pages_precopy,
        }
    }

    /// Account pages that became present (received as `kind`, or mapped
    /// from held pages for `None`), and complete faults waiting on `run`.
    fn finish(&self, run: PageRange, newly: u64, kind: Option<PageKind>) {
        PagerMetrics::add(&self.metrics.pages_present, newly);
        if let Some(kind) = kind {
            PagerMetrics::add(self.kind_counter(kind), newly);
        }
        fence(Ordering::SeqCst);
        if self.waiting.any_in(run) {
            self.complete_waiting(run);
        }
    }

    /// Install a run whose bytes are in `data` (`n` pages from `first`; the
    /// range was validated by the session). Returns pages newly present.
    ///
    /// Called by the fault thread: a copy the kernel refuses for now (a
    /// REMOVE waits to be read, see `gate`) is deferred, not waited for,
    /// and [`Installer::retry_deferred`] finishes it once the events are read.
    pub fn install(&self, first: PageIdx, data: &[u8], kind: PageKind) -> Result<u64, UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let run = PageRange::new(first, (data.len() / ps) as u64);
        self.install_src(run, Src::Data(data), kind, true)
    }

    /// As [`Installer::install`], from a thread other than the fault thread
    /// (the background RDMA readers): a copy the kernel refuses for now is
    /// waited out here, not deferred (only the fault thread retries
    /// deferred installs).
    pub fn install_background(&self, first: PageIdx, data: &[u8], kind: PageKind) -> Result<u64, UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let run = PageRange::new(first, (data.len() / ps) as u64);
        self.install_src(run, Src::Data(data), kind, false)
    }

    /// Retry the installs deferred by the fault thread (after it has read
    /// the userfaultfd's events). Returns pages newly present.
    pub fn retry_deferred(&self) -> Result<u64, UffdError> {
        // Only a handed-over descriptor defers: nothing to look at otherwise.
        if self.gate.is_none() {
            return Ok(0);
        }
        let todo = std::mem::take(&mut *self.deferred.lock());
        let mut newly = 0;
        for (run, data, kind) in todo {
            let src = data.as_deref().map_or(Src::Zeros, Src::Data);
            newly += self.install_src(run, src, kind, true)?;
        }
        Ok(newly)
    }

    /// Install `n_pages` zero pages from `first` (a Zeros frame; the range
    /// was validated by the session): the zero page mapped (anonymous 4 KiB
    /// memory), zeros copied (huge pages), or the alias zeroed and mapped
    /// (shared memory), with the same claims and counts as data.
    /// `fault_thread` as for [`Installer::install`].
    pub fn install_zeros(
        &self,
        first: PageIdx,
        n_pages: u64,
        kind: PageKind,
        fault_thread: bool,
    ) -> Result<u64, UffdError> {
        PagerMetrics::add(&self.metrics.pages_zero, n_pages);
        self.install_src(PageRange::new(first, n_pages), Src::Zeros, kind, fault_thread)
    }

    fn install_src(&self, run: PageRange, src: Src<'_>, kind: PageKind, defer: bool) -> Result<u64, UffdError> {
        let (newly, held) = match &self.backend {
            Backend::Copy => (self.install_copy(run, src, kind, defer)?, 0),
            Backend::Continue { alias, claimed, written } => {
                self.install_continue(run, src, alias, claimed, written)?
            }
        };
        self.finish(run, newly, Some(kind));
        PagerMetrics::add(self.kind_counter(kind), held);
        Ok(newly)
    }

    /// What an install call of `len` bytes at `dst` did: (bytes installed,
    /// pages to skip: 1 after a page someone already installed). A call the
    /// kernel asks to retry counts against `retries`, up to `MAX_RETRIES`.
    #[inline]
    fn settle(
        &self,
        outcome: CopyOutcome,
        op: &'static str,
        dst: ViewAddr,
        len: usize,
        retries: &mut u32,
    ) -> Result<(usize, u64), UffdError> {
        match outcome {
            CopyOutcome::Done => Ok((len, 0)),
            CopyOutcome::Exists { copied } => {
                // Someone installed that page first and woke its waiters
                // then; a thread that faulted on it after that wake-up but
                // before the page became visible would otherwise sleep on.
                let ps = self.map.layout().page_size().bytes_usize();
                self.uffd.wake(dst.offset_by(copied), ps)?;
                Ok((copied, 1))
            }
            CopyOutcome::Again { copied } => {
                *retries += 1;
                PagerMetrics::add(&self.metrics.install_retries, 1);
                if *retries > MAX_RETRIES {
                    return Err(UffdError::Install {
                        op,
                        addr: dst.0,
                        len_bytes: len,
                        source: nix::errno::Errno::EAGAIN,
                    });
                }
                Ok((copied, 0))
            }
        }
    }

    fn install_copy(&self, run: PageRange, src: Src<'_>, kind: PageKind, defer: bool) -> Result<u64, UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let precopy = !self.postcopy.load(Ordering::Acquire);
        let mut newly = 0;
        for (_, piece) in self.map.layout().split_by_region(run) {
            let mut at = piece.first.0;
            let end = piece.end();
            let mut retries = 0;
            while at < end {
                let off = usize::try_from(at - run.first.0).expect("within run") * ps;
                let guard = self.gate.as_ref().map(|g| g.read());
                if self.present.get(PageIdx(at)) {
                    if precopy {
                        // A page sent again by a later precopy round: the
                        // guest does not run here yet, so overwrite it; but
                        // only in our own memory (a VMM's is not ours to
                        // write, and the kernel cannot install a page twice).
                        let dst = self.map.addr(PageIdx(at));
                        if !self.view_is_local {
                            return Err(UffdError::Install {
                                op: "precopy rewrite (the guest's memory is not in this process)",
                                addr: dst.0,
                                len_bytes: ps,
                                source: nix::errno::Errno::EEXIST,
                            });
                        }
                        // SAFETY: the view is this process's memory
                        // (`view_is_local`); `dst` is a present page of it
                        // (mapped, writable by the DestGuest contract) that no
                        // vCPU touches before switchover.
                        unsafe {
                            match src {
                                Src::Data(data) => {
                                    std::ptr::copy_nonoverlapping(data[off..].as_ptr(), dst.0 as *mut u8, ps);
                                }
                                Src::Zeros => std::ptr::write_bytes(dst.0 as *mut u8, 0, ps),
                            }
                        };
                    } else {
                        PagerMetrics::add(&self.metrics.pages_duplicate, 1);
                    }
                    at += 1;
                    continue;
                }
                // The longest stretch not known present, within this region;
                // under the gate at most GATED_COPY_PAGES, so the fault thread
                // never waits behind more than one short copy.
                let stop = self.present.next_with_below(at, end, true).map_or(end, |p| p.0);
                if stop == at {
                    // Another installer made `at` present since it was
                    // looked at (the background and a demand reply racing
                    // for it): look again, as a duplicate. Without this the
                    // copy would be of zero bytes, which the kernel refuses.
                    drop(guard);
                    continue;
                }
                let stop = if self.gate.is_some() { stop.min(at + GATED_COPY_PAGES) } else { stop };
                let len = usize::try_from(stop - at).expect("within run") * ps;
                let dst = self.map.addr(PageIdx(at));
                // SAFETY: `dst..dst+len` lies in one region of guest memory that
                // the DestGuest contract keeps mapped and registered with this
                // uffd; the source bytes are `data[off..off + len]`, or zeros.
                let outcome = unsafe {
                    match src {
                        Src::Data(data) => self.uffd.copy(dst, data[off..off + len].as_ptr(), len, true),
                        Src::Zeros if ps == 4096 => self.uffd.zeropage(dst, len),
                        // Huge pages have no UFFDIO_ZEROPAGE.
                        Src::Zeros => self.uffd.copy(dst, vec![0u8; len].as_ptr(), len, true),
                    }
                }?;
                let again = matches!(outcome, CopyOutcome::Again { .. });
                let (copied, skip) = self.settle(outcome, "UFFDIO_COPY", dst, len, &mut retries)?;
                let copied_pages = (copied / ps) as u64;
                if copied_pages > 0 {
                    newly += self.present.set_range(PageRange::new(PageIdx(at), copied_pages));
                }
                drop(guard);
                if again && defer && self.gate.is_some() {
                    // Only this thread can read the REMOVE the kernel waits
                    // on: keep the rest of the run for after that.
                    let from = at + copied_pages;
                    let rest = PageRange::new(PageIdx(from), run.end() - from);
                    let bytes = match src {
                        Src::Data(data) => {
                            let off = usize::try_from(from - run.first.0).expect("within run") * ps;
                            Some(data[off..].to_vec())
                        }
                        Src::Zeros => None,
                    };
                    self.deferred.lock().push((rest, bytes, kind));
                    PagerMetrics::add(&self.metrics.install_deferred, 1);
                    return Ok(newly);
                }
                if again && self.gate.is_some() {
                    // The range is changing (a REMOVE not yet read): let the
                    // fault thread read it, then look again.
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                if skip > 0 {
                    // Installed by the other thread, which sets the bit itself.
                    PagerMetrics::add(&self.metrics.pages_duplicate, 1);
                }
                at += copied_pages + skip;
            }
        }
        Ok(newly)
    }

    /// Claim the pages of `run` this thread may write: after switchover, the
    /// missing ones no one else claimed; before, all of them. Calls `f` with
    /// each claimed stretch (within one 64-page word).
    /// With `cede`, pages a fault waits on are left to their demand reply
    /// (which is on its way): a bulk run must never make a fault wait for it.
    fn claim(&self, run: PageRange, claimed: &AtomicPageBitmap, cede: bool, mut f: impl FnMut(PageRange)) {
        let precopy = !self.postcopy.load(Ordering::Acquire);
        let mut at = run.first.0;
        while at < run.end() {
            let word_end = ((at / 64) + 1) * 64;
            let hi = word_end.min(run.end());
            let mask = if hi - at == 64 { u64::MAX } else { ((1u64 << (hi - at)) - 1) << (at % 64) };
            let w = usize::try_from(at / 64).expect("bitmap word fits usize");
            let mine = if precopy {
                mask
            } else {
                let want = if cede { mask & !self.waiting.load_word(w) } else { mask };
                let newly = claimed.set_word_mask(w, want);
                let dups = u64::from((mask & !newly).count_ones());
                PagerMetrics::add(&self.metrics.pages_duplicate, dups);
                newly
            };
            for_each_run(at - at % 64, mine, &mut f);
            at = hi;
        }
    }

    /// Map written pages of `r` into the guest's view; returns pages newly
    /// present. Their held bits, if any, are cleared.
    fn map_written(&self, r: PageRange) -> Result<u64, UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let mut newly = 0;
        for (_, piece) in self.map.layout().split_by_region(r) {
            let mut at = piece.first.0;
            let mut retries = 0;
            while at < piece.end() {
                if self.present.get(PageIdx(at)) {
                    // Precopy rewrote a mapped page: already visible.
                    at += 1;
                    continue;
                }
                let stop = self.present.next_with_below(at, piece.end(), true).map_or(piece.end(), |p| p.0);
                let len = usize::try_from(stop - at).expect("within run") * ps;
                let dst = self.map.addr(PageIdx(at));
                // SAFETY: a page-aligned stretch of one region of the guest's
                // view, registered for minor faults with this uffd.
                let outcome = unsafe { self.uffd.cont(dst, len) }?;
                // An existing page was mapped already (only by us: we hold the claim).
                let (done, skip) = self.settle(outcome, "UFFDIO_CONTINUE", dst, len, &mut retries)?;
                let n = (done / ps) as u64 + skip;
                newly += self.present.set_range(PageRange::new(PageIdx(at), n));
                self.held.clear_range(PageRange::new(PageIdx(at), n));
                at += n;
            }
        }
        Ok(newly)
    }

    /// Returns (pages newly mapped, pages newly held).
    fn install_continue(
        &self,
        run: PageRange,
        src: Src<'_>,
        alias: &GuestMap<HostAddr>,
        claimed: &AtomicPageBitmap,
        written: &AtomicPageBitmap,
    ) -> Result<(u64, u64), UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let mut newly = 0;
        let mut held = 0;
        let mut result = Ok(());
        self.claim(run, claimed, false, |mine| {
            for (_, piece) in self.map.layout().split_by_region(mine) {
                let off = usize::try_from(piece.first.0 - run.first.0).expect("within run") * ps;
                let len = usize::try_from(piece.n_pages).expect("bounded") * ps;
                let dst = alias.addr(piece.first);
                // Every write below lies in `dst..dst+len`, inside one
                // region's alias mapping (writable by the DestGuest
                // contract); this thread holds the claim on these pages, so
                // no one else writes them and the guest cannot see them
                // until they are mapped.
                match src {
                    Src::Data(data) => {
                        written.set_range(piece);
                        // SAFETY: see above; `data` holds `off + len` bytes.
                        unsafe { std::ptr::copy_nonoverlapping(data[off..off + len].as_ptr(), dst.0 as *mut u8, len) };
                    }
                    Src::Zeros => {
                        // A page written before (a stale precopy copy) is
                        // zeroed; one never written still holds its zeros and
                        // only needs to exist (populating is a no-op when it
                        // does), so a zero run costs no copying.
                        let mut at = piece.first.0;
                        while at < piece.end() {
                            let was = written.get(PageIdx(at));
                            let stop = written.next_with_below(at, piece.end(), !was).map_or(piece.end(), |p| p.0);
                            let a = alias.addr(PageIdx(at));
                            let n = usize::try_from(stop - at).expect("bounded") * ps;
                            if was {
                                // SAFETY: see above (`a..a+n` is within `dst..dst+len`).
                                unsafe { std::ptr::write_bytes(a.0 as *mut u8, 0, n) };
                            } else if let Some(p) = std::ptr::NonNull::new(a.0 as *mut std::ffi::c_void) {
                                // SAFETY: see above; populating changes no content.
                                let _ = unsafe {
                                    nix::sys::mman::madvise(p, n, nix::sys::mman::MmapAdvise::MADV_POPULATE_WRITE)
                                };
                            }
                            at = stop;
                        }
                    }
                }
            }
            if result.is_ok() {
                match self.written(mine) {
                    Ok((n, h)) => {
                        newly += n;
                        held += h;
                    }
                    Err(e) => result = Err(e),
                }
            }
        });
        result.map(|()| (newly, held))
    }

    /// Pages of `r` now hold their content in the alias: before switchover
    /// they are held (mapped later), after it mapped at once. Returns
    /// (pages newly mapped, pages newly held).
    fn written(&self, r: PageRange) -> Result<(u64, u64), UffdError> {
        if self.postcopy.load(Ordering::Acquire) {
            Ok((self.map_written(r)?, 0))
        } else {
            Ok((0, self.held.set_range(r)))
        }
    }

    /// Complete every pending fault on a present page of `r`.
    fn complete_waiting(&self, r: PageRange) {
        let now = Instant::now();
        let mut done = Vec::new();
        {
            let mut p = self.pending.lock();
            p.retain(|f| {
                let finish = r.contains(f.page) && self.present.get(f.page);
                if finish {
                    done.push(*f);
                }
                !finish
            });
            for f in &done {
                if !p.iter().any(|g| g.page == f.page) {
                    self.waiting.clear(f.page);
                }
            }
        }
        if done.is_empty() {
            return;
        }
        let mut hist = self.metrics.fault_latency.lock();
        // Local faults are rare after the first moments: lock their record only then.
        let mut local = None;
        let mut block = self.metrics.blocktime_ns.lock();
        for f in done {
            let ns = u64::try_from(now.duration_since(f.t_read).as_nanos()).unwrap_or(u64::MAX);
            if f.local {
                local.get_or_insert_with(|| self.metrics.fault_latency_local.lock()).record_ns(ns);
            } else {
                hist.record_ns(ns);
            }
            *block.entry(f.tid).or_default() += ns;
        }
    }

    /// Faults still waiting for their page.
    pub fn n_pending(&self) -> usize {
        self.pending.lock().len()
    }

    /// The pages faults wait on, in the order the faults came (with
    /// repeats), appended to `out`.
    pub fn waiting_pages(&self, out: &mut Vec<PageIdx>) {
        out.extend(self.pending.lock().iter().map(|f| f.page));
    }

    /// The pages this side holds: present, or held from precopy.
    pub fn have(&self) -> proto::PageBitmap {
        // Held first: the mapper sets present before clearing held, so a
        // page moving between the two is seen in one of them.
        let held = self.held.snapshot();
        let mut have = self.present.snapshot();
        have.union_with(&held);
        have
    }
}

/// Places bulk frames straight into guest memory (shared memory: the alias)
/// or into a scratch buffer (anonymous memory, and pages someone else
/// claimed), then installs them.
pub struct BulkPlacer<'a> {
    inst: &'a Installer,
    session: &'a mut DestBulk,
    scratch: Vec<u8>,
    /// Claimed stretches of the frame being placed.
    mine: Vec<PageRange>,
}

impl<'a> BulkPlacer<'a> {
    /// A placer for `inst`, checking frames against `session`.
    pub fn new(inst: &'a Installer, session: &'a mut DestBulk) -> Self {
        BulkPlacer {
            inst,
            session,
            scratch: vec![0; usize::try_from(proto::wire::MAX_RUN_BYTES).expect("8 MiB fits")],
            mine: Vec::new(),
        }
    }

    /// Install a Zeros frame the session checked.
    pub fn install_zeros(&self, first: PageIdx, n_pages: u32, kind: PageKind) -> Result<u64, UffdError> {
        self.inst.install_zeros(first, u64::from(n_pages), kind, false)
    }

    /// The session (for the frames that are not pages).
    pub fn session(&mut self) -> &mut DestBulk {
        self.session
    }
}

/// Pages placed (and claimed) at once: a claim holds only while its run's
/// bytes arrive, so a fault on a later page of a push frame is answered by
/// its demand reply instead of waiting for the whole frame (64 KiB).
const PLACE_PAGES: u32 = 16;

impl PagePlacer for BulkPlacer<'_> {
    fn max_pages(&self) -> u32 {
        PLACE_PAGES
    }

    fn place<'b>(
        &'b mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        spans: &mut Vec<IoSpanMut<'b>>,
    ) -> Result<(), PlaceError> {
        self.session.check_pages(first, n_pages, kind).map_err(PlaceError::refused)?;
        let ps = self.inst.map.layout().page_size().bytes_usize();
        let run = PageRange::new(first, u64::from(n_pages));
        let len = n_pages as usize * ps;
        self.mine.clear();
        let Backend::Continue { alias, claimed, written } = &self.inst.backend else {
            // Anonymous memory: into scratch, installed by UFFDIO_COPY after.
            spans.push(IoSpanMut::from_slice(&mut self.scratch[..len]));
            return Ok(());
        };
        let mine = &mut self.mine;
        self.inst.claim(run, claimed, true, |r| mine.push(r));
        for r in mine.iter() {
            written.set_range(*r);
        }
        // Claimed stretches go to the alias, the rest to scratch (discarded),
        // in frame order.
        let scratch = self.scratch.as_mut_ptr();
        let mut at = first.0;
        let mut push = |to: HostAddr, n: u64| {
            // SAFETY: `to` is either inside the alias mapping (populated,
            // writable; this thread holds the claim on these pages) or inside
            // `self.scratch`, which outlives the spans ('b borrows self).
            spans.push(unsafe { IoSpanMut::from_raw(to, usize::try_from(n).expect("bounded") * ps) });
        };
        for r in self.mine.iter() {
            if r.first.0 > at {
                let off = usize::try_from(at - first.0).expect("within run") * ps;
                push(HostAddr(scratch as usize + off), r.first.0 - at);
            }
            for (_, piece) in self.inst.map.layout().split_by_region(*r) {
                push(alias.addr(piece.first), piece.n_pages);
            }
            at = r.end();
        }
        if at < run.end() {
            let off = usize::try_from(at - first.0).expect("within run") * ps;
            push(HostAddr(scratch as usize + off), run.end() - at);
        }
        Ok(())
    }

    fn placed(&mut self, first: PageIdx, n_pages: u32, kind: PageKind, ok: bool) -> Result<(), PlaceError> {
        let run = PageRange::new(first, u64::from(n_pages));
        let newly = match &self.inst.backend {
            Backend::Copy => {
                if !ok {
                    return Ok(());
                }
                let ps = self.inst.map.layout().page_size().bytes_usize();
                self.inst
                    .install_copy(run, Src::Data(&self.scratch[..n_pages as usize * ps]), kind, false)
                    .map_err(PlaceError::failed)?
            }
            Backend::Continue { claimed, .. } => {
                if !ok {
                    // Cut short: give the claims back, nothing was mapped.
                    if self.inst.postcopy.load(Ordering::Acquire) {
                        for r in &self.mine {
                            claimed.clear_range(*r);
                        }
                    }
                    return Ok(());
                }
                let (mut newly, mut held) = (0, 0);
                for r in &self.mine {
                    let (n, h) = self.inst.written(*r).map_err(PlaceError::failed)?;
                    newly += n;
                    held += h;
                }
                PagerMetrics::add(self.inst.kind_counter(kind), held);
                newly
            }
        };
        self.inst.finish(run, newly, Some(kind));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use memmap2::{MmapOptions, MmapRaw};
    use proto::PageSize;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    pub(crate) const PG: usize = 4096;
    pub(crate) const N: u64 = 256;

    /// Guest memory of N pages registered with a fresh uffd, for either backend.
    pub(crate) struct Fixture {
        pub(crate) inst: Arc<Installer>,
        pub(crate) metrics: Arc<PagerMetrics>,
        pub(crate) guest: MmapRaw,
        _alias: Option<MmapRaw>,
        _file: Option<std::fs::File>,
    }

    pub(crate) fn fixture(shmem: bool) -> Fixture {
        fixture_with(shmem, true)
    }

    fn fixture_with(shmem: bool, view_is_local: bool) -> Fixture {
        let layout = MemLayout::single(PageSize::Size4K, N * PG as u64).unwrap();
        let metrics = Arc::new(PagerMetrics::default());
        let len = usize::try_from(N).unwrap() * PG;
        let (guest, alias, file) = if shmem {
            let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
            let file = std::fs::File::from(fd);
            file.set_len(len as u64).unwrap();
            let g = MmapOptions::new().len(len).map_raw(&file).unwrap();
            // Not populated: pages are allocated as they are written.
            let a = MmapOptions::new().len(len).map_raw(&file).unwrap();
            (g, Some(a), Some(file))
        } else {
            (MmapOptions::new().len(len).map_anon().unwrap().into(), None, None)
        };
        let base = ViewAddr(guest.as_mut_ptr() as usize);
        let uffd = Userfault::new(shmem).unwrap();
        if shmem {
            uffd.register_shared(base, len).unwrap();
        } else {
            uffd.register(base, len).unwrap();
        }
        let alias_bases = alias.as_ref().map(|a| vec![HostAddr(a.as_mut_ptr() as usize)]);
        let map = GuestMap::new(layout, vec![base]);
        let inst = Arc::new(Installer::new(uffd, map, alias_bases, view_is_local, Arc::clone(&metrics)));
        Fixture { inst, metrics, guest, _alias: alias, _file: file }
    }

    fn page_data(first: u64, n: u64, tag: u8) -> Vec<u8> {
        (0..n).flat_map(|p| std::iter::repeat_n(tag ^ u8::try_from((first + p) % 251).unwrap(), PG)).collect()
    }

    pub(crate) fn read(f: &Fixture, page: u64) -> u8 {
        // SAFETY: reading one byte of a present page of the fixture's mapping.
        unsafe {
            std::ptr::read_volatile((f.guest.as_ptr() as usize + usize::try_from(page).unwrap() * PG) as *const u8)
        }
    }

    /// A page's first byte wherever it is: through the alias for shared
    /// memory (held pages are not mapped in the guest's view yet).
    fn read_here(f: &Fixture, page: u64) -> u8 {
        let base = f._alias.as_ref().map_or(f.guest.as_ptr() as usize, |a| a.as_ptr() as usize);
        // SAFETY: one byte of a populated alias page or a present guest page.
        unsafe { std::ptr::read_volatile((base + usize::try_from(page).unwrap() * PG) as *const u8) }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn duplicates_are_counted_once_and_never_overwrite_after_switchover() {
        for shmem in [false, true] {
            let f = fixture(shmem);
            f.inst.begin_postcopy();
            assert_eq!(f.inst.install(PageIdx(10), &page_data(10, 20, 1), PageKind::Push).unwrap(), 20);
            // Overlapping run: pages 0..10 are new, 10..30 duplicates.
            assert_eq!(f.inst.install(PageIdx(0), &page_data(0, 30, 2), PageKind::Demand).unwrap(), 10);
            assert_eq!(get(&f.metrics.pages_present), 30);
            assert_eq!(get(&f.metrics.pages_push), 20);
            assert_eq!(get(&f.metrics.pages_demand), 10, "shmem={shmem}");
            assert_eq!(get(&f.metrics.pages_duplicate), 20, "shmem={shmem}");
            // The first copy of 10..30 stands; the later one was discarded.
            assert_eq!(read(&f, 15), 1 ^ 15);
            assert_eq!(read(&f, 25), 1 ^ 25);
            assert_eq!(read(&f, 5), 2 ^ 5);
        }
    }

    #[test]
    fn a_view_that_is_not_ours_is_never_written_directly() {
        // The guest's view belongs to another process (a handed-over
        // userfaultfd): a second precopy copy of an installed page would
        // need a direct write there, so it is refused instead.
        let f = fixture_with(false, false);
        f.inst.install(PageIdx(0), &page_data(0, 4, 1), PageKind::Precopy).unwrap();
        let e = f.inst.install(PageIdx(2), &page_data(2, 1, 2), PageKind::Precopy).unwrap_err();
        assert!(e.to_string().contains("not in this process"), "{e}");
        assert_eq!(read(&f, 2), page_data(2, 1, 1)[0], "the first copy stands");
    }

    #[test]
    fn precopy_rounds_overwrite_until_switchover() {
        for shmem in [false, true] {
            let f = fixture(shmem);
            f.inst.install(PageIdx(0), &page_data(0, 8, 1), PageKind::Precopy).unwrap();
            f.inst.install(PageIdx(4), &page_data(4, 8, 3), PageKind::Precopy).unwrap();
            // (Shared memory: the pages are held, unmapped; look through the alias.)
            assert_eq!(read_here(&f, 5), 3 ^ 5, "shmem={shmem}: a later round wins");
            assert_eq!(get(&f.metrics.pages_precopy), 12);
            // Evict 6..12, as a switchover with those pages outstanding would.
            let r = PageRange::new(PageIdx(6), 6);
            let (dropped, mapped) = f.inst.forget(r);
            assert_eq!(dropped, 6);
            // Shared memory holds precopy pages unmapped: nothing to unmap.
            assert_eq!(mapped, !shmem);
            if mapped {
                let ptr =
                    std::ptr::NonNull::new((f.guest.as_ptr() as usize + 6 * PG) as *mut std::ffi::c_void).unwrap();
                // SAFETY: dropping pages of the fixture's own mapping.
                unsafe { nix::sys::mman::madvise(ptr, 6 * PG, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }.unwrap();
            }
            f.inst.begin_postcopy();
            if shmem {
                // Held pages 0..6 are mapped after switchover.
                assert_eq!(get(&f.metrics.pages_present), 0);
                assert_eq!(f.inst.map_held(PageRange::new(PageIdx(0), N)).unwrap(), 6);
                assert_eq!(get(&f.metrics.pages_mapped_local), 6);
            }
            assert_eq!(get(&f.metrics.pages_present), 6);
            // The new content of an evicted page goes in; present pages stay.
            f.inst.install(PageIdx(4), &page_data(4, 4, 7), PageKind::Demand).unwrap();
            assert_eq!(read(&f, 5), 3 ^ 5);
            assert_eq!(read(&f, 7), 7 ^ 7);
            assert_eq!(get(&f.metrics.pages_present), 8);
        }
    }

    #[test]
    fn pending_faults_complete_once_with_latency() {
        for shmem in [false, true] {
            let f = fixture(shmem);
            f.inst.begin_postcopy();
            let t = Instant::now();
            f.inst.add_pending(PendingFault { page: PageIdx(3), t_read: t, tid: 7, local: false }).unwrap();
            f.inst.add_pending(PendingFault { page: PageIdx(3), t_read: t, tid: 8, local: false }).unwrap();
            f.inst.add_pending(PendingFault { page: PageIdx(9), t_read: t, tid: 7, local: false }).unwrap();
            assert_eq!(f.inst.n_pending(), 3);
            f.inst.install(PageIdx(0), &page_data(0, 4, 0), PageKind::Demand).unwrap();
            assert_eq!(f.inst.n_pending(), 1, "both faults on page 3 done");
            assert_eq!(f.metrics.fault_latency.lock().count(), 2);
            // A fault read after its page arrived completes at once.
            f.inst
                .add_pending(PendingFault { page: PageIdx(1), t_read: Instant::now(), tid: 9, local: false })
                .unwrap();
            assert_eq!(f.inst.n_pending(), 1);
            assert_eq!(get(&f.metrics.faults_resolved_early), 1);
            let block = f.metrics.blocktime_ns.lock();
            assert_eq!(block.keys().copied().collect::<Vec<_>>(), vec![7, 8, 9]);
        }
    }

    /// The kernel may drop a shared page's mapping while the page cache
    /// keeps it (swap, khugepaged): the guest's next access is a minor fault
    /// on a page we call present, and only a new CONTINUE resolves it. Here
    /// the mapping is dropped by hand (MADV_DONTNEED on the guest's view).
    #[test]
    fn a_fault_on_a_present_page_whose_mapping_went_is_mapped_again() {
        for shmem in [true, false] {
            let f = fixture(shmem);
            f.inst.begin_postcopy();
            f.inst.install(PageIdx(4), &page_data(4, 1, 3), PageKind::Demand).unwrap();
            assert_eq!(read(&f, 4), 3 ^ 4);
            let addr = f.guest.as_ptr() as usize + 4 * PG;
            if shmem {
                let p = std::ptr::NonNull::new(addr as *mut std::ffi::c_void).unwrap();
                // SAFETY: one page of the fixture's shared guest view; its
                // content stays in the page cache.
                unsafe { nix::sys::mman::madvise(p, PG, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }.unwrap();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            // SAFETY: the mapping outlives the thread (the fixture lives on
            // until the thread answered, or the test failed).
            std::thread::spawn(move || tx.send(unsafe { std::ptr::read_volatile(addr as *const u8) }));
            let mut buf = vec![0u8; 64 * crate::uffd::MSG_LEN];
            let mut faults = Vec::new();
            let t0 = Instant::now();
            while shmem && faults.is_empty() {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no minor fault");
                f.inst.uffd().read_events(&mut buf, &mut faults, &mut Vec::new()).unwrap();
                std::thread::yield_now();
            }
            // What the fault loop does with each fault it reads.
            f.inst
                .add_pending(PendingFault { page: PageIdx(4), t_read: Instant::now(), tid: 1, local: false })
                .unwrap();
            let got = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the faulting thread was resolved");
            assert_eq!(got, 3 ^ 4, "shmem={shmem}: the page cache's content, mapped again");
            assert_eq!(f.inst.n_pending(), 0);
        }
    }

    #[test]
    fn a_page_installed_behind_our_back_makes_copy_retry() {
        let f = fixture(false);
        f.inst.begin_postcopy();
        // Page 5 is installed directly (as the other thread's copy racing
        // ours would be), without the installer's knowledge.
        let src = vec![9u8; PG];
        // SAFETY: page 5 of the registered fixture mapping.
        unsafe { f.inst.uffd().copy(f.inst.map().addr(PageIdx(5)), src.as_ptr(), PG, true) }.unwrap();
        assert_eq!(f.inst.install(PageIdx(0), &page_data(0, 10, 1), PageKind::Push).unwrap(), 9);
        assert!(get(&f.metrics.install_retries) > 0, "EAGAIN after copying pages 0..5");
        assert_eq!(get(&f.metrics.pages_duplicate), 1);
        assert_eq!(read(&f, 5), 9);
        assert_eq!(read(&f, 6), 1 ^ 6);
    }

    #[test]
    fn runs_of_a_mask() {
        let mut v = vec![];
        for_each_run(64, 0b1110_0110, |r| v.push((r.first.0, r.n_pages)));
        assert_eq!(v, vec![(65, 2), (69, 3)]);
        let mut v = vec![];
        for_each_run(0, u64::MAX, |r| v.push((r.first.0, r.n_pages)));
        assert_eq!(v, vec![(0, 64)]);
        let mut v = vec![];
        for_each_run(0, 1 << 63, |r| v.push((r.first.0, r.n_pages)));
        assert_eq!(v, vec![(63, 1)]);
    }
}
