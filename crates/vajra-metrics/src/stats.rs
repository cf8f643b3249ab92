//! Exact order statistics.
//!
//! Percentiles interpolate linearly between order statistics at rank `q·(n − 1)` (numpy's
//! default, as vLLM's benchmark and Etalon report them). Pooled inter-token gaps can number in
//! the hundreds of millions at cluster scale, but they take few distinct values (each is a sum
//! of batch durations), so [`Multiset`] counts equal values and stays exact in little memory.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for integer keys: one multiply (Fibonacci hashing). The multiset's keys are
/// nanosecond gaps, not attacker-controlled, so SipHash's protection buys nothing here and
/// costs a third of the event loop's metric recording.
#[derive(Debug, Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// The quantiles every distribution reports.
pub const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p999", 0.999),
];

/// Summary of a distribution (in the unit of its samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Distribution {
    /// Number of samples.
    pub count: u64,
    /// Arithmetic mean (0 when empty).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub mean: f64,
    /// Smallest sample.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub min: f64,
    /// Median.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p90: f64,
    /// 95th percentile.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p95: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p999: f64,
    /// Largest sample.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub max: f64,
}

/// Reads an `f64` that may have been written as `null` (JSON has no NaN; serde_json writes a
/// NaN, such as the MFU of a run without FLOP counts, as `null`): `null` reads back as NaN.
///
/// # Errors
/// A value that is neither a number nor `null`.
pub fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The `q`-quantile of sorted `xs` with linear interpolation (`None` when empty).
pub fn quantile_sorted(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * (xs.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(xs[lo] + (xs[hi] - xs[lo]) * (rank - lo as f64))
}

impl Distribution {
    /// Summarises `xs` (sorted in place; NaNs are not allowed).
    pub fn of(xs: &mut [f64]) -> Self {
        if xs.is_empty() {
            return Distribution::default();
        }
        xs.sort_unstable_by(f64::total_cmp);
        let q = |p| quantile_sorted(xs, p).unwrap_or(0.0);
        Distribution {
            count: xs.len() as u64,
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            min: xs[0],
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: xs[xs.len() - 1],
        }
    }

    /// The named quantile (`p50`, `p90`, `p95`, `p99`, `p999`), `mean`, `min` or `max`.
    pub fn get(&self, name: &str) -> Option<f64> {
        Some(match name {
            "mean" => self.mean,
            "min" => self.min,
            "max" => self.max,
            "p50" => self.p50,
            "p90" => self.p90,
            "p95" => self.p95,
            "p99" => self.p99,
            "p999" => self.p999,
            _ => return None,
        })
    }
}

/// Values below this are counted in a dense array.
const DENSE: u64 = 1 << 16;

/// An exact multiset of non-negative integers (nanoseconds, token counts).
#[derive(Debug, Clone, Default)]
pub struct Multiset {
    /// Counts of values below [`DENSE`], indexed by value (batch sizes, token counts).
    dense: Vec<u64>,
    counts: HashMap<u64, u64, BuildHasherDefault<IntHasher>>,
    /// A run of equal values not yet in `counts` (consecutive tokens of one batch mostly share
    /// their gap, so this saves most hash-table visits).
    run: (u64, u64),
    n: u64,
    sum: u128,
    /// Sorted cumulative form, built on first read after the last `add`.
    cumulative: std::sync::OnceLock<Cumulative>,
}

impl Multiset {
    /// Adds one sample.
    #[inline]
    pub fn add(&mut self, v: u64) {
        if self.cumulative.get().is_some() {
            self.cumulative = std::sync::OnceLock::new();
        }
        self.n += 1;
        self.sum += u128::from(v);
        if v < DENSE {
            let i = v as usize;
            if i >= self.dense.len() {
                self.dense.resize(i + 1, 0);
            }
            self.dense[i] += 1;
            return;
        }
        if self.run.1 > 0 && self.run.0 != v {
            *self.counts.entry(self.run.0).or_insert(0) += self.run.1;
            self.run.1 = 0;
        }
        self.run = (v, self.run.1 + 1);
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Merges another multiset into this one.
    pub fn merge(&mut self, other: &Multiset) {
        self.cumulative = std::sync::OnceLock::new();
        for (v, c) in other.sorted() {
            if v < DENSE {
                let i = v as usize;
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, 0);
                }
                self.dense[i] += c;
            } else {
                *self.counts.entry(v).or_insert(0) += c;
            }
        }
        self.n += other.n;
        self.sum += other.sum;
    }

    /// Distinct values with their counts, ascending (one allocation: at cluster scale there
    /// are tens of millions of distinct gaps).
    pub fn sorted(&self) -> Vec<(u64, u64)> {
        let dense = self.dense.iter().filter(|c| **c > 0).count();
        let mut v = Vec::with_capacity(dense + self.counts.len() + 1);
        v.extend(
            self.dense
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as u64, c)),
        );
        v.extend(self.counts.iter().map(|(&a, &b)| (a, b)));
        let sparse = &mut v[dense..];
        sparse.sort_unstable();
        // Fold in the pending run (its value may already have a count).
        if self.run.1 > 0 {
            match sparse.binary_search_by_key(&self.run.0, |e| e.0) {
                Ok(i) => sparse[i].1 += self.run.1,
                Err(i) => v.insert(dense + i, self.run),
            }
        }
        v
    }

    /// Summary with every value multiplied by `scale` (e.g. 1e-9 for seconds), exact.
    pub fn distribution(&self, scale: f64) -> Distribution {
        let c = self.cumulative.get_or_init(|| Cumulative::new(self));
        if c.pairs.is_empty() {
            return Distribution::default();
        }
        let q = |p: f64| c.quantile(p) * scale;
        Distribution {
            count: self.n,
            mean: self.sum as f64 / self.n as f64 * scale,
            min: c.pairs[0].0 as f64 * scale,
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: c.pairs[c.pairs.len() - 1].0 as f64 * scale,
        }
    }

    /// `points` evenly spaced quantiles from 0 to 1, scaled.
    pub fn quantiles(&self, points: usize, scale: f64) -> Vec<(f64, f64)> {
        let c = self.cumulative.get_or_init(|| Cumulative::new(self));
        if c.pairs.is_empty() {
            return Vec::new();
        }
        (0..points)
            .map(|i| {
                let p = i as f64 / (points - 1).max(1) as f64;
                (p, c.quantile(p) * scale)
            })
            .collect()
    }
}

/// Distinct values with running counts, for order statistics by binary search.
#[derive(Debug, Clone)]
struct Cumulative {
    /// `(value, number of samples ≤ value)`, ascending.
    pairs: Vec<(u64, u64)>,
    n: u64,
}

impl Cumulative {
    fn new(m: &Multiset) -> Self {
        let mut pairs = m.sorted();
        let mut acc = 0;
        for p in &mut pairs {
            acc += p.1;
            p.1 = acc;
        }
        Cumulative { pairs, n: m.n }
    }

    /// The value at 0-based order-statistic index `k`.
    fn order_stat(&self, k: u64) -> f64 {
        let i = self.pairs.partition_point(|&(_, e)| e <= k);
        self.pairs[i.min(self.pairs.len() - 1)].0 as f64
    }

    fn quantile(&self, q: f64) -> f64 {
        let rank = q.clamp(0.0, 1.0) * (self.n - 1) as f64;
        let lo = rank.floor() as u64;
        let hi = rank.ceil() as u64;
        let a = self.order_stat(lo);
        let b = if hi == lo { a } else { self.order_stat(hi) };
        a + (b - a) * (rank - lo as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_linearly_like_numpy() {
        let mut xs = vec![4.0, 1.0, 3.0, 2.0];
        let d = Distribution::of(&mut xs);
        assert_eq!(d.p50, 2.5);
        assert!((d.p90 - 3.7).abs() < 1e-12);
        assert_eq!((d.min, d.max, d.mean, d.count), (1.0, 4.0, 2.5, 4));
        assert!((d.p99 - 3.97).abs() < 1e-12);
    }

    #[test]
    fn the_multiset_agrees_with_sorting_every_sample() {
        let samples: Vec<u64> = (0..1000u64).map(|i| (i * 7919) % 37).collect();
        let mut m = Multiset::default();
        for &s in &samples {
            m.add(s);
        }
        let mut xs: Vec<f64> = samples.iter().map(|&s| s as f64).collect();
        let a = Distribution::of(&mut xs);
        let b = m.distribution(1.0);
        assert_eq!(a.count, b.count);
        for (x, y) in [
            (a.p50, b.p50),
            (a.p90, b.p90),
            (a.p99, b.p99),
            (a.p999, b.p999),
            (a.mean, b.mean),
            (a.max, b.max),
        ] {
            assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
    }

    #[test]
    fn an_empty_distribution_is_all_zero() {
        assert_eq!(Multiset::default().distribution(1.0).count, 0);
        assert_eq!(Distribution::of(&mut []).p99, 0.0);
    }
}
