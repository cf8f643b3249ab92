//! Chained block hashes for prefix caching.
//!
//! Block `i` of a sequence covers tokens `[i·B, (i+1)·B)`. Only full blocks are hashed. The
//! hash of block `i` is `H(seed; hash(i-1) or NONE, salt if i == 0, content(i))`, so equal
//! hashes mean equal whole prefixes, not just equal blocks.
//!
//! ```text
//!  tokens   | b0 ........ | b1 ........ | b2 ........ | b3 (partial, unhashed)
//!  hashes   h0=H(NONE,s,b0) h1=H(h0,b1)  h2=H(h1,b2)
//! ```
//!
//! Content is either the token ids (real prompts and outputs), or for synthetic prompts the
//! prefix-group ids covering the block plus the block's offset inside its first group (so two
//! requests that list the same groups hash identically, as Mooncake's `hash_ids` intend).
//!
//! Synthetic blocks not fully inside the prefix groups (the rest of the prompt, and every
//! output block unless the groups describe the output too, as a session turn's do) can only ever be found again by their own request, after it is preempted and
//! re-admitted. They get a *private* hash, `(request id, block index)` under a tag
//! ([`BlockHash::is_private`]), with no XXH3 call; the pool does not index private hashes, and
//! the request's own table finds them again (`KvCacheManager::get_computed_blocks`). A shared
//! hash that happens to carry the tag has one bit flipped, so the two kinds never mix.
//!
//! The hash is XXH3-128 with a configured seed: reproducible across runs, processes and
//! machines (unlike Python's `hash()` in vLLM without `PYTHONHASHSEED`). Cost: one XXH3 call over
//! `16 + 4·B` bytes per block, about 15 ns for B = 16.

use crate::ids::RequestId;
use crate::request::Prompt;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128_with_seed;

/// The hash of a full block and, through the chain, of everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockHash(pub u128);

/// Top 32 bits of a private hash ("priv").
const PRIVATE_TAG: u32 = 0x7072_6976;

impl BlockHash {
    /// The hash of block `index` of `request`, which no other request can share.
    pub fn private(request: RequestId, index: u32) -> Self {
        BlockHash(
            (u128::from(PRIVATE_TAG) << 96) | (u128::from(request.0) << 32) | u128::from(index),
        )
    }

    /// Whether this hash belongs to a block only its own request can hit.
    pub fn is_private(self) -> bool {
        (self.0 >> 96) as u32 == PRIVATE_TAG
    }

    /// A content hash, kept out of the private range.
    fn shared(h: u128) -> Self {
        let h = BlockHash(h);
        if h.is_private() {
            BlockHash(h.0 ^ (1 << 96))
        } else {
            h
        }
    }
}

/// Stand-in parent of the first block.
const NONE_PARENT: u128 = 0x7661_6a72_615f_6e6f_6e65_5f70_6172_656e;
const TAG_TOKENS: u8 = 1;
const TAG_GROUPS: u8 = 2;

/// What a sequence holds, as far as hashing is concerned: its prompt and its generated tokens.
#[derive(Debug, Clone, Copy)]
pub struct SeqContent<'a> {
    /// The request's id (makes unshareable synthetic blocks unique).
    pub request: RequestId,
    /// The prompt.
    pub prompt: &'a Prompt,
    /// Tokens generated so far (empty for a synthetic prompt, whose content is never read).
    pub output: &'a [u32],
    /// How many tokens were generated so far (`output.len()` for a token prompt).
    pub num_output: u32,
    /// Extra key mixed into the first block (LoRA, cache salt, tenant isolation).
    pub salt: Option<u64>,
}

impl<'a> SeqContent<'a> {
    /// The prompt of `req`, before any output (what a router looks up).
    pub fn prompt_of(req: &'a crate::request::Request) -> Self {
        SeqContent {
            request: req.id,
            prompt: &req.prompt,
            output: &[],
            num_output: 0,
            salt: req.cache_salt,
        }
    }

    /// Total tokens (prompt + output).
    pub fn num_tokens(&self) -> u32 {
        self.prompt.len() + self.num_output
    }

    /// Token ids `[start, end)` of a token prompt and its output, as the part in the prompt
    /// and the part in the output.
    fn token_runs<'t>(
        prompt: &'t [u32],
        output: &'t [u32],
        start: u32,
        end: u32,
    ) -> [&'t [u32]; 2] {
        let (s, e, p) = (start as usize, end as usize, prompt.len());
        let from_prompt = &prompt[s.min(p)..e.min(p)];
        let from_output = &output[s.max(p) - p..e.max(p) - p];
        [from_prompt, from_output]
    }
}

/// Computes chained block hashes with a fixed seed, reusing one scratch buffer.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    seed: u64,
    block_size: u32,
    buf: Vec<u8>,
}

impl BlockHasher {
    /// A hasher for blocks of `block_size` tokens.
    pub fn new(seed: u64, block_size: u32) -> Self {
        BlockHasher {
            seed,
            block_size,
            buf: Vec::with_capacity(64 + 4 * block_size as usize),
        }
    }

    /// The hash of full block `index` of `seq`, given the hash of block `index - 1`.
    ///
    /// # Panics
    /// If the block is not full (`(index + 1) · B > seq.num_tokens()`): only full blocks are
    /// hashed.
    pub fn hash_block(
        &mut self,
        seq: &SeqContent<'_>,
        parent: Option<BlockHash>,
        index: u32,
    ) -> BlockHash {
        let bs = self.block_size;
        let (start, end) = (index * bs, (index + 1) * bs);
        assert!(end <= seq.num_tokens(), "only full blocks are hashed");
        if let Prompt::Synthetic(s) = seq.prompt {
            let covered = s.prefix_groups.len() as u64 * u64::from(s.group_tokens.max(1));
            if (end > s.len && !s.output_in_groups) || u64::from(end) > covered {
                return BlockHash::private(seq.request, index);
            }
        }
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&parent.map_or(NONE_PARENT, |p| p.0).to_le_bytes());
        if index == 0
            && let Some(salt) = seq.salt
        {
            buf.extend_from_slice(&salt.to_le_bytes());
        }
        match seq.prompt {
            Prompt::Tokens(t) => {
                buf.push(TAG_TOKENS);
                // Sized once and filled in place: extending by 4 bytes a token reloaded the
                // buffer's length every time (half of a token prompt's hashing).
                for run in SeqContent::token_runs(t, seq.output, start, end) {
                    let n = buf.len();
                    buf.resize(n + 4 * run.len(), 0);
                    for (dst, &tok) in buf[n..].chunks_exact_mut(4).zip(run) {
                        dst.copy_from_slice(&tok.to_le_bytes());
                    }
                }
            }
            Prompt::Synthetic(s) => {
                // Inside the prefix groups (checked above).
                let gt = s.group_tokens.max(1);
                buf.push(TAG_GROUPS);
                for g in (start / gt)..=((end - 1) / gt) {
                    buf.extend_from_slice(&s.prefix_groups[g as usize].to_le_bytes());
                }
                buf.extend_from_slice(&(start % gt).to_le_bytes());
            }
        }
        BlockHash::shared(xxh3_128_with_seed(buf, self.seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SyntheticPrompt;

    fn content<'a>(id: u64, prompt: &'a Prompt, salt: Option<u64>) -> SeqContent<'a> {
        SeqContent {
            request: RequestId(id),
            prompt,
            output: &[],
            num_output: 0,
            salt,
        }
    }

    fn chain(h: &mut BlockHasher, seq: &SeqContent<'_>, n: u32) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::new();
        for i in 0..n {
            let parent = out.last().copied();
            out.push(h.hash_block(seq, parent, i));
        }
        out
    }

    #[test]
    fn identical_token_prefixes_hash_identically_across_requests() {
        let mut h = BlockHasher::new(7, 4);
        let a = Prompt::Tokens((0..12).collect());
        let mut b_tokens: Vec<u32> = (0..8).collect();
        b_tokens.extend([99, 98, 97, 96]);
        let b = Prompt::Tokens(b_tokens);
        let ha = chain(&mut h, &content(1, &a, None), 3);
        let hb = chain(&mut h, &content(2, &b, None), 3);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn a_block_hashes_by_its_tokens_wherever_the_prompt_ends() {
        let mut h = BlockHasher::new(7, 4);
        let whole = Prompt::Tokens((1..=8).collect());
        let short = Prompt::Tokens((1..=3).collect());
        let out: Vec<u32> = (4..=8).collect();
        let split = SeqContent {
            request: RequestId(2),
            prompt: &short,
            output: &out,
            num_output: 5,
            salt: None,
        };
        let a = chain(&mut h, &content(1, &whole, None), 2);
        let b = chain(&mut h, &split, 2);
        assert_eq!(a, b);
    }

    #[test]
    fn content_hashes_never_look_private() {
        let tagged = (u128::from(PRIVATE_TAG) << 96) | 12_345;
        assert!(BlockHash(tagged).is_private());
        assert!(!BlockHash::shared(tagged).is_private());
        assert!(!BlockHash::shared(7).is_private());
    }

    #[test]
    fn a_different_earlier_block_changes_every_later_hash() {
        let mut h = BlockHasher::new(7, 4);
        let a = Prompt::Tokens(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let b = Prompt::Tokens(vec![0, 2, 3, 4, 5, 6, 7, 8]);
        let ha = chain(&mut h, &content(1, &a, None), 2);
        let hb = chain(&mut h, &content(1, &b, None), 2);
        assert_ne!(ha[1], hb[1]);
    }

    #[test]
    fn salt_and_seed_separate_otherwise_identical_prefixes() {
        let p = Prompt::Tokens(vec![1, 2, 3, 4]);
        let mut h = BlockHasher::new(7, 4);
        let plain = h.hash_block(&content(1, &p, None), None, 0);
        let salted = h.hash_block(&content(1, &p, Some(5)), None, 0);
        assert_ne!(plain, salted);
        let mut other_seed = BlockHasher::new(8, 4);
        assert_ne!(plain, other_seed.hash_block(&content(1, &p, None), None, 0));
        // Same seed, fresh hasher: the same value (reproducible).
        assert_eq!(
            plain,
            BlockHasher::new(7, 4).hash_block(&content(1, &p, None), None, 0)
        );
    }

    #[test]
    fn synthetic_prompts_share_blocks_inside_common_prefix_groups_only() {
        let mk = |groups: Vec<u64>, len| {
            Prompt::Synthetic(SyntheticPrompt {
                len,
                prefix_groups: groups,
                group_tokens: 8,
                output_in_groups: false,
            })
        };
        let a = mk(vec![10, 11], 24);
        let b = mk(vec![10, 12], 24);
        let mut h = BlockHasher::new(1, 4);
        let ha = chain(&mut h, &content(1, &a, None), 6);
        let hb = chain(&mut h, &content(2, &b, None), 6);
        assert_eq!(ha[..2], hb[..2], "group 10 covers blocks 0 and 1");
        assert_ne!(ha[2], hb[2], "groups 11 and 12 differ");
        // Blocks past the groups are private to their request even with equal parents.
        let c = mk(vec![10, 11], 24);
        let hc = chain(&mut h, &content(3, &c, None), 6);
        assert_eq!(ha[..4], hc[..4]);
        assert_ne!(ha[4], hc[4]);
        assert!(ha[4].is_private() && ha[5].is_private() && !ha[3].is_private());
        assert_eq!(ha[4], BlockHash::private(RequestId(1), 4));
    }

    #[test]
    fn a_turns_output_blocks_inside_its_groups_are_shared_with_the_next_turn() {
        // Turn 1: 8 prompt + 8 output tokens, groups cover all 16. Turn 2's prompt is those 16
        // plus 8 new tokens, under the same first two group ids.
        let turn1 = Prompt::Synthetic(SyntheticPrompt {
            len: 8,
            prefix_groups: vec![1, 2],
            group_tokens: 8,
            output_in_groups: true,
        });
        let turn2 = Prompt::Synthetic(SyntheticPrompt {
            len: 24,
            prefix_groups: vec![1, 2, 3],
            group_tokens: 8,
            output_in_groups: true,
        });
        let mut h = BlockHasher::new(1, 4);
        let decoded = SeqContent {
            num_output: 8,
            ..content(1, &turn1, None)
        };
        let a = chain(&mut h, &decoded, 4);
        let b = chain(&mut h, &content(2, &turn2, None), 6);
        assert_eq!(a[..4], b[..4], "the answer's blocks are the next prompt's");
        assert!(a.iter().all(|x| !x.is_private()));
        // Without the flag the answer's blocks stay private.
        let plain = Prompt::Synthetic(SyntheticPrompt {
            len: 8,
            prefix_groups: vec![1, 2],
            group_tokens: 8,
            output_in_groups: false,
        });
        let c = chain(
            &mut h,
            &SeqContent {
                num_output: 8,
                ..content(1, &plain, None)
            },
            4,
        );
        assert!(c[2].is_private() && c[3].is_private() && !c[1].is_private());
    }
}
