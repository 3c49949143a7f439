//! Latency histograms (HdrHistogram, nanoseconds, 3 significant digits) and
//! their summaries in microseconds.
//!
//! Recording never fails: values above the range are clamped to its top, so a
//! single absurd sample cannot make a run lose its figures.

use hdrhistogram::Histogram;

/// Largest value recorded exactly: 100 s.
const MAX_NS: u64 = 100_000_000_000;

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist::new()
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHist { h: Histogram::new_with_bounds(1, MAX_NS, 3).expect("static bounds are valid") }
    }

    /// Record one latency.
    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        self.h.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Record `count` samples of the same latency.
    pub fn record_n_ns(&mut self, ns: u64, count: u64) {
        // Cannot fail: the value is clamped into range and counts saturate.
        let _ = self.h.record_n(ns.clamp(1, MAX_NS), count);
    }

    /// Add another histogram's samples.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Value at quantile `q` (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        ns_to_us(self.h.value_at_quantile(q))
    }

    /// The summary used in reports.
    pub fn summary(&self) -> LatencySummary {
        if self.h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.h.len(),
            p50: self.quantile_us(0.50),
            p90: self.quantile_us(0.90),
            p99: self.quantile_us(0.99),
            p999: self.quantile_us(0.999),
            max: ns_to_us(self.h.max()),
            mean: self.h.mean() / 1000.0,
        }
    }

    /// The recorded distribution as (value_ns, count) pairs, ascending: a
    /// compact, lossless form for reports (equal-value buckets of the histogram).
    pub fn to_buckets(&self) -> Vec<(u64, u64)> {
        self.h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
    }

    /// Rebuild from [`LatencyHist::to_buckets`] output.
    pub fn from_buckets(buckets: &[(u64, u64)]) -> Self {
        let mut h = LatencyHist::new();
        for &(v, c) in buckets {
            h.record_n_ns(v, c);
        }
        h
    }
}

/// Nanoseconds to microseconds for reports.
#[inline]
pub fn ns_to_us(ns: u64) -> f64 {
    // Exact for every latency below 2^53 ns (104 days).
    #[allow(clippy::cast_precision_loss)]
    let v = ns as f64;
    v / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHist::new();
        // 1..=1000 us, one sample each.
        for us in 1..=1000u64 {
            h.record_ns(us * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        // Three significant digits: within 0.1%.
        assert!((s.p50 - 500.0).abs() <= 0.6, "p50 {}", s.p50);
        assert!((s.p90 - 900.0).abs() <= 1.0, "p90 {}", s.p90);
        assert!((s.p99 - 990.0).abs() <= 1.0, "p99 {}", s.p99);
        assert!((s.max - 1000.0).abs() <= 1.0, "max {}", s.max);
        assert!((s.mean - 500.5).abs() <= 0.6, "mean {}", s.mean);
    }

    #[test]
    fn empty_and_out_of_range() {
        assert_eq!(LatencyHist::new().summary(), LatencySummary::default());
        let mut h = LatencyHist::new();
        h.record_ns(0);
        h.record_ns(u64::MAX);
        assert_eq!(h.count(), 2);
        assert!(h.summary().max >= 99_000_000.0);
    }

    #[test]
    fn buckets_round_trip_and_merge() {
        let mut a = LatencyHist::new();
        for v in [1_000, 2_000, 2_000, 50_000, 1_000_000] {
            a.record_ns(v);
        }
        let b = LatencyHist::from_buckets(&a.to_buckets());
        assert_eq!(a.summary(), b.summary());
        let mut c = a.clone();
        c.merge(&b);
        assert_eq!(c.count(), 10);
        assert_eq!(c.summary().p50, a.summary().p50);
    }
}
