//! Page bitmaps: one bit per guest page.
//!
//! [`PageBitmap`] is owned by one thread; [`AtomicPageBitmap`] is shared (the
//! destination's "present" set is written by the fault thread and the push
//! receiver at once). Bits past `len` are always zero, so word-wise counts are
//! exact.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::{PageIdx, PageRange};

const WORD_BITS: u64 = 64;

#[inline]
fn word_of(i: u64) -> usize {
    usize::try_from(i / WORD_BITS).expect("bitmap index fits usize")
}

#[inline]
fn bit_of(i: u64) -> u64 {
    1u64 << (i % WORD_BITS)
}

/// Mask of the bits `[lo, hi)` within one word, `0 <= lo < hi <= 64`.
#[inline]
fn span_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == WORD_BITS { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

/// Calls `f(word_index, mask)` for each word overlapping `[first, first + n)`.
fn for_each_word(first: u64, n: u64, mut f: impl FnMut(usize, u64)) {
    let end = first + n;
    let mut i = first;
    while i < end {
        let w = i / WORD_BITS;
        let lo = i % WORD_BITS;
        let hi = (end - w * WORD_BITS).min(WORD_BITS);
        f(word_of(i), span_mask(lo, hi));
        i = (w + 1) * WORD_BITS;
    }
}

/// A single-owner page bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
}

impl PageBitmap {
    /// An all-clear bitmap of `len` pages.
    pub fn new(len: u64) -> Self {
        PageBitmap { words: vec![0; word_of(len.div_ceil(WORD_BITS) * WORD_BITS)], len }
    }

    /// An all-set bitmap of `len` pages.
    pub fn full(len: u64) -> Self {
        let mut b = PageBitmap::new(len);
        b.set_range(PageRange::new(PageIdx(0), len));
        b
    }

    /// Number of pages covered.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw words, little-endian bit order (bit i of word w is page 64w+i).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Overwrite words starting at `first_word`; bits past `len` are dropped.
    /// Returns false (and changes nothing) if the words do not fit.
    pub fn load_words(&mut self, first_word: usize, words: &[u64]) -> bool {
        let Some(end) = first_word.checked_add(words.len()) else {
            return false;
        };
        if end > self.words.len() {
            return false;
        }
        self.words[first_word..end].copy_from_slice(words);
        self.clear_tail();
        true
    }

    /// Set every page set in `other` (of the same length).
    pub fn union_with(&mut self, other: &PageBitmap) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    fn clear_tail(&mut self) {
        let rem = self.len % WORD_BITS;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Whether page `i` is set.
    #[inline]
    pub fn get(&self, i: PageIdx) -> bool {
        debug_assert!(i.0 < self.len);
        self.words[word_of(i.0)] & bit_of(i.0) != 0
    }

    /// Set page `i`; returns whether it was already set.
    #[inline]
    pub fn set(&mut self, i: PageIdx) -> bool {
        debug_assert!(i.0 < self.len);
        let w = &mut self.words[word_of(i.0)];
        let was = *w & bit_of(i.0) != 0;
        *w |= bit_of(i.0);
        was
    }

    /// Clear page `i`.
    #[inline]
    pub fn clear(&mut self, i: PageIdx) {
        debug_assert!(i.0 < self.len);
        self.words[word_of(i.0)] &= !bit_of(i.0);
    }

    /// Set every page of `r`; returns how many were newly set.
    pub fn set_range(&mut self, r: PageRange) -> u64 {
        debug_assert!(r.end() <= self.len);
        let mut newly = 0;
        for_each_word(r.first.0, r.n_pages, |w, m| {
            newly += u64::from((m & !self.words[w]).count_ones());
            self.words[w] |= m;
        });
        newly
    }

    /// Clear every page of `r`.
    pub fn clear_range(&mut self, r: PageRange) {
        debug_assert!(r.end() <= self.len);
        for_each_word(r.first.0, r.n_pages, |w, m| self.words[w] &= !m);
    }

    /// Clear every page.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Number of set pages.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// First page `>= from` whose bit equals `value`.
    pub fn next_with(&self, from: u64, value: bool) -> Option<PageIdx> {
        next_with(from, self.len, value, |w| self.words[w])
    }

    /// First page in `[from, below)` whose bit equals `value`; the search
    /// reads no word past `below`.
    pub fn next_with_below(&self, from: u64, below: u64, value: bool) -> Option<PageIdx> {
        next_with(from, below.min(self.len), value, |w| self.words[w])
    }

    /// The maximal run of pages with bit `value` starting at the first such page
    /// `>= from`, at most `max` long.
    pub fn run_from(&self, from: u64, value: bool, max: u64) -> Option<PageRange> {
        let first = self.next_with(from, value)?;
        let limit = self.len.min(first.0.saturating_add(max));
        let end = self.next_with_below(first.0, limit, !value).map_or(limit, |p| p.0);
        Some(PageRange::new(first, end - first.0))
    }

    /// All maximal runs of set pages, ascending.
    pub fn runs(&self) -> impl Iterator<Item = PageRange> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let r = self.run_from(at, true, u64::MAX)?;
            at = r.end();
            Some(r)
        })
    }
}

/// First index in `[from, len)` whose bit equals `value`, reading words through
/// `load` (so the plain and the atomic bitmap share it).
fn next_with(from: u64, len: u64, value: bool, load: impl Fn(usize) -> u64) -> Option<PageIdx> {
    if from >= len {
        return None;
    }
    let mut w = from / WORD_BITS;
    let n_words = len.div_ceil(WORD_BITS);
    let flip = if value { 0 } else { u64::MAX };
    // Mask off the bits below `from` in the first word.
    let mut bits = (load(word_of(w * WORD_BITS)) ^ flip) & !((1u64 << (from % WORD_BITS)) - 1);
    loop {
        if bits != 0 {
            let i = w * WORD_BITS + u64::from(bits.trailing_zeros());
            return (i < len).then_some(PageIdx(i));
        }
        w += 1;
        if w >= n_words {
            return None;
        }
        bits = load(word_of(w * WORD_BITS)) ^ flip;
    }
}

/// A page bitmap shared between threads. Each bit only ever goes from clear to
/// set while shared, except through [`AtomicPageBitmap::clear`], whose callers
/// document why no one races with them.
#[derive(Debug)]
pub struct AtomicPageBitmap {
    words: Vec<AtomicU64>,
    len: u64,
}

impl AtomicPageBitmap {
    /// An all-clear bitmap of `len` pages.
    pub fn new(len: u64) -> Self {
        let n = word_of(len.div_ceil(WORD_BITS) * WORD_BITS);
        AtomicPageBitmap { words: (0..n).map(|_| AtomicU64::new(0)).collect(), len }
    }

    /// Number of pages covered.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether page `i` is set. Acquire: a reader that sees the bit also sees
    /// what the setter did before setting it.
    #[inline]
    pub fn get(&self, i: PageIdx) -> bool {
        debug_assert!(i.0 < self.len);
        self.words[word_of(i.0)].load(Ordering::Acquire) & bit_of(i.0) != 0
    }

    /// Set page `i`; returns whether it was already set.
    #[inline]
    pub fn set(&self, i: PageIdx) -> bool {
        debug_assert!(i.0 < self.len);
        self.words[word_of(i.0)].fetch_or(bit_of(i.0), Ordering::AcqRel) & bit_of(i.0) != 0
    }

    /// Clear page `i`.
    #[inline]
    pub fn clear(&self, i: PageIdx) {
        debug_assert!(i.0 < self.len);
        self.words[word_of(i.0)].fetch_and(!bit_of(i.0), Ordering::AcqRel);
    }

    /// Set every page of `r`; returns how many were newly set by this call.
    pub fn set_range(&self, r: PageRange) -> u64 {
        debug_assert!(r.end() <= self.len);
        let mut newly = 0;
        for_each_word(r.first.0, r.n_pages, |w, m| {
            let prev = self.words[w].fetch_or(m, Ordering::AcqRel);
            newly += u64::from((m & !prev).count_ones());
        });
        newly
    }

    /// Set the pages of `r`, which must lie within one 64-page word; returns
    /// the mask (bit i = page 64w+i) of the bits this call set.
    pub fn set_range_mask(&self, r: PageRange) -> u64 {
        debug_assert!(r.end() <= self.len && r.n_pages > 0 && r.first.0 / 64 == (r.end() - 1) / 64);
        let lo = r.first.0 % WORD_BITS;
        let m = span_mask(lo, lo + r.n_pages);
        let prev = self.words[word_of(r.first.0)].fetch_or(m, Ordering::AcqRel);
        m & !prev
    }

    /// Set the bits `mask` of word `w` (pages 64w..64w+64); returns the mask
    /// of the bits this call set.
    pub fn set_word_mask(&self, w: usize, mask: u64) -> u64 {
        mask & !self.words[w].fetch_or(mask, Ordering::AcqRel)
    }

    /// Clear every page of `r`; returns how many were set before.
    pub fn clear_range(&self, r: PageRange) -> u64 {
        debug_assert!(r.end() <= self.len);
        let mut cleared = 0;
        for_each_word(r.first.0, r.n_pages, |w, m| {
            let prev = self.words[w].fetch_and(!m, Ordering::AcqRel);
            cleared += u64::from((m & prev).count_ones());
        });
        cleared
    }

    /// Whether any page of `r` is set.
    pub fn any_in(&self, r: PageRange) -> bool {
        let mut any = false;
        for_each_word(r.first.0, r.n_pages, |w, m| any |= self.words[w].load(Ordering::Acquire) & m != 0);
        any
    }

    /// Whether every page of `r` is set.
    pub fn all_in(&self, r: PageRange) -> bool {
        let mut all = true;
        for_each_word(r.first.0, r.n_pages, |w, m| all &= self.words[w].load(Ordering::Acquire) & m == m);
        all
    }

    /// Word `w` (pages `64w..64w+64`).
    #[inline]
    pub fn load_word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Number of set pages (a snapshot; exact once writers have stopped).
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// First page `>= from` whose bit equals `value` (snapshot).
    pub fn next_with(&self, from: u64, value: bool) -> Option<PageIdx> {
        next_with(from, self.len, value, |w| self.load_word(w))
    }

    /// First page in `[from, below)` whose bit equals `value` (snapshot); the
    /// search reads no word past `below`, so it costs O(below - from).
    pub fn next_with_below(&self, from: u64, below: u64, value: bool) -> Option<PageIdx> {
        next_with(from, below.min(self.len), value, |w| self.load_word(w))
    }

    /// The maximal run with bit `value` starting at the first such page `>= from`,
    /// at most `max` long (snapshot).
    pub fn run_from(&self, from: u64, value: bool, max: u64) -> Option<PageRange> {
        let first = self.next_with(from, value)?;
        let limit = self.len.min(first.0.saturating_add(max));
        let end = self.next_with_below(first.0, limit, !value).map_or(limit, |p| p.0);
        Some(PageRange::new(first, end - first.0))
    }

    /// A plain copy of the current bits.
    pub fn snapshot(&self) -> PageBitmap {
        PageBitmap { words: self.words.iter().map(|w| w.load(Ordering::Acquire)).collect(), len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_across_words() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.set_range(PageRange::new(PageIdx(60), 10)), 10);
        assert_eq!(b.set_range(PageRange::new(PageIdx(65), 10)), 5);
        assert_eq!(b.count_ones(), 15);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![PageRange::new(PageIdx(60), 15)]);
        assert_eq!(b.next_with(0, true), Some(PageIdx(60)));
        assert_eq!(b.next_with(60, false), Some(PageIdx(75)));
        assert_eq!(b.run_from(0, false, 1000), Some(PageRange::new(PageIdx(0), 60)));
        assert_eq!(b.run_from(61, true, 4), Some(PageRange::new(PageIdx(61), 4)));
        b.clear_range(PageRange::new(PageIdx(62), 3));
        assert_eq!(b.count_ones(), 12);
        assert_eq!(b.run_from(199, false, 10), Some(PageRange::new(PageIdx(199), 1)));
        assert_eq!(b.next_with(200, false), None);
    }

    #[test]
    fn full_bitmap_keeps_tail_clear() {
        let b = PageBitmap::full(70);
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.next_with(0, false), None);
        let mut c = PageBitmap::new(70);
        assert!(c.load_words(0, &[u64::MAX, u64::MAX]));
        assert_eq!(c.count_ones(), 70);
        assert!(!c.load_words(1, &[0, 0]), "words past the end are refused");
    }

    #[test]
    fn atomic_matches_plain() {
        let a = AtomicPageBitmap::new(130);
        assert_eq!(a.set_range(PageRange::new(PageIdx(10), 100)), 100);
        assert_eq!(a.set_range(PageRange::new(PageIdx(100), 30)), 20);
        assert!(a.all_in(PageRange::new(PageIdx(10), 120)));
        assert!(!a.all_in(PageRange::new(PageIdx(9), 2)));
        assert!(a.any_in(PageRange::new(PageIdx(9), 2)));
        assert!(a.set(PageIdx(50)));
        assert!(!a.set(PageIdx(0)));
        assert_eq!(a.count_ones(), 121);
        assert_eq!(a.snapshot().count_ones(), 121);
        assert_eq!(a.next_with(0, false), Some(PageIdx(1)));
        assert_eq!(a.next_with_below(1, 10, true), None);
        assert_eq!(a.next_with_below(1, 11, true), Some(PageIdx(10)));
        assert_eq!(a.run_from(5, false, 100), Some(PageRange::new(PageIdx(5), 5)));
        assert_eq!(a.clear_range(PageRange::new(PageIdx(8), 4)), 2);
        let b = AtomicPageBitmap::new(128);
        b.set(PageIdx(66));
        assert_eq!(b.set_range_mask(PageRange::new(PageIdx(65), 3)), 0b1010);
        assert_eq!(b.set_range_mask(PageRange::new(PageIdx(64), 64)), !0b1110);
        let c = AtomicPageBitmap::new(64);
        c.set(PageIdx(1));
        assert_eq!(c.set_word_mask(0, 0b111), 0b101);
        assert_eq!(a.count_ones(), 119);
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set_bits(len in 1u64..500, ops in proptest::collection::vec((0u64..500, 1u64..80), 0..20)) {
            let mut b = PageBitmap::new(len);
            let mut model = vec![false; usize::try_from(len).unwrap()];
            for (first, n) in ops {
                if first >= len { continue; }
                let n = n.min(len - first);
                b.set_range(PageRange::new(PageIdx(first), n));
                for i in first..first + n { model[usize::try_from(i).unwrap()] = true; }
            }
            let mut from_runs = vec![false; model.len()];
            for r in b.runs() {
                for i in r.first.0..r.end() { from_runs[usize::try_from(i).unwrap()] = true; }
            }
            prop_assert_eq!(&from_runs, &model);
            prop_assert_eq!(b.count_ones(), model.iter().filter(|x| **x).count() as u64);
        }
    }
}
