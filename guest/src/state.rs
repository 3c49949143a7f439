//! The workload guest's migratable state and its byte encoding.
//!
//! Layout (little-endian), version 1:
//!
//! ```text
//! magic u32 "WKLD", version u16, n_vcpus u16,
//! pattern_kind u8 (1 uniform, 2 sequential, 3 hotset, 4 zipf), reserved [7],
//! pattern_a u64 (hot bytes), pattern_b f64 (hot fraction or zipf theta),
//! zipf_zetan f64 (0 unless zipf), store_ratio f64, seed u64,
//! stall_threshold_ns u64, access_rate u64, table_pages u64, n_pages u64,
//! n_vcpus x { rng [u64; 4], cursor u64, accesses u64, loads u64, stores u64,
//!             violations u64, stalls u64 }
//! ```
//!
//! Decoding checks every field's domain: a state from a peer is input.

use crate::pattern::Pattern;

/// "WKLD".
const MAGIC: u32 = u32::from_le_bytes(*b"WKLD");
const VERSION: u16 = 2;
const HEADER_LEN: usize = 4 + 2 + 2 + 8 + 8 + 8 + 8 + 8 + 8 + 8 + 8 + 8 + 8 + 8;
const VCPU_LEN: usize = 8 * 10;
/// Most vCPUs a workload may have.
pub const MAX_VCPUS: u32 = 1024;

/// One vCPU's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// Generator state.
    pub rng: [u64; 4],
    /// Sequential-pattern cursor.
    pub cursor: u64,
    /// Accesses so far (loads + stores), both hosts.
    pub accesses: u64,
    /// Loads so far.
    pub loads: u64,
    /// Stores so far.
    pub stores: u64,
    /// Violations seen so far.
    pub violations: u64,
    /// Accesses that stalled past the threshold.
    pub stalls: u64,
}

/// The guest's configuration, which travels with its state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkloadConfig {
    /// Number of vCPU threads.
    pub vcpus: u32,
    /// Access pattern.
    pub pattern: Pattern,
    /// Share of accesses that are stores.
    pub store_ratio: f64,
    /// Seed of the generators.
    pub seed: u64,
    /// An access slower than this counts as a stall.
    pub stall_threshold_ns: u64,
    /// Accesses per second per vCPU; 0 runs flat out. A rate-limited vCPU
    /// sleeps between accesses, like a guest that is not always busy.
    pub access_rate: u64,
    /// Share of memory the guest ever touches (0 < touch <= 1): the first
    /// pages, the version table's included; the rest is never written and
    /// must read as zeros (real guests leave much memory untouched).
    pub touch: f64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            vcpus: 1,
            pattern: Pattern::Uniform,
            store_ratio: 0.75,
            seed: 1,
            stall_threshold_ns: 5_000,
            access_rate: 0,
            touch: 1.0,
        }
    }
}

/// The whole migratable state.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadState {
    /// Configuration.
    pub config: WorkloadConfig,
    /// Zipf normalisation constant, carried so the destination does not spend
    /// downtime recomputing it (0 for other patterns).
    pub zipf_zetan: f64,
    /// Version-table pages.
    pub table_pages: u64,
    /// Pages in the guest (cross-checked against the layout).
    pub n_pages: u64,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
}

/// Why a state blob was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Too short.
    #[error("workload state truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not a workload state.
    #[error("not a workload state (magic {0:#010x})")]
    Magic(u32),
    /// Unknown encoding version.
    #[error("workload state version {0} not supported (this build reads 2)")]
    Version(u16),
    /// A field outside its domain.
    #[error("workload state has invalid {0}")]
    Invalid(&'static str),
}

fn f64_ok(v: f64, lo: f64, hi: f64) -> bool {
    v.is_finite() && v >= lo && v <= hi
}

impl WorkloadState {
    /// Total stores over the guest's life.
    pub fn total_stores(&self) -> u64 {
        self.vcpus.iter().map(|v| v.stores).sum()
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + VCPU_LEN * self.vcpus.len());
        let c = &self.config;
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&u16::try_from(self.vcpus.len()).expect("bounded by MAX_VCPUS").to_le_bytes());
        let (kind, a, b) = match c.pattern {
            Pattern::Uniform => (1u8, 0u64, 0f64),
            Pattern::Sequential => (2, 0, 0.0),
            Pattern::Hotset { bytes, fraction } => (3, bytes, fraction),
            Pattern::Zipf { theta } => (4, 0, theta),
        };
        out.push(kind);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_bits().to_le_bytes());
        out.extend_from_slice(&self.zipf_zetan.to_bits().to_le_bytes());
        out.extend_from_slice(&c.store_ratio.to_bits().to_le_bytes());
        out.extend_from_slice(&c.seed.to_le_bytes());
        out.extend_from_slice(&c.stall_threshold_ns.to_le_bytes());
        out.extend_from_slice(&c.access_rate.to_le_bytes());
        out.extend_from_slice(&self.table_pages.to_le_bytes());
        out.extend_from_slice(&self.n_pages.to_le_bytes());
        out.extend_from_slice(&c.touch.to_bits().to_le_bytes());
        for v in &self.vcpus {
            for x in v.rng.iter().chain(&[v.cursor, v.accesses, v.loads, v.stores, v.violations, v.stalls]) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Decode and validate.
    pub fn decode(b: &[u8]) -> Result<WorkloadState, StateError> {
        if b.len() < HEADER_LEN {
            return Err(StateError::Truncated { need: HEADER_LEN, have: b.len() });
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let f64_at = |o: usize| f64::from_bits(u64_at(o));
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let n = u16::from_le_bytes([b[6], b[7]]);
        if n == 0 || u32::from(n) > MAX_VCPUS {
            return Err(StateError::Invalid("vCPU count"));
        }
        let need = HEADER_LEN + VCPU_LEN * usize::from(n);
        if b.len() != need {
            return Err(StateError::Truncated { need, have: b.len() });
        }
        if b[9..16] != [0; 7] {
            return Err(StateError::Invalid("reserved bytes"));
        }
        let (a, pb) = (u64_at(16), f64_at(24));
        let pattern = match b[8] {
            1 => Pattern::Uniform,
            2 => Pattern::Sequential,
            3 if a > 0 && f64_ok(pb, 0.0, 1.0) => Pattern::Hotset { bytes: a, fraction: pb },
            4 if pb > 0.0 && pb < 1.0 => Pattern::Zipf { theta: pb },
            _ => return Err(StateError::Invalid("pattern")),
        };
        let zipf_zetan = f64_at(32);
        if matches!(pattern, Pattern::Zipf { .. }) && !(zipf_zetan.is_finite() && zipf_zetan >= 1.0) {
            return Err(StateError::Invalid("zipf constant"));
        }
        let store_ratio = f64_at(40);
        if !f64_ok(store_ratio, 0.0, 1.0) {
            return Err(StateError::Invalid("store ratio"));
        }
        let config = WorkloadConfig {
            vcpus: u32::from(n),
            pattern,
            store_ratio,
            seed: u64_at(48),
            stall_threshold_ns: u64_at(56),
            access_rate: u64_at(64),
            touch: f64_at(88),
        };
        if !(config.touch.is_finite() && config.touch > 0.0 && config.touch <= 1.0) {
            return Err(StateError::Invalid("touch fraction"));
        }
        let table_pages = u64_at(72);
        let n_pages = u64_at(80);
        if table_pages == 0 || table_pages >= n_pages {
            return Err(StateError::Invalid("table size"));
        }
        let vcpus = (0..usize::from(n))
            .map(|i| {
                let o = HEADER_LEN + i * VCPU_LEN;
                let w = |k: usize| u64_at(o + 8 * k);
                VcpuState {
                    rng: [w(0), w(1), w(2), w(3)],
                    cursor: w(4),
                    accesses: w(5),
                    loads: w(6),
                    stores: w(7),
                    violations: w(8),
                    stalls: w(9),
                }
            })
            .collect();
        Ok(WorkloadState { config, zipf_zetan, table_pages, n_pages, vcpus })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(pattern: Pattern, n: usize) -> WorkloadState {
        WorkloadState {
            config: WorkloadConfig {
                vcpus: u32::try_from(n).unwrap(),
                pattern,
                store_ratio: 0.5,
                seed: 9,
                stall_threshold_ns: 1000,
                access_rate: 77,
                touch: 0.5,
            },
            zipf_zetan: if matches!(pattern, Pattern::Zipf { .. }) { 12.5 } else { 0.0 },
            table_pages: 3,
            n_pages: 1000,
            vcpus: (0..n as u64)
                .map(|i| VcpuState {
                    rng: [i, 2, 3, 4],
                    cursor: i,
                    accesses: 10,
                    loads: 4,
                    stores: 6,
                    violations: 0,
                    stalls: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_every_pattern() {
        for p in [
            Pattern::Uniform,
            Pattern::Sequential,
            Pattern::Hotset { bytes: 1 << 20, fraction: 0.9 },
            Pattern::Zipf { theta: 0.99 },
        ] {
            let s = sample(p, 3);
            assert_eq!(WorkloadState::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn rejects_bad_states() {
        let good = sample(Pattern::Uniform, 2).encode();
        for cut in 0..good.len() {
            assert!(WorkloadState::decode(&good[..cut]).is_err());
        }
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(WorkloadState::decode(&b), Err(StateError::Magic(_))));
        let mut b = good.clone();
        b[6] = 0;
        b[7] = 0;
        assert!(WorkloadState::decode(&b).is_err());
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(WorkloadState::decode(&b), Err(StateError::Invalid("pattern")));
        let mut b = good.clone();
        b[40..48].copy_from_slice(&f64::NAN.to_bits().to_le_bytes());
        assert_eq!(WorkloadState::decode(&b), Err(StateError::Invalid("store ratio")));
        let mut b = good;
        b[72..80].copy_from_slice(&5000u64.to_le_bytes());
        assert_eq!(WorkloadState::decode(&b), Err(StateError::Invalid("table size")));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = WorkloadState::decode(&bytes);
        }
    }
}
