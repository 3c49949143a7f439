//! Where the source's guest memory lives, and the spans `writev` reads.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proto::wire::{Msg, PageKind};
use proto::{HostAddr, MemLayout, PageIdx, PageRange};
use transport::{Conn, IoSpan, TransportError};

/// Guest memory placement on the source.
#[derive(Debug)]
pub(crate) struct SourceMap {
    layout: MemLayout,
    bases: Vec<HostAddr>,
    /// The destination takes Zeros frames (`FEATURE_ZEROS` negotiated).
    zeros: AtomicBool,
    /// Pages known to read as zero without reading them (the guest's
    /// zero scan, once the guest is paused for good).
    known_zero: std::sync::OnceLock<proto::PageBitmap>,
}

impl SourceMap {
    /// A map of `layout` with regions at `bases`; the caller holds a
    /// `SourceGuest`, whose contract keeps them mapped while the map is used.
    pub(crate) fn new(layout: MemLayout, bases: Vec<HostAddr>) -> Self {
        assert_eq!(layout.regions().len(), bases.len(), "one base per region");
        SourceMap { layout, bases, zeros: AtomicBool::new(false), known_zero: std::sync::OnceLock::new() }
    }

    pub(crate) fn layout(&self) -> &MemLayout {
        &self.layout
    }

    /// Where each region starts.
    pub(crate) fn bases(&self) -> &[HostAddr] {
        &self.bases
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

    /// Whether every byte of `page` (validated) is zero. Reads the page as
    /// the guest's vCPUs write it, in atomic words; stops at the first
    /// non-zero word, which for a page with data is almost always the first.
    pub(crate) fn is_zero(&self, page: PageIdx) -> bool {
        if self.known_zero.get().is_some_and(|z| z.get(page)) {
            return true;
        }
        let (i, within) = self.layout.locate(page).expect("validated page");
        let shift = self.layout.page_size().shift();
        let addr = self.bases[i].offset_by(usize::try_from(within << shift).expect("mapped")).0;
        let words = usize::try_from(self.layout.page_size().bytes() / 8).expect("small");
        (0..words).all(|w| {
            // SAFETY: the word lies inside region i's mapping, which the
            // SourceGuest contract keeps mapped and readable; guest memory is
            // 8-byte aligned and written by the guest only through atomic
            // words (or not at all while it is paused).
            let word = unsafe { &*((addr + 8 * w) as *const AtomicU64) };
            word.load(Ordering::Relaxed) == 0
        })
    }

    /// Record the pages known to read as zero (once; later calls are
    /// ignored). Only for a guest that no longer runs here.
    pub(crate) fn set_known_zero(&self, z: proto::PageBitmap) {
        let _ = self.known_zero.set(z);
    }

    /// Whether Zeros frames may be sent (as negotiated in the handshake).
    pub(crate) fn allow_zeros(&self, yes: bool) {
        self.zeros.store(yes, Ordering::Relaxed);
    }

    /// Send `r` (validated, within a frame's limit) as `kind`: once Zeros
    /// frames are allowed, stretches of zero pages as Zeros (no data) and the
    /// rest as Pages; before, all as Pages. Returns the pages sent as Zeros.
    pub(crate) fn send_run(&self, conn: &mut dyn Conn, r: PageRange, kind: PageKind) -> Result<u64, TransportError> {
        let mut spans: Vec<IoSpan<'_>> = Vec::with_capacity(4);
        if !self.zeros.load(Ordering::Relaxed) {
            self.spans(r, &mut spans);
            return conn.send_pages(r.first, u32::try_from(r.n_pages).expect("frame-sized"), kind, &spans).map(|()| 0);
        }
        let mut n_zero = 0;
        let mut at = r.first.0;
        while at < r.end() {
            let zero = self.is_zero(PageIdx(at));
            let mut end = at + 1;
            while end < r.end() && self.is_zero(PageIdx(end)) == zero {
                end += 1;
            }
            let piece = PageRange::new(PageIdx(at), end - at);
            let n = u32::try_from(piece.n_pages).expect("frame-sized");
            if zero {
                conn.send(&Msg::Zeros { first: piece.first, n_pages: n, kind })?;
                n_zero += piece.n_pages;
            } else {
                spans.clear();
                self.spans(piece, &mut spans);
                conn.send_pages(piece.first, n, kind, &spans)?;
            }
            at = end;
        }
        Ok(n_zero)
    }
}
