//! The paged KV cache's sizes, which the engine's scheduler and every backend agree on.

use crate::spec::ModelSpec;

/// Sizes of the paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Tokens per block.
    pub block_size: u32,
    /// Device blocks.
    pub num_blocks: u32,
    /// Host blocks for swap.
    pub num_host_blocks: u32,
}

impl CacheShape {
    /// As many blocks as fit `mib` MiB of f32 K and V for `spec`.
    pub fn for_memory(spec: &ModelSpec, block_size: u32, mib: u64) -> Self {
        Self::for_memory_of(spec, block_size, mib, 4)
    }

    /// As many blocks as fit `mib` MiB of K and V stored in `elem_bytes`-byte elements.
    pub fn for_memory_of(spec: &ModelSpec, block_size: u32, mib: u64, elem_bytes: u64) -> Self {
        let per_block = spec.config.kv_bytes_per_token(1) / u64::from(spec.config.dtype_bytes)
            * elem_bytes
            * u64::from(block_size);
        CacheShape {
            block_size,
            num_blocks: u32::try_from((mib << 20) / per_block.max(1)).unwrap_or(u32::MAX),
            num_host_blocks: 0,
        }
    }
}
