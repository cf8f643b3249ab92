//! Built-in devices and model shapes.
//!
//! Device peaks are datasheet numbers (dense bf16 tensor-core FLOP/s, HBM bandwidth, NVLink
//! bandwidth per direction); the roofline predictor derates them with size-dependent efficiency
//! curves (see [`crate::predictor::roofline`]). Model shapes are those of the public Hugging
//! Face `config.json` files.

use serde::{Deserialize, Serialize};
use vajra_core::config::ModelConfig;

/// One accelerator kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Short name (`h100`, `h200`, `a100`).
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub mem_bandwidth: f64,
    /// NVLink bandwidth per direction per device, bytes/s (all-reduce and send/recv).
    pub link_bandwidth: f64,
    /// On-demand price per device-hour in US dollars (capacity per dollar).
    pub price_per_hour: f64,
}

const GB: f64 = 1e9;

/// The built-in devices.
pub fn devices() -> Vec<DeviceSpec> {
    vec![
        DeviceSpec {
            name: "h100".into(),
            memory_bytes: 80 * (1 << 30),
            peak_flops: 989e12,
            mem_bandwidth: 3350.0 * GB,
            link_bandwidth: 450.0 * GB,
            price_per_hour: 4.25,
        },
        DeviceSpec {
            name: "h200".into(),
            memory_bytes: 141 * 1_000_000_000,
            peak_flops: 989e12,
            mem_bandwidth: 4800.0 * GB,
            link_bandwidth: 450.0 * GB,
            price_per_hour: 5.50,
        },
        DeviceSpec {
            name: "a100".into(),
            memory_bytes: 80 * (1 << 30),
            peak_flops: 312e12,
            mem_bandwidth: 2039.0 * GB,
            link_bandwidth: 300.0 * GB,
            price_per_hour: 2.21,
        },
    ]
}

/// A built-in device by name (case-insensitive; `h100-80gb` and `a100-80gb` accepted).
pub fn device(name: &str) -> Option<DeviceSpec> {
    let n = name.to_ascii_lowercase();
    let n = n.trim_end_matches("-80gb").trim_end_matches("-141gb");
    devices().into_iter().find(|d| d.name == n)
}

#[allow(clippy::too_many_arguments)]
fn llama(
    name: &str,
    layers: u32,
    hidden: u32,
    heads: u32,
    kv_heads: u32,
    inter: u32,
    vocab: u32,
    max_len: u32,
    rope_theta: f64,
) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        num_layers: layers,
        hidden_size: hidden,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        intermediate_size: inter,
        vocab_size: vocab,
        max_model_len: max_len,
        dtype_bytes: 2,
        tie_word_embeddings: false,
        attention_bias: false,
        rope_theta,
        rms_norm_eps: 1e-5,
    }
}

/// The built-in model shapes.
pub fn models() -> Vec<ModelConfig> {
    let mut qwen = llama(
        "Qwen/Qwen2-7B",
        28,
        3584,
        28,
        4,
        18944,
        152_064,
        32_768,
        1e6,
    );
    qwen.attention_bias = true;
    qwen.rms_norm_eps = 1e-6;
    vec![
        llama(
            "meta-llama/Llama-2-7b-hf",
            32,
            4096,
            32,
            32,
            11008,
            32000,
            4096,
            1e4,
        ),
        llama(
            "meta-llama/Llama-2-70b-hf",
            80,
            8192,
            64,
            8,
            28672,
            32000,
            4096,
            1e4,
        ),
        llama(
            "codellama/CodeLlama-34b-Instruct-hf",
            48,
            8192,
            64,
            8,
            22016,
            32000,
            16_384,
            1e6,
        ),
        llama(
            "meta-llama/Meta-Llama-3-8B",
            32,
            4096,
            32,
            8,
            14336,
            128_256,
            8192,
            5e5,
        ),
        llama(
            "meta-llama/Meta-Llama-3-70B",
            80,
            8192,
            64,
            8,
            28672,
            128_256,
            8192,
            5e5,
        ),
        llama(
            "mistralai/Mistral-7B-v0.1",
            32,
            4096,
            32,
            8,
            14336,
            32000,
            32_768,
            1e4,
        ),
        qwen,
    ]
}

/// A built-in model by full name or by its part after the `/` (case-insensitive).
pub fn model(name: &str) -> Option<ModelConfig> {
    let n = name.to_ascii_lowercase();
    models().into_iter().find(|m| {
        let full = m.name.to_ascii_lowercase();
        full == n || full.rsplit('/').next() == Some(n.as_str())
    })
}

/// Whether `tp` devices can shard the model's heads: the query heads split evenly, and the KV
/// heads either split evenly or are replicated (`tp` a multiple of them).
pub fn tp_divides(m: &ModelConfig, tp: u32) -> bool {
    m.num_heads.is_multiple_of(tp)
        && (m.num_kv_heads.is_multiple_of(tp) || tp.is_multiple_of(m.num_kv_heads))
}

/// Names of the built-in models, for error messages.
pub fn model_names() -> String {
    models()
        .iter()
        .map(|m| m.name.clone())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names of the built-in devices, for error messages.
pub fn device_names() -> String {
    devices()
        .iter()
        .map(|d| d.name.clone())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_models_are_valid_and_have_the_published_sizes() {
        for m in models() {
            m.validate().unwrap();
        }
        let p = |n: &str| model(n).unwrap().num_params() as f64 / 1e9;
        assert!((p("Llama-2-7b-hf") - 6.74).abs() < 0.01);
        assert!((p("Meta-Llama-3-8B") - 8.03).abs() < 0.01);
        assert!((p("meta-llama/Meta-Llama-3-70B") - 70.55).abs() < 0.05);
        assert!((p("Mistral-7B-v0.1") - 7.24).abs() < 0.01);
        assert!((p("Qwen2-7B") - 7.62).abs() < 0.02);
    }

    #[test]
    fn device_lookup_accepts_memory_suffixes() {
        assert_eq!(device("H100-80GB").unwrap().name, "h100");
        assert!(device("tpu").is_none());
    }
}
