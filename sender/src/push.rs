//! The background push: every outstanding page not yet sent, in runs, on the
//! bulk connection, restarting just after the last requested range.
//!
//! The pusher owns `pushed` alone; the demand thread owns `served` and the
//! restart `hint`. A page is pushed if neither bit is set when the pusher
//! scans it; a page served on demand meanwhile goes twice, which the
//! destination absorbs (EEXIST). Sends block only on the bulk socket, whose
//! unsent queue is kept small (TCP_NOTSENT_LOWAT), so the pusher looks at the
//! hint often.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proto::wire::{Msg, PageKind};
use proto::{AtomicPageBitmap, PageBitmap, PageIdx, PageRange};
use transport::Conn;

use crate::error::SenderError;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;

/// No restart requested.
pub(crate) const NO_HINT: u64 = u64::MAX;

pub(crate) struct Pusher {
    pub(crate) conn: Box<dyn Conn>,
    pub(crate) map: Arc<SourceMap>,
    /// Pages that need no push (sent in precopy and clean, or pushed).
    pub(crate) pushed: PageBitmap,
    pub(crate) served: Arc<AtomicPageBitmap>,
    pub(crate) hint: Arc<AtomicU64>,
    pub(crate) abort: Arc<AtomicBool>,
    pub(crate) run_pages: u64,
    pub(crate) metrics: Arc<SenderMetrics>,
}

impl Pusher {
    /// First run of pages in `[from, below)` neither pushed nor served, at most
    /// `run_pages` long.
    fn next_run(&self, from: u64, below: u64) -> Option<PageRange> {
        let words = self.pushed.words();
        let mut w = usize::try_from(from / 64).expect("fits");
        let end_w = usize::try_from(below.div_ceil(64)).expect("fits");
        let mut skip_below = from % 64;
        let mut first = None;
        while w < end_w {
            let busy = words[w] | self.served.load_word(w);
            let free = !busy & !((1u64 << skip_below) - 1);
            skip_below = 0;
            if free != 0 {
                let p = w as u64 * 64 + u64::from(free.trailing_zeros());
                if p < below {
                    first = Some(p);
                }
                break;
            }
            w += 1;
        }
        let first = first?;
        let limit = below.min(first + self.run_pages);
        let mut end = first + 1;
        while end < limit {
            let w = usize::try_from(end / 64).expect("fits");
            let busy = words[w] | self.served.load_word(w);
            if busy & (1u64 << (end % 64)) != 0 {
                break;
            }
            end += 1;
        }
        Some(PageRange::new(PageIdx(first), end - first))
    }

    /// Push until every page is pushed or served, then send PushDone.
    pub(crate) fn run(mut self) -> Result<u64, SenderError> {
        let n = self.pushed.len();
        let mut cursor = 0;
        let mut n_pushed = 0;
        let map = Arc::clone(&self.map);
        let mut sent_before = self.conn.bytes_sent();
        let started = std::time::Instant::now();
        loop {
            if self.abort.load(Ordering::Acquire) {
                return Ok(n_pushed);
            }
            let h = self.hint.swap(NO_HINT, Ordering::AcqRel);
            if h != NO_HINT && h < n {
                cursor = h;
                SenderMetrics::add(&self.metrics.push_restarts, 1);
            }
            let Some(run) = self.next_run(cursor, n).or_else(|| self.next_run(0, cursor.min(n))) else {
                break;
            };
            let zero = map.send_run(&mut *self.conn, run, PageKind::Push)?;
            SenderMetrics::add(&self.metrics.pages_zero, zero);
            self.pushed.set_range(run);
            n_pushed += run.n_pages;
            SenderMetrics::add(&self.metrics.pages_pushed, run.n_pages);
            let sent = self.conn.bytes_sent();
            SenderMetrics::add(&self.metrics.bytes_sent, sent - sent_before);
            sent_before = sent;
            cursor = run.end();
        }
        self.conn.send(&Msg::PushDone { n_pushed })?;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.metrics.push_ns.store(ns, Ordering::Relaxed);
        SenderMetrics::add(&self.metrics.bytes_sent, self.conn.bytes_sent() - sent_before);
        tracing::debug!(n_pushed, "push done");
        Ok(n_pushed)
    }
}
