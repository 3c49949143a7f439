//! How the destination behaves: timeouts, prefetch, recovery, priorities.

use std::time::Duration;

use proto::session::DestExpect;

use crate::planner::Prefetch;

/// How the destination behaves.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Pages asked for per fault; `None` takes what the source asked for
    /// (and the default if it asked for nothing).
    pub prefetch: Option<Prefetch>,
    /// What the source must offer.
    pub expect: DestExpect,
    /// Longest wait for the hello and the bulk connection.
    pub handshake_timeout: Duration,
    /// The source is presumed dead after this long without a byte.
    pub peer_timeout: Duration,
    /// Send a keep-alive when idle this long.
    pub keepalive: Duration,
    /// Ask again for pages whose reply has not come after this long.
    pub retry_after: Duration,
    /// After switchover, how long a broken link may stay broken before the
    /// destination gives up (zero: no recovery, a broken link ends the run).
    pub recover_timeout: Duration,
    /// Nice value of the bulk receiver and the page mapper (see
    /// `transport::sched`); `None` picks by mode (see [`default_nice`]).
    pub background_nice: Option<i32>,
    /// Post-copy pages come by RDMA through this device (this side reads
    /// them); `None`: TCP.
    pub rdma: Option<rdma::Config>,
    /// Bytes of background READs in flight at most.
    pub rdma_window: u64,
    /// Whether the background READs yield to demand while the guest
    /// faults; `None`: yes, except over loopback (no bottleneck to share).
    pub rdma_yield: Option<bool>,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            prefetch: None,
            expect: DestExpect::default(),
            handshake_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            keepalive: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            recover_timeout: Duration::from_secs(300),
            background_nice: None,
            rdma: None,
            rdma_window: 4 << 20,
            rdma_yield: None,
        }
    }
}

impl PagerConfig {
    /// Longest wait for one step of a reconnecting source's handshake
    /// (while it runs, the fault loop reads no faults).
    pub(crate) fn resume_step_timeout(&self) -> Duration {
        self.handshake_timeout.min(Duration::from_secs(5))
    }

    /// How long a destination that sent Complete waits for a source that
    /// lost the link to come back and acknowledge it. Every page is here
    /// already, so waiting longer only delays the report.
    pub(crate) fn completion_grace(&self) -> Duration {
        self.recover_timeout.min((2 * self.peer_timeout).max(Duration::from_secs(5)))
    }
}

/// The bulk threads' nice value when none is configured. Measured here (two
/// CPUs): in hybrid and precopy modes the guest runs flat out next to the
/// push, its receiver and the page mapper, and a demand-path thread sometimes
/// waits out a CPU-bound thread's slice: fault p99 1.1-3.3 ms at nice 0,
/// 85-152 us at nice 10. In pure postcopy the vCPU mostly waits on faults,
/// and nice 10 made p99 worse (84-235 us against 64-67 us), so it stays 0.
pub fn default_nice(mode: proto::wire::Mode) -> i32 {
    match mode {
        proto::wire::Mode::Postcopy => 0,
        proto::wire::Mode::Hybrid | proto::wire::Mode::Precopy => 10,
    }
}
