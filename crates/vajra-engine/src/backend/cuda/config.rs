//! The backend's settings: which kernels, split-K aim, graphs, tuned products, device sampler,
//! read from the environment in one place.

use super::*;

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

/// The backend's settings. [`CudaConfig::from_env`] reads all of them, once, from the
/// environment (each variable named in its field); [`CudaBackend::with_config`] takes them from
/// code, and the `set_*` methods change them on a running backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaConfig {
    /// `VAJRA_CUDA_KERNELS`: `v1` or `v2` (default).
    pub kernels: KernelSet,
    /// `VAJRA_CUDA_GRAPHS`: `on` replays decode steps from CUDA graphs; `off` (default).
    pub graphs: bool,
    /// `VAJRA_CUDA_GEMM`: `tuned` times cuBLASLt algorithms for the projections of small
    /// steps; `cublas` (default).
    pub tuned_gemm: bool,
    /// `VAJRA_CUDA_SAMPLER`: `device` draws sampled tokens on the GPU; `host` (default).
    pub device_sampler: bool,
    /// `VAJRA_CUDA_SPLIT_BLOCKS_PER_SM`: [`SPLIT_AIMS`] (default 2 blocks per multiprocessor).
    pub split_aim: SplitAim,
    /// `VAJRA_CUDA_DECODE_STAGES`: K/V tiles in flight per warp in v2's decode kernel, `1`
    /// (default) or `2`.
    pub decode_stages: u32,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            kernels: KernelSet::V2,
            graphs: false,
            tuned_gemm: false,
            device_sampler: false,
            split_aim: SplitAim::PerSm(DEFAULT_SPLIT_BLOCKS_PER_SM),
            decode_stages: 1,
        }
    }
}

impl CudaConfig {
    /// The settings from the process environment; unset variables keep the defaults.
    ///
    /// # Errors
    /// A value outside a variable's choices (or not Unicode), named with the allowed ones.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|var| std::env::var(var))
    }

    /// The settings from `get` (a variable's value, as [`std::env::var`] gives it).
    ///
    /// # Errors
    /// As [`CudaConfig::from_env`].
    pub fn from_vars(
        get: impl Fn(&str) -> std::result::Result<String, std::env::VarError>,
    ) -> Result<Self> {
        let d = CudaConfig::default();
        let split_aim = match get("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM") {
            Err(std::env::VarError::NotPresent) => d.split_aim,
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
        Ok(CudaConfig {
            kernels: choice(
                &get,
                "VAJRA_CUDA_KERNELS",
                &[("v1", KernelSet::V1), ("v2", KernelSet::V2)],
                d.kernels,
            )?,
            graphs: choice(
                &get,
                "VAJRA_CUDA_GRAPHS",
                &[("off", false), ("on", true)],
                d.graphs,
            )?,
            tuned_gemm: choice(
                &get,
                "VAJRA_CUDA_GEMM",
                &[("cublas", false), ("tuned", true)],
                d.tuned_gemm,
            )?,
            device_sampler: choice(
                &get,
                "VAJRA_CUDA_SAMPLER",
                &[("host", false), ("device", true)],
                d.device_sampler,
            )?,
            split_aim,
            decode_stages: choice(
                &get,
                "VAJRA_CUDA_DECODE_STAGES",
                &[("1", 1), ("2", 2)],
                d.decode_stages,
            )?,
        })
    }
}

/// The value of variable `var` among `choices` (`default` when unset).
///
/// # Errors
/// Any other value (or one that is not Unicode), named with the allowed ones.
fn choice<T: Copy>(
    get: &impl Fn(&str) -> std::result::Result<String, std::env::VarError>,
    var: &str,
    choices: &[(&str, T)],
    default: T,
) -> Result<T> {
    let allowed = || {
        choices
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match get(var) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Ok(v) => choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, c)| *c)
            .ok_or_else(|| EngineError::invalid(var, &v, allowed())),
        Err(e) => Err(EngineError::invalid(var, e.to_string(), allowed())),
    }
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
