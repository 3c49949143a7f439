//! Turning a drain of faults into one batched range request.
//!
//! Rules (pure; unit-tested without a kernel):
//! * each faulting page that is neither present nor requested goes first, as
//!   its own range (adjacent ones merged), so the source answers it before any
//!   prefetch and the destination can install it without waiting for a larger
//!   frame;
//! * then the prefetch window of each fault (after it, or around it), minus
//!   everything present, requested, or already in this batch;
//! * every page named is marked requested, so a page is asked for once until
//!   a re-request decides otherwise;
//! * "present" is the caller's judgement: pages already here, mapped or held.

use proto::{PageBitmap, PageIdx, PageRange};

/// Where the prefetch window lies relative to the faulting page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchMode {
    /// The pages following the faulting one.
    After,
    /// Centered on the faulting page.
    Around,
}

/// How many pages each fault asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    /// Window size in pages, the faulting page included (1 = no prefetch).
    pub pages: u32,
    /// Window placement.
    pub mode: PrefetchMode,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch { pages: 1, mode: PrefetchMode::After }
    }
}

/// Append `page` to `out`, extending the last range when adjacent.
fn push_page(out: &mut Vec<PageRange>, page: PageIdx, from: usize) {
    if out.len() > from {
        let last = out.last_mut().expect("non-empty");
        if last.end() == page.0 {
            last.n_pages += 1;
            return;
        }
    }
    out.push(PageRange::new(page, 1));
}

/// Plan one request for `faults` (in arrival order). Appends ranges to `out`
/// and returns how many pages were added.
pub fn plan(
    faults: &[PageIdx],
    prefetch: Prefetch,
    present: impl Fn(PageIdx) -> bool,
    requested: &mut PageBitmap,
    out: &mut Vec<PageRange>,
) -> u64 {
    let n_pages = requested.len();
    let start = out.len();
    let mut added = 0;
    for &p in faults {
        if !present(p) && !requested.set(p) {
            push_page(out, p, start);
            added += 1;
        }
    }
    let window = u64::from(prefetch.pages.max(1));
    if window == 1 {
        return added;
    }
    // Prefetch ranges may merge with each other, never with the urgent ones.
    let from = out.len();
    for &p in faults {
        let (lo, hi) = match prefetch.mode {
            PrefetchMode::After => (p.0, p.0.saturating_add(window)),
            PrefetchMode::Around => {
                let lo = p.0.saturating_sub((window - 1) / 2);
                (lo, lo.saturating_add(window))
            }
        };
        for q in lo..hi.min(n_pages) {
            let q = PageIdx(q);
            if !present(q) && !requested.set(q) {
                push_page(out, q, from);
                added += 1;
            }
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::AtomicPageBitmap;

    fn run(faults: &[u64], pf: Prefetch, present: &[u64], requested: &[u64], n: u64) -> Vec<(u64, u64)> {
        let p = AtomicPageBitmap::new(n);
        for &x in present {
            p.set(PageIdx(x));
        }
        let mut r = PageBitmap::new(n);
        for &x in requested {
            r.set(PageIdx(x));
        }
        let mut out = vec![];
        let f: Vec<_> = faults.iter().map(|&x| PageIdx(x)).collect();
        let added = plan(&f, pf, |q| p.get(q), &mut r, &mut out);
        assert_eq!(added, out.iter().map(|r| r.n_pages).sum::<u64>());
        // Everything planned is now requested, and nothing present was planned.
        for rg in &out {
            for q in rg.first.0..rg.end() {
                assert!(r.get(PageIdx(q)) && !p.get(PageIdx(q)));
            }
        }
        out.iter().map(|r| (r.first.0, r.n_pages)).collect()
    }

    const ONE: Prefetch = Prefetch { pages: 1, mode: PrefetchMode::After };

    #[test]
    fn faults_first_deduplicated_and_merged() {
        assert_eq!(run(&[5, 6, 5, 9], ONE, &[], &[], 100), vec![(5, 2), (9, 1)]);
        assert_eq!(run(&[5, 6, 9], ONE, &[6], &[9], 100), vec![(5, 1)]);
        assert_eq!(run(&[5], ONE, &[5], &[], 100), vec![]);
    }

    #[test]
    fn prefetch_after_skips_present_and_requested() {
        let pf = Prefetch { pages: 8, mode: PrefetchMode::After };
        // Fault 10: 10 goes first; then 11..18 minus present 13 and requested 15.
        assert_eq!(run(&[10], pf, &[13], &[15], 100), vec![(10, 1), (11, 2), (14, 1), (16, 2)]);
        // Clipped at the end of the guest.
        assert_eq!(run(&[97], pf, &[], &[], 100), vec![(97, 1), (98, 2)]);
    }

    #[test]
    fn prefetch_around_and_overlapping_windows() {
        let pf = Prefetch { pages: 5, mode: PrefetchMode::Around };
        assert_eq!(run(&[10], pf, &[], &[], 100), vec![(10, 1), (8, 2), (11, 2)]);
        // Clipped at the start, the window keeps its size.
        assert_eq!(run(&[1], pf, &[], &[], 100), vec![(1, 1), (0, 1), (2, 3)]);
        // Two faults whose windows overlap: no page twice.
        let pf = Prefetch { pages: 4, mode: PrefetchMode::After };
        assert_eq!(run(&[10, 12], pf, &[], &[], 100), vec![(10, 1), (12, 1), (11, 1), (13, 3)]);
    }
}
