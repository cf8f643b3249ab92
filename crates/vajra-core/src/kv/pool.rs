//! The flat pool of device KV blocks (vLLM v1's `BlockPool` semantics).
//!
//! Every block has a reference count. A block with count 0 is *free*, which does not mean
//! empty: it may still hold a cached, hashed prefix, and it stays findable through the hash
//! map until it is reused. Free blocks sit in an intrusive doubly-linked list in eviction order:
//! least recently freed at the head. Allocation pops the head (evicting its hash entry), freeing
//! appends at the tail, and touching a free cached block (a prefix hit) unlinks it. All three
//! are O(1) per block; the links are `u32` indices inside the block table, so the list does not
//! allocate.
//!
//! ```text
//!  head ─► [b7 ref0 h=…] ⇄ [b2 ref0 uncached] ⇄ [b9 ref0 h=…] ◄─ tail
//!          evicted first                          freed last
//! ```
//!
//! With prefix caching off nothing is ever cached, so the order of reuse is unobservable; such
//! a pool reuses the most recently freed block first ([`BlockPool::reuse_most_recent_first`]),
//! which is still in the CPU cache (5 % of a 1,000,000-request simulation).
//!
//! Private hashes ([`BlockHash::is_private`]: blocks only their own request can hit) are kept
//! on the block but not indexed; the owner checks its old block ids with [`BlockPool::holds`].
//!
//! Identical blocks are not de-duplicated: when a full block's hash is already mapped to
//! another block, the newcomer stays uncached, so block tables stay append-only.

use super::hash::BlockHash;
use crate::ids::BlockId;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Block hashes are already uniformly mixed XXH3 output, so the index hashes them by taking
/// their low 64 bits instead of running SipHash again.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type HashIndex = HashMap<BlockHash, BlockId, BuildHasherDefault<PassThrough>>;

const NIL: u32 = u32::MAX;

/// One block's bookkeeping: 16 bytes, four to a cache line. Its hash lives in a side array
/// read only when `cached` is set: allocation pops the least recently freed block, which is
/// rarely in cache, and one miss per block was most of a large simulation's allocation cost
/// when the hash sat inline (48 bytes a block).
#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    prev: u32,
    next: u32,
    in_free_list: bool,
    /// `hashes[id]` is this block's hash.
    cached: bool,
}

/// Fixed-size pool of KV blocks with reference counts, an LRU free list and a hash index.
#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<Block>,
    hashes: Vec<BlockHash>,
    head: u32,
    tail: u32,
    num_free: u32,
    cached: HashIndex,
    evictions: u64,
    lifo: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` free, empty blocks, listed in id order.
    ///
    /// # Panics
    /// If `num_blocks` is `u32::MAX` (reserved as the list's nil link).
    pub fn new(num_blocks: u32) -> Self {
        assert!(num_blocks < NIL, "block count must be below u32::MAX");
        let blocks = (0..num_blocks)
            .map(|i| Block {
                ref_cnt: 0,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == num_blocks { NIL } else { i + 1 },
                in_free_list: true,
                cached: false,
            })
            .collect();
        BlockPool {
            blocks,
            hashes: vec![BlockHash(0); num_blocks as usize],
            head: if num_blocks == 0 { NIL } else { 0 },
            tail: if num_blocks == 0 { NIL } else { num_blocks - 1 },
            num_free: num_blocks,
            cached: HashIndex::default(),
            evictions: 0,
            lifo: false,
        }
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks with reference count 0 (including cached ones that may be evicted).
    pub fn num_free(&self) -> u32 {
        self.num_free
    }

    /// Fraction of blocks held by requests.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            0.0
        } else {
            1.0 - f64::from(self.num_free) / self.blocks.len() as f64
        }
    }

    /// Cached blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Number of blocks findable by a shared hash.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Reference count of a block.
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.blocks[b.index()].ref_cnt
    }

    /// The cached block with this hash, if any.
    pub fn lookup(&self, h: BlockHash) -> Option<BlockId> {
        self.cached.get(&h).copied()
    }

    /// Sizes the hash index for every block at once. It never holds more entries than blocks
    /// (a block is indexed under one hash at most), so it then never rehashes while a run
    /// fills it; growing it step by step was a visible part of a decode step with token
    /// prompts.
    pub fn reserve_hash_index(&mut self) {
        self.cached.reserve(self.blocks.len());
    }

    /// Reuse the most recently freed block first (the tail of the free list) instead of the
    /// least recently freed one. Only for a pool whose blocks are never cached (prefix caching
    /// off): no content is then worth keeping, and the most recently freed block is the one
    /// still in the CPU cache, where the head of a long free list is a cache miss per block.
    pub fn reuse_most_recent_first(&mut self) {
        self.lifo = true;
    }

    /// Pops `n` blocks off the head of the free list (the tail, after
    /// [`Self::reuse_most_recent_first`]) into `out`, evicting any cached content, each with
    /// reference count 1. Returns `false` (taking nothing) if fewer than `n` are free.
    pub fn allocate_into(&mut self, n: u32, out: &mut Vec<BlockId>) -> bool {
        if n > self.num_free {
            return false;
        }
        out.reserve(n as usize);
        for _ in 0..n {
            let id = if self.lifo { self.tail } else { self.head };
            self.unlink(id);
            let b = &mut self.blocks[id as usize];
            b.ref_cnt = 1;
            if std::mem::take(&mut b.cached) {
                let h = self.hashes[id as usize];
                if !h.is_private() && self.cached.get(&h) == Some(&BlockId(id)) {
                    self.cached.remove(&h);
                }
                self.evictions += 1;
            }
            out.push(BlockId(id));
        }
        true
    }

    /// Adds a holder to each block (a prefix hit), taking free ones off the free list.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if self.blocks[b.index()].ref_cnt == 0 {
                self.unlink(b.0);
            }
            self.blocks[b.index()].ref_cnt += 1;
        }
    }

    /// Drops one holder of each block, in the order given; blocks reaching 0 go to the tail of
    /// the free list. Callers pass a request's blocks tail-first so its last blocks are evicted
    /// first.
    ///
    /// # Panics
    /// If a block's reference count is already 0 (a double free).
    pub fn free(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let blk = &mut self.blocks[b.index()];
            assert!(blk.ref_cnt > 0, "double free of block {b}");
            blk.ref_cnt -= 1;
            if blk.ref_cnt == 0 {
                self.push_tail(b.0);
            }
        }
    }

    /// Makes a full block findable by `hash`. A block already cached, or a hash already mapped
    /// to another block, is left as it is. A private hash is recorded on the block only.
    pub fn cache(&mut self, b: BlockId, hash: BlockHash) {
        let blk = &mut self.blocks[b.index()];
        if blk.cached {
            return;
        }
        if !hash.is_private() {
            match self.cached.entry(hash) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(b);
                }
                std::collections::hash_map::Entry::Occupied(_) => return,
            }
        }
        blk.cached = true;
        self.hashes[b.index()] = hash;
    }

    /// Whether block `b` still holds the content cached under `hash` (not evicted since).
    pub fn holds(&self, b: BlockId, hash: BlockHash) -> bool {
        self.hash_of(b) == Some(hash)
    }

    /// The hash a block is cached under, if any.
    pub fn hash_of(&self, b: BlockId) -> Option<BlockHash> {
        self.blocks[b.index()]
            .cached
            .then(|| self.hashes[b.index()])
    }

    /// Forgets every cached hash. Succeeds only when no block is held (as vLLM's
    /// `reset_prefix_cache`); returns whether it did.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.num_blocks() {
            return false;
        }
        self.cached.clear();
        for b in &mut self.blocks {
            b.cached = false;
        }
        true
    }

    /// Walks the whole pool and panics if an invariant is broken: free-list length equals the
    /// number of blocks with count 0, the list is well linked, and every hash entry points to a
    /// block carrying that hash. O(blocks); for tests.
    ///
    /// # Panics
    /// Names the broken invariant.
    pub fn check_invariants(&self) {
        let mut n = 0u32;
        let mut prev = NIL;
        let mut cur = self.head;
        while cur != NIL {
            let b = &self.blocks[cur as usize];
            assert_eq!(b.ref_cnt, 0, "block {cur} in the free list has holders");
            assert!(b.in_free_list, "block {cur} linked but not flagged free");
            assert_eq!(b.prev, prev, "free list back-link broken at {cur}");
            prev = cur;
            cur = b.next;
            n += 1;
            assert!(n <= self.num_blocks(), "free list has a cycle");
        }
        assert_eq!(prev, self.tail, "free list tail is wrong");
        assert_eq!(
            n, self.num_free,
            "free count differs from the free list length"
        );
        let zero = self.blocks.iter().filter(|b| b.ref_cnt == 0).count() as u32;
        assert_eq!(
            zero, self.num_free,
            "blocks with count 0 are not all in the free list"
        );
        for (h, b) in &self.cached {
            assert_eq!(
                self.hash_of(*b),
                Some(*h),
                "hash index points to a stale block"
            );
        }
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.in_free_list, "unlinking block {id} that is not free");
            b.in_free_list = false;
            (
                std::mem::replace(&mut b.prev, NIL),
                std::mem::replace(&mut b.next, NIL),
            )
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[id as usize];
            b.in_free_list = true;
            b.prev = tail;
            b.next = NIL;
        }
        if tail == NIL {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().map(|&i| BlockId(i)).collect()
    }

    #[test]
    fn allocation_takes_blocks_from_the_head_in_id_order() {
        let mut p = BlockPool::new(4);
        let mut out = Vec::new();
        assert!(p.allocate_into(3, &mut out));
        assert_eq!(out, ids(&[0, 1, 2]));
        assert_eq!(p.num_free(), 1);
        p.check_invariants();
    }

    #[test]
    fn allocation_fails_without_taking_anything_when_short() {
        let mut p = BlockPool::new(2);
        let mut out = Vec::new();
        assert!(!p.allocate_into(3, &mut out));
        assert!(out.is_empty());
        assert_eq!(p.num_free(), 2);
    }

    #[test]
    fn freed_blocks_are_reused_least_recently_freed_first() {
        let mut p = BlockPool::new(3);
        let mut out = Vec::new();
        p.allocate_into(3, &mut out);
        p.free(ids(&[2, 0, 1]));
        let mut again = Vec::new();
        p.allocate_into(3, &mut again);
        assert_eq!(again, ids(&[2, 0, 1]));
    }

    #[test]
    fn a_pool_that_never_caches_can_reuse_the_most_recently_freed_block_first() {
        let mut p = BlockPool::new(4);
        p.reuse_most_recent_first();
        let mut out = Vec::new();
        p.allocate_into(3, &mut out);
        assert_eq!(out, ids(&[3, 2, 1]));
        p.free(ids(&[2, 3]));
        let mut again = Vec::new();
        p.allocate_into(2, &mut again);
        assert_eq!(again, ids(&[3, 2]));
        p.check_invariants();
    }

    #[test]
    fn touching_a_free_cached_block_takes_it_off_the_free_list() {
        let mut p = BlockPool::new(3);
        let mut out = Vec::new();
        p.allocate_into(1, &mut out);
        p.cache(BlockId(0), BlockHash(9));
        p.free(ids(&[0]));
        assert_eq!(p.num_free(), 3);
        assert_eq!(p.lookup(BlockHash(9)), Some(BlockId(0)));
        p.touch(&ids(&[0]));
        assert_eq!(p.ref_count(BlockId(0)), 1);
        assert_eq!(p.num_free(), 2);
        p.check_invariants();
    }

    #[test]
    fn reusing_a_cached_free_block_evicts_its_hash() {
        let mut p = BlockPool::new(1);
        let mut out = Vec::new();
        p.allocate_into(1, &mut out);
        p.cache(BlockId(0), BlockHash(9));
        p.free(ids(&[0]));
        out.clear();
        p.allocate_into(1, &mut out);
        assert_eq!(p.lookup(BlockHash(9)), None);
        assert_eq!(p.evictions(), 1);
        p.check_invariants();
    }

    #[test]
    fn a_duplicate_hash_leaves_the_second_block_uncached() {
        let mut p = BlockPool::new(2);
        let mut out = Vec::new();
        p.allocate_into(2, &mut out);
        p.cache(BlockId(0), BlockHash(1));
        p.cache(BlockId(1), BlockHash(1));
        assert_eq!(p.lookup(BlockHash(1)), Some(BlockId(0)));
        assert_eq!(p.hash_of(BlockId(1)), None);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics_naming_the_invariant() {
        let mut p = BlockPool::new(1);
        let mut out = Vec::new();
        p.allocate_into(1, &mut out);
        p.free(ids(&[0]));
        p.free(ids(&[0]));
    }

    #[test]
    fn prefix_cache_reset_only_succeeds_when_nothing_is_held() {
        let mut p = BlockPool::new(2);
        let mut out = Vec::new();
        p.allocate_into(1, &mut out);
        p.cache(BlockId(0), BlockHash(3));
        assert!(!p.reset_prefix_cache());
        p.free(ids(&[0]));
        assert!(p.reset_prefix_cache());
        assert_eq!(p.lookup(BlockHash(3)), None);
        p.check_invariants();
    }
}
