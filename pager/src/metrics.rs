//! The pager's counters and latency records.
//!
//! Counters are relaxed atomics (read for progress lines and reports, never
//! for decisions). The fault-latency histogram and per-thread block time are
//! behind mutexes taken once per resolved fault, off the install fast path
//! when no fault waits on the installed pages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use proto::LatencyHist;

/// Destination-side counters.
#[derive(Debug, Default)]
pub struct PagerMetrics {
    /// Missing-page fault events read from userfaultfd.
    pub faults: AtomicU64,
    /// Fault events whose page was already installed when read.
    pub faults_resolved_early: AtomicU64,
    /// RangeRequest frames sent.
    pub requests: AtomicU64,
    /// Pages named in range requests (first requests and re-requests).
    pub pages_requested: AtomicU64,
    /// Pages re-requested after a timeout or after the push ended.
    pub pages_rerequested: AtomicU64,
    /// Pages installed from demand replies.
    pub pages_demand: AtomicU64,
    /// Pages installed from the background push.
    pub pages_push: AtomicU64,
    /// Pages installed from precopy rounds.
    pub pages_precopy: AtomicU64,
    /// Pages received that were already present (a push and a demand reply
    /// crossing, or a re-request answered twice).
    pub pages_duplicate: AtomicU64,
    /// Pages the source said it pushed that never arrived by push.
    pub pages_push_lost: AtomicU64,
    /// Outstanding pages dropped at switchover because precopy had sent an
    /// older copy.
    pub pages_evicted: AtomicU64,
    /// Pages held from precopy (shared memory) mapped after switchover,
    /// without a network round trip.
    pub pages_mapped_local: AtomicU64,
    /// Faults on held pages, served by mapping them on the spot.
    pub faults_local: AtomicU64,
    /// Pages present in guest memory.
    pub pages_present: AtomicU64,
    /// Install calls the kernel asked to retry.
    pub install_retries: AtomicU64,
    /// Bytes received on both connections.
    pub bytes_received: AtomicU64,
    /// Fault event read to page installed, per fault served over the network.
    pub fault_latency: Mutex<LatencyHist>,
    /// The same for faults on pages held here, mapped without a round trip.
    pub fault_latency_local: Mutex<LatencyHist>,
    /// Total time each faulting thread (by tid) spent waiting, in ns.
    pub blocktime_ns: Mutex<BTreeMap<u32, u64>>,
}

impl PagerMetrics {
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
