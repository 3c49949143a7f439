//! Installing received pages and completing the faults that wait on them.
//!
//! Shared by the fault thread (demand replies) and the bulk receiver (push and
//! precopy). Invariants:
//! * a page's `present` bit is set only after the kernel holds the page, and
//!   each page is counted once (bits count, not copies);
//! * a fault registered in `pending` is completed exactly once, by whichever
//!   thread sees both its `waiting` bit and the page present. The fault thread
//!   sets `waiting` then checks `present`; installers set `present` then check
//!   `waiting`, each with a SeqCst fence between, so at least one of them sees
//!   the other's write (Dekker) and the entry's removal under the lock makes it
//!   at most one.
#![allow(unsafe_code)]

use std::sync::atomic::{Ordering, fence};
use std::time::Instant;

use parking_lot::Mutex;
use proto::wire::PageKind;
use proto::{AtomicPageBitmap, HostAddr, MemLayout, PageIdx, PageRange};

use crate::metrics::PagerMetrics;
use crate::uffd::{CopyOutcome, UffdError, Userfault};

/// How many times in a row an install may be asked to retry before the pager
/// gives up (the kernel says EAGAIN while a mapping changes; nothing in this
/// process changes guest mappings during postcopy, so this is a safety net).
const MAX_RETRIES: u32 = 10_000;

/// A fault whose page has not arrived yet.
#[derive(Clone, Copy, Debug)]
pub struct PendingFault {
    /// The page.
    pub page: PageIdx,
    /// When the fault event was read.
    pub t_read: Instant,
    /// Faulting thread.
    pub tid: u32,
}

/// Where guest memory lives in this process, by layout region.
#[derive(Clone, Debug)]
pub struct GuestMap {
    layout: MemLayout,
    bases: Vec<HostAddr>,
}

impl GuestMap {
    /// A map of `layout` whose regions start at `bases`.
    pub fn new(layout: MemLayout, bases: Vec<HostAddr>) -> Self {
        assert_eq!(layout.regions().len(), bases.len(), "one base per region");
        GuestMap { layout, bases }
    }

    /// The layout.
    pub fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// Region bases and lengths.
    pub fn spans(&self) -> impl Iterator<Item = (HostAddr, usize)> + '_ {
        self.bases
            .iter()
            .zip(self.layout.regions())
            .map(|(b, r)| (*b, usize::try_from(r.len_bytes).expect("mapped")))
    }

    /// Host address of `page` (in range).
    #[inline]
    pub fn host_addr(&self, page: PageIdx) -> HostAddr {
        let (i, within) = self.layout.locate(page).expect("validated page");
        self.bases[i]
            .offset_by(usize::try_from(within << self.layout.page_size().shift()).expect("mapped"))
    }

    /// Page holding host address `addr`, if it is guest memory.
    #[inline]
    pub fn page_of(&self, addr: HostAddr) -> Option<PageIdx> {
        let shift = self.layout.page_size().shift();
        for (i, (b, r)) in self.bases.iter().zip(self.layout.regions()).enumerate() {
            let off = addr.0.wrapping_sub(b.0) as u64;
            if addr.0 >= b.0 && off < r.len_bytes {
                return Some(PageIdx(
                    self.layout.region_pages(i).first.0 + (off >> shift),
                ));
            }
        }
        None
    }
}

/// Installs pages into guest memory and tracks what is present.
#[derive(Debug)]
pub struct Installer {
    uffd: Userfault,
    map: GuestMap,
    present: AtomicPageBitmap,
    waiting: AtomicPageBitmap,
    pending: Mutex<Vec<PendingFault>>,
    metrics: std::sync::Arc<PagerMetrics>,
}

impl Installer {
    /// An installer over `map`, whose memory is registered with `uffd`.
    pub fn new(uffd: Userfault, map: GuestMap, metrics: std::sync::Arc<PagerMetrics>) -> Self {
        let n = map.layout().n_pages();
        Installer {
            uffd,
            map,
            present: AtomicPageBitmap::new(n),
            waiting: AtomicPageBitmap::new(n),
            pending: Mutex::new(Vec::new()),
            metrics,
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

    /// Mark pages present that the kernel already holds without our install
    /// (precopy pages in hybrid mode written before registration).
    pub fn mark_present(&self, r: PageRange) {
        let newly = self.present.set_range(r);
        PagerMetrics::add(&self.metrics.pages_present, newly);
    }

    /// Forget pages about to be evicted (before switchover). Clear the bits
    /// before the pages are dropped: an install racing in between then either
    /// finds the old page (EEXIST, skipped) or the hole (installed, bit set).
    pub fn unmark_present(&self, r: PageRange) {
        let cleared = self.present.clear_range(r);
        self.metrics
            .pages_present
            .fetch_sub(cleared, std::sync::atomic::Ordering::Relaxed);
    }

    /// Record a fault; completes it at once if its page is already present.
    pub fn add_pending(&self, f: PendingFault) {
        {
            let mut p = self.pending.lock();
            p.push(f);
            self.waiting.set(f.page);
        }
        fence(Ordering::SeqCst);
        if self.present.get(f.page) {
            PagerMetrics::add(&self.metrics.faults_resolved_early, 1);
            self.complete_waiting(PageRange::new(f.page, 1));
        }
    }

    /// Install a run received from the source. `data` holds `n` pages starting
    /// at `first`; the range was validated by the session. Returns pages
    /// newly installed.
    pub fn install(&self, first: PageIdx, data: &[u8], kind: PageKind) -> Result<u64, UffdError> {
        let ps = self.map.layout().page_size().bytes_usize();
        let n = (data.len() / ps) as u64;
        let run = PageRange::new(first, n);
        let mut newly = 0;
        for (_, piece) in self.map.layout().split_by_region(run) {
            let mut at = piece.first.0;
            let end = piece.end();
            let mut retries = 0;
            while at < end {
                if self.present.get(PageIdx(at)) {
                    PagerMetrics::add(&self.metrics.pages_duplicate, 1);
                    at += 1;
                    continue;
                }
                // The longest stretch not known present, within this region.
                let stop = self
                    .present
                    .next_with_below(at, end, true)
                    .map_or(end, |p| p.0);
                let off = usize::try_from(at - first.0).expect("within run") * ps;
                let len = usize::try_from(stop - at).expect("within run") * ps;
                let dst = self.map.host_addr(PageIdx(at));
                // SAFETY: `dst..dst+len` lies in one region of guest memory that
                // the DestGuest contract keeps mapped and registered with this
                // uffd; the source bytes are `data[off..off + len]`.
                let outcome = unsafe {
                    self.uffd
                        .copy(dst, data[off..off + len].as_ptr(), len, true)
                }?;
                let (copied, skip) = match outcome {
                    CopyOutcome::Done => (len, 0),
                    CopyOutcome::Exists { copied } => (copied, 1),
                    CopyOutcome::Again { copied } => {
                        retries += 1;
                        PagerMetrics::add(&self.metrics.install_retries, 1);
                        if retries > MAX_RETRIES {
                            return Err(UffdError::Install {
                                op: "UFFDIO_COPY",
                                addr: dst.0,
                                len_bytes: len,
                                source: nix::errno::Errno::EAGAIN,
                            });
                        }
                        (copied, 0)
                    }
                };
                let copied_pages = (copied / ps) as u64;
                if copied_pages > 0 {
                    newly += self
                        .present
                        .set_range(PageRange::new(PageIdx(at), copied_pages));
                }
                if skip > 0 {
                    // Installed by the other thread, which sets the bit itself.
                    PagerMetrics::add(&self.metrics.pages_duplicate, 1);
                }
                at += copied_pages + skip;
            }
        }
        PagerMetrics::add(&self.metrics.pages_present, newly);
        let counter = match kind {
            PageKind::Demand => &self.metrics.pages_demand,
            PageKind::Push => &self.metrics.pages_push,
            PageKind::Precopy => &self.metrics.pages_precopy,
        };
        PagerMetrics::add(counter, newly);
        fence(Ordering::SeqCst);
        if self.waiting.any_in(run) {
            self.complete_waiting(run);
        }
        Ok(newly)
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
        let mut block = self.metrics.blocktime_ns.lock();
        for f in done {
            let ns = u64::try_from(now.duration_since(f.t_read).as_nanos()).unwrap_or(u64::MAX);
            hist.record_ns(ns);
            *block.entry(f.tid).or_default() += ns;
        }
    }

    /// Faults still waiting (for diagnostics on failure).
    pub fn n_pending(&self) -> usize {
        self.pending.lock().len()
    }
}
