//! Dirty-page tracking for precopy: userfaultfd write-protect in async mode
//! plus the PAGEMAP_SCAN ioctl (Linux 6.7+).
//!
//! Arming write-protects every page (UFFDIO_WRITEPROTECT over each region;
//! with WP_UNPOPULATED that covers pages never touched too). In async mode
//! the kernel resolves a write to a protected page by itself, without a
//! message, and marks the page written. `collect` runs PAGEMAP_SCAN with
//! PM_SCAN_WP_MATCHING, which reports the written pages and re-protects them
//! in the same walk, atomically per page: a write after a page is scanned
//! shows up in the next scan. Callers scan *before* copying a round's pages
//! (clear before copy), so a page written while it is being sent is sent
//! again next round.
//!
//! Neither WP_ASYNC nor PAGEMAP_SCAN is in the `userfaultfd` crate (nor in
//! libc/nix): the crate creates the descriptor and registers the ranges; the
//! scan is a raw ioctl whose ABI lives in our `uffd` crate. Kernel behaviour relied on (checked on 6.18, see the tests):
//! * always pass PM_SCAN_CHECK_WPASYNC: without it a scan over a range not
//!   registered this way silently returns nothing;
//! * when the output vector fills, `walk_end` is the first page *not*
//!   reported (and not re-armed): resume there; with more than 512 regions
//!   per call `walk_end` can lag, so resume at `max(walk_end, last.end)`;
//! * a failed scan may have re-armed pages it did not report: the caller
//!   must then treat the whole range as dirty.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

use proto::{PageBitmap, PageIdx, PageRange};
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::memory::GuestMemory;

use uffd::{
    FEATURE_WP_ASYNC as UFFD_FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED as UFFD_FEATURE_WP_UNPOPULATED, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, PageRegion, PmScanArg, pagemap_scan,
};

/// Regions per scan call: above 512 the kernel's `walk_end` can lag.
const VEC_LEN: usize = 512;

/// Why tracking could not start or a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The kernel lacks write-protect async mode.
    #[error("userfaultfd write-protect tracking unavailable (needs UFFD_FEATURE_WP_ASYNC, Linux 6.7+)")]
    Create(#[source] userfaultfd::Error),
    /// Registering or protecting a region failed.
    #[error("write-protecting region {region} failed")]
    Protect {
        /// Region index.
        region: usize,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// /proc/self/pagemap could not be opened.
    #[error("opening /proc/self/pagemap failed")]
    Pagemap(#[source] std::io::Error),
    /// The scan ioctl failed.
    #[error("PAGEMAP_SCAN over region {region} failed")]
    Scan {
        /// Region index.
        region: usize,
        /// The error.
        #[source]
        source: nix::Error,
    },
}

/// Tracks which pages of a guest's memory were written.
#[derive(Debug)]
pub struct DirtyTracker {
    uffd: Uffd,
    pagemap: File,
    /// (start address, length, first page) per region.
    regions: Vec<(usize, usize, u64)>,
    shift: u32,
    vec: Vec<PageRegion>,
}

impl DirtyTracker {
    /// Register `mem` for write-protect tracking and arm every page: from
    /// now on every page written is reported by `collect`.
    pub fn start(mem: &GuestMemory) -> Result<DirtyTracker, DirtyError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::from_bits_retain(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED))
            .create()
            .map_err(DirtyError::Create)?;
        let mut regions = Vec::new();
        for (i, r) in mem.host_regions().iter().enumerate() {
            let ptr = r.host.0 as *mut std::ffi::c_void;
            uffd.register_with_mode(ptr, r.len_bytes, RegisterMode::WRITE_PROTECT)
                .map_err(|source| DirtyError::Protect { region: i, source })?;
            uffd.write_protect(ptr, r.len_bytes).map_err(|source| DirtyError::Protect { region: i, source })?;
            regions.push((r.host.0, r.len_bytes, r.pages.first.0));
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
        Ok(DirtyTracker {
            uffd,
            pagemap,
            regions,
            shift: mem.page_size().shift(),
            vec: vec![PageRegion::default(); VEC_LEN],
        })
    }

    /// Add every page written since the last call (or since `start`) to
    /// `into`, re-arming them. If a scan fails, the whole region it covered is
    /// added (a failed scan may have re-armed pages it did not report) and the
    /// error returned.
    pub fn collect(&mut self, into: &mut PageBitmap) -> Result<u64, DirtyError> {
        let mut found = 0;
        let mut first_err = None;
        for (i, &(start, len, first_page)) in self.regions.iter().enumerate() {
            let end = (start + len) as u64;
            let mut at = start as u64;
            while at < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start: at,
                    end,
                    vec: self.vec.as_mut_ptr() as u64,
                    vec_len: VEC_LEN as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..PmScanArg::default()
                };
                // SAFETY: `arg` is a valid pm_scan_arg whose output vector is
                // `self.vec` (VEC_LEN entries, alive for the call); the range is
                // one of this process's guest mappings, registered above.
                let r = unsafe { pagemap_scan(self.pagemap.as_raw_fd(), &raw mut arg) };
                let n = match r {
                    Ok(n) => usize::try_from(n).unwrap_or(0).min(VEC_LEN),
                    Err(source) => {
                        // Treat the rest of the region as written.
                        let rest = PageRange::new(
                            PageIdx(first_page + ((at - start as u64) >> self.shift)),
                            (end - at) >> self.shift,
                        );
                        found += into.set_range(rest);
                        first_err.get_or_insert(DirtyError::Scan { region: i, source });
                        break;
                    }
                };
                let mut last_end = at;
                for reg in &self.vec[..n] {
                    let p0 = first_page + ((reg.start - start as u64) >> self.shift);
                    let np = (reg.end - reg.start) >> self.shift;
                    found += into.set_range(PageRange::new(PageIdx(p0), np));
                    last_end = reg.end;
                }
                let next = arg.walk_end.max(last_end);
                if next <= at {
                    // No progress: the walk is done (or stuck; never loop).
                    break;
                }
                at = next;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        // Closing the descriptor unregisters and clears write protection;
        // unregister explicitly so the guest runs untracked at once.
        for &(start, len, _) in &self.regions {
            let _ = self.uffd.unregister(start as *mut std::ffi::c_void, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{MemLayout, PageSize};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn mem(pages: u64) -> GuestMemory {
        GuestMemory::new(MemLayout::single(PageSize::Size4K, pages * 4096).unwrap()).unwrap()
    }

    fn write(m: &GuestMemory, p: u64) {
        m.word(PageIdx(p), 7).fetch_add(1, Ordering::Relaxed);
    }

    fn pages(b: &PageBitmap) -> Vec<u64> {
        b.runs().flat_map(|r| r.first.0..r.end()).collect()
    }

    #[test]
    fn exact_sets_and_rearming() {
        let m = mem(1024);
        // Touch some pages before tracking: they are not dirty until written again.
        for p in 0..50 {
            write(&m, p);
        }
        let mut t = DirtyTracker::start(&m).unwrap();
        let mut b = PageBitmap::new(1024);
        assert_eq!(t.collect(&mut b).unwrap(), 0, "nothing written since arming");
        for p in [3, 17].into_iter().chain(100..111) {
            write(&m, p);
        }
        // Reads never count.
        let _ = m.word(PageIdx(500), 0).load(Ordering::Relaxed);
        assert_eq!(t.collect(&mut b).unwrap(), 13);
        assert_eq!(pages(&b), [3, 17].into_iter().chain(100..111).collect::<Vec<_>>());
        b.clear_all();
        assert_eq!(t.collect(&mut b).unwrap(), 0, "re-armed by the scan");
        write(&m, 3);
        write(&m, 1023);
        t.collect(&mut b).unwrap();
        assert_eq!(pages(&b), vec![3, 1023]);
    }

    #[test]
    fn many_regions_per_scan_are_all_reported() {
        // Every other page: 2048 separate regions, more than one output vector.
        let m = mem(4096);
        let mut t = DirtyTracker::start(&m).unwrap();
        for p in (0..4096).step_by(2) {
            write(&m, p);
        }
        let mut b = PageBitmap::new(4096);
        assert_eq!(t.collect(&mut b).unwrap(), 2048);
        assert!(pages(&b).iter().all(|p| p % 2 == 0));
    }

    #[test]
    fn no_write_is_lost_while_scanning() {
        // A writer bumps each page exactly once, in order, while the scanner
        // loops; afterwards the union of every scan must hold every page.
        let m = Arc::new(mem(16384));
        let mut t = DirtyTracker::start(&m).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let w = {
            let (m, done) = (Arc::clone(&m), Arc::clone(&done));
            std::thread::spawn(move || {
                for p in 0..16384 {
                    write(&m, p);
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut seen = PageBitmap::new(16384);
        let mut scans = 0;
        while !done.load(Ordering::Acquire) {
            t.collect(&mut seen).unwrap();
            scans += 1;
        }
        w.join().unwrap();
        t.collect(&mut seen).unwrap();
        assert_eq!(seen.count_ones(), 16384, "lost writes after {scans} scans");
    }

    #[test]
    fn regions_and_unpopulated_pages() {
        let layout = MemLayout::new(
            PageSize::Size4K,
            vec![
                proto::RegionDesc { guest: proto::GuestOffset(0), len_bytes: 64 * 4096 },
                proto::RegionDesc { guest: proto::GuestOffset(1 << 30), len_bytes: 64 * 4096 },
            ],
        )
        .unwrap();
        let m = GuestMemory::new(layout).unwrap();
        let mut t = DirtyTracker::start(&m).unwrap();
        // First touch of never-populated pages counts as a write.
        write(&m, 70);
        write(&m, 5);
        let mut b = PageBitmap::new(128);
        t.collect(&mut b).unwrap();
        assert_eq!(pages(&b), vec![5, 70]);
        drop(t);
        // Untracked again: writes are plain writes.
        write(&m, 6);
        assert_eq!(m.word(PageIdx(6), 7).load(Ordering::Relaxed), 1);
    }
}
