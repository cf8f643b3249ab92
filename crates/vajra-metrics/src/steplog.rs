//! The step log: one CSV row per engine step, written by `vajra-engine serve --steps-log` and
//! read by `vajra-sim compare --steps`, which prices the very batches that ran.
//!
//! ```text
//! step,start_s,step_ms,forward_ms,num_requests,num_tokens,num_sampled,requests
//! 7,1.204311207,12.5031,11.9822,3,130,2,128@0 1@77* 1@301*
//! ```
//!
//! `requests` lists the step's requests as `TOKENS@CONTEXT` (new tokens, tokens already
//! computed), `*` marking the ones that sample. The writer and the reader are both here, over
//! the `csv` crate; the reader needs only `step`, `start_s`, `step_ms`, `forward_ms` and
//! `requests`, by name, and names the line and the cell of anything malformed.

use crate::error::{Result, write_err};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The columns, in order.
pub const STEP_LOG_COLUMNS: [&str; 8] = [
    "step",
    "start_s",
    "step_ms",
    "forward_ms",
    "num_requests",
    "num_tokens",
    "num_sampled",
    "requests",
];

/// The header row.
pub const STEP_LOG_HEADER: &str =
    "step,start_s,step_ms,forward_ms,num_requests,num_tokens,num_sampled,requests";

/// One request's share of a logged step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepItem {
    /// Tokens computed in the step (≥ 1).
    pub tokens: u32,
    /// Tokens computed before it (the attention context).
    pub context: u32,
    /// Whether it sampled a token.
    pub samples: bool,
}

/// One logged step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogRow {
    /// Step number.
    pub step: u64,
    /// Start, seconds since the engine was built.
    pub start_s: f64,
    /// Wall time from scheduling to outputs (ms).
    pub step_ms: f64,
    /// The backend's forward pass and sampling (ms).
    pub forward_ms: f64,
    /// The step's requests, in batch order.
    pub requests: Vec<StepItem>,
}

/// A malformed step log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: line {line}: {message}")]
pub struct StepLogError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (1 is the header).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Writes a step log, flushing every row (a killed server loses none).
pub struct StepLogWriter {
    out: csv::Writer<Box<dyn Write + Send>>,
    items: String,
}

impl StepLogWriter {
    /// A log over `out`; writes the header.
    ///
    /// # Errors
    /// The header cannot be written.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let mut out = csv::Writer::from_writer(out);
        out.write_record(STEP_LOG_COLUMNS)?;
        out.flush()?;
        Ok(StepLogWriter {
            out,
            items: String::new(),
        })
    }

    /// Appends one step.
    ///
    /// # Errors
    /// The row cannot be written.
    pub fn write(&mut self, row: &StepLogRow) -> std::io::Result<()> {
        use std::fmt::Write as _;
        self.items.clear();
        for (i, r) in row.requests.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let star = if r.samples { "*" } else { "" };
            let _ = write!(self.items, "{sep}{}@{}{star}", r.tokens, r.context);
        }
        let tokens: u32 = row.requests.iter().map(|r| r.tokens).sum();
        let sampled = row.requests.iter().filter(|r| r.samples).count();
        self.out.write_record([
            row.step.to_string(),
            format!("{:.9}", row.start_s),
            format!("{:.4}", row.step_ms),
            format!("{:.4}", row.forward_ms),
            row.requests.len().to_string(),
            tokens.to_string(),
            sampled.to_string(),
            self.items.clone(),
        ])?;
        self.out.flush()
    }
}

/// Reads a step log.
///
/// # Errors
/// An unreadable file, a missing column, or a malformed cell, with its line.
pub fn read(path: &Path) -> std::result::Result<Vec<StepLogRow>, StepLogError> {
    let err = |line: usize, message: String| StepLogError {
        path: path.to_owned(),
        line,
        message,
    };
    let mut rdr = csv::Reader::from_path(path).map_err(|e| err(1, e.to_string()))?;
    let h = rdr.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let col = |name: &str| {
        h.iter().position(|c| c == name).ok_or_else(|| {
            err(
                1,
                format!(
                    "missing column `{name}` (a step log has: {})",
                    STEP_LOG_COLUMNS.join(", ")
                ),
            )
        })
    };
    let (c_step, c_start, c_wall, c_fwd, c_reqs) = (
        col("step")?,
        col("start_s")?,
        col("step_ms")?,
        col("forward_ms")?,
        col("requests")?,
    );
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| err(line, e.to_string()))?;
        let cell = |c: usize| rec.get(c).unwrap_or("");
        let num = |c: usize| -> std::result::Result<f64, StepLogError> {
            cell(c)
                .parse::<f64>()
                .map_err(|_| err(line, format!("`{}` = `{}` is not a number", &h[c], cell(c))))
        };
        let mut requests = Vec::new();
        for item in cell(c_reqs).split_whitespace() {
            let samples = item.ends_with('*');
            let parsed = item
                .trim_end_matches('*')
                .split_once('@')
                .and_then(|(c, k)| Some((c.parse::<u32>().ok()?, k.parse::<u32>().ok()?)));
            let Some((tokens, context)) = parsed.filter(|&(c, _)| c > 0) else {
                return Err(err(
                    line,
                    format!(
                        "request `{item}` is not `TOKENS@CONTEXT` or `TOKENS@CONTEXT*` with TOKENS ≥ 1"
                    ),
                ));
            };
            requests.push(StepItem {
                tokens,
                context,
                samples,
            });
        }
        if requests.is_empty() {
            return Err(err(line, "a step with no requests".into()));
        }
        rows.push(StepLogRow {
            step: num(c_step)? as u64,
            start_s: num(c_start)?,
            step_ms: num(c_wall)?,
            forward_ms: num(c_fwd)?,
            requests,
        });
    }
    Ok(rows)
}

/// Opens `path` for a step log.
///
/// # Errors
/// The file cannot be created or its header written.
pub fn create(path: &Path) -> Result<StepLogWriter> {
    let f = std::fs::File::create(path).map_err(write_err(path))?;
    StepLogWriter::new(Box::new(std::io::BufWriter::new(f))).map_err(write_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_log_reads_back_row_for_row() {
        let p = std::env::temp_dir().join(format!("vajra-steplog-{}.csv", std::process::id()));
        let rows = vec![
            StepLogRow {
                step: 0,
                start_s: 0.5,
                step_ms: 12.25,
                forward_ms: 11.5,
                requests: vec![
                    StepItem {
                        tokens: 128,
                        context: 0,
                        samples: false,
                    },
                    StepItem {
                        tokens: 1,
                        context: 77,
                        samples: true,
                    },
                ],
            },
            StepLogRow {
                step: 1,
                start_s: 0.51,
                step_ms: 3.0,
                forward_ms: 2.5,
                requests: vec![StepItem {
                    tokens: 1,
                    context: 78,
                    samples: true,
                }],
            },
        ];
        let mut w = create(&p).unwrap();
        for r in &rows {
            w.write(r).unwrap();
        }
        drop(w);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(STEP_LOG_HEADER, STEP_LOG_COLUMNS.join(","));
        assert!(text.starts_with(STEP_LOG_HEADER), "{text}");
        assert!(text.contains(",2,129,1,128@0 1@77*\n"), "{text}");
        assert_eq!(read(&p).unwrap(), rows);
        let _ = std::fs::remove_file(p);
    }
}
