//! What the engine needs to know about a model beyond its shape: the architecture, rotary
//! embedding scaling, sliding-window attention and end-of-sequence tokens, read from a Hugging
//! Face `config.json`.
//!
//! The shape itself is `vajra-core`'s [`ModelConfig`] (the simulator reads the same file). Both
//! spellings of the rotary settings are read: `rope_theta` + `rope_scaling` (transformers 4) and
//! `rope_parameters` (transformers 5). Anything the CPU backend cannot run faithfully — another
//! architecture, an activation other than SiLU, an unknown rope type — is an error naming the
//! field, never a silent approximation.

use crate::error::{EngineError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use vajra_core::config::ModelConfig;

/// Architectures the engine runs (all Llama-shaped: RMSNorm, rotary, GQA, SiLU-gated MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3 (`model_type = "llama"`).
    Llama,
    /// Mistral (`"mistral"`): Llama with optional sliding-window attention.
    Mistral,
    /// Qwen2 (`"qwen2"`): Llama with Q/K/V biases.
    Qwen2,
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength bound (as a fraction of the original context) below which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// Everything the engine needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The shape (shared with the simulator).
    pub config: ModelConfig,
    /// Architecture.
    pub arch: Architecture,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// Attention sees at most this many most recent positions (Mistral), if set.
    pub sliding_window: Option<u32>,
    /// End-of-sequence token ids named by `config.json` (more may come from
    /// `generation_config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id, if named.
    pub bos_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Extra {
    model_type: Option<String>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
}

impl ModelSpec {
    /// Reads `dir/config.json`.
    ///
    /// # Errors
    /// The file is missing or unreadable, or names an unsupported architecture, activation or
    /// rope type.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                EngineError::MissingFile {
                    path: path.clone(),
                    what: "the model's Hugging Face config".into(),
                }
            } else {
                EngineError::model_file(&path, e)
            }
        })?;
        let name = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        Self::from_json(&text, &name).map_err(|e| match e {
            EngineError::Core(c) => EngineError::model_file(&path, c),
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    ///
    /// # Errors
    /// As [`ModelSpec::from_dir`].
    pub fn from_json(text: &str, name: &str) -> Result<Self> {
        let mut config = ModelConfig::from_hf_config_json(text, name)?;
        let extra: Extra = serde_json::from_str(text)
            .map_err(|e| EngineError::invalid("config.json", e, "a JSON object"))?;
        let arch = match extra.model_type.as_deref() {
            Some("llama") | None => Architecture::Llama,
            Some("mistral") => Architecture::Mistral,
            Some("qwen2") => Architecture::Qwen2,
            Some(other) => {
                return Err(EngineError::invalid(
                    "model_type",
                    other,
                    "llama, mistral or qwen2",
                ));
            }
        };
        if let Some(act) = extra.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(EngineError::invalid("hidden_act", act, "silu"));
        }
        // transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        let params = extra.rope_parameters.as_ref();
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(extra.rope_theta);
        if let Some(t) = theta {
            config.rope_theta = t;
        }
        let scaling = match (&extra.rope_scaling, params) {
            (Some(s), _) if !s.is_null() => parse_rope_scaling(s, "rope_scaling")?,
            (_, Some(p)) => parse_rope_scaling(p, "rope_parameters")?,
            _ => RopeScaling::None,
        };
        let sliding_window = match (arch, extra.use_sliding_window, &extra.sliding_window) {
            (Architecture::Qwen2, Some(true), _) => {
                return Err(EngineError::invalid(
                    "use_sliding_window",
                    true,
                    "false (Qwen2 sliding-window layers are not supported)",
                ));
            }
            (Architecture::Mistral, _, Some(v)) if !v.is_null() => Some(
                v.as_u64()
                    .filter(|&w| w >= 1 && w <= u64::from(u32::MAX))
                    .ok_or_else(|| {
                        EngineError::invalid("sliding_window", v, "null or an integer ≥ 1")
                    })? as u32,
            ),
            _ => None,
        };
        Ok(ModelSpec {
            config,
            arch,
            rope_scaling: scaling,
            sliding_window,
            eos_token_ids: token_ids(extra.eos_token_id.as_ref(), "eos_token_id")?,
            bos_token_id: token_ids(extra.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
        })
    }

    /// The rotary inverse frequencies, one per pair of head dimensions, after scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = f64::from(self.config.head_dim);
        let base: Vec<f64> = (0..self.config.head_dim / 2)
            .map(|i| 1.0 / self.config.rope_theta.powf(f64::from(2 * i) / d))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(v: &Value, field: &str) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        v.get(key).and_then(Value::as_f64).ok_or_else(|| {
            EngineError::invalid(
                format!("{field}.{key}"),
                v.get(key).map_or("absent".into(), Value::to_string),
                "a number",
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(EngineError::invalid(
            format!("{field}.rope_type"),
            other,
            "default, linear or llama3",
        )),
    }
}

/// A token id or list of token ids (`eos_token_id` is either in Hugging Face files).
pub(crate) fn token_ids(v: Option<&Value>, field: &str) -> Result<Vec<u32>> {
    let bad = |v: &Value| EngineError::invalid(field, v, "a token id or a list of token ids");
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(v))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
        "hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,"num_hidden_layers":32,
        "num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":131072,
        "rope_theta":500000.0,"hidden_act":"silu","eos_token_id":[128001,128008,128009],"bos_token_id":128000,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},"torch_dtype":"bfloat16"}"#;

    #[test]
    fn llama31_config_reads_rope_scaling_and_every_eos_token() {
        let s = ModelSpec::from_json(LLAMA31, "l").unwrap();
        assert_eq!(s.arch, Architecture::Llama);
        assert_eq!(s.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(s.bos_token_id, Some(128000));
        assert!(matches!(s.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let f = s.rope_inv_freq();
        assert_eq!(f.len(), 64);
        // Highest frequencies (short wavelengths) are unchanged; the lowest are divided by 8.
        assert_eq!(f[0], 1.0);
        let unscaled = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - unscaled / 8.0).abs() < 1e-15 * unscaled);
    }

    #[test]
    fn transformers5_rope_parameters_set_theta() {
        let j = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
            "num_hidden_layers":2,"vocab_size":100,"rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;
        let s = ModelSpec::from_json(j, "t").unwrap();
        assert_eq!(s.config.rope_theta, 100000.0);
        assert_eq!(s.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn unsupported_architecture_activation_and_rope_type_name_the_field() {
        let base = r#""hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"num_hidden_layers":2,"vocab_size":100"#;
        let e =
            ModelSpec::from_json(&format!(r#"{{"model_type":"gpt2",{base}}}"#), "t").unwrap_err();
        assert!(
            e.to_string().contains("model_type") && e.to_string().contains("qwen2"),
            "{e}"
        );
        let e =
            ModelSpec::from_json(&format!(r#"{{"hidden_act":"gelu",{base}}}"#), "t").unwrap_err();
        assert!(e.to_string().contains("hidden_act"), "{e}");
        let e = ModelSpec::from_json(
            &format!(r#"{{"rope_scaling":{{"type":"yarn","factor":2.0}},{base}}}"#),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling.rope_type"), "{e}");
    }
}
