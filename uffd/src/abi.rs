//! ioctl numbers, structs and feature bits (kernel ABI, Linux 6.18).
// The ioctl wrappers nix generates are `unsafe fn`s: the caller passes a
// pointer to a struct the kernel reads and writes.
#![allow(unsafe_code)]

/// UFFD_FEATURE_MISSING_SHMEM.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// UFFD_FEATURE_MINOR_HUGETLBFS.
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// UFFD_FEATURE_MINOR_SHMEM.
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// UFFD_FEATURE_WP_UNPOPULATED: write-protect covers never-touched pages.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// UFFD_FEATURE_WP_ASYNC: the kernel resolves write-protect faults itself.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// UFFDIO_COPY_MODE_DONTWAKE.
pub const COPY_MODE_DONTWAKE: u64 = 1;

/// Kernel ABI: `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioCopy {
    /// Destination (in the registered range).
    pub dst: u64,
    /// Source bytes.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `COPY_MODE_*`.
    pub mode: u64,
    /// Bytes copied, or a negative errno.
    pub copy: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// Kernel ABI: `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioContinue {
    /// Start (in a range registered for minor faults).
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// Mode bits (none used).
    pub mode: u64,
    /// Bytes mapped, or a negative errno.
    pub mapped: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);

/// Kernel ABI: `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioZeropage {
    /// Start (in a range registered for missing faults, anonymous memory).
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// Mode bits (DONTWAKE = 1).
    pub mode: u64,
    /// Bytes mapped, or a negative errno.
    pub zeropage: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

const UFFDIO: u8 = 0xAA;
nix::ioctl_readwrite!(
    /// UFFDIO_ZEROPAGE.
    ioctl_zeropage,
    UFFDIO,
    0x04,
    UffdioZeropage
);
nix::ioctl_readwrite!(
    /// UFFDIO_COPY.
    ioctl_copy,
    UFFDIO,
    0x03,
    UffdioCopy
);
nix::ioctl_readwrite!(
    /// UFFDIO_CONTINUE.
    ioctl_continue,
    UFFDIO,
    0x07,
    UffdioContinue
);

/// PAGEMAP_SCAN flag: re-protect the pages it reports (write-protect async).
pub const PM_SCAN_WP_MATCHING: u64 = 1;
/// PAGEMAP_SCAN flag: fail unless the range is registered for WP_ASYNC
/// (without it a scan over an unregistered range silently reports nothing).
pub const PM_SCAN_CHECK_WPASYNC: u64 = 2;
/// PAGEMAP_SCAN category: written since protected.
pub const PAGE_IS_WRITTEN: u64 = 2;
/// PAGEMAP_SCAN category: mapped to a page frame.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// PAGEMAP_SCAN category: swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// PAGEMAP_SCAN category: mapped to the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// Kernel ABI: `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PmScanArg {
    /// `size_of::<PmScanArg>()`.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// First address scanned.
    pub start: u64,
    /// End of the range.
    pub end: u64,
    /// Where the walk stopped (out).
    pub walk_end: u64,
    /// Output vector of `PageRegion`s.
    pub vec: u64,
    /// Its length.
    pub vec_len: u64,
    /// Most pages to report (0: no limit).
    pub max_pages: u64,
    /// Categories inverted before matching.
    pub category_inverted: u64,
    /// Categories that must all match.
    pub category_mask: u64,
    /// Categories of which one must match.
    pub category_anyof_mask: u64,
    /// Categories reported.
    pub return_mask: u64,
}
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// Kernel ABI: `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// Categories of the pages.
    pub categories: u64,
}
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

// PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)
nix::ioctl_readwrite!(
    /// PAGEMAP_SCAN on /proc/self/pagemap.
    pagemap_scan,
    b'f',
    16,
    PmScanArg
);
