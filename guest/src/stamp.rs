//! The self-checking memory format of the workload guest.
//!
//! A [`StampLayout`] places the *version table* (one u64 per guest page,
//! entry `p` the last version written to data page `p`) and the data pages
//! after it: at the start of memory for the workload guest, after the boot
//! area for the VM guest. Every data page holds:
//!
//! ```text
//! word 0        version (equal to table[p] whenever no store is in flight)
//! word 1        p ^ TAG           (catches a page installed at the wrong index)
//! words 2..W-1  fill(p, w)        (catches torn or zeroed pages; never changes)
//! word W-1      version again     (catches a partially copied page)
//! ```
//!
//! A store to page `p` (only by its owner vCPU) writes version v+1 to word 0
//! and word W-1, then to `table[p]`, all with release ordering. So a reader
//! that sees `table[p] = t` must see both version words `>= t`; the owner must
//! see them equal to `t`. A page that comes back stale, zero or from another
//! index violates one of these. Because every store adds exactly 1 to exactly
//! one table entry, `sum(table) = n_data + total stores`: a stale *table* page
//! is caught by the final verification even if it agrees with stale data.

use std::sync::atomic::Ordering;

use proto::PageIdx;

use crate::memory::GuestMemory;

/// Mixed into word 1 so a zero page never looks tagged.
pub const TAG: u64 = 0x5043_5059_7461_6721;

/// Where the version table and the data pages are. Its "pages" are units
/// of `page_bytes`: the memory's own pages for the workload guest, always 4
/// KiB for the VM guest (its program strides 4 KiB whatever backs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StampLayout {
    /// First page of the version table.
    pub table_first: u64,
    /// First data page (right after the table).
    pub data_first: u64,
    /// Pages in the guest.
    pub n_pages: u64,
    /// Bytes per page (a multiple of 8 dividing the memory's page size, or
    /// equal to it).
    pub page_bytes: u64,
}

impl StampLayout {
    /// A table at `table_first` covering `n_pages` pages of `page_bytes`, data after it.
    pub fn new(table_first: u64, n_pages: u64, page_bytes: u64) -> StampLayout {
        StampLayout { table_first, data_first: table_first + table_pages(n_pages, page_bytes), n_pages, page_bytes }
    }

    /// Word `w` of stamp page `p`.
    #[inline]
    fn word<'m>(&self, mem: &'m GuestMemory, p: u64, w: usize) -> &'m std::sync::atomic::AtomicU64 {
        mem.word_at(p * self.page_bytes + w as u64 * 8)
    }

    /// The table entry of data page `p`.
    #[inline]
    fn entry<'m>(&self, mem: &'m GuestMemory, p: u64) -> &'m std::sync::atomic::AtomicU64 {
        mem.word_at(self.table_first * self.page_bytes + p * 8)
    }

    fn words_per_page(&self) -> usize {
        usize::try_from(self.page_bytes / 8).expect("a page fits memory")
    }

    /// Data pages.
    pub fn n_data(&self) -> u64 {
        self.n_pages - self.data_first
    }

    /// Pages of the table.
    pub fn table_pages(&self) -> u64 {
        self.data_first - self.table_first
    }
}

/// The constant fill of word `w` of page `p`.
#[inline]
pub fn fill(p: u64, w: u64) -> u64 {
    let mut z = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 29) ^ 1
}

/// Words per page.
#[inline]
pub fn words_per_page(mem: &GuestMemory) -> usize {
    mem.page_size().bytes_usize() / 8
}

/// Pages the version table needs for a guest of `n_pages`.
pub fn table_pages(n_pages: u64, page_bytes: u64) -> u64 {
    (n_pages * 8).div_ceil(page_bytes)
}

/// The table entry of data page `p` (the table starts at page `table_first`).
#[inline]
pub fn table_word(mem: &GuestMemory, table_first: u64, p: u64) -> &std::sync::atomic::AtomicU64 {
    let per_page = words_per_page(mem) as u64;
    let w = usize::try_from(p % per_page).expect("word index below words per page");
    mem.word(PageIdx(table_first + p / per_page), w)
}

/// Write the initial content of every data page (version 1) and its table entry.
pub fn initialize(mem: &GuestMemory, l: StampLayout) {
    let wpp = l.words_per_page();
    for p in l.data_first..l.n_pages {
        l.word(mem, p, 0).store(1, Ordering::Relaxed);
        l.word(mem, p, 1).store(p ^ TAG, Ordering::Relaxed);
        for w in 2..wpp - 1 {
            l.word(mem, p, w).store(fill(p, w as u64), Ordering::Relaxed);
        }
        l.word(mem, p, wpp - 1).store(1, Ordering::Relaxed);
        l.entry(mem, p).store(1, Ordering::Release);
    }
}

/// What a full verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Pages whose content checked out (data pages, plus the table pages when
    /// the table's sum matched).
    pub verified_pages: u64,
    /// Data pages with wrong content.
    pub bad_pages: u64,
    /// Whether `sum(table) == n_data + total stores`.
    pub table_sum_ok: bool,
    /// The first few problems, for the error message.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether every page checked out (and nothing else was found wrong).
    pub fn ok(&self) -> bool {
        self.bad_pages == 0 && self.table_sum_ok && self.problems.is_empty()
    }
}

const MAX_PROBLEMS: usize = 8;

/// Check every data page of a stopped guest, and the table by its sum.
/// `total_stores` is the number of stores the guest made over its whole life
/// (both hosts).
pub fn verify(mem: &GuestMemory, l: StampLayout, total_stores: u64) -> VerifyReport {
    let wpp = l.words_per_page();
    let mut r = VerifyReport::default();
    let mut sum: u64 = 0;
    for p in l.data_first..l.n_pages {
        let t = l.entry(mem, p).load(Ordering::Acquire);
        sum = sum.wrapping_add(t);
        let w0 = l.word(mem, p, 0).load(Ordering::Acquire);
        let wl = l.word(mem, p, wpp - 1).load(Ordering::Acquire);
        let tag = l.word(mem, p, 1).load(Ordering::Relaxed);
        let mut problem = None;
        if w0 != t || wl != t {
            problem = Some(format!("page {p}: version words {w0}/{wl}, table says {t}"));
        } else if tag != p ^ TAG {
            problem = Some(format!("page {p}: tag names page {}", tag ^ TAG));
        } else if let Some(w) = (2..wpp - 1).find(|&w| l.word(mem, p, w).load(Ordering::Relaxed) != fill(p, w as u64)) {
            problem = Some(format!("page {p}: fill word {w} corrupt"));
        }
        match problem {
            Some(s) => {
                r.bad_pages += 1;
                if r.problems.len() < MAX_PROBLEMS {
                    r.problems.push(s);
                }
            }
            None => r.verified_pages += 1,
        }
    }
    let expected = l.n_data().wrapping_add(total_stores);
    r.table_sum_ok = sum == expected;
    if r.table_sum_ok {
        r.verified_pages += l.table_pages();
    } else if r.problems.len() < MAX_PROBLEMS {
        r.problems.push(format!("version table sums to {sum}, stores say {expected}: a table page is stale"));
    }
    r
}
