//! `vajra-sim compare SIMULATED MEASURED`: the fidelity table of a simulated run against a
//! measured one (`vajra-engine bench` writes measured run folders with the same metrics code).
//!
//! Rows: TTFT, TBT, TPOT and E2E at p50/p90/p99, throughput, and the number of batches, mean
//! batch size and mean batch time (the measured side's come from the server's step counters when it exposes them).
//! Each row has the simulated value, the measured value and the relative error
//! (simulated − measured) / measured. The CDFs are overlaid by the report written beside it.

use crate::error::SimError;
use crate::predictor::Predictor;
use std::fmt::Write as _;
use std::path::Path;
use vajra_metrics::summary::{Latencies, SummaryFile};

/// One compared quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What it is, e.g. `ttft_s p50`.
    pub metric: String,
    /// Simulated value.
    pub simulated: Option<f64>,
    /// Measured value.
    pub measured: Option<f64>,
}

impl Row {
    /// (simulated − measured) / measured, when both exist and measured is not 0.
    pub fn rel_error(&self) -> Option<f64> {
        match (self.simulated, self.measured) {
            (Some(s), Some(m)) if m != 0.0 => Some((s - m) / m),
            _ => None,
        }
    }
}

fn load(dir: &Path) -> Result<SummaryFile, SimError> {
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p).map_err(|e| SimError::Experiment {
        path: p.clone(),
        message: format!("not a run folder: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| SimError::Experiment {
        path: p,
        message: e.to_string(),
    })
}

/// A metric as a table cell: `None` where the run has none (written as `null`, read as NaN).
fn known(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
}

/// The fidelity rows of `simulated` against `measured` (run folders).
///
/// # Errors
/// A folder without a readable `summary.json`.
pub fn compare(simulated: &Path, measured: &Path) -> Result<Vec<Row>, SimError> {
    let (sf, mf) = (load(simulated)?, load(measured)?);
    let (s, m) = (&sf.metrics, &mf.metrics);
    let row = |metric: String, sim: f64, meas: Option<f64>| Row {
        metric,
        simulated: known(sim),
        measured: meas,
    };
    let mut rows = Vec::new();
    let latency = |l: &Latencies| {
        [
            ("ttft", l.ttft),
            ("tbt", l.tbt),
            ("tpot", l.tpot),
            ("e2e", l.e2e),
        ]
    };
    for ((metric, sd), (_, md)) in latency(&s.latency_s).into_iter().zip(latency(&m.latency_s)) {
        for (q, sv, mv) in [
            ("p50", sd.p50, md.p50),
            ("p90", sd.p90, md.p90),
            ("p99", sd.p99, md.p99),
        ] {
            rows.push(row(format!("{metric}_s {q}"), sv, known(mv)));
        }
    }
    rows.push(row(
        "requests_per_s".into(),
        s.throughput.requests_per_s,
        known(m.throughput.requests_per_s),
    ));
    rows.push(row(
        "output_tokens_per_s".into(),
        s.throughput.output_tokens_per_s,
        known(m.throughput.output_tokens_per_s),
    ));
    // Batches: the simulator counts them; a measured run has them from the server's counters
    // (bench), a served run from the engine's own records (`serve --run-dir`).
    let bench = mf.bench.as_ref();
    let served = |x: f64| (m.batches.count > 0).then_some(x).and_then(known);
    let measured_batches = bench
        .and_then(|b| b.server_steps)
        .or((m.batches.count > 0).then_some(m.batches.count))
        .map(|c| c as f64);
    rows.push(row(
        "batches".into(),
        s.batches.count as f64,
        measured_batches,
    ));
    rows.push(row(
        "mean batch size (requests)".into(),
        s.batches.size.mean,
        bench
            .and_then(|b| b.server_mean_batch_size)
            .or_else(|| served(m.batches.size.mean)),
    ));
    rows.push(row(
        "mean batch time (ms)".into(),
        s.batches.latency_s.mean * 1e3,
        bench
            .and_then(|b| b.server_mean_step_ms)
            .or_else(|| served(m.batches.latency_s.mean * 1e3)),
    ));
    rows.push(row(
        "mean batch tokens".into(),
        s.batches.tokens.mean,
        bench
            .and_then(|b| b.server_mean_batch_tokens)
            .or_else(|| served(m.batches.tokens.mean)),
    ));
    // The prefix hit rate, where either side had hits: a measured run knows it when the server
    // said how many prompt tokens its cache served (bench: every request's usage; a served
    // run: the engine's own records).
    if s.prefix_cache_hit_rate > 0.0 || m.prefix_cache_hit_rate > 0.0 {
        let known_measured = bench.is_none_or(|b| b.cached_tokens_unknown == 0);
        rows.push(row(
            "prefix hit rate (%)".into(),
            100.0 * s.prefix_cache_hit_rate,
            known_measured.then_some(100.0 * m.prefix_cache_hit_rate),
        ));
    }
    Ok(rows)
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.4}"))
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| metric | simulated | measured | error |\n|---|---:|---:|---:|\n");
    for r in rows {
        let e = r
            .rel_error()
            .map_or_else(|| "–".into(), |e| format!("{:+.1} %", 100.0 * e));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {e} |",
            r.metric,
            cell(r.simulated),
            cell(r.measured)
        );
    }
    s
}

/// Writes `fidelity.md` (the table, then each note as a quote) and `fidelity.csv` into `out`.
///
/// # Errors
/// A file that cannot be written.
pub fn write(rows: &[Row], notes: &[String], out: &Path) -> Result<(), SimError> {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |x| x.to_string());
    write_tables(
        out,
        &markdown(rows),
        notes,
        &["metric", "simulated", "measured", "rel_error"],
        rows.iter().map(|r| {
            vec![
                r.metric.clone(),
                opt(r.simulated),
                opt(r.measured),
                opt(r.rel_error()),
            ]
        }),
    )
}

/// Writes a comparison's `fidelity.md` (`table`, then each note as a quote) and
/// `fidelity.csv` (`header`, then `rows`) into `out`.
///
/// # Errors
/// A file that cannot be written.
pub(crate) fn write_tables(
    out: &Path,
    table: &str,
    notes: &[String],
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<(), SimError> {
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    let md = out.join("fidelity.md");
    let mut text = table.to_owned();
    for n in notes {
        let _ = write!(text, "\n> {n}\n");
    }
    std::fs::write(&md, text).map_err(crate::error::write_err(&md))?;
    let csv_path = out.join("fidelity.csv");
    let mut w = csv::Writer::from_path(&csv_path).map_err(crate::error::write_err(&csv_path))?;
    w.write_record(header)
        .map_err(crate::error::write_err(&csv_path))?;
    for r in rows {
        w.write_record(&r)
            .map_err(crate::error::write_err(&csv_path))?;
    }
    w.flush().map_err(crate::error::write_err(&csv_path))
}

/// One logged engine step, priced by the predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedStep {
    /// Step number in the log.
    pub step: u64,
    /// Start, seconds since the engine was built.
    pub start_s: f64,
    /// Measured wall time of the step (scheduling to outputs), ms.
    pub step_ms: f64,
    /// Measured forward pass, ms.
    pub forward_ms: f64,
    /// The predictor's time for the same batch, ms (all stages).
    pub predicted_ms: f64,
    /// Requests in the batch.
    pub num_requests: u32,
    /// Tokens in the batch.
    pub num_tokens: u32,
    /// Whether a prompt chunk (more than one new token) ran in it.
    pub has_prefill: bool,
}

fn steps_err(path: &Path, line: usize, message: impl Into<String>) -> SimError {
    SimError::Experiment {
        path: path.to_owned(),
        message: format!("line {line}: {}", message.into()),
    }
}

/// Reads a step log (`vajra-engine serve --steps-log`) and prices every logged batch with
/// `predictor`: the predictor's error on the very batches the engine ran, apart from the
/// scheduling dynamics a whole-run comparison mixes in.
///
/// # Errors
/// An unreadable file, a missing column or a malformed cell (named with its line).
pub fn price_steps(path: &Path, predictor: &Predictor) -> Result<Vec<PricedStep>, SimError> {
    let rows =
        vajra_metrics::steplog::read(path).map_err(|e| steps_err(path, e.line, e.message))?;
    let mut batch: Vec<(u32, u32, bool)> = Vec::new();
    Ok(rows
        .into_iter()
        .map(|r| {
            batch.clear();
            batch.extend(r.requests.iter().map(|q| (q.tokens, q.context, q.samples)));
            let cost = predictor.predict_step(&batch);
            PricedStep {
                step: r.step,
                start_s: r.start_s,
                step_ms: r.step_ms,
                forward_ms: r.forward_ms,
                predicted_ms: cost.stage_ns.iter().sum::<u64>() as f64 / 1e6,
                num_requests: batch.len() as u32,
                num_tokens: batch.iter().map(|q| q.0).sum(),
                has_prefill: batch.iter().any(|q| q.0 > 1),
            }
        })
        .collect())
}

/// Fidelity rows of the predictor on logged steps: mean step time over all steps, decode-only
/// steps and steps with a prompt chunk (predicted against measured wall time), the per-step
/// error's p10/p50/p90 (as a relative error in the `simulated` column), and the measured share
/// of the step outside the forward pass.
pub fn step_rows(steps: &[PricedStep]) -> Vec<Row> {
    let mean = |f: &dyn Fn(&PricedStep) -> f64, keep: &dyn Fn(&PricedStep) -> bool| {
        let v: Vec<f64> = steps.iter().filter(|s| keep(s)).map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut rows = vec![Row {
        metric: "logged steps".into(),
        simulated: None,
        measured: Some(steps.len() as f64),
    }];
    type Keep<'a> = &'a dyn Fn(&PricedStep) -> bool;
    let classes: [(&str, Keep); 3] = [
        ("all", &|_| true),
        ("decode-only", &|s| !s.has_prefill),
        ("with a prompt chunk", &|s| s.has_prefill),
    ];
    for (name, keep) in classes {
        let n = steps.iter().filter(|s| keep(s)).count();
        rows.push(Row {
            metric: format!("step time, {name} ({n} steps; ms)"),
            simulated: mean(&|s| s.predicted_ms, keep),
            measured: mean(&|s| s.step_ms, keep),
        });
    }
    let mut err: Vec<f64> = steps
        .iter()
        .filter(|s| s.step_ms > 0.0)
        .map(|s| s.predicted_ms / s.step_ms - 1.0)
        .collect();
    err.sort_by(f64::total_cmp);
    for (q, name) in [(0.1, "p10"), (0.5, "p50"), (0.9, "p90")] {
        rows.push(Row {
            metric: format!("per-step error {name} (fraction)"),
            simulated: vajra_metrics::stats::quantile_sorted(&err, q),
            measured: None,
        });
    }
    rows.push(Row {
        metric: "outside the forward pass (ms per step)".into(),
        simulated: None,
        measured: mean(&|s| s.step_ms - s.forward_ms, &|_| true),
    });
    rows
}

/// Beyond this relative error on the logged batches, the run compared a different machine
/// speed (or another backend) than the profile measured.
pub const STEP_ERROR_WARN: f64 = 0.05;

/// The total predicted time of the logged steps against their measured total, (predicted −
/// measured) / measured; `None` without steps.
pub fn step_error(steps: &[PricedStep]) -> Option<f64> {
    let measured: f64 = steps.iter().map(|s| s.step_ms).sum();
    let predicted: f64 = steps.iter().map(|s| s.predicted_ms).sum();
    (measured > 0.0).then(|| predicted / measured - 1.0)
}

/// A warning when the predictor misses the very batches that ran by more than
/// [`STEP_ERROR_WARN`]: the whole-run errors then measure that first (on a shared machine,
/// usually its speed changing between the profile and the run).
pub fn step_warning(steps: &[PricedStep]) -> Option<String> {
    let e = step_error(steps)?;
    (e.abs() > STEP_ERROR_WARN).then(|| {
        format!(
            "on the logged batches themselves the predictor is {:+.1} % off the measured step time (more than {:.0} %): the engine ran at another speed than the profile measured (a shared machine's load changing, another build or backend), so the whole-run errors above measure that first; re-profile next to the run",
            100.0 * e,
            100.0 * STEP_ERROR_WARN
        )
    })
}

/// Writes `steps.csv` (every logged step with its predicted time) into `out`.
///
/// # Errors
/// A file that cannot be written.
pub fn write_steps(steps: &[PricedStep], out: &Path) -> Result<(), SimError> {
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    let p = out.join("steps.csv");
    let mut w = csv::Writer::from_path(&p).map_err(crate::error::write_err(&p))?;
    w.write_record([
        "step",
        "start_s",
        "step_ms",
        "forward_ms",
        "predicted_ms",
        "num_requests",
        "num_tokens",
        "has_prefill",
    ])
    .map_err(crate::error::write_err(&p))?;
    for s in steps {
        w.write_record([
            s.step.to_string(),
            s.start_s.to_string(),
            s.step_ms.to_string(),
            s.forward_ms.to_string(),
            format!("{:.4}", s.predicted_ms),
            s.num_requests.to_string(),
            s.num_tokens.to_string(),
            s.has_prefill.to_string(),
        ])
        .map_err(crate::error::write_err(&p))?;
    }
    w.flush().map_err(crate::error::write_err(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_against_the_measured_value() {
        let r = Row {
            metric: "x".into(),
            simulated: Some(1.1),
            measured: Some(1.0),
        };
        assert!((r.rel_error().unwrap() - 0.1).abs() < 1e-12);
        let none = Row {
            metric: "x".into(),
            simulated: Some(1.0),
            measured: None,
        };
        assert_eq!(none.rel_error(), None);
        assert!(markdown(&[r, none]).contains("+10.0 %"));
    }

    fn roofline() -> Predictor {
        Predictor::new(
            &vajra_experiment::catalog::model("Llama-2-7b-hf").unwrap(),
            &vajra_experiment::catalog::device("h100").unwrap(),
            vajra_core::config::ParallelConfig::default(),
            &crate::predictor::PredictorConfig::default(),
            None,
            None,
            4096,
        )
        .unwrap()
    }

    fn log(name: &str, body: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vajra-steps-{name}-{}.csv", std::process::id()));
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn logged_steps_are_priced_as_the_batches_they_name() {
        let p = log(
            "ok",
            "step,start_s,step_ms,forward_ms,num_requests,num_tokens,num_sampled,requests\n\
             0,0.5,20,19,1,512,0,512@0\n\
             1,0.6,30,29,3,258,2,256@512* 1@40* 1@900\n",
        );
        let pr = roofline();
        let steps = price_steps(&p, &pr).unwrap();
        assert_eq!(steps.len(), 2);
        let want = |b: &[(u32, u32, bool)]| pr.predict_step(b).stage_ns[0] as f64 / 1e6;
        assert_eq!(steps[0].predicted_ms, want(&[(512, 0, false)]));
        assert_eq!(
            steps[1].predicted_ms,
            want(&[(256, 512, true), (1, 40, true), (1, 900, false)])
        );
        assert!(steps[1].predicted_ms > steps[0].predicted_ms * 0.3);
        assert_eq!((steps[1].num_requests, steps[1].num_tokens), (3, 258));
        assert!(steps[0].has_prefill && steps[1].has_prefill);
        let rows = step_rows(&steps);
        let all = rows
            .iter()
            .find(|r| r.metric.starts_with("step time, all"))
            .unwrap();
        assert_eq!(all.measured, Some(25.0));
        let outside = rows
            .iter()
            .find(|r| r.metric.starts_with("outside"))
            .unwrap();
        assert_eq!(outside.measured, Some(1.0));
        // The warning fires exactly when the logged batches are mispriced beyond 5 %.
        let at = |predicted: f64| {
            let mut s = steps[0].clone();
            (s.step_ms, s.predicted_ms) = (100.0, predicted);
            step_warning(&[s])
        };
        assert!(at(104.0).is_none() && at(96.0).is_none());
        assert!(at(106.0).unwrap().contains("+6.0 %"));
        assert!(at(80.0).unwrap().contains("-20.0 %"));
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_malformed_step_log_names_the_line_and_what_is_wrong() {
        let pr = roofline();
        let bad_item = log(
            "item",
            "step,start_s,step_ms,forward_ms,requests\n0,0,1,1,1@0*\n1,0,1,1,12-3\n",
        );
        let e = price_steps(&bad_item, &pr).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`12-3`"), "{e}");
        let no_col = log("col", "step,start_s,step_ms,requests\n0,0,1,1@0\n");
        let e = price_steps(&no_col, &pr).unwrap_err().to_string();
        assert!(e.contains("forward_ms"), "{e}");
        let bad_num = log(
            "num",
            "step,start_s,step_ms,forward_ms,requests\n0,x,1,1,1@0\n",
        );
        let e = price_steps(&bad_num, &pr).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("start_s"), "{e}");
        for p in [bad_item, no_col, bad_num] {
            let _ = std::fs::remove_file(p);
        }
    }
}
