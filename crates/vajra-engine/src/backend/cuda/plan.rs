//! The host side of a step: its packed index arrays, and the device buffers it runs on.

use super::*;

/// The device buffers of one step: the packed index arrays, the activations, the split-K
/// partials and the logits.
pub(super) struct StepBuffers {
    /// The step's [`StepPlan::ints`].
    pub(super) ints: CudaSlice<i32>,
    /// Residual stream (f32).
    pub(super) x: CudaSlice<f32>,
    pub(super) hn: CudaSlice<bf16>,
    pub(super) qkv: CudaSlice<bf16>,
    pub(super) attn: CudaSlice<bf16>,
    pub(super) proj: CudaSlice<bf16>,
    pub(super) gu: CudaSlice<bf16>,
    pub(super) act: CudaSlice<bf16>,
    /// Normed rows of the tokens whose logits are wanted.
    pub(super) sel: CudaSlice<bf16>,
    pub(super) ws_acc: CudaSlice<f32>,
    pub(super) ws_ml: CudaSlice<f32>,
    /// `paged_decode`'s finished-split counters: zero between steps (the merging block resets
    /// its counter).
    pub(super) done: CudaSlice<i32>,
    pub(super) logits: CudaSlice<f32>,
}

impl StepBuffers {
    /// Buffers for `t` tokens, `r` logit rows, `ws_parts` split-K partials and `done`
    /// counters, around the index arrays `ints`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
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
pub(super) enum Part {
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
pub(super) struct StepPlan {
    /// Tokens (rows of the activations).
    pub(super) t: usize,
    /// Tokens run by the per-token attention kernel (the rest are in `chunks`).
    pub(super) listed: usize,
    /// Rows of logits.
    pub(super) rows: usize,
    /// Requests (rows of the block tables).
    pub(super) seqs: usize,
    /// Columns of the block tables.
    pub(super) max_blocks: usize,
    /// Longest context among the listed tokens' requests.
    pub(super) max_ctx: u32,
    /// Prefill chunks whose attention runs chunk-wide.
    pub(super) chunks: Vec<GemmChunk>,
    /// The [`Part`]s, back to back.
    pub(super) ints: Vec<i32>,
}

impl StepPlan {
    /// The plan of `input` over `block_size`-token blocks. With `pad = Some((batch, width))`
    /// (a decode step for a CUDA graph: one token per request, each sampled) it has exactly
    /// `batch` rows and `width` table columns: rows past the step's requests read block 0 at
    /// position 0 and write no cache slot.
    pub(super) fn new(
        input: &StepInput<'_>,
        block_size: usize,
        pad: Option<(usize, usize)>,
    ) -> Self {
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
    pub(super) fn ints_len(t: usize, max_blocks: usize) -> usize {
        6 * t + t * max_blocks
    }

    /// Where `part` lies in [`StepPlan::ints`].
    pub(super) fn part(&self, part: Part) -> std::ops::Range<usize> {
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
pub(super) struct GemmChunk {
    /// Index of the request in the step.
    pub(super) seq: usize,
    /// Index of its first token in the step.
    pub(super) first: usize,
    /// Tokens in the chunk.
    pub(super) len: usize,
    /// Tokens already in the cache before it.
    pub(super) context: usize,
}
