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

use super::cpu::{CacheShape, CpuWeights};
use super::{Backend, Logits, LogitsFor, StepInput};
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

mod tuned_gemm;
pub use tuned_gemm::TunedShape;

/// Kernel sources, in the order they are compiled; each is prefixed with `common.cuh`.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("layers.cu", include_str!("../../../../kernels/layers.cu")),
    (
        "attention.cu",
        include_str!("../../../../kernels/attention.cu"),
    ),
    ("sample.cu", include_str!("../../../../kernels/sample.cu")),
];
const COMMON: &str = include_str!("../../../../kernels/common.cuh");

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

/// Which generation of kernels a backend runs (see `kernels/attention.cu`). Both are built into
/// every binary so that one GPU run can measure one against the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSet {
    /// `paged_attention_scalar` (2-byte loads, a warp per key); for long prefill chunks, cuBLAS
    /// GEMMs over gathered K/V with a separate causal softmax; `silu_mul` (2-byte loads).
    V1,
    /// `paged_decode_<head_dim>` and `flash_prefill_<head_dim>` (tensor-core mma.sync, a GQA
    /// group's heads or a chunk's tokens as the MMA rows, online softmax on the fragments) and
    /// `silu_mul8`; v1's kernel wherever a v2 kernel does not fit (head dims outside
    /// 16/32/64/128 or a GPU older than sm_80; intermediate sizes not a multiple of 8).
    V2,
}

impl KernelSet {
    /// The setting from `VAJRA_CUDA_KERNELS` (`v1` or `v2`; unset means `v2`).
    ///
    /// # Errors
    /// Any other value, named with the allowed ones.
    pub fn from_env() -> Result<Self> {
        env_choice(
            "VAJRA_CUDA_KERNELS",
            &[("v1", KernelSet::V1), ("v2", KernelSet::V2)],
            KernelSet::V2,
        )
    }
}

/// The value of the environment variable `var` among `choices` (`default` when unset).
///
/// # Errors
/// Any other value (or one that is not Unicode), named with the allowed ones.
fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)], default: T) -> Result<T> {
    let allowed = || {
        choices
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Ok(v) => choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, c)| *c)
            .ok_or_else(|| EngineError::invalid(var, &v, allowed())),
        Err(e) => Err(EngineError::invalid(var, e.to_string(), allowed())),
    }
}

fn err(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend {
        backend: "cuda".into(),
        message: message.to_string(),
    }
}

/// Whether a CUDA device can be used, and if not, why (missing driver library, NVRTC or
/// cuBLAS, or no device).
///
/// # Errors
/// A message saying what is missing.
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries; they call nothing in them.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    if !nvrtc {
        return Err("no NVRTC (libnvrtc.so.13) on the library path".into());
    }
    if !cublas {
        return Err("no cuBLAS (libcublas.so.13) on the library path".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("the CUDA driver reports no device".into()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
    }
}

/// Compiles every kernel source to PTX for `arch` (e.g. `sm_90`).
///
/// # Errors
/// NVRTC is missing, or a source fails to compile (the log names the file and line).
pub fn compile_kernels(arch: &'static str) -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    /// PTX text of every source, per architecture.
    type PtxCache = HashMap<&'static str, Vec<(&'static str, String)>>;
    static CACHE: OnceLock<Mutex<PtxCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().expect("ptx cache lock").get(arch) {
        return Ok(hit
            .iter()
            .map(|(n, src)| (*n, cudarc::nvrtc::Ptx::from_src(src.clone())))
            .collect());
    }
    // SAFETY: only dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(err("no NVRTC (libnvrtc.so.13) on the library path"));
    }
    let mut out = Vec::new();
    let mut texts = Vec::new();
    for (name, src) in KERNEL_SOURCES {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some((*name).into()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts)
            .map_err(|e| err(format!("NVRTC compiling kernels/{name} for {arch}: {e}")))?;
        texts.push((*name, ptx.to_src()));
        out.push((*name, ptx));
    }
    cache.lock().expect("ptx cache lock").insert(arch, texts);
    Ok(out)
}

struct Kernels {
    embed: CudaFunction,
    add_rms_norm: CudaFunction,
    rms_norm_rows: CudaFunction,
    add_bias: CudaFunction,
    rope: CudaFunction,
    kv_write: CudaFunction,
    /// `rope` and `kv_write` in one launch (v2).
    rope_kv_write: CudaFunction,
    silu_mul: CudaFunction,
    silu_mul8: CudaFunction,
    fill_uniform: CudaFunction,
    paged_attention_scalar: CudaFunction,
    /// `paged_decode_<d>` for each of MMA_HEAD_DIMS, in order (one K/V tile per warp).
    paged_decode: Vec<CudaFunction>,
    /// `paged_decode2_<d>`: the same with the next tile's copy in flight (two stages).
    paged_decode2: Vec<CudaFunction>,
    /// `flash_prefill_<d>` for each of MMA_HEAD_DIMS, in order.
    flash_prefill: Vec<CudaFunction>,
    attention_combine: CudaFunction,
    gather_kv: CudaFunction,
    causal_softmax: CudaFunction,
    argmax_rows: CudaFunction,
    sample_rows: CudaFunction,
}

struct GpuLayer {
    attn_norm: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    qkv_bias: Option<CudaSlice<bf16>>,
    o: CudaSlice<bf16>,
    mlp_norm: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

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
    Loaded(&'a CpuWeights),
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
        let w = CpuWeights::load(dir, &spec)?;
        let shape = shape_of(&spec);
        Self::new(spec, WeightSource::Loaded(&w), shape)
    }

    /// A backend for `spec` with the given weights and cache on device 0.
    ///
    /// # Errors
    /// As [`CudaBackend::load`].
    pub fn new(spec: ModelSpec, weights: WeightSource<'_>, shape: CacheShape) -> Result<Self> {
        probe().map_err(err)?;
        let ctx = CudaContext::new(0).map_err(err)?;
        // One stream does all the work, so cudarc's per-argument event tracking (for safety
        // across streams) is pure overhead: it recorded events on every kernel argument, which
        // made small decode kernels launch-bound (measured: 15–40 µs per launch).
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let kernel_set = KernelSet::from_env()?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(err)?
            .max(1) as u32;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let device_name = ctx.name().map_err(err)?;
        if ctx.has_async_alloc() {
            // Eager steps allocate and free their buffers through the device's stream-ordered
            // pool, whose default release threshold (0) hands freed memory back to the driver
            // at every synchronisation, so each step would map it again. Keep it pooled.
            let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
            let mut keep = u64::MAX;
            // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
            unsafe {
                cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                    .result()
                    .map_err(err)?;
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )
                .result()
                .map_err(err)?;
            }
        }
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(err)?;
        let blas = CudaBlas::new(stream.clone()).map_err(err)?;
        // A workspace of our own (32 MiB, what cuBLAS asks for on Hopper), so that no cuBLAS
        // call allocates one inside a graph capture.
        let blas_workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE).map_err(err)?;
        {
            let (wp, _g) = blas_workspace.device_ptr(&stream);
            // SAFETY: the buffer outlives the handle's use of it (both live in the backend, the
            // workspace dropped after the handle), and holds CUBLAS_WORKSPACE bytes.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    wp as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(err)?;
        }
        let graph_mode = env_choice("VAJRA_CUDA_GRAPHS", &[("off", false), ("on", true)], false)?;
        let tuned = if env_choice(
            "VAJRA_CUDA_GEMM",
            &[("cublas", false), ("tuned", true)],
            false,
        )? {
            Some(RefCell::new(TunedGemm::new()?))
        } else {
            None
        };
        let device_sampler = env_choice(
            "VAJRA_CUDA_SAMPLER",
            &[("host", false), ("device", true)],
            false,
        )?;
        let split_aim = match std::env::var("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM") {
            Err(std::env::VarError::NotPresent) => SplitAim::PerSm(DEFAULT_SPLIT_BLOCKS_PER_SM),
            Ok(v) => v.parse::<SplitAim>().map_err(|_| {
                EngineError::invalid("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM", &v, SPLIT_AIMS)
            })?,
            Err(e) => {
                return Err(EngineError::invalid(
                    "VAJRA_CUDA_SPLIT_BLOCKS_PER_SM",
                    e.to_string(),
                    SPLIT_AIMS,
                ));
            }
        };
        let mut funcs = HashMap::new();
        for (name, ptx) in compile_kernels(arch)? {
            let module = ctx
                .load_module(ptx)
                .map_err(|e| err(format!("loading kernels/{name}: {e}")))?;
            for f in kernel_names(name) {
                funcs.insert(
                    *f,
                    module
                        .load_function(f)
                        .map_err(|e| err(format!("kernel {f}: {e}")))?,
                );
            }
        }
        let take = |n: &str| funcs.get(n).cloned().expect("every kernel name is loaded");
        let k = Kernels {
            embed: take("embed"),
            add_rms_norm: take("add_rms_norm"),
            rms_norm_rows: take("rms_norm_rows"),
            add_bias: take("add_bias"),
            rope: take("rope"),
            kv_write: take("kv_write"),
            rope_kv_write: take("rope_kv_write"),
            silu_mul: take("silu_mul"),
            silu_mul8: take("silu_mul8"),
            fill_uniform: take("fill_uniform"),
            paged_attention_scalar: take("paged_attention_scalar"),
            paged_decode: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("paged_decode_{d}")))
                .collect(),
            paged_decode2: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("paged_decode2_{d}")))
                .collect(),
            flash_prefill: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("flash_prefill_{d}")))
                .collect(),
            attention_combine: take("attention_combine"),
            gather_kv: take("gather_kv"),
            causal_softmax: take("causal_softmax"),
            argmax_rows: take("argmax_rows"),
            sample_rows: take("sample_rows"),
        };
        if major >= 8 {
            // Two-stage decode tiles exceed the 48 KB of shared memory a block gets by default.
            for (f, d) in k.paged_decode2.iter().zip(MMA_HEAD_DIMS) {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    decode_smem_bytes(d, 2) as i32,
                )
                .map_err(err)?;
            }
        }
        let decode_stages = env_choice("VAJRA_CUDA_DECODE_STAGES", &[("1", 1), ("2", 2)], 1)?;
        let c = &spec.config;
        if c.num_heads / c.num_kv_heads > 8 || c.head_dim > 256 {
            return Err(err(format!(
                "{} query heads per KV head and head_dim {}: the attention kernel takes at most 8 and 256",
                c.num_heads / c.num_kv_heads,
                c.head_dim
            )));
        }
        let (h, v, i) = (
            c.hidden_size as usize,
            c.vocab_size as usize,
            c.intermediate_size as usize,
        );
        let (q, kv) = (c.q_width() as usize, c.kv_width() as usize);
        let up = |x: &[f32]| -> Result<CudaSlice<bf16>> {
            let b: Vec<bf16> = x.iter().map(|&f| bf16::from_f32(f)).collect();
            stream.clone_htod(&b).map_err(err)
        };
        let mut seed_counter = 0u64;
        let mut rand = |n: usize, scale: f32, seed: u64| -> Result<CudaSlice<bf16>> {
            let mut s = stream.alloc_zeros::<bf16>(n).map_err(err)?;
            seed_counter += 1;
            let (n64, sd) = (
                n as u64,
                seed.wrapping_mul(1_000_003).wrapping_add(seed_counter),
            );
            let mut b = stream.launch_builder(&k.fill_uniform);
            b.arg(&mut s).arg(&n64).arg(&sd).arg(&scale);
            // SAFETY: fill_uniform(bf16*, u64 n, u64 seed, float) writes n elements of `s`.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (1024, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(err)?;
            Ok(s)
        };
        let (embed, lm_head, final_norm, layers) = match weights {
            WeightSource::Loaded(w) => {
                let layers = w
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(GpuLayer {
                            attn_norm: up(&l.attn_norm)?,
                            qkv: up(&l.qkv)?,
                            qkv_bias: l.qkv_bias.as_deref().map(up).transpose()?,
                            o: up(&l.o)?,
                            mlp_norm: up(&l.mlp_norm)?,
                            gate_up: up(&l.gate_up)?,
                            down: up(&l.down)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    up(&w.embed)?,
                    w.lm_head.as_deref().map(up).transpose()?,
                    up(&w.final_norm)?,
                    layers,
                )
            }
            WeightSource::Random { seed } => {
                let wscale = 1.0 / (h as f32).sqrt();
                let layers = (0..c.num_layers)
                    .map(|_| {
                        Ok(GpuLayer {
                            attn_norm: rand(h, 1.0, seed)?,
                            qkv: rand((q + 2 * kv) * h, wscale, seed)?,
                            qkv_bias: if c.attention_bias {
                                Some(rand(q + 2 * kv, 0.1, seed)?)
                            } else {
                                None
                            },
                            o: rand(h * q, wscale, seed)?,
                            mlp_norm: rand(h, 1.0, seed)?,
                            gate_up: rand(2 * i * h, wscale, seed)?,
                            down: rand(h * i, 1.0 / (i as f32).sqrt(), seed)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let head = if c.tie_word_embeddings {
                    None
                } else {
                    Some(rand(v * h, wscale, seed)?)
                };
                (rand(v * h, 1.0, seed)?, head, rand(h, 1.0, seed)?, layers)
            }
        };
        let inv: Vec<f32> = spec.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = stream.clone_htod(&inv).map_err(err)?;
        let per_layer = shape.num_blocks as usize * shape.block_size as usize * kv;
        let host = shape.num_host_blocks as usize * shape.block_size as usize * kv;
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..c.num_layers {
            k_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
            v_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
        }
        stream.synchronize().map_err(err)?;
        tracing::info!(device = %device_name, arch, blocks = shape.num_blocks, "cuda backend ready");
        let mut b = CudaBackend {
            k_host: vec![vec![bf16::ZERO; host]; c.num_layers as usize],
            v_host: vec![vec![bf16::ZERO; host]; c.num_layers as usize],
            spec,
            shape,
            device_name,
            stream,
            blas,
            tuned,
            blas_workspace,
            k,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            k_cache,
            v_cache,
            marks: RefCell::new(None),
            kernel_set,
            decode_stages,
            sms,
            split_aim,
            decode_resident: 1,
            cc_major: major,
            graph_mode,
            device_sampler,
            graphs: None,
            graph_stats: GraphStats::default(),
        };
        b.decode_resident = b.decode_occupancy();
        Ok(b)
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

    /// Attention of one long prefill chunk with `flash_prefill_<head_dim>`: K/V read from the
    /// paged cache through the request's block table, output into the chunk's rows of `attn`.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention(
        &self,
        f: &CudaFunction,
        layer: usize,
        qkv: &CudaSlice<bf16>,
        attn: &mut CudaSlice<bf16>,
        tables: &CudaView<'_, i32>,
        max_blocks: usize,
        ch: &GemmChunk,
    ) -> Result<()> {
        let c = &self.spec.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let table = tables.slice(ch.seq * max_blocks..(ch.seq + 1) * max_blocks);
        let (bs_i, first, tq, start) = (
            self.shape.block_size as i32,
            ch.first as i32,
            ch.len as i32,
            ch.context as i32,
        );
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        let (nh_i, nkv_i, qkv_w) = (nh as i32, nkv as i32, ((nh + 2 * nkv) * hd) as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        // SAFETY: flash_prefill_<hd>(qkv, k_cache, v_cache, table, block_size, out, first, tq,
        // start, window, q_heads, kv_heads, qkv_width, scale_log2) over (⌈tq/64⌉, q_heads)
        // blocks of 128 threads; qkv and attn hold the step's rows, the table this request's.
        unsafe {
            let mut b = self.stream.launch_builder(f);
            b.arg(qkv)
                .arg(&self.k_cache[layer])
                .arg(&self.v_cache[layer])
                .arg(&table)
                .arg(&bs_i)
                .arg(attn)
                .arg(&first)
                .arg(&tq)
                .arg(&start)
                .arg(&window)
                .arg(&nh_i)
                .arg(&nkv_i)
                .arg(&qkv_w)
                .arg(&scale_log2);
            b.launch(LaunchConfig {
                grid_dim: ((ch.len as u32).div_ceil(64), nh, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        Ok(())
    }

    /// The CUDA driver's version, e.g. `13.0`.
    pub fn driver_version() -> String {
        let mut v = 0i32;
        // SAFETY: writes one int; the driver library was found by `probe` before any backend exists.
        let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        if ok == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
            format!("{}.{}", v / 1000, (v % 1000) / 10)
        } else {
            "unknown".into()
        }
    }

    /// Device-to-device copy bandwidth, GB/s counting bytes read plus bytes written (as
    /// `profiles/measured/h100/device.json` does), over `mib` MiB buffers.
    ///
    /// # Errors
    /// A device failure (e.g. out of memory).
    pub fn copy_bandwidth(&self, mib: usize, reps: usize) -> Result<f64> {
        let n = mib << 19; // bf16 elements
        let src = self.stream.alloc_zeros::<bf16>(n).map_err(err)?;
        let mut dst = self.stream.alloc_zeros::<bf16>(n).map_err(err)?;
        let ev = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        for _ in 0..2 {
            self.stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        }
        let a = ev()?;
        for _ in 0..reps {
            self.stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        }
        let b = ev()?;
        let ms = f64::from(a.elapsed_ms(&b).map_err(err)?) / reps as f64;
        Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
    }

    /// cuBLAS bf16 GEMM rate, TFLOP/s, for `y[t × n] = x[t × k] · w[n × k]ᵀ`.
    ///
    /// # Errors
    /// A device failure.
    pub fn gemm_tflops(&self, t: usize, k: usize, n: usize, reps: usize) -> Result<f64> {
        let x = self.stream.alloc_zeros::<bf16>(t * k).map_err(err)?;
        let w = self.stream.alloc_zeros::<bf16>(n * k).map_err(err)?;
        let mut y = self.stream.alloc_zeros::<bf16>(t * n).map_err(err)?;
        let ev = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        for _ in 0..3 {
            self.gemm(&x, t, k, &w, n, &mut y)?;
        }
        let a = ev()?;
        for _ in 0..reps {
            self.gemm(&x, t, k, &w, n, &mut y)?;
        }
        let b = ev()?;
        let ms = f64::from(a.elapsed_ms(&b).map_err(err)?) / reps as f64;
        Ok(2.0 * (t * k * n) as f64 / (ms * 1e-3) / 1e12)
    }

    /// Records the end of operator `op` while profiling.
    fn mark(&self, op: &'static str) -> Result<()> {
        if let Some(m) = self.marks.borrow_mut().as_mut() {
            let e = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)?;
            m.push((op, e));
        }
        Ok(())
    }

    /// Runs one step with an event after every operator and returns each operator's device
    /// time summed over the step, in ms (per-layer operators summed over all layers).
    ///
    /// # Errors
    /// As [`Backend::execute`].
    pub fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>> {
        *self.marks.borrow_mut() = Some(Vec::new());
        self.mark("start")?;
        let run = self.forward(input, |_, _, _| Ok(()));
        let marks = self.marks.borrow_mut().take().unwrap_or_default();
        run?;
        self.stream.synchronize().map_err(err)?;
        let mut out = BTreeMap::new();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1).map_err(err)?;
            *out.entry(w[1].0).or_insert(0.0) += f64::from(ms);
        }
        Ok(out)
    }

    /// The index of the largest of each of the first `r` rows of `logits`, computed on the
    /// device (only the ids come back).
    fn argmax(&self, logits: &CudaSlice<f32>, r: usize) -> Result<Vec<u32>> {
        self.row_tokens(&self.k.argmax_rows, logits, r, None)
    }

    /// The token of each of the first `r` rows of `logits`, drawn on the device with
    /// `draws[row]` (only the ids come back).
    fn sample(&self, logits: &CudaSlice<f32>, r: usize, draws: &[DeviceDraw]) -> Result<Vec<u32>> {
        super::check_draws(draws.len(), r)?;
        if r == 0 {
            return Ok(Vec::new());
        }
        let words: Vec<u32> = draws.iter().flat_map(DeviceDraw::words).collect();
        let params = self.stream.clone_htod(&words).map_err(err)?;
        self.row_tokens(&self.k.sample_rows, logits, r, Some(&params))
    }

    /// Runs `kernel` (`argmax_rows`, or `sample_rows` with its `params`) with a block of
    /// [`ARGMAX_THREADS`] (or [`SAMPLE_THREADS`]) threads on each of the first `r` rows of
    /// `logits` and copies back the one id per row it writes.
    fn row_tokens(
        &self,
        kernel: &CudaFunction,
        logits: &CudaSlice<f32>,
        r: usize,
        params: Option<&CudaSlice<u32>>,
    ) -> Result<Vec<u32>> {
        if r == 0 {
            return Ok(Vec::new());
        }
        let mut ids = self.stream.alloc_zeros::<i32>(r).map_err(err)?;
        let vocab = self.spec.config.vocab_size as i32;
        let threads = if params.is_some() {
            SAMPLE_THREADS
        } else {
            ARGMAX_THREADS
        };
        // SAFETY: argmax_rows(const float*, int vocab, int* out) and sample_rows(const float*,
        // int vocab, const unsigned* params, int* out), over r rows of `logits`, `params`
        // holding 8 words a row.
        unsafe {
            let mut b = self.stream.launch_builder(kernel);
            b.arg(logits).arg(&vocab);
            if let Some(p) = params {
                b.arg(p);
            }
            b.arg(&mut ids);
            b.launch(LaunchConfig {
                grid_dim: (r as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        let host = self.stream.clone_dtoh(&ids).map_err(err)?;
        Ok(host.into_iter().map(|i| i as u32).collect())
    }

    /// Draws a token from each row of `logits` (a host copy) on the device: the GPU tests hold
    /// `sample_rows` to [`crate::sampler::gumbel::draw`] with this.
    ///
    /// # Errors
    /// A row count other than `draws.len()`, or a device failure.
    pub fn sample_logits(&self, logits: &Logits, draws: &[DeviceDraw]) -> Result<Vec<u32>> {
        if logits.vocab != self.spec.config.vocab_size as usize {
            return Err(err(format!(
                "logits rows of {} values for a vocabulary of {}",
                logits.vocab, self.spec.config.vocab_size
            )));
        }
        let d = self.stream.clone_htod(&logits.data).map_err(err)?;
        self.sample(&d, logits.rows(), draws)
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

    /// `y[t × n] = x[t × k] · w[n × k]ᵀ` (row-major, bf16) through cuBLAS.
    fn gemm(
        &self,
        x: &CudaSlice<bf16>,
        t: usize,
        k: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        if let Some(tuned) = self
            .tuned
            .as_ref()
            .filter(|_| t <= tuned_gemm::MAX_TUNED_TOKENS)
        {
            let shape = (t, k, n);
            let (xp, _gx) = x.device_ptr(&self.stream);
            let (wp, _gw) = w.device_ptr(&self.stream);
            let (yp, _gy) = y.device_ptr_mut(&self.stream);
            let (ws, _gws) = self.blas_workspace.device_ptr(&self.stream);
            let ops = Operands {
                x: xp,
                w: wp,
                y: yp,
            };
            let workspace = (ws, CUBLAS_WORKSPACE);
            if tuned.borrow().run(&self.stream, shape, &ops, workspace)? {
                return Ok(());
            }
            // Tuning times candidates and waits for them: never inside a capture (there a shape
            // without a plan goes to cuBLAS below). In a profiled step it can only happen in the
            // profiler's warm-up round (every grid point runs once first), whose times are
            // dropped, so a profile times the tuned products.
            let capturing = self.stream.capture_status().map_err(err)?
                != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            if !capturing {
                return tuned
                    .borrow_mut()
                    .tune(&self.stream, shape, &ops, workspace)
                    .map_err(|e| err(format!("VAJRA_CUDA_GEMM=tuned: {e}")));
            }
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: t as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: column-major view of the row-major product: C(n×t) = Wᵀ(n×k)·X(k×t); the
        // slices hold n·k, t·k and t·n elements (allocated by the caller for these sizes).
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(err)
    }

    /// Logits in f32: `y[r × v] = x[r × h] · head[v × h]ᵀ`.
    fn gemm_logits(
        &self,
        x: &CudaSlice<bf16>,
        r: usize,
        h: usize,
        head: &CudaSlice<bf16>,
        v: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (hp, _g1) = head.device_ptr(&self.stream);
        let (xp, _g2) = x.device_ptr(&self.stream);
        let (yp, _g3) = y.device_ptr_mut(&self.stream);
        // SAFETY: as `gemm`, with an f32 output of r·v elements.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                v as i32,
                r as i32,
                h as i32,
                (&alpha) as *const f32 as *const _,
                hp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                h as i32,
                xp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                h as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                v as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err)
    }

    /// Attention of one long prefill chunk as GEMMs (tensor cores): gather the request's
    /// context K/V from the paged cache into contiguous buffers, then per KV head
    /// `S = scale · Q Kᵀ` (f32, batched over the group's query heads), a causal softmax into
    /// bf16 `P`, and `O = P V` written straight into the chunk's rows of `attn`.
    fn gemm_attention(
        &self,
        layer: usize,
        qkv: &CudaSlice<bf16>,
        attn: &mut CudaSlice<bf16>,
        tables: &CudaView<'_, i32>,
        max_blocks: usize,
        ch: &GemmChunk,
    ) -> Result<()> {
        let c = &self.spec.config;
        let st = &self.stream;
        let (hd, nh, nkv) = (
            c.head_dim as usize,
            c.num_heads as usize,
            c.num_kv_heads as usize,
        );
        let group = nh / nkv;
        let (q_w, qkv_w) = (nh * hd, (nh + 2 * nkv) * hd);
        let (tq, ctx) = (ch.len, ch.context + ch.len);
        let mut kbuf = unsafe { st.alloc::<bf16>(nkv * ctx * hd) }.map_err(err)?;
        let mut vbuf = unsafe { st.alloc::<bf16>(nkv * ctx * hd) }.map_err(err)?;
        let mut sbuf = unsafe { st.alloc::<f32>(group * tq * ctx) }.map_err(err)?;
        let mut pbuf = unsafe { st.alloc::<bf16>(group * tq * ctx) }.map_err(err)?;
        let table = tables.slice(ch.seq * max_blocks..(ch.seq + 1) * max_blocks);
        let (bs_i, nkv_i, hd_i, ctx_i, tq_i) = (
            self.shape.block_size as i32,
            nkv as i32,
            hd as i32,
            ctx as i32,
            tq as i32,
        );
        let start = ch.context as i32;
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        // SAFETY: gather_kv(k_cache, v_cache, table, block_size, kv_heads, head_dim, ctx, k_out,
        // v_out) over (ctx, kv_heads) blocks of head_dim threads; buffers hold nkv·ctx·hd.
        unsafe {
            let mut b = st.launch_builder(&self.k.gather_kv);
            b.arg(&self.k_cache[layer])
                .arg(&self.v_cache[layer])
                .arg(&table)
                .arg(&bs_i)
                .arg(&nkv_i)
                .arg(&hd_i)
                .arg(&ctx_i)
                .arg(&mut kbuf)
                .arg(&mut vbuf);
            b.launch(LaunchConfig {
                grid_dim: (ctx as u32, nkv as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        let scale = 1.0f32 / (hd as f32).sqrt();
        let (one, zero) = (1.0f32, 0.0f32);
        let elem = size_of::<bf16>() as u64;
        for g in 0..nkv {
            {
                let (kp, _a) = kbuf.device_ptr(st);
                let (qp, _b) = qkv.device_ptr(st);
                let (sp, _c) = sbuf.device_ptr_mut(st);
                let k0 = kp + (g * ctx * hd) as u64 * elem;
                let q0 = qp + ((ch.first * qkv_w + g * group * hd) as u64) * elem;
                // SAFETY: Sᵀ(ctx × tq) per head = K_g(ctx × hd) · Q_hᵀ(hd × tq), column-major:
                // K_g row-major [ctx][hd] read transposed (lda = hd), Q_h rows of the fused
                // QKV (ldb = qkv_w, next head hd further), S_h contiguous (ldc = ctx).
                unsafe {
                    cudarc::cublas::result::gemm_strided_batched_ex(
                        *self.blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        ctx as i32,
                        tq as i32,
                        hd as i32,
                        (&scale) as *const f32 as *const _,
                        k0 as *const _,
                        cudaDataType_t::CUDA_R_16BF,
                        hd as i32,
                        0,
                        q0 as *const _,
                        cudaDataType_t::CUDA_R_16BF,
                        qkv_w as i32,
                        hd as i64,
                        (&zero) as *const f32 as *const _,
                        sp as *mut _,
                        cudaDataType_t::CUDA_R_32F,
                        ctx as i32,
                        (tq * ctx) as i64,
                        group as i32,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(err)?;
            }
            // SAFETY: causal_softmax(s, p, rows, ctx, start, window) over (tq, group) blocks.
            unsafe {
                let mut b = st.launch_builder(&self.k.causal_softmax);
                b.arg(&sbuf)
                    .arg(&mut pbuf)
                    .arg(&tq_i)
                    .arg(&ctx_i)
                    .arg(&start)
                    .arg(&window);
                b.launch(LaunchConfig {
                    grid_dim: (tq as u32, group as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
            let (vp, _a) = vbuf.device_ptr(st);
            let (pp, _b) = pbuf.device_ptr(st);
            let (op, _c) = attn.device_ptr_mut(st);
            let v0 = vp + (g * ctx * hd) as u64 * elem;
            let o0 = op + ((ch.first * q_w + g * group * hd) as u64) * elem;
            // SAFETY: O_hᵀ(hd × tq) = V_gᵀ(hd × ctx) · P_hᵀ(ctx × tq), column-major: V_g
            // row-major [ctx][hd] (lda = hd), P_h row-major [tq][ctx] (ldb = ctx), O_h into the
            // chunk's rows of attn (ldc = q_w, next head hd further).
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    cublasOperation_t::CUBLAS_OP_N,
                    cublasOperation_t::CUBLAS_OP_N,
                    hd as i32,
                    tq as i32,
                    ctx as i32,
                    (&one) as *const f32 as *const _,
                    v0 as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    hd as i32,
                    0,
                    pp as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    ctx as i32,
                    (tq * ctx) as i64,
                    (&zero) as *const f32 as *const _,
                    o0 as *mut _,
                    cudaDataType_t::CUDA_R_16BF,
                    q_w as i32,
                    hd as i64,
                    group as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(err)?;
        }
        Ok(())
    }

    /// The split-K partitions of a step's per-token attention: `listed` tokens, the longest
    /// context `max_ctx`; `mma` says whether v2's `paged_decode` runs (else v1's kernel).
    fn decode_splits(&self, listed: usize, max_ctx: u32, mma: bool) -> u32 {
        let pairs = listed * self.spec.config.num_kv_heads as usize;
        match self.split_aim {
            SplitAim::Waves if mma => {
                split_count_waves(pairs, self.decode_resident * self.sms, max_ctx)
            }
            SplitAim::Waves => {
                split_count(pairs, DEFAULT_SPLIT_BLOCKS_PER_SM * self.sms, max_ctx, mma)
            }
            SplitAim::PerSm(n) => split_count(pairs, n * self.sms, max_ctx, mma),
        }
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

    /// Runs the forward pass, then `read` on the f32 logits it left on the device (the first
    /// `rows` rows of the buffer are this step's).
    fn forward<R>(
        &mut self,
        input: &StepInput<'_>,
        read: impl FnOnce(&Self, &CudaSlice<f32>, usize) -> Result<R>,
    ) -> Result<R> {
        let vocab = self.spec.config.vocab_size;
        input
            .check(self.shape.num_blocks, self.shape.block_size, vocab)
            .map_err(err)?;
        if let Some(batch) = self.graph_batch(input) {
            let mut g = self.graphs.take().expect("graph_batch found the graphs");
            let run = self.replay_decode(&mut g, input, batch);
            let out = run.and_then(|()| read(self, &g.bufs.logits, input.seqs.len()));
            // A failed capture turned graphs off: their buffers go too.
            if self.graph_mode {
                self.graphs = Some(g);
            }
            return out;
        }
        let plan = StepPlan::new(input, self.shape.block_size as usize, None);
        if plan.t > 65_535 {
            return Err(err(format!(
                "{} tokens in one step: at most 65535 (a CUDA grid dimension)",
                plan.t
            )));
        }
        let mma = self.decode_kernel().is_some();
        let splits = self.decode_splits(plan.listed, plan.max_ctx, mma);
        let c = &self.spec.config;
        let ws_parts = if splits > 1 {
            plan.t * c.num_heads as usize * splits as usize
        } else {
            1
        };
        // paged_decode's finished-split counters per (token, KV head); one unused element
        // where nothing counts.
        let done = if splits > 1 && mma {
            plan.t * c.num_kv_heads as usize
        } else {
            1
        };
        let ints = self.stream.clone_htod(&plan.ints).map_err(err)?;
        let mut bufs = StepBuffers::new(&self.stream, c, ints, plan.t, plan.rows, ws_parts, done)?;
        self.launch_step(&plan, splits, &mut bufs)?;
        read(self, &bufs.logits, plan.rows)
    }

    /// The captured batch size a step would replay as a CUDA graph, if graphs are on and the
    /// step qualifies: every request decodes one token and samples it, at most the largest
    /// captured batch, block tables within the graphs' width, v2's decode kernel, not profiling.
    fn graph_batch(&mut self, input: &StepInput<'_>) -> Option<usize> {
        if !self.graph_mode || self.marks.borrow().is_some() || self.decode_kernel().is_none() {
            return None;
        }
        let n = input.seqs.len();
        let decode = input
            .seqs
            .iter()
            .all(|s| s.tokens.len() == 1 && (s.sample || input.logits_for == LogitsFor::AllTokens));
        if n == 0 || !decode {
            return None;
        }
        let batch = GRAPH_BATCHES.iter().copied().find(|&b| b >= n)?;
        if self.graphs.is_none() {
            match DecodeGraphs::new(self) {
                Ok(g) => self.graphs = Some(g),
                Err(e) => {
                    let why = format!("the graphs' buffers could not be allocated ({e})");
                    tracing::warn!("CUDA graphs off: {why}");
                    self.graph_stats.failure = Some(why);
                    self.graph_mode = false;
                    return None;
                }
            }
        }
        let width = self.graphs.as_ref().map_or(0, |g| g.max_blocks);
        input
            .seqs
            .iter()
            .all(|s| s.block_table.len() <= width)
            .then_some(batch)
    }

    /// Runs a decode step of `input.seqs.len()` requests padded to `batch` rows from its CUDA
    /// graph. A (batch, split-K) pair seen for the first time runs eagerly on the graphs'
    /// buffers (which also loads every kernel it needs), and its launches are then captured for
    /// the next steps; a failed capture turns graphs off (with a warning) and keeps the eager
    /// result.
    fn replay_decode(
        &mut self,
        g: &mut DecodeGraphs,
        input: &StepInput<'_>,
        batch: usize,
    ) -> Result<()> {
        let bs = self.shape.block_size as usize;
        let plan = StepPlan::new(input, bs, Some((batch, g.max_blocks)));
        let splits = self.decode_splits(batch, plan.max_ctx, true);
        // The graph's kernels read the index arrays at fixed addresses: copy this step's there
        // (stream-ordered after the previous step, before the graph).
        self.stream
            .memcpy_htod(&plan.ints, &mut g.bufs.ints)
            .map_err(err)?;
        if let Some(graph) = g.graphs.get(&(batch, splits)) {
            graph.launch().map_err(err)?;
            self.graph_stats.replayed += 1;
            return Ok(());
        }
        self.launch_step(&plan, splits, &mut g.bufs)?;
        // The capture records the launches without running them: the eager run above is this
        // step's result. Once begun, the capture must end whatever happens inside it.
        let captured = self
            .stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(err)
            .and_then(|()| {
                let launched = self.launch_step(&plan, splits, &mut g.bufs);
                let ended = self
                    .stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(err);
                match (launched, ended) {
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    (Ok(()), Ok(None)) => Err(err("the capture recorded no graph")),
                    (Ok(()), Ok(Some(graph))) => graph.upload().map_err(err).map(|()| graph),
                }
            });
        match captured {
            Ok(graph) => {
                g.graphs.insert((batch, splits), graph);
                self.graph_stats.captured += 1;
            }
            Err(e) => {
                tracing::warn!(
                    batch,
                    splits,
                    "CUDA graph capture failed ({e}); decode steps run without graphs"
                );
                self.graph_stats.failure =
                    Some(format!("capture of batch {batch}, {splits} splits: {e}"));
                self.graph_mode = false;
            }
        }
        Ok(())
    }

    /// Launches a whole step, embedding to LM head, over `bufs`, whose `ints` already hold
    /// `plan`'s index arrays. It allocates nothing and waits on nothing unless v1's chunk
    /// attention runs (`gemm_attention` allocates), so a decode step's launches can be
    /// captured into a CUDA graph as they are.
    fn launch_step(&mut self, plan: &StepPlan, splits: u32, bufs: &mut StepBuffers) -> Result<()> {
        let c = &self.spec.config;
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let inter = c.intermediate_size as usize;
        let vocab = c.vocab_size as usize;
        let eps = c.rms_norm_eps as f32;
        let (t, listed, r, max_blocks) = (plan.t, plan.listed, plan.rows, plan.max_blocks);
        let st = self.stream.clone();
        let StepBuffers {
            ints,
            x,
            hn,
            qkv,
            attn,
            proj,
            gu,
            act,
            sel,
            ws_acc,
            ws_ml,
            done,
            logits,
        } = bufs;
        let (d_ids, d_pos, d_seq, d_slots, d_list, d_rows, d_tables) = (
            ints.slice(plan.part(Part::Ids)),
            ints.slice(plan.part(Part::Pos)),
            ints.slice(plan.part(Part::Seq)),
            ints.slice(plan.part(Part::Slots)),
            ints.slice(plan.part(Part::List)),
            ints.slice(plan.part(Part::Rows)),
            ints.slice(plan.part(Part::Tables)),
        );
        let mma_decode = self.decode_kernel();
        let decode_smem = decode_smem_bytes(hd as u32, self.decode_stages);
        let flash = self.mma_kernel(&self.k.flash_prefill).cloned();
        let rows_cfg = |n: usize| LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let norm_cfg = |n: usize| LaunchConfig {
            block_dim: (NORM_THREADS, 1, 1),
            ..rows_cfg(n)
        };
        let (h_i, qkv_i, q_i, kv_i, inter_i, hd_i) = (
            h as i32,
            qkv_w as i32,
            q_w as i32,
            kv_w as i32,
            inter as i32,
            hd as i32,
        );
        let rot_heads = (nh + nkv) as u32;
        let bs_i = self.shape.block_size as i32;
        let (nh_i, nkv_i, mb_i) = (nh as i32, nkv as i32, max_blocks as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let scale_log2 = std::f32::consts::LOG2_E * scale;
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        let null = 0u64;
        let splits_i = splits as i32;

        // SAFETY (every launch below): argument lists match the kernel signatures in kernels/,
        // and every buffer holds at least the t rows (or r rows) it is launched over.
        unsafe {
            let mut b = st.launch_builder(&self.k.embed);
            b.arg(&d_ids).arg(&self.embed).arg(&mut *x).arg(&h_i);
            b.launch(rows_cfg(t)).map_err(err)?;
        }
        self.mark("emb")?;
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            unsafe {
                let mut b = st.launch_builder(&self.k.add_rms_norm);
                b.arg(&mut *x);
                if l == 0 {
                    b.arg(&null);
                } else {
                    b.arg(&*proj);
                }
                b.arg(&layer.attn_norm).arg(&mut *hn).arg(&h_i).arg(&eps);
                b.launch(norm_cfg(t)).map_err(err)?;
            }
            self.mark("input_layernorm")?;
            self.gemm(hn, t, h, &layer.qkv, qkv_w, qkv)?;
            if let Some(bias) = &layer.qkv_bias {
                unsafe {
                    let mut b = st.launch_builder(&self.k.add_bias);
                    b.arg(&mut *qkv).arg(bias).arg(&qkv_i);
                    b.launch(rows_cfg(t)).map_err(err)?;
                }
            }
            self.mark("attn_pre_proj")?;
            let pair_threads = (hd as u32 / 2).div_ceil(32) * 32;
            if self.kernel_set == KernelSet::V2 {
                // One launch rotates Q and K and stores K and V (the profile's KV-save is 0).
                unsafe {
                    let mut b = st.launch_builder(&self.k.rope_kv_write);
                    b.arg(&mut *qkv)
                        .arg(&d_pos)
                        .arg(&self.inv_freq)
                        .arg(&d_slots)
                        .arg(&mut self.k_cache[l])
                        .arg(&mut self.v_cache[l])
                        .arg(&qkv_i)
                        .arg(&nh_i)
                        .arg(&nkv_i)
                        .arg(&hd_i);
                    b.launch(LaunchConfig {
                        grid_dim: (t as u32, rot_heads + nkv as u32, 1),
                        block_dim: (pair_threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
                    .map_err(err)?;
                }
                self.mark("attn_rope")?;
            } else {
                unsafe {
                    let mut b = st.launch_builder(&self.k.rope);
                    b.arg(&mut *qkv)
                        .arg(&d_pos)
                        .arg(&self.inv_freq)
                        .arg(&qkv_i)
                        .arg(&hd_i);
                    b.launch(LaunchConfig {
                        grid_dim: (t as u32, rot_heads, 1),
                        block_dim: (pair_threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
                    .map_err(err)?;
                }
                self.mark("attn_rope")?;
                unsafe {
                    let mut b = st.launch_builder(&self.k.kv_write);
                    b.arg(&*qkv)
                        .arg(&mut self.k_cache[l])
                        .arg(&mut self.v_cache[l])
                        .arg(&d_slots)
                        .arg(&qkv_i)
                        .arg(&q_i)
                        .arg(&kv_i);
                    b.launch(rows_cfg(t)).map_err(err)?;
                }
            }
            self.mark("attn_kv_cache_save")?;
            for ch in &plan.chunks {
                match &flash {
                    Some(f) => self.flash_attention(f, l, qkv, attn, &d_tables, max_blocks, ch)?,
                    None => self.gemm_attention(l, qkv, attn, &d_tables, max_blocks, ch)?,
                }
            }
            if listed > 0 {
                unsafe {
                    let mut b = st.launch_builder(
                        mma_decode
                            .as_ref()
                            .unwrap_or(&self.k.paged_attention_scalar),
                    );
                    b.arg(&*qkv)
                        .arg(&self.k_cache[l])
                        .arg(&self.v_cache[l])
                        .arg(&mut *attn)
                        .arg(&mut *ws_acc)
                        .arg(&mut *ws_ml)
                        .arg(&d_list)
                        .arg(&d_seq)
                        .arg(&d_pos)
                        .arg(&d_tables)
                        .arg(&mb_i)
                        .arg(&bs_i)
                        .arg(&nh_i)
                        .arg(&nkv_i);
                    // paged_decode_<hd>(…, kv_heads, scale_log2, window, done);
                    // paged_attention_scalar(…, kv_heads, head_dim, qkv_width, scale, window).
                    if mma_decode.is_some() {
                        b.arg(&scale_log2).arg(&window).arg(&mut *done);
                    } else {
                        b.arg(&hd_i).arg(&qkv_i).arg(&scale).arg(&window);
                    }
                    b.launch(LaunchConfig {
                        grid_dim: (listed as u32, nkv as u32, splits),
                        block_dim: (ATT_THREADS, 1, 1),
                        shared_mem_bytes: if mma_decode.is_some() { decode_smem } else { 0 },
                    })
                    .map_err(err)?;
                    // paged_decode merges its own splits.
                    if splits > 1 && mma_decode.is_none() {
                        let mut b = st.launch_builder(&self.k.attention_combine);
                        b.arg(&*ws_acc)
                            .arg(&*ws_ml)
                            .arg(&mut *attn)
                            .arg(&d_list)
                            .arg(&nh_i)
                            .arg(&hd_i)
                            .arg(&splits_i);
                        b.launch(LaunchConfig {
                            grid_dim: (listed as u32, nh as u32, 1),
                            block_dim: (ATT_THREADS, 1, 1),
                            shared_mem_bytes: 0,
                        })
                        .map_err(err)?;
                    }
                }
            }
            self.mark("attn")?;
            self.gemm(attn, t, q_w, &layer.o, h, proj)?;
            self.mark("attn_post_proj")?;
            unsafe {
                let mut b = st.launch_builder(&self.k.add_rms_norm);
                b.arg(&mut *x)
                    .arg(&*proj)
                    .arg(&layer.mlp_norm)
                    .arg(&mut *hn)
                    .arg(&h_i)
                    .arg(&eps);
                b.launch(norm_cfg(t)).map_err(err)?;
            }
            self.mark("post_attention_layernorm")?;
            self.gemm(hn, t, h, &layer.gate_up, 2 * inter, gu)?;
            self.mark("mlp_up_proj")?;
            unsafe {
                let (f, per_thread) = if self.kernel_set == KernelSet::V2 && inter.is_multiple_of(8)
                {
                    (&self.k.silu_mul8, 8)
                } else {
                    (&self.k.silu_mul, 1)
                };
                let mut b = st.launch_builder(f);
                b.arg(&*gu).arg(&mut *act).arg(&inter_i);
                b.launch(LaunchConfig {
                    grid_dim: (
                        inter.div_ceil(per_thread * ROW_THREADS as usize) as u32,
                        t as u32,
                        1,
                    ),
                    block_dim: (ROW_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
            self.mark("mlp_act")?;
            self.gemm(act, t, inter, &layer.down, h, proj)?;
            self.mark("mlp_down_proj")?;
        }
        // Last residual add (the normed output is unused), then the final norm of the rows wanted.
        unsafe {
            let mut b = st.launch_builder(&self.k.add_rms_norm);
            b.arg(&mut *x)
                .arg(&*proj)
                .arg(&self.final_norm)
                .arg(&mut *hn)
                .arg(&h_i)
                .arg(&eps);
            b.launch(norm_cfg(t)).map_err(err)?;
            let mut b = st.launch_builder(&self.k.rms_norm_rows);
            b.arg(&*x)
                .arg(&d_rows)
                .arg(&self.final_norm)
                .arg(&mut *sel)
                .arg(&h_i)
                .arg(&eps);
            if r > 0 {
                b.launch(norm_cfg(r)).map_err(err)?;
            }
        }
        self.mark("final_norm")?;
        if r > 0 {
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            self.gemm_logits(sel, r, h, head, vocab, logits)?;
        }
        self.mark("lm_head")?;
        Ok(())
    }
}

/// Split-K partitions for `pairs` (token, KV head) pairs, aiming at `target` blocks in all, the
/// longest context `max_ctx`; `mma`: v2's `paged_decode` (else v1's kernel).
fn split_count(pairs: usize, target: u32, max_ctx: u32, mma: bool) -> u32 {
    let pairs = pairs.clamp(1, u32::MAX as usize) as u32;
    if pairs >= target {
        1
    } else if mma {
        // About `target` blocks, but at least 64 keys (a 16-key tile for each of the block's 4
        // warps) each.
        target
            .div_ceil(pairs)
            .min(max_ctx.div_ceil(MIN_KEYS_PER_SPLIT_V2))
            .clamp(1, MAX_SPLITS)
    } else {
        max_ctx.div_ceil(KEYS_PER_SPLIT).clamp(1, MAX_SPLITS)
    }
}

/// v2's split count for `pairs` (token, KV head) pairs on `slots` resident blocks (the decode
/// kernel's occupancy × multiprocessors), the longest context `max_ctx`: with k partitions a
/// step runs ⌈pairs·k / slots⌉ waves of blocks doing 1/k of a pair's keys each, so its time goes
/// as waves / k. Fewest partitions (at least 64 keys each) after which no more cuts that by 5 %:
/// whole waves, without paying for more blocks than that buys.
fn split_count_waves(pairs: usize, slots: u32, max_ctx: u32) -> u32 {
    let most = max_ctx.div_ceil(MIN_KEYS_PER_SPLIT_V2).clamp(1, MAX_SPLITS);
    let (pairs, slots) = (pairs.max(1) as u64, u64::from(slots.max(1)));
    let time = |k: u32| (pairs * u64::from(k)).div_ceil(slots) as f64 / f64::from(k);
    let mut best = (1, time(1));
    for k in 2..=most {
        let t = time(k);
        if t < 0.95 * best.1 {
            best = (k, t);
        }
    }
    best.0
}

/// How split-K sizes the attention grid of a decode step with few (token, KV head) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitAim {
    /// About this many attention blocks per multiprocessor (1–32).
    PerSm(u32),
    /// v2: whole waves of the decode kernel's resident blocks (`split_count_waves`); v1 aims
    /// at 2 blocks per multiprocessor.
    Waves,
}

/// What `VAJRA_CUDA_SPLIT_BLOCKS_PER_SM` and `gpu-bench --split-sweep` accept.
pub const SPLIT_AIMS: &str =
    "an integer from 1 to 32 (attention blocks per multiprocessor), or waves";

impl std::str::FromStr for SplitAim {
    type Err = EngineError;

    fn from_str(v: &str) -> Result<Self> {
        if v == "waves" {
            return Ok(SplitAim::Waves);
        }
        v.parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_SPLIT_BLOCKS_PER_SM).contains(n))
            .map(SplitAim::PerSm)
            .ok_or_else(|| EngineError::invalid("split-K aim", v, SPLIT_AIMS))
    }
}

impl std::fmt::Display for SplitAim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitAim::PerSm(n) => write!(f, "{n}"),
            SplitAim::Waves => f.write_str("waves"),
        }
    }
}

/// Batch sizes a decode step is padded to for its CUDA graph (as vLLM's capture sizes: 1, 2,
/// 4, then every multiple of 8), up to [`GRAPH_MAX_BATCH`]; larger decode steps run eagerly.
const GRAPH_BATCHES: [usize; 19] = [
    1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
];
/// The largest decode batch replayed from a CUDA graph.
const GRAPH_MAX_BATCH: usize = GRAPH_BATCHES[GRAPH_BATCHES.len() - 1];

/// Counts of the decode steps that went through CUDA graphs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured (one per (padded batch, split-K partitions) pair seen).
    pub captured: u64,
    /// Steps replayed from a captured graph.
    pub replayed: u64,
    /// Why graphs were turned off, if a capture (or the graphs' buffers) failed.
    pub failure: Option<String>,
}

/// The CUDA graphs of decode steps and the buffers they all run on. The graphs hold these
/// buffers' addresses, so the buffers live as long as the graphs; one set serves every batch
/// size (a step uses the first rows), since one step runs at a time.
struct DecodeGraphs {
    /// By (padded batch, split-K partitions): the two numbers a decode step's launches depend
    /// on besides the buffers. Dropped before the buffers.
    graphs: HashMap<(usize, u32), CudaGraph>,
    /// Block-table columns: enough for `max_model_len` (or the whole cache, if smaller).
    max_blocks: usize,
    bufs: StepBuffers,
}

impl DecodeGraphs {
    fn new(b: &CudaBackend) -> Result<Self> {
        let c = &b.spec.config;
        let bs = b.shape.block_size as usize;
        let cap = (c.max_model_len as usize).min(b.shape.num_blocks as usize * bs);
        let max_blocks = cap.div_ceil(bs).max(1);
        // Split-K partials: the most any captured batch can need (its splits at the longest
        // context a table of `max_blocks` holds, which may pass `cap` by up to a block).
        let longest = (max_blocks * bs).min(u32::MAX as usize) as u32;
        let ws_parts = GRAPH_BATCHES
            .iter()
            .map(|&n| n * c.num_heads as usize * b.decode_splits(n, longest, true) as usize)
            .max()
            .unwrap_or(1);
        let ints = b
            .stream
            .alloc_zeros::<i32>(StepPlan::ints_len(GRAPH_MAX_BATCH, max_blocks))
            .map_err(err)?;
        let bufs = StepBuffers::new(
            &b.stream,
            c,
            ints,
            GRAPH_MAX_BATCH,
            GRAPH_MAX_BATCH,
            ws_parts,
            GRAPH_MAX_BATCH * c.num_kv_heads as usize,
        )?;
        Ok(DecodeGraphs {
            bufs,
            max_blocks,
            graphs: HashMap::new(),
        })
    }
}

/// The device buffers of one step: the packed index arrays, the activations, the split-K
/// partials and the logits.
struct StepBuffers {
    /// The step's [`StepPlan::ints`].
    ints: CudaSlice<i32>,
    /// Residual stream (f32).
    x: CudaSlice<f32>,
    hn: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    proj: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    /// Normed rows of the tokens whose logits are wanted.
    sel: CudaSlice<bf16>,
    ws_acc: CudaSlice<f32>,
    ws_ml: CudaSlice<f32>,
    /// `paged_decode`'s finished-split counters: zero between steps (the merging block resets
    /// its counter).
    done: CudaSlice<i32>,
    logits: CudaSlice<f32>,
}

impl StepBuffers {
    /// Buffers for `t` tokens, `r` logit rows, `ws_parts` split-K partials and `done`
    /// counters, around the index arrays `ints`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        st: &Arc<CudaStream>,
        c: &vajra_core::config::ModelConfig,
        ints: CudaSlice<i32>,
        t: usize,
        r: usize,
        ws_parts: usize,
        done: usize,
    ) -> Result<Self> {
        let (h, hd, inter) = (
            c.hidden_size as usize,
            c.head_dim as usize,
            c.intermediate_size as usize,
        );
        let (q_w, kv_w) = (c.q_width() as usize, c.kv_width() as usize);
        // SAFETY: each buffer is written by a kernel before anything reads it (the residual
        // stream by `embed`, the partials by `paged_decode` before its merge, the logits by the
        // LM head); zero-length buffers are not allowed, so each has at least one element.
        let bf = |n: usize| unsafe { st.alloc::<bf16>(n.max(1)) }.map_err(err);
        let f = |n: usize| unsafe { st.alloc::<f32>(n.max(1)) }.map_err(err);
        Ok(StepBuffers {
            ints,
            x: f(t * h)?,
            hn: bf(t * h)?,
            qkv: bf(t * (q_w + 2 * kv_w))?,
            attn: bf(t * q_w)?,
            proj: bf(t * h)?,
            gu: bf(t * 2 * inter)?,
            act: bf(t * inter)?,
            sel: bf(r * h)?,
            ws_acc: f(ws_parts * hd)?,
            ws_ml: f(ws_parts * 2)?,
            done: st.alloc_zeros::<i32>(done.max(1)).map_err(err)?,
            logits: f(r * c.vocab_size as usize)?,
        })
    }
}

/// The index arrays in [`StepPlan::ints`], in order.
#[derive(Clone, Copy)]
enum Part {
    /// Token ids (`t`).
    Ids,
    /// Positions (`t`).
    Pos,
    /// Each token's request, a row of the block tables (`t`).
    Seq,
    /// Each token's cache slot, `block × block_size + offset`; −1 for padding rows (`t`).
    Slots,
    /// Tokens the per-token attention kernel takes (`listed`).
    List,
    /// Tokens whose logits are wanted (`rows`).
    Rows,
    /// Block tables, `max_blocks` per request (`seqs × max_blocks`).
    Tables,
}

/// The host side of one step: what the kernels index, packed into one upload.
struct StepPlan {
    /// Tokens (rows of the activations).
    t: usize,
    /// Tokens run by the per-token attention kernel (the rest are in `chunks`).
    listed: usize,
    /// Rows of logits.
    rows: usize,
    /// Requests (rows of the block tables).
    seqs: usize,
    /// Columns of the block tables.
    max_blocks: usize,
    /// Longest context among the listed tokens' requests.
    max_ctx: u32,
    /// Prefill chunks whose attention runs chunk-wide.
    chunks: Vec<GemmChunk>,
    /// The [`Part`]s, back to back.
    ints: Vec<i32>,
}

impl StepPlan {
    /// The plan of `input` over `block_size`-token blocks. With `pad = Some((batch, width))`
    /// (a decode step for a CUDA graph: one token per request, each sampled) it has exactly
    /// `batch` rows and `width` table columns: rows past the step's requests read block 0 at
    /// position 0 and write no cache slot.
    fn new(input: &StepInput<'_>, block_size: usize, pad: Option<(usize, usize)>) -> Self {
        let bs = block_size;
        let n = input.seqs.len();
        let (seqs, max_blocks) = pad.unwrap_or_else(|| {
            let widest = input.seqs.iter().map(|s| s.block_table.len()).max();
            (n, widest.unwrap_or(1).max(1))
        });
        let (mut ids, mut pos, mut seq, mut slots) = (vec![], vec![], vec![], vec![]);
        let (mut list, mut rows) = (vec![], vec![]);
        let mut tables = vec![0i32; seqs * max_blocks];
        let mut chunks = Vec::new();
        let mut max_ctx = 0u32;
        for (si, s) in input.seqs.iter().enumerate() {
            for (bi, b) in s.block_table.iter().enumerate() {
                tables[si * max_blocks + bi] = b.0 as i32;
            }
            let first = ids.len();
            if s.tokens.len() >= GEMM_PREFILL_MIN {
                chunks.push(GemmChunk {
                    seq: si,
                    first,
                    len: s.tokens.len(),
                    context: s.context as usize,
                });
            } else {
                list.extend((first..first + s.tokens.len()).map(|i| i as i32));
                max_ctx = max_ctx.max(s.context + s.tokens.len() as u32);
            }
            for (i, &tok) in s.tokens.iter().enumerate() {
                let p = s.context as usize + i;
                ids.push(tok as i32);
                pos.push(p as i32);
                seq.push(si as i32);
                slots.push((s.block_table[p / bs].0 as usize * bs + p % bs) as i32);
                if input.logits_for == LogitsFor::AllTokens || (s.sample && i + 1 == s.tokens.len())
                {
                    rows.push((ids.len() - 1) as i32);
                }
            }
        }
        if let Some((batch, _)) = pad {
            for i in n..batch {
                let i = i as i32;
                ids.push(0);
                pos.push(0);
                seq.push(i);
                slots.push(-1);
                list.push(i);
                rows.push(i);
            }
        }
        let (t, listed, r) = (ids.len(), list.len(), rows.len());
        let mut ints = Vec::with_capacity(Self::ints_len(t, max_blocks));
        for part in [ids, pos, seq, slots, list, rows, tables] {
            ints.extend(part);
        }
        // Zero-length device buffers are not allowed.
        if ints.is_empty() {
            ints.push(0);
        }
        StepPlan {
            t,
            listed,
            rows: r,
            seqs,
            max_blocks,
            max_ctx,
            chunks,
            ints,
        }
    }

    /// Length of the packed arrays of `t` tokens, each listed and each a logit row, and `t`
    /// requests of `max_blocks` columns: the most a step of `t` tokens uploads.
    fn ints_len(t: usize, max_blocks: usize) -> usize {
        6 * t + t * max_blocks
    }

    /// Where `part` lies in [`StepPlan::ints`].
    fn part(&self, part: Part) -> std::ops::Range<usize> {
        let lens = [
            self.t,
            self.t,
            self.t,
            self.t,
            self.listed,
            self.rows,
            self.seqs * self.max_blocks,
        ];
        let i = part as usize;
        let start: usize = lens[..i].iter().sum();
        start..start + lens[i]
    }
}

/// A prefill chunk whose attention runs as GEMMs.
struct GemmChunk {
    /// Index of the request in the step.
    seq: usize,
    /// Index of its first token in the step.
    first: usize,
    /// Tokens in the chunk.
    len: usize,
    /// Tokens already in the cache before it.
    context: usize,
}

fn kernel_names(file: &str) -> &'static [&'static str] {
    match file {
        "layers.cu" => &[
            "embed",
            "add_rms_norm",
            "rms_norm_rows",
            "add_bias",
            "rope",
            "kv_write",
            "rope_kv_write",
            "silu_mul",
            "silu_mul8",
            "fill_uniform",
        ],
        "attention.cu" => &[
            "paged_attention_scalar",
            "paged_decode_16",
            "paged_decode_32",
            "paged_decode_64",
            "paged_decode_128",
            "paged_decode2_16",
            "paged_decode2_32",
            "paged_decode2_64",
            "paged_decode2_128",
            "flash_prefill_16",
            "flash_prefill_32",
            "flash_prefill_64",
            "flash_prefill_128",
            "attention_combine",
            "gather_kv",
            "causal_softmax",
        ],
        "sample.cu" => &["argmax_rows", "sample_rows"],
        _ => &[],
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

    fn as_profiled(&mut self) -> Option<&mut dyn super::Profiled> {
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
            .map_err(err)?;
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
mod tests {
    use super::*;

    /// Runs where libnvrtc.so.13 can be loaded (CI downloads the `nvidia-cuda-nvrtc` wheel);
    /// needs no GPU.
    #[test]
    fn nvrtc_compiles_every_kernel_for_sm90() {
        // SAFETY: only dlopen.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!(
                "SKIPPED nvrtc_compiles_every_kernel_for_sm90: libnvrtc.so.13 is not on the library \
                 path (pip download nvidia-cuda-nvrtc; .ci/run does)"
            );
            return;
        }
        let ptx = compile_kernels("sm_90").unwrap();
        assert_eq!(ptx.len(), KERNEL_SOURCES.len());
        // scripts/gpu-check.sh assembles these with ptxas for the register/spill report.
        if let Some(dir) = std::env::var_os("VAJRA_PTX_DIR") {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, p) in &ptx {
                let file = Path::new(&dir).join(name.replace(".cu", ".ptx"));
                std::fs::write(file, p.to_src()).unwrap();
            }
        }
        for (name, p) in &ptx {
            let text = p.to_src();
            assert!(
                text.contains(".target sm_90"),
                "{name}: not compiled for sm_90"
            );
            for k in kernel_names(name) {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{name}: kernel {k} missing from the PTX"
                );
            }
        }
    }

    fn seq<'a>(
        tokens: &'a [u32],
        context: u32,
        table: &'a [BlockId],
    ) -> super::super::SeqInput<'a> {
        super::super::SeqInput {
            tokens,
            context,
            block_table: table,
            sample: true,
        }
    }

    /// Every part of a plan, by name, as a slice of its packed arrays.
    fn parts(p: &StepPlan) -> Vec<Vec<i32>> {
        [
            Part::Ids,
            Part::Pos,
            Part::Seq,
            Part::Slots,
            Part::List,
            Part::Rows,
            Part::Tables,
        ]
        .into_iter()
        .map(|part| p.ints[p.part(part)].to_vec())
        .collect()
    }

    #[test]
    fn a_step_plan_packs_every_index_array_once_in_order() {
        // A 70-token prefill chunk (chunk-wide attention) over 10 cached tokens, then a decode
        // at position 20 of a two-block table.
        let long: Vec<u32> = (0..70).collect();
        let (ta, tb) = (
            [
                BlockId(7),
                BlockId(3),
                BlockId(9),
                BlockId(4),
                BlockId(5),
                BlockId(6),
            ],
            [BlockId(2), BlockId(8)],
        );
        let input = StepInput {
            seqs: vec![seq(&long, 10, &ta), seq(&[42], 20, &tb)],
            logits_for: LogitsFor::Sampled,
        };
        let p = StepPlan::new(&input, 16, None);
        assert_eq!(
            (p.t, p.listed, p.rows, p.seqs, p.max_blocks),
            (71, 1, 2, 2, 6)
        );
        assert_eq!(p.max_ctx, 21, "only listed tokens' contexts count");
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(
            (p.chunks[0].first, p.chunks[0].len, p.chunks[0].context),
            (0, 70, 10)
        );
        let v = parts(&p);
        assert_eq!(v[0][..3], [0, 1, 2]);
        assert_eq!(v[0][70], 42);
        assert_eq!(v[1][0], 10);
        assert_eq!(v[1][70], 20);
        assert_eq!(v[2][69..], [0, 1]);
        // Position 10 is block 0 (id 7) offset 10; position 20 of b is block 1 (id 8) offset 4.
        assert_eq!(v[3][0], 7 * 16 + 10);
        assert_eq!(v[3][70], 8 * 16 + 4);
        assert_eq!(v[4], [70]);
        assert_eq!(v[5], [69, 70]);
        assert_eq!(v[6], [7, 3, 9, 4, 5, 6, 2, 8, 0, 0, 0, 0]);
        assert_eq!(p.ints.len(), 4 * 71 + 1 + 2 + 12);
        assert!(p.ints.len() <= StepPlan::ints_len(p.t, p.max_blocks));
    }

    #[test]
    fn a_padded_decode_plan_has_the_graphs_shape_and_inert_padding_rows() {
        let (ta, tb, tc) = ([BlockId(1)], [BlockId(2), BlockId(5)], [BlockId(3)]);
        let input = StepInput {
            seqs: vec![seq(&[11], 4, &ta), seq(&[12], 17, &tb), seq(&[13], 0, &tc)],
            logits_for: LogitsFor::Sampled,
        };
        let p = StepPlan::new(&input, 16, Some((4, 8)));
        assert_eq!(
            (p.t, p.listed, p.rows, p.seqs, p.max_blocks),
            (4, 4, 4, 4, 8)
        );
        assert_eq!(p.max_ctx, 18);
        assert!(p.chunks.is_empty());
        let v = parts(&p);
        assert_eq!(v[0], [11, 12, 13, 0]);
        assert_eq!(v[1], [4, 17, 0, 0]);
        // The padding row reads its own (empty) table row and writes no slot.
        assert_eq!(v[2], [0, 1, 2, 3]);
        assert_eq!(v[3], [16 + 4, 5 * 16 + 1, 3 * 16, -1]);
        assert_eq!(v[4], [0, 1, 2, 3]);
        assert_eq!(v[5], [0, 1, 2, 3]);
        assert_eq!(&v[6][..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&v[6][8..10], &[2, 5]);
        assert!(v[6][24..].iter().all(|&b| b == 0));
        // Parts of a padded plan depend only on (batch, width): a graph's fixed addresses.
        assert_eq!(p.ints.len(), StepPlan::ints_len(4, 8));
        assert!(p.ints.len() <= StepPlan::ints_len(GRAPH_MAX_BATCH, 8));
    }

    #[test]
    fn graph_batches_pad_every_decode_batch_to_the_next_capture_size() {
        assert!(GRAPH_BATCHES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(GRAPH_MAX_BATCH, 128);
        for n in 1..=GRAPH_MAX_BATCH {
            let b = GRAPH_BATCHES.iter().copied().find(|&b| b >= n).unwrap();
            assert!(b - n < 8, "batch {n} padded to {b}");
        }
    }

    #[test]
    fn split_count_fills_the_gpu_without_splits_under_64_keys() {
        // H100: 132 SMs, aiming at 2 blocks each. Llama-3-8B's 8 KV heads at batch 1: 33 splits
        // would make 264 blocks, but a 300-token context has only 5 splits of 64 keys.
        assert_eq!(split_count(8, 264, 300, true), 5);
        assert_eq!(split_count(8, 264, 8192, true), 33);
        assert_eq!(split_count(264, 264, 8192, true), 1);
        // Batch 32: 256 pairs, 2 splits; aiming at 3 blocks per SM, 2 as well; at 6, 4.
        assert_eq!(split_count(256, 264, 512, true), 2);
        assert_eq!(split_count(256, 396, 512, true), 2);
        assert_eq!(split_count(256, 792, 512, true), 4);
        assert_eq!(split_count(1, 132, 100_000, true), MAX_SPLITS);
        assert_eq!(split_count(0, 132, 10, true), 1);
        // v1: 32 keys a split whatever the batch, while the GPU is not full.
        assert_eq!(split_count(8, 264, 300, false), 10);
    }

    #[test]
    fn split_count_waves_fills_whole_waves_of_resident_blocks() {
        // H100 with paged_decode_128 at 3 blocks per SM: 396 slots.
        // Batch 32 (256 pairs): 1 split is 0.65 of a wave, 2 are 1.29 (2 waves for 2 halves);
        // 3 make 1.94 waves of thirds.
        assert_eq!(split_count_waves(256, 396, 512), 3);
        // Batch 8 (64 pairs): 6 splits fill one wave (7 or 8 would need a second).
        assert_eq!(split_count_waves(64, 396, 512), 6);
        // Batch 1 (8 pairs): as many as the context allows (8 of 64 keys at 512).
        assert_eq!(split_count_waves(8, 396, 512), 8);
        // A long context: about one wave (49 would fill it, but saves under 5 % over 48).
        assert_eq!(split_count_waves(8, 396, 100_000), 48);
        // Batch 128 (1024 pairs, 2.59 waves): thirds take 8 waves of a third, 2.67 < 3.
        assert_eq!(split_count_waves(1024, 396, 512), 3);
        // Whole waves already, or too short to split.
        assert_eq!(split_count_waves(792, 396, 4096), 1);
        assert_eq!(split_count_waves(8, 396, 64), 1);
        assert_eq!(split_count_waves(0, 0, 10), 1);
    }

    #[test]
    fn split_aims_parse_and_print_as_the_setting_is_written() {
        assert_eq!("waves".parse::<SplitAim>().unwrap(), SplitAim::Waves);
        assert_eq!("4".parse::<SplitAim>().unwrap(), SplitAim::PerSm(4));
        for bad in ["0", "33", "auto", "-1", ""] {
            let e = bad.parse::<SplitAim>().unwrap_err().to_string();
            assert!(e.contains("waves") && e.contains("1 to 32"), "{bad}: {e}");
        }
        assert_eq!(SplitAim::PerSm(3).to_string(), "3");
        assert_eq!(SplitAim::Waves.to_string(), "waves");
    }

    #[test]
    fn probe_explains_a_missing_device_instead_of_panicking() {
        match probe() {
            Ok(()) => eprintln!("a CUDA device is present"),
            Err(why) => assert!(!why.is_empty()),
        }
    }
}
