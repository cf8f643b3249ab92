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
//! - [`bench`](mod@bench): a load generator for any OpenAI-compatible server that writes the simulator's
//!   run folder.
//!
//! `vajra-core` stays free of I/O and clocks; the wall clock enters here, in [`engine`].

pub mod backend;
pub mod bench;
pub mod conversations;
pub mod engine;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu_tools;
pub mod kv_transport;
pub mod profile;
pub mod sampler;
pub mod server;
pub mod shapes;
pub mod spec;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};

use backend::CacheShape;
use backend::cpu::CpuBackend;
use engine::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;
use tokenizer::TextCodec;

/// Which executor runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference backend (f32).
    Cpu,
    /// The CUDA backend (bf16; needs the `cuda` feature and a device).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(EngineError::invalid("backend", other, "cpu or cuda")),
        }
    }
}

/// Loads a model folder onto the CPU backend with a KV cache of `kv_cache_mib` MiB.
///
/// # Errors
/// A missing or malformed model file, or an invalid engine config.
pub fn load_cpu_engine(dir: &Path, cfg: EngineConfig, kv_cache_mib: u64) -> Result<Engine> {
    load_engine(dir, cfg, BackendKind::Cpu, kv_cache_mib)
}

/// Loads a model folder onto the chosen backend with a KV cache of `kv_cache_mib` MiB (or
/// `cfg.cache.num_blocks` blocks when set).
///
/// # Errors
/// A missing or malformed model file, an invalid engine config, or (CUDA) no usable device or a
/// build without the `cuda` feature — the message says which.
pub fn load_engine(
    dir: &Path,
    cfg: EngineConfig,
    kind: BackendKind,
    kv_cache_mib: u64,
) -> Result<Engine> {
    let policy = cfg.scheduler.policy.build();
    load_engine_with_policy(dir, cfg, kind, kv_cache_mib, policy)
}

/// [`load_engine`] running `policy` instead of the in-tree policy `cfg.scheduler.policy`
/// names: how an out-of-tree batching policy runs on a real model.
///
/// # Errors
/// As [`load_engine`].
pub fn load_engine_with_policy(
    dir: &Path,
    cfg: EngineConfig,
    kind: BackendKind,
    kv_cache_mib: u64,
    policy: Box<dyn vajra_core::sched::policy::BatchPolicy>,
) -> Result<Engine> {
    let block_size = cfg.cache.block_size;
    let host_blocks = cfg.cache.swap_blocks;
    // `cache.num_blocks`, when set, wins over the memory budget (so an experiment file gives
    // the engine and the simulator the same pool).
    let fixed = cfg.cache.num_blocks;
    let shape = move |s: CacheShape| CacheShape {
        num_host_blocks: host_blocks,
        num_blocks: fixed.unwrap_or(s.num_blocks),
        ..s
    };
    let backend: Box<dyn backend::Backend> = match kind {
        BackendKind::Cpu => Box::new(CpuBackend::load(dir, |spec| {
            shape(CacheShape::for_memory(spec, block_size, kv_cache_mib))
        })?),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Box::new(backend::cuda::CudaBackend::load(dir, |spec| {
            shape(CacheShape::for_memory_of(spec, block_size, kv_cache_mib, 2))
        })?),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => {
            return Err(EngineError::Backend {
                backend: "cuda".into(),
                message: "this binary was built without the `cuda` feature (cargo build --features cuda); the cpu backend is available".into(),
            });
        }
    };
    let codec = TextCodec::load(dir, &backend.spec().eos_token_ids)?;
    Engine::with_policy(cfg, backend, Arc::new(codec), policy)
}
