//! Device measurements on the CUDA backend (feature `cuda`): `vajra-engine gpu-bench` (decode
//! step time against the memory-bandwidth floor, prefill TFLOP/s against cuBLAS, on a named
//! shape with random weights) and `vajra-engine profile` (per-operator times in Vidur's
//! `mlp.csv` / `attention.csv` schema, which `vajra-sim` reads unchanged).
//!
//! Both drive [`CudaBackend`] directly with hand-built steps (no scheduler), so each number is
//! one forward pass of the real kernels. Decode steps reuse a context of garbage KV (the values
//! do not change the work).

use crate::backend::cpu::CacheShape;
use crate::backend::cuda::{CudaBackend, WeightSource};
use crate::backend::{Backend, LogitsFor, SeqInput, StepInput};
use crate::error::Result;
use crate::spec::ModelSpec;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;
use vajra_core::config::MLP_OPS;
use vajra_core::ids::BlockId;

const BLOCK: u32 = 16;

/// A backend for a named shape with random weights and `blocks` KV blocks.
///
/// # Errors
/// Unknown shape, no device, or out of memory.
pub fn random_backend(spec: &ModelSpec, blocks: u32) -> Result<CudaBackend> {
    CudaBackend::new(
        spec.clone(),
        WeightSource::Random { seed: 7 },
        CacheShape {
            block_size: BLOCK,
            num_blocks: blocks,
            num_host_blocks: 0,
        },
    )
}

/// `n` sequences, each `len` new tokens at context `ctx`, on disjoint contiguous blocks.
struct Batch {
    tokens: Vec<Vec<u32>>,
    tables: Vec<Vec<BlockId>>,
    ctx: u32,
}

impl Batch {
    fn new(n: usize, len: usize, ctx: u32, vocab: u32) -> Self {
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
    fn input(&self) -> StepInput<'_> {
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
    fn blocks(n: usize, len: usize, ctx: u32) -> u32 {
        (n * (ctx as usize + len).div_ceil(BLOCK as usize)) as u32
    }
}

/// Median wall time, in ms, of `reps` greedy steps after `warm` untimed ones.
fn time_steps(b: &mut CudaBackend, batch: &Batch, warm: usize, reps: usize) -> Result<f64> {
    let input = batch.input();
    for _ in 0..warm {
        b.execute_greedy(&input)?;
    }
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            b.execute_greedy(&input)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Runs the throughput benchmark and returns (Markdown report, JSON record).
///
/// # Errors
/// No device, out of memory, or a kernel failure.
pub fn bench(
    spec: &ModelSpec,
    decode_batches: &[usize],
    decode_ctx: u32,
    prefill_lens: &[usize],
) -> Result<(String, serde_json::Value)> {
    let c = &spec.config;
    let max_b = decode_batches.iter().copied().max().unwrap_or(1);
    let max_p = prefill_lens.iter().copied().max().unwrap_or(1);
    let blocks = Batch::blocks(max_b, 1, decode_ctx).max(Batch::blocks(1, max_p, 0));
    let t0 = Instant::now();
    let mut b = random_backend(spec, blocks)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let copy_gbs = b.copy_bandwidth(2048, 10)?;
    let gemm_8192 = b.gemm_tflops(8192, 8192, 8192, 10)?;
    let weight_bytes = c.num_params() as f64 * 2.0;
    let kv_per_token = c.kv_bytes_per_token(1) as f64;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Device: {} (driver {}); model shape {} with random bf16 weights ({:.2} GB).",
        b.device_name(),
        CudaBackend::driver_version(),
        c.name,
        weight_bytes / 1e9
    );
    let _ = writeln!(
        md,
        "Measured in this run: device-to-device copy {copy_gbs:.0} GB/s (read + write); cuBLAS bf16 GEMM 8192³ {gemm_8192:.0} TFLOP/s.\n"
    );
    let _ = writeln!(
        md,
        "| decode batch | context | step ms | floor ms | step / floor |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    let mut decode = Vec::new();
    for &n in decode_batches {
        let batch = Batch::new(n, 1, decode_ctx - 1, c.vocab_size);
        let ms = time_steps(&mut b, &batch, 3, 15)?;
        let bytes = weight_bytes + n as f64 * f64::from(decode_ctx) * kv_per_token;
        let floor = bytes / (copy_gbs * 1e9) * 1e3;
        let _ = writeln!(
            md,
            "| {n} | {decode_ctx} | {ms:.3} | {floor:.3} | {:.2} |",
            ms / floor
        );
        decode.push(json!({"batch": n, "context": decode_ctx, "step_ms": ms, "floor_ms": floor, "ratio": ms / floor}));
    }
    let _ = writeln!(
        md,
        "\n| prefill tokens | step ms | TFLOP/s | cuBLAS GEMM TFLOP/s (t × 4096 → 2·14336 shape) | share |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    let mut prefill = Vec::new();
    let (h, v) = (f64::from(c.hidden_size), f64::from(c.vocab_size));
    let body_params = c.num_params() as f64 - v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
    for &t in prefill_lens {
        let batch = Batch::new(1, t, 0, c.vocab_size);
        let ms = time_steps(&mut b, &batch, 2, 7)?;
        let tf = t as f64;
        let attn = 4.0 * tf * (tf + 1.0) / 2.0 * f64::from(c.head_dim * c.num_heads * c.num_layers);
        let flops = 2.0 * tf * body_params + 2.0 * h * v + attn;
        let tflops = flops / (ms * 1e-3) / 1e12;
        let gemm = b.gemm_tflops(
            t,
            c.hidden_size as usize,
            2 * c.intermediate_size as usize,
            10,
        )?;
        let _ = writeln!(
            md,
            "| {t} | {ms:.2} | {tflops:.0} | {gemm:.0} | {:.0} % |",
            100.0 * tflops / gemm
        );
        prefill.push(json!({"tokens": t, "step_ms": ms, "tflops": tflops, "gemm_tflops": gemm, "share": tflops / gemm}));
    }
    let record = json!({
        "device": b.device_name(), "driver": CudaBackend::driver_version(), "model": c.name,
        "weights": "random bf16", "setup_s": setup_s, "copy_gb_per_s_read_plus_write": copy_gbs,
        "gemm_8192_tflops": gemm_8192, "decode": decode, "prefill": prefill,
        "timing": "wall clock of one greedy step (host preparation, kernels, argmax copy-back), median of 15 (decode) or 7 (prefill) after warm-up",
    });
    Ok((md, record))
}

// `add` of `MLP_OPS` is fused into the norms here, so its column is 0.

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

/// Per-layer ms of every operator over `reps` profiled steps of `batch`.
fn profile_point(
    b: &mut CudaBackend,
    batch: &Batch,
    reps: usize,
) -> Result<BTreeMap<&'static str, Vec<f64>>> {
    let layers = f64::from(b.spec().config.num_layers);
    let input = batch.input();
    b.profile_step(&input)?; // warm-up
    let mut out: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for _ in 0..reps {
        for (op, ms) in b.profile_step(&input)? {
            let per_layer = if matches!(op, "emb" | "final_norm" | "lm_head") {
                ms
            } else {
                ms / layers
            };
            out.entry(op).or_default().push(per_layer);
        }
    }
    Ok(out)
}

/// Writes `<out>/<model>/{mlp.csv, attention.csv, provenance.json}` and returns the folder.
///
/// # Errors
/// No device, out of memory, a kernel failure, or a file that cannot be written.
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

/// What to profile: a named shape with random weights, or a model folder's real weights.
pub enum ProfileModel<'a> {
    /// Random bf16 weights of this shape.
    Shape(&'a ModelSpec),
    /// The weights of a Hugging Face model folder.
    Folder(&'a Path),
}

/// Writes `<out>/<model>/{mlp.csv, attention.csv, provenance.json}` and returns the folder.
///
/// # Errors
/// No device, out of memory, a kernel failure, a model file error, or a file that cannot be
/// written.
pub fn profile(
    model: ProfileModel<'_>,
    out: &Path,
    quick: bool,
    command: &str,
) -> Result<std::path::PathBuf> {
    let reps = if quick { 3 } else { 10 };
    let tokens: &[usize] = if quick {
        &[1, 16, 128, 512, 2048]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    };
    let chunks: &[usize] = if quick {
        &[128, 512, 2048]
    } else {
        &[16, 64, 128, 256, 512, 1024, 2048]
    };
    let kv_sizes: &[u32] = if quick {
        &[0, 2048]
    } else {
        &[0, 512, 1024, 2048, 4096]
    };
    let dec_batches: &[usize] = if quick {
        &[1, 16, 64]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    let dec_kv: &[u32] = if quick {
        &[512, 2048]
    } else {
        &[256, 512, 1024, 2048, 4096]
    };
    let max_kv = *kv_sizes.iter().chain(dec_kv).max().unwrap_or(&0);
    let blocks = Batch::blocks(1, *tokens.iter().chain(chunks).max().unwrap_or(&1), max_kv).max(
        Batch::blocks(*dec_batches.iter().max().unwrap_or(&1), 1, max_kv),
    );
    let (mut b, weights) = match model {
        ProfileModel::Shape(spec) => (
            random_backend(spec, blocks)?,
            "random bf16 weights of the model's shape",
        ),
        ProfileModel::Folder(dir) => (
            CudaBackend::load(dir, |_| CacheShape {
                block_size: BLOCK,
                num_blocks: blocks,
                num_host_blocks: 0,
            })?,
            "the model folder's weights in bf16",
        ),
    };
    let spec = b.spec().clone();
    let c = &spec.config;
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
    for &t in tokens {
        let times = profile_point(&mut b, &Batch::new(1, t, 0, c.vocab_size), reps)?;
        let cols: Vec<String> = MLP_OPS
            .iter()
            .map(|op| fmt_stats(stats(times.get(op).map_or(&[0.0][..], Vec::as_slice))))
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
    for &chunk in chunks {
        for &kv in kv_sizes {
            let times = profile_point(&mut b, &Batch::new(1, chunk, kv, c.vocab_size), reps)?;
            let _ = writeln!(
                att,
                "{},{},{},{BLOCK},1,{},vajra_paged,1,{chunk},{kv},True,{},{},{empty}",
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.max_model_len,
                fmt_stats(stats(&times["attn"])),
                fmt_stats(stats(&times["attn_kv_cache_save"]))
            );
        }
    }
    for &n in dec_batches {
        for &kv in dec_kv {
            let times = profile_point(&mut b, &Batch::new(n, 1, kv, c.vocab_size), reps)?;
            let _ = writeln!(
                att,
                "{},{},{},{BLOCK},1,{},vajra_paged,{n},0,{kv},False,{empty},{},{}",
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.max_model_len,
                fmt_stats(stats(&times["attn_kv_cache_save"])),
                fmt_stats(stats(&times["attn"]))
            );
        }
    }
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| crate::EngineError::model_file(&p, e))
    };
    write("mlp.csv", &mlp)?;
    write("attention.csv", &att)?;
    let prov = json!({
        "kind": "measured", "model": c.name,
        "device": {"gpu": b.device_name(), "driver_cuda": CudaBackend::driver_version()},
        "date": std::env::var("VAJRA_DATE").unwrap_or_else(|_| utc_now()),
        "commit": std::env::var("VAJRA_COMMIT").unwrap_or_else(|_| git_commit()),
        "command": command,
        "method": format!("vajra-engine's CUDA backend with {weights}: cuBLAS bf16 GEMMs, NVRTC kernels (residual add fused into RMSNorm, so `add` is 0), paged attention over 16-token blocks (prefill chunks of 64 tokens or more as GEMMs)"),
        "timing": format!("CUDA events between operators, 1 warm-up + {reps} timed steps per point, ms per layer (emb per step)"),
    });
    write(
        "provenance.json",
        &serde_json::to_string_pretty(&prov).expect("json"),
    )?;
    Ok(dir)
}
