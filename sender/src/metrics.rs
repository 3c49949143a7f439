//! The sender's counters (relaxed atomics, read for progress and reports).

use std::sync::atomic::{AtomicU64, Ordering};

/// Source-side counters.
#[derive(Debug, Default)]
pub struct SenderMetrics {
    /// Range requests received.
    pub requests: AtomicU64,
    /// Pages sent in answer to requests.
    pub pages_demand: AtomicU64,
    /// Pages sent by the background push.
    pub pages_pushed: AtomicU64,
    /// Times the push started yielding the link to demand replies.
    pub push_yields: AtomicU64,
    /// Pages the guest's zero scan found reading as zero (never populated).
    pub pages_known_zero: AtomicU64,
    /// Pages sent as Zeros frames (all-zero runs, no data), of any kind.
    pub pages_zero: AtomicU64,
    /// Pages sent in precopy rounds.
    pub pages_precopy: AtomicU64,
    /// Times the push moved its cursor to a requested range.
    pub push_restarts: AtomicU64,
    /// Bytes written on both connections.
    pub bytes_sent: AtomicU64,
    /// First push frame to PushDone written, ns (0 until the push ends).
    pub push_ns: AtomicU64,
    /// Times a broken link was restored and the migration resumed.
    pub recoveries: AtomicU64,
    /// Time spent reconnecting, ns.
    pub paused_ns: AtomicU64,
    /// RDMA WRITEs of background runs into the destination's ring (data
    /// and header each count one).
    pub rdma_writes: AtomicU64,
    /// Bytes of page data they carried.
    pub rdma_write_bytes: AtomicU64,
    /// Completions polled for them.
    pub rdma_write_wc: AtomicU64,
    /// Ring slots the destination gave back.
    pub rdma_credits: AtomicU64,
}

impl SenderMetrics {
    /// Add to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    #[inline]
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
