//! The execution-time predictor: a batch (a [`SchedulerOutput`]) in, per-stage durations out.
//!
//! Composition per pipeline stage `s` with `L_s` layers, for a batch of `T` tokens:
//!
//! ```text
//! stage_s = L_s · [ Σ_op linear_op(T)            QKV, O, gate+up, down, act, rope, 2 norms, add
//!                 + kv_save(T) + prefill_attn(chunks) + decode_attn(B, ΣK)
//!                 + 2 · all_reduce(T·hidden·dtype) ]     (TP > 1)
//!         + emb(T)                                   (first stage)
//!         + send_recv(T·hidden·dtype)                (all but the last stage)
//!         + lm_head(S)                               (last stage; S = sampled tokens)
//!         + cpu_overhead(B)                          (first stage)
//! ```
//!
//! Linear operators come from a measured `mlp.csv` (piecewise-linear in `T`, proportional
//! beyond the grid) or from the [`roofline`] model; the final norm and LM head from a measured
//! `lm_head.csv` (by sampled rows) or the roofline; attention from a fit of a measured
//! `attention.csv` or the roofline; collectives from Vidur's `all_reduce.csv`/`send_recv.csv`
//! or the roofline. The per-stage linear part is tabulated for every `T` up to the largest
//! batch the scheduler can form, so predicting a batch costs one table read per stage plus one
//! pass over its requests.
//!
//! Departures from Vidur (`docs/vidur.md`), on purpose: no ×8 token rounding (the
//! curves interpolate), attention is summed per chunk instead of one (Σkv, √Σc²) lookup, there
//! is no ×1.1 GQA factor, the LM head is modelled, and inputs outside the grid extrapolate
//! with a warning instead of raising `KeyError`.

pub mod bundle;
pub mod curve;
pub mod profile;
pub mod roofline;

use crate::error::SimError;
use curve::Curve;
use profile::{AttentionFit, OpCurves};
use std::path::{Path, PathBuf};
use vajra_core::config::{ModelConfig, ParallelConfig};
use vajra_core::sched::output::SchedulerOutput;
use vajra_experiment::catalog::DeviceSpec;
pub use vajra_experiment::predictor::{AttentionModel, PredictorConfig};

enum Linear {
    Measured(OpCurves),
    /// A profile bundle's token-count operators (`bundle`).
    Bundle(bundle::DenseOps),
    Roofline,
}

enum Attention {
    Fitted(AttentionFit),
    /// A Vidur-schema table, interpolated (`predictor.attention = "table"`).
    Table(profile::AttentionTable),
    /// A profile bundle's measured table, interpolated (`bundle`).
    Grid(bundle::AttentionGrid),
    Roofline,
}

/// Per-stage durations, inline up to four stages (no allocation per batch in the common case).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimes {
    inline: [u64; 4],
    spill: Vec<u64>,
    len: usize,
}

impl StageTimes {
    fn collect(it: impl ExactSizeIterator<Item = u64>) -> Self {
        let len = it.len();
        let mut t = StageTimes {
            inline: [0; 4],
            spill: Vec::new(),
            len,
        };
        if len <= 4 {
            for (slot, v) in t.inline.iter_mut().zip(it) {
                *slot = v;
            }
        } else {
            t.spill = it.collect();
        }
        t
    }

    /// One stage of `ns`.
    pub fn single(ns: u64) -> Self {
        StageTimes {
            inline: [ns, 0, 0, 0],
            spill: Vec::new(),
            len: 1,
        }
    }

    /// The durations, one per stage.
    pub fn as_slice(&self) -> &[u64] {
        if self.len <= 4 {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no stages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The durations in stage order.
    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.as_slice().iter()
    }
}

impl std::ops::Index<usize> for StageTimes {
    type Output = u64;
    fn index(&self, i: usize) -> &u64 {
        &self.as_slice()[i]
    }
}

/// Cost of one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchCost {
    /// Duration of each pipeline stage, ns.
    pub stage_ns: StageTimes,
    /// FLOPs of the whole replica.
    pub flops: f64,
    /// Bytes moved through device memory, whole replica.
    pub bytes: f64,
}

/// Sums over a batch's requests (`c` new tokens over `k` cached each).
#[derive(Debug, Default, Clone, Copy)]
struct Terms {
    /// Σc.
    tokens: f64,
    /// Σ c·(k + (c + 1)/2) over all requests (attention FLOPs / (4·heads·head_dim)).
    causal: f64,
    /// Σ (k + c): KV read.
    kv_read: f64,
    /// Requests that sample a token.
    sampled: f64,
    /// Decoding requests (c = 1), their Σ (k + 1), and the shortest and longest k + 1.
    dec_b: f64,
    dec_kv: f64,
    dec_min: f64,
    dec_max: f64,
    /// Prefill chunks: count, Σc, Σk, Σ c·(k + c/2), Σ causal work, Σ (k + c).
    pre_n: usize,
    pre_c: f64,
    pre_k: f64,
    pre_ck: f64,
    pre_causal: f64,
    pre_kv: f64,
}

/// Predicts batch durations for one replica shape.
pub struct Predictor {
    model: ModelConfig,
    device: DeviceSpec,
    tp: u32,
    layers: Vec<u32>,
    linear: Linear,
    attention: Attention,
    all_reduce: Option<Curve>,
    send_recv: Option<Curve>,
    /// Measured final norm + LM head, ms by sampled rows (`lm_head.csv`).
    head: Option<Curve>,
    /// A bundle's per-request operators (LM head, sampler), ms by scheduled requests.
    per_sequence: Option<bundle::PerSequence>,
    /// Per stage, ns for `T` tokens, `T` in `0..table[s].len()`.
    table: Vec<Vec<u64>>,
    cpu_base_ns: f64,
    cpu_per_req_ns: f64,
    lm_head: bool,
    dense_flops_per_token: f64,
    weight_bytes: f64,
    kv_bytes_per_token: f64,
    /// What each part was built from.
    pub provenance: Vec<String>,
    /// Things the user should know (printed once).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("model", &self.model.name)
            .field("device", &self.device.name)
            .field("provenance", &self.provenance)
            .finish_non_exhaustive()
    }
}

/// Layers of each of `pp` stages: as even as possible, earlier stages take the remainder.
pub fn stage_layers(num_layers: u32, pp: u32) -> Vec<u32> {
    (0..pp)
        .map(|s| num_layers / pp + u32::from(s < num_layers % pp))
        .collect()
}

impl Predictor {
    /// Builds the predictor. `compute` is a folder with `mlp.csv` (None: roofline), `network`
    /// a folder with collective CSVs (None: the compute folder's, else roofline);
    /// `max_batch_tokens` sizes the lookup table.
    ///
    /// # Errors
    /// A profile that cannot be read or does not describe this model and TP width.
    pub fn new(
        model: &ModelConfig,
        device: &DeviceSpec,
        parallel: ParallelConfig,
        cfg: &PredictorConfig,
        compute: Option<&Path>,
        network: Option<&Path>,
        max_batch_tokens: u32,
    ) -> Result<Self, SimError> {
        cfg.validate()?;
        let stat = cfg.profile_statistic;
        let tp = parallel.tensor_parallel;
        let pp = parallel.pipeline_parallel;
        let mut provenance = Vec::new();
        let mut warnings = Vec::new();
        let bundle = match compute {
            Some(dir) if bundle::is_bundle(dir) => {
                let b = bundle::Bundle::read(dir, model, tp)?;
                provenance.push(format!(
                    "profile bundle: {} ({}); linear ops from dense.csv, attention interpolated over the {} rows of attention.csv{}, LM head and sampler by scheduled requests from per_sequence.csv",
                    b.dir.display(),
                    b.measured,
                    b.attention.rows,
                    if b.attention.has_skew_fit() && cfg.skew_correction {
                        " with skew_fit.csv's correction for unequal decode contexts"
                    } else if b.attention.has_skew_fit() {
                        " (skew_fit.csv not applied: predictor.skew_correction = false)"
                    } else {
                        " (no skew_fit.csv: decodes priced at their mean context)"
                    }
                ));
                if f64::from(max_batch_tokens) > b.dense.max_tokens {
                    warnings.push(format!(
                        "batches may reach {max_batch_tokens} tokens but {} was measured up to {}; operators grow proportionally beyond",
                        b.dir.join("dense.csv").display(),
                        b.dense.max_tokens
                    ));
                }
                Some(b)
            }
            _ => None,
        };
        let is_bundle = bundle.is_some();
        // The bundle's three tables go where the predictor prices each part.
        let (mut bundle_dense, mut bundle_attention, bundle_per_sequence) = match bundle {
            Some(b) => (Some(b.dense), Some(b.attention), Some(b.per_sequence)),
            None => (None, None, None),
        };
        let linear = match compute {
            _ if is_bundle => Linear::Bundle(bundle_dense.take().expect("bundle read")),
            Some(dir) => {
                let c = profile::read_mlp(&dir.join("mlp.csv"), model, tp, stat)?;
                provenance.push(format!(
                    "linear ops: {} (TP {tp}, {}s)",
                    dir.join("mlp.csv").display(),
                    stat.column()
                ));
                if f64::from(max_batch_tokens) > c.max_tokens {
                    warnings.push(format!(
                        "batches may reach {max_batch_tokens} tokens but {} was measured up to {}; linear operators grow proportionally beyond",
                        dir.join("mlp.csv").display(),
                        c.max_tokens
                    ));
                }
                Linear::Measured(c)
            }
            None => {
                provenance.push(format!("linear ops: roofline ({}, TP {tp})", device.name));
                Linear::Roofline
            }
        };
        let attention = match compute.map(|d| d.join("attention.csv")) {
            _ if is_bundle => {
                let mut g = bundle_attention.take().expect("bundle read");
                if !cfg.skew_correction {
                    g.drop_skew_fit();
                }
                Attention::Grid(g)
            }
            Some(p) if p.exists() && cfg.attention == AttentionModel::Table => {
                let table = profile::read_attention_table(&p, tp, stat)?;
                provenance.push(format!(
                    "attention: interpolated in {} (predictor.attention = \"table\")",
                    p.display()
                ));
                Attention::Table(table)
            }
            Some(p) if p.exists() => {
                let fit = profile::read_attention(&p, tp, stat)?;
                provenance.push(format!(
                    "attention: fitted to {} (MAPE prefill {:.1} %, decode {:.1} %)",
                    p.display(),
                    fit.mape.0 * 100.0,
                    fit.mape.1 * 100.0
                ));
                Attention::Fitted(fit)
            }
            _ => {
                provenance.push(format!("attention: roofline ({})", device.name));
                Attention::Roofline
            }
        };
        let head = match compute.map(|d| d.join("lm_head.csv")) {
            _ if is_bundle => None,
            Some(p) if cfg.lm_head && p.exists() => {
                let c = profile::read_lm_head(&p, model, tp, stat)?;
                provenance.push(format!("final norm + LM head: {}", p.display()));
                Some(c)
            }
            _ => {
                if cfg.lm_head {
                    provenance.push(format!("LM head: roofline ({})", device.name));
                }
                None
            }
        };
        let net_dir = network.or(compute);
        let collective =
            |file: &str, name: &str, workers: u32| -> Result<Option<Curve>, SimError> {
                match net_dir.map(|d| d.join(file)) {
                    Some(p) if p.exists() => Ok(Some(profile::read_collective(&p, name, workers)?)),
                    _ => Ok(None),
                }
            };
        let all_reduce = if tp > 1 {
            let c = collective("all_reduce.csv", "all_reduce", tp)?;
            provenance.push(match (&c, net_dir) {
                (Some(_), Some(d)) => format!("all_reduce: {}", d.join("all_reduce.csv").display()),
                _ => "all_reduce: roofline (ring over NVLink)".into(),
            });
            c
        } else {
            None
        };
        let send_recv = if pp > 1 {
            let c = collective("send_recv.csv", "send_recv", 2)?;
            provenance.push(match (&c, net_dir) {
                (Some(_), Some(d)) => format!("send_recv: {}", d.join("send_recv.csv").display()),
                _ => "send_recv: roofline".into(),
            });
            c
        } else {
            None
        };
        let h = f64::from(model.hidden_size);
        let v = f64::from(model.vocab_size);
        let embedding_params = v * h * if model.tie_word_embeddings { 1.0 } else { 2.0 };
        let params = model.num_params() as f64;
        let mut p = Predictor {
            model: model.clone(),
            device: device.clone(),
            tp,
            layers: stage_layers(model.num_layers, pp),
            linear,
            attention,
            all_reduce,
            send_recv,
            head,
            per_sequence: bundle_per_sequence,
            table: Vec::new(),
            cpu_base_ns: cfg.cpu_overhead_us * 1e3,
            cpu_per_req_ns: cfg.cpu_overhead_per_request_us * 1e3,
            lm_head: cfg.lm_head,
            dense_flops_per_token: 2.0 * (params - embedding_params),
            weight_bytes: params * f64::from(model.dtype_bytes),
            kv_bytes_per_token: roofline::kv_bytes_per_token_layer(model, 1)
                * f64::from(model.num_layers),
            provenance,
            warnings,
        };
        if !cfg.cuda_graph_sizes.is_empty() {
            p.provenance.push(format!(
                "steps of up to {} tokens padded to the next of {} CUDA-graph sizes",
                cfg.cuda_graph_sizes.last().copied().unwrap_or(0),
                cfg.cuda_graph_sizes.len()
            ));
        }
        let len = max_batch_tokens.clamp(1, 1 << 16) as usize + 1;
        let graphs = &cfg.cuda_graph_sizes;
        let padded = |t: usize| -> f64 {
            let i = graphs.partition_point(|&g| (g as usize) < t);
            match graphs.get(i) {
                Some(&g) if t > 0 => f64::from(g),
                _ => t as f64,
            }
        };
        p.table = (0..pp as usize)
            .map(|s| {
                (0..len)
                    .map(|t| (p.linear_stage_ms(s, padded(t)) * 1e6).round() as u64)
                    .collect()
            })
            .collect();
        Ok(p)
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.layers.len()
    }

    fn layer_linear_ms(&self, t: f64) -> f64 {
        match &self.linear {
            Linear::Measured(c) => c
                .ops
                .iter()
                .filter(|(op, _)| op.as_str() != "emb")
                .map(|(_, curve)| curve.at(t))
                .sum(),
            Linear::Bundle(d) => d.layer_ms(t),
            Linear::Roofline => roofline::MLP_OPS
                .iter()
                .filter(|op| **op != "emb")
                .map(|op| roofline::op_time(&self.model, &self.device, self.tp, op, t) * 1e3)
                .sum(),
        }
    }

    fn emb_ms(&self, t: f64) -> f64 {
        match &self.linear {
            Linear::Measured(c) => c.ops.get("emb").map_or(0.0, |e| e.at(t)),
            Linear::Bundle(d) => d.embedding.as_ref().map_or(0.0, |e| e.at(t)),
            Linear::Roofline => {
                roofline::op_time(&self.model, &self.device, self.tp, "emb", t) * 1e3
            }
        }
    }

    fn all_reduce_ms(&self, t: f64) -> f64 {
        if self.tp <= 1 {
            return 0.0;
        }
        let bytes = t * f64::from(self.model.hidden_size) * f64::from(self.model.dtype_bytes);
        match &self.all_reduce {
            Some(c) => c.at(bytes),
            None => roofline::all_reduce(&self.device, self.tp, bytes) * 1e3,
        }
    }

    fn send_recv_ms(&self, t: f64) -> f64 {
        let bytes = t * f64::from(self.model.hidden_size) * f64::from(self.model.dtype_bytes);
        match &self.send_recv {
            Some(c) => c.at(bytes),
            None => roofline::send_recv(&self.device, bytes) * 1e3,
        }
    }

    /// The token-count-only part of stage `s` for `t` tokens, ms.
    fn linear_stage_ms(&self, s: usize, t: f64) -> f64 {
        if t <= 0.0 {
            return 0.0;
        }
        let mut ms =
            f64::from(self.layers[s]) * (self.layer_linear_ms(t) + 2.0 * self.all_reduce_ms(t));
        if s == 0 {
            ms += self.emb_ms(t);
        }
        if s + 1 < self.layers.len() {
            ms += self.send_recv_ms(t);
        } else if let Linear::Bundle(d) = &self.linear {
            ms += d.final_norm.as_ref().map_or(0.0, |c| c.at(t));
        }
        ms
    }

    /// One pass over a batch's requests — (new tokens, cached context, samples) each —
    /// collecting every sum the cost needs.
    fn terms(reqs: impl Iterator<Item = (u32, u32, bool)>) -> Terms {
        let mut x = Terms::default();
        for (num_tokens, num_computed, samples) in reqs {
            let c = f64::from(num_tokens);
            let k = f64::from(num_computed);
            // Causal attention work: each new token attends to k cached ones plus its place.
            let causal = c * (k + (c + 1.0) / 2.0);
            x.tokens += c;
            x.causal += causal;
            x.kv_read += k + c;
            x.sampled += f64::from(u8::from(samples));
            if num_tokens == 1 {
                x.dec_min = if x.dec_b == 0.0 {
                    k + 1.0
                } else {
                    x.dec_min.min(k + 1.0)
                };
                x.dec_max = x.dec_max.max(k + 1.0);
                x.dec_b += 1.0;
                x.dec_kv += k + 1.0;
            } else {
                x.pre_n += 1;
                x.pre_c += c;
                x.pre_k += k;
                x.pre_ck += c * (k + c / 2.0);
                x.pre_causal += causal;
                x.pre_kv += k + c;
            }
        }
        x
    }

    /// Attention time of one layer, ms.
    fn attention_layer_ms(&self, x: &Terms) -> f64 {
        match &self.attention {
            Attention::Grid(g) => {
                let (chunk, key) = if x.pre_c > 0.0 {
                    (x.pre_c, x.pre_ck / x.pre_c)
                } else {
                    (0.0, 0.0)
                };
                let dec = bundle::Decodes {
                    n: x.dec_b,
                    mean: if x.dec_b > 0.0 {
                        x.dec_kv / x.dec_b
                    } else {
                        0.0
                    },
                    min: x.dec_min,
                    max: x.dec_max,
                };
                g.ms(chunk, key, dec)
            }
            Attention::Table(t) => {
                let mut ms = t.kv_save_ms(x.tokens);
                if x.pre_n > 0 {
                    ms += t.prefill_ms(x.pre_c, x.pre_ck / x.pre_c);
                }
                if x.dec_b > 0.0 {
                    ms += t.decode_ms(x.dec_b, x.dec_kv / x.dec_b);
                }
                ms
            }
            Attention::Fitted(f) => {
                let mut ms = f.kv_save[0] + f.kv_save[1] * x.tokens;
                if x.pre_n > 0 {
                    ms += f.prefill[0]
                        + f.prefill[1] * x.pre_c
                        + f.prefill[2] * x.pre_k
                        + f.prefill[3] * x.pre_ck;
                }
                if x.dec_b > 0.0 {
                    ms += f.decode[0] + f.decode[1] * x.dec_b + f.decode[2] * x.dec_kv;
                }
                ms
            }
            Attention::Roofline => {
                let mut s = roofline::kv_save(&self.model, &self.device, self.tp, x.tokens);
                if x.pre_n > 0 {
                    let flops =
                        4.0 * x.pre_causal * f64::from(self.model.num_heads * self.model.head_dim)
                            / f64::from(self.tp);
                    let bytes = x.pre_kv * roofline::kv_bytes_per_token_layer(&self.model, self.tp);
                    s += roofline::attn_prefill(&self.device, flops, bytes, x.pre_c);
                }
                if x.dec_b > 0.0 {
                    s += roofline::attn_decode(
                        &self.model,
                        &self.device,
                        self.tp,
                        x.dec_b,
                        x.dec_kv,
                    );
                }
                s * 1e3
            }
        }
    }

    /// The cost of a batch.
    pub fn predict(&self, out: &SchedulerOutput) -> BatchCost {
        let reqs = out
            .scheduled
            .iter()
            .map(|r| (r.num_tokens, r.num_computed, r.samples));
        self.cost(out.num_batched_tokens, out.scheduled.len(), reqs)
    }

    /// The cost of a batch given by its requests' (new tokens, cached context, samples), e.g.
    /// one a real engine ran (`vajra-sim compare --steps`).
    pub fn predict_step(&self, reqs: &[(u32, u32, bool)]) -> BatchCost {
        let tokens = reqs.iter().map(|r| r.0).sum();
        self.cost(tokens, reqs.len(), reqs.iter().copied())
    }

    fn cost(
        &self,
        tokens: u32,
        num_reqs: usize,
        reqs: impl Iterator<Item = (u32, u32, bool)>,
    ) -> BatchCost {
        let t = tokens as usize;
        let x = Self::terms(reqs);
        let attn_ms = self.attention_layer_ms(&x);
        let batch = num_reqs as f64;
        let last = self.layers.len() - 1;
        let stage_ns = StageTimes::collect((0..self.layers.len()).map(|s| {
            let lin = match self.table[s].get(t) {
                Some(&ns) => ns as f64,
                None => self.linear_stage_ms(s, t as f64) * 1e6,
            };
            let mut ns = lin + f64::from(self.layers[s]) * attn_ms * 1e6;
            if s == last
                && self.lm_head
                && let Some(b) = &self.per_sequence
            {
                ns += b.ms(batch) * 1e6;
            } else if s == last && self.lm_head && x.sampled > 0.0 {
                ns += match &self.head {
                    Some(c) => c.at(x.sampled) * 1e6,
                    None => roofline::lm_head(&self.model, &self.device, self.tp, x.sampled) * 1e9,
                };
            }
            if s == 0 {
                ns += self.cpu_base_ns + self.cpu_per_req_ns * batch;
            }
            ns.round().max(1.0) as u64
        }));
        // MFU/MBU accounting (whole replica).
        let l = f64::from(self.model.num_layers);
        let attn_flops = 4.0 * x.causal * f64::from(self.model.num_heads * self.model.head_dim);
        let head_flops = if self.lm_head {
            2.0 * x.sampled * f64::from(self.model.hidden_size) * f64::from(self.model.vocab_size)
        } else {
            0.0
        };
        BatchCost {
            stage_ns,
            flops: self.dense_flops_per_token * t as f64 + l * attn_flops + head_flops,
            bytes: self.weight_bytes + x.kv_read * self.kv_bytes_per_token,
        }
    }
}

/// Where to look for a profile of `model` on `device` when the experiment names none:
/// `profiles/measured/<device>/<model>/` then `profiles/generated/<device>/<model>/`, under each
/// of `roots`.
pub fn find_profile(roots: &[PathBuf], device: &str, model: &ModelConfig) -> Option<PathBuf> {
    let short = model.name.rsplit('/').next().unwrap_or(&model.name);
    for root in roots {
        for kind in ["measured", "generated"] {
            let d = root.join("profiles").join(kind).join(device).join(short);
            if d.join("mlp.csv").exists() {
                return Some(d);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use vajra_core::config::{CacheConfig, PolicyConfig, SchedulerConfig};
    use vajra_core::ids::RequestId;
    use vajra_core::request::{Prompt, Request};
    use vajra_core::sched::Scheduler;
    use vajra_core::sched::config::VllmV1Config;
    use vajra_core::time::Timestamp;
    use vajra_experiment::catalog::{device, model};

    fn batch(prompts: &[u32]) -> SchedulerOutput {
        let cfg = SchedulerConfig::new(PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 8192,
            ..Default::default()
        }));
        let mut s = Scheduler::new(cfg, &CacheConfig::default(), 4096, 8192).unwrap();
        for (i, &p) in prompts.iter().enumerate() {
            s.add_request(
                Request::new(
                    RequestId(i as u64),
                    Prompt::synthetic(p),
                    4,
                    Timestamp::ZERO,
                ),
                Timestamp::ZERO,
            )
            .unwrap();
        }
        s.schedule(Timestamp::ZERO)
    }

    fn roofline(tp: u32, pp: u32) -> Predictor {
        Predictor::new(
            &model("Llama-2-7b-hf").unwrap(),
            &device("h100").unwrap(),
            ParallelConfig {
                tensor_parallel: tp,
                pipeline_parallel: pp,
            },
            &PredictorConfig::default(),
            None,
            None,
            8192,
        )
        .unwrap()
    }

    #[test]
    fn more_tokens_take_longer_and_tp_shortens_a_big_prefill() {
        let p = roofline(1, 1);
        let small = p.predict(&batch(&[128])).stage_ns[0];
        let big = p.predict(&batch(&[4096])).stage_ns[0];
        assert!(big > 10 * small, "{small} {big}");
        let tp4 = roofline(4, 1).predict(&batch(&[4096])).stage_ns[0];
        assert!(tp4 < big / 2, "{tp4} vs {big}");
    }

    #[test]
    fn pipeline_stages_split_the_layers() {
        assert_eq!(stage_layers(32, 3), vec![11, 11, 10]);
        let p = roofline(1, 2).predict(&batch(&[1024]));
        assert_eq!(p.stage_ns.len(), 2);
        let one = roofline(1, 1).predict(&batch(&[1024])).stage_ns[0];
        let sum: u64 = p.stage_ns.iter().sum();
        assert!(sum > one && sum < one + one / 5, "{sum} vs {one}");
    }

    #[test]
    fn a_4096_token_prefill_on_h100_takes_the_published_order_of_magnitude() {
        // Vidur's measured linear ops alone sum to about 2.6 ms per layer at 4096 tokens
        // (Llama-2-7B, H100); with attention a full prefill is some 90-130 ms.
        let ms = roofline(1, 1).predict(&batch(&[4096])).stage_ns[0] as f64 / 1e6;
        assert!((70.0..160.0).contains(&ms), "{ms}");
    }

    #[test]
    fn measured_vidur_profile_loads_and_agrees_with_the_roofline_within_a_third() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../../../shared/reference/vidur/profiling/compute/h100/meta-llama/Llama-2-7b-hf",
        );
        if !dir.exists() {
            eprintln!("skipping: {} not present", dir.display());
            return;
        }
        let m = model("Llama-2-7b-hf").unwrap();
        let p = Predictor::new(
            &m,
            &device("h100").unwrap(),
            ParallelConfig::default(),
            &PredictorConfig::default(),
            Some(&dir),
            None,
            8192,
        )
        .unwrap();
        assert!(!p.warnings.is_empty(), "8192 > 4096 measured: warned once");
        let a = p.predict(&batch(&[2048])).stage_ns[0] as f64;
        let b = roofline(1, 1).predict(&batch(&[2048])).stage_ns[0] as f64;
        assert!((a / b - 1.0).abs() < 0.34, "{a} vs {b}");
    }

    #[test]
    fn a_profile_for_another_model_is_refused_by_name() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../../../shared/reference/vidur/profiling/compute/h100/meta-llama/Llama-2-70b-hf",
        );
        if !dir.exists() {
            return;
        }
        let e = Predictor::new(
            &model("Llama-2-7b-hf").unwrap(),
            &device("h100").unwrap(),
            ParallelConfig::default(),
            &PredictorConfig::default(),
            Some(&dir),
            None,
            512,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("n_embd") && e.contains("Llama-2-7b-hf"), "{e}");
    }

    /// A profile folder `vajra-<name>-<pid>` for Llama-2-7B with an `mlp.csv` of the four
    /// projections, one `time_stats.<op>.<stat>` column per op and statistic (op-major), and
    /// the given rows after `n_head,n_embd,num_tokens,num_tensor_parallel_workers`.
    fn mlp_folder(name: &str, stats: &[&str], rows: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vajra-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mlp = String::from("n_head,n_embd,num_tokens,num_tensor_parallel_workers");
        for op in [
            "attn_pre_proj",
            "attn_post_proj",
            "mlp_up_proj",
            "mlp_down_proj",
        ] {
            for stat in stats {
                mlp += &format!(",time_stats.{op}.{stat}");
            }
        }
        mlp += "\n";
        mlp += rows;
        std::fs::write(dir.join("mlp.csv"), mlp).unwrap();
        dir
    }

    /// A profile folder for Llama-2-7B with flat linear operators and the given `lm_head.csv`.
    fn folder_with_head(name: &str, head_csv: &str) -> PathBuf {
        let dir = mlp_folder(
            &format!("head-{name}"),
            &["median"],
            "32,4096,1,1,0.1,0.1,0.1,0.1\n32,4096,4096,1,1,1,1,1\n",
        );
        std::fs::write(dir.join("lm_head.csv"), head_csv).unwrap();
        dir
    }

    fn measured_with(dir: &Path, cfg: &PredictorConfig) -> Result<Predictor, SimError> {
        Predictor::new(
            &model("Llama-2-7b-hf").unwrap(),
            &device("h100").unwrap(),
            ParallelConfig::default(),
            cfg,
            Some(dir),
            None,
            4096,
        )
    }

    fn measured(dir: &Path, lm_head: bool) -> Result<Predictor, SimError> {
        measured_with(
            dir,
            &PredictorConfig {
                lm_head,
                ..PredictorConfig::default()
            },
        )
    }

    #[test]
    fn a_measured_lm_head_replaces_the_roofline_by_sampled_rows() {
        let dir = folder_with_head(
            "ok",
            "n_embd,vocab_size,num_tensor_parallel_workers,num_sampled,time_stats.final_norm.median,time_stats.lm_head.median\n\
             4096,32000,1,1,0.5,1.5\n4096,32000,1,4,0.5,4.5\n",
        );
        let with = measured(&dir, true).unwrap();
        let without = measured(&dir, false).unwrap();
        assert!(with.provenance.iter().any(|p| p.contains("lm_head.csv")));
        // One prompt samples one row (2 ms); three prompts sample three (interpolated: 4 ms).
        for (prompts, ms) in [(&[128u32][..], 2.0), (&[64, 64, 64][..], 4.0)] {
            let b = batch(prompts);
            let d = with.predict(&b).stage_ns[0] - without.predict(&b).stage_ns[0];
            assert_eq!(d, (ms * 1e6) as u64, "{prompts:?}");
        }
        let wrong = folder_with_head(
            "wrong",
            "n_embd,vocab_size,num_tensor_parallel_workers,num_sampled,time_stats.final_norm.median,time_stats.lm_head.median\n\
             4096,151936,1,1,0.5,1.5\n",
        );
        let e = measured(&wrong, true).unwrap_err().to_string();
        assert!(e.contains("vocab_size") && e.contains("151936"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(wrong);
    }

    #[test]
    fn a_bundle_prices_a_mixed_step_from_its_tables() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../../../shared/reference/llmservingsim/profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16",
        );
        if !dir.exists() {
            eprintln!("SKIPPED: {} is not present", dir.display());
            return;
        }
        let m = model("meta-llama/Llama-3.1-8B").unwrap();
        let p = Predictor::new(
            &m,
            &device("rtx4090").unwrap(),
            ParallelConfig::default(),
            &PredictorConfig::default(),
            Some(&dir),
            None,
            2048,
        )
        .unwrap();
        // A 1,024-token prompt chunk beside 32 decodes at context 512: 1,056 tokens, 33
        // requests, and an attention row the table holds (1024, 0, 32, 512).
        let mut step = vec![(1024u32, 0u32, true)];
        step.extend(std::iter::repeat_n((1, 511, true), 32));
        let got = p.predict_step(&step).stage_ns[0] as f64 / 1e3;
        // The same sum by hand from the CSVs, in µs.
        let rows = |file: &str| -> Vec<Vec<String>> {
            std::fs::read_to_string(dir.join("tp1").join(file))
                .unwrap()
                .lines()
                .skip(1)
                .map(|l| l.split(',').map(str::to_owned).collect())
                .collect()
        };
        let at = |rows: &[Vec<String>], op: &str, x: f64| -> f64 {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r[0] == op)
                .map(|r| (r[1].parse().unwrap(), r[2].parse().unwrap()))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let i = pts.partition_point(|q| q.0 < x);
            if pts[i].0 == x {
                return pts[i].1;
            }
            let (a, b) = (pts[i - 1], pts[i]);
            a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)
        };
        let dense = rows("dense.csv");
        let per_layer: f64 = [
            ("layernorm", 2.0),
            ("qkv_proj", 1.0),
            ("rotary_emb", 1.0),
            ("o_proj", 1.0),
            ("gate_up_proj", 1.0),
            ("act_fn", 1.0),
            ("down_proj", 1.0),
        ]
        .iter()
        .map(|(op, n)| n * at(&dense, op, 1056.0))
        .sum();
        let seq = rows("per_sequence.csv");
        let expected = 32.0 * (per_layer + 312.747)
            + at(&dense, "embedding", 1056.0)
            + at(&dense, "final_layernorm", 1056.0)
            + at(&seq, "lm_head", 33.0)
            + at(&seq, "sampler", 33.0);
        assert!(
            (got - expected).abs() < 0.01 * expected.max(1.0) / 100.0 + 0.01,
            "{got} µs vs {expected} µs"
        );
        assert!(p.provenance.iter().any(|s| s.contains("skew_fit.csv")));
    }

    #[test]
    fn a_bundle_folder_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("vajra-bundle-bad-{}", std::process::id()));
        let tp1 = dir.join("tp1");
        std::fs::create_dir_all(&tp1).unwrap();
        std::fs::write(
            dir.join("meta.yaml"),
            "model: x\nhf_overrides:\n  intermediate_size: 999\n",
        )
        .unwrap();
        std::fs::write(
            tp1.join("dense.csv"),
            "layer,tokens,time_us\nqkv_proj,1,2.0\n",
        )
        .unwrap();
        std::fs::write(
            tp1.join("attention.csv"),
            "prefill_chunk,n_decode,kv_decode,time_us\n",
        )
        .unwrap();
        let m = model("meta-llama/Llama-3.1-8B").unwrap();
        let build = |tp: u32| {
            Predictor::new(
                &m,
                &device("h100").unwrap(),
                ParallelConfig {
                    tensor_parallel: tp,
                    pipeline_parallel: 1,
                },
                &PredictorConfig::default(),
                Some(&dir),
                None,
                512,
            )
            .unwrap_err()
            .to_string()
        };
        let e = build(2);
        assert!(e.contains("tp2") && e.contains("TP 1"), "{e}");
        let e = build(1);
        assert!(e.contains("intermediate_size") && e.contains("999"), "{e}");
        std::fs::write(dir.join("meta.yaml"), "model: x\n").unwrap();
        let e = build(1);
        assert!(e.contains("per_sequence.csv"), "{e}");
        std::fs::write(
            tp1.join("per_sequence.csv"),
            "layer,sequences,time_us\nlm_head,1,5\n",
        )
        .unwrap();
        let e = build(1);
        assert!(
            e.contains("kv_prefill") && e.contains("attention.csv"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn profile_statistic_picks_the_median_or_the_mean_columns() {
        // Every operator: median 0.1 ms, mean 0.2 ms per layer, flat in tokens.
        let dir = mlp_folder(
            "stat",
            &["median", "mean"],
            "32,4096,1,1,0.1,0.2,0.1,0.2,0.1,0.2,0.1,0.2\n32,4096,4096,1,0.1,0.2,0.1,0.2,0.1,0.2,0.1,0.2\n",
        );
        let at = |stat: &str| {
            let cfg: PredictorConfig =
                toml::from_str(&format!("lm_head = false\nprofile_statistic = \"{stat}\""))
                    .unwrap();
            let p = measured_with(&dir, &cfg).unwrap();
            p.predict(&batch(&[128])).stage_ns[0] as i64
        };
        // Everything else (the roofline's attention) is the same; the linear operators differ
        // by 32 layers × 4 operators × 0.1 ms.
        let d = at("mean") - at("median");
        assert!((d - 12_800_000).abs() < 1_000, "{d} ns");
        let bad: Result<PredictorConfig, _> = toml::from_str("profile_statistic = \"p99\"");
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("median") && e.contains("mean"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
