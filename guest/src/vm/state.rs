//! The VM guest's migratable state and its byte encoding.
//!
//! Layout (little-endian), version 1:
//!
//! ```text
//! magic u32 "VMST", version u16, n_vcpus u16,
//! active_pages u64, store_threshold u32, heartbeat_ms u32, seed u64,
//! n_pages u64, data_first u64,
//! n_vcpus x { kvm_regs, kvm_sregs, kvm_xsave, kvm_xcrs, kvm_vcpu_events,
//!             kvm_mp_state, kvm_debugregs   (each its exact kernel size),
//!             n_msrs u32, n_msrs x (index u32, reserved u32, data u64) }
//! ```
//!
//! KVM structs go through `zerocopy` (kvm-bindings derives it; their padding
//! is explicit), so encoding and decoding need no unsafe. A state from a peer
//! is input: lengths and counts are checked, and KVM itself rejects register
//! values it cannot load when the state is restored.

use kvm_bindings::{kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use zerocopy::{FromBytes, IntoBytes};

use crate::vm::boot::MAX_VCPUS;

const MAGIC: u32 = u32::from_le_bytes(*b"VMST");
const VERSION: u16 = 1;
const HEADER_LEN: usize = 4 + 2 + 2 + 8 + 4 + 4 + 8 + 8 + 8;
/// Most MSRs per vCPU.
const MAX_MSRS: u32 = 256;

/// What the guest program does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Data pages the program touches (from the first data page); 0 = all.
    pub active_pages: u64,
    /// A store when the generator's low 16 bits are below this (store ratio x 65536).
    pub store_threshold: u32,
    /// Time between heartbeats on the console.
    pub heartbeat_ms: u32,
    /// Seed of the vCPUs' generators.
    pub seed: u64,
}

/// One vCPU's registers and state, as KVM reports them.
pub struct VcpuSnapshot {
    /// General registers (the program's counters and generator live here).
    pub regs: kvm_regs,
    /// Segments, control registers, EFER.
    pub sregs: kvm_sregs,
    /// FPU/SSE state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Pending exceptions and interrupts.
    pub events: kvm_vcpu_events,
    /// Run state.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Model-specific registers (index, value); the TSC among them.
    pub msrs: Vec<(u32, u64)>,
}

impl Clone for VcpuSnapshot {
    fn clone(&self) -> Self {
        VcpuSnapshot {
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave ends in a zero-length array, so it is not Clone; its
            // bytes are its whole value.
            xsave: kvm_xsave::read_from_bytes(self.xsave.as_bytes()).expect("same size"),
            xcrs: self.xcrs,
            events: self.events,
            mp_state: self.mp_state,
            debugregs: self.debugregs,
            msrs: self.msrs.clone(),
        }
    }
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The whole migratable state.
#[derive(Clone, Debug)]
pub struct VmState {
    /// The program's configuration.
    pub config: VmConfig,
    /// Pages of guest memory (cross-checked against the layout).
    pub n_pages: u64,
    /// First data page.
    pub data_first: u64,
    /// One snapshot per vCPU.
    pub vcpus: Vec<VcpuSnapshot>,
}

/// Why a VM state blob was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmStateError {
    /// Too short or too long.
    #[error("VM state is {have} bytes where {need} were expected")]
    Length {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not a VM state.
    #[error("not a VM state (magic {0:#010x})")]
    Magic(u32),
    /// Unknown encoding version.
    #[error("VM state version {0} not supported (this build reads 1)")]
    Version(u16),
    /// A field outside its domain.
    #[error("VM state has invalid {0}")]
    Invalid(&'static str),
}

fn snapshot_len(n_msrs: usize) -> usize {
    size_of::<kvm_regs>()
        + size_of::<kvm_sregs>()
        + size_of::<kvm_xsave>()
        + size_of::<kvm_xcrs>()
        + size_of::<kvm_vcpu_events>()
        + size_of::<kvm_mp_state>()
        + size_of::<kvm_debugregs>()
        + 4
        + 16 * n_msrs
}

/// A cursor that takes exact-size pieces, failing on a short buffer.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VmStateError> {
        if self.b.len() - self.at < n {
            return Err(VmStateError::Length { need: self.at + n, have: self.b.len() });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, VmStateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn u32(&mut self) -> Result<u32, VmStateError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn kvm<T: FromBytes>(&mut self) -> Result<T, VmStateError> {
        let b = self.take(size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| VmStateError::Invalid("register block"))
    }
}

impl VmState {
    /// Total stores over the guest's life (the program counts them in rbp).
    pub fn total_stores(&self) -> u64 {
        self.vcpus.iter().map(|v| v.regs.rbp).sum()
    }

    /// Total accesses (r14).
    pub fn total_accesses(&self) -> u64 {
        self.vcpus.iter().map(|v| v.regs.r14).sum()
    }

    /// Total violations (r15).
    pub fn total_violations(&self) -> u64 {
        self.vcpus.iter().map(|v| v.regs.r15).sum()
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let c = &self.config;
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.vcpus.iter().map(|v| snapshot_len(v.msrs.len())).sum::<usize>());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&u16::try_from(self.vcpus.len()).expect("bounded by MAX_VCPUS").to_le_bytes());
        out.extend_from_slice(&c.active_pages.to_le_bytes());
        out.extend_from_slice(&c.store_threshold.to_le_bytes());
        out.extend_from_slice(&c.heartbeat_ms.to_le_bytes());
        out.extend_from_slice(&c.seed.to_le_bytes());
        out.extend_from_slice(&self.n_pages.to_le_bytes());
        out.extend_from_slice(&self.data_first.to_le_bytes());
        for v in &self.vcpus {
            out.extend_from_slice(v.regs.as_bytes());
            out.extend_from_slice(v.sregs.as_bytes());
            out.extend_from_slice(v.xsave.as_bytes());
            out.extend_from_slice(v.xcrs.as_bytes());
            out.extend_from_slice(v.events.as_bytes());
            out.extend_from_slice(v.mp_state.as_bytes());
            out.extend_from_slice(v.debugregs.as_bytes());
            out.extend_from_slice(&u32::try_from(v.msrs.len()).expect("bounded by MAX_MSRS").to_le_bytes());
            for &(index, data) in &v.msrs {
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&data.to_le_bytes());
            }
        }
        out
    }

    /// Decode and check.
    pub fn decode(b: &[u8]) -> Result<VmState, VmStateError> {
        let mut rd = Rd { b, at: 0 };
        let head = rd.take(8)?;
        let magic = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(VmStateError::Magic(magic));
        }
        let version = u16::from_le_bytes([head[4], head[5]]);
        if version != VERSION {
            return Err(VmStateError::Version(version));
        }
        let n = u16::from_le_bytes([head[6], head[7]]);
        if n == 0 || u32::from(n) > MAX_VCPUS {
            return Err(VmStateError::Invalid("vCPU count"));
        }
        let active_pages = rd.u64()?;
        let store_threshold = rd.u32()?;
        if store_threshold > 65536 {
            return Err(VmStateError::Invalid("store threshold"));
        }
        let heartbeat_ms = rd.u32()?;
        let seed = rd.u64()?;
        let n_pages = rd.u64()?;
        let data_first = rd.u64()?;
        if data_first >= n_pages || active_pages > n_pages - data_first {
            return Err(VmStateError::Invalid("memory layout"));
        }
        let mut vcpus = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let regs = rd.kvm::<kvm_regs>()?;
            let sregs = rd.kvm::<kvm_sregs>()?;
            let xsave = rd.kvm::<kvm_xsave>()?;
            let xcrs = rd.kvm::<kvm_xcrs>()?;
            let events = rd.kvm::<kvm_vcpu_events>()?;
            let mp_state = rd.kvm::<kvm_mp_state>()?;
            let debugregs = rd.kvm::<kvm_debugregs>()?;
            let n_msrs = rd.u32()?;
            if n_msrs > MAX_MSRS {
                return Err(VmStateError::Invalid("MSR count"));
            }
            let mut msrs = Vec::with_capacity(n_msrs as usize);
            for _ in 0..n_msrs {
                let index = rd.u32()?;
                let _reserved = rd.u32()?;
                msrs.push((index, rd.u64()?));
            }
            vcpus.push(VcpuSnapshot { regs, sregs, xsave, xcrs, events, mp_state, debugregs, msrs });
        }
        if rd.at != b.len() {
            return Err(VmStateError::Length { need: rd.at, have: b.len() });
        }
        let config = VmConfig { vcpus: u32::from(n), active_pages, store_threshold, heartbeat_ms, seed };
        Ok(VmState { config, n_pages, data_first, vcpus })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let regs = kvm_regs { rip: 0x88000, rbp: 42, ..Default::default() };
        let v = VcpuSnapshot {
            regs,
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
            msrs: vec![(0x10, 123_456), (0x277, 7)],
        };
        VmState {
            config: VmConfig { vcpus: 2, active_pages: 100, store_threshold: 49152, heartbeat_ms: 50, seed: 9 },
            n_pages: 4096,
            data_first: 300,
            vcpus: vec![v.clone(), v],
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let s = sample();
        let b = s.encode();
        let d = VmState::decode(&b).unwrap();
        assert_eq!(d.config, s.config);
        assert_eq!(d.total_stores(), 84);
        assert_eq!(d.vcpus[1].msrs, s.vcpus[1].msrs);
        assert_eq!(d.vcpus[0].regs.rip, 0x88000);
        assert_eq!(d.encode(), b);
        for cut in [0, 7, 30, b.len() - 1] {
            assert!(VmState::decode(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(VmState::decode(&long), Err(VmStateError::Length { .. })));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(VmState::decode(&bad), Err(VmStateError::Magic(_))));
        let mut bad = b;
        bad[6] = 0;
        bad[7] = 0;
        assert_eq!(VmState::decode(&bad).unwrap_err(), VmStateError::Invalid("vCPU count"));
    }
}
