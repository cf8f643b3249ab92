//! Run-folder tables: `requests.csv`, `requests.parquet`, `batches.parquet`, `summary.json`,
//! `cdf/<metric>.csv`.
//!
//! Parquet is written with the `parquet` crate's column writers (no Arrow, Snappy pages), one
//! row group per file; polars, pandas and DuckDB read it directly. Times in tables are seconds
//! (f64) from the run's start; absent values are nulls.

use crate::collector::{BatchRecord, Collector, RequestRecord};
use crate::error::{Result, write_err};
use crate::outcomes::Outcomes;
use crate::stats::Multiset;
use parquet::basic::{Compression, Encoding};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// One column of a table.
pub enum Column {
    /// 64-bit integers.
    I64(Vec<i64>),
    /// 32-bit integers.
    I32(Vec<i32>),
    /// Doubles.
    F64(Vec<f64>),
    /// Nullable doubles.
    OptF64(Vec<Option<f64>>),
    /// Strings.
    Str(Vec<String>),
}

impl Column {
    fn parquet_type(&self) -> &'static str {
        match self {
            Column::I64(_) => "REQUIRED INT64",
            Column::I32(_) => "REQUIRED INT32",
            Column::F64(_) => "REQUIRED DOUBLE",
            Column::OptF64(_) => "OPTIONAL DOUBLE",
            Column::Str(_) => "REQUIRED BYTE_ARRAY",
        }
    }
}

/// A Parquet file written one row group at a time (bounded memory for any row count).
pub struct ParquetStream {
    path: std::path::PathBuf,
    writer: SerializedFileWriter<std::io::BufWriter<std::fs::File>>,
}

/// Write buffer of a Parquet file: the writer's own buffer is 8 KiB, which at a gigabyte of
/// batch rows meant ~150,000 write calls.
const WRITE_BUFFER: usize = 1 << 20;

impl ParquetStream {
    /// Creates the file with the schema of `columns` (names and kinds; values ignored).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(
        path: &Path,
        columns: &[(&str, Column)],
        compression: Compression,
    ) -> Result<Self> {
        let fields: String = columns
            .iter()
            .map(|(n, c)| {
                let utf8 = if matches!(c, Column::Str(_)) {
                    " (UTF8)"
                } else {
                    ""
                };
                format!("{} {n}{utf8};", c.parquet_type())
            })
            .collect::<Vec<_>>()
            .join(" ");
        let schema = Arc::new(
            parse_message_type(&format!("message run {{ {fields} }}")).map_err(write_err(path))?,
        );
        let mut props = WriterProperties::builder()
            .set_compression(compression)
            .set_dictionary_enabled(false)
            .set_created_by("vajra".into());
        // Counts, ids and steps delta-encode to a few bits a row before compression (at 28.7 M
        // batch rows the batch table is 14 % smaller than with plain encoding).
        for (name, c) in columns {
            if matches!(c, Column::I32(_) | Column::I64(_)) {
                props = props
                    .set_column_encoding(ColumnPath::from(*name), Encoding::DELTA_BINARY_PACKED);
            }
        }
        let props = Arc::new(props.build());
        let file = std::fs::File::create(path).map_err(write_err(path))?;
        let file = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let writer = SerializedFileWriter::new(file, schema, props).map_err(write_err(path))?;
        Ok(ParquetStream {
            path: path.to_owned(),
            writer,
        })
    }

    /// Appends one row group (columns in schema order, of equal length).
    ///
    /// # Errors
    /// A write error.
    pub fn write_group(&mut self, columns: &[(&str, Column)]) -> Result<()> {
        let path = self.path.clone();
        let path = path.as_path();
        let mut rg = self.writer.next_row_group().map_err(write_err(path))?;
        for (_, col) in columns {
            let mut cw = rg
                .next_column()
                .map_err(write_err(path))?
                .expect("one writer per schema column");
            match col {
                Column::I64(v) => cw.typed::<Int64Type>().write_batch(v, None, None),
                Column::I32(v) => cw.typed::<Int32Type>().write_batch(v, None, None),
                Column::F64(v) => cw.typed::<DoubleType>().write_batch(v, None, None),
                Column::OptF64(v) => {
                    let vals: Vec<f64> = v.iter().flatten().copied().collect();
                    let defs: Vec<i16> = v.iter().map(|x| i16::from(x.is_some())).collect();
                    cw.typed::<DoubleType>()
                        .write_batch(&vals, Some(&defs), None)
                }
                Column::Str(v) => {
                    let vals: Vec<ByteArray> =
                        v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                    cw.typed::<ByteArrayType>().write_batch(&vals, None, None)
                }
            }
            .map_err(write_err(path))?;
            cw.close().map_err(write_err(path))?;
        }
        rg.close().map_err(write_err(path))?;
        Ok(())
    }

    /// Finishes the file.
    ///
    /// # Errors
    /// A write error.
    pub fn close(self) -> Result<()> {
        let path = self.path.clone();
        self.writer.close().map_err(write_err(&path))?;
        Ok(())
    }
}

/// Writes named columns of equal length as a Parquet file (one row group).
///
/// # Errors
/// The file cannot be created or written.
pub fn write_parquet(path: &Path, columns: &[(&str, Column)]) -> Result<()> {
    let mut s = ParquetStream::create(path, columns, Compression::SNAPPY)?;
    s.write_group(columns)?;
    s.close()
}

/// Rows per row group of streamed tables.
const GROUP_ROWS: usize = 1 << 16;

/// Streams batch records to `batches.parquet` in row groups.
pub struct BatchSink {
    stream: ParquetStream,
    buf: Vec<BatchRecord>,
    num_blocks: u32,
    error: Option<crate::MetricsError>,
}

impl std::fmt::Debug for BatchSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSink")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl BatchSink {
    /// Creates the file.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(path: &Path, num_blocks: u32) -> Result<Self> {
        Ok(BatchSink {
            stream: ParquetStream::create(
                path,
                &batch_columns(&[], num_blocks),
                Compression::SNAPPY,
            )?,
            buf: Vec::with_capacity(GROUP_ROWS),
            num_blocks,
            error: None,
        })
    }

    /// Buffers a record, writing a row group when the buffer is full. A write error is kept
    /// and reported by [`BatchSink::close`].
    pub fn push(&mut self, b: BatchRecord) {
        self.buf.push(b);
        if self.buf.len() >= GROUP_ROWS && self.error.is_none() {
            self.flush_group();
        }
    }

    fn flush_group(&mut self) {
        if let Err(e) = self
            .stream
            .write_group(&batch_columns(&self.buf, self.num_blocks))
        {
            self.error = Some(e);
        }
        self.buf.clear();
    }

    /// Writes what is buffered and closes the file.
    ///
    /// # Errors
    /// Any write error of the run.
    pub fn close(mut self) -> Result<()> {
        if !self.buf.is_empty() && self.error.is_none() {
            self.flush_group();
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        self.stream.close()
    }
}

fn request_columns(r: &[&RequestRecord]) -> Vec<(&'static str, Column)> {
    let i64c = |f: &dyn Fn(&RequestRecord) -> i64| Column::I64(r.iter().map(|x| f(x)).collect());
    let f64c = |f: &dyn Fn(&RequestRecord) -> f64| Column::F64(r.iter().map(|x| f(x)).collect());
    let optc = |f: &dyn Fn(&RequestRecord) -> Option<f64>| {
        Column::OptF64(r.iter().map(|x| f(x)).collect())
    };
    vec![
        ("request_id", i64c(&|x| x.request_id as i64)),
        ("replica", i64c(&|x| i64::from(x.replica))),
        ("tenant", i64c(&|x| i64::from(x.tenant))),
        ("priority", i64c(&|x| i64::from(x.priority))),
        ("arrival_s", f64c(&|x| x.arrival_s)),
        ("first_scheduled_s", optc(&|x| x.first_scheduled_s)),
        ("first_token_s", optc(&|x| x.first_token_s)),
        ("completed_s", f64c(&|x| x.completed_s)),
        ("prompt_tokens", i64c(&|x| i64::from(x.prompt_tokens))),
        ("output_tokens", i64c(&|x| i64::from(x.output_tokens))),
        (
            "cached_prompt_tokens",
            i64c(&|x| i64::from(x.cached_prompt_tokens)),
        ),
        ("preemptions", i64c(&|x| i64::from(x.preemptions))),
        ("ttft_s", optc(&|x| x.ttft_s)),
        ("tpot_s", optc(&|x| x.tpot_s)),
        ("e2e_s", f64c(&|x| x.e2e_s)),
        ("normalized_e2e_s", optc(&|x| x.normalized_e2e_s)),
        ("scheduling_delay_s", optc(&|x| x.scheduling_delay_s)),
        ("max_tbt_s", optc(&|x| x.max_tbt_s)),
        ("tbt_samples", i64c(&|x| i64::from(x.tbt_samples))),
        ("deadline_s", optc(&|x| x.deadline_s)),
        ("token_deadlines", i64c(&|x| i64::from(x.token_deadlines))),
        (
            "token_deadline_misses",
            i64c(&|x| i64::from(x.token_deadline_misses)),
        ),
        (
            "finish_reason",
            Column::Str(
                r.iter()
                    .map(|x| {
                        serde_json::to_value(x.finish_reason)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    })
                    .collect(),
            ),
        ),
    ]
}

fn batch_columns(b: &[BatchRecord], num_blocks: u32) -> Vec<(&'static str, Column)> {
    // Generic, not `&dyn Fn`: one indirect call per value was a third of this function's time
    // at tens of millions of rows.
    fn i64c(b: &[BatchRecord], f: impl Fn(&BatchRecord) -> i64) -> Column {
        Column::I64(b.iter().map(f).collect())
    }
    // Counts fit 32 bits; at cluster scale (tens of millions of batches) the table halves.
    fn i32c(b: &[BatchRecord], f: impl Fn(&BatchRecord) -> u32) -> Column {
        Column::I32(b.iter().map(|x| f(x).min(i32::MAX as u32) as i32).collect())
    }
    fn f64c(b: &[BatchRecord], f: impl Fn(&BatchRecord) -> f64) -> Column {
        Column::F64(b.iter().map(f).collect())
    }
    let nb = f64::from(num_blocks.max(1));
    vec![
        ("replica", i32c(b, |x| x.replica)),
        ("step", i64c(b, |x| x.step as i64)),
        ("start_s", f64c(b, |x| x.start.as_secs_f64())),
        ("end_s", f64c(b, |x| x.end.as_secs_f64())),
        ("busy_s", f64c(b, |x| x.busy.as_secs_f64())),
        ("num_requests", i32c(b, |x| x.num_requests)),
        ("prefill_tokens", i32c(b, |x| x.prefill_tokens)),
        ("decode_tokens", i32c(b, |x| x.decode_tokens)),
        (
            "num_tokens",
            i32c(b, |x| x.prefill_tokens + x.decode_tokens),
        ),
        ("preempted", i32c(b, |x| x.preempted)),
        ("kv_blocks_used", i32c(b, |x| x.kv_blocks_used)),
        ("kv_usage", f64c(b, |x| f64::from(x.kv_blocks_used) / nb)),
        ("flops", f64c(b, |x| x.flops)),
        ("bytes", f64c(b, |x| x.bytes)),
    ]
}

/// Concatenates Parquet files written by [`Collector::stream_batches`] (same schema) into
/// `dest`, copying their encoded column chunks as they are (no decoding), and deletes them.
///
/// # Errors
/// A part that cannot be read or the destination that cannot be written.
pub fn concat_batch_parts(
    parts: &[std::path::PathBuf],
    dest: &Path,
    num_blocks: u32,
) -> Result<()> {
    use parquet::column::writer::ColumnCloseResult;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut out =
        ParquetStream::create(dest, &batch_columns(&[], num_blocks), Compression::SNAPPY)?;
    for part in parts {
        let rerr = |e: parquet::errors::ParquetError| crate::MetricsError::Write {
            path: part.clone(),
            message: format!("reading back: {e}"),
        };
        let mut file = std::fs::File::open(part).map_err(write_err(part))?;
        let reader =
            SerializedFileReader::new(file.try_clone().map_err(write_err(part))?).map_err(rerr)?;
        for g in 0..reader.num_row_groups() {
            let meta = reader.metadata().row_group(g);
            // One read per row group (a few MB), rather than the 8 KiB reads of copying each
            // chunk straight from the file.
            let window = RowGroupBytes::read(&mut file, meta).map_err(write_err(part))?;
            let mut rg = out.writer.next_row_group().map_err(write_err(dest))?;
            for c in meta.columns() {
                let close = ColumnCloseResult {
                    bytes_written: c.compressed_size() as u64,
                    rows_written: meta.num_rows() as u64,
                    metadata: c.clone(),
                    bloom_filter: None,
                    column_index: None,
                    offset_index: None,
                };
                rg.append_column(&window, close).map_err(write_err(dest))?;
            }
            rg.close().map_err(write_err(dest))?;
        }
        drop(reader);
        std::fs::remove_file(part).map_err(write_err(part))?;
    }
    out.close()
}

/// The bytes of one row group's column chunks, addressed by their offsets in the file they
/// were read from.
struct RowGroupBytes {
    start: u64,
    data: bytes::Bytes,
}

impl RowGroupBytes {
    fn read(
        file: &mut std::fs::File,
        meta: &parquet::file::metadata::RowGroupMetaData,
    ) -> std::io::Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let ranges = meta.columns().iter().map(|c| c.byte_range());
        let start = ranges.clone().map(|(s, _)| s).min().unwrap_or(0);
        let end = ranges.map(|(s, n)| s + n).max().unwrap_or(0);
        let mut data = vec![0; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut data)?;
        Ok(RowGroupBytes {
            start,
            data: data.into(),
        })
    }

    fn slice(&self, start: u64, len: Option<usize>) -> parquet::errors::Result<bytes::Bytes> {
        let from = start
            .checked_sub(self.start)
            .map(|o| o as usize)
            .filter(|&o| o <= self.data.len())
            .ok_or_else(|| {
                parquet::errors::ParquetError::General(format!(
                    "offset {start} outside the row group read at {}",
                    self.start
                ))
            })?;
        let to = len.map_or(self.data.len(), |n| from + n);
        if to > self.data.len() {
            return Err(parquet::errors::ParquetError::General(format!(
                "range {start}+{} past the row group read at {}",
                to - from,
                self.start
            )));
        }
        Ok(self.data.slice(from..to))
    }
}

impl parquet::file::reader::Length for RowGroupBytes {
    fn len(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

impl parquet::file::reader::ChunkReader for RowGroupBytes {
    type T = bytes::buf::Reader<bytes::Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        Ok(self.slice(start, None)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.slice(start, Some(length))
    }
}

/// Which tables to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    /// `requests.csv`.
    pub csv: bool,
    /// `requests.parquet` (`batches.parquet` streams during the run: see
    /// [`Collector::stream_batches`]).
    pub parquet: bool,
}

/// Writes the request tables, the summary and the CDFs of a run into `dir` (created if
/// needed).
///
/// # Errors
/// Any file that cannot be written.
pub fn write_run(
    dir: &Path,
    c: &Collector,
    summary: &(impl serde::Serialize + Sync),
    tables: Tables,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("cdf")).map_err(write_err(dir))?;
    let mut reqs: Vec<&RequestRecord> = c.requests.iter().collect();
    reqs.sort_by_key(|r| r.request_id);
    let reqs = &reqs;
    let (outcomes, tbt) = (&c.outcomes, &c.tbt);
    // Three independent writers; at a million requests each takes seconds.
    let (a, (b, d)) = rayon::join(
        || -> Result<()> {
            if tables.csv {
                let p = dir.join("requests.csv");
                let mut w = csv::Writer::from_path(&p).map_err(write_err(&p))?;
                for r in reqs {
                    w.serialize(r).map_err(write_err(&p))?;
                }
                w.flush().map_err(write_err(&p))?;
            }
            // A disaggregated run's hand-offs: TTFT in parts, one row per request.
            if (tables.csv || tables.parquet) && !c.transfers.is_empty() {
                let p = dir.join("transfers.csv");
                let mut rows: Vec<_> = c.transfers.iter().collect();
                rows.sort_by_key(|r| r.request_id);
                let mut w = csv::Writer::from_path(&p).map_err(write_err(&p))?;
                for r in rows {
                    w.serialize(r).map_err(write_err(&p))?;
                }
                w.flush().map_err(write_err(&p))?;
            }
            Ok(())
        },
        || {
            rayon::join(
                || -> Result<()> {
                    if tables.parquet {
                        let p = dir.join("requests.parquet");
                        let mut s =
                            ParquetStream::create(&p, &request_columns(&[]), Compression::SNAPPY)?;
                        for chunk in reqs.chunks(GROUP_ROWS) {
                            s.write_group(&request_columns(chunk))?;
                        }
                        s.close()?;
                    }
                    Ok(())
                },
                || -> Result<()> {
                    let p = dir.join("summary.json");
                    let mut s = serde_json::to_string_pretty(summary).map_err(write_err(&p))?;
                    s.push('\n');
                    std::fs::write(&p, s).map_err(write_err(&p))?;
                    write_cdfs(&dir.join("cdf"), outcomes, tbt)
                },
            )
        },
    );
    a.and(b).and(d)
}

fn cdf_of(values: impl Iterator<Item = f64>) -> Vec<(f64, f64)> {
    let mut m = Multiset::default();
    for v in values {
        // Nanosecond resolution, exact for simulated times.
        m.add((v * 1e9).round() as u64);
    }
    m.quantiles(1001, 1e-9)
}

/// The values of a column that are present (not NaN).
fn present(col: &[f64]) -> impl Iterator<Item = f64> + '_ {
    col.iter().copied().filter(|x| !x.is_nan())
}

fn write_cdfs(dir: &Path, o: &Outcomes, tbt: &Multiset) -> Result<()> {
    let sets: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("ttft_s", cdf_of(present(&o.ttft))),
        ("tbt_s", tbt.quantiles(1001, 1e-9)),
        ("tpot_s", cdf_of(present(&o.tpot))),
        ("e2e_s", cdf_of(present(&o.e2e))),
        ("normalized_e2e_s", cdf_of(present(&o.normalized_e2e))),
        ("scheduling_delay_s", cdf_of(present(&o.scheduling_delay))),
    ];
    for (name, points) in sets {
        let p = dir.join(format!("{name}.csv"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(write_err(&p))?);
        writeln!(f, "quantile,{name}").map_err(write_err(&p))?;
        for (q, v) in points {
            writeln!(f, "{q},{v}").map_err(write_err(&p))?;
        }
        f.flush().map_err(write_err(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    #[test]
    fn batch_parts_concatenate_in_order() {
        use vajra_core::time::{Duration, Timestamp};
        let dir = std::env::temp_dir().join(format!("vajra-cat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = |step: u64| BatchRecord {
            replica: step as u32 % 3,
            step,
            start: Timestamp(step * 10),
            end: Timestamp(step * 10 + 5),
            busy: Duration(5),
            num_requests: 2,
            prefill_tokens: 7,
            decode_tokens: 1,
            preempted: 0,
            kv_blocks_used: 3,
            flops: 1.5,
            bytes: 2.5,
        };
        let mut parts = Vec::new();
        for p in 0..2u64 {
            let path = dir.join(format!("part{p}.parquet"));
            let mut sink = BatchSink::create(&path, 10).unwrap();
            for s in 0..(GROUP_ROWS as u64 + 3) {
                sink.push(rec(p * 1_000_000 + s));
            }
            sink.close().unwrap();
            parts.push(path);
        }
        let dest = dir.join("all.parquet");
        concat_batch_parts(&parts, &dest, 10).unwrap();
        assert!(!parts[0].exists(), "parts are removed");
        let r = SerializedFileReader::new(std::fs::File::open(&dest).unwrap()).unwrap();
        assert_eq!(
            r.metadata().file_metadata().num_rows(),
            2 * (GROUP_ROWS as i64 + 3)
        );
        let last = r
            .get_row_iter(None)
            .unwrap()
            .last()
            .unwrap()
            .unwrap()
            .to_string();
        assert!(
            last.contains(&format!("step: {}", 1_000_000 + GROUP_ROWS as u64 + 2)),
            "{last}"
        );
    }

    #[test]
    fn parquet_round_trips_row_count_and_nulls() {
        let dir = std::env::temp_dir().join(format!("vajra-pq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.parquet");
        write_parquet(
            &p,
            &[
                ("a", Column::I64(vec![1, 2, 3])),
                ("b", Column::OptF64(vec![Some(1.5), None, Some(2.5)])),
                ("c", Column::Str(vec!["x".into(), "y".into(), "z".into()])),
            ],
        )
        .unwrap();
        let r = SerializedFileReader::new(std::fs::File::open(&p).unwrap()).unwrap();
        assert_eq!(r.metadata().file_metadata().num_rows(), 3);
        let rows: Vec<String> = r
            .get_row_iter(None)
            .unwrap()
            .map(|row| row.unwrap().to_string())
            .collect();
        assert!(rows[1].contains("b: null"), "{rows:?}");
        assert!(rows[2].contains("2.5"), "{rows:?}");
    }
}
