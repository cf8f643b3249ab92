//! Trace readers. Every format becomes a list of [`TraceRow`]s with arrival times in seconds
//! from the trace's first row (or none, for length-only traces).
//!
//! | format | columns |
//! |---|---|
//! | `vidur_csv` | `arrived_at` (s; optional unless arrivals are replayed), `num_prefill_tokens`, `num_decode_tokens` |
//! | `azure` | `TIMESTAMP` (`YYYY-MM-DD HH:MM:SS[.fraction]`), `ContextTokens`, `GeneratedTokens` |
//! | `jsonl` | `timestamp` (ms), `input_length`, `output_length`, optional `hash_ids` |
//! | `vllm` | a vLLM run's request log: `queued_ts` (s, engine clock), `input_toks`, `output_toks`, optional `input_tok_ids` |
//! | `llmservingsim` | LLMServingSim's workload: `arrival_time_ns`, `input_toks`, `output_toks`, optional `input_tok_ids` |
//!
//! A missing column, an unparsable cell or a zero/negative length is an error naming the file,
//! the line and the column.

use crate::config::TraceFormat;
use crate::error::{Result, WorkloadError};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    /// Seconds from the first row (`None` for length-only traces).
    pub arrival_s: Option<f64>,
    /// Prompt tokens (≥ 1).
    pub prompt: u32,
    /// Output tokens (≥ 1).
    pub output: u32,
    /// Prefix-block ids (Mooncake `hash_ids`), empty if absent.
    pub hash_ids: Vec<u64>,
    /// The prompt's real token ids, empty if the trace has none.
    pub tokens: Vec<u32>,
}

/// Reads a trace. With `need_arrivals`, rows must carry arrival times.
///
/// # Errors
/// A missing file, a missing column, a malformed cell, or no rows.
pub fn read_trace(path: &Path, format: TraceFormat, need_arrivals: bool) -> Result<Vec<TraceRow>> {
    let format = match format {
        TraceFormat::Auto => detect(path)?,
        f => f,
    };
    let mut rows = match format {
        TraceFormat::Jsonl => read_jsonl(path)?,
        TraceFormat::Vllm | TraceFormat::Llmservingsim => read_token_jsonl(path, format)?,
        TraceFormat::VidurCsv | TraceFormat::Azure | TraceFormat::Auto => {
            read_csv(path, format, need_arrivals)?
        }
    };
    if rows.is_empty() {
        return Err(WorkloadError::EmptyTrace {
            path: path.to_owned(),
            message: "no data rows".into(),
        });
    }
    // A request log may be written in id order rather than by arrival: times count from the
    // earliest.
    let t0 = rows.iter().filter_map(|r| r.arrival_s).reduce(f64::min);
    if let Some(t0) = t0 {
        for r in &mut rows {
            if let Some(t) = &mut r.arrival_s {
                *t -= t0;
            }
        }
    }
    Ok(rows)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkloadError + '_ {
    move |source| WorkloadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn detect(path: &Path) -> Result<TraceFormat> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut first = String::new();
    BufReader::new(f)
        .read_line(&mut first)
        .map_err(io_err(path))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        return Ok(if first.contains("\"queued_ts\"") {
            TraceFormat::Vllm
        } else if first.contains("\"arrival_time_ns\"") {
            TraceFormat::Llmservingsim
        } else {
            TraceFormat::Jsonl
        });
    }
    Ok(if first.contains("TIMESTAMP") {
        TraceFormat::Azure
    } else {
        TraceFormat::VidurCsv
    })
}

fn bad(path: &Path, line: u64, message: String) -> WorkloadError {
    WorkloadError::BadRow {
        path: path.to_owned(),
        line,
        message,
    }
}

fn parse_len(path: &Path, line: u64, col: &str, cell: &str) -> Result<u32> {
    let v: f64 = cell.trim().parse().map_err(|_| {
        bad(
            path,
            line,
            format!("column `{col}`: `{cell}` is not a number"),
        )
    })?;
    if !(v.is_finite() && v >= 1.0 && v <= f64::from(u32::MAX)) {
        return Err(bad(
            path,
            line,
            format!(
                "column `{col}`: {v} is not a token count from 1 to {}",
                u32::MAX
            ),
        ));
    }
    if v.fract() != 0.0 {
        // Rounding used to happen silently.
        return Err(bad(
            path,
            line,
            format!("column `{col}`: {v} is not a whole number of tokens"),
        ));
    }
    Ok(v as u32)
}

fn read_csv(path: &Path, format: TraceFormat, need_arrivals: bool) -> Result<Vec<TraceRow>> {
    let (time_col, p_col, d_col, name) = match format {
        TraceFormat::Azure => ("TIMESTAMP", "ContextTokens", "GeneratedTokens", "azure"),
        _ => (
            "arrived_at",
            "num_prefill_tokens",
            "num_decode_tokens",
            "vidur_csv",
        ),
    };
    let time_required = need_arrivals || format == TraceFormat::Azure;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(source) => WorkloadError::Io {
                path: path.to_owned(),
                source,
            },
            other => bad(path, 1, format!("{other:?}")),
        })?;
    let headers = rdr
        .headers()
        .map_err(|e| bad(path, 1, e.to_string()))?
        .clone();
    if headers.iter().all(|h| h.trim().is_empty()) {
        return Err(WorkloadError::EmptyTrace {
            path: path.to_owned(),
            message: format!(
                "the file is empty: a {name} trace starts with a header row naming its columns"
            ),
        });
    }
    let needed = if time_required {
        format!("{time_col}, {p_col}, {d_col}")
    } else {
        format!("{p_col}, {d_col} (and {time_col} to replay arrivals)")
    };
    let find = |col: &str| headers.iter().position(|h| h.trim() == col);
    let missing = |col: &str| WorkloadError::MissingColumn {
        path: path.to_owned(),
        column: col.to_owned(),
        format: name.to_owned(),
        needed: needed.clone(),
        found: headers.iter().collect::<Vec<_>>().join(", "),
    };
    let pi = find(p_col).ok_or_else(|| missing(p_col))?;
    let di = find(d_col).ok_or_else(|| missing(d_col))?;
    let ti = find(time_col);
    if time_required && ti.is_none() {
        return Err(missing(time_col));
    }
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            bad(path, line, e.to_string())
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let cell = |i: usize, col: &str| {
            rec.get(i)
                .ok_or_else(|| bad(path, line, format!("column `{col}` is missing in this row")))
        };
        let arrival_s = match ti {
            Some(i) => {
                let c = cell(i, time_col)?;
                Some(if format == TraceFormat::Azure {
                    parse_datetime(c).ok_or_else(|| {
                        bad(
                            path,
                            line,
                            format!(
                                "column `{time_col}`: `{c}` is not a `YYYY-MM-DD HH:MM:SS[.fraction]` time"
                            ),
                        )
                    })?
                } else {
                    let t: f64 = c.trim().parse().map_err(|_| {
                        bad(
                            path,
                            line,
                            format!("column `{time_col}`: `{c}` is not a number of seconds"),
                        )
                    })?;
                    if !t.is_finite() {
                        return Err(bad(
                            path,
                            line,
                            format!("column `{time_col}`: {t} is not finite"),
                        ));
                    }
                    t
                })
            }
            None => None,
        };
        rows.push(TraceRow {
            arrival_s,
            prompt: parse_len(path, line, p_col, cell(pi, p_col)?)?,
            output: parse_len(path, line, d_col, cell(di, d_col)?)?,
            hash_ids: Vec::new(),
            tokens: Vec::new(),
        });
    }
    if let Some((i, _)) = rows
        .windows(2)
        .enumerate()
        .find(|(_, w)| w[1].arrival_s < w[0].arrival_s)
    {
        return Err(bad(
            path,
            i as u64 + 3,
            format!("column `{time_col}` goes back in time (rows must be sorted by arrival)"),
        ));
    }
    Ok(rows)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    timestamp: Option<f64>,
    input_length: f64,
    output_length: f64,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Calls `f` with each non-blank line of the JSONL file `path` parsed as `T` (and its 1-based
/// line number) until `f` returns `false`; a line that does not parse is an error naming it and
/// `expected`.
fn each_json_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &str,
    mut f: impl FnMut(u64, T) -> Result<bool>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: T = serde_json::from_str(&line)
            .map_err(|e| bad(path, line_no, format!("{e} (expected {expected})")))?;
        if !f(line_no, row)? {
            break;
        }
    }
    Ok(())
}

fn read_jsonl(path: &Path) -> Result<Vec<TraceRow>> {
    let mut rows: Vec<TraceRow> = Vec::new();
    let expected =
        "{\"timestamp\": ms, \"input_length\": n, \"output_length\": n, \"hash_ids\": [..]}";
    each_json_line(path, expected, |line_no, r: JsonRow| {
        let t = r.timestamp.map(|ms| ms / 1000.0);
        if let (Some(prev), Some(t)) = (rows.last().and_then(|p| p.arrival_s), t)
            && t < prev
        {
            return Err(bad(
                path,
                line_no,
                "field `timestamp` goes back in time (rows must be sorted by arrival)".into(),
            ));
        }
        rows.push(TraceRow {
            arrival_s: t,
            prompt: parse_len(path, line_no, "input_length", &r.input_length.to_string())?,
            output: parse_len(path, line_no, "output_length", &r.output_length.to_string())?,
            hash_ids: r.hash_ids,
            tokens: Vec::new(),
        });
        Ok(true)
    })?;
    Ok(rows)
}

/// A row of a vLLM request log or an LLMServingSim workload (other fields are ignored: both
/// carry timestamps and ids this reader does not need).
#[derive(Deserialize)]
struct TokenRow {
    queued_ts: Option<f64>,
    arrival_time_ns: Option<f64>,
    input_toks: f64,
    output_toks: f64,
    #[serde(default)]
    input_tok_ids: Vec<u32>,
}

fn read_token_jsonl(path: &Path, format: TraceFormat) -> Result<Vec<TraceRow>> {
    let (field, scale, shape) = match format {
        TraceFormat::Vllm => (
            "queued_ts",
            1.0,
            "{\"queued_ts\": s, \"input_toks\": n, \"output_toks\": n}",
        ),
        _ => (
            "arrival_time_ns",
            1e-9,
            "{\"arrival_time_ns\": ns, \"input_toks\": n, \"output_toks\": n, \"input_tok_ids\": [..]}",
        ),
    };
    let mut rows: Vec<TraceRow> = Vec::new();
    each_json_line(path, shape, |line_no, r: TokenRow| {
        let t = match format {
            TraceFormat::Vllm => r.queued_ts,
            _ => r.arrival_time_ns,
        }
        .ok_or_else(|| {
            bad(
                path,
                line_no,
                format!("missing field `{field}` (expected {shape})"),
            )
        })? * scale;
        if !t.is_finite() {
            return Err(bad(path, line_no, format!("field `{field}` is not finite")));
        }
        let prompt = parse_len(path, line_no, "input_toks", &r.input_toks.to_string())?;
        if !r.input_tok_ids.is_empty() && r.input_tok_ids.len() != prompt as usize {
            return Err(bad(
                path,
                line_no,
                format!(
                    "`input_tok_ids` has {} ids but `input_toks` is {prompt}",
                    r.input_tok_ids.len()
                ),
            ));
        }
        rows.push(TraceRow {
            arrival_s: Some(t),
            prompt,
            output: parse_len(path, line_no, "output_toks", &r.output_toks.to_string())?,
            hash_ids: Vec::new(),
            tokens: r.input_tok_ids,
        });
        Ok(true)
    })?;
    // Kept in the file's order (a workload's token ids match it line by line); the replay
    // sorts by arrival.
    Ok(rows)
}

/// Fills `rows`' prompt tokens from the `input_tok_ids` of `path`'s lines, in order.
///
/// # Errors
/// An unreadable file, a line without ids, a length that differs from its row's prompt, or
/// fewer lines than rows.
pub fn attach_prompt_tokens(rows: &mut [TraceRow], path: &Path) -> Result<()> {
    #[derive(Deserialize)]
    struct Ids {
        input_tok_ids: Option<Vec<u32>>,
    }
    let mut n = 0;
    each_json_line(path, "{\"input_tok_ids\": [..]}", |line_no, ids: Ids| {
        let Some(row) = rows.get_mut(n) else {
            return Ok(false);
        };
        let ids = ids
            .input_tok_ids
            .ok_or_else(|| bad(path, line_no, "missing field `input_tok_ids`".into()))?;
        if ids.len() != row.prompt as usize {
            return Err(bad(
                path,
                line_no,
                format!(
                    "{} prompt token ids but the trace's row {} has a {}-token prompt (workload.arrival.prompt_tokens must list the trace's requests in its order)",
                    ids.len(),
                    n + 1,
                    row.prompt
                ),
            ));
        }
        row.tokens = ids;
        n += 1;
        Ok(true)
    })?;
    if n < rows.len() {
        return Err(bad(
            path,
            n as u64,
            format!(
                "{n} lines of prompt token ids for a trace of {} requests",
                rows.len()
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationRow {
    /// The conversation's id in its source (kept for the reader, not used).
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<serde_json::Value>,
    turns: Vec<(f64, f64)>,
}

/// One conversation's turns: `(new tokens, answer tokens)` each, in order.
pub type Conversation = Vec<(u32, u32)>;

/// Reads a conversation file (JSONL, one conversation a line:
/// `{"id": .., "turns": [[new_tokens, answer_tokens], ...]}`). Every count is a whole number
/// ≥ 1 and every conversation has a turn.
///
/// # Errors
/// An unreadable file, a malformed line (named with its line and what was expected), or no
/// conversation at all.
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let mut out = Vec::new();
    let expected = "{\"turns\": [[new_tokens, answer_tokens], ...]}";
    each_json_line(path, expected, |line_no, row: ConversationRow| {
        if row.turns.is_empty() {
            return Err(bad(
                path,
                line_no,
                "field `turns` is empty: a conversation has at least one turn".into(),
            ));
        }
        let mut turns = Vec::with_capacity(row.turns.len());
        for (k, &(new, answer)) in row.turns.iter().enumerate() {
            let count = |v: f64, what: &str| {
                if v.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&v) {
                    Ok(v as u32)
                } else {
                    Err(bad(
                        path,
                        line_no,
                        format!("field `turns[{k}]`: {what} = {v}: allowed a whole number ≥ 1"),
                    ))
                }
            };
            turns.push((count(new, "new tokens")?, count(answer, "answer tokens")?));
        }
        out.push(turns);
        Ok(true)
    })?;
    if out.is_empty() {
        return Err(WorkloadError::EmptyTrace {
            path: path.to_owned(),
            message: "no conversation in the file".into(),
        });
    }
    Ok(out)
}

/// Seconds since 1970-01-01 of a `YYYY-MM-DD HH:MM:SS[.fraction]` time (a `T` separator is
/// accepted too). `None` if malformed.
pub fn parse_datetime(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, b),
        None => (time, ""),
    };
    let mut t = hms.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next()?.parse().ok()?;
    if t.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let frac = if frac.is_empty() {
        0.0
    } else if frac.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.{frac}").parse::<f64>().ok()?
    } else {
        return None;
    };
    // Days from civil (proleptic Gregorian), H. Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec) as f64 + frac)
}

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vajra-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn azure_timestamps_parse_to_seconds() {
        let a = parse_datetime("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_datetime("2023-11-16 18:15:47").unwrap();
        assert!((b - a - 0.31941).abs() < 1e-6);
        assert_eq!(parse_datetime("1970-01-02 00:00:00"), Some(86_400.0));
        assert_eq!(parse_datetime("2023-13-01 00:00:00"), None);
        assert_eq!(parse_datetime("yesterday"), None);
    }

    #[test]
    fn azure_csv_reads_relative_times() {
        let p = tmp(
            "az.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,100,10\n2023-11-16 18:15:48.0,200,20\n",
        );
        let rows = read_trace(&p, TraceFormat::Auto, true).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].arrival_s, Some(0.0));
        assert!((rows[1].arrival_s.unwrap() - 1.5).abs() < 1e-9);
        assert_eq!((rows[1].prompt, rows[1].output), (200, 20));
    }

    #[test]
    fn a_missing_column_names_the_column_and_what_was_found() {
        let p = tmp("bad.csv", "arrived_at,num_prefill_tokens\n0.0,10\n");
        let e = read_trace(&p, TraceFormat::VidurCsv, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_decode_tokens") && e.contains("found: arrived_at"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_cell_names_line_and_column() {
        let p = tmp(
            "cell.csv",
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,ten,5\n",
        );
        let e = read_trace(&p, TraceFormat::VidurCsv, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("num_prefill_tokens"),
            "{e}"
        );
    }

    #[test]
    fn length_only_vidur_traces_need_no_arrival_column_unless_replayed() {
        let p = tmp(
            "len.csv",
            "num_prefill_tokens,num_decode_tokens,pd_ratio\n10,5,2\n",
        );
        assert_eq!(read_trace(&p, TraceFormat::Auto, false).unwrap().len(), 1);
        assert!(read_trace(&p, TraceFormat::Auto, true).is_err());
    }

    #[test]
    fn a_vllm_request_log_replays_on_the_engine_clock_with_its_token_ids() {
        let p = tmp(
            "requests.jsonl",
            "{\"request_id\": \"bench-0\", \"input_toks\": 3, \"output_toks\": 5, \"queued_ts\": 100.5, \"first_token_ts\": 101.0}\n{\"request_id\": \"bench-1\", \"input_toks\": 2, \"output_toks\": 1, \"queued_ts\": 100.0}\n",
        );
        let mut rows = read_trace(&p, TraceFormat::Auto, true).unwrap();
        // Times count from the earliest; rows keep the file's order (the token file's).
        assert_eq!(rows[0].arrival_s, Some(0.5));
        assert_eq!(rows[1].arrival_s, Some(0.0));
        assert_eq!((rows[0].prompt, rows[0].output), (3, 5));
        let ids = tmp(
            "w.jsonl",
            "{\"input_toks\": 3, \"input_tok_ids\": [7, 8, 9]}\n{\"input_tok_ids\": [1, 2]}\n",
        );
        attach_prompt_tokens(&mut rows, &ids).unwrap();
        assert_eq!(rows[0].tokens, vec![7, 8, 9]);
        let short = tmp("s.jsonl", "{\"input_tok_ids\": [7, 8]}\n");
        let e = attach_prompt_tokens(&mut rows, &short)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 prompt token ids") && e.contains("3-token"),
            "{e}"
        );
        let bad = tmp(
            "b.jsonl",
            "{\"input_toks\": 3, \"output_toks\": 5, \"queued_ts\": 1.0}\n{\"input_toks\": 3, \"output_toks\": 5}\n",
        );
        let e = read_trace(&bad, TraceFormat::Vllm, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("queued_ts") && e.contains("line 2"), "{e}");
        let ns = tmp(
            "lss.jsonl",
            "{\"input_toks\": 2, \"output_toks\": 1, \"arrival_time_ns\": 2000000000, \"input_tok_ids\": [4, 5]}\n",
        );
        let rows = read_trace(&ns, TraceFormat::Auto, true).unwrap();
        assert_eq!(rows[0].tokens, vec![4, 5]);
    }

    #[test]
    fn jsonl_reads_hash_ids_and_millisecond_timestamps() {
        let p = tmp(
            "m.jsonl",
            "{\"timestamp\": 1000, \"input_length\": 1024, \"output_length\": 3, \"hash_ids\": [1, 2]}\n{\"timestamp\": 3000, \"input_length\": 600, \"output_length\": 4, \"hash_ids\": [1]}\n",
        );
        let rows = read_trace(&p, TraceFormat::Auto, true).unwrap();
        assert_eq!(rows[1].arrival_s, Some(2.0));
        assert_eq!(rows[0].hash_ids, vec![1, 2]);
    }

    #[test]
    fn the_shared_vidur_conversation_trace_reads_completely() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/reference/vidur/processed_traces/splitwise_conv.csv");
        if !p.exists() {
            eprintln!("skipping: {} not present", p.display());
            return;
        }
        let rows = read_trace(&p, TraceFormat::Auto, true).unwrap();
        assert_eq!(rows.len(), 19_366);
    }
}
