//! Shared newtypes and the guest memory layout.
//!
//! Invariants kept here:
//! * A [`PageIdx`] is a dense index over all guest pages, region after region in
//!   ascending guest-offset order; it is what goes on the wire for pages.
//! * A [`GuestOffset`] is a guest-physical byte offset (regions may leave holes
//!   between them); a [`HostAddr`] is a process virtual address and never goes
//!   on the wire.
//! * A [`MemLayout`] that exists has been validated: page-aligned, non-empty,
//!   sorted, non-overlapping regions, and a page count under [`MAX_PAGES`], so
//!   every index computation below is overflow-free.

use std::fmt;

/// Upper bound on guest pages (2^32 pages is 16 TiB at 4 KiB): bounds every
/// bitmap a peer can make us allocate.
pub const MAX_PAGES: u64 = 1 << 32;
/// Upper bound on the number of memory regions in a layout.
pub const MAX_REGIONS: usize = 64;

/// Dense page index over the whole guest (see module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIdx(pub u64);

impl PageIdx {
    /// The index as a `usize` for indexing local arrays. Layouts are bounded by
    /// [`MAX_PAGES`], which fits a 64-bit `usize`.
    #[inline]
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).expect("page index fits usize on 64-bit hosts")
    }
}

impl fmt::Display for PageIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// Guest-physical byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// Host virtual address of guest memory in this process. Never on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(pub usize);

impl HostAddr {
    /// The address `len_bytes` further on.
    #[inline]
    pub fn offset_by(self, len_bytes: usize) -> HostAddr {
        HostAddr(self.0 + len_bytes)
    }
}

/// An address in the guest's own view of its memory: in this process for a
/// guest the engine runs, in a VMM's process for one whose userfaultfd was
/// handed over. Only ever passed to the kernel through a userfaultfd, never
/// dereferenced (it has no way to be). Never on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ViewAddr(pub usize);

impl ViewAddr {
    /// The address `len_bytes` further on.
    #[inline]
    pub fn offset_by(self, len_bytes: usize) -> ViewAddr {
        ViewAddr(self.0 + len_bytes)
    }
}

/// Guest page size. 4 KiB pages and 2 MiB huge pages are supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB base pages.
    Size4K,
    /// 2 MiB huge pages (hugetlbfs).
    Size2M,
}

impl PageSize {
    /// Page size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4096,
            PageSize::Size2M => 2 * 1024 * 1024,
        }
    }

    /// Page size in bytes as `usize`.
    #[inline]
    pub const fn bytes_usize(self) -> usize {
        match self {
            PageSize::Size4K => 4096,
            PageSize::Size2M => 2 * 1024 * 1024,
        }
    }

    /// log2 of the page size.
    #[inline]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
        }
    }

    /// Parse a size in bytes as it appears on the wire.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            4096 => Some(PageSize::Size4K),
            0x20_0000 => Some(PageSize::Size2M),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageSize::Size4K => f.write_str("4K"),
            PageSize::Size2M => f.write_str("2M"),
        }
    }
}

/// A run of consecutive pages `[first, first + n_pages)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// First page of the run.
    pub first: PageIdx,
    /// Number of pages, at least 1 in every range the protocol carries.
    pub n_pages: u64,
}

impl PageRange {
    /// A new range.
    pub const fn new(first: PageIdx, n_pages: u64) -> Self {
        PageRange { first, n_pages }
    }

    /// One past the last page.
    #[inline]
    pub fn end(&self) -> u64 {
        self.first.0 + self.n_pages
    }

    /// Whether `page` lies in the range.
    #[inline]
    pub fn contains(&self, page: PageIdx) -> bool {
        page.0 >= self.first.0 && page.0 < self.end()
    }
}

/// One guest memory region as named in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    /// Guest-physical start.
    pub guest: GuestOffset,
    /// Length in bytes, a multiple of the page size.
    pub len_bytes: u64,
}

/// Why a layout was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No regions at all.
    #[error("memory layout has no regions")]
    Empty,
    /// More regions than [`MAX_REGIONS`].
    #[error("memory layout has {n} regions, at most {MAX_REGIONS} allowed")]
    TooManyRegions {
        /// Regions named.
        n: usize,
    },
    /// A region start or length is not a multiple of the page size, or is zero.
    #[error("region {index} (guest {guest:#x}, {len_bytes} bytes) is empty or not aligned to {page_size} pages")]
    Misaligned {
        /// Region index.
        index: usize,
        /// Its guest start.
        guest: u64,
        /// Its length.
        len_bytes: u64,
        /// The page size in force.
        page_size: PageSize,
    },
    /// Regions overlap or are not in ascending order.
    #[error("region {index} at guest {guest:#x} overlaps or precedes the region before it")]
    Unordered {
        /// Region index.
        index: usize,
        /// Its guest start.
        guest: u64,
    },
    /// The whole guest exceeds [`MAX_PAGES`].
    #[error("memory layout holds more than {MAX_PAGES} pages")]
    TooLarge,
}

/// The validated layout of guest memory: page size and regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemLayout {
    page_size: PageSize,
    regions: Vec<RegionDesc>,
    /// First page index of each region; `first_page[i + 1] - first_page[i]` is
    /// region i's page count. One extra entry holds the total.
    first_page: Vec<u64>,
}

impl MemLayout {
    /// Validate and build a layout.
    pub fn new(page_size: PageSize, regions: Vec<RegionDesc>) -> Result<MemLayout, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions { n: regions.len() });
        }
        let ps = page_size.bytes();
        let mut first_page = Vec::with_capacity(regions.len() + 1);
        let mut total: u64 = 0;
        let mut prev_end: u64 = 0;
        for (index, r) in regions.iter().enumerate() {
            if r.len_bytes == 0 || r.len_bytes % ps != 0 || r.guest.0 % ps != 0 {
                return Err(LayoutError::Misaligned { index, guest: r.guest.0, len_bytes: r.len_bytes, page_size });
            }
            let end = r.guest.0.checked_add(r.len_bytes).ok_or(LayoutError::TooLarge)?;
            if index > 0 && r.guest.0 < prev_end {
                return Err(LayoutError::Unordered { index, guest: r.guest.0 });
            }
            prev_end = end;
            first_page.push(total);
            total = total.checked_add(r.len_bytes / ps).ok_or(LayoutError::TooLarge)?;
            if total > MAX_PAGES {
                return Err(LayoutError::TooLarge);
            }
        }
        first_page.push(total);
        Ok(MemLayout { page_size, regions, first_page })
    }

    /// A single region of `len_bytes` at guest offset 0.
    pub fn single(page_size: PageSize, len_bytes: u64) -> Result<MemLayout, LayoutError> {
        MemLayout::new(page_size, vec![RegionDesc { guest: GuestOffset(0), len_bytes }])
    }

    /// The page size.
    #[inline]
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The regions, ascending.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    /// Total pages.
    #[inline]
    pub fn n_pages(&self) -> u64 {
        self.first_page[self.regions.len()]
    }

    /// Total bytes of guest memory.
    pub fn len_bytes(&self) -> u64 {
        self.n_pages() * self.page_size.bytes()
    }

    /// Pages of region `i` as a range of page indices.
    pub fn region_pages(&self, i: usize) -> PageRange {
        PageRange::new(PageIdx(self.first_page[i]), self.first_page[i + 1] - self.first_page[i])
    }

    /// Region holding `page` and the page's index within it, if in range.
    #[inline]
    pub fn locate(&self, page: PageIdx) -> Option<(usize, u64)> {
        if page.0 >= self.n_pages() {
            return None;
        }
        // Few regions: the first entry greater than `page` bounds it.
        let i = self.first_page.partition_point(|&f| f <= page.0) - 1;
        Some((i, page.0 - self.first_page[i]))
    }

    /// Page holding guest offset `off`, if inside a region.
    pub fn page_of(&self, off: GuestOffset) -> Option<PageIdx> {
        let ps = self.page_size.bytes();
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (off.0 >= r.guest.0 && off.0 - r.guest.0 < r.len_bytes)
                .then(|| PageIdx(self.first_page[i] + (off.0 - r.guest.0) / ps))
        })
    }

    /// Guest offset of the start of `page`, if in range.
    pub fn offset_of(&self, page: PageIdx) -> Option<GuestOffset> {
        let (i, within) = self.locate(page)?;
        Some(GuestOffset(self.regions[i].guest.0 + within * self.page_size.bytes()))
    }

    /// Whether `range` is non-empty and lies inside the guest (it may span regions:
    /// page indices are dense).
    #[inline]
    pub fn contains_range(&self, first: PageIdx, n_pages: u64) -> bool {
        n_pages > 0 && first.0 < self.n_pages() && n_pages <= self.n_pages() - first.0
    }

    /// Split `range` at region boundaries: each piece lies in one region.
    /// The caller has checked `contains_range`.
    pub fn split_by_region(&self, range: PageRange) -> impl Iterator<Item = (usize, PageRange)> + '_ {
        let mut next = range.first.0;
        let end = range.end();
        std::iter::from_fn(move || {
            if next >= end {
                return None;
            }
            let (i, _) = self.locate(PageIdx(next))?;
            let piece_end = end.min(self.first_page[i + 1]);
            let piece = PageRange::new(PageIdx(next), piece_end - next);
            next = piece_end;
            Some((i, piece))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> MemLayout {
        MemLayout::new(
            PageSize::Size4K,
            vec![
                RegionDesc { guest: GuestOffset(0), len_bytes: 10 * 4096 },
                RegionDesc { guest: GuestOffset(1 << 32), len_bytes: 6 * 4096 },
            ],
        )
        .unwrap()
    }

    #[test]
    fn locate_and_offsets_span_regions() {
        let l = two_regions();
        assert_eq!(l.n_pages(), 16);
        assert_eq!(l.locate(PageIdx(9)), Some((0, 9)));
        assert_eq!(l.locate(PageIdx(10)), Some((1, 0)));
        assert_eq!(l.locate(PageIdx(16)), None);
        assert_eq!(l.offset_of(PageIdx(11)), Some(GuestOffset((1 << 32) + 4096)));
        assert_eq!(l.page_of(GuestOffset((1 << 32) + 4097)), Some(PageIdx(11)));
        assert_eq!(l.page_of(GuestOffset(10 * 4096)), None, "hole between regions");
        let pieces: Vec<_> = l.split_by_region(PageRange::new(PageIdx(8), 5)).collect();
        assert_eq!(pieces, vec![(0, PageRange::new(PageIdx(8), 2)), (1, PageRange::new(PageIdx(10), 3))]);
    }

    #[test]
    fn rejects_bad_layouts() {
        let ps = PageSize::Size4K;
        assert_eq!(MemLayout::new(ps, vec![]), Err(LayoutError::Empty));
        assert!(matches!(MemLayout::single(ps, 4095), Err(LayoutError::Misaligned { .. })));
        assert!(matches!(MemLayout::single(ps, 0), Err(LayoutError::Misaligned { .. })));
        let overlap = vec![
            RegionDesc { guest: GuestOffset(0), len_bytes: 8192 },
            RegionDesc { guest: GuestOffset(4096), len_bytes: 8192 },
        ];
        assert!(matches!(MemLayout::new(ps, overlap), Err(LayoutError::Unordered { .. })));
        assert_eq!(MemLayout::single(ps, (MAX_PAGES + 1) * 4096), Err(LayoutError::TooLarge));
        let wrap = vec![RegionDesc { guest: GuestOffset(u64::MAX - 4095), len_bytes: 8192 }];
        assert_eq!(MemLayout::new(ps, wrap), Err(LayoutError::TooLarge));
    }

    #[test]
    fn contains_range_never_overflows() {
        let l = two_regions();
        assert!(l.contains_range(PageIdx(0), 16));
        assert!(!l.contains_range(PageIdx(1), 16));
        assert!(!l.contains_range(PageIdx(0), 0));
        assert!(!l.contains_range(PageIdx(u64::MAX), u64::MAX));
    }
}
