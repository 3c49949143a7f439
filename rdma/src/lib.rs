//! RDMA for postcopy: the verbs the engine needs behind a small interface
//! ([`verbs`]), a software device that behaves like a NIC across processes
//! ([`sim`]), the engine's guards for what a NIC leaves to its user
//! ([`queue`]), the setup exchanged over the control connection
//! ([`setup`]), and with feature `rdma` the real device ([`hw`]).

pub mod queue;
pub mod setup;
pub mod sim;
pub mod verbs;

#[cfg(feature = "rdma")]
pub mod hw;

pub use verbs::{
    Access, Completion, Device, Endpoint, MemoryRegion, Op, QpCaps, QueuePair, RecvWr, Remote, SendWr, Sge, VerbsError,
    WcOp, WcStatus,
};

use std::sync::Arc;

/// What a side was told about RDMA on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `sim`, a device name, or empty for the first device.
    pub device: String,
    /// The software device's delay before each request, at most (us).
    pub sim_delay_us: u32,
    /// Seed of those delays.
    pub seed: u64,
    /// The destination has the source WRITE the background into its
    /// staging ring, instead of reading it.
    pub write_background: bool,
}

impl Config {
    /// Open the device, its queue pairs listening on `bind` (the software
    /// device's; a real one ignores it).
    pub fn open(&self, bind: std::net::IpAddr) -> Result<Arc<dyn Device>, VerbsError> {
        if self.device == "sim" {
            return Ok(sim::SimDevice::open(bind, sim::SimConfig { seed: self.seed, max_delay_us: self.sim_delay_us }));
        }
        #[cfg(feature = "rdma")]
        {
            let name = &self.device;
            Ok(hw::open(if name.is_empty() || name == "any" { None } else { Some(name.as_str()) })?)
        }
        #[cfg(not(feature = "rdma"))]
        {
            Err(VerbsError::NoDevice {
                name: Some(self.device.clone()),
                why: "this build has no libibverbs support (build with --features rdma); only the software device \
                      `sim` is available"
                    .into(),
            })
        }
    }
}
