//! `vajra-sim compare SIMULATED MEASURED`: the fidelity table of a simulated run against a
//! measured one (`vajra-engine bench` writes measured run folders with the same metrics code).
//!
//! Rows: TTFT, TBT, TPOT and E2E at p50/p90/p99, throughput, and the number of batches, mean
//! batch size and mean batch time (the measured side's come from the server's step counters when it exposes them).
//! Each row has the simulated value, the measured value and the relative error
//! (simulated − measured) / measured. The CDFs are overlaid by the report written beside it.

use crate::error::SimError;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

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

fn load(dir: &Path) -> Result<Value, SimError> {
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

/// The fidelity rows of `simulated` against `measured` (run folders).
///
/// # Errors
/// A folder without a readable `summary.json`.
pub fn compare(simulated: &Path, measured: &Path) -> Result<Vec<Row>, SimError> {
    let (s, m) = (load(simulated)?, load(measured)?);
    let num = |v: &Value, path: &[&str]| {
        let mut x = v;
        for k in path {
            x = &x[*k];
        }
        x.as_f64()
    };
    let mut rows = Vec::new();
    for metric in ["ttft", "tbt", "tpot", "e2e"] {
        for q in ["p50", "p90", "p99"] {
            let path = ["latency_s", metric, q];
            rows.push(Row {
                metric: format!("{metric}_s {q}"),
                simulated: num(&s, &path),
                measured: num(&m, &path),
            });
        }
    }
    for t in ["requests_per_s", "output_tokens_per_s"] {
        rows.push(Row {
            metric: t.into(),
            simulated: num(&s, &["throughput", t]),
            measured: num(&m, &["throughput", t]),
        });
    }
    // Batches: the simulator counts them; a measured run has them from the server's counters.
    let measured_batches = num(&m, &["bench", "server_steps"])
        .or_else(|| num(&m, &["batches", "count"]).filter(|&c| c > 0.0));
    rows.push(Row {
        metric: "batches".into(),
        simulated: num(&s, &["batches", "count"]),
        measured: measured_batches,
    });
    rows.push(Row {
        metric: "mean batch size (requests)".into(),
        simulated: num(&s, &["batches", "size", "mean"]),
        measured: num(&m, &["bench", "server_mean_batch_size"]),
    });
    rows.push(Row {
        metric: "mean batch time (ms)".into(),
        simulated: num(&s, &["batches", "latency_s", "mean"]).map(|x| x * 1e3),
        measured: num(&m, &["bench", "server_mean_step_ms"]),
    });
    rows.push(Row {
        metric: "mean batch tokens".into(),
        simulated: num(&s, &["batches", "tokens", "mean"]),
        measured: num(&m, &["bench", "server_mean_batch_tokens"]),
    });
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

/// Writes `fidelity.md` and `fidelity.csv` into `out`.
///
/// # Errors
/// A file that cannot be written.
pub fn write(rows: &[Row], out: &Path) -> Result<(), SimError> {
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    let md = out.join("fidelity.md");
    std::fs::write(&md, markdown(rows)).map_err(crate::error::write_err(&md))?;
    let csv_path = out.join("fidelity.csv");
    let mut w = csv::Writer::from_path(&csv_path).map_err(crate::error::write_err(&csv_path))?;
    w.write_record(["metric", "simulated", "measured", "rel_error"])
        .map_err(crate::error::write_err(&csv_path))?;
    let opt = |v: Option<f64>| v.map_or_else(String::new, |x| x.to_string());
    for r in rows {
        w.write_record([
            r.metric.clone(),
            opt(r.simulated),
            opt(r.measured),
            opt(r.rel_error()),
        ])
        .map_err(crate::error::write_err(&csv_path))?;
    }
    w.flush().map_err(crate::error::write_err(&csv_path))
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
}
