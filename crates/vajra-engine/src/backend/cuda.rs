//! The CUDA backend (cargo feature `cuda`): the CPU backend's forward pass on an NVIDIA GPU.
//!
//! - Weights and the paged KV cache in bf16; the residual stream in f32; products through
//!   cuBLAS (`cublasGemmEx`, bf16 in, f32 compute; the LM head writes f32 logits), or, for the
//!   projections of steps of at most 128 tokens with `VAJRA_CUDA_GEMM=tuned`, through cuBLASLt
//!   with the algorithm chosen by timing (`cuda/tuned_gemm.rs`).
//! - Kernels from `kernels/*.cu`, embedded with `include_str!`, compiled by NVRTC at start-up
//!   for the device's compute capability (PTX cached per architecture in the process).
//! - cudarc with dynamic loading: the build needs no CUDA toolkit, and with no driver
//!   [`probe`] says why instead of panicking (cudarc panics when a library is missing, so each
//!   library's presence is checked first).
//!
//! Per layer a step launches (v2 kernels, the default): `add_rms_norm`, QKV GEMM, (`add_bias`),
//! `rope_kv_write`, `flash_prefill_<head_dim>` per prefill chunk of 64+ tokens and one
//! `paged_decode_<head_dim>` for all other tokens (it merges its own split-K partials), O GEMM,
//! `add_rms_norm`, gate-up GEMM, `silu_mul8`, down GEMM. [`KernelSet::V1`] swaps in
//! `rope` then `kv_write`, `paged_attention_scalar` (+ `attention_combine`), cuBLAS attention GEMMs for long chunks and
//! `silu_mul`. Greedy steps pick tokens with `argmax_rows` on the device.
//!
//! All work runs on one stream of the backend's own. A step's index arrays (token ids,
//! positions, slots, block tables, …) go up in one copy. With CUDA graphs on
//! (`VAJRA_CUDA_GRAPHS=on` or [`CudaBackend::set_graphs`]), a step in which every request decodes
//! one token is padded to a capture size (1, 2, 4, then multiples of 8 up to 128; padding rows
//! write no cache slot) and replayed from a graph captured, at its first occurrence, for its
//! (batch, split-K) pair, over buffers that live as long as the graphs. cuBLAS gets its own
//! workspace so that no call allocates inside a capture.

#![allow(unsafe_code)] // kernel launches and cuBLAS calls are unsafe FFI; each is commented.

use super::layout::FusedWeights;
use super::{Backend, CacheShape, Logits, LogitsFor, Profiled, StepInput};
use crate::error::{EngineError, Result};
use crate::sampler::DeviceDraw;
use crate::spec::ModelSpec;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, CudaView, DevicePtr,
    DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tuned_gemm::{Operands, TunedGemm};
use vajra_core::ids::{BlockId, HostBlockId};

mod attention;
mod config;
mod error;
mod forward;
mod graphs;
mod kernels;
mod load;
mod measure;
mod plan;
mod products;
mod sample;
mod tuned_gemm;

pub use config::{CudaConfig, KernelSet, SPLIT_AIMS, SplitAim};
pub use error::CudaError;
use error::err;
use graphs::DecodeGraphs;
pub use graphs::GraphStats;
use kernels::Kernels;
pub use kernels::{KERNEL_SOURCES, compile_kernels, probe};
use load::GpuLayer;
use plan::{GemmChunk, Part, StepBuffers, StepPlan};
pub use tuned_gemm::TunedShape;

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the RMSNorm kernels (one block per row: a decode step has few rows, so
/// each block should be wide).
const NORM_THREADS: u32 = 1024;
/// Threads per block of `argmax_rows` (one block per row).
const ARGMAX_THREADS: u32 = 1024;
/// Threads per block of `sample_rows` (one block per row): SAMPLE_THREADS in sample.cu, the
/// most its per-thread tallies have room for.
const SAMPLE_THREADS: u32 = 512;
/// Threads per block of the paged attention kernels (ATT_THREADS in attention.cu).
const ATT_THREADS: u32 = 128;
/// Keys per split-K partition of a long context (v1).
const KEYS_PER_SPLIT: u32 = 32;
/// Fewest keys per split-K partition (v2: a 16-key tile for each of a block's 4 warps).
const MIN_KEYS_PER_SPLIT_V2: u32 = 64;
/// Prefill chunks at least this long run attention as one chunk-wide kernel (v2: flash_prefill;
/// v1: GEMMs over gathered K/V) instead of per-token paged attention.
const GEMM_PREFILL_MIN: usize = 64;
/// Head dims with `flash_prefill_<d>` and `paged_decode_<d>` kernels.
const MMA_HEAD_DIMS: [u32; 4] = [16, 32, 64, 128];

/// Dynamic shared memory of `paged_decode(2)_<head_dim>`: per warp (4), `stages` pairs of
/// 16-key K and V tiles, rows padded by 8 elements (DM_KEYS, DM_WARPS in attention.cu).
fn decode_smem_bytes(head_dim: u32, stages: u32) -> u32 {
    4 * stages * 2 * 16 * (head_dim + 8) * 2
}
/// Most split-K partitions.
const MAX_SPLITS: u32 = 64;
/// Split-K's default aim: two attention blocks per multiprocessor (the v2 measurements'
/// setting).
const DEFAULT_SPLIT_BLOCKS_PER_SM: u32 = 2;
/// Most blocks per multiprocessor split-K may aim at.
const MAX_SPLIT_BLOCKS_PER_SM: u32 = 32;
/// Bytes of cuBLAS's workspace.
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// The CUDA backend.
pub struct CudaBackend {
    /// The captured decode graphs and their buffers (made at the first step that uses them).
    /// First, so that they are dropped before the kernels' modules and the buffers they name.
    graphs: Option<DecodeGraphs>,
    spec: ModelSpec,
    shape: CacheShape,
    device_name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Projections of small steps through cuBLASLt with timed algorithm choice
    /// (`VAJRA_CUDA_GEMM=tuned`); dropped before the workspace it shares with cuBLAS.
    tuned: Option<RefCell<TunedGemm>>,
    /// cuBLAS's workspace, set on its handle (a graph capture must not allocate one); the
    /// tuned projections use it too.
    blas_workspace: CudaSlice<u8>,
    k: Kernels,
    embed: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
    final_norm: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
    inv_freq: CudaSlice<f32>,
    k_cache: Vec<CudaSlice<bf16>>,
    v_cache: Vec<CudaSlice<bf16>>,
    k_host: Vec<Vec<bf16>>,
    v_host: Vec<Vec<bf16>>,
    /// While profiling: an event recorded after each operator, with the operator's name.
    marks: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
    /// Which generation of kernels runs.
    kernel_set: KernelSet,
    /// K/V tiles in flight per warp in `paged_decode` (1 or 2; `VAJRA_CUDA_DECODE_STAGES`).
    decode_stages: u32,
    /// Streaming multiprocessors (split-K sizing).
    sms: u32,
    /// How split-K sizes the attention grid (`VAJRA_CUDA_SPLIT_BLOCKS_PER_SM`, default 2 blocks
    /// per multiprocessor).
    split_aim: SplitAim,
    /// Blocks of the decode kernel (v2, at its shared memory) resident per multiprocessor: the
    /// wave [`SplitAim::Waves`] fills.
    decode_resident: u32,
    /// Compute capability major version (flash_prefill needs 8+).
    cc_major: i32,
    /// Whether decode steps replay CUDA graphs (`VAJRA_CUDA_GRAPHS`).
    graph_mode: bool,
    /// Whether random sampling runs on the device (`VAJRA_CUDA_SAMPLER`).
    device_sampler: bool,
    graph_stats: GraphStats,
}

// SAFETY: the backend is used by one thread at a time (the engine loop moves it, never shares
// it); every CUDA object in it belongs to its own context and stream, and cudarc binds the
// context to the calling thread before each call.
unsafe impl Send for CudaBackend {}

/// Which weights to put on the device.
pub enum WeightSource<'a> {
    /// Weights loaded from a model folder (widened to f32 on the host, then rounded to bf16).
    Loaded(&'a FusedWeights),
    /// Uniform random weights of the model's shape, made on the device (benchmarks, profiles).
    Random {
        /// Seed of the fill.
        seed: u64,
    },
}

impl CudaBackend {
    /// Loads the model folder `dir` onto device 0.
    ///
    /// # Errors
    /// No usable device (the message says what is missing), a model file error, or a device
    /// failure (out of memory, kernel compilation).
    pub fn load(dir: &Path, shape_of: impl FnOnce(&ModelSpec) -> CacheShape) -> Result<Self> {
        probe().map_err(err)?;
        let spec = ModelSpec::from_dir(dir)?;
        let w = FusedWeights::load(dir, &spec)?;
        let shape = shape_of(&spec);
        Self::new(spec, WeightSource::Loaded(&w), shape)
    }

    /// Chooses the kernel generation (the default comes from `VAJRA_CUDA_KERNELS`).
    pub fn set_kernels(&mut self, set: KernelSet) {
        self.kernel_set = set;
        self.decode_resident = self.decode_occupancy();
        // Captured graphs launch the kernels they were captured with.
        self.graphs = None;
    }

    /// The kernel generation in use.
    pub fn kernels(&self) -> KernelSet {
        self.kernel_set
    }

    /// Sets the K/V tiles in flight per warp in v2's `paged_decode` (1 or 2; the default comes
    /// from `VAJRA_CUDA_DECODE_STAGES`, else 1).
    ///
    /// # Errors
    /// Any other count.
    pub fn set_decode_stages(&mut self, stages: u32) -> Result<()> {
        if !(1..=2).contains(&stages) {
            return Err(EngineError::invalid("decode stages", stages, "1, 2"));
        }
        self.decode_stages = stages;
        self.decode_resident = self.decode_occupancy();
        self.graphs = None;
        Ok(())
    }

    /// K/V tiles in flight per warp in v2's `paged_decode`.
    pub fn decode_stages(&self) -> u32 {
        self.decode_stages
    }

    /// Sets how split-K sizes the attention grid of a step with few (token, KV head) pairs (the
    /// default comes from `VAJRA_CUDA_SPLIT_BLOCKS_PER_SM`, else 2 blocks per multiprocessor).
    /// Partitions hold at least 64 keys (v2).
    ///
    /// # Errors
    /// A blocks-per-multiprocessor count outside 1–32.
    pub fn set_split_aim(&mut self, aim: SplitAim) -> Result<()> {
        if let SplitAim::PerSm(n) = aim
            && !(1..=MAX_SPLIT_BLOCKS_PER_SM).contains(&n)
        {
            return Err(EngineError::invalid("split-K aim", n, SPLIT_AIMS));
        }
        self.split_aim = aim;
        // The graphs' split-K buffers are sized for the aim they were made with.
        self.graphs = None;
        Ok(())
    }

    /// How split-K sizes the attention grid.
    pub fn split_aim(&self) -> SplitAim {
        self.split_aim
    }

    /// Blocks of v2's decode kernel resident per multiprocessor at its shared memory (the
    /// driver's occupancy calculator; 1 with v1's kernels or if the driver cannot say).
    fn decode_occupancy(&self) -> u32 {
        let hd = self.spec.config.head_dim;
        self.decode_kernel()
            .and_then(|f| {
                f.occupancy_max_active_blocks_per_multiprocessor(
                    ATT_THREADS,
                    decode_smem_bytes(hd, self.decode_stages) as usize,
                    None,
                )
                .ok()
            })
            .unwrap_or(1)
            .max(1)
    }

    /// Turns CUDA graphs for decode steps on or off (the default comes from
    /// `VAJRA_CUDA_GRAPHS`, `on` or `off`; unset means off). Graphs replay steps whose every
    /// request decodes one token, padded to a batch of 1, 2, 4 or a multiple of 8 up to 128,
    /// with v2's kernels; other steps run eagerly.
    pub fn set_graphs(&mut self, on: bool) {
        self.graph_mode = on;
        if !on {
            self.graphs = None;
        }
    }

    /// Turns the timed choice of cuBLASLt algorithms for the projections of steps of at most
    /// 128 tokens on or off (the default comes from `VAJRA_CUDA_GEMM=tuned|cublas`, else off).
    /// Captured graphs are dropped: they hold the other products.
    ///
    /// # Errors
    /// cuBLASLt could not be started.
    pub fn set_tuned_gemm(&mut self, on: bool) -> Result<()> {
        self.graphs = None;
        self.tuned = if on {
            Some(RefCell::new(TunedGemm::new()?))
        } else {
            None
        };
        Ok(())
    }

    /// Whether the projections of small steps use tuned cuBLASLt algorithms.
    pub fn tuned_gemm(&self) -> bool {
        self.tuned.is_some()
    }

    /// The projection shapes tuned so far, in order (empty with tuning off).
    pub fn tuned_shapes(&self) -> Vec<TunedShape> {
        self.tuned
            .as_ref()
            .map(|t| t.borrow().tuned().to_vec())
            .unwrap_or_default()
    }

    /// Draws sampled requests' tokens on the device (`sample_rows`) or copies their logits to
    /// the host sampler (the default comes from `VAJRA_CUDA_SAMPLER`, `device` or `host`;
    /// unset means host). Requests with penalties or log-probabilities always go to the host.
    pub fn set_device_sampler(&mut self, on: bool) {
        self.device_sampler = on;
    }

    /// Whether decode steps replay CUDA graphs (off again after a failed capture).
    pub fn graphs(&self) -> bool {
        self.graph_mode
    }

    /// How many graphs were captured and how many steps replayed one.
    pub fn graph_stats(&self) -> GraphStats {
        self.graph_stats.clone()
    }

    /// This model's kernel among `per_head_dim` (one per MMA_HEAD_DIMS), if v2 runs on an
    /// sm_80+ GPU and one is built for its head dim.
    fn mma_kernel<'a>(&self, per_head_dim: &'a [CudaFunction]) -> Option<&'a CudaFunction> {
        let hd = self.spec.config.head_dim;
        if self.kernel_set != KernelSet::V2 || self.cc_major < 8 {
            return None;
        }
        MMA_HEAD_DIMS
            .iter()
            .position(|&d| d == hd)
            .map(|i| &per_head_dim[i])
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The stream all work runs on (for timing with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Blocks until all queued work finished.
    ///
    /// # Errors
    /// A device failure.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(err)
    }

    /// The per-token attention kernel of this backend: v2's `paged_decode(2)_<head_dim>`, or
    /// `None` where v1's `paged_attention_scalar` runs.
    fn decode_kernel(&self) -> Option<CudaFunction> {
        self.mma_kernel(if self.decode_stages == 2 {
            &self.k.paged_decode2
        } else {
            &self.k.paged_decode
        })
        .cloned()
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn num_blocks(&self) -> u32 {
        self.shape.num_blocks
    }

    fn num_host_blocks(&self) -> u32 {
        self.shape.num_host_blocks
    }

    fn execute(&mut self, input: &StepInput<'_>) -> Result<Logits> {
        let vocab = self.spec.config.vocab_size as usize;
        self.forward(input, |b, logits, r| {
            let data = if r == 0 {
                Vec::new()
            } else {
                b.stream
                    .clone_dtoh(&logits.slice(..r * vocab))
                    .map_err(err)?
            };
            Ok(Logits { vocab, data })
        })
    }

    fn execute_greedy(&mut self, input: &StepInput<'_>) -> Result<Vec<u32>> {
        self.forward(input, |b, logits, r| b.argmax(logits, r))
    }

    fn samples_on_device(&self) -> bool {
        self.device_sampler
    }

    fn execute_sampled(&mut self, input: &StepInput<'_>, draws: &[DeviceDraw]) -> Result<Vec<u32>> {
        self.forward(input, |b, logits, r| b.sample(logits, r, draws))
    }

    fn as_profiled(&mut self) -> Option<&mut dyn Profiled> {
        Some(self)
    }

    fn swap(
        &mut self,
        out: &[(BlockId, HostBlockId)],
        ins: &[(HostBlockId, BlockId)],
    ) -> Result<()> {
        let c = &self.spec.config;
        let per = self.shape.block_size as usize * (c.num_kv_heads * c.head_dim) as usize;
        super::check_swap(out, ins, self.shape.num_blocks, self.shape.num_host_blocks)
            .map_err(|m| err(CudaError::Unsupported(m)))?;
        let r = |b: u32| b as usize * per..(b as usize + 1) * per;
        for l in 0..self.k_cache.len() {
            for &(d, hb) in out {
                self.stream
                    .memcpy_dtoh(&self.k_cache[l].slice(r(d.0)), &mut self.k_host[l][r(hb.0)])
                    .map_err(err)?;
                self.stream
                    .memcpy_dtoh(&self.v_cache[l].slice(r(d.0)), &mut self.v_host[l][r(hb.0)])
                    .map_err(err)?;
            }
            for &(hb, d) in ins {
                self.stream
                    .memcpy_htod(
                        &self.k_host[l][r(hb.0)],
                        &mut self.k_cache[l].slice_mut(r(d.0)),
                    )
                    .map_err(err)?;
                self.stream
                    .memcpy_htod(
                        &self.v_host[l][r(hb.0)],
                        &mut self.v_cache[l].slice_mut(r(d.0)),
                    )
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
