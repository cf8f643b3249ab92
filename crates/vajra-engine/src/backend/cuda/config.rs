//! The backend's settings: which kernels, split-K aim, graphs, tuned products, device sampler.

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
pub(super) fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)], default: T) -> Result<T> {
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
