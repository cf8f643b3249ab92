//! The paged KV cache: blocks, their hashes, and the per-request view of them.
//!
//! - [`pool`]: the flat block pool with reference counts and the intrusive LRU free list.
//! - [`hash`]: chained, seeded block hashes over token ids or prefix groups.
//! - [`manager`]: vLLM-v1-style `get_computed_blocks` / `allocate_slots` / `free` over a
//!   request's [`manager::BlockTable`], plus prefix-cache statistics.
//! - [`host`]: host blocks for swap preemption.

pub mod hash;
pub mod host;
pub mod manager;
pub mod pool;

pub use hash::{BlockHash, SeqContent};
pub use host::HostBlockPool;
pub use manager::{AllocSpec, BlockTable, KvCacheManager, KvStats};
pub use pool::BlockPool;
