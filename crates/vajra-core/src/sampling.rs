//! Sampling parameters of a request, as an OpenAI/vLLM user sets them, with validation that
//! names the field, the value and what is allowed.

use crate::error::{Result, ensure};
use serde::{Deserialize, Serialize};

/// Default `max_tokens` when a request does not set one.
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// How the next token is chosen, and when generation stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy. Must be ≥ 0.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability mass reaches
    /// `top_p`. Must be in (0, 1]; 1 turns it off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens. -1 or 0 turns it off; otherwise ≥ 1.
    pub top_k: i32,
    /// Drop tokens whose probability is below `min_p` × the top token's. In [0, 1]; 0 is off.
    pub min_p: f32,
    /// The most tokens to generate. Must be ≥ 1.
    pub max_tokens: u32,
    /// Stop when the generated text contains one of these strings (they are not returned).
    pub stop: Vec<String>,
    /// Stop when one of these token ids is generated.
    pub stop_token_ids: Vec<u32>,
    /// Seed of this request's own random stream, for reproducible sampling.
    pub seed: Option<u64>,
    /// Keep generating past the end-of-sequence token (benchmarks use this for exact lengths).
    pub ignore_eos: bool,
    /// OpenAI presence penalty, in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, in [-2, 2].
    pub frequency_penalty: f32,
    /// Multiplicative repetition penalty (CTRL style); 1 is off. Must be > 0.
    pub repetition_penalty: f32,
    /// Return this many most likely tokens' log-probabilities per position (0..=20).
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            max_tokens: DEFAULT_MAX_TOKENS,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            seed: None,
            ignore_eos: false,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of exactly up to `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Whether this picks the most likely token every time.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`crate::CoreError::InvalidField`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        ensure(
            t.is_finite() && t >= 0.0,
            "temperature",
            t,
            "a finite number ≥ 0",
        )?;
        let p = self.top_p;
        ensure(p > 0.0 && p <= 1.0, "top_p", p, "a number in (0, 1]")?;
        ensure(
            self.top_k >= -1,
            "top_k",
            self.top_k,
            "-1 or 0 (off), or an integer ≥ 1",
        )?;
        let m = self.min_p;
        ensure((0.0..=1.0).contains(&m), "min_p", m, "a number in [0, 1]")?;
        ensure(
            self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer ≥ 1",
        )?;
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            ensure((-2.0..=2.0).contains(&v), name, v, "a number in [-2, 2]")?;
        }
        let r = self.repetition_penalty;
        ensure(
            r.is_finite() && r > 0.0,
            "repetition_penalty",
            r,
            "a finite number > 0",
        )?;
        if let Some(n) = self.logprobs {
            ensure(n <= 20, "logprobs", n, "an integer in 0..=20")?;
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty()) {
            ensure(false, "stop", format!("{s:?}"), "non-empty strings")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CoreError;

    fn field_of(err: CoreError) -> String {
        match err {
            CoreError::InvalidField { field, .. } => field,
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy(1).validate().unwrap();
    }

    #[test]
    fn each_out_of_range_field_is_named_in_the_error() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: -2,
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    min_p: 1.1,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.5,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ];
        for (params, field) in cases {
            assert_eq!(field_of(params.validate().unwrap_err()), field);
        }
    }

    #[test]
    fn top_k_minus_one_zero_and_positive_are_accepted() {
        for k in [-1, 0, 1, 50] {
            SamplingParams {
                top_k: k,
                ..Default::default()
            }
            .validate()
            .unwrap();
        }
    }

    #[test]
    fn unknown_fields_are_rejected_when_deserializing() {
        let err = serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.5}"#).unwrap_err();
        assert!(err.to_string().contains("temprature"), "{err}");
    }
}
