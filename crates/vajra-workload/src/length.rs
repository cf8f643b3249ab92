//! Length samplers and max-token clipping.

use crate::config::{LengthDist, LengthsConfig};
use crate::error::Result;
use crate::trace::{TraceRow, read_trace};
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, LogNormal, Zipf};
use std::path::Path;

/// One distribution, ready to sample.
#[derive(Debug, Clone)]
pub enum DistSampler {
    /// Always this.
    Fixed(u32),
    /// Uniform on the range.
    Uniform(u32, u32),
    /// `min − 1 + Zipf(n)`.
    Zipf(u32, Zipf<f64>),
    /// Lognormal clipped to the range.
    Lognormal(LogNormal<f64>, u32, u32),
}

impl DistSampler {
    /// From a validated distribution.
    pub fn new(d: &LengthDist) -> Self {
        match *d {
            LengthDist::Fixed { value } => DistSampler::Fixed(value),
            LengthDist::Uniform { min, max } => DistSampler::Uniform(min, max),
            LengthDist::Zipf { min, max, theta } => DistSampler::Zipf(
                min,
                Zipf::new(f64::from(max - min + 1), theta).expect("validated zipf"),
            ),
            LengthDist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => DistSampler::Lognormal(
                LogNormal::new(median.ln(), sigma).expect("validated lognormal"),
                min,
                max,
            ),
        }
    }

    /// One draw.
    pub fn sample(&self, rng: &mut StdRng) -> u32 {
        match self {
            DistSampler::Fixed(v) => {
                let _: u8 = rng.random();
                *v
            }
            DistSampler::Uniform(a, b) => rng.random_range(*a..=*b),
            DistSampler::Zipf(min, z) => min - 1 + z.sample(rng) as u32,
            DistSampler::Lognormal(d, min, max) => {
                (d.sample(rng)
                    .round()
                    .clamp(f64::from(*min), f64::from(*max))) as u32
            }
        }
    }
}

/// Draws (prompt, output) pairs.
#[derive(Debug, Clone)]
pub enum LengthSampler {
    /// Independent prompt and output draws.
    Independent(DistSampler, DistSampler),
    /// Rows of a trace, with replacement.
    Rows(Vec<(u32, u32)>),
}

/// Scales a trace length and keeps it ≥ 1.
pub fn scale_len(len: u32, scale: f64) -> u32 {
    ((f64::from(len) * scale).round() as u32).max(1)
}

impl LengthSampler {
    /// From a validated config; trace paths resolve against `base`.
    ///
    /// # Errors
    /// An unreadable or malformed trace.
    pub fn new(cfg: &LengthsConfig, base: &Path) -> Result<Self> {
        Ok(match cfg {
            LengthsConfig::Fixed { prompt, output } => {
                LengthSampler::Independent(DistSampler::Fixed(*prompt), DistSampler::Fixed(*output))
            }
            LengthsConfig::Independent { prompt, output } => {
                LengthSampler::Independent(DistSampler::new(prompt), DistSampler::new(output))
            }
            LengthsConfig::Trace {
                path,
                format,
                prefill_scale,
                decode_scale,
            } => {
                let rows = read_trace(&base.join(path), *format, false)?;
                LengthSampler::Rows(
                    rows.iter()
                        .map(|r: &TraceRow| {
                            (
                                scale_len(r.prompt, *prefill_scale),
                                scale_len(r.output, *decode_scale),
                            )
                        })
                        .collect(),
                )
            }
        })
    }

    /// One (prompt, output) pair.
    pub fn sample(&self, rng: &mut StdRng) -> (u32, u32) {
        match self {
            LengthSampler::Independent(p, o) => (p.sample(rng), o.sample(rng)),
            LengthSampler::Rows(rows) => rows[rng.random_range(0..rows.len())],
        }
    }
}

/// Clips `prompt + output` to `max_tokens`, keeping the prefill:decode ratio: the prompt gets
/// `floor(prompt·max/total)` (at least 1) and the output the rest (at least 1). Lengths that
/// fit are returned unchanged.
pub fn clip(prompt: u32, output: u32, max_tokens: u32) -> (u32, u32) {
    let total = u64::from(prompt) + u64::from(output);
    if total <= u64::from(max_tokens) {
        return (prompt, output);
    }
    let p = ((u64::from(prompt) * u64::from(max_tokens)) / total) as u32;
    let p = p.clamp(1, max_tokens - 1);
    (p, (max_tokens - p).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn clipping_keeps_the_ratio_and_the_total() {
        assert_eq!(clip(3000, 1000, 2000), (1500, 500));
        assert_eq!(clip(10, 10, 100), (10, 10));
        let (p, o) = clip(9999, 1, 4096);
        assert_eq!(p + o, 4096);
        assert!(o >= 1);
    }

    #[test]
    fn zipf_lengths_stay_in_range_and_favour_the_minimum() {
        let s = DistSampler::new(&LengthDist::Zipf {
            min: 10,
            max: 20,
            theta: 1.2,
        });
        let mut rng = StdRng::seed_from_u64(1);
        let xs: Vec<u32> = (0..10_000).map(|_| s.sample(&mut rng)).collect();
        assert!(xs.iter().all(|&x| (10..=20).contains(&x)));
        let tens = xs.iter().filter(|&&x| x == 10).count();
        let twenties = xs.iter().filter(|&&x| x == 20).count();
        assert!(tens > 5 * twenties, "{tens} vs {twenties}");
    }

    #[test]
    fn lognormal_median_matches_and_is_clipped() {
        let s = DistSampler::new(&LengthDist::Lognormal {
            median: 1000.0,
            sigma: 1.0,
            min: 1,
            max: 5000,
        });
        let mut rng = StdRng::seed_from_u64(2);
        let mut xs: Vec<u32> = (0..20_001).map(|_| s.sample(&mut rng)).collect();
        xs.sort_unstable();
        let med = xs[10_000];
        assert!((950..=1050).contains(&med), "{med}");
        assert_eq!(*xs.last().unwrap(), 5000);
    }
}
