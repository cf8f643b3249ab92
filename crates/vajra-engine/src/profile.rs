//! Per-operator profiles of a backend in the simulator's schema (Vidur's `mlp.csv` and
//! `attention.csv`; `lm_head.csv`, which Vidur does not have; `provenance.json`):
//! `vajra-engine profile --backend cpu|cuda`.
//!
//! Each grid point is one forward step of the real backend over a hand-built batch (no
//! scheduler), timed between operators (CUDA events on the GPU, the wall clock on the CPU), per
//! layer. The grid runs in rounds (every point once per round, a warm-up round first) and each
//! point keeps the median of its rounds. The simulator reads the folder unchanged
//! (`predictor.profile = ...`).

use crate::backend::cpu::CpuBackend;
use crate::backend::{CacheShape, LogitsFor, Profiled, SeqInput, StepInput};
use crate::error::Result;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vajra_core::config::MLP_OPS;
use vajra_core::ids::BlockId;

/// Tokens per KV block of profiling steps.
pub const BLOCK: u32 = 16;

/// The grid a profile covers.
#[derive(Debug, Clone)]
pub struct Grid {
    /// `mlp.csv` rows: tokens in one step.
    pub tokens: Vec<usize>,
    /// Prefill rows: chunk sizes…
    pub chunks: Vec<usize>,
    /// … over these cached contexts.
    pub kv_sizes: Vec<u32>,
    /// Decode rows: batch sizes…
    pub dec_batches: Vec<usize>,
    /// … at these contexts.
    pub dec_kv: Vec<u32>,
    /// Timed rounds (after one warm-up round): timed steps per point.
    pub reps: usize,
}

impl Grid {
    /// The GPU grid (`quick`: seconds instead of a minute).
    pub fn gpu(quick: bool) -> Self {
        if quick {
            Grid {
                tokens: vec![1, 16, 128, 512, 2048],
                chunks: vec![128, 512, 2048],
                kv_sizes: vec![0, 2048],
                dec_batches: vec![1, 16, 64],
                dec_kv: vec![512, 2048],
                reps: 3,
            }
        } else {
            Grid {
                tokens: vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
                chunks: vec![16, 64, 128, 256, 512, 1024, 2048],
                kv_sizes: vec![0, 512, 1024, 2048, 4096],
                dec_batches: vec![1, 2, 4, 8, 16, 32, 64],
                dec_kv: vec![256, 512, 1024, 2048, 4096],
                reps: 10,
            }
        }
    }
    /// The CPU grid: small models, short contexts.
    pub fn cpu(quick: bool) -> Self {
        if quick {
            Grid {
                tokens: vec![1, 8, 64],
                chunks: vec![16, 64],
                kv_sizes: vec![0, 128],
                dec_batches: vec![1, 8],
                dec_kv: vec![64, 256],
                reps: 2,
            }
        } else {
            Grid {
                tokens: vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
                chunks: vec![16, 32, 64, 128, 256],
                kv_sizes: vec![0, 128, 256, 512],
                dec_batches: vec![1, 2, 4, 8, 16, 32],
                dec_kv: vec![64, 128, 256, 512],
                reps: 8,
            }
        }
    }
    /// KV blocks the grid's largest points need.
    pub fn blocks(&self) -> u32 {
        let max_kv = *self.kv_sizes.iter().chain(&self.dec_kv).max().unwrap_or(&0);
        let longest = *self.tokens.iter().chain(&self.chunks).max().unwrap_or(&1);
        Batch::blocks(1, longest, max_kv).max(Batch::blocks(
            *self.dec_batches.iter().max().unwrap_or(&1),
            1,
            max_kv,
        ))
    }
}

/// `n` sequences, each `len` new tokens at context `ctx`, on disjoint contiguous blocks.
pub(crate) struct Batch {
    tokens: Vec<Vec<u32>>,
    tables: Vec<Vec<BlockId>>,
    ctx: u32,
}

impl Batch {
    pub(crate) fn new(n: usize, len: usize, ctx: u32, vocab: u32) -> Self {
        let per = (ctx as usize + len).div_ceil(BLOCK as usize);
        Batch {
            tokens: (0..n)
                .map(|s| {
                    (0..len)
                        .map(|i| ((s * 7919 + i * 104_729) as u32) % vocab)
                        .collect()
                })
                .collect(),
            tables: (0..n)
                .map(|s| (0..per).map(|b| BlockId((s * per + b) as u32)).collect())
                .collect(),
            ctx,
        }
    }
    pub(crate) fn input(&self) -> StepInput<'_> {
        StepInput {
            seqs: self
                .tokens
                .iter()
                .zip(&self.tables)
                .map(|(t, b)| SeqInput {
                    tokens: t,
                    context: self.ctx,
                    block_table: b,
                    sample: true,
                })
                .collect(),
            logits_for: LogitsFor::Sampled,
        }
    }
    pub(crate) fn blocks(n: usize, len: usize, ctx: u32) -> u32 {
        (n * (ctx as usize + len).div_ceil(BLOCK as usize)) as u32
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (civil date from days since 1970, as in
/// Howard Hinnant's `civil_from_days`).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `git rev-parse HEAD` of the working directory, or `unknown`.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// min, max, mean, median, std (Vidur's `time_stats` columns).
fn stats(xs: &[f64]) -> [f64; 5] {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    [v[0], v[v.len() - 1], mean, median, std]
}

fn stat_cols(op: &str) -> String {
    ["min", "max", "mean", "median", "std"]
        .iter()
        .map(|s| format!("time_stats.{op}.{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn fmt_stats(s: [f64; 5]) -> String {
    s.iter()
        .map(|x| format!("{x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Per-layer ms of every operator, per point of `batches`, over `reps` rounds. A round runs
/// every point once, after one warm-up round, so each point's samples spread over the whole
/// profile (a slow minute on a shared machine touches every point alike instead of bending the
/// curves). The rounds walk the points by work ([`round_order`]), forwards then backwards, so
/// every timed step follows a step of about its own size (or itself), as in serving, where a
/// lone decode follows lone decodes: on the CPU a one-token step timed right after the grid's
/// largest decode step ran 2–8 % slower than after a small one.
fn profile_rounds(
    b: &mut dyn Profiled,
    batches: &[Batch],
    reps: usize,
) -> Result<Vec<BTreeMap<&'static str, Vec<f64>>>> {
    let layers = f64::from(b.spec().config.num_layers);
    let mut out: Vec<BTreeMap<&'static str, Vec<f64>>> = vec![BTreeMap::new(); batches.len()];
    let order = round_order(batches);
    for round in 0..=reps {
        let walk: Vec<usize> = if round % 2 == 0 {
            order.clone()
        } else {
            order.iter().rev().copied().collect()
        };
        for i in walk {
            let (batch, times) = (&batches[i], &mut out[i]);
            let step = b.profile_step(&batch.input())?;
            if round == 0 {
                continue; // warm-up
            }
            for (op, ms) in step {
                let per_layer = if matches!(op, "emb" | "final_norm" | "lm_head") {
                    ms
                } else {
                    ms / layers
                };
                times.entry(op).or_default().push(per_layer);
            }
        }
    }
    Ok(out)
}

/// The points of `batches` by (new tokens, context tokens read): neighbours in this order are
/// steps of about the same cost.
fn round_order(batches: &[Batch]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batches.len()).collect();
    order.sort_by_key(|&i| {
        let b = &batches[i];
        let n = b.tokens.len();
        let len = b.tokens.first().map_or(0, Vec::len);
        (n * len, n * b.ctx as usize)
    });
    order
}

fn series<'a>(times: &'a BTreeMap<&'static str, Vec<f64>>, op: &str) -> &'a [f64] {
    times.get(op).map_or(&[0.0][..], Vec::as_slice)
}

/// Profiles `b` over `grid` and writes `<out>/<model>/{mlp.csv, attention.csv,
/// provenance.json}`; returns the folder.
///
/// # Errors
/// A backend failure or a file that cannot be written.
pub fn profile(b: &mut dyn Profiled, grid: &Grid, out: &Path, command: &str) -> Result<PathBuf> {
    if b.num_blocks() < grid.blocks() {
        return Err(crate::EngineError::Backend {
            backend: b.name().into(),
            message: format!(
                "profiling this grid needs {} KV blocks of {BLOCK} tokens; the backend holds {}",
                grid.blocks(),
                b.num_blocks()
            ),
        });
    }
    let spec = b.spec().clone();
    let c = &spec.config;
    let reps = grid.reps;
    let dir = out.join(&c.name);
    std::fs::create_dir_all(&dir).map_err(|e| crate::EngineError::model_file(&dir, e))?;
    let mut mlp = format!(
        "n_head,n_kv_head,n_embd,n_expanded_embd,vocab_size,use_gated_mlp,num_tokens,num_tensor_parallel_workers,{}\n",
        MLP_OPS
            .iter()
            .map(|o| stat_cols(o))
            .collect::<Vec<_>>()
            .join(",")
    );
    // Every point's batch, in the order the rows are written: token counts, prefill chunks
    // over contexts, decode batches over contexts.
    let mut batches: Vec<Batch> = grid
        .tokens
        .iter()
        .map(|&t| Batch::new(1, t, 0, c.vocab_size))
        .collect();
    for &chunk in &grid.chunks {
        for &kv in &grid.kv_sizes {
            batches.push(Batch::new(1, chunk, kv, c.vocab_size));
        }
    }
    for &n in &grid.dec_batches {
        for &kv in &grid.dec_kv {
            batches.push(Batch::new(n, 1, kv, c.vocab_size));
        }
    }
    let measured = profile_rounds(b, &batches, reps)?;
    let mut points = measured.iter();
    for &t in &grid.tokens {
        let times = points.next().expect("a point per token count");
        let cols: Vec<String> = MLP_OPS
            .iter()
            .map(|op| fmt_stats(stats(series(times, op))))
            .collect();
        let _ = writeln!(
            mlp,
            "{},{},{},{},{},True,{t},1,{}",
            c.num_heads,
            c.num_kv_heads,
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
            cols.join(",")
        );
    }
    let mut att = format!(
        "n_embd,n_q_head,n_kv_head,block_size,num_tensor_parallel_workers,max_model_len,attention_backend,batch_size,prefill_chunk_size,kv_cache_size,is_prefill,{},{},{}\n",
        stat_cols("attn_prefill"),
        stat_cols("attn_kv_cache_save"),
        stat_cols("attn_decode")
    );
    let empty = ",,,,";
    let backend = format!("vajra_{}", b.name());
    for &chunk in &grid.chunks {
        for &kv in &grid.kv_sizes {
            let times = points.next().expect("a point per chunk and context");
            let _ = writeln!(
                att,
                "{},{},{},{BLOCK},1,{},{backend},1,{chunk},{kv},True,{},{},{empty}",
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.max_model_len,
                fmt_stats(stats(series(times, "attn"))),
                fmt_stats(stats(series(times, "attn_kv_cache_save")))
            );
        }
    }
    // The final norm and LM head run once per step over the sampled rows: every decode point
    // of `n` sequences samples `n`, so those points' times (all contexts) make `lm_head.csv`.
    let mut head = format!(
        "n_embd,vocab_size,num_tensor_parallel_workers,num_sampled,{},{}\n",
        stat_cols("final_norm"),
        stat_cols("lm_head")
    );
    for &n in &grid.dec_batches {
        let (mut norm, mut lm) = (Vec::new(), Vec::new());
        for &kv in &grid.dec_kv {
            let times = points.next().expect("a point per batch and context");
            norm.extend_from_slice(series(times, "final_norm"));
            lm.extend_from_slice(series(times, "lm_head"));
            let _ = writeln!(
                att,
                "{},{},{},{BLOCK},1,{},{backend},{n},0,{kv},False,{empty},{},{}",
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.max_model_len,
                fmt_stats(stats(series(times, "attn_kv_cache_save"))),
                fmt_stats(stats(series(times, "attn")))
            );
        }
        let _ = writeln!(
            head,
            "{},{},1,{n},{},{}",
            c.hidden_size,
            c.vocab_size,
            fmt_stats(stats(&norm)),
            fmt_stats(stats(&lm))
        );
    }
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| crate::EngineError::model_file(&p, e))
    };
    write("mlp.csv", &mlp)?;
    write("attention.csv", &att)?;
    write("lm_head.csv", &head)?;
    let prov = json!({
        "kind": "measured", "model": c.name, "backend": b.name(), "device": b.device(),
        "date": std::env::var("VAJRA_DATE").unwrap_or_else(|_| utc_now()),
        "commit": std::env::var("VAJRA_COMMIT").unwrap_or_else(|_| git_commit()),
        "command": command,
        "method": b.method(),
        "timing": format!("1 warm-up round + {reps} timed rounds, each round one step of every grid point, walked by work (new tokens, then context tokens read) forwards and backwards in turn; median per point, ms per layer (emb, final_norm, lm_head per step)"),
    });
    write(
        "provenance.json",
        &serde_json::to_string_pretty(&prov).expect("json"),
    )?;
    Ok(dir)
}

/// A CPU backend over the model folder `dir` with enough f32 KV blocks for `grid`.
///
/// # Errors
/// A model file error.
pub fn cpu_backend(dir: &Path, grid: &Grid) -> Result<CpuBackend> {
    CpuBackend::load(dir, |_| CacheShape {
        block_size: BLOCK,
        num_blocks: grid.blocks(),
        num_host_blocks: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_walk_the_points_by_work() {
        let batches = [
            Batch::new(1, 1, 0, 100),    // 0: one token
            Batch::new(1, 512, 0, 100),  // 1: the largest chunk
            Batch::new(1, 16, 256, 100), // 2: a chunk over context
            Batch::new(32, 1, 512, 100), // 3: the largest decode
            Batch::new(1, 1, 256, 100),  // 4: a lone decode
            Batch::new(16, 1, 64, 100),  // 5: 16 decodes, 1,024 context tokens
        ];
        assert_eq!(round_order(&batches), vec![0, 4, 2, 5, 3, 1]);
    }
}
