//! How the source behaves: mode, timeouts, push, recovery, priorities.

use std::time::Duration;

use proto::wire::Mode;

use crate::precopy::Policy;

/// How the source behaves.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Migration mode.
    pub mode: Mode,
    /// Pre-shared key for the hello.
    pub key: Option<Vec<u8>>,
    /// Prefetch window to ask the destination for (0: it decides).
    pub prefetch_pages: u32,
    /// Whether that window is centered on the fault.
    pub prefetch_around: bool,
    /// Pages per background push frame.
    pub push_run_pages: u32,
    /// Longest wait for the destination's hello and acknowledgements.
    pub handshake_timeout: Duration,
    /// The destination is presumed dead after this long without a byte.
    pub peer_timeout: Duration,
    /// Send a keep-alive when idle this long.
    pub keepalive: Duration,
    /// How long the vCPUs may take to pause.
    pub pause_timeout: Duration,
    /// After the switchover is sent, how long to keep reconnecting a broken
    /// link before giving up (zero: no recovery, a broken link ends the run).
    pub recover_timeout: Duration,
    /// When to leave precopy (hybrid and precopy modes).
    pub policy: Policy,
    /// Nice value of the pusher (see `transport::sched`); `None` picks by
    /// mode: 10 in hybrid and precopy, 0 in pure postcopy (the destination's
    /// `pager::default_nice` says why).
    pub background_nice: Option<i32>,
    /// While the guest faults, pace the push at this share of the bandwidth
    /// the bulk connection measured, so demand replies do not queue behind
    /// it at the bottleneck (1.0: never yield).
    pub push_yield: f64,
    /// The bulk connection's fixed pacing (`--push-rate`), bytes/s, if any:
    /// the push never goes faster.
    pub push_rate: Option<u64>,
    /// Bulk connections the push uses, each with its own pusher over a
    /// stripe of the pages (1 to 8).
    pub push_streams: u32,
    /// Post-copy pages move by RDMA through this device (the destination
    /// reads them); `None`: TCP.
    pub rdma: Option<rdma::Config>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            mode: Mode::Postcopy,
            key: None,
            prefetch_pages: 0,
            prefetch_around: false,
            push_run_pages: 256,
            handshake_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            keepalive: Duration::from_millis(250),
            pause_timeout: Duration::from_secs(5),
            recover_timeout: Duration::from_secs(300),
            policy: Policy::default(),
            background_nice: None,
            push_yield: 1.0,
            push_rate: None,
            rdma: None,
            push_streams: 1,
        }
    }
}

impl SenderConfig {
    /// Pages per push or precopy frame for pages of `page_size`: the
    /// configured run, at most what one frame may carry (8 MiB: four 2 MiB
    /// pages).
    pub fn run_pages(&self, page_size: proto::PageSize) -> u64 {
        let most = (proto::wire::MAX_RUN_BYTES / page_size.bytes()).max(1);
        u64::from(self.push_run_pages.max(1)).min(most)
    }
}
