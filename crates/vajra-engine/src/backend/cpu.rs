//! The CPU reference backend: a Llama-family forward pass in f32 over a paged KV cache.
//!
//! Every other backend is checked against this one, and this one against Hugging Face
//! `transformers` (tests/fixtures). It favours clarity over speed but is not naive: products go
//! through [`super::linalg::matmul_t`] on rayon, attention runs in parallel over tokens (all of
//! a token's heads in one task; splitting heads too measured slower under serving, see
//! `benches/results/fidelity-2026-11-27-smollm2-cpu/`).
//!
//! KV cache layout, per layer, for K and V alike (f32):
//!
//! ```text
//!   [block][offset in block][kv head][head dim]      block = table[p / bs], offset = p % bs
//! ```
//!
//! Q/K/V and gate/up projections are fused into one matrix each at load time, so a layer makes
//! four products: QKV, O, gate-up, down.

use super::layout::FusedWeights;
use super::linalg::{matmul_t, rms_norm, silu_mul};
use super::{Backend, CacheShape, Logits, LogitsFor, Profiled, StepInput};
use crate::error::{EngineError, Result};
use crate::spec::ModelSpec;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use vajra_core::ids::{BlockId, HostBlockId};

/// Default KV-cache size of the CPU backend, in MiB.
pub const DEFAULT_KV_CACHE_MIB: u64 = 1024;

/// Records the end of operator `op` while profiling (a free function, so it borrows only the
/// marks while the caches are borrowed mutably).
fn mark(
    marks: &std::cell::RefCell<Option<Vec<(&'static str, std::time::Instant)>>>,
    op: &'static str,
) {
    if let Some(m) = marks.borrow_mut().as_mut() {
        m.push((op, std::time::Instant::now()));
    }
}

/// The CPU backend.
pub struct CpuBackend {
    spec: ModelSpec,
    w: FusedWeights,
    shape: CacheShape,
    /// Per layer: K then V caches, each `num_blocks · block_size · kv_heads · head_dim`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    /// Host copies for swap, same layout, `num_host_blocks` blocks.
    k_host: Vec<Vec<f32>>,
    v_host: Vec<Vec<f32>>,
    /// Rotary inverse frequencies.
    inv_freq: Vec<f64>,
    /// While profiling: the time each operator ended, with its name.
    marks: std::cell::RefCell<Option<Vec<(&'static str, std::time::Instant)>>>,
}

impl CpuBackend {
    /// A backend over loaded weights with a cache of the given shape.
    pub fn new(spec: ModelSpec, w: FusedWeights, shape: CacheShape) -> Self {
        let c = &spec.config;
        let per_block = (shape.block_size * c.num_kv_heads * c.head_dim) as usize;
        let layers = c.num_layers as usize;
        let dev = per_block * shape.num_blocks as usize;
        let host = per_block * shape.num_host_blocks as usize;
        let inv_freq = spec.rope_inv_freq();
        CpuBackend {
            k_cache: vec![vec![0.0; dev]; layers],
            v_cache: vec![vec![0.0; dev]; layers],
            k_host: vec![vec![0.0; host]; layers],
            v_host: vec![vec![0.0; host]; layers],
            spec,
            w,
            shape,
            inv_freq,
            marks: std::cell::RefCell::new(None),
        }
    }

    /// Runs one step and returns each operator's wall time summed over the step, in ms
    /// (per-layer operators summed over all layers; `add` is the two residual adds).
    ///
    /// # Errors
    /// As [`Backend::execute`].
    pub fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>> {
        *self.marks.borrow_mut() = Some(vec![("start", std::time::Instant::now())]);
        let run = self.execute(input);
        let marks = self.marks.borrow_mut().take().unwrap_or_default();
        run?;
        let mut out = BTreeMap::new();
        for w in marks.windows(2) {
            *out.entry(w[1].0).or_insert(0.0) += (w[1].1 - w[0].1).as_secs_f64() * 1e3;
        }
        Ok(out)
    }

    /// Loads `dir` and sizes the cache.
    ///
    /// # Errors
    /// As [`ModelSpec::from_dir`] and [`FusedWeights::load`].
    pub fn load(dir: &Path, shape_of: impl FnOnce(&ModelSpec) -> CacheShape) -> Result<Self> {
        let spec = ModelSpec::from_dir(dir)?;
        let w = FusedWeights::load(dir, &spec)?;
        let shape = shape_of(&spec);
        Ok(Self::new(spec, w, shape))
    }

    fn err(&self, message: String) -> EngineError {
        EngineError::Backend {
            backend: "cpu".into(),
            message,
        }
    }

    /// Checks a step against the cache and vocabulary and returns per-token (seq, position).
    fn plan(&self, input: &StepInput<'_>) -> Result<Vec<(usize, u32)>> {
        input
            .check(
                self.shape.num_blocks,
                self.shape.block_size,
                self.spec.config.vocab_size,
            )
            .map_err(|m| self.err(m))?;
        let mut at = Vec::with_capacity(input.num_tokens());
        for (s, seq) in input.seqs.iter().enumerate() {
            at.extend((seq.context..seq.context + seq.tokens.len() as u32).map(|p| (s, p)));
        }
        Ok(at)
    }
    /// Attention of every token of the step over its request's cached context in layer `l`
    /// (causal, within the sliding window), into `attn`.
    fn attend(
        &self,
        l: usize,
        at: &[(usize, u32)],
        input: &StepInput<'_>,
        qkv: &[f32],
        attn: &mut [f32],
    ) {
        let c = &self.spec.config;
        let t = at.len();
        let hd = c.head_dim as usize;
        let (nh, nkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let bs = self.shape.block_size as usize;
        let scale = 1.0 / (hd as f32).sqrt();
        let window = self.spec.sliding_window;
        let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
        // Attention of every new token over its request's cached context (causal): one task
        // per token, or per (token, head) when the step has fewer tokens than threads, so a
        // lone decode's attention does not run on one core while the others wait.
        let head_attn = |i: usize, hq: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let (s, p) = at[i];
            let table = input.seqs[s].block_table;
            let p = p as usize;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w as usize));
            scores.clear();
            scores.resize(p + 1 - lo, 0.0);
            let kvh = hq / (nh / nkv);
            let q = &qkv[i * qkv_w + hq * hd..i * qkv_w + (hq + 1) * hd];
            let kv_at = |j: usize| (table[j / bs].0 as usize * bs + j % bs) * kv_w + kvh * hd;
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in (lo..=p).zip(scores.iter_mut()) {
                let k0 = kv_at(j);
                *sc = super::linalg::dot(q, &kc[k0..k0 + hd]) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0.0;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            o.fill(0.0);
            for (j, sc) in (lo..=p).zip(scores.iter()) {
                let v0 = kv_at(j);
                let wgt = sc / sum;
                o.iter_mut()
                    .zip(&vc[v0..v0 + hd])
                    .for_each(|(o, v)| *o += wgt * v);
            }
        };
        if t < rayon::current_num_threads() {
            attn.par_chunks_mut(hd)
                .enumerate()
                .for_each_init(Vec::new, |scores, (k, o)| {
                    head_attn(k / nh, k % nh, o, scores);
                });
        } else {
            attn.par_chunks_mut(q_w)
                .enumerate()
                .for_each_init(Vec::new, |scores, (i, out)| {
                    for (hq, o) in out.chunks_exact_mut(hd).enumerate() {
                        head_attn(i, hq, o, scores);
                    }
                });
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
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
        let at = self.plan(input)?;
        let c = &self.spec.config;
        let t = at.len();
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let inter = c.intermediate_size as usize;
        let eps = c.rms_norm_eps as f32;
        let bs = self.shape.block_size as usize;

        let mut x = Vec::with_capacity(t * h);
        for s in &input.seqs {
            for &tok in s.tokens {
                x.extend_from_slice(&self.w.embed[tok as usize * h..(tok as usize + 1) * h]);
            }
        }
        // Rotary angles per token and frequency (f64, rounded once).
        let (cos, sin): (Vec<f32>, Vec<f32>) = at
            .iter()
            .flat_map(|&(_, p)| self.inv_freq.iter().map(move |f| f64::from(p) * f))
            .map(|a| (a.cos() as f32, a.sin() as f32))
            .unzip();
        // Cache slot of each token.
        let slot: Vec<usize> = at
            .iter()
            .map(|&(s, p)| {
                let table = input.seqs[s].block_table;
                table[p as usize / bs].0 as usize * bs + p as usize % bs
            })
            .collect();

        let mut hn = vec![0.0; t * h];
        mark(&self.marks, "emb");
        let mut qkv = vec![0.0; t * qkv_w];
        let mut attn = vec![0.0; t * q_w];
        let mut proj = vec![0.0; t * h];
        let mut gu = vec![0.0; t * 2 * inter];
        let mut act = vec![0.0; t * inter];

        for (l, layer) in self.w.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, eps, &mut hn);
            mark(&self.marks, "input_layernorm");
            matmul_t(&hn, t, h, &layer.qkv, qkv_w, &mut qkv);
            if let Some(b) = &layer.qkv_bias {
                for row in qkv.chunks_exact_mut(qkv_w) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
            mark(&self.marks, "attn_pre_proj");
            rotate_half(&mut qkv, qkv_w, q_w + kv_w, hd, &cos, &sin);
            mark(&self.marks, "attn_rope");
            // Write this step's K and V into the paged cache.
            let (kc, vc) = (&mut self.k_cache[l], &mut self.v_cache[l]);
            for (row, &sl) in qkv.chunks_exact(qkv_w).zip(&slot) {
                kc[sl * kv_w..(sl + 1) * kv_w].copy_from_slice(&row[q_w..q_w + kv_w]);
                vc[sl * kv_w..(sl + 1) * kv_w].copy_from_slice(&row[q_w + kv_w..]);
            }
            mark(&self.marks, "attn_kv_cache_save");
            self.attend(l, &at, input, &qkv, &mut attn);
            mark(&self.marks, "attn");
            matmul_t(&attn, t, q_w, &layer.o, h, &mut proj);
            mark(&self.marks, "attn_post_proj");
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            mark(&self.marks, "add");
            rms_norm(&x, &layer.mlp_norm, eps, &mut hn);
            mark(&self.marks, "post_attention_layernorm");
            matmul_t(&hn, t, h, &layer.gate_up, 2 * inter, &mut gu);
            mark(&self.marks, "mlp_up_proj");
            silu_mul(&gu, inter, &mut act);
            mark(&self.marks, "mlp_act");
            matmul_t(&act, t, inter, &layer.down, h, &mut proj);
            mark(&self.marks, "mlp_down_proj");
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            mark(&self.marks, "add");
        }

        // Final norm and LM head on the rows wanted.
        let rows = logit_rows(input, t);
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut normed = vec![0.0; sel.len()];
        rms_norm(&sel, &self.w.final_norm, eps, &mut normed);
        mark(&self.marks, "final_norm");
        let vocab = c.vocab_size as usize;
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        let mut data = vec![0.0; rows.len() * vocab];
        matmul_t(&normed, rows.len(), h, head, vocab, &mut data);
        mark(&self.marks, "lm_head");
        Ok(Logits { vocab, data })
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
        let per_block = (self.shape.block_size * c.num_kv_heads * c.head_dim) as usize;
        super::check_swap(out, ins, self.shape.num_blocks, self.shape.num_host_blocks)
            .map_err(|m| self.err(m))?;
        let r = |b: u32| b as usize * per_block..(b as usize + 1) * per_block;
        for l in 0..self.k_cache.len() {
            for &(d, hb) in out {
                self.k_host[l][r(hb.0)].copy_from_slice(&self.k_cache[l][r(d.0)]);
                self.v_host[l][r(hb.0)].copy_from_slice(&self.v_cache[l][r(d.0)]);
            }
            for &(hb, d) in ins {
                self.k_cache[l][r(d.0)].copy_from_slice(&self.k_host[l][r(hb.0)]);
                self.v_cache[l][r(d.0)].copy_from_slice(&self.v_host[l][r(hb.0)]);
            }
        }
        Ok(())
    }

    fn export_blocks(&self, blocks: &[BlockId]) -> Result<Vec<f32>> {
        let c = &self.spec.config;
        let per_block = (self.shape.block_size * c.num_kv_heads * c.head_dim) as usize;
        let layers = self.k_cache.len();
        let mut out = Vec::with_capacity(blocks.len() * 2 * layers * per_block);
        for &b in blocks {
            if b.0 >= self.shape.num_blocks {
                return Err(self.err(format!(
                    "block {} out of range (the cache has {})",
                    b.0, self.shape.num_blocks
                )));
            }
            let r = b.0 as usize * per_block..(b.0 as usize + 1) * per_block;
            for l in 0..layers {
                out.extend_from_slice(&self.k_cache[l][r.clone()]);
                out.extend_from_slice(&self.v_cache[l][r.clone()]);
            }
        }
        Ok(out)
    }

    fn import_blocks(&mut self, blocks: &[BlockId], data: &[f32]) -> Result<()> {
        let c = &self.spec.config;
        let per_block = (self.shape.block_size * c.num_kv_heads * c.head_dim) as usize;
        let layers = self.k_cache.len();
        let stride = 2 * layers * per_block;
        if data.len() != blocks.len() * stride {
            return Err(self.err(format!(
                "{} KV values for {} blocks of {stride} (another model, block size or dtype?)",
                data.len(),
                blocks.len()
            )));
        }
        for (j, &b) in blocks.iter().enumerate() {
            if b.0 >= self.shape.num_blocks {
                return Err(self.err(format!(
                    "block {} out of range (the cache has {})",
                    b.0, self.shape.num_blocks
                )));
            }
            let r = b.0 as usize * per_block..(b.0 as usize + 1) * per_block;
            let src = &data[j * stride..(j + 1) * stride];
            for l in 0..layers {
                let k = &src[2 * l * per_block..(2 * l + 1) * per_block];
                let v = &src[(2 * l + 1) * per_block..(2 * l + 2) * per_block];
                self.k_cache[l][r.clone()].copy_from_slice(k);
                self.v_cache[l][r.clone()].copy_from_slice(v);
            }
        }
        Ok(())
    }
}
impl Profiled for CpuBackend {
    fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>> {
        CpuBackend::profile_step(self, input)
    }
    fn device(&self) -> serde_json::Value {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        serde_json::json!({"cpu": model, "threads": rayon::current_num_threads()})
    }
    fn method(&self) -> String {
        "vajra-engine's CPU backend (f32; AVX2 dot products up to 16 rows, matrixmultiply SGEMM beyond, split over rayon workers by output feature or by rows; attention one task per token, or per (token, head) below one token per worker), wall clock between operators; `add` is the two residual adds".into()
    }
}
/// Rotary embedding of the Q and K heads (the first `rotated` values) of each `qkv_w`-wide row,
/// in the rotate-half convention of Hugging Face Llama, with each row's `cos` and `sin`.
fn rotate_half(qkv: &mut [f32], qkv_w: usize, rotated: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (i, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
        let (cs, sn) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row[..rotated].chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * cs[j] - x2 * sn[j];
                b[j] = x2 * cs[j] + x1 * sn[j];
            }
        }
    }
}

/// The rows (tokens of the step, in order) whose logits `input` asks for.
fn logit_rows(input: &StepInput<'_>, t: usize) -> Vec<usize> {
    match input.logits_for {
        LogitsFor::AllTokens => (0..t).collect(),
        LogitsFor::Sampled => {
            let mut end = 0;
            let mut rows = Vec::new();
            for s in &input.seqs {
                end += s.tokens.len();
                if s.sample && !s.tokens.is_empty() {
                    rows.push(end - 1);
                }
            }
            rows
        }
    }
}
