//! The pager's counters and latency records.
//!
//! Counters are relaxed atomics (read for progress lines and reports, never
//! for decisions). The fault-latency histogram and per-thread block time are
//! behind mutexes taken once per resolved fault, off the install fast path
//! when no fault waits on the installed pages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;
use proto::LatencyHist;

/// Where a destination run is, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for the source's hello.
    Handshake = 0,
    /// Memory ready; receiving precopy rounds or waiting for switchover.
    Precopy = 1,
    /// The guest is paused: evicting, restoring.
    Switchover = 2,
    /// The guest runs here; outstanding pages arrive.
    Postcopy = 3,
    /// Every page is present.
    Done = 4,
    /// The link to the source broke after switchover: the guest runs,
    /// faults wait, the destination waits for the source to reconnect.
    Paused = 5,
}

impl Phase {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "postcopy",
            Phase::Done => "done",
            Phase::Paused => "paused",
        }
    }
}

/// Destination-side counters.
#[derive(Debug, Default)]
pub struct PagerMetrics {
    /// The current [`Phase`].
    pub phase: AtomicU8,
    /// Pages in the guest (0 until the hello is accepted).
    pub pages_total: AtomicU64,
    /// Missing-page fault events read from userfaultfd.
    pub faults: AtomicU64,
    /// Other userfaultfd events read (REMOVE, UNMAP, REMAP, FORK): none is
    /// enabled on a descriptor the engine creates.
    pub events_other: AtomicU64,
    /// Pages that arrived as Zeros frames (all-zero runs without data).
    pub pages_zero: AtomicU64,
    /// Pages the guest's owner dropped (REMOVE events: a balloon).
    pub pages_removed: AtomicU64,
    /// Faults on dropped pages, answered with zeros.
    pub faults_zero: AtomicU64,
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
    /// Fault-thread installs put off until a pending REMOVE was read.
    pub install_deferred: AtomicU64,
    /// Install calls the kernel asked to retry.
    pub install_retries: AtomicU64,
    /// Bytes received on both connections.
    pub bytes_received: AtomicU64,
    /// Times the source reconnected after a broken link and the migration resumed.
    pub recoveries: AtomicU64,
    /// Time spent paused (link broken, waiting for the source), ns.
    pub paused_ns: AtomicU64,
    /// RDMA READs posted for demand, their bytes, their polled completions.
    pub rdma_demand_reads: AtomicU64,
    /// Bytes of those READs.
    pub rdma_demand_bytes: AtomicU64,
    /// Completions polled for them.
    pub rdma_demand_wc: AtomicU64,
    /// RDMA READs posted for the background.
    pub rdma_bg_reads: AtomicU64,
    /// Bytes of those READs.
    pub rdma_bg_bytes: AtomicU64,
    /// Completions polled for them (one per group of READs).
    pub rdma_bg_wc: AtomicU64,
    /// Ring slots the source wrote and this side installed (`--rdma-background write`).
    pub rdma_ring_receives: AtomicU64,
    /// Bulk connections (push streams) on the first link.
    pub push_streams: AtomicU64,
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

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Handshake,
            1 => Phase::Precopy,
            2 => Phase::Switchover,
            3 => Phase::Postcopy,
            5 => Phase::Paused,
            _ => Phase::Done,
        }
    }

    /// Enter `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
}
