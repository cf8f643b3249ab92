//! Device measurements on the CUDA backend (feature `cuda`): `vajra-engine gpu-bench` (decode
//! step time against the memory-bandwidth floor, prefill TFLOP/s against cuBLAS, on a named
//! shape with random weights). Per-operator profiles are [`crate::profile`]'s.
//!
//! Both drive [`CudaBackend`] directly with hand-built steps (no scheduler), so each number is
//! one forward pass of the real kernels. Decode steps reuse a context of garbage KV (the values
//! do not change the work).

use crate::backend::Backend;
use crate::backend::CacheShape;
use crate::backend::cuda::{CudaBackend, SplitAim, WeightSource};
use crate::error::Result;
use crate::sampler::{DeviceDraw, RequestSampler};
use crate::spec::ModelSpec;
use serde_json::json;
use std::fmt::Write as _;
use std::time::Instant;
use vajra_core::sampling::SamplingParams;

use crate::profile::{BLOCK, Batch};

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

/// Median wall time, in ms, of `reps` runs of `step` after `warm` untimed ones.
fn median_ms(warm: usize, reps: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        step()?;
    }
    let mut ms: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            step().map(|()| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Median wall time, in ms, of `reps` greedy steps after `warm` untimed ones.
fn time_steps(b: &mut CudaBackend, batch: &Batch, warm: usize, reps: usize) -> Result<f64> {
    let input = batch.input();
    median_ms(warm, reps, || b.execute_greedy(&input).map(drop))
}

/// What `gpu-bench` measures.
pub struct BenchPlan<'a> {
    /// Decode batch sizes.
    pub decode_batches: &'a [usize],
    /// Context of every decoding request.
    pub decode_ctx: u32,
    /// Prefill lengths (one request each).
    pub prefill_lens: &'a [usize],
    /// Split-K aims (attention blocks per SM, or whole waves) to time the decode batches at, besides the
    /// default.
    pub split_sweep: &'a [SplitAim],
    /// Batches of sampled decodes (temperature 1, top-p 0.9) to time with the device sampler
    /// and with the logits copied to the host sampler.
    pub sampled_batches: &'a [usize],
}

/// A markdown table's header row and its right-aligned separator row, one column per name.
fn table_head<S: AsRef<str>>(md: &mut String, columns: &[S]) {
    let names: Vec<&str> = columns.iter().map(AsRef::as_ref).collect();
    let _ = writeln!(md, "| {} |", names.join(" | "));
    let _ = writeln!(md, "|{}", "---:|".repeat(names.len()));
}

/// Runs the throughput benchmark and returns (Markdown report, JSON record).
///
/// # Errors
/// No device, out of memory, or a kernel failure.
pub fn bench(spec: &ModelSpec, plan: &BenchPlan<'_>) -> Result<(String, serde_json::Value)> {
    let BenchPlan {
        decode_batches,
        decode_ctx,
        prefill_lens,
        split_sweep,
        sampled_batches,
    } = *plan;
    let c = &spec.config;
    let max_b = decode_batches
        .iter()
        .chain(sampled_batches)
        .copied()
        .max()
        .unwrap_or(1);
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
        "Device: {} (driver {}); model shape {} with random bf16 weights ({:.2} GB); kernels {:?} (VAJRA_CUDA_KERNELS), decode stages {} (VAJRA_CUDA_DECODE_STAGES), CUDA graphs for decode {} (VAJRA_CUDA_GRAPHS), projections of ≤ 128 tokens {} (VAJRA_CUDA_GEMM).",
        b.device_name(),
        CudaBackend::driver_version(),
        c.name,
        weight_bytes / 1e9,
        b.kernels(),
        b.decode_stages(),
        if b.graphs() { "on" } else { "off" },
        if b.tuned_gemm() {
            "through cuBLASLt, algorithm chosen by timing"
        } else {
            "through cuBLAS"
        }
    );
    let _ = writeln!(
        md,
        "Measured in this run: device-to-device copy {copy_gbs:.0} GB/s (read + write); cuBLAS bf16 GEMM 8192³ {gemm_8192:.0} TFLOP/s.\n"
    );
    table_head(
        &mut md,
        &[
            "decode batch",
            "context",
            "step ms",
            "floor ms",
            "step / floor",
        ],
    );
    // A decode step's bandwidth floor, ms: weights and every request's KV read once.
    let floor_ms = |n: usize| {
        let bytes = weight_bytes + n as f64 * f64::from(decode_ctx) * kv_per_token;
        bytes / (copy_gbs * 1e9) * 1e3
    };
    let mut decode = Vec::new();
    for &n in decode_batches {
        let batch = Batch::new(n, 1, decode_ctx - 1, c.vocab_size);
        let ms = time_steps(&mut b, &batch, 3, 15)?;
        let floor = floor_ms(n);
        let _ = writeln!(
            md,
            "| {n} | {decode_ctx} | {ms:.3} | {floor:.3} | {:.2} |",
            ms / floor
        );
        decode.push(json!({"batch": n, "context": decode_ctx, "step_ms": ms, "floor_ms": floor, "ratio": ms / floor}));
    }
    // The same decode steps at other split-K aims (attention blocks per SM), for choosing the
    // default: only the attention kernel's grid changes.
    let mut sweep = Vec::new();
    if !split_sweep.is_empty() {
        let default = b.split_aim();
        let _ = writeln!(
            md,
            "\nSplit-K aim (attention blocks per SM; default {default}, VAJRA_CUDA_SPLIT_BLOCKS_PER_SM): decode step ms (÷ floor)\n"
        );
        let head: Vec<String> = std::iter::once("blocks per SM".to_string())
            .chain(decode_batches.iter().map(|n| format!("batch {n}")))
            .collect();
        table_head(&mut md, &head);
        for &aim in split_sweep {
            b.set_split_aim(aim)?;
            let mut line = format!("| {aim} |");
            for &n in decode_batches {
                let batch = Batch::new(n, 1, decode_ctx - 1, c.vocab_size);
                let ms = time_steps(&mut b, &batch, 3, 15)?;
                let floor = floor_ms(n);
                let _ = write!(line, " {ms:.3} ({:.2}) |", ms / floor);
                sweep.push(
                    json!({"aim": aim.to_string(), "batch": n, "step_ms": ms, "ratio": ms / floor}),
                );
            }
            let _ = writeln!(md, "{line}");
        }
        b.set_split_aim(default)?;
    }
    // Sampled decodes: the device sampler against the logits copied to the host sampler (what
    // the engine does without it), each request with its own seed.
    let mut sampled = Vec::new();
    if !sampled_batches.is_empty() {
        let _ = writeln!(
            md,
            "\nSampled decode steps (temperature 1, top-p 0.9), ms: drawn on the device (`sample_rows`) against the rows' logits copied to the host sampler and drawn there\n"
        );
        table_head(
            &mut md,
            &[
                "batch",
                "device sampler",
                "logits to the host sampler",
                "host ÷ device",
            ],
        );
        for &n in sampled_batches {
            let batch = Batch::new(n, 1, decode_ctx - 1, c.vocab_size);
            let input = batch.input();
            let mut samplers: Vec<RequestSampler> = (0..n as u64)
                .map(|seed| {
                    let params = SamplingParams {
                        temperature: 1.0,
                        top_p: 0.9,
                        seed: Some(seed),
                        ..SamplingParams::default()
                    };
                    RequestSampler::new(params, &[], seed)
                })
                .collect();
            let draws: Vec<DeviceDraw> = samplers
                .iter()
                .map(|s| s.device_draw().expect("no penalties, no log-probabilities"))
                .collect();
            let device = median_ms(3, 15, || b.execute_sampled(&input, &draws).map(drop))?;
            let host = median_ms(1, 5, || {
                let logits = b.execute(&input)?;
                for (r, s) in samplers.iter_mut().enumerate() {
                    s.sample(&mut logits.row(r).to_vec());
                }
                Ok(())
            })?;
            let _ = writeln!(
                md,
                "| {n} | {device:.3} | {host:.3} | {:.2} |",
                host / device
            );
            sampled.push(json!({"batch": n, "device_sampler_ms": device, "host_sampler_ms": host}));
        }
    }
    // With graphs on, every timed decode step should be a replay: say how many were.
    let graphs = b.graph_stats();
    if b.graphs() || graphs.failure.is_some() {
        let _ = writeln!(
            md,
            "\nCUDA graphs: {} captured, {} decode steps replayed{}.",
            graphs.captured,
            graphs.replayed,
            graphs
                .failure
                .as_deref()
                .map(|why| format!("; then turned off: {why}"))
                .unwrap_or_default()
        );
    }
    // With tuned projections: what the timing chose against cuBLASLt's first choice.
    let tuned = b.tuned_shapes();
    if !tuned.is_empty() {
        let _ = writeln!(
            md,
            "\nTuned projections (cuBLASLt; µs per product, the heuristic's first choice against the fastest of its candidates)\n"
        );
        table_head(
            &mut md,
            &[
                "tokens",
                "k",
                "n",
                "candidates",
                "first µs",
                "chosen (index)",
                "chosen µs",
            ],
        );
        for t in &tuned {
            let (tokens, k, n) = t.shape;
            let _ = writeln!(
                md,
                "| {tokens} | {k} | {n} | {} | {:.1} | {} | {:.1} |",
                t.candidates, t.first_us, t.chosen, t.chosen_us
            );
        }
    }
    let tuned_json: Vec<serde_json::Value> = tuned
        .iter()
        .map(|t| json!({"shape": [t.shape.0, t.shape.1, t.shape.2], "candidates": t.candidates, "first_us": t.first_us, "chosen": t.chosen, "chosen_us": t.chosen_us}))
        .collect();
    let _ = writeln!(md);
    table_head(
        &mut md,
        &[
            "prefill tokens",
            "step ms",
            "TFLOP/s",
            "cuBLAS GEMM TFLOP/s (t × 4096 → 2·14336 shape)",
            "share",
        ],
    );
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
        "weights": "random bf16", "kernels": format!("{:?}", b.kernels()), "decode_stages": b.decode_stages(), "graphs": b.graphs(), "graphs_captured": graphs.captured, "graph_replays": graphs.replayed, "graph_failure": graphs.failure, "setup_s": setup_s, "copy_gb_per_s_read_plus_write": copy_gbs,
        "gemm_8192_tflops": gemm_8192, "decode": decode, "split_sweep": sweep, "sampled": sampled, "prefill": prefill, "split_aim": b.split_aim().to_string(), "tuned_gemm": b.tuned_gemm(), "tuned_shapes": tuned_json,
        "timing": "wall clock of one greedy step (host preparation, kernels, argmax copy-back), median of 15 (decode) or 7 (prefill) after warm-up",
    });
    Ok((md, record))
}
