//! Configuration shared by the simulator and the engine: the model's shape, the KV cache and
//! parallelism. The scheduler's own config lives in [`crate::sched::config`] and is re-exported
//! here.
//!
//! Every struct is serde with `deny_unknown_fields`; the `///` comment of each field is its help
//! text; `validate()` runs once at load time and names the field, the value and what is allowed.

use crate::error::{CoreError, Result, ensure};
use serde::{Deserialize, Serialize};

pub use crate::sched::config::{
    AdmissionMode, ChunkSchedule, PolicyConfig, PreemptionMode, QueuePolicy, SchedulerConfig,
};

/// Default KV block size in tokens (vLLM, Sarathi-Serve and Vidur all use 16).
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Default fraction of device memory the cache planner may use.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;
/// Default seed of the prefix-cache hash.
pub const DEFAULT_HASH_SEED: u64 = 0x5eed_ba5e;

/// The operators of an operator profile's `mlp.csv` (Vidur's schema, which this project's
/// profiles share), in its column order: the simulator's predictor reads them and the engine's
/// profiler writes them.
pub const MLP_OPS: [&str; 10] = [
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
];

/// The shape of a decoder-only transformer (Llama family).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A name for reports, e.g. `meta-llama/Llama-2-7b-hf`.
    pub name: String,
    /// Number of transformer layers.
    pub num_layers: u32,
    /// Hidden (model) dimension.
    pub hidden_size: u32,
    /// Number of attention (query) heads.
    pub num_heads: u32,
    /// Number of key/value heads (GQA); equal to `num_heads` for multi-head attention.
    pub num_kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Inner dimension of the (gated) MLP.
    pub intermediate_size: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: u32,
    /// Bytes per weight and KV element (2 for bf16/f16).
    #[serde(default = "default_dtype_bytes")]
    pub dtype_bytes: u32,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether Q/K/V projections have a bias (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
    /// Rotary embedding base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
}

fn default_dtype_bytes() -> u32 {
    2
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-5
}

/// The subset of a Hugging Face `config.json` that a Llama-family model needs.
#[derive(Debug, Deserialize)]
struct HfConfig {
    num_hidden_layers: u32,
    hidden_size: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    intermediate_size: u32,
    vocab_size: u32,
    max_position_embeddings: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    model_type: Option<String>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (Llama 2/3, Mistral, Qwen2 and alike).
    ///
    /// # Errors
    /// [`CoreError::ModelConfig`] naming the missing or unreadable field; the result is
    /// validated.
    pub fn from_hf_config_json(json: &str, name: &str) -> Result<Self> {
        let hf: HfConfig =
            serde_json::from_str(json).map_err(|e| CoreError::ModelConfig(e.to_string()))?;
        let dtype = hf
            .torch_dtype
            .or(hf.dtype)
            .unwrap_or_else(|| "bfloat16".into());
        let dtype_bytes = match dtype.as_str() {
            "float32" => 4,
            "float16" | "bfloat16" => 2,
            other => {
                return Err(CoreError::invalid(
                    "torch_dtype",
                    other,
                    "float32, float16 or bfloat16",
                ));
            }
        };
        ensure(
            hf.num_attention_heads > 0,
            "num_attention_heads",
            hf.num_attention_heads,
            "≥ 1",
        )?;
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        let qwen = hf.model_type.as_deref() == Some("qwen2");
        let cfg = ModelConfig {
            name: hf
                .name_or_path
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| name.into()),
            num_layers: hf.num_hidden_layers,
            hidden_size: hf.hidden_size,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            intermediate_size: hf.intermediate_size,
            vocab_size: hf.vocab_size,
            max_model_len: hf.max_position_embeddings.unwrap_or(2048),
            dtype_bytes,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias.unwrap_or(qwen),
            rope_theta: hf.rope_theta.unwrap_or_else(default_rope_theta),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or_else(default_rms_eps),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the shape.
    ///
    /// # Errors
    /// A zero dimension, heads that do not divide, or an unsupported dtype size.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("model.num_layers", self.num_layers),
            ("model.hidden_size", self.hidden_size),
            ("model.num_heads", self.num_heads),
            ("model.num_kv_heads", self.num_kv_heads),
            ("model.head_dim", self.head_dim),
            ("model.intermediate_size", self.intermediate_size),
            ("model.vocab_size", self.vocab_size),
            ("model.max_model_len", self.max_model_len),
        ] {
            ensure(v >= 1, field, v, "an integer ≥ 1")?;
        }
        ensure(
            self.num_heads.is_multiple_of(self.num_kv_heads),
            "model.num_kv_heads",
            self.num_kv_heads,
            &format!("a divisor of num_heads = {}", self.num_heads),
        )?;
        ensure(
            matches!(self.dtype_bytes, 1 | 2 | 4),
            "model.dtype_bytes",
            self.dtype_bytes,
            "1, 2 or 4",
        )
    }

    /// KV-cache bytes per token on one device with tensor-parallel width `tp`:
    /// `2 (K and V) × layers × ceil(kv_heads / tp) × head_dim × dtype_bytes`.
    pub fn kv_bytes_per_token(&self, tp: u32) -> u64 {
        let kv_heads = self.num_kv_heads.div_ceil(tp.max(1));
        2 * u64::from(self.num_layers)
            * u64::from(kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    /// Width of the query projection's output (query heads × head_dim).
    pub fn q_width(&self) -> u32 {
        self.num_heads * self.head_dim
    }

    /// Width of the key (or value) projection's output (KV heads × head_dim).
    pub fn kv_width(&self) -> u32 {
        self.num_kv_heads * self.head_dim
    }

    /// Number of parameters (embedding, LM head unless tied, attention, gated MLP, norms).
    pub fn num_params(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        let q = u64::from(self.q_width());
        let kv = u64::from(self.kv_width());
        let i = u64::from(self.intermediate_size);
        let v = u64::from(self.vocab_size);
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let per_layer = h * (q + 2 * kv) + bias + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + head + u64::from(self.num_layers) * per_layer + h
    }
}

/// The paged KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Tokens per KV block.
    pub block_size: u32,
    /// Number of device KV blocks per replica. When absent, the memory planner derives it from
    /// `gpu_memory_utilization`.
    pub num_blocks: Option<u32>,
    /// Fraction of device memory for weights, activations and KV cache, in (0, 1].
    pub gpu_memory_utilization: f64,
    /// Reuse KV blocks of identical prefixes across requests (hash-chained full blocks).
    pub enable_prefix_caching: bool,
    /// Fraction of blocks kept free when admitting waiting requests, in [0, 1). Absent: the
    /// policy's own (none for `vllm_v1`, as vLLM v1 admits without one; 0.01 for the others,
    /// vLLM v0's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<f64>,
    /// Host blocks available to swap preemption (0 disables swap space).
    pub swap_blocks: u32,
    /// Seed of the block hash, so cache contents are reproducible across runs and processes.
    pub hash_seed: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            num_blocks: None,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            enable_prefix_caching: true,
            watermark: None,
            swap_blocks: 0,
            hash_seed: DEFAULT_HASH_SEED,
        }
    }
}

/// The most KV blocks a pool may hold (2³⁰: 17 billion tokens at 16 per block), so that a
/// block id never reaches the pool's end marker and a pool is never asked for more memory than
/// a machine has.
pub const MAX_BLOCKS: u32 = 1 << 30;

impl CacheConfig {
    /// Checks the cache settings.
    ///
    /// # Errors
    /// A block size that is not a power of two in 1..=1024, a zero block count, or a fraction
    /// out of range.
    pub fn validate(&self) -> Result<()> {
        let b = self.block_size;
        ensure(
            b.is_power_of_two() && b <= 1024,
            "cache.block_size",
            b,
            "a power of two from 1 to 1024",
        )?;
        if let Some(n) = self.num_blocks {
            ensure(
                (1..=MAX_BLOCKS).contains(&n),
                "cache.num_blocks",
                n,
                &format!("an integer from 1 to {MAX_BLOCKS}"),
            )?;
        }
        ensure(
            self.swap_blocks <= MAX_BLOCKS,
            "cache.swap_blocks",
            self.swap_blocks,
            &format!("an integer from 0 to {MAX_BLOCKS}"),
        )?;
        let u = self.gpu_memory_utilization;
        ensure(
            u > 0.0 && u <= 1.0,
            "cache.gpu_memory_utilization",
            u,
            "a number in (0, 1]",
        )?;
        match self.watermark {
            Some(w) => ensure(
                (0.0..1.0).contains(&w),
                "cache.watermark",
                w,
                "a number in [0, 1)",
            ),
            None => Ok(()),
        }
    }
}

/// What an instance (a replica) does with the requests routed to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceRole {
    /// Prefill and decode on the same instance (no hand-off).
    #[default]
    Colocated,
    /// Prefill only: a request runs until its first token, then its KV blocks are handed to a
    /// decode instance.
    Prefill,
    /// Decode only: requests arrive with their prompt's KV transferred from a prefill instance.
    Decode,
}

impl InstanceRole {
    /// The name used in files.
    pub fn name(self) -> &'static str {
        match self {
            InstanceRole::Colocated => "colocated",
            InstanceRole::Prefill => "prefill",
            InstanceRole::Decode => "decode",
        }
    }
}

/// Model parallelism of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Tensor-parallel width (devices per stage).
    pub tensor_parallel: u32,
    /// Pipeline stages.
    pub pipeline_parallel: u32,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            tensor_parallel: 1,
            pipeline_parallel: 1,
        }
    }
}

impl ParallelConfig {
    /// Checks the widths.
    ///
    /// # Errors
    /// A width of zero or a tensor-parallel width that is not a power of two.
    pub fn validate(&self) -> Result<()> {
        let tp = self.tensor_parallel;
        ensure(
            tp.is_power_of_two() && tp <= 64,
            "cluster.tensor_parallel",
            tp,
            "a power of two from 1 to 64",
        )?;
        let pp = self.pipeline_parallel;
        ensure(
            (1..=64).contains(&pp),
            "cluster.pipeline_parallel",
            pp,
            "1 to 64",
        )
    }

    /// Devices per replica.
    pub fn world_size(&self) -> u32 {
        self.tensor_parallel * self.pipeline_parallel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA2_7B: &str = r#"{
        "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "tie_word_embeddings": false,
        "torch_dtype": "float16", "vocab_size": 32000 }"#;

    #[test]
    fn llama2_7b_config_json_gives_its_known_shape_and_size() {
        let m = ModelConfig::from_hf_config_json(LLAMA2_7B, "x").unwrap();
        assert_eq!(m.name, "meta-llama/Llama-2-7b-hf");
        assert_eq!((m.num_layers, m.head_dim, m.num_kv_heads), (32, 128, 32));
        // Llama-2-7B has 6.74 B parameters.
        let p = m.num_params() as f64 / 1e9;
        assert!((p - 6.74).abs() < 0.01, "{p}");
        // 2 × 32 layers × 32 heads × 128 × 2 bytes = 512 KiB per token.
        assert_eq!(m.kv_bytes_per_token(1), 524_288);
        assert_eq!(m.kv_bytes_per_token(2), 262_144);
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let json = LLAMA2_7B.replace("float16", "int4");
        let err = ModelConfig::from_hf_config_json(&json, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("torch_dtype") && err.contains("int4"), "{err}");
    }

    #[test]
    fn missing_hf_field_is_named() {
        let json = LLAMA2_7B.replace("\"num_hidden_layers\": 32,", "");
        let err = ModelConfig::from_hf_config_json(&json, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_hidden_layers"), "{err}");
    }

    #[test]
    fn cache_config_rejects_a_block_size_that_is_not_a_power_of_two() {
        let c = CacheConfig {
            block_size: 12,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cache.block_size")
        );
    }

    #[test]
    fn cache_config_rejects_unknown_toml_fields() {
        let err = toml::from_str::<CacheConfig>("block_sise = 16")
            .unwrap_err()
            .to_string();
        assert!(err.contains("block_sise"), "{err}");
    }
}
