//! LLMServingSim's profile bundle, read as its profiler writes it: a folder
//! `<GPU>/<org>/<model>/<dtype>/` holding `meta.yaml` and one `tp<N>/` per profiled TP degree,
//! each with
//! - `dense.csv` (`layer,tokens,time_us`): operators by the tokens of the step. `embedding`
//!   runs once before the first decoder layer and `final_layernorm` once after the last;
//!   `layernorm` twice in every decoder layer (before attention and before the MLP, as every
//!   decoder layer vLLM implements has it); every other operator once per layer. A model with
//!   more operators (a Qwen3 `qk_norm`, say) just has more rows, and all of them are priced.
//! - `per_sequence.csv` (`layer,sequences,time_us`): operators run per scheduled request (LM
//!   head, sampler). vLLM v1 computes logits for the last scheduled token of *every* request in
//!   the step, a partial prefill's included (its sample is discarded), so these are priced by
//!   the step's request count, not by the tokens it samples.
//! - `attention.csv` (`prefill_chunk,kv_prefill,n_decode,kv_decode,time_us`; the newer
//!   `prefill_key` in place of `kv_prefill`, and `layer` / `decode_q_len` columns, are read
//!   too): one attention call for a step mixing a prefill chunk with `n_decode` decodes.
//! - `skew_fit.csv` (optional): how far a step whose decodes have unequal contexts moves from
//!   the time at their mean context toward the time at their maximum (`alpha`), by bucket.
//!
//! Attention is priced by interpolating the measured table over all four of its dimensions,
//! nested: along the decode context within each measured (chunk, prefix, decodes) line, then
//! across decode counts, prefixes and chunks, each between its two neighbouring measured
//! values and linearly beyond the grid from the two outermost (floored at zero). So a step that
//! mixes a chunk with decodes costs what the kernel measured for that mix, not prefill plus
//! decode. Several prefill chunks in one step run as one varlen call: the step's chunk is
//! their sum `C` and its prefix coordinate the query-weighted key length
//! `Σ c·(k + c/2) / C`, the mean number of keys a prefill query sees, which for one chunk is
//! `kv_prefill + chunk/2` (how the table's rows are placed on that axis). Decodes enter with
//! their count and mean context; when contexts differ the skew fit blends toward the time at
//! the longest: `t = t(mean) + alpha·(t(max) − t(mean))`, `alpha` from the bucket of (chunk,
//! decodes, skew rate, longest context, prefix), where the skew rate `(mean − min)/(max − min)`
//! is the fraction of long decodes in a two-valued step (what the profiler swept). A bucket the
//! fit lacks takes the median `alpha` of the file (the fit's own pooled value, from the same
//! GPU).

use super::curve::Curve;
use super::profile::Table;
use crate::error::SimError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use vajra_core::config::ModelConfig;

fn err(path: &Path, message: impl Into<String>) -> SimError {
    SimError::Profile {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Whether `dir` is a bundle (`meta.yaml` beside `tp<N>/dense.csv`) or one of its `tp<N>/`
/// folders (`dense.csv` and `attention.csv`).
pub fn is_bundle(dir: &Path) -> bool {
    let tp_folder = dir.join("dense.csv").exists() && dir.join("attention.csv").exists();
    tp_folder || (dir.join("meta.yaml").exists() && !tp_folders(dir).is_empty())
}

/// The `tp<N>` folders of a bundle, by `N`.
fn tp_folders(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("dense.csv").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("tp")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Top-level and one-level-nested `key: value` scalars of a YAML file, as `key` and
/// `parent.key` (what the bundle's `meta.yaml` needs read: which model and GPU it measured).
fn yaml_scalars(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut parent: Option<String> = None;
    for line in text.lines() {
        let body = line.split(" #").next().unwrap_or("");
        if body.trim().is_empty() || body.trim_start().starts_with('#') {
            continue;
        }
        let indent = body.len() - body.trim_start().len();
        let Some((k, v)) = body.trim().split_once(':') else {
            continue;
        };
        let v = v.trim().trim_matches(|c| c == '\'' || c == '"').to_owned();
        match indent {
            0 => {
                parent = v.is_empty().then(|| k.to_owned());
                out.insert(k.to_owned(), v);
            }
            2 => {
                if let Some(p) = &parent {
                    out.insert(format!("{p}.{k}"), v);
                }
            }
            _ => {}
        }
    }
    out
}

/// Operators priced by the tokens of a step.
#[derive(Debug, Clone)]
pub struct DenseOps {
    /// `(operator, times per decoder layer, ms by tokens)`.
    pub per_layer: Vec<(String, f64, Curve)>,
    /// Once before the first layer, ms by tokens.
    pub embedding: Option<Curve>,
    /// Once after the last layer, ms by tokens.
    pub final_norm: Option<Curve>,
    /// Largest measured token count.
    pub max_tokens: f64,
}

impl DenseOps {
    /// One decoder layer's operators for `t` tokens, ms.
    pub fn layer_ms(&self, t: f64) -> f64 {
        self.per_layer.iter().map(|(_, n, c)| n * c.at(t)).sum()
    }
}

/// A measured line: `y` by `x`, sorted, distinct `x`.
#[derive(Debug, Clone, Default)]
pub(super) struct Line {
    xs: Vec<f64>,
    ys: Vec<f64>,
}

/// Linear interpolation through `(keys[i], value(i))`, linear beyond the ends from the two
/// outermost points, floored at zero; evaluates `value` at most twice.
pub(super) fn interp(keys: &[f64], x: f64, value: impl Fn(usize) -> f64) -> f64 {
    let n = keys.len();
    if n == 1 {
        return value(0);
    }
    let i = keys.partition_point(|&k| k <= x);
    if i > 0 && keys[i - 1] == x {
        return value(i - 1);
    }
    let (a, b) = match i {
        0 => (0, 1),
        i if i >= n => (n - 2, n - 1),
        i => (i - 1, i),
    };
    let (ya, yb) = (value(a), value(b));
    (ya + (yb - ya) * (x - keys[a]) / (keys[b] - keys[a])).max(0.0)
}

impl Line {
    /// From points (duplicates averaged), `None` if empty or not finite.
    pub(super) fn new(pts: Vec<(f64, f64)>) -> Option<Self> {
        let curve = Curve::new(pts)?;
        let (xs, ys) = curve.points().unzip();
        Some(Line { xs, ys })
    }

    pub(super) fn at(&self, x: f64) -> f64 {
        interp(&self.xs, x, |i| self.ys[i])
    }
}

/// A measured level of the nested grid: items by key, sorted.
#[derive(Debug, Clone, Default)]
pub(super) struct Level<T> {
    keys: Vec<f64>,
    items: Vec<T>,
}

impl<T> Level<T> {
    /// From items keyed by the bits of non-negative floats (which sort as the values do).
    pub(super) fn from_map(m: BTreeMap<u64, T>) -> Self {
        let (keys, items) = m.into_iter().map(|(k, v)| (f64::from_bits(k), v)).unzip();
        Level { keys, items }
    }

    pub(super) fn at(&self, x: f64, f: impl Fn(&T) -> f64) -> f64 {
        interp(&self.keys, x, |i| f(&self.items[i]))
    }
}

/// Attention by (chunk tokens, query-weighted prefix, decodes, decode context), ms.
#[derive(Debug, Clone)]
pub struct AttentionGrid {
    grid: Level<Level<Level<Line>>>,
    skew: Option<SkewFit>,
    /// Rows read.
    pub rows: usize,
}

/// The decodes of a step: count, and the mean, shortest and longest context.
#[derive(Debug, Clone, Copy, Default)]
pub struct Decodes {
    /// How many.
    pub n: f64,
    /// Mean context (tokens attended to).
    pub mean: f64,
    /// Shortest context.
    pub min: f64,
    /// Longest context.
    pub max: f64,
}

impl AttentionGrid {
    fn lookup(&self, chunk: f64, key: f64, n: f64, kv: f64) -> f64 {
        self.grid
            .at(chunk, |q| q.at(key, |d| d.at(n, |line| line.at(kv))))
    }

    /// One attention call, ms: a prefill of `chunk` tokens in all whose queries see `key` keys
    /// on average (0, 0 without prefills), beside `dec`.
    pub fn ms(&self, chunk: f64, key: f64, dec: Decodes) -> f64 {
        if chunk <= 0.0 && dec.n <= 0.0 {
            return 0.0;
        }
        let base = self.lookup(chunk, key, dec.n, dec.mean);
        match &self.skew {
            Some(fit) if dec.n >= 2.0 && dec.max > dec.mean => {
                let rate = (dec.mean - dec.min) / (dec.max - dec.min);
                let prefix = (key - chunk / 2.0).max(0.0);
                let alpha = fit.alpha(chunk, dec.n, rate, dec.max, prefix);
                let top = self.lookup(chunk, key, dec.n, dec.max);
                base + alpha * (top - base).max(0.0)
            }
            _ => base,
        }
    }

    /// Whether a skew fit was read.
    pub fn has_skew_fit(&self) -> bool {
        self.skew.is_some()
    }

    /// Prices decodes at their mean context only (`predictor.skew_correction = false`).
    pub fn drop_skew_fit(&mut self) {
        self.skew = None;
    }
}

/// The skew fit: `alpha` by (chunk, decodes, skew rate, longest context, prefix) bucket.
#[derive(Debug, Clone)]
struct SkewFit {
    /// Per axis, the buckets' upper bounds, ascending (∞ for an overflow bucket).
    bounds: [Vec<f64>; 5],
    cells: HashMap<[usize; 5], f64>,
    pooled: f64,
}

/// A bucket label's upper bound: `n<=128` → 128, `sr<=15%` → 0.15, `kvB<=16k` → 16384,
/// `kp=0` → 0, `sr>70%` → ∞, a bare number → itself.
fn label_bound(label: &str) -> Option<f64> {
    let l = label.trim();
    let start = l.find(|c: char| c.is_ascii_digit() || c == '.')?;
    if l[..start].contains('>') {
        return Some(f64::INFINITY);
    }
    let num = &l[start..];
    let (digits, scale) = if let Some(d) = num.strip_suffix('%') {
        (d, 0.01)
    } else if let Some(d) = num.strip_suffix(['k', 'K']) {
        (d, 1024.0)
    } else {
        (num, 1.0)
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

impl SkewFit {
    fn read(path: &Path) -> Result<Self, SimError> {
        let t = Table::read(path)?;
        let names = [
            "pc",
            "n_label",
            "skew_rate_label",
            "kv_big_label",
            "kp_label",
        ];
        let cols = names
            .iter()
            .map(|n| t.col(n))
            .collect::<Result<Vec<_>, _>>()?;
        let alpha = t.col("alpha")?;
        let mut rows = Vec::with_capacity(t.len());
        for r in 0..t.len() {
            let mut key = [0.0; 5];
            for (axis, &c) in cols.iter().enumerate() {
                let cell = t.text(r, c);
                key[axis] = label_bound(cell).ok_or_else(|| {
                    err(
                        path,
                        format!(
                            "line {}, column `{}`: `{cell}` is not a bucket label (expected e.g. `n<=128`, `sr<=15%`, `kvB<=16k`, `kp=0`)",
                            r + 2,
                            names[axis]
                        ),
                    )
                })?;
            }
            rows.push((key, t.need(r, alpha)?.clamp(0.0, 1.0)));
        }
        if rows.is_empty() {
            return Err(err(path, "no rows"));
        }
        let mut bounds: [Vec<f64>; 5] = Default::default();
        for (axis, b) in bounds.iter_mut().enumerate() {
            *b = rows.iter().map(|(k, _)| k[axis]).collect();
            b.sort_by(f64::total_cmp);
            b.dedup();
        }
        let index = |axis: usize, v: f64| bounds[axis].partition_point(|&b| b < v);
        let mut cells = HashMap::new();
        for (k, a) in &rows {
            let idx: [usize; 5] = std::array::from_fn(|axis| index(axis, k[axis]));
            cells.insert(idx, *a);
        }
        let mut all: Vec<f64> = rows.iter().map(|r| r.1).collect();
        all.sort_by(f64::total_cmp);
        let pooled = all[all.len() / 2];
        Ok(SkewFit {
            bounds,
            cells,
            pooled,
        })
    }

    fn alpha(&self, chunk: f64, n: f64, rate: f64, kv_max: f64, prefix: f64) -> f64 {
        let v = [chunk, n, rate, kv_max, prefix];
        let idx: [usize; 5] = std::array::from_fn(|axis| {
            let b = &self.bounds[axis];
            b.partition_point(|&x| x < v[axis]).min(b.len() - 1)
        });
        self.cells.get(&idx).copied().unwrap_or(self.pooled)
    }
}

/// A bundle's tables for one TP degree.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The `tp<N>/` folder read.
    pub dir: PathBuf,
    /// Token-count operators.
    pub dense: DenseOps,
    /// Per-request operators.
    pub per_sequence: PerSequence,
    /// Attention.
    pub attention: AttentionGrid,
    /// What `meta.yaml` says was measured (GPU, model, vLLM version), for provenance.
    pub measured: String,
}

fn curves(t: &Table, key: &str, by: &str) -> Result<Vec<(String, Curve)>, SimError> {
    let (k, x, y) = (t.col(key)?, t.col(by)?, t.col("time_us")?);
    let mut pts: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in 0..t.len() {
        pts.entry(t.text(r, k).to_owned())
            .or_default()
            .push((t.need(r, x)?, t.need(r, y)? / 1e3));
    }
    Ok(pts
        .into_iter()
        .filter_map(|(name, p)| Some((name, Curve::new(p)?)))
        .collect())
}

fn read_attention(path: &Path) -> Result<AttentionGrid, SimError> {
    let t = Table::read(path)?;
    let chunk = t.col("prefill_chunk")?;
    // The legacy column is the chunk's cached prefix; the newer one is already the
    // query-weighted key length.
    let (prefix, weighted) = match (t.col("kv_prefill"), t.col("prefill_key")) {
        (Ok(c), _) => (c, false),
        (Err(_), Ok(c)) => (c, true),
        (Err(e), Err(_)) => {
            return Err(err(
                path,
                format!("{e}; expected `kv_prefill` (or the newer `prefill_key`)"),
            ));
        }
    };
    let (nd, kd, time) = (t.col("n_decode")?, t.col("kv_decode")?, t.col("time_us")?);
    let layer = t.col("layer").ok();
    let q_len = t.col("decode_q_len").ok();
    type Grid = BTreeMap<u64, BTreeMap<u64, BTreeMap<u64, Vec<(f64, f64)>>>>;
    let mut grid: Grid = BTreeMap::new();
    let mut rows = 0;
    for r in 0..t.len() {
        if layer.is_some_and(|c| t.text(r, c) != "attention") {
            continue;
        }
        if let Some(c) = q_len
            && t.num(r, c)?.is_some_and(|q| q != 1.0)
        {
            continue;
        }
        let c = t.need(r, chunk)?;
        let p = t.need(r, prefix)?;
        let key = if weighted || c == 0.0 { p } else { p + c / 2.0 };
        let ms = t.need(r, time)? / 1e3;
        if !(ms.is_finite() && ms >= 0.0) {
            return Err(err(path, format!("line {}: time_us `{ms}`", r + 2)));
        }
        grid.entry(c.to_bits())
            .or_default()
            .entry(key.to_bits())
            .or_default()
            .entry(t.need(r, nd)?.to_bits())
            .or_default()
            .push((t.need(r, kd)?, ms));
        rows += 1;
    }
    if rows == 0 {
        return Err(err(path, "no attention rows"));
    }
    // Keys are non-negative floats, whose bit patterns sort as the values do.
    let grid = Level::from_map(
        grid.into_iter()
            .map(|(c, qs)| {
                let qs = Level::from_map(
                    qs.into_iter()
                        .map(|(q, ns)| {
                            let ns = Level::from_map(
                                ns.into_iter()
                                    .map(|(n, pts)| (n, Line::new(pts).expect("finite points")))
                                    .collect(),
                            );
                            (q, ns)
                        })
                        .collect(),
                );
                (c, qs)
            })
            .collect(),
    );
    Ok(AttentionGrid {
        grid,
        skew: None,
        rows,
    })
}

impl Bundle {
    /// Reads the tables of TP degree `tp` from a bundle folder (or one of its `tp<N>/`
    /// folders), checking `meta.yaml`'s model shape against `model` where it records one.
    ///
    /// # Errors
    /// No folder for `tp`, a missing file or column, a malformed cell, or a shape mismatch.
    pub fn read(dir: &Path, model: &ModelConfig, tp: u32) -> Result<Self, SimError> {
        let (root, tp_dir) = if dir.join("dense.csv").exists() {
            let named = dir
                .file_name()
                .and_then(|n| n.to_str()?.strip_prefix("tp")?.parse::<u32>().ok());
            if let Some(n) = named
                && n != tp
            {
                return Err(err(
                    dir,
                    format!(
                        "this folder holds TP {n} but the experiment runs TP {tp} (cluster.tensor_parallel)"
                    ),
                ));
            }
            (dir.parent().unwrap_or(dir).to_owned(), dir.to_owned())
        } else {
            let d = dir.join(format!("tp{tp}"));
            if !d.join("dense.csv").exists() {
                let have = tp_folders(dir);
                return Err(err(
                    dir,
                    format!(
                        "no tp{tp}/dense.csv for cluster.tensor_parallel = {tp}; the bundle has TP {}",
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                ));
            }
            (dir.to_owned(), d)
        };
        let meta_path = root.join("meta.yaml");
        let measured = match std::fs::read_to_string(&meta_path) {
            Ok(text) => {
                let meta = yaml_scalars(&text);
                check_shape(&meta_path, &meta, model)?;
                let get = |k: &str| meta.get(k).map_or("?", String::as_str);
                format!(
                    "{} on {} (vLLM {}, {})",
                    get("model"),
                    get("gpu"),
                    get("vllm_version"),
                    get("variant")
                )
            }
            Err(_) => "no meta.yaml".into(),
        };
        let dense_path = tp_dir.join("dense.csv");
        let mut dense = DenseOps {
            per_layer: Vec::new(),
            embedding: None,
            final_norm: None,
            max_tokens: 0.0,
        };
        for (name, curve) in curves(&Table::read(&dense_path)?, "layer", "tokens")? {
            dense.max_tokens = dense.max_tokens.max(curve.x_max());
            match name.as_str() {
                "embedding" => dense.embedding = Some(curve),
                "final_layernorm" => dense.final_norm = Some(curve),
                "layernorm" => dense.per_layer.push((name, 2.0, curve)),
                _ => dense.per_layer.push((name, 1.0, curve)),
            }
        }
        if dense.per_layer.is_empty() {
            return Err(err(&dense_path, "no per-layer operators"));
        }
        let seq_path = tp_dir.join("per_sequence.csv");
        let per_sequence = PerSequence(curves(&Table::read(&seq_path)?, "layer", "sequences")?);
        let mut attention = read_attention(&tp_dir.join("attention.csv"))?;
        let skew_path = tp_dir.join("skew_fit.csv");
        if skew_path.exists() {
            attention.skew = Some(SkewFit::read(&skew_path)?);
        }
        Ok(Bundle {
            dir: tp_dir,
            dense,
            per_sequence,
            attention,
            measured,
        })
    }
}

/// Operators priced by the step's scheduled requests (`per_sequence.csv`): ms by requests.
#[derive(Debug, Clone)]
pub struct PerSequence(pub Vec<(String, Curve)>);

impl PerSequence {
    /// All of them for `n` scheduled requests, ms.
    pub fn ms(&self, n: f64) -> f64 {
        if n <= 0.0 {
            return 0.0;
        }
        self.0.iter().map(|(_, c)| c.at(n)).sum()
    }
}

/// Checks the shape `meta.yaml` records (its `hf_overrides`, the fields the profiler set)
/// against the experiment's model.
fn check_shape(
    path: &Path,
    meta: &BTreeMap<String, String>,
    model: &ModelConfig,
) -> Result<(), SimError> {
    let fields = [
        ("intermediate_size", model.intermediate_size),
        ("num_attention_heads", model.num_heads),
        ("num_key_value_heads", model.num_kv_heads),
        ("vocab_size", model.vocab_size),
        ("hidden_size", model.hidden_size),
    ];
    for (field, ours) in fields {
        let Some(v) = meta.get(&format!("hf_overrides.{field}")) else {
            continue;
        };
        if v.parse::<u32>().ok() != Some(ours) {
            return Err(err(
                path,
                format!(
                    "hf_overrides.{field} is {v} but the experiment's model {} has {ours}: this bundle measured another model",
                    model.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_as_upper_bounds() {
        assert_eq!(label_bound("n<=128"), Some(128.0));
        assert_eq!(label_bound("sr<=15%"), Some(0.15));
        assert_eq!(label_bound("sr>70%"), Some(f64::INFINITY));
        assert_eq!(label_bound("kvB<=16k"), Some(16384.0));
        assert_eq!(label_bound("kp=0"), Some(0.0));
        assert_eq!(label_bound("512"), Some(512.0));
        assert_eq!(label_bound("sr_low"), None);
    }

    #[test]
    fn nested_interpolation_is_exact_on_the_grid_and_linear_between() {
        let dir = std::env::temp_dir().join(format!("vajra-bundle-grid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // t = 1 + chunk/100 + prefix/1000 + decodes·(1 + kv/100), in µs: linear in every
        // axis, so interpolation anywhere inside must be exact.
        let mut csv = String::from("prefill_chunk,kv_prefill,n_decode,kv_decode,time_us\n");
        for c in [0u32, 16, 64] {
            for k in [0u32, 32, 128] {
                if c == 0 && k > 0 {
                    continue;
                }
                for n in [0u32, 1, 4] {
                    for kv in [0u32, 16, 256] {
                        if (n == 0) != (kv == 0) || (c == 0 && n == 0) {
                            continue;
                        }
                        let key = if c == 0 {
                            0.0
                        } else {
                            f64::from(k) + f64::from(c) / 2.0
                        };
                        let t = 1.0
                            + f64::from(c) / 100.0
                            + key / 1000.0
                            + f64::from(n) * (1.0 + f64::from(kv) / 100.0);
                        csv += &format!("{c},{k},{n},{kv},{t}\n");
                    }
                }
            }
        }
        std::fs::write(dir.join("attention.csv"), csv).unwrap();
        let g = read_attention(&dir.join("attention.csv")).unwrap();
        let truth = |c: f64, key: f64, n: f64, kv: f64| {
            (1.0 + c / 100.0 + key / 1000.0 + n * (1.0 + kv / 100.0)) / 1e3
        };
        let dec = |n: f64, kv: f64| Decodes {
            n,
            mean: kv,
            min: kv,
            max: kv,
        };
        for (c, key, n, kv) in [
            (64.0, 96.0, 4.0, 256.0),
            (40.0, 60.0, 2.0, 100.0),
            (16.0, 8.0, 1.0, 16.0),
        ] {
            let got = g.ms(c, key, dec(n, kv));
            assert!(
                (got - truth(c, key, n, kv)).abs() < 1e-9,
                "{c} {key} {n} {kv}: {got}"
            );
        }
        assert_eq!(g.ms(0.0, 0.0, dec(0.0, 0.0)), 0.0, "an empty step");
        let _ = std::fs::remove_dir_all(dir);
    }
}
