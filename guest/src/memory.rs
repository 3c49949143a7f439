//! Guest memory: one private anonymous mapping per region of a [`MemLayout`].
//!
//! Invariants: every mapping lives as long as the `GuestMemory`, is exactly
//! its region's length and page-aligned; memory is never populated up front
//! (MAP_NORESERVE, no MAP_POPULATE), so on a destination every page is missing
//! until the pager installs it. Guest code touches memory only through
//! [`GuestMemory::word`] (atomic 64-bit words), so concurrent access by vCPU
//! threads, the pager's UFFDIO_COPY and the sender's `writev` is well defined.
#![allow(unsafe_code)]

use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};
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
    /// Owns the mappings; `regions` points into them.
    _maps: Vec<MmapRaw>,
    regions: Vec<HostRegion>,
}

impl GuestMemory {
    /// Map (but do not populate) memory for `layout`.
    pub fn new(layout: MemLayout) -> Result<GuestMemory, MemoryError> {
        let mut maps = Vec::with_capacity(layout.regions().len());
        let mut regions = Vec::with_capacity(layout.regions().len());
        for (i, r) in layout.regions().iter().enumerate() {
            let len = usize::try_from(r.len_bytes).map_err(|_| MemoryError::TooLarge {
                region: i,
                len_bytes: r.len_bytes,
            })?;
            let mut opts = MmapOptions::new();
            opts.len(len).no_reserve_swap();
            if layout.page_size() == PageSize::Size2M {
                opts.huge(Some(21));
            }
            let m: MmapRaw = opts
                .map_anon()
                .map_err(|source| MemoryError::Map {
                    region: i,
                    len_bytes: r.len_bytes,
                    source,
                })?
                .into();
            regions.push(HostRegion {
                host: HostAddr(m.as_mut_ptr() as usize),
                len_bytes: len,
                pages: layout.region_pages(i),
            });
            maps.push(m);
        }
        Ok(GuestMemory {
            layout,
            _maps: maps,
            regions,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// Page size.
    pub fn page_size(&self) -> PageSize {
        self.layout.page_size()
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
        let off = usize::try_from(within << self.layout.page_size().shift())
            .expect("within a mapped region");
        self.regions[i].host.offset_by(off)
    }

    /// Word `w` of page `p` as an atomic. Panics if out of range.
    #[inline]
    pub fn word(&self, p: PageIdx, w: usize) -> &AtomicU64 {
        assert!(
            w < self.page_size().bytes_usize() / 8,
            "word {w} outside a page"
        );
        let addr = self.host_addr(p).offset_by(w * 8);
        // SAFETY: `addr` is 8-aligned (page-aligned base plus a multiple of 8)
        // and inside a mapping that lives as long as `&self`; all access to
        // guest memory from Rust goes through atomics, so there are no
        // non-atomic races. The kernel writing the page (UFFDIO_COPY) is
        // outside the Rust memory model, like device DMA.
        unsafe { AtomicU64::from_ptr(addr.0 as *mut u64) }
    }

    /// Drop the contents of `r` (MADV_DONTNEED): anonymous pages read back as
    /// missing, so a userfaultfd-registered range faults on them again.
    pub fn evict(&self, r: PageRange) -> Result<(), MemoryError> {
        for (i, piece) in self.layout.split_by_region(r) {
            let (_, within) = self.layout.locate(piece.first).expect("validated range");
            let shift = self.layout.page_size().shift();
            let off = usize::try_from(within << shift).expect("within region");
            let len = usize::try_from(piece.n_pages << shift).expect("within region");
            let addr = self.regions[i].host.offset_by(off);
            let ptr = std::ptr::NonNull::new(addr.0 as *mut std::ffi::c_void)
                .expect("mapped address is non-null");
            // SAFETY: the span lies inside mapping i, which we own; dropping
            // page contents is the intended effect (no Rust references into
            // guest memory exist, see the module doc).
            unsafe { nix::sys::mman::madvise(ptr, len, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
                .map_err(|source| MemoryError::Advise {
                    advice: "MADV_DONTNEED",
                    first: piece.first,
                    n_pages: piece.n_pages,
                    source,
                })?;
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
    fn regions_words_and_eviction() {
        let layout = MemLayout::new(
            PageSize::Size4K,
            vec![
                RegionDesc {
                    guest: GuestOffset(0),
                    len_bytes: 3 * 4096,
                },
                RegionDesc {
                    guest: GuestOffset(1 << 30),
                    len_bytes: 5 * 4096,
                },
            ],
        )
        .unwrap();
        let m = GuestMemory::new(layout).unwrap();
        assert_eq!(m.host_regions().len(), 2);
        for p in 0..8 {
            m.word(PageIdx(p), 0).store(p + 100, Ordering::Relaxed);
            m.word(PageIdx(p), 511).store(p, Ordering::Relaxed);
        }
        assert_eq!(
            m.host_addr(PageIdx(4)),
            m.host_regions()[1].host.offset_by(4096)
        );
        for p in 0..8 {
            assert_eq!(m.word(PageIdx(p), 0).load(Ordering::Relaxed), p + 100);
        }
        m.evict(PageRange::new(PageIdx(2), 3)).unwrap();
        let zeros: Vec<_> = (0..8)
            .map(|p| m.word(PageIdx(p), 0).load(Ordering::Relaxed) == 0)
            .collect();
        assert_eq!(
            zeros,
            vec![false, false, true, true, true, false, false, false]
        );
    }
}
