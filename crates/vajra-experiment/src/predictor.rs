//! The `[predictor]` table: how the simulator prices a step (the predictor itself is
//! vajra-sim's).

use crate::error::{ExperimentError, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The `[predictor]` table of an experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictorConfig {
    /// Folder with `mlp.csv` (and optionally `attention.csv`, `all_reduce.csv`,
    /// `send_recv.csv`). Absent: `profiles/{measured,generated}/<device>/<model>/` is searched
    /// and, failing that, the roofline model is used with a warning. `"roofline"` forces the
    /// roofline model.
    pub profile: Option<PathBuf>,
    /// Folder with Vidur's `all_reduce.csv` / `send_recv.csv` (overrides the profile
    /// folder's).
    pub network: Option<PathBuf>,
    /// Fixed CPU time per step (scheduling, input preparation, sampling), microseconds.
    pub cpu_overhead_us: f64,
    /// CPU time per request in the step, microseconds.
    pub cpu_overhead_per_request_us: f64,
    /// Model the LM head (Vidur does not).
    pub lm_head: bool,
    /// Which statistic of each measured point to price steps with: `median` (Vidur's) or
    /// `mean` (adds each point's share of slow steps; closer to a long run's average on a
    /// noisy machine). Collectives keep the median.
    pub profile_statistic: Statistic,
    /// Token counts of the engine's captured CUDA graphs, ascending (vLLM's
    /// `cudagraph_capture_sizes`). A step of at most the largest runs its token-count
    /// operators (projections, norms, MLP) at the next size up, as vLLM pads the batch to
    /// the graph it replays; attention and the LM head see the real requests. Empty: no
    /// padding.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cuda_graph_sizes: Vec<u32>,
    /// Apply a profile bundle's `skew_fit.csv` (the correction for decodes of unequal context
    /// in one step) when it has one.
    pub skew_correction: bool,
    /// How a Vidur-schema `attention.csv` prices attention: `fit` (the default: prefill and
    /// decode fitted to their work terms, which extrapolate by work beyond a sparse grid) or
    /// `table` (interpolated between the measured rows: exact on them, linear beyond the
    /// outermost two). Profile bundles are always interpolated.
    pub attention: AttentionModel,
}

/// How a Vidur-schema attention table is read (`predictor.attention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionModel {
    /// Least-squares fit to the work terms.
    #[default]
    Fit,
    /// Interpolation between the measured rows.
    Table,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            profile: None,
            network: None,
            cpu_overhead_us: 0.0,
            cpu_overhead_per_request_us: 0.0,
            lm_head: true,
            profile_statistic: Statistic::Median,
            cuda_graph_sizes: Vec::new(),
            skew_correction: true,
            attention: AttentionModel::Fit,
        }
    }
}

impl PredictorConfig {
    /// Checks the overheads.
    ///
    /// # Errors
    /// A negative or non-finite overhead.
    pub fn validate(&self) -> Result<()> {
        for (f, v) in [
            ("predictor.cpu_overhead_us", self.cpu_overhead_us),
            (
                "predictor.cpu_overhead_per_request_us",
                self.cpu_overhead_per_request_us,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ExperimentError::invalid(
                    f,
                    v,
                    "a finite number of microseconds ≥ 0",
                ));
            }
        }
        let g = &self.cuda_graph_sizes;
        if g.first() == Some(&0) || g.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ExperimentError::invalid(
                "predictor.cuda_graph_sizes",
                format!("{g:?}"),
                "token counts ≥ 1 in ascending order, e.g. [1, 2, 4, 8, 16, 24, 32]",
            ));
        }
        Ok(())
    }
}

/// Which `time_stats` column of a profile the predictor prices steps with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statistic {
    /// The median over a point's repetitions (Vidur's choice): a typical step.
    #[default]
    Median,
    /// The mean: a typical step plus its share of the slow tail, which a long run averages in.
    Mean,
}

impl Statistic {
    /// The column suffix (`time_stats.<op>.<suffix>`).
    pub fn column(self) -> &'static str {
        match self {
            Statistic::Median => "median",
            Statistic::Mean => "mean",
        }
    }

    /// The column of `op` in this statistic: `time_stats.<op>.<median|mean>`.
    pub fn of(self, op: &str) -> String {
        format!("time_stats.{op}.{}", self.column())
    }
}
