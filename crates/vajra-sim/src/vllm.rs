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
    let mut rdr = csv::Reader::from_path(&path).map_err(|e| {
        err(
            &path,
            format!("{e} (the simulated run needs output.csv = true)"),
        )
    })?;
    let h = rdr.headers().map_err(|e| err(&path, e.to_string()))?.clone();
    let col = |name: &str| {
        h.iter()
            .position(|c| c == name)
            .ok_or_else(|| err(&path, format!("missing column `{name}`")))
    };
    let (arr, first, done, out, why) = (
        col("arrival_s")?,
        col("first_token_s")?,
        col("completed_s")?,
        col("output_tokens")?,
        col("finish_reason")?,
    );
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
    let summary = [vllm.join("validation/summary.txt"), run.join("../validation/summary.txt")]
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
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    let md = out.join("fidelity.md");
    let mut text = markdown(rows);
    for n in notes {
        let _ = write!(text, "\n> {n}\n");
    }
    std::fs::write(&md, text).map_err(crate::error::write_err(&md))?;
    let p = out.join("fidelity.csv");
    let mut w = csv::Writer::from_path(&p).map_err(crate::error::write_err(&p))?;
    w.write_record([
        "metric",
        "stat",
        "vllm_ms",
        "simulated_ms",
        "rel_error",
        "llmservingsim_ms",
    ])
    .map_err(crate::error::write_err(&p))?;
    for r in rows {
        w.write_record([
            r.metric.to_owned(),
            r.stat.to_owned(),
            r.vllm.to_string(),
            r.simulated.to_string(),
            r.error().to_string(),
            r.llmservingsim.map_or_else(String::new, |v| v.to_string()),
        ])
        .map_err(crate::error::write_err(&p))?;
    }
    w.flush().map_err(crate::error::write_err(&p))
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
                panic!(
                    "{} is missing: the reference data under ../shared/reference/ is needed",
                    dir.display()
                );
            }
            let l = read_vllm(&dir.join("vllm")).unwrap();
            let r = read_reference(&dir.join("validation/summary.txt")).unwrap();
            assert_eq!(r.len(), 15, "{gpu}");
            for (metric, v) in [("TTFT", &l.ttft), ("TPOT", &l.tpot), ("Latency", &l.latency)] {
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
