//! Access patterns of the guests and the size syntax they share with the CLI.
//!
//! A pattern maps a generator (and per-vCPU cursor) to a data-page number in
//! `[0, n_data)`; the caller offsets it past the version table. Patterns are
//! pure: everything a pattern needs to continue after migration is in the
//! generator state, the cursor, and the constants recomputed (or carried) in
//! [`Sampler`].

use std::fmt;
use std::str::FromStr;

use crate::rng::Rng;

/// Why a pattern or size string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    /// Not a pattern name this build knows.
    #[error("unknown pattern {0:?} (expected uniform, sequential, hotset:SIZE[:FRACTION] or zipf:THETA)")]
    Unknown(String),
    /// A size did not parse.
    #[error("invalid size {0:?} (expected e.g. 4096, 64K, 256M, 1G, 1.5G)")]
    Size(String),
    /// A number is out of its domain.
    #[error("invalid {what} {value:?}: {why}")]
    Value {
        /// Which parameter.
        what: &'static str,
        /// The text given.
        value: String,
        /// The rule.
        why: &'static str,
    },
}

/// Parse a byte size: a number with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, PatternError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(PatternError::Size(s.to_string())),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let bad = || PatternError::Size(s.to_string());
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    #[allow(clippy::cast_precision_loss)]
    let v = f * mult as f64;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) {
        return Err(bad());
    }
    // Range-checked just above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v.round() as u64)
}

/// Format a byte size compactly (inverse of [`parse_size`] for exact multiples).
pub fn format_size(bytes: u64) -> String {
    for (suffix, m) in [("T", 1u64 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{suffix}", bytes / m);
        }
    }
    bytes.to_string()
}

/// How the guest picks pages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// Every data page equally likely.
    Uniform,
    /// Each vCPU walks its own slice of memory page after page, wrapping.
    Sequential,
    /// A `fraction` of accesses fall uniformly in the first `bytes` of data
    /// memory, the rest uniformly anywhere.
    Hotset {
        /// Size of the hot set.
        bytes: u64,
        /// Share of accesses that go to it (0..=1).
        fraction: f64,
    },
    /// Zipfian popularity with skew `theta` (0 < theta < 1), popular pages
    /// scattered over memory.
    Zipf {
        /// Skew.
        theta: f64,
    },
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Pattern, PatternError> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let unit = |what: &'static str, v: &str| -> Result<f64, PatternError> {
            let f: f64 = v.parse().map_err(|_| PatternError::Value { what, value: v.into(), why: "not a number" })?;
            Ok(f)
        };
        match (name, args.as_slice()) {
            ("uniform", []) => Ok(Pattern::Uniform),
            ("sequential", []) => Ok(Pattern::Sequential),
            ("hotset", [size]) | ("hotset", [size, _]) => {
                let bytes = parse_size(size)?;
                if bytes == 0 {
                    return Err(PatternError::Value {
                        what: "hot set size",
                        value: (*size).into(),
                        why: "must be > 0",
                    });
                }
                let fraction = if let [_, f] = args.as_slice() { unit("hot fraction", f)? } else { 1.0 };
                if !(0.0..=1.0).contains(&fraction) {
                    return Err(PatternError::Value {
                        what: "hot fraction",
                        value: args[1].into(),
                        why: "must be in 0..=1",
                    });
                }
                Ok(Pattern::Hotset { bytes, fraction })
            }
            ("zipf", [t]) => {
                let theta = unit("zipf theta", t)?;
                if !(theta > 0.0 && theta < 1.0) {
                    return Err(PatternError::Value {
                        what: "zipf theta",
                        value: (*t).into(),
                        why: "must be in (0, 1)",
                    });
                }
                Ok(Pattern::Zipf { theta })
            }
            _ => Err(PatternError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Uniform => f.write_str("uniform"),
            Pattern::Sequential => f.write_str("sequential"),
            Pattern::Hotset { bytes, fraction } if *fraction >= 1.0 => {
                write!(f, "hotset:{}", format_size(*bytes))
            }
            Pattern::Hotset { bytes, fraction } => {
                write!(f, "hotset:{}:{fraction}", format_size(*bytes))
            }
            Pattern::Zipf { theta } => write!(f, "zipf:{theta}"),
        }
    }
}

/// A pattern bound to a memory size, with its precomputed constants.
#[derive(Clone, Debug)]
pub struct Sampler {
    pattern: Pattern,
    n: u64,
    hot_pages: u64,
    zipf: Option<Zipf>,
}

/// YCSB's Zipfian generator (Gray et al., "Quickly generating billion-record
/// synthetic databases"), scrambled by a multiplication with a prime larger
/// than any page count, which permutes ranks over pages.
#[derive(Clone, Debug)]
struct Zipf {
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    n_f: f64,
}

/// 2^61 - 1, prime: coprime with every page count, so `rank * P mod n` is a permutation.
const SCRAMBLE_PRIME: u128 = (1 << 61) - 1;

fn zeta(n: u64, theta: f64) -> f64 {
    // Summed smallest terms first for accuracy.
    #[allow(clippy::cast_precision_loss)]
    (1..=n).rev().map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        #[allow(clippy::cast_precision_loss)]
        let n_f = n as f64;
        let eta = (1.0 - (2.0 / n_f).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf { theta, alpha: 1.0 / (1.0 - theta), zetan, eta, n_f }
    }

    #[inline]
    fn rank(&self, rng: &mut Rng, n: u64) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(n - 1);
        }
        let r = self.n_f * (self.eta * u - self.eta + 1.0).powf(self.alpha);
        // r is in [0, n] by construction; clamp for rounding at the top.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let r = r as u64;
        r.min(n - 1)
    }
}

impl Sampler {
    /// Bind `pattern` to `n_pages` data pages of `page_bytes` each.
    pub fn new(pattern: Pattern, n_pages: u64, page_bytes: u64) -> Sampler {
        assert!(n_pages > 0, "a guest has data pages");
        let hot_pages = match pattern {
            Pattern::Hotset { bytes, .. } => bytes.div_ceil(page_bytes).clamp(1, n_pages),
            _ => n_pages,
        };
        let zipf = match pattern {
            Pattern::Zipf { theta } => Some(Zipf::new(n_pages, theta)),
            _ => None,
        };
        Sampler { pattern, n: n_pages, hot_pages, zipf }
    }

    /// Bind a zipf pattern using a normalisation constant computed before (by
    /// the source), skipping the O(n) sum on the destination's resume path.
    pub fn with_zipf_constant(pattern: Pattern, n_pages: u64, zetan: f64) -> Sampler {
        let Pattern::Zipf { theta } = pattern else { panic!("with_zipf_constant needs a zipf pattern") };
        assert!(n_pages > 0, "a guest has data pages");
        let mut z = Zipf::new(2.min(n_pages), theta);
        let zeta2 = zeta(2, theta);
        #[allow(clippy::cast_precision_loss)]
        let n_f = n_pages as f64;
        z.zetan = zetan;
        z.n_f = n_f;
        z.eta = (1.0 - (2.0 / n_f).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Sampler { pattern, n: n_pages, hot_pages: n_pages, zipf: Some(z) }
    }

    /// The zipf normalisation constant (0 for other patterns).
    pub fn zipf_constant(&self) -> f64 {
        self.zipf.as_ref().map_or(0.0, |z| z.zetan)
    }

    /// The pattern.
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// Where vCPU `i` of `n_vcpus` starts a sequential walk.
    pub fn start_cursor(&self, i: u32, n_vcpus: u32) -> u64 {
        let n = u128::from(self.n);
        u64::try_from(n * u128::from(i) / u128::from(n_vcpus.max(1))).expect("below n")
    }

    /// Next data page in `[0, n)`.
    #[inline]
    pub fn next(&self, rng: &mut Rng, cursor: &mut u64) -> u64 {
        match self.pattern {
            Pattern::Uniform => rng.below(self.n),
            Pattern::Sequential => {
                let p = *cursor % self.n;
                *cursor = (p + 1) % self.n;
                p
            }
            Pattern::Hotset { fraction, .. } => {
                if fraction >= 1.0 || rng.unit() < fraction {
                    rng.below(self.hot_pages)
                } else {
                    rng.below(self.n)
                }
            }
            Pattern::Zipf { .. } => {
                let z = self.zipf.as_ref().expect("built for zipf");
                let rank = z.rank(rng, self.n);
                u64::try_from(u128::from(rank) * SCRAMBLE_PRIME % u128::from(self.n)).expect("below n")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(4097), "4097");
    }

    #[test]
    fn patterns_parse_and_print() {
        for s in ["uniform", "sequential", "hotset:64M", "hotset:64M:0.9", "zipf:0.99"] {
            let p: Pattern = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        for bad in ["", "random", "hotset", "hotset:0", "hotset:1M:2", "zipf:1", "zipf:0", "zipf:x", "uniform:3"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad} accepted");
        }
    }

    fn histogram(p: &str, n: u64, draws: usize) -> Vec<u32> {
        let s = Sampler::new(p.parse().unwrap(), n, 4096);
        let mut rng = Rng::new(7);
        let mut cursor = s.start_cursor(0, 1);
        let mut h = vec![0u32; usize::try_from(n).unwrap()];
        for _ in 0..draws {
            let v = s.next(&mut rng, &mut cursor);
            h[usize::try_from(v).unwrap()] += 1;
        }
        h
    }

    #[test]
    fn hotset_stays_hot() {
        let h = histogram("hotset:40K", 100, 10_000);
        assert!(h[..10].iter().all(|&c| c > 0));
        assert!(h[10..].iter().all(|&c| c == 0));
        let h = histogram("hotset:40K:0.5", 100, 10_000);
        assert!(h[10..].iter().sum::<u32>() > 4000);
    }

    #[test]
    fn sequential_walks_and_wraps() {
        let s = Sampler::new(Pattern::Sequential, 5, 4096);
        let mut rng = Rng::new(1);
        let mut c = s.start_cursor(1, 2);
        let got: Vec<_> = (0..6).map(|_| s.next(&mut rng, &mut c)).collect();
        assert_eq!(got, vec![2, 3, 4, 0, 1, 2]);
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let h = histogram("zipf:0.99", 1000, 100_000);
        let mut sorted = h.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        // The top 1% of pages take far more than 1% of accesses.
        let top: u32 = sorted[..10].iter().sum();
        assert!(top > 20_000, "top-10 pages got {top} of 100000");
        // Scrambled: the most popular page is not simply page 0's neighbourhood.
        assert!(h.iter().filter(|&&c| c > 0).count() > 500);
    }
}
