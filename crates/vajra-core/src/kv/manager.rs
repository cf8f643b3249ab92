//! The KV-cache manager: prefix lookup, slot allocation and freeing for one request's
//! [`BlockTable`], with vLLM v1 semantics.
//!
//! Token layout of one `allocate_slots` call:
//!
//! ```text
//!  | computed (in table) | new prefix hits | new tokens (this step or reserved) | lookahead |
//!  0              num_computed       +hits·B                                  total
//!  blocks needed = ceil(total / B); blocks to take = needed - table - hits
//! ```
//!
//! `allocate_slots` returns `None` when the pool is short (the scheduler preempts or stops
//! admitting); the watermark applies only to admission. Hit blocks are touched only when the
//! whole allocation succeeds. `free` drops holders tail-first so the end of a sequence is
//! evicted before its (more shareable) beginning. Full blocks are cached with
//! [`KvCacheManager::cache_full_blocks`] once their tokens are scheduled.

use super::hash::{BlockHash, BlockHasher, SeqContent};
use super::pool::BlockPool;
use crate::config::CacheConfig;
use crate::ids::BlockId;
use serde::Serialize;

/// The KV blocks of one request, in token order, and the hashes of its full blocks.
#[derive(Debug, Clone, Default)]
#[repr(C)]
pub struct BlockTable {
    /// Block ids, block `i` holding tokens `[i·B, (i+1)·B)`.
    pub blocks: Vec<BlockId>,
    /// How many leading blocks of `blocks` have been offered to the cache.
    num_cached: usize,
    /// Hashes of full blocks computed so far (valid across preemption: tokens do not change).
    hashes: Vec<BlockHash>,
    /// The blocks held when the table was last freed, where a re-admitted request looks for
    /// its private blocks.
    freed: Vec<BlockId>,
}

impl BlockTable {
    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The admission watermark of a cache config that sets none and whose policy has no default
/// of its own (vLLM v0's 1 %).
pub const DEFAULT_WATERMARK: f64 = 0.01;

/// What `allocate_slots` should make room for.
#[derive(Debug, Clone, Copy)]
pub struct AllocSpec<'a> {
    /// Tokens already computed and held by the table.
    pub num_computed: u32,
    /// Prefix-hit blocks from [`KvCacheManager::get_computed_blocks`] (for a request being
    /// admitted), appended to the table on success.
    pub new_computed: &'a [BlockId],
    /// Tokens that need slots after the computed and hit tokens.
    pub num_new_tokens: u32,
    /// Keep the watermark free (admission of a waiting request while others run).
    pub apply_watermark: bool,
}

/// Counters of the cache, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KvStats {
    /// Total device blocks.
    pub num_blocks: u32,
    /// Blocks with no holder.
    pub num_free: u32,
    /// Fraction of blocks held.
    pub usage: f64,
    /// Prefix lookups (one per admission).
    pub prefix_queries: u64,
    /// Prompt tokens looked up.
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the cache.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

/// Paged KV-cache manager over a [`BlockPool`].
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: u32,
    /// `log2(block_size)` when it is a power of two (every block size vLLM offers): token →
    /// block arithmetic then shifts instead of dividing (a `div` is ~25 cycles, and a decode
    /// step does several per request).
    block_shift: Option<u32>,
    prefix_caching: bool,
    watermark_blocks: u32,
    hasher: BlockHasher,
    stats: KvStats,
}

impl KvCacheManager {
    /// A manager of `num_blocks` blocks with the given cache settings.
    pub fn new(cfg: &CacheConfig, num_blocks: u32) -> Self {
        let mut pool = BlockPool::new(num_blocks);
        if cfg.enable_prefix_caching {
            pool.reserve_hash_index();
        } else {
            pool.reuse_most_recent_first();
        }
        KvCacheManager {
            pool,
            block_size: cfg.block_size,
            block_shift: cfg
                .block_size
                .is_power_of_two()
                .then(|| cfg.block_size.trailing_zeros()),
            prefix_caching: cfg.enable_prefix_caching,
            watermark_blocks: (cfg.watermark.unwrap_or(DEFAULT_WATERMARK) * f64::from(num_blocks))
                .floor() as u32,
            hasher: BlockHasher::new(cfg.hash_seed, cfg.block_size),
            stats: KvStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The underlying pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Total device blocks.
    pub fn num_blocks(&self) -> u32 {
        self.pool.num_blocks()
    }

    /// Free blocks (including evictable cached ones).
    pub fn num_free(&self) -> u32 {
        self.pool.num_free()
    }

    /// Blocks kept free at admission.
    pub fn watermark_blocks(&self) -> u32 {
        self.watermark_blocks
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: u32) -> u32 {
        let full = self.full_blocks(tokens);
        full + u32::from(full * self.block_size != tokens)
    }

    /// Blocks that `tokens` tokens fill completely.
    pub fn full_blocks(&self, tokens: u32) -> u32 {
        match self.block_shift {
            Some(s) => tokens >> s,
            None => tokens / self.block_size,
        }
    }

    /// Current counters.
    pub fn stats(&self) -> KvStats {
        KvStats {
            num_blocks: self.pool.num_blocks(),
            num_free: self.pool.num_free(),
            usage: self.pool.usage(),
            evictions: self.pool.evictions(),
            ..self.stats
        }
    }

    fn ensure_hashes(&mut self, table: &mut BlockTable, seq: &SeqContent<'_>, upto: usize) {
        while table.hashes.len() < upto {
            let i = table.hashes.len() as u32;
            let parent = table.hashes.last().copied();
            let h = self.hasher.hash_block(seq, parent, i);
            table.hashes.push(h);
        }
    }

    /// The longest run of cached blocks at the start of `seq`, capped so that at least one
    /// token is left to compute (its logits are needed). Returns the hit blocks (not yet
    /// touched) and the number of tokens they hold. Does not count statistics (see
    /// [`Self::record_prefix_query`]).
    pub fn get_computed_blocks(
        &mut self,
        table: &mut BlockTable,
        seq: &SeqContent<'_>,
    ) -> (Vec<BlockId>, u32) {
        if !self.prefix_caching {
            return (Vec::new(), 0);
        }
        let num_tokens = seq.num_tokens();
        let max_blocks = self.full_blocks(num_tokens.saturating_sub(1)) as usize;
        let mut hits = Vec::new();
        for i in 0..max_blocks {
            self.ensure_hashes(table, seq, i + 1);
            let h = table.hashes[i];
            let hit = if h.is_private() {
                table
                    .freed
                    .get(i)
                    .copied()
                    .filter(|&b| self.pool.holds(b, h))
            } else {
                self.pool.lookup(h)
            };
            match hit {
                Some(b) => hits.push(b),
                None => break,
            }
        }
        let hit_tokens = hits.len() as u32 * self.block_size;
        (hits, hit_tokens)
    }

    /// Counts one prefix query of `num_tokens` tokens that found `hit_tokens` cached (called
    /// once per successful admission, so retries of a blocked request are not counted twice).
    pub fn record_prefix_query(&mut self, num_tokens: u32, hit_tokens: u32) {
        self.stats.prefix_queries += 1;
        self.stats.prefix_query_tokens += u64::from(num_tokens);
        self.stats.prefix_hit_tokens += u64::from(hit_tokens);
    }

    /// Read-only, for routing across replicas whose managers share one cache config: the
    /// tokens of `seq` cached in each of `kvs`, written to `out` (no query is counted and
    /// nothing is touched). Each block hash is
    /// computed once for all replicas (not once per replica), and hashing stops at the
    /// deepest hit: with sixteen replicas and long conversations, per-replica hashing was
    /// half of a sessions run.
    ///
    /// # Panics
    /// If `out` is shorter than `kvs`.
    pub fn cached_prefix_tokens_in(
        hasher: &mut BlockHasher,
        seq: &SeqContent<'_>,
        kvs: &[&KvCacheManager],
        out: &mut [u32],
    ) {
        let out = &mut out[..kvs.len()];
        out.fill(0);
        let Some(first) = kvs.first() else { return };
        let bs = first.block_size;
        let max_blocks = first.full_blocks(seq.num_tokens().saturating_sub(1));
        let mut parent = None;
        for i in 0..max_blocks {
            let h = hasher.hash_block(seq, parent, i);
            let mut any = false;
            for (k, n) in kvs.iter().zip(out.iter_mut()) {
                if k.prefix_caching && *n == i * bs && k.pool.lookup(h).is_some() {
                    *n += bs;
                    any = true;
                }
            }
            if !any {
                return;
            }
            parent = Some(h);
        }
    }

    /// A hasher configured as this manager's (for [`Self::cached_prefix_tokens_in`]).
    pub fn hasher(&self) -> BlockHasher {
        self.hasher.clone()
    }

    /// Blocks `allocate_slots` would need to take from the free list for `spec` on `table`
    /// (new blocks plus hit blocks that are currently free).
    pub fn blocks_needed(&self, table: &BlockTable, spec: &AllocSpec<'_>) -> u32 {
        self.new_blocks(table, spec) + self.free_hits(spec)
    }

    /// Fresh blocks `spec` needs beyond the table and its hit blocks.
    fn new_blocks(&self, table: &BlockTable, spec: &AllocSpec<'_>) -> u32 {
        let hit_tokens = spec.new_computed.len() as u32 * self.block_size;
        let total = spec.num_computed.max(hit_tokens) + spec.num_new_tokens;
        let have = table.blocks.len() as u32 + spec.new_computed.len() as u32;
        self.blocks_for(total).saturating_sub(have)
    }

    /// Hit blocks that currently sit in the free list (touching them takes them out).
    fn free_hits(&self, spec: &AllocSpec<'_>) -> u32 {
        spec.new_computed
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count() as u32
    }

    /// Whether [`Self::allocate_slots`] would succeed for `spec` on `table` now.
    pub fn can_allocate(&self, table: &BlockTable, spec: &AllocSpec<'_>) -> bool {
        let reserve = if spec.apply_watermark {
            self.watermark_blocks
        } else {
            0
        };
        self.blocks_needed(table, spec) + reserve <= self.pool.num_free()
    }

    /// Makes room in `table` for `spec`. On success returns how many blocks were appended
    /// (hits and new); on a short pool returns `None` and changes nothing.
    pub fn allocate_slots(&mut self, table: &mut BlockTable, spec: &AllocSpec<'_>) -> Option<u32> {
        let new = self.new_blocks(table, spec);
        if new == 0 && spec.new_computed.is_empty() {
            return Some(0);
        }
        let needed = new + self.free_hits(spec);
        let reserve = if spec.apply_watermark {
            self.watermark_blocks
        } else {
            0
        };
        if needed + reserve > self.pool.num_free() {
            return None;
        }
        self.pool.touch(spec.new_computed);
        table.blocks.extend_from_slice(spec.new_computed);
        let ok = self.pool.allocate_into(new, &mut table.blocks);
        assert!(ok, "free-count check passed but allocation failed");
        Some(spec.new_computed.len() as u32 + new)
    }

    /// Offers the full blocks among the first `num_tokens` tokens of `seq` to the prefix cache.
    pub fn cache_full_blocks(
        &mut self,
        table: &mut BlockTable,
        seq: &SeqContent<'_>,
        num_tokens: u32,
    ) {
        if !self.prefix_caching {
            return;
        }
        let full = (self.full_blocks(num_tokens) as usize).min(table.blocks.len());
        if full <= table.num_cached {
            return;
        }
        self.ensure_hashes(table, seq, full);
        for i in table.num_cached..full {
            self.pool.cache(table.blocks[i], table.hashes[i]);
        }
        table.num_cached = full;
    }

    /// Drops the table's hold on all its blocks, tail first. The blocks stay cached (and
    /// findable) until reused; the table keeps its hashes and the freed ids for a later
    /// re-admission.
    pub fn free(&mut self, table: &mut BlockTable) {
        self.pool.free(table.blocks.iter().rev().copied());
        std::mem::swap(&mut table.freed, &mut table.blocks);
        table.blocks.clear();
        table.num_cached = 0;
    }

    /// Forgets the prefix cache; only succeeds when no block is held.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RequestId;
    use crate::request::Prompt;

    fn mgr(blocks: u32, watermark: f64) -> KvCacheManager {
        let cfg = CacheConfig {
            block_size: 4,
            watermark: Some(watermark),
            ..Default::default()
        };
        KvCacheManager::new(&cfg, blocks)
    }

    fn seq(id: u64, p: &Prompt) -> SeqContent<'_> {
        SeqContent {
            request: RequestId(id),
            prompt: p,
            output: &[],
            num_output: 0,
            salt: None,
        }
    }

    fn spec(num_computed: u32, hits: &[BlockId], n: u32) -> AllocSpec<'_> {
        AllocSpec {
            num_computed,
            new_computed: hits,
            num_new_tokens: n,
            apply_watermark: false,
        }
    }

    #[test]
    fn allocate_slots_takes_ceil_tokens_over_block_size() {
        let mut m = mgr(10, 0.0);
        let mut t = BlockTable::default();
        assert_eq!(m.allocate_slots(&mut t, &spec(0, &[], 9)), Some(3));
        // Three more tokens fit in the third block's free slots.
        assert_eq!(m.allocate_slots(&mut t, &spec(9, &[], 3)), Some(0));
        assert_eq!(m.allocate_slots(&mut t, &spec(12, &[], 1)), Some(1));
        assert_eq!(m.num_free(), 6);
    }

    #[test]
    fn allocate_slots_returns_none_and_changes_nothing_when_short() {
        let mut m = mgr(2, 0.0);
        let mut t = BlockTable::default();
        assert_eq!(m.allocate_slots(&mut t, &spec(0, &[], 9)), None);
        assert!(t.is_empty());
        assert_eq!(m.num_free(), 2);
    }

    #[test]
    fn watermark_applies_only_when_asked_for() {
        let mut m = mgr(10, 0.2);
        let mut t = BlockTable::default();
        let adm = AllocSpec {
            apply_watermark: true,
            ..spec(0, &[], 36)
        };
        assert_eq!(m.allocate_slots(&mut t, &adm), None, "9 + 2 reserved > 10");
        assert_eq!(m.allocate_slots(&mut t, &spec(0, &[], 36)), Some(9));
    }

    #[test]
    fn identical_prefixes_return_identical_blocks_and_leave_one_token_to_compute() {
        let mut m = mgr(16, 0.0);
        let p = Prompt::Tokens((0..8).collect());
        let mut a = BlockTable::default();
        m.allocate_slots(&mut a, &spec(0, &[], 8)).unwrap();
        m.cache_full_blocks(&mut a, &seq(1, &p), 8);
        // Same 8-token prompt: only the first block may be a hit (the last token is computed).
        let mut b = BlockTable::default();
        let (hits, tokens) = m.get_computed_blocks(&mut b, &seq(2, &p));
        assert_eq!((hits.clone(), tokens), (vec![a.blocks[0]], 4));
        m.allocate_slots(&mut b, &spec(0, &hits, 4)).unwrap();
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_eq!(m.pool().ref_count(a.blocks[0]), 2);
        // A 9-token prompt with the same first 8 tokens hits both blocks.
        let p9 = Prompt::Tokens((0..9).collect());
        let mut c = BlockTable::default();
        let (hits, tokens) = m.get_computed_blocks(&mut c, &seq(3, &p9));
        assert_eq!((hits, tokens), (a.blocks.clone(), 8));
        m.record_prefix_query(8, 4);
        m.record_prefix_query(9, 8);
        let s = m.stats();
        assert_eq!((s.prefix_queries, s.prefix_hit_tokens), (2, 12));
    }

    #[test]
    fn freed_blocks_stay_findable_until_reused_and_tail_blocks_go_first() {
        let mut m = mgr(3, 0.0);
        let p = Prompt::Tokens((0..9).collect());
        let mut a = BlockTable::default();
        m.allocate_slots(&mut a, &spec(0, &[], 9)).unwrap();
        m.cache_full_blocks(&mut a, &seq(1, &p), 9);
        let first = a.blocks.clone();
        m.free(&mut a);
        assert_eq!(m.num_free(), 3);
        let mut b = BlockTable::default();
        let (hits, _) = m.get_computed_blocks(&mut b, &seq(2, &p));
        assert_eq!(hits, first[..2].to_vec());
        // Taking one fresh block evicts the tail (third, unhashed partial block) first.
        let mut c = BlockTable::default();
        m.allocate_slots(&mut c, &spec(0, &[], 1)).unwrap();
        assert_eq!(c.blocks, vec![first[2]]);
        let (hits, _) = m.get_computed_blocks(&mut b, &seq(2, &p));
        assert_eq!(hits.len(), 2, "the cached prefix survived");
    }

    #[test]
    fn hit_blocks_that_are_free_count_against_the_pool() {
        let mut m = mgr(2, 0.0);
        let p = Prompt::Tokens((0..5).collect());
        let mut a = BlockTable::default();
        m.allocate_slots(&mut a, &spec(0, &[], 5)).unwrap();
        m.cache_full_blocks(&mut a, &seq(1, &p), 5);
        m.free(&mut a);
        let mut b = BlockTable::default();
        let (hits, ht) = m.get_computed_blocks(&mut b, &seq(2, &p));
        assert_eq!(ht, 4);
        // 1 hit (free) + 2 new blocks for 5 more tokens = 3 > 2 free.
        assert_eq!(m.allocate_slots(&mut b, &spec(0, &hits, 5)), None);
        assert_eq!(m.allocate_slots(&mut b, &spec(0, &hits, 1)), Some(2));
        m.pool().check_invariants();
    }

    #[test]
    fn a_readmitted_request_finds_its_private_blocks_until_they_are_evicted() {
        let mut m = mgr(8, 0.0);
        let p = Prompt::synthetic(13);
        let mut a = BlockTable::default();
        m.allocate_slots(&mut a, &spec(0, &[], 13)).unwrap();
        m.cache_full_blocks(&mut a, &seq(1, &p), 13);
        assert_eq!(m.pool().num_cached(), 0, "private blocks are not indexed");
        let held = a.blocks.clone();
        m.free(&mut a);
        // The same request, re-admitted, hits its three full blocks; another request with the
        // same synthetic length hits nothing.
        let (hits, tokens) = m.get_computed_blocks(&mut a, &seq(1, &p));
        assert_eq!((hits, tokens), (held[..3].to_vec(), 12));
        let mut b = BlockTable::default();
        assert_eq!(m.get_computed_blocks(&mut b, &seq(2, &p)).1, 0);
        // Taking every free block evicts them; the owner then finds nothing.
        m.allocate_slots(&mut b, &spec(0, &[], 32)).unwrap();
        m.free(&mut b);
        assert_eq!(m.get_computed_blocks(&mut a, &seq(1, &p)).1, 0);
        m.pool().check_invariants();
    }

    #[test]
    fn block_arithmetic_matches_division_for_any_block_size() {
        for bs in [1, 3, 16, 24] {
            let cfg = CacheConfig {
                block_size: bs,
                ..Default::default()
            };
            let m = KvCacheManager::new(&cfg, 4);
            for t in 0..100 {
                assert_eq!(m.blocks_for(t), t.div_ceil(bs), "blocks_for({t}), B = {bs}");
                assert_eq!(m.full_blocks(t), t / bs, "full_blocks({t}), B = {bs}");
            }
        }
    }

    #[test]
    fn prefix_caching_off_finds_nothing() {
        let cfg = CacheConfig {
            block_size: 4,
            enable_prefix_caching: false,
            ..Default::default()
        };
        let mut m = KvCacheManager::new(&cfg, 4);
        let p = Prompt::Tokens((0..9).collect());
        let mut a = BlockTable::default();
        m.allocate_slots(&mut a, &spec(0, &[], 9)).unwrap();
        m.cache_full_blocks(&mut a, &seq(1, &p), 9);
        let mut b = BlockTable::default();
        assert_eq!(m.get_computed_blocks(&mut b, &seq(2, &p)).1, 0);
        let mut out = [7];
        KvCacheManager::cached_prefix_tokens_in(&mut m.hasher(), &seq(2, &p), &[&m], &mut out);
        assert_eq!(out, [0]);
    }

    #[test]
    fn a_routing_lookup_finds_each_replicas_cached_prefix_with_one_hash_chain() {
        let p = Prompt::Tokens((0..13).collect());
        let (mut a, b) = (mgr(10, 0.0), mgr(10, 0.0));
        let mut t = BlockTable::default();
        a.allocate_slots(&mut t, &spec(0, &[], 9)).unwrap();
        a.cache_full_blocks(&mut t, &seq(1, &p), 9);
        let mut out = [0; 2];
        KvCacheManager::cached_prefix_tokens_in(&mut a.hasher(), &seq(2, &p), &[&a, &b], &mut out);
        // Replica a holds the first two full blocks of the 13-token prompt; b holds nothing.
        assert_eq!(out, [8, 0]);
    }
}
