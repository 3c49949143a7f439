//! Guest memory: one mapping per region of a [`MemLayout`], anonymous or
//! shared-memory backed.
//!
//! * [`Backing::Anonymous`]: private anonymous mappings, never populated up
//!   front, so on a destination every page is missing until the pager
//!   installs it (UFFDIO_COPY).
//! * [`Backing::Shmem`]: one memfd per region (hugetlbfs for 2 MiB pages),
//!   mapped shared for the guest, plus a second shared *alias* mapping of
//!   the same pages for the pager.
//!   The pager populates the page cache through the alias before the guest
//!   runs, writes arriving pages straight into it and maps them into the
//!   guest's view with UFFDIO_CONTINUE: one copy (socket to page cache), no
//!   allocation on the receive path.
//!
//! Invariants: every mapping lives as long as the `GuestMemory`, is exactly
//! its region's length and page-aligned. Guest code touches memory only
//! through [`GuestMemory::word`] (atomic 64-bit words), so concurrent access
//! by vCPU threads, the pager and the sender's `writev` is well defined.
#![allow(unsafe_code)]

use std::fs::File;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};
use nix::sys::memfd::{MFdFlags, memfd_create};
use proto::{HostAddr, MemLayout, PageIdx, PageRange, PageSize};

/// Why guest memory could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("mapping {len_bytes} bytes for region {region} failed")]
    Map {
        /// Region index.
        region: usize,
        /// Its length.
        len_bytes: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The region does not fit the address space of this host.
    #[error("region {region} of {len_bytes} bytes does not fit this host")]
    TooLarge {
        /// Region index.
        region: usize,
        /// Its length.
        len_bytes: u64,
    },
    /// memfd_create or ftruncate failed.
    #[error("creating shared memory for region {region} failed")]
    Memfd {
        /// Region index.
        region: usize,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// madvise failed.
    #[error("madvise({advice}) on {n_pages} pages at {first} failed")]
    Advise {
        /// Which advice.
        advice: &'static str,
        /// First page.
        first: PageIdx,
        /// Pages.
        n_pages: u64,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// PAGEMAP_SCAN (or opening /proc/self/pagemap) failed.
    #[error("scanning guest memory's page tables (PAGEMAP_SCAN) failed")]
    Scan(#[source] nix::Error),
}

/// What guest memory is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// memfd (shmem) memory with an alias mapping.
    Shmem,
    /// The same, asking for transparent huge pages (MADV_HUGEPAGE on the
    /// alias, through which every page is allocated: 2 MiB folios in the
    /// page cache where the host's `shmem_enabled` allows them, 4 KiB ones
    /// otherwise). The guest's view is still mapped a 4 KiB entry at a
    /// time: userfaultfd installs shared memory with page-table entries, not
    /// huge mappings.
    ShmemThp,
}

impl Backing {
    /// Shared memory with an alias (served by UFFDIO_CONTINUE).
    pub fn is_shared(self) -> bool {
        matches!(self, Backing::Shmem | Backing::ShmemThp)
    }
}

/// Where one region lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// Start address.
    pub host: HostAddr,
    /// Length in bytes.
    pub len_bytes: usize,
    /// The region's pages.
    pub pages: PageRange,
}

/// A guest's memory.
#[derive(Debug)]
pub struct GuestMemory {
    layout: MemLayout,
    backing: Backing,
    /// Owns the mappings; `regions` and `alias` point into them.
    _maps: Vec<MmapRaw>,
    /// The memfds of a shmem backing.
    _files: Vec<File>,
    regions: Vec<HostRegion>,
    alias: Vec<HostAddr>,
}

impl GuestMemory {
    /// Map (but do not populate) anonymous memory for `layout`.
    pub fn new(layout: MemLayout) -> Result<GuestMemory, MemoryError> {
        GuestMemory::with_backing(layout, Backing::Anonymous)
    }

    /// Map memory for `layout` with the given backing. Nothing is populated.
    pub fn with_backing(layout: MemLayout, backing: Backing) -> Result<GuestMemory, MemoryError> {
        let mut maps = Vec::with_capacity(2 * layout.regions().len());
        let mut files = Vec::new();
        let mut regions = Vec::with_capacity(layout.regions().len());
        let mut alias = Vec::new();
        for (i, r) in layout.regions().iter().enumerate() {
            let len = usize::try_from(r.len_bytes)
                .map_err(|_| MemoryError::TooLarge { region: i, len_bytes: r.len_bytes })?;
            let map_err = |source| MemoryError::Map { region: i, len_bytes: r.len_bytes, source };
            let m: MmapRaw = match backing {
                Backing::Anonymous => {
                    let mut opts = MmapOptions::new();
                    opts.len(len).no_reserve_swap();
                    if layout.page_size() == PageSize::Size2M {
                        opts.huge(Some(21));
                    }
                    opts.map_anon().map_err(map_err)?.into()
                }
                Backing::Shmem | Backing::ShmemThp => {
                    // 2 MiB pages: a hugetlbfs memfd (pages from the reserve),
                    // unless transparent huge pages are asked for.
                    let huge = if layout.page_size() == PageSize::Size2M && backing == Backing::Shmem {
                        MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB
                    } else {
                        MFdFlags::empty()
                    };
                    let fd = memfd_create(c"postcopy-guest", MFdFlags::MFD_CLOEXEC | huge)
                        .map_err(|source| MemoryError::Memfd { region: i, source })?;
                    let file = File::from(fd);
                    file.set_len(r.len_bytes).map_err(map_err)?;
                    let guest = MmapOptions::new().len(len).map_raw(&file).map_err(map_err)?;
                    let a = MmapOptions::new().len(len).map_raw(&file).map_err(map_err)?;
                    if backing == Backing::ShmemThp {
                        // On the alias only: every page is allocated through
                        // it (the guest's view only maps what is there).
                        let ptr = std::ptr::NonNull::new(a.as_mut_ptr().cast()).expect("mapped");
                        // SAFETY: a whole mapping we just made; the advice
                        // changes how pages are allocated, not content.
                        unsafe { nix::sys::mman::madvise(ptr, len, nix::sys::mman::MmapAdvise::MADV_HUGEPAGE) }
                            .map_err(|source| MemoryError::Advise {
                                advice: "MADV_HUGEPAGE",
                                first: layout.region_pages(i).first,
                                n_pages: layout.region_pages(i).n_pages,
                                source,
                            })?;
                    }
                    alias.push(HostAddr(a.as_mut_ptr() as usize));
                    maps.push(a);
                    files.push(file);
                    guest
                }
            };
            regions.push(HostRegion {
                host: HostAddr(m.as_mut_ptr() as usize),
                len_bytes: len,
                pages: layout.region_pages(i),
            });
            maps.push(m);
        }
        Ok(GuestMemory { layout, backing, _maps: maps, _files: files, regions, alias })
    }

    /// The backing.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Where each region's alias mapping starts (shmem backing only).
    pub fn alias_regions(&self) -> Option<&[HostAddr]> {
        self.backing.is_shared().then_some(&self.alias[..])
    }

    /// Allocate every page of a shmem backing and map it in the alias view
    /// (MADV_POPULATE_WRITE), so that later writes through the alias neither
    /// fault nor allocate; the guest's own view stays unmapped. Spread over
    /// `threads` threads, stopping early when `cancel` is set. Content is
    /// never changed (pages already there are only mapped), so it may run
    /// while the pager writes. No-op for anonymous memory.
    pub fn populate_alias(&self, threads: usize, cancel: &std::sync::atomic::AtomicBool) -> Result<(), MemoryError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        if !self.backing.is_shared() {
            return Ok(());
        }
        // 64 MiB chunks, handed out to the threads in turn.
        const CHUNK: usize = 64 << 20;
        let mut jobs = Vec::new();
        for (i, (a, r)) in self.alias.iter().zip(&self.regions).enumerate() {
            let mut off = 0;
            while off < r.len_bytes {
                let len = CHUNK.min(r.len_bytes - off);
                jobs.push((i, a.offset_by(off), len));
                off += len;
            }
        }
        let threads = threads.clamp(1, 16).min(jobs.len().max(1));
        let next = AtomicUsize::new(0);
        let failed = parking_lot::Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while let Some(&(region, addr, len)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        let ptr = std::ptr::NonNull::new(addr.0 as *mut std::ffi::c_void)
                            .expect("mapped address is non-null");
                        let advice = nix::sys::mman::MmapAdvise::MADV_POPULATE_WRITE;
                        // SAFETY: the span lies inside region `region`'s alias
                        // mapping, owned by self; populating changes no content
                        // (absent page-cache pages are allocated zero-filled).
                        if let Err(source) = unsafe { nix::sys::mman::madvise(ptr, len, advice) } {
                            let first = self.regions[region].pages.first;
                            *failed.lock() =
                                Some(MemoryError::Advise { advice: "MADV_POPULATE_WRITE", first, n_pages: 0, source });
                            return;
                        }
                    }
                });
            }
        });
        failed.into_inner().map_or(Ok(()), Err)
    }

    /// Bytes of this memory mapped in 2 MiB pages now: hugetlbfs pages, or
    /// transparent huge pages mapped whole (read from /proc/self/smaps: for
    /// shared memory its alias, which is populated through 2 MiB-aligned
    /// faults and so maps the page cache's huge folios whole; the guest's
    /// view of shared memory is mapped a 4 KiB entry at a time).
    pub fn huge_bytes(&self) -> std::io::Result<u64> {
        let spans: Vec<(usize, usize)> = match self.alias_regions() {
            Some(a) => a.iter().zip(&self.regions).map(|(h, r)| (h.0, h.0 + r.len_bytes)).collect(),
            None => self.regions.iter().map(|r| (r.host.0, r.host.0 + r.len_bytes)).collect(),
        };
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut total_kb = 0u64;
        let mut ours = false;
        for line in smaps.lines() {
            // A mapping's header: "start-end perms offset dev inode [path]".
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
            {
                // A mapping of ours, or a piece of one (the kernel may split
                // or merge them).
                ours = spans.iter().any(|&(s, e)| start < e && s < end);
                continue;
            }
            if !ours {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else { continue };
            if matches!(key, "ShmemPmdMapped" | "AnonHugePages" | "Shared_Hugetlb" | "Private_Hugetlb") {
                total_kb += value.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
        Ok(total_kb * 1024)
    }

    /// The layout.
    pub fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// Page size.
    pub fn page_size(&self) -> PageSize {
        self.layout.page_size()
    }

    /// Add to `into` every page that reads as zero without being read:
    /// never populated (neither present nor swapped), or mapped to the
    /// shared zero page. Anonymous memory only (a non-present page of shared
    /// memory may be in the page cache); returns the pages added. Valid
    /// while nothing writes the memory (a paused guest).
    pub fn zero_pages(&self, into: &mut proto::PageBitmap) -> Result<u64, MemoryError> {
        use std::os::fd::AsRawFd;
        use uffd::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PageRegion, PmScanArg, pagemap_scan};
        if self.backing != Backing::Anonymous {
            return Ok(0);
        }
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| MemoryError::Scan(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let shift = self.layout.page_size().shift();
        let mut vec = vec![PageRegion::default(); 512];
        let mut found = 0;
        // Unpopulated pages, then zero-page mappings.
        for (inverted, mask) in
            [(PAGE_IS_PRESENT | PAGE_IS_SWAPPED, PAGE_IS_PRESENT | PAGE_IS_SWAPPED), (0, PAGE_IS_PFNZERO)]
        {
            for r in &self.regions {
                let (start, end) = (r.host.0 as u64, (r.host.0 + r.len_bytes) as u64);
                let mut at = start;
                while at < end {
                    let mut arg = PmScanArg {
                        size: std::mem::size_of::<PmScanArg>() as u64,
                        start: at,
                        end,
                        vec: vec.as_mut_ptr() as u64,
                        vec_len: vec.len() as u64,
                        category_inverted: inverted,
                        category_mask: mask,
                        return_mask: mask,
                        ..PmScanArg::default()
                    };
                    // SAFETY: `arg` is a valid pm_scan_arg whose output vector
                    // is `vec` (its length, alive for the call); the range is
                    // one of this memory's own mappings. The scan only reads
                    // page tables.
                    let n = unsafe { pagemap_scan(pagemap.as_raw_fd(), &raw mut arg) }.map_err(MemoryError::Scan)?;
                    let n = usize::try_from(n).unwrap_or(0).min(vec.len());
                    let mut last = at;
                    for reg in &vec[..n] {
                        let first = r.pages.first.0 + ((reg.start - start) >> shift);
                        found += into.set_range(PageRange::new(PageIdx(first), (reg.end - reg.start) >> shift));
                        last = reg.end;
                    }
                    let next = arg.walk_end.max(last);
                    if next <= at {
                        break;
                    }
                    at = next;
                }
            }
        }
        Ok(found)
    }

    /// Where each region lives.
    pub fn host_regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Host address of page `p`. Panics if `p` is outside the guest (callers
    /// hold validated indices).
    #[inline]
    pub fn host_addr(&self, p: PageIdx) -> HostAddr {
        let (i, within) = self.layout.locate(p).expect("page inside the guest");
        let off = usize::try_from(within << self.layout.page_size().shift()).expect("within a mapped region");
        self.regions[i].host.offset_by(off)
    }

    /// The 64-bit word `offset` bytes into the guest's pages laid end to end
    /// (page `offset / page size`, at `offset % page size`); 8-aligned.
    pub fn word_at(&self, offset: u64) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8), "word offset {offset} not 8-aligned");
        let shift = self.page_size().shift();
        let w = usize::try_from((offset & ((1 << shift) - 1)) / 8).expect("below a page");
        self.word(PageIdx(offset >> shift), w)
    }

    /// Word `w` of page `p` as an atomic. Panics if out of range.
    #[inline]
    pub fn word(&self, p: PageIdx, w: usize) -> &AtomicU64 {
        assert!(w < self.page_size().bytes_usize() / 8, "word {w} outside a page");
        let addr = self.host_addr(p).offset_by(w * 8);
        // SAFETY: `addr` is 8-aligned (page-aligned base plus a multiple of 8)
        // and inside a mapping that lives as long as `&self`; all access to
        // guest memory from Rust goes through atomics, so there are no
        // non-atomic races. The kernel writing the page (UFFDIO_COPY) is
        // outside the Rust memory model, like device DMA.
        unsafe { AtomicU64::from_ptr(addr.0 as *mut u64) }
    }

    /// Drop `r` from the guest's view (MADV_DONTNEED): anonymous pages read
    /// back as missing; shmem pages keep their (now stale) page-cache content
    /// but are unmapped, so a userfaultfd-registered range faults on them
    /// again (missing or minor) and the pager decides what they hold.
    pub fn evict(&self, r: PageRange) -> Result<(), MemoryError> {
        for (i, piece) in self.layout.split_by_region(r) {
            let (_, within) = self.layout.locate(piece.first).expect("validated range");
            let shift = self.layout.page_size().shift();
            let off = usize::try_from(within << shift).expect("within region");
            let len = usize::try_from(piece.n_pages << shift).expect("within region");
            let addr = self.regions[i].host.offset_by(off);
            let ptr = std::ptr::NonNull::new(addr.0 as *mut std::ffi::c_void).expect("mapped address is non-null");
            // SAFETY: the span lies inside mapping i, which we own; dropping
            // page contents is the intended effect (no Rust references into
            // guest memory exist, see the module doc).
            unsafe { nix::sys::mman::madvise(ptr, len, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }.map_err(
                |source| MemoryError::Advise {
                    advice: "MADV_DONTNEED",
                    first: piece.first,
                    n_pages: piece.n_pages,
                    source,
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{GuestOffset, RegionDesc};
    use std::sync::atomic::Ordering;

    #[test]
    fn the_zero_scan_finds_exactly_the_pages_never_written() {
        let layout = MemLayout::new(
            PageSize::Size4K,
            vec![
                RegionDesc { guest: GuestOffset(0), len_bytes: 64 * 4096 },
                RegionDesc { guest: GuestOffset(1 << 30), len_bytes: 64 * 4096 },
            ],
        )
        .unwrap();
        let m = GuestMemory::new(layout).unwrap();
        let written = [0u64, 5, 63, 64, 100, 127];
        for &p in &written {
            m.word(PageIdx(p), 3).store(7, Ordering::Relaxed);
        }
        // A page only read maps the shared zero page: still zero.
        assert_eq!(m.word(PageIdx(10), 0).load(Ordering::Relaxed), 0);
        let mut z = proto::PageBitmap::new(128);
        let n = m.zero_pages(&mut z).unwrap();
        assert_eq!(n, 128 - written.len() as u64);
        for p in 0..128 {
            assert_eq!(z.get(PageIdx(p)), !written.contains(&p), "page {p}");
        }
        // Shared memory: not anonymous, nothing claimed.
        let s =
            GuestMemory::with_backing(MemLayout::single(PageSize::Size4K, 16 * 4096).unwrap(), Backing::Shmem).unwrap();
        let mut z = proto::PageBitmap::new(16);
        assert_eq!(s.zero_pages(&mut z).unwrap(), 0);
    }

    #[test]
    fn regions_words_and_eviction() {
        let layout = MemLayout::new(
            PageSize::Size4K,
            vec![
                RegionDesc { guest: GuestOffset(0), len_bytes: 3 * 4096 },
                RegionDesc { guest: GuestOffset(1 << 30), len_bytes: 5 * 4096 },
            ],
        )
        .unwrap();
        for backing in [Backing::Anonymous, Backing::Shmem, Backing::ShmemThp] {
            check_memory(GuestMemory::with_backing(layout.clone(), backing).unwrap());
        }
    }

    fn check_memory(m: GuestMemory) {
        assert_eq!(m.host_regions().len(), 2);
        for p in 0..8 {
            m.word(PageIdx(p), 0).store(p + 100, Ordering::Relaxed);
            m.word(PageIdx(p), 511).store(p, Ordering::Relaxed);
        }
        assert_eq!(m.host_addr(PageIdx(4)), m.host_regions()[1].host.offset_by(4096));
        for p in 0..8 {
            assert_eq!(m.word(PageIdx(p), 0).load(Ordering::Relaxed), p + 100);
        }
        m.evict(PageRange::new(PageIdx(2), 3)).unwrap();
        let zeros: Vec<_> = (0..8).map(|p| m.word(PageIdx(p), 0).load(Ordering::Relaxed) == 0).collect();
        match m.backing() {
            Backing::Anonymous => {
                assert_eq!(zeros, vec![false, false, true, true, true, false, false, false]);
            }
            // Shared memory keeps its content: only the guest's mapping went.
            Backing::Shmem | Backing::ShmemThp => assert!(zeros.iter().all(|z| !z)),
        }
        if let Some(alias) = m.alias_regions() {
            m.populate_alias(2, &std::sync::atomic::AtomicBool::new(false)).unwrap();
            // SAFETY: the first word of region 0's alias, a live mapping.
            let v = unsafe { std::ptr::read_volatile(alias[0].0 as *const u64) };
            assert_eq!(v, 100, "the alias maps the same pages as the guest");
        }
    }
}
