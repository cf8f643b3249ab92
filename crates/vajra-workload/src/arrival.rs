//! Open-loop arrival processes: each call gives the next arrival time in seconds.
//!
//! Unlike Vidur, Poisson gaps are not clamped by default (Vidur clamps at `3/qps`, which raises
//! the offered rate by 5.2 %; `vidur_clamp = true` reproduces it).

use crate::config::ArrivalConfig;
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp, Gamma};

/// A renewal process of arrival times.
#[derive(Debug, Clone)]
pub enum ArrivalProcess {
    /// Exponential gaps.
    /// Exponential gaps, optionally clamped at this many seconds.
    Poisson(Exp<f64>, Option<f64>),
    /// Gamma gaps.
    Gamma(Gamma<f64>),
    /// Fixed gaps (the first arrival at 0).
    Constant(f64),
    /// Everything at 0.
    AllAtOnce,
}

impl ArrivalProcess {
    /// The process for an open-loop arrival config; `None` for trace replay and closed loop.
    /// The config must be validated.
    pub fn new(cfg: &ArrivalConfig) -> Option<Self> {
        Some(match *cfg {
            ArrivalConfig::Poisson { qps, vidur_clamp } => ArrivalProcess::Poisson(
                Exp::new(qps).expect("validated rate"),
                vidur_clamp.then_some(3.0 / qps),
            ),
            ArrivalConfig::Gamma { qps, cv } => {
                let shape = 1.0 / (cv * cv);
                ArrivalProcess::Gamma(
                    Gamma::new(shape, 1.0 / (qps * shape)).expect("validated shape and scale"),
                )
            }
            ArrivalConfig::Constant { qps } => ArrivalProcess::Constant(1.0 / qps),
            ArrivalConfig::AllAtOnce => ArrivalProcess::AllAtOnce,
            ArrivalConfig::Trace(_)
            | ArrivalConfig::ClosedLoop { .. }
            | ArrivalConfig::Sessions(_) => return None,
        })
    }

    /// The gap before the `index`-th arrival (0-based), in seconds.
    pub fn gap(&self, index: u64, rng: &mut StdRng) -> f64 {
        match self {
            ArrivalProcess::Poisson(d, clamp) => {
                let g = d.sample(rng);
                clamp.map_or(g, |c| g.min(c))
            }
            ArrivalProcess::Gamma(d) => d.sample(rng),
            ArrivalProcess::Constant(g) if index > 0 => *g,
            ArrivalProcess::Constant(_) | ArrivalProcess::AllAtOnce => {
                let _: u8 = rng.random();
                0.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gaps(cfg: ArrivalConfig, n: u64) -> Vec<f64> {
        let p = ArrivalProcess::new(&cfg).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        (0..n).map(|i| p.gap(i, &mut rng)).collect()
    }

    fn mean_cv(x: &[f64]) -> (f64, f64) {
        let n = x.len() as f64;
        let m = x.iter().sum::<f64>() / n;
        let v = x.iter().map(|g| (g - m) * (g - m)).sum::<f64>() / n;
        (m, v.sqrt() / m)
    }

    #[test]
    fn poisson_gaps_have_mean_one_over_qps_and_cv_one() {
        let (m, cv) = mean_cv(&gaps(
            ArrivalConfig::Poisson {
                qps: 4.0,
                vidur_clamp: false,
            },
            200_000,
        ));
        assert!((m - 0.25).abs() < 0.005, "{m}");
        assert!((cv - 1.0).abs() < 0.02, "{cv}");
    }

    #[test]
    fn the_vidur_clamp_raises_the_offered_rate_by_five_percent() {
        let (m, _) = mean_cv(&gaps(
            ArrivalConfig::Poisson {
                qps: 16.0,
                vidur_clamp: true,
            },
            400_000,
        ));
        let rate = 1.0 / m;
        assert!((rate / 16.0 - 1.0524).abs() < 0.005, "{rate}");
    }

    #[test]
    fn gamma_gaps_have_the_requested_mean_and_cv() {
        let (m, cv) = mean_cv(&gaps(ArrivalConfig::Gamma { qps: 2.0, cv: 3.0 }, 400_000));
        assert!((m - 0.5).abs() < 0.02, "{m}");
        assert!((cv - 3.0).abs() < 0.15, "{cv}");
    }

    #[test]
    fn constant_arrivals_start_at_zero_and_are_evenly_spaced() {
        let g = gaps(ArrivalConfig::Constant { qps: 10.0 }, 3);
        assert_eq!(g, vec![0.0, 0.1, 0.1]);
    }
}
