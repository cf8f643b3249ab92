//! Reading operator profiles: this project's folders under `profiles/` and Vidur's CSVs, which
//! share one schema (see `profiles/README.md`).
//!
//! With `[predictor] profile_statistic = "mean"` the `mlp.csv`, `attention.csv` and
//! `lm_head.csv` columns below are read as `.mean` instead of `.median` (collectives keep the
//! median).
//! - `mlp.csv`: `time_stats.<op>.median` (ms per layer) by `num_tokens` and
//!   `num_tensor_parallel_workers`, with the model's `n_embd`, `n_head`, `n_kv_head`.
//! - `attention.csv` (optional): `time_stats.attn_prefill.median` on prefill rows
//!   (`is_prefill`, `prefill_chunk_size`, `kv_cache_size`), `time_stats.attn_decode.median`
//!   on decode rows (`batch_size`, `kv_cache_size`), `time_stats.attn_kv_cache_save.median`
//!   (optional, 0 when absent as in Vidur's older files).
//! - `lm_head.csv` (optional, this project's own): `time_stats.final_norm.median` plus
//!   `time_stats.lm_head.median` (ms per step) by `num_sampled`, with `n_embd`, `vocab_size`.
//! - `all_reduce.csv`, `send_recv.csv` (optional, in the profile folder or a network folder):
//!   `time_stats.<collective>.median` by `size` (bytes), `num_workers`, `devices_per_node`.

use super::curve::Curve;
use super::roofline::MLP_OPS;
use crate::error::SimError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use vajra_core::config::ModelConfig;
pub use vajra_experiment::predictor::Statistic;

/// A CSV table read as text cells, with column lookup that errors by name.
pub(crate) struct Table {
    path: PathBuf,
    headers: HashMap<String, usize>,
    names: Vec<String>,
    rows: Vec<csv::StringRecord>,
}

impl Table {
    pub(crate) fn read(path: &Path) -> Result<Self, SimError> {
        let mut rdr = csv::Reader::from_path(path).map_err(|e| SimError::Profile {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let names: Vec<String> = rdr
            .headers()
            .map_err(|e| SimError::Profile {
                path: path.to_owned(),
                message: e.to_string(),
            })?
            .iter()
            .map(str::to_owned)
            .collect();
        let headers = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let rows = rdr
            .records()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SimError::Profile {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Table {
            path: path.to_owned(),
            headers,
            names,
            rows,
        })
    }

    pub(crate) fn col(&self, name: &str) -> Result<usize, SimError> {
        self.headers
            .get(name)
            .copied()
            .ok_or_else(|| SimError::Profile {
                path: self.path.clone(),
                message: format!(
                    "missing column `{name}` (found {} columns: {}…)",
                    self.names.len(),
                    self.names
                        .iter()
                        .take(8)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Number of data rows.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// A cell as text (trimmed; empty when the row is short).
    pub(crate) fn text(&self, row: usize, col: usize) -> &str {
        self.rows[row].get(col).unwrap_or("").trim()
    }

    /// A cell that must hold a number.
    pub(crate) fn need(&self, row: usize, col: usize) -> Result<f64, SimError> {
        self.num(row, col)?.ok_or_else(|| SimError::Profile {
            path: self.path.clone(),
            message: format!("line {}, column `{}` is empty", row + 2, self.names[col]),
        })
    }

    pub(crate) fn num(&self, row: usize, col: usize) -> Result<Option<f64>, SimError> {
        let cell = self.rows[row].get(col).unwrap_or("").trim();
        if cell.is_empty() {
            return Ok(None);
        }
        match cell {
            "True" | "true" => return Ok(Some(1.0)),
            "False" | "false" => return Ok(Some(0.0)),
            _ => {}
        }
        cell.parse::<f64>()
            .map(Some)
            .map_err(|_| SimError::Profile {
                path: self.path.clone(),
                message: format!(
                    "line {}, column `{}`: `{cell}` is not a number",
                    row + 2,
                    self.names[col]
                ),
            })
    }
}

/// Per-layer operator curves (ms by number of tokens) for one TP width.
#[derive(Debug, Clone)]
pub struct OpCurves {
    /// Curve per `mlp.csv` operator present in the file.
    pub ops: BTreeMap<String, Curve>,
    /// Largest measured token count.
    pub max_tokens: f64,
}

/// Reads `mlp.csv` rows for `tp`, checking that the file describes `model`.
///
/// # Errors
/// A missing file or column, a malformed cell, no rows for `tp`, or a model mismatch.
pub fn read_mlp(
    path: &Path,
    model: &ModelConfig,
    tp: u32,
    stat: Statistic,
) -> Result<OpCurves, SimError> {
    let t = Table::read(path)?;
    let tok = t.col("num_tokens")?;
    let tpc = t.col("num_tensor_parallel_workers")?;
    let embd = t.col("n_embd")?;
    let head = t.col("n_head")?;
    let mut tps = std::collections::BTreeSet::new();
    let mut pts: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let op_cols: Vec<(&str, Option<usize>)> = MLP_OPS
        .iter()
        .map(|op| (*op, t.headers.get(&stat.of(op)).copied()))
        .collect();
    for r in 0..t.rows.len() {
        let Some(rtp) = t.num(r, tpc)? else { continue };
        tps.insert(rtp as u32);
        if rtp as u32 != tp {
            continue;
        }
        let (e, h) = (t.num(r, embd)?, t.num(r, head)?);
        if e != Some(f64::from(model.hidden_size)) || h != Some(f64::from(model.num_heads)) {
            return Err(SimError::Profile {
                path: path.to_owned(),
                message: format!(
                    "line {}: profile is for n_embd = {:?}, n_head = {:?} but the model {} has hidden_size = {}, num_heads = {}",
                    r + 2,
                    e,
                    h,
                    model.name,
                    model.hidden_size,
                    model.num_heads
                ),
            });
        }
        let Some(n) = t.num(r, tok)? else { continue };
        for (op, c) in &op_cols {
            if let Some(c) = c
                && let Some(v) = t.num(r, *c)?
            {
                pts.entry(op).or_default().push((n, v));
            }
        }
    }
    if tps.is_empty() || !tps.contains(&tp) {
        return Err(SimError::Profile {
            path: path.to_owned(),
            message: format!(
                "no rows for tensor_parallel = {tp} (the file has {:?})",
                tps.into_iter().collect::<Vec<_>>()
            ),
        });
    }
    for need in [
        "attn_pre_proj",
        "attn_post_proj",
        "mlp_up_proj",
        "mlp_down_proj",
    ] {
        if !pts.contains_key(need) {
            return Err(SimError::Profile {
                path: path.to_owned(),
                message: format!("missing column `{}`", stat.of(need)),
            });
        }
    }
    let mut ops = BTreeMap::new();
    let mut max_tokens: f64 = 0.0;
    for (op, p) in pts {
        let c = Curve::new(p).ok_or_else(|| SimError::Profile {
            path: path.to_owned(),
            message: format!("column `{}` has no usable values", stat.of(op)),
        })?;
        max_tokens = max_tokens.max(c.x_max());
        ops.insert(op.to_owned(), c);
    }
    Ok(OpCurves { ops, max_tokens })
}

/// Reads `lm_head.csv` (this project's, not Vidur's): the final norm plus the LM head, ms per
/// step, by `num_sampled` (rows whose logits are computed) for `tp`, checking `n_embd` and
/// `vocab_size` against `model`.
///
/// # Errors
/// A missing column, a malformed cell, a model mismatch or no rows for `tp`.
pub fn read_lm_head(
    path: &Path,
    model: &ModelConfig,
    tp: u32,
    stat: Statistic,
) -> Result<Curve, SimError> {
    let t = Table::read(path)?;
    let (embd, vocab) = (t.col("n_embd")?, t.col("vocab_size")?);
    let (tpc, sampled) = (t.col("num_tensor_parallel_workers")?, t.col("num_sampled")?);
    let (norm, head) = (t.col(&stat.of("final_norm"))?, t.col(&stat.of("lm_head"))?);
    let mut pts = Vec::new();
    for r in 0..t.rows.len() {
        if t.num(r, tpc)? != Some(f64::from(tp)) {
            continue;
        }
        let (e, v) = (t.num(r, embd)?, t.num(r, vocab)?);
        if e != Some(f64::from(model.hidden_size)) || v != Some(f64::from(model.vocab_size)) {
            return Err(SimError::Profile {
                path: path.to_owned(),
                message: format!(
                    "line {}: profile is for n_embd = {e:?}, vocab_size = {v:?} but the model {} has hidden_size = {}, vocab_size = {}",
                    r + 2,
                    model.name,
                    model.hidden_size,
                    model.vocab_size
                ),
            });
        }
        if let (Some(s), Some(h)) = (t.num(r, sampled)?, t.num(r, head)?) {
            pts.push((s, h + t.num(r, norm)?.unwrap_or(0.0)));
        }
    }
    Curve::new(pts).ok_or_else(|| SimError::Profile {
        path: path.to_owned(),
        message: format!("no rows with num_tensor_parallel_workers = {tp}"),
    })
}

/// Attention fitted from measured rows, ms per layer:
/// prefill `a + b·c + d·k + e·c·(k + c/2)` summed over chunks (one `a` per batch; `d·k` is the
/// cached context read), decode `a + b·B + e·ΣK`, KV save `a + b·T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionFit {
    /// Prefill coefficients.
    pub prefill: [f64; 4],
    /// Decode coefficients.
    pub decode: [f64; 3],
    /// KV-save coefficients.
    pub kv_save: [f64; 2],
    /// Mean absolute percentage error of the fit on its rows (prefill, decode).
    pub mape: (f64, f64),
}

/// Weighted (relative-error) least squares for up to 3 features; coefficients clamped at 0.
fn fit<const N: usize>(rows: &[([f64; N], f64)]) -> [f64; N] {
    let mut a = [[0.0f64; N]; N];
    let mut b = [0.0f64; N];
    for (x, y) in rows {
        let w = 1.0 / (y * y).max(1e-12);
        for i in 0..N {
            b[i] += w * x[i] * y;
            for j in 0..N {
                a[i][j] += w * x[i] * x[j];
            }
        }
    }
    // Gaussian elimination with partial pivoting (rows swapped in place).
    for col in 0..N {
        let piv = (col..N)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, piv);
        b.swap(col, piv);
        if a[col][col].abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[col];
        let pivot_b = b[col];
        for (row, rhs) in a.iter_mut().zip(b.iter_mut()).skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (x, p) in row.iter_mut().zip(pivot_row.iter()).skip(col) {
                *x -= f * p;
            }
            *rhs -= f * pivot_b;
        }
    }
    let mut x = [0.0f64; N];
    for col in (0..N).rev() {
        if a[col][col].abs() < 1e-300 {
            continue;
        }
        let s: f64 = b[col] - ((col + 1)..N).map(|c| a[col][c] * x[c]).sum::<f64>();
        x[col] = s / a[col][col];
    }
    x.map(|v| v.max(0.0))
}

fn mape<const N: usize>(rows: &[([f64; N], f64)], c: &[f64; N]) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter()
        .map(|(x, y)| {
            let p: f64 = x.iter().zip(c).map(|(a, b)| a * b).sum();
            ((p - y) / y).abs()
        })
        .sum::<f64>()
        / rows.len() as f64
}

/// A Vidur-schema `attention.csv` as measured, for interpolation (`predictor.attention =
/// "table"`): prefill by (chunk, query-weighted key length `k + c/2`), decode by (batch,
/// context), KV save by tokens; ms per layer.
#[derive(Debug, Clone)]
pub struct AttentionTable {
    prefill: super::bundle::Level<super::bundle::Line>,
    decode: super::bundle::Level<super::bundle::Line>,
    kv_save: Option<Curve>,
}

impl AttentionTable {
    /// A prefill of `chunk` tokens in all whose queries see `key` keys on average, ms.
    pub fn prefill_ms(&self, chunk: f64, key: f64) -> f64 {
        self.prefill.at(chunk, |l| l.at(key))
    }

    /// `batch` decodes at mean context `kv`, ms.
    pub fn decode_ms(&self, batch: f64, kv: f64) -> f64 {
        self.decode.at(batch, |l| l.at(kv))
    }

    /// Saving the KV of `tokens` new tokens, ms.
    pub fn kv_save_ms(&self, tokens: f64) -> f64 {
        self.kv_save.as_ref().map_or(0.0, |c| c.at(tokens))
    }
}

/// One row of a Vidur-schema `attention.csv` for the TP width asked for.
struct AttentionRow {
    prefill: bool,
    batch: f64,
    chunk: f64,
    kv: f64,
    prefill_ms: Option<f64>,
    decode_ms: Option<f64>,
    save_ms: Option<f64>,
}

/// The rows of `attention.csv` for `tp` (the statistic's columns; `attn_kv_cache_save`
/// optional).
fn attention_rows(path: &Path, tp: u32, stat: Statistic) -> Result<Vec<AttentionRow>, SimError> {
    let t = Table::read(path)?;
    let tpc = t.col("num_tensor_parallel_workers")?;
    let is_pre = t.col("is_prefill")?;
    let bs = t.col("batch_size")?;
    let chunk = t.col("prefill_chunk_size")?;
    let kv = t.col("kv_cache_size")?;
    let pre_t = t.col(&stat.of("attn_prefill"))?;
    let dec_t = t.col(&stat.of("attn_decode"))?;
    let save_t = t.headers.get(&stat.of("attn_kv_cache_save")).copied();
    let positive = |v: Option<f64>| v.filter(|&y| y > 0.0);
    let mut rows = Vec::new();
    for r in 0..t.rows.len() {
        if t.num(r, tpc)? != Some(f64::from(tp)) {
            continue;
        }
        rows.push(AttentionRow {
            prefill: t.num(r, is_pre)? == Some(1.0),
            batch: t.num(r, bs)?.unwrap_or(1.0),
            chunk: t.num(r, chunk)?.unwrap_or(0.0),
            kv: t.num(r, kv)?.unwrap_or(0.0),
            prefill_ms: positive(t.num(r, pre_t)?),
            decode_ms: positive(t.num(r, dec_t)?),
            save_ms: match save_t {
                Some(c) => positive(t.num(r, c)?),
                None => None,
            },
        });
    }
    Ok(rows)
}

fn no_rows(path: &Path, tp: u32, pre: usize, dec: usize) -> SimError {
    SimError::Profile {
        path: path.to_owned(),
        message: format!(
            "needs prefill and decode rows for tensor_parallel = {tp} (found {pre} prefill, {dec} decode)"
        ),
    }
}

/// Reads `attention.csv` rows for `tp` as a table.
///
/// # Errors
/// As [`read_attention`].
pub fn read_attention_table(
    path: &Path,
    tp: u32,
    stat: Statistic,
) -> Result<AttentionTable, SimError> {
    type Grid = BTreeMap<u64, Vec<(f64, f64)>>;
    let (mut pre, mut dec): (Grid, Grid) = Default::default();
    let mut save = Vec::new();
    for r in attention_rows(path, tp, stat)? {
        if r.prefill {
            if let Some(y) = r.prefill_ms
                && r.chunk > 0.0
            {
                pre.entry(r.chunk.to_bits())
                    .or_default()
                    .push((r.kv + r.chunk / 2.0, y));
            }
            if let Some(y) = r.save_ms {
                save.push((r.chunk, y));
            }
        } else if let Some(y) = r.decode_ms {
            dec.entry(r.batch.to_bits()).or_default().push((r.kv, y));
        }
    }
    if pre.is_empty() || dec.is_empty() {
        return Err(no_rows(path, tp, pre.len(), dec.len()));
    }
    let level = |g: Grid| {
        super::bundle::Level::from_map(
            g.into_iter()
                .map(|(k, pts)| (k, super::bundle::Line::new(pts).expect("finite rows")))
                .collect(),
        )
    };
    Ok(AttentionTable {
        prefill: level(pre),
        decode: level(dec),
        kv_save: Curve::new(save),
    })
}

/// Reads and fits `attention.csv` rows for `tp`.
///
/// # Errors
/// A missing column, a malformed cell, or no prefill or decode rows for `tp`.
pub fn read_attention(path: &Path, tp: u32, stat: Statistic) -> Result<AttentionFit, SimError> {
    let mut pre: Vec<([f64; 4], f64)> = Vec::new();
    let mut dec: Vec<([f64; 3], f64)> = Vec::new();
    let mut save: Vec<([f64; 2], f64)> = Vec::new();
    for r in attention_rows(path, tp, stat)? {
        let (c, k, b) = (r.chunk, r.kv, r.batch);
        if r.prefill {
            if let Some(y) = r.prefill_ms
                && c > 0.0
            {
                pre.push(([1.0, c, k, c * (k + c / 2.0)], y));
            }
            if let Some(y) = r.save_ms {
                save.push(([1.0, c], y));
            }
        } else {
            if let Some(y) = r.decode_ms {
                dec.push(([1.0, b, b * k], y));
            }
            if let Some(y) = r.save_ms {
                save.push(([1.0, b], y));
            }
        }
    }
    if pre.is_empty() || dec.is_empty() {
        return Err(no_rows(path, tp, pre.len(), dec.len()));
    }
    let p = fit(&pre);
    let d = fit(&dec);
    let s = if save.is_empty() {
        [0.0, 0.0]
    } else {
        fit(&save)
    };
    Ok(AttentionFit {
        prefill: p,
        decode: d,
        kv_save: s,
        mape: (mape(&pre, &p), mape(&dec, &d)),
    })
}

/// Reads a collective's curve (ms by bytes) from a Vidur network CSV for `workers` devices:
/// rows with `num_workers == workers`, preferring `devices_per_node == workers` (one node), the
/// median over ranks.
///
/// # Errors
/// A missing column, a malformed cell or no rows for `workers`.
pub fn read_collective(path: &Path, collective: &str, workers: u32) -> Result<Curve, SimError> {
    let t = Table::read(path)?;
    let nw = t.col("num_workers")?;
    let size = t.col("size")?;
    let dpn = t.col("devices_per_node")?;
    let tc = t.col(&format!("time_stats.{collective}.median"))?;
    let mut same_node = Vec::new();
    let mut any = Vec::new();
    for r in 0..t.rows.len() {
        if t.num(r, nw)? != Some(f64::from(workers)) {
            continue;
        }
        let (Some(s), Some(y)) = (t.num(r, size)?, t.num(r, tc)?) else {
            continue;
        };
        if t.num(r, dpn)? == Some(f64::from(workers)) {
            same_node.push((s, y));
        }
        any.push((s, y));
    }
    let pts = if same_node.is_empty() { any } else { same_node };
    Curve::new(pts).ok_or_else(|| SimError::Profile {
        path: path.to_owned(),
        message: format!("no rows with num_workers = {workers}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_exact_coefficients() {
        let rows: Vec<([f64; 3], f64)> = (1..20)
            .map(|i| {
                let x = [1.0, f64::from(i), f64::from(i * i)];
                (x, 0.5 + 0.25 * x[1] + 0.125 * x[2])
            })
            .collect();
        let c = fit(&rows);
        assert!(
            (c[0] - 0.5).abs() < 1e-9 && (c[1] - 0.25).abs() < 1e-9 && (c[2] - 0.125).abs() < 1e-9,
            "{c:?}"
        );
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn an_interpolated_attention_table_is_exact_on_its_rows() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../profiles/vajra-engine/h100/Meta-Llama-3-8B/attention.csv");
        let t = read_attention_table(&p, 1, Statistic::Median).unwrap();
        // Rows (512, 0) prefill and (8, 1024) decode of the measured file.
        assert!((t.prefill_ms(512.0, 256.0) - 0.0345780000789091).abs() < 1e-12);
        assert!((t.decode_ms(8.0, 1024.0) - 0.029145499924197793).abs() < 1e-12);
        // Between rows: between their values.
        let mid = t.decode_ms(8.0, 1536.0);
        assert!(
            mid > t.decode_ms(8.0, 1024.0) && mid < t.decode_ms(8.0, 2048.0),
            "{mid}"
        );
        let e = read_attention_table(&p, 2, Statistic::Median)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor_parallel = 2"), "{e}");
    }
}
