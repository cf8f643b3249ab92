//! # vajra-engine
//!
//! The engine half of Vajra: real Llama-family models driven by the same vajra-core scheduler
//! and block manager the simulator uses.
//!
//! What this crate owns:
//! - [`spec`] and [`weights`]: reading a Hugging Face model folder (`config.json`,
//!   `*.safetensors`).
//! - [`tokenizer`]: `tokenizer.json`, chat templates, end tokens, incremental detokenizing.
//! - [`backend`]: the interface every executor implements, and the CPU reference backend.
//! - [`sampler`]: greedy and random sampling with penalties, truncation and per-request seeds.
//! - [`engine`]: the loop scheduler → backend → sampler → detokenizer.
//! - [`server`]: the OpenAI-compatible HTTP server (axum) around an engine thread.
//!
//! `vajra-core` stays free of I/O and clocks; the wall clock enters here, in [`engine`].

pub mod backend;
pub mod engine;
pub mod error;
pub mod sampler;
pub mod server;
pub mod spec;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};

use backend::cpu::{CacheShape, CpuBackend};
use engine::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;
use tokenizer::TextCodec;

/// Loads a model folder onto the CPU backend with a KV cache of `kv_cache_mib` MiB.
///
/// # Errors
/// A missing or malformed model file, or an invalid engine config.
pub fn load_cpu_engine(dir: &Path, cfg: EngineConfig, kv_cache_mib: u64) -> Result<Engine> {
    let block_size = cfg.cache.block_size;
    let backend = CpuBackend::load(dir, |spec| CacheShape {
        num_host_blocks: cfg.cache.swap_blocks,
        ..CacheShape::for_memory(spec, block_size, kv_cache_mib)
    })?;
    let codec = TextCodec::load(dir, &backend.spec_eos())?;
    Engine::new(cfg, Box::new(backend), Arc::new(codec))
}
