//! Built-in devices and model shapes.
//!
//! Device peaks are datasheet numbers (dense bf16 tensor-core FLOP/s, HBM bandwidth, NVLink
//! bandwidth per direction); the roofline predictor derates them with size-dependent efficiency
//! curves (vajra-sim's roofline predictor). Model shapes are those of the public Hugging
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
        // A100 40 GB (SXM4): same compute as the 80 GB part, HBM2 at 1,555 GB/s.
        DeviceSpec {
            name: "a100-40gb".into(),
            memory_bytes: 40 * (1 << 30),
            peak_flops: 312e12,
            mem_bandwidth: 1555.0 * GB,
            link_bandwidth: 300.0 * GB,
            price_per_hour: 1.60,
        },
        // B200 (HGX): 180 GB HBM3e at 8 TB/s, 2.25 PFLOP/s dense BF16, NVLink 5 at 1.8 TB/s
        // both directions together.
        DeviceSpec {
            name: "b200".into(),
            memory_bytes: 180 * 1_000_000_000,
            peak_flops: 2250e12,
            mem_bandwidth: 8000.0 * GB,
            link_bandwidth: 900.0 * GB,
            price_per_hour: 8.00,
        },
        // AMD Instinct MI300X: 192 GB HBM3 at 5.3 TB/s, 1,307 TFLOP/s dense BF16, Infinity
        // Fabric 896 GB/s peer bandwidth both directions together.
        DeviceSpec {
            name: "mi300x".into(),
            memory_bytes: 192 * 1_000_000_000,
            peak_flops: 1307.4e12,
            mem_bandwidth: 5300.0 * GB,
            link_bandwidth: 448.0 * GB,
            price_per_hour: 4.00,
        },
        // L40S: 48 GB GDDR6 at 864 GB/s, 362 TFLOP/s dense BF16; no NVLink (PCIe 4.0 x16,
        // 32 GB/s a direction).
        DeviceSpec {
            name: "l40s".into(),
            memory_bytes: 48 * (1 << 30),
            peak_flops: 362.05e12,
            mem_bandwidth: 864.0 * GB,
            link_bandwidth: 32.0 * GB,
            price_per_hour: 1.20,
        },
        // A10G (AWS g5): the A10's GA102 with 24 GB GDDR6 at 600 GB/s; AWS publishes no tensor
        // peak, so this is the A10 datasheet's 125 TFLOP/s dense BF16. PCIe 4.0 x16.
        DeviceSpec {
            name: "a10g".into(),
            memory_bytes: 24 * (1 << 30),
            peak_flops: 125e12,
            mem_bandwidth: 600.0 * GB,
            link_bandwidth: 32.0 * GB,
            price_per_hour: 1.01,
        },
        // GeForce RTX 4090: 24 GB GDDR6X (25,250,627,584 bytes as CUDA reports the card's
        // total) at 1,008 GB/s; 165.2 TFLOP/s dense BF16 (FP32 accumulate, which GeForce runs
        // at half the FP16-accumulate rate); PCIe 4.0 x16.
        DeviceSpec {
            name: "rtx4090".into(),
            memory_bytes: 25_250_627_584,
            peak_flops: 165.2e12,
            mem_bandwidth: 1008.0 * GB,
            link_bandwidth: 32.0 * GB,
            price_per_hour: 0.69,
        },
        // RTX PRO 6000 Blackwell (Server / Workstation): 96 GB GDDR7 at 1,792 GB/s; about
        // 504 TFLOP/s dense BF16 (a quarter of its 2 PFLOP/s dense FP4); PCIe 5.0 x16,
        // 64 GB/s a direction.
        DeviceSpec {
            name: "rtxpro6000".into(),
            memory_bytes: 96 * (1 << 30),
            peak_flops: 503.8e12,
            mem_bandwidth: 1792.0 * GB,
            link_bandwidth: 64.0 * GB,
            price_per_hour: 1.80,
        },
    ]
}

/// A built-in device by name: case, spaces, `-` and `_` do not matter, a leading `nvidia`,
/// `geforce` or `amd` may be given (`NVIDIA GeForce RTX 4090`, `RTX4090`, `rtx-pro-6000`),
/// and `h100-80gb`, `a100-80gb`, `h200-141gb` name the default parts.
pub fn device(name: &str) -> Option<DeviceSpec> {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let mut n = squash(name);
    for prefix in ["nvidia", "geforce", "amd", "instinct"] {
        if let Some(rest) = n.strip_prefix(prefix) {
            n = rest.to_owned();
        }
    }
    let n = match n.as_str() {
        "h10080gb" | "h100sxm" | "h100sxm5" => "h100".to_owned(),
        "a10080gb" | "a100sxm" => "a100".to_owned(),
        "h200141gb" => "h200".to_owned(),
        "rtxpro6000blackwell" | "rtxpro6000blackwellserveredition" => "rtxpro6000".to_owned(),
        _ => n,
    };
    devices().into_iter().find(|d| squash(&d.name) == n)
}

/// The built-in model shapes: `(name, config.json)`, the fields of each model's public
/// Hugging Face `config.json` that a shape needs (and the engine's token ids), so that the
/// simulator's [`ModelConfig`] and the engine's random-weight model come from one text.
pub const MODELS: &[(&str, &str)] = &[
    (
        "meta-llama/Llama-2-7b-hf",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":32,"vocab_size":32000,"max_position_embeddings":4096,
           "rope_theta":10000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"float16","eos_token_id":2,"bos_token_id":1}"#,
    ),
    (
        "meta-llama/Llama-2-70b-hf",
        r#"{"model_type":"llama","hidden_size":8192,"intermediate_size":28672,"num_attention_heads":64,
           "num_hidden_layers":80,"num_key_value_heads":8,"vocab_size":32000,"max_position_embeddings":4096,
           "rope_theta":10000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"float16","eos_token_id":2,"bos_token_id":1}"#,
    ),
    (
        "codellama/CodeLlama-34b-Instruct-hf",
        r#"{"model_type":"llama","hidden_size":8192,"intermediate_size":22016,"num_attention_heads":64,
           "num_hidden_layers":48,"num_key_value_heads":8,"vocab_size":32000,"max_position_embeddings":16384,
           "rope_theta":1000000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":2,"bos_token_id":1}"#,
    ),
    (
        "meta-llama/Meta-Llama-3-8B",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
           "rope_theta":500000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":128001,"bos_token_id":128000}"#,
    ),
    (
        "meta-llama/Llama-3.1-8B",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":131072,
           "rope_theta":500000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":128001,"bos_token_id":128000}"#,
    ),
    (
        "meta-llama/Meta-Llama-3-70B",
        r#"{"model_type":"llama","hidden_size":8192,"intermediate_size":28672,"num_attention_heads":64,
           "num_hidden_layers":80,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
           "rope_theta":500000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":128001,"bos_token_id":128000}"#,
    ),
    (
        "mistralai/Mistral-7B-v0.1",
        r#"{"model_type":"mistral","hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":8,"vocab_size":32000,"max_position_embeddings":32768,
           "rope_theta":10000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":2,"bos_token_id":1}"#,
    ),
    (
        "Qwen/Qwen2-7B",
        r#"{"model_type":"qwen2","hidden_size":3584,"intermediate_size":18944,"num_attention_heads":28,
           "num_hidden_layers":28,"num_key_value_heads":4,"vocab_size":152064,"max_position_embeddings":32768,
           "rope_theta":1000000.0,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":151643,"bos_token_id":151643}"#,
    ),
    (
        "Qwen/Qwen3-8B",
        r#"{"model_type":"qwen3","hidden_size":4096,"intermediate_size":12288,"num_attention_heads":32,
           "num_hidden_layers":36,"num_key_value_heads":8,"head_dim":128,"vocab_size":151936,"max_position_embeddings":40960,
           "rope_theta":1000000.0,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":151645,"bos_token_id":151643}"#,
    ),
    (
        "Qwen/Qwen3-32B",
        r#"{"model_type":"qwen3","hidden_size":5120,"intermediate_size":25600,"num_attention_heads":64,
           "num_hidden_layers":64,"num_key_value_heads":8,"head_dim":128,"vocab_size":151936,"max_position_embeddings":40960,
           "rope_theta":1000000.0,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":151645,"bos_token_id":151643}"#,
    ),
    (
        "HuggingFaceTB/SmolLM2-135M",
        r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,
           "num_hidden_layers":30,"num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,
           "rope_theta":100000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":true,
           "torch_dtype":"bfloat16","eos_token_id":2,"bos_token_id":1}"#,
    ),
];

/// The built-in model shapes.
///
/// # Panics
/// Never for the shipped table: every entry parses (a test reads each one).
pub fn models() -> Vec<ModelConfig> {
    MODELS
        .iter()
        .map(|(name, json)| {
            ModelConfig::from_hf_config_json(json, name)
                .unwrap_or_else(|e| panic!("built-in model {name}: {e}"))
        })
        .collect()
}

/// The `(full name, config.json)` of a built-in model, by full name or by its part after the
/// `/` (case-insensitive).
pub fn model_json(name: &str) -> Option<(&'static str, &'static str)> {
    let n = name.to_ascii_lowercase();
    MODELS.iter().copied().find(|(full, _)| {
        let full = full.to_ascii_lowercase();
        full == n || full.rsplit('/').next() == Some(n.as_str())
    })
}

/// A built-in model by full name or by its part after the `/` (case-insensitive).
pub fn model(name: &str) -> Option<ModelConfig> {
    let (full, json) = model_json(name)?;
    ModelConfig::from_hf_config_json(json, full).ok()
}

/// Whether `tp` devices can shard the model's heads: the query heads split evenly, and the KV
/// heads either split evenly or are replicated (`tp` a multiple of them).
pub fn tp_divides(m: &ModelConfig, tp: u32) -> bool {
    m.num_heads.is_multiple_of(tp)
        && (m.num_kv_heads.is_multiple_of(tp) || tp.is_multiple_of(m.num_kv_heads))
}

/// Names of the built-in models, for error messages.
pub fn model_names() -> String {
    MODELS.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
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

/// A KV-transfer link between a prefill replica and a decode replica, per GPU and direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSpec {
    /// Short name.
    pub name: &'static str,
    /// Bytes/s per GPU and direction (a replica of width `w` sends over `w` of them at once).
    pub bandwidth: f64,
    /// Seconds from a transfer's start until its first byte lands (wire and transfer-engine
    /// setup).
    pub latency_s: f64,
}

/// The built-in links. Bandwidths are the nominal per-direction rates: NVLink 4 (H100/H200,
/// 900 GB/s both directions), PCIe 4.0 and 5.0 x16, and one InfiniBand/RoCE NIC per GPU at
/// 100, 200 or 400 Gbit/s (ConnectX-6/7, as in DGX H100 nodes). Latencies are a few
/// microseconds of wire and NIC time plus the tens of microseconds a transfer engine (NIXL,
/// Mooncake's) takes to post a transfer; set `kv_transfer.latency_us` for a slower stack.
pub fn links() -> [LinkSpec; 6] {
    [
        LinkSpec {
            name: "nvlink",
            bandwidth: 450.0 * GB,
            latency_s: 10e-6,
        },
        LinkSpec {
            name: "pcie4",
            bandwidth: 32.0 * GB,
            latency_s: 20e-6,
        },
        LinkSpec {
            name: "pcie5",
            bandwidth: 64.0 * GB,
            latency_s: 20e-6,
        },
        LinkSpec {
            name: "rdma_100g",
            bandwidth: 12.5 * GB,
            latency_s: 50e-6,
        },
        LinkSpec {
            name: "rdma_200g",
            bandwidth: 25.0 * GB,
            latency_s: 50e-6,
        },
        LinkSpec {
            name: "rdma_400g",
            bandwidth: 50.0 * GB,
            latency_s: 50e-6,
        },
    ]
}

/// Names of the built-in links, comma-separated.
pub fn link_names() -> String {
    links()
        .iter()
        .map(|l| l.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The link a `[cluster.kv_transfer]` table describes: a built-in one with its overrides.
///
/// # Errors
/// An unknown link or an override that is not a positive finite number.
pub fn resolve_link(t: &crate::experiment::KvTransferSpec) -> crate::error::Result<LinkSpec> {
    use crate::error::ExperimentError;
    let mut l = links()
        .into_iter()
        .find(|l| l.name.eq_ignore_ascii_case(&t.link))
        .ok_or_else(|| {
            ExperimentError::invalid("cluster.kv_transfer.link", &t.link, link_names())
        })?;
    if let Some(g) = t.bandwidth_gbps {
        if !(g.is_finite() && g > 0.0) {
            return Err(ExperimentError::invalid(
                "cluster.kv_transfer.bandwidth_gbps",
                g,
                "Gbit/s > 0 per GPU and direction",
            ));
        }
        l.bandwidth = g * 1e9 / 8.0;
    }
    if let Some(us) = t.latency_us {
        if !(us.is_finite() && us >= 0.0) {
            return Err(ExperimentError::invalid(
                "cluster.kv_transfer.latency_us",
                us,
                "microseconds ≥ 0",
            ));
        }
        l.latency_s = us * 1e-6;
    }
    Ok(l)
}
