//! Where the source's guest memory lives, and the spans `writev` reads.
#![allow(unsafe_code)]

use proto::{HostAddr, MemLayout, PageRange};
use transport::IoSpan;

/// Guest memory placement on the source.
#[derive(Debug)]
pub(crate) struct SourceMap {
    layout: MemLayout,
    bases: Vec<HostAddr>,
}

impl SourceMap {
    /// A map of `layout` with regions at `bases`; the caller holds a
    /// `SourceGuest`, whose contract keeps them mapped while the map is used.
    pub(crate) fn new(layout: MemLayout, bases: Vec<HostAddr>) -> Self {
        assert_eq!(layout.regions().len(), bases.len(), "one base per region");
        SourceMap { layout, bases }
    }

    pub(crate) fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// The memory of `r` (validated) as one span per region it touches.
    pub(crate) fn spans<'a>(&'a self, r: PageRange, out: &mut Vec<IoSpan<'a>>) {
        let shift = self.layout.page_size().shift();
        for (i, piece) in self.layout.split_by_region(r) {
            let (_, within) = self.layout.locate(piece.first).expect("validated range");
            let addr = self.bases[i].offset_by(usize::try_from(within << shift).expect("mapped"));
            let len = usize::try_from(piece.n_pages << shift).expect("mapped");
            // SAFETY: the span lies inside region i's mapping, which the
            // SourceGuest contract keeps mapped and readable while the sender
            // (and so this map) is in use.
            out.push(unsafe { IoSpan::from_raw(addr, len) });
        }
    }
}
