//! Generated (roofline) profiles in the project's schema, and the predictor's error against
//! measured ones.

use crate::error::{Result, write_err};
use crate::predictor::curve::Curve;
use crate::predictor::profile::{Statistic, read_mlp};
use crate::predictor::roofline::{self, MLP_OPS};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vajra_core::config::ModelConfig;
use vajra_experiment::catalog::{self, DeviceSpec};

/// Token counts of generated `mlp.csv` files: 1–16, then steps of ×√2 up to 32768.
pub fn token_grid() -> Vec<u32> {
    let mut v: Vec<u32> = (1..=16).collect();
    let mut x = 16.0f64;
    while x < 32768.0 {
        x *= std::f64::consts::SQRT_2;
        let r = (x.round() as u32).min(32768);
        if v.last() != Some(&r) {
            v.push(r);
        }
    }
    v
}

/// TP widths a model supports among 1, 2, 4, 8.
pub fn tp_widths(m: &ModelConfig) -> Vec<u32> {
    [1, 2, 4, 8]
        .into_iter()
        .filter(|&tp| catalog::tp_divides(m, tp))
        .collect()
}

fn stats(ms: f64) -> String {
    format!("{ms:.6},{ms:.6},{ms:.6},{ms:.6},0.0")
}

/// Writes `mlp.csv`, `attention.csv` and `provenance.json` for `model` on `device` into `dir`.
///
/// # Errors
/// The folder cannot be written.
pub fn generate(model: &ModelConfig, device: &DeviceSpec, dir: &Path, command: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let mut mlp = String::new();
    for op in MLP_OPS {
        for s in ["min", "max", "mean", "median", "std"] {
            let _ = write!(mlp, "time_stats.{op}.{s},");
        }
    }
    mlp.push_str("n_head,n_kv_head,n_embd,n_expanded_embd,vocab_size,use_gated_mlp,num_tokens,num_tensor_parallel_workers\n");
    let tps = tp_widths(model);
    for &tp in &tps {
        for t in token_grid() {
            for op in MLP_OPS {
                let ms = roofline::op_time(model, device, tp, op, f64::from(t)) * 1e3;
                let _ = write!(mlp, "{},", stats(ms));
            }
            let _ = writeln!(
                mlp,
                "{},{},{},{},{},True,{t},{tp}",
                model.num_heads,
                model.num_kv_heads,
                model.hidden_size,
                model.intermediate_size,
                model.vocab_size
            );
        }
    }
    let p = dir.join("mlp.csv");
    std::fs::write(&p, mlp).map_err(write_err(&p))?;

    let mut att = String::from(
        "n_embd,n_q_head,n_kv_head,block_size,num_tensor_parallel_workers,max_model_len,attention_backend,batch_size,prefill_chunk_size,kv_cache_size,is_prefill",
    );
    for op in ["attn_prefill", "attn_kv_cache_save", "attn_decode"] {
        for s in ["min", "max", "mean", "median", "std"] {
            let _ = write!(att, ",time_stats.{op}.{s}");
        }
    }
    att.push('\n');
    let empty = ",,,,";
    for &tp in &tps {
        let head = format!(
            "{},{},{},16,{tp},{},roofline",
            model.hidden_size, model.num_heads, model.num_kv_heads, model.max_model_len
        );
        for c in [16u32, 64, 128, 256, 512, 1024, 2048, 4096, 8192] {
            for k in [0u32, 256, 1024, 2048, 4096, 8192, 16384] {
                if c + k > model.max_model_len.max(8192) * 2 {
                    continue;
                }
                let (cf, kf) = (f64::from(c), f64::from(k));
                let flops = roofline::prefill_flops(model, tp, cf, kf);
                let bytes = (kf + cf) * roofline::kv_bytes_per_token_layer(model, tp);
                let pre = roofline::attn_prefill(device, flops, bytes, cf) * 1e3;
                let save = roofline::kv_save(model, device, tp, cf) * 1e3;
                let _ = writeln!(
                    att,
                    "{head},1,{c},{k},True,{},{},{empty}",
                    stats(pre),
                    stats(save)
                );
            }
        }
        for b in [1u32, 2, 4, 8, 16, 32, 64, 128, 256] {
            for k in [64u32, 256, 512, 1024, 2048, 4096, 8192, 16384] {
                let (bf, kf) = (f64::from(b), f64::from(k));
                let dec = roofline::attn_decode(model, device, tp, bf, bf * kf) * 1e3;
                let save = roofline::kv_save(model, device, tp, bf) * 1e3;
                let _ = writeln!(
                    att,
                    "{head},{b},0,{k},False,{empty},{},{}",
                    stats(save),
                    stats(dec)
                );
            }
        }
    }
    let p = dir.join("attention.csv");
    std::fs::write(&p, att).map_err(write_err(&p))?;
    let prov = serde_json::json!({
        "kind": "generated",
        "generator": "roofline (crates/vajra-sim/src/predictor/roofline.rs)",
        "model": model,
        "device": device,
        "tensor_parallel": tps,
        "command": command,
        "note": "Not measured: FLOPs and bytes over datasheet peaks with size-dependent efficiency. Prefer a measured profile where one exists.",
    });
    let p = dir.join("provenance.json");
    let mut s = serde_json::to_string_pretty(&prov).map_err(write_err(&p))?;
    s.push('\n');
    std::fs::write(&p, s).map_err(write_err(&p))
}

/// One row of the error report.
#[derive(Debug, Clone)]
pub struct ErrorRow {
    /// The measured file.
    pub file: PathBuf,
    /// Model.
    pub model: String,
    /// Device.
    pub device: String,
    /// TP width.
    pub tp: u32,
    /// MAPE per operator (percent), in [`MLP_OPS`] order (NaN when the column is absent).
    pub op_mape: Vec<f64>,
    /// MAPE of the per-layer sum of linear operators (percent).
    pub layer_mape: f64,
}

fn mape(measured: &Curve, predict: impl Fn(f64) -> f64) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for (x, y) in measured.points() {
        if y > 0.0 {
            s += ((predict(x) - y) / y).abs();
            n += 1.0;
        }
    }
    if n > 0.0 { 100.0 * s / n } else { f64::NAN }
}

/// Compares the roofline with every `mlp.csv` under `root` whose folder names a built-in model
/// and whose path names a built-in device.
///
/// # Errors
/// A measured file that cannot be read.
pub fn roofline_error(root: &Path) -> Result<Vec<ErrorRow>> {
    let mut files = Vec::new();
    collect_mlp(root, &mut files);
    files.sort();
    let mut rows = Vec::new();
    for f in files {
        let Some(model_dir) = f.parent() else {
            continue;
        };
        let Some(name) = model_dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
        else {
            continue;
        };
        let Some(model) = catalog::model(&name) else {
            continue;
        };
        let Some(device) = f
            .components()
            .filter_map(|c| catalog::device(&c.as_os_str().to_string_lossy()))
            .next()
        else {
            continue;
        };
        for tp in tp_widths(&model) {
            let Ok(c) = read_mlp(&f, &model, tp, Statistic::Median) else {
                continue;
            };
            let op_mape = MLP_OPS
                .iter()
                .map(|op| match c.ops.get(*op) {
                    Some(curve) => mape(curve, |t| {
                        roofline::op_time(&model, &device, tp, op, t) * 1e3
                    }),
                    None => f64::NAN,
                })
                .collect();
            // Per-layer sum at each measured token count.
            let xs: Vec<f64> = c.ops["attn_pre_proj"].points().map(|(x, _)| x).collect();
            let sum_curve = Curve::new(
                xs.iter()
                    .map(|&x| {
                        let y: f64 = c
                            .ops
                            .iter()
                            .filter(|(op, _)| op.as_str() != "emb")
                            .map(|(_, cv)| cv.at(x))
                            .sum();
                        (x, y)
                    })
                    .collect(),
            )
            .expect("finite sums");
            let layer_mape = mape(&sum_curve, |t| {
                MLP_OPS
                    .iter()
                    .filter(|op| **op != "emb" && c.ops.contains_key(**op))
                    .map(|op| roofline::op_time(&model, &device, tp, op, t) * 1e3)
                    .sum()
            });
            rows.push(ErrorRow {
                file: f.clone(),
                model: model.name.clone(),
                device: device.name.clone(),
                tp,
                op_mape,
                layer_mape,
            });
        }
    }
    Ok(rows)
}

fn collect_mlp(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_mlp(&p, out);
        } else if p.file_name().is_some_and(|n| n == "mlp.csv") {
            out.push(p);
        }
    }
}

/// The error report as a Markdown table.
pub fn error_table(rows: &[ErrorRow]) -> String {
    let mut s = String::from("| device | model | TP | layer sum |");
    for op in MLP_OPS {
        let _ = write!(s, " {op} |");
    }
    s.push('\n');
    s.push_str("|---|---|---:|---:|");
    s.push_str(&"---:|".repeat(MLP_OPS.len()));
    s.push('\n');
    for r in rows {
        let _ = write!(
            s,
            "| {} | {} | {} | {:.1} % |",
            r.device, r.model, r.tp, r.layer_mape
        );
        for m in &r.op_mape {
            if m.is_nan() {
                s.push_str(" – |");
            } else {
                let _ = write!(s, " {m:.1} % |");
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_profile_reads_back_through_the_measured_path() {
        let dir = std::env::temp_dir().join(format!("vajra-gen-{}", std::process::id()));
        let m = catalog::model("Meta-Llama-3-8B").unwrap();
        let d = catalog::device("h100").unwrap();
        generate(&m, &d, &dir, "test").unwrap();
        let c = read_mlp(&dir.join("mlp.csv"), &m, 2, Statistic::Median).unwrap();
        let direct = roofline::op_time(&m, &d, 2, "mlp_up_proj", 1000.0) * 1e3;
        let read = c.ops["mlp_up_proj"].at(1000.0);
        assert!((read / direct - 1.0).abs() < 0.02, "{read} vs {direct}");
        let fit = crate::predictor::profile::read_attention(
            &dir.join("attention.csv"),
            1,
            Statistic::Median,
        )
        .unwrap();
        assert!(fit.mape.1 < 0.2, "decode fit {:?}", fit.mape);
    }

    #[test]
    fn the_grid_is_increasing_and_reaches_32k() {
        let g = token_grid();
        assert!(g.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*g.last().unwrap(), 32768);
    }
}
