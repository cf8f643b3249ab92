//! Real vLLM runs as the measured side: `vajra-sim compare SIMULATED VLLM_RUN` and
//! `vajra-sim import vllm VLLM_RUN`.
//!
//! A vLLM run folder is what LLMServingSim's `python -m bench run` writes (alone, or as the
//! `vllm/` folder of an example): `requests.jsonl`, one request a line with the engine's
//! `queued_ts`, `scheduled_ts`, `first_token_ts` and `last_token_ts` (seconds, one monotonic
//! clock) and `input_toks` / `output_toks`; `meta.json` with the engine arguments and, when
//! recorded, vLLM's resolved configuration.
//!
//! Metrics, as LLMServingSim's validation computes them from that file (and as
//! `validation/summary.txt` prints them, in milliseconds): TTFT = `first_token_ts −
//! queued_ts`; TPOT = `(last_token_ts − first_token_ts) / (output_toks − 1)` over requests with
//! more than one output token; latency = `last_token_ts − queued_ts`; mean, median and the
//! 90th, 95th and 99th percentiles with linear interpolation between order statistics. The
//! simulated side is read from its `requests.csv` with the same definitions (its arrivals are
//! the trace's `queued_ts`).

use crate::error::SimError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

fn err(path: &Path, message: impl Into<String>) -> SimError {
    SimError::Experiment {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The folder holding a run's `requests.jsonl` (the folder itself or its `vllm/`), if `dir`
/// is a vLLM run.
pub fn run_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_owned(), dir.join("vllm")]
        .into_iter()
        .find(|d| d.join("requests.jsonl").exists() && !d.join("summary.json").exists())
}

/// Per-request latencies, ms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latencies {
    /// Time to first token.
    pub ttft: Vec<f64>,
    /// Time per output token after the first.
    pub tpot: Vec<f64>,
    /// End-to-end latency.
    pub latency: Vec<f64>,
}

#[derive(Deserialize)]
struct VllmRequest {
    queued_ts: f64,
    first_token_ts: f64,
    last_token_ts: f64,
    output_toks: u64,
}

/// Reads a vLLM run's `requests.jsonl`.
///
/// # Errors
/// A missing file, or a line without the four fields.
pub fn read_vllm(dir: &Path) -> Result<Latencies, SimError> {
    let path = dir.join("requests.jsonl");
    let f = std::fs::File::open(&path).map_err(|e| err(&path, e.to_string()))?;
    let mut l = Latencies::default();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| err(&path, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: VllmRequest = serde_json::from_str(&line).map_err(|e| {
            err(
                &path,
                format!(
                    "line {}: {e} (expected queued_ts, first_token_ts, last_token_ts, output_toks)",
                    i + 1
                ),
            )
        })?;
        l.ttft.push((r.first_token_ts - r.queued_ts) * 1e3);
        l.latency.push((r.last_token_ts - r.queued_ts) * 1e3);
        if r.output_toks > 1 {
            l.tpot
                .push((r.last_token_ts - r.first_token_ts) * 1e3 / (r.output_toks - 1) as f64);
        }
    }
    if l.ttft.is_empty() {
        return Err(err(&path, "no requests"));
    }
    Ok(l)
}

/// Reads a simulated run's `requests.csv` (completed requests).
///
/// # Errors
/// A missing file or column.
pub fn read_simulated(dir: &Path) -> Result<Latencies, SimError> {
    let path = dir.join("requests.csv");
    let (mut rdr, c) = open_requests_csv(
        &path,
        &[
            "arrival_s",
            "first_token_s",
            "completed_s",
            "output_tokens",
            "finish_reason",
        ],
    )
    .map_err(|e| {
        err(
            &path,
            format!("{e} (the simulated run needs output.csv = true)"),
        )
    })?;
    let (arr, first, done, out, why) = (c[0], c[1], c[2], c[3], c[4]);
    let mut l = Latencies::default();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| err(&path, e.to_string()))?;
        if matches!(rec.get(why), Some("rejected" | "aborted" | "")) {
            continue;
        }
        let num = |c: usize| -> Result<f64, SimError> {
            rec.get(c)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| err(&path, format!("line {}: column {c} is not a number", i + 2)))
        };
        let (a, f, d, n) = (num(arr)?, num(first)?, num(done)?, num(out)?);
        l.ttft.push((f - a) * 1e3);
        l.latency.push((d - a) * 1e3);
        if n > 1.0 {
            l.tpot.push((d - f) * 1e3 / (n - 1.0));
        }
    }
    if l.ttft.is_empty() {
        return Err(err(&path, "no completed requests"));
    }
    Ok(l)
}

/// Opens a run folder's `requests.csv` and finds `columns` in it, by name.
///
/// # Errors
/// An unreadable file, or a column it lacks (named).
pub fn open_requests_csv(
    path: &Path,
    columns: &[&str],
) -> Result<(csv::Reader<std::fs::File>, Vec<usize>), SimError> {
    let mut rdr = csv::Reader::from_path(path).map_err(|e| err(path, e.to_string()))?;
    let h = rdr.headers().map_err(|e| err(path, e.to_string()))?;
    let cols = columns
        .iter()
        .map(|name| {
            h.iter()
                .position(|c| c == *name)
                .ok_or_else(|| err(path, format!("missing column `{name}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rdr, cols))
}

/// The statistics the comparison prints.
pub const STATS: [&str; 5] = ["Mean", "Median", "P90", "P95", "P99"];

/// Mean, median, p90, p95, p99 of `v` (percentiles interpolate linearly between order
/// statistics, numpy's default).
pub fn stats(v: &[f64]) -> [f64; 5] {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let k = (s.len() - 1) as f64 * p / 100.0;
        let (lo, hi) = (k.floor() as usize, k.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (k - lo as f64)
    };
    [
        s.iter().sum::<f64>() / s.len() as f64,
        pct(50.0),
        pct(90.0),
        pct(95.0),
        pct(99.0),
    ]
}

/// `validation/summary.txt` of an LLMServingSim example: `(metric, statistic)` → (vLLM, its
/// simulator), ms.
pub type Reference = BTreeMap<(String, String), (f64, f64)>;

/// Reads `summary.txt` lines `TTFT Mean  65456.6  65820.2  +0.6%`.
///
/// # Errors
/// An unreadable file.
pub fn read_reference(path: &Path) -> Result<Reference, SimError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
    let mut out = Reference::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() >= 4
            && ["TTFT", "TPOT", "Latency"].contains(&w[0])
            && STATS.contains(&w[1])
            && let (Ok(v), Ok(s)) = (w[2].parse::<f64>(), w[3].parse::<f64>())
        {
            out.insert((w[0].to_owned(), w[1].to_owned()), (v, s));
        }
    }
    Ok(out)
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmRow {
    /// `TTFT`, `TPOT` or `Latency`.
    pub metric: &'static str,
    /// `Mean`, `Median`, `P90`, `P95`, `P99`.
    pub stat: &'static str,
    /// vLLM's, ms.
    pub vllm: f64,
    /// Ours, ms.
    pub simulated: f64,
    /// LLMServingSim's prediction of the same run, ms, where its summary is beside the run.
    pub llmservingsim: Option<f64>,
}

impl VllmRow {
    /// Our error against vLLM.
    pub fn error(&self) -> f64 {
        (self.simulated - self.vllm) / self.vllm
    }
}

/// The comparison of `simulated` (a run folder) against the vLLM run at `vllm` (its folder or
/// an example folder holding `vllm/`), with notes (how vLLM's column matched the reference's).
///
/// # Errors
/// A folder that is not a vLLM run, or unreadable request tables.
pub fn compare(simulated: &Path, vllm: &Path) -> Result<(Vec<VllmRow>, Vec<String>), SimError> {
    let run = run_dir(vllm).ok_or_else(|| {
        err(
            vllm,
            "not a vLLM run folder (expected requests.jsonl here or in vllm/)",
        )
    })?;
    let measured = read_vllm(&run)?;
    let ours = read_simulated(simulated)?;
    let summary = [
        vllm.join("validation/summary.txt"),
        run.join("../validation/summary.txt"),
    ]
    .into_iter()
    .find(|p| p.exists());
    let reference = summary.as_deref().map(read_reference).transpose()?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut worst: f64 = 0.0;
    for (metric, m, s) in [
        ("TTFT", &measured.ttft, &ours.ttft),
        ("TPOT", &measured.tpot, &ours.tpot),
        ("Latency", &measured.latency, &ours.latency),
    ] {
        let (mv, sv) = (stats(m), stats(s));
        for (i, stat) in STATS.iter().enumerate() {
            let r = reference
                .as_ref()
                .and_then(|r| r.get(&(metric.to_owned(), (*stat).to_owned())));
            if let Some((v, _)) = r {
                worst = worst.max((v - mv[i]).abs());
            }
            rows.push(VllmRow {
                metric,
                stat,
                vllm: mv[i],
                simulated: sv[i],
                llmservingsim: r.map(|r| r.1),
            });
        }
    }
    notes.push(format!(
        "{} measured requests ({}), {} simulated ({}).",
        measured.ttft.len(),
        run.join("requests.jsonl").display(),
        ours.ttft.len(),
        simulated.join("requests.csv").display()
    ));
    if let Some(p) = &summary {
        notes.push(format!(
            "vLLM's column recomputed from requests.jsonl matches {} to {worst:.2} ms (it prints one decimal); LLMServingSim's prediction is its `Sim` column.",
            p.display()
        ));
    }
    Ok((rows, notes))
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[VllmRow]) -> String {
    let with_ref = rows.iter().any(|r| r.llmservingsim.is_some());
    let mut s = String::from("| metric | vLLM (ms) | Vajra (ms) | error |");
    if with_ref {
        s.push_str(" LLMServingSim (ms) | its error |");
    }
    s.push_str("\n|---|---:|---:|---:|");
    if with_ref {
        s.push_str("---:|---:|");
    }
    s.push('\n');
    for r in rows {
        let _ = write!(
            s,
            "| {} {} | {:.1} | {:.1} | {:+.1} % |",
            r.metric,
            r.stat,
            r.vllm,
            r.simulated,
            100.0 * r.error()
        );
        if with_ref {
            match r.llmservingsim {
                Some(l) => {
                    let _ = write!(s, " {l:.1} | {:+.1} % |", 100.0 * (l - r.vllm) / r.vllm);
                }
                None => s.push_str(" – | – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Writes `fidelity.md` (table and notes) and `fidelity.csv` into `out`.
///
/// # Errors
/// A file that cannot be written.
pub fn write(rows: &[VllmRow], notes: &[String], out: &Path) -> Result<(), SimError> {
    crate::fidelity::write_tables(
        out,
        &markdown(rows),
        notes,
        &[
            "metric",
            "stat",
            "vllm_ms",
            "simulated_ms",
            "rel_error",
            "llmservingsim_ms",
        ],
        rows.iter().map(|r| {
            vec![
                r.metric.to_owned(),
                r.stat.to_owned(),
                r.vllm.to_string(),
                r.simulated.to_string(),
                r.error().to_string(),
                r.llmservingsim.map_or_else(String::new, |v| v.to_string()),
            ]
        }),
    )
}

/// What `vajra-sim import vllm` was told beyond the run folder.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The profile folder (default: LLMServingSim's `profiler/perf/<GPU>/<model>/<dtype>/`
    /// found above the run, else the roofline).
    pub profile: Option<PathBuf>,
    /// The workload with the prompts' token ids (default: `meta.json`'s `dataset_path`, found
    /// above the run).
    pub workload: Option<PathBuf>,
    /// The device (default: `meta.json`'s `hardware.device_name`, else a folder name of the
    /// run's path that names a built-in device).
    pub device: Option<String>,
    /// The model's Hugging Face `config.json`, for a model the catalog lacks.
    pub model_config: Option<PathBuf>,
}

/// vLLM v0.19's CUDA-graph capture sizes when the run does not record them: 1, 2, 4, then
/// steps of 8 below 256 and of 16 from 256, up to `min(2·max_num_seqs, 512)`.
pub fn default_capture_sizes(max_num_seqs: u32) -> Vec<u32> {
    let top = (2 * max_num_seqs).min(512);
    let mut v: Vec<u32> = [1, 2, 4].into_iter().filter(|&x| x <= top).collect();
    v.extend((8..256).step_by(8).filter(|&x| x <= top));
    v.extend((256..=top).step_by(16));
    v
}

/// `to` relative to the folder `from` (both made absolute), with `/` separators.
fn relative(from: &Path, to: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let (from, to) = (abs(from), abs(to));
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = std::iter::repeat_n("..".to_owned(), a.len() - common).collect();
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// `rel` under `dir` or one of its ancestors, the nearest first.
fn find_up(dir: &Path, rel: &Path) -> Option<PathBuf> {
    let start = std::fs::canonicalize(dir).ok()?;
    start.ancestors().map(|a| a.join(rel)).find(|p| p.exists())
}

/// Writes an experiment replaying the vLLM run at `dir` to `out`; returns what it read and
/// chose, one line each.
///
/// # Errors
/// Not a vLLM run, an unreadable `meta.json`, a model or device the catalog lacks (with what to
/// pass instead), or an output that cannot be written.
pub fn import(dir: &Path, out: &Path, opts: &ImportOptions) -> Result<Vec<String>, SimError> {
    let run = run_dir(dir).ok_or_else(|| {
        err(
            dir,
            "not a vLLM run folder (expected requests.jsonl here or in vllm/)",
        )
    })?;
    let meta_path = run.join("meta.json");
    let meta: serde_json::Value = std::fs::read_to_string(&meta_path)
        .map_err(|e| err(&meta_path, e.to_string()))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| err(&meta_path, e.to_string())))?;
    let mut notes = Vec::new();
    let kw = &meta["engine_kwargs"];
    let resolved = &meta["resolved_config"];
    let sched = &resolved["scheduler_config"];
    let kv = &meta["kv_cache"];
    let u = |v: &serde_json::Value| v.as_u64().map(|x| x as u32);
    let b = serde_json::Value::as_bool;
    // Each setting: the resolved config, else the engine argument, else vLLM v0.19's default.
    let mut setting = |name: &str, found: Option<String>, default: &str| -> String {
        match found {
            Some(v) => {
                notes.push(format!("{name} = {v} (recorded)"));
                v
            }
            None => {
                notes.push(format!(
                    "{name} = {default} (not recorded: vLLM v0.19's default)"
                ));
                default.to_owned()
            }
        }
    };
    let model_name = kw["model"]
        .as_str()
        .or(meta["model"].as_str())
        .ok_or_else(|| err(&meta_path, "no engine_kwargs.model"))?
        .to_owned();
    let model = match &opts.model_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| err(p, e.to_string()))?;
            vajra_core::config::ModelConfig::from_hf_config_json(&text, &model_name)
                .map_err(|e| err(p, e.to_string()))?
        }
        None => vajra_experiment::catalog::model(&model_name).ok_or_else(|| {
            err(
                &meta_path,
                format!(
                    "model `{model_name}` is not built in ({}): pass --model-config config.json",
                    vajra_experiment::catalog::model_names()
                ),
            )
        })?,
    };
    let tp = u(&kw["tensor_parallel_size"]).unwrap_or(1);
    let max_num_seqs: u32 = setting(
        "scheduler.max_num_seqs",
        u(&sched["max_num_seqs"])
            .or(u(&kw["max_num_seqs"]))
            .map(|v| v.to_string()),
        "256",
    )
    .parse()
    .unwrap_or(256);
    let budget = setting(
        "max_num_batched_tokens",
        u(&sched["max_num_batched_tokens"])
            .or(u(&kw["max_num_batched_tokens"]))
            .map(|v| v.to_string()),
        "2048",
    );
    let max_len = setting(
        "model.max_model_len",
        u(&kw["max_model_len"]).map(|v| v.to_string()),
        &model.max_model_len.to_string(),
    );
    let chunked = setting(
        "enable_chunked_prefill",
        b(&sched["enable_chunked_prefill"]).map(|v| v.to_string()),
        "true",
    );
    let full_isl = setting(
        "reserve_full_isl",
        b(&sched["scheduler_reserve_full_isl"]).map(|v| v.to_string()),
        "true",
    );
    let async_sched = setting(
        "scheduler.async_scheduling",
        b(&sched["async_scheduling"]).map(|v| v.to_string()),
        "true",
    );
    let long_prefill = u(&sched["long_prefill_token_threshold"]).unwrap_or(0);
    let block = setting(
        "cache.block_size",
        u(&kv["block_size"]).map(|v| v.to_string()),
        "16",
    );
    let prefix = setting(
        "cache.enable_prefix_caching",
        b(&kv["enable_prefix_caching"]).map(|v| v.to_string()),
        "true",
    );
    let util = kv["gpu_memory_utilization"].as_f64();
    let pool = match u(&kv["num_gpu_blocks"]) {
        Some(n) => {
            notes.push(format!(
                "cache.num_blocks = {} (vLLM's num_gpu_blocks {n}, less the null block it reserves)",
                n - 1
            ));
            format!(
                "num_blocks = {}              # vLLM's num_gpu_blocks ({n}) less its reserved null block",
                n - 1
            )
        }
        None => {
            let util = util.unwrap_or(0.9);
            notes.push(format!(
                "cache.num_blocks planned from gpu_memory_utilization = {util} (the run did not record its pool)"
            ));
            format!("gpu_memory_utilization = {util}    # the run did not record its pool: planned")
        }
    };
    let graphs: Vec<u32> =
        match resolved["compilation_config"]["cudagraph_capture_sizes"].as_array() {
            Some(a) => {
                let v: Vec<u32> = a.iter().filter_map(u).collect();
                notes.push(format!("{} CUDA-graph capture sizes (recorded)", v.len()));
                v
            }
            None => {
                let v = default_capture_sizes(max_num_seqs);
                notes.push(format!(
                "{} CUDA-graph capture sizes up to {} (not recorded: vLLM v0.19's default rule)",
                v.len(),
                v.last().copied().unwrap_or(0)
            ));
                v
            }
        };
    let eager = resolved["model_config"]["enforce_eager"].as_bool() == Some(true)
        || kw["enforce_eager"].as_bool() == Some(true);
    let graphs = if eager { Vec::new() } else { graphs };
    // The device: recorded, named, or a folder of the path (LLMServingSim's examples sit in
    // bench/examples/<GPU>/<model>/).
    let abs_run = std::fs::canonicalize(&run).unwrap_or_else(|_| run.clone());
    let hw_folder = abs_run
        .ancestors()
        .filter_map(|a| a.file_name()?.to_str())
        .find(|n| vajra_experiment::catalog::device(n).is_some())
        .map(str::to_owned);
    let device_name = opts
        .device
        .clone()
        .or_else(|| meta["hardware"]["device_name"].as_str().map(str::to_owned))
        .or_else(|| hw_folder.clone())
        .ok_or_else(|| {
            err(
                &meta_path,
                "no hardware.device_name and no folder of the path names a built-in device: pass --device",
            )
        })?;
    let device = vajra_experiment::catalog::device(&device_name).ok_or_else(|| {
        err(
            &meta_path,
            format!(
                "device `{device_name}` is not built in ({}): pass --device, or add a [[devices]] entry to the written experiment",
                vajra_experiment::catalog::device_names()
            ),
        )
    })?;
    notes.push(format!("device {} (from `{device_name}`)", device.name));
    let out_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_dir).map_err(crate::error::write_err(out_dir))?;
    let dtype = match kw["dtype"].as_str().unwrap_or("bfloat16") {
        "bfloat16" | "auto" => "bf16",
        "float16" | "half" => "fp16",
        other => other,
    };
    let profile = match &opts.profile {
        Some(p) => Some(p.clone()),
        None => hw_folder.as_ref().and_then(|hw| {
            find_up(
                &run,
                &Path::new("profiler/perf")
                    .join(hw)
                    .join(&model_name)
                    .join(dtype),
            )
        }),
    };
    let profile_line = match &profile {
        Some(p) => {
            notes.push(format!("profile {}", p.display()));
            format!("profile = \"{}\"", relative(out_dir, p))
        }
        None => {
            notes.push(
                "no profile bundle found above the run (pass --profile): the roofline prices steps"
                    .into(),
            );
            "profile = \"roofline\"          # no measured profile found: pass --profile".into()
        }
    };
    let workload = match &opts.workload {
        Some(w) => Some(w.clone()),
        None => meta["dataset_path"]
            .as_str()
            .and_then(|d| find_up(&run, Path::new(d))),
    };
    let tokens = match &workload {
        Some(w) => {
            notes.push(format!("prompt token ids from {}", w.display()));
            format!(", prompt_tokens = \"{}\"", relative(out_dir, w))
        }
        None => {
            notes.push(
                "no workload with token ids found (pass --workload): prompts are lengths only, so prefix caching finds no real sharing"
                    .into(),
            );
            String::new()
        }
    };
    let name = out.file_stem().map_or_else(
        || "vllm_replay".into(),
        |s| s.to_string_lossy().into_owned(),
    );
    let graphs_line = if graphs.is_empty() {
        String::new()
    } else {
        format!(
            "cuda_graph_sizes = [{}]\n",
            graphs
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let text = format!(
        r#"# Replay of a real vLLM {version} run, written by `vajra-sim import vllm {src}`:
# {model_name} (TP {tp}) on {device}, {n} requests. Arrivals on the engine's clock (`queued_ts`),
# exact lengths{tok_note}, the engine settings the run recorded (vLLM's defaults where it did
# not), and the profile named below. Compare with the measured run:
#   vajra-sim run {this} -o runs/{name}
#   vajra-sim compare runs/{name} {src}
name = "{name}"
seed = 42

[model]
{model_line}
max_model_len = {max_len}

[cluster]
device = "{device}"
num_replicas = 1
tensor_parallel = {tp}

[predictor]
{profile_line}
{graphs_line}
[scheduler]
max_num_seqs = {max_num_seqs}
async_scheduling = {async_sched}
policy = {{ type = "vllm_v1", max_num_batched_tokens = {budget}, enable_chunked_prefill = {chunked}, long_prefill_token_threshold = {long_prefill}, reserve_full_isl = {full_isl} }}

[cache]
block_size = {block}
{pool}
enable_prefix_caching = {prefix}
watermark = 0.0                # vLLM v1 admits without a watermark

[workload]
arrival = {{ type = "trace", format = "vllm", path = "{trace}"{tokens} }}
"#,
        model_line = match &opts.model_config {
            Some(p) => format!("config = \"{}\"", relative(out_dir, p)),
            None => format!("name = \"{}\"", model.name),
        },
        version = meta["vllm_version"].as_str().unwrap_or("?"),
        src = dir.display(),
        device = device.name,
        n = read_vllm(&run)?.ttft.len(),
        tok_note = if tokens.is_empty() {
            ""
        } else {
            ", the prompts' real token ids (prefix caching hits what vLLM hit)"
        },
        this = out.display(),
        trace = relative(out_dir, &run.join("requests.jsonl")),
    );
    std::fs::write(out, text).map_err(crate::error::write_err(out))?;
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(gpu: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../../../shared/reference/llmservingsim/bench/examples/{gpu}/Llama-3.1-8B"
        ))
    }

    #[test]
    fn percentiles_interpolate_between_order_statistics() {
        let s = stats(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s[0], 2.5);
        assert_eq!(s[1], 2.5);
        assert!((s[2] - 3.7).abs() < 1e-12, "{}", s[2]);
    }

    #[test]
    fn vllms_column_is_reproduced_from_its_request_log() {
        for gpu in ["RTX4090", "RTXPRO6000"] {
            let dir = example(gpu);
            if !dir.exists() {
                eprintln!(
                    "SKIPPED: {} is not present (../shared/reference/llmservingsim/)",
                    dir.display()
                );
                return;
            }
            let l = read_vllm(&dir.join("vllm")).unwrap();
            let r = read_reference(&dir.join("validation/summary.txt")).unwrap();
            assert_eq!(r.len(), 15, "{gpu}");
            for (metric, v) in [
                ("TTFT", &l.ttft),
                ("TPOT", &l.tpot),
                ("Latency", &l.latency),
            ] {
                let s = stats(v);
                for (i, stat) in STATS.iter().enumerate() {
                    let (printed, _) = r[&(metric.to_owned(), (*stat).to_owned())];
                    // Printed with one decimal: within half of its last digit, plus rounding.
                    assert!(
                        (s[i] - printed).abs() <= 0.051,
                        "{gpu} {metric} {stat}: {} vs {printed}",
                        s[i]
                    );
                }
            }
        }
    }
}
