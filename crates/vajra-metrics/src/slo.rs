//! Service-level objectives: per-request thresholds (goodput), Etalon token deadlines
//! (deadline miss rate, fluidity index) and run-level limits (capacity search).

use crate::error::{Result, ensure};
use serde::{Deserialize, Serialize};
use vajra_core::time::Duration;

/// The `[slo]` table of an experiment file. Every field is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// A request is good only if its TTFT is at most this (seconds).
    #[serde(default)]
    pub ttft_s: Option<f64>,
    /// … and its TPOT is at most this (seconds).
    #[serde(default)]
    pub tpot_s: Option<f64>,
    /// … and its end-to-end latency is at most this (seconds).
    #[serde(default)]
    pub e2e_s: Option<f64>,
    /// Etalon: deadline of the first token after arrival (seconds); needs `tbt_deadline_s`.
    #[serde(default)]
    pub ttft_deadline_s: Option<f64>,
    /// Etalon: deadline of each later token after the previous one (seconds). Slack from early
    /// tokens carries over and is reset by a miss.
    #[serde(default)]
    pub tbt_deadline_s: Option<f64>,
    /// Run-level limit: p99 TTFT (seconds).
    #[serde(default)]
    pub p99_ttft_s: Option<f64>,
    /// Run-level limit: p99 of pooled inter-token gaps (seconds).
    #[serde(default)]
    pub p99_tbt_s: Option<f64>,
    /// Run-level limit: median scheduling delay (seconds).
    #[serde(default)]
    pub p50_scheduling_delay_s: Option<f64>,
    /// Run-level limit: fraction of token deadlines missed (Etalon), in [0, 1].
    #[serde(default)]
    pub max_deadline_miss_rate: Option<f64>,
    /// SLO classes (`[[slo.classes]]`): a request of class `i` (its tenant's `slo_class = i`)
    /// is good against class `i`'s targets instead of the ones above, and the summary reports
    /// goodput and attainment per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<SloClass>,
}

/// One SLO class: its own per-request targets (absent ones are not checked).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloClass {
    /// Name (`interactive`, `batch`).
    pub name: String,
    /// TTFT target (seconds).
    #[serde(default)]
    pub ttft_s: Option<f64>,
    /// TPOT target (seconds).
    #[serde(default)]
    pub tpot_s: Option<f64>,
    /// End-to-end target (seconds).
    #[serde(default)]
    pub e2e_s: Option<f64>,
}

/// An optional threshold `field`, when given, is a finite number of seconds > 0.
fn seconds(field: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(x) => ensure(
            x.is_finite() && x > 0.0,
            field,
            x,
            "a finite number of seconds > 0",
        ),
        None => Ok(()),
    }
}

impl SloConfig {
    /// Checks every threshold.
    ///
    /// # Errors
    /// A threshold that is not a finite positive number of seconds, a miss rate outside
    /// [0, 1], or token deadlines given by halves.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("slo.ttft_s", self.ttft_s),
            ("slo.tpot_s", self.tpot_s),
            ("slo.e2e_s", self.e2e_s),
            ("slo.ttft_deadline_s", self.ttft_deadline_s),
            ("slo.tbt_deadline_s", self.tbt_deadline_s),
            ("slo.p99_ttft_s", self.p99_ttft_s),
            ("slo.p99_tbt_s", self.p99_tbt_s),
            ("slo.p50_scheduling_delay_s", self.p50_scheduling_delay_s),
        ] {
            seconds(name, v)?;
        }
        for (i, c) in self.classes.iter().enumerate() {
            ensure(
                !c.name.is_empty() && !self.classes[..i].iter().any(|o| o.name == c.name),
                &format!("slo.classes[{i}].name"),
                format!("{:?}", c.name),
                "a non-empty name no other class has",
            )?;
            for (field, v) in [
                ("ttft_s", c.ttft_s),
                ("tpot_s", c.tpot_s),
                ("e2e_s", c.e2e_s),
            ] {
                seconds(&format!("slo.classes[{i}].{field}"), v)?;
            }
        }
        if let Some(m) = self.max_deadline_miss_rate {
            ensure(
                (0.0..=1.0).contains(&m),
                "slo.max_deadline_miss_rate",
                m,
                "a fraction in [0, 1]",
            )?;
            ensure(
                self.tbt_deadline_s.is_some(),
                "slo.tbt_deadline_s",
                "(absent)",
                "set when slo.max_deadline_miss_rate is set",
            )?;
        }
        ensure(
            self.ttft_deadline_s.is_none() || self.tbt_deadline_s.is_some(),
            "slo.tbt_deadline_s",
            "(absent)",
            "set when slo.ttft_deadline_s is set",
        )
    }

    /// The per-request targets `(ttft, tpot, e2e)` for a request of `class` (the class's when
    /// it names a defined one, else the run's).
    pub fn targets(&self, class: Option<u32>) -> (Option<f64>, Option<f64>, Option<f64>) {
        match class.and_then(|c| self.classes.get(c as usize)) {
            Some(c) => (c.ttft_s, c.tpot_s, c.e2e_s),
            None => (self.ttft_s, self.tpot_s, self.e2e_s),
        }
    }

    /// Token deadlines `(first, later)` when Etalon metrics are on. The first token's deadline
    /// defaults to the later tokens' one.
    pub fn token_deadlines(&self) -> Option<(Duration, Duration)> {
        let d = self.tbt_deadline_s?;
        Some((
            Duration::from_secs_f64(self.ttft_deadline_s.unwrap_or(d)),
            Duration::from_secs_f64(d),
        ))
    }
}

/// Etalon's deadline bookkeeping for one request (`docs/metrics.md`, "Deadlines").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadlineState {
    slack: i128,
    /// Deadlines counted so far (met plus missed).
    pub total: u32,
    /// Deadlines missed so far.
    pub missed: u32,
}

impl DeadlineState {
    /// Accounts one token that came `gap` after the previous token (or after arrival, for the
    /// first token). `first` selects the first-token deadline.
    pub fn on_token(&mut self, gap: Duration, first: bool, deadlines: (Duration, Duration)) {
        let x = i128::from(gap.0);
        let dp = i128::from(deadlines.0.0);
        let dd = i128::from(deadlines.1.0).max(1);
        let budget = if first { dp } else { dd };
        if x <= budget + self.slack {
            self.slack += budget - x;
            self.total += 1;
            return;
        }
        let misses = if first {
            1 + (x - self.slack - dp) / dd
        } else {
            (x - self.slack) / dd
        };
        let misses = misses.max(1) as u32;
        self.missed += misses;
        self.total += misses;
        self.slack = 0;
    }

    /// Fraction of deadlines met (1 when none were counted).
    pub fn fluidity(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            1.0 - f64::from(self.missed) / f64::from(self.total)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn slack_from_early_tokens_absorbs_a_late_one() {
        let d = (ms(100), ms(50));
        let mut s = DeadlineState::default();
        s.on_token(ms(60), true, d); // 40 ms slack
        s.on_token(ms(80), false, d); // 80 ≤ 50 + 40
        assert_eq!((s.total, s.missed), (2, 0));
        s.on_token(ms(100), false, d); // slack 10: 100 > 60 → misses = floor(90/50) = 1
        assert_eq!((s.total, s.missed), (3, 1));
        s.on_token(ms(55), false, d); // slack was reset: 55 > 50 → floor(55/50) = 1
        assert_eq!((s.total, s.missed), (4, 2));
        assert!((s.fluidity() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_very_late_first_token_counts_the_deadlines_it_skipped() {
        let mut s = DeadlineState::default();
        s.on_token(ms(300), true, (ms(100), ms(50)));
        assert_eq!((s.total, s.missed), (5, 5), "1 + floor(200/50)");
    }

    #[test]
    fn validation_names_the_bad_threshold() {
        let e = SloConfig {
            tpot_s: Some(-1.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("slo.tpot_s"), "{e}");
    }
}
