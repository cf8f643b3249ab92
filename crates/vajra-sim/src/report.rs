//! `vajra-sim report`: runs side by side — a table of headline metrics with the best value per
//! column marked, and charts (PNG and SVG) — as a self-contained HTML page (SVGs inline) and a
//! Markdown summary.
//!
//! Charts: CDFs of TTFT, TBT, TPOT and E2E (one line per run, log-scaled latency); for sweeps
//! over `workload.arrival.qps`, p50/p99 TTFT and TBT, goodput and SLO attainment against load
//! (one line per configuration); KV usage and batch size over time and the batch-size and
//! tokens-per-batch distributions (from `batches.parquet`); busy fraction per replica. Text is
//! drawn with a vendored DejaVu Sans, so charts look the same on every machine.

use crate::error::{Result, SimError, write_err};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::get_typed_column_reader;
use parquet::data_type::{DataType, DoubleType, Int32Type};
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vajra_metrics::summary::{Summary, SummaryFile};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// One run folder loaded for the report.
#[derive(Debug, Clone)]
pub struct RunData {
    /// Label in legends and the table.
    pub label: String,
    /// The folder.
    pub dir: PathBuf,
    /// `summary.json`.
    pub summary: SummaryFile,
    /// `workload.arrival.qps` of its config, if any.
    pub qps: Option<f64>,
    /// Label without the `qps=` part (groups a load sweep into lines).
    pub series: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |e| SimError::Experiment {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Run folders under each argument: the folder itself if it holds `summary.json`, else its
/// sub-folders that do (a sweep root), in name order.
///
/// # Errors
/// An argument that is neither.
pub fn collect_runs(args: &[PathBuf]) -> Result<Vec<RunData>> {
    let mut runs = Vec::new();
    let multi = args.len() > 1;
    for a in args {
        let mut dirs = Vec::new();
        if a.join("summary.json").is_file() {
            dirs.push(a.clone());
        } else {
            let rd = std::fs::read_dir(a).map_err(io(a))?;
            let mut v: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("summary.json").is_file())
                .collect();
            v.sort();
            dirs.extend(v);
        }
        if dirs.is_empty() {
            return Err(SimError::Experiment {
                path: a.clone(),
                message:
                    "not a run folder (no summary.json) nor a sweep folder holding run folders"
                        .into(),
            });
        }
        for d in dirs {
            let p = d.join("summary.json");
            let summary: SummaryFile = serde_json::from_str(
                &std::fs::read_to_string(&p).map_err(io(&p))?,
            )
            .map_err(|e| SimError::Experiment {
                path: p.clone(),
                message: format!("not a summary.json: {e}"),
            })?;
            let point = summary.point.clone();
            let name = summary.name.clone();
            let base = if point.is_empty() {
                name.clone()
            } else {
                point.clone()
            };
            let label = if multi && !point.is_empty() {
                format!("{name}: {point}")
            } else {
                base
            };
            let qps = std::fs::read_to_string(d.join("config.resolved.toml"))
                .ok()
                .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
                .and_then(|v| v.get("workload")?.get("arrival")?.get("qps")?.as_float());
            let series = label
                .split(',')
                .filter(|part| !part.trim_start().starts_with("qps="))
                .collect::<Vec<_>>()
                .join(",");
            runs.push(RunData {
                label,
                dir: d,
                summary,
                qps,
                series: if series.is_empty() {
                    "all".into()
                } else {
                    series
                },
            });
        }
    }
    // Two runs of one experiment (e.g. a rerun into another folder) would share a label:
    // tell them apart by folder.
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for r in &mut runs {
        if labels.iter().filter(|l| **l == r.label).count() > 1 {
            let folder = r.dir.file_name().map_or_else(
                || r.dir.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            r.label = format!("{} ({folder})", r.label);
        }
    }
    Ok(runs)
}

/// A line chart.
pub(crate) struct Chart {
    pub(crate) file: &'static str,
    pub(crate) title: String,
    pub(crate) x: String,
    pub(crate) y: String,
    pub(crate) log_x: bool,
    pub(crate) log_y: bool,
    pub(crate) series: Vec<(String, Vec<(f64, f64)>)>,
    pub(crate) points: bool,
}

/// Twenty distinguishable colours (the ten of matplotlib's `tab10`, then their light
/// variants), one per configuration; past twenty they repeat, darkened.
const COLORS: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(199, 199, 199),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
];

fn color(i: usize) -> RGBColor {
    let RGBColor(r, g, b) = COLORS[i % COLORS.len()];
    // Each further round of the palette is darker.
    let k = 1.0 - 0.25 * (i / COLORS.len()).min(3) as f64;
    RGBColor(
        (f64::from(r) * k) as u8,
        (f64::from(g) * k) as u8,
        (f64::from(b) * k) as u8,
    )
}

/// A series' configuration and whether it is a tail percentile: `sarathi p99` is the
/// configuration `sarathi`, drawn dashed in `sarathi p50`'s colour.
fn config_of(name: &str) -> (&str, bool) {
    for (tag, dashed) in [(" p50", false), (" p90", true), (" p99", true)] {
        if let Some(c) = name.strip_suffix(tag) {
            return (c, dashed);
        }
    }
    (name, false)
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    c: &Chart,
) -> std::result::Result<(), String> {
    let tx = |v: f64| if c.log_x { v.log10() } else { v };
    let ty = |v: f64| if c.log_y { v.log10() } else { v };
    let data: Vec<(String, Vec<(f64, f64)>)> = c
        .series
        .iter()
        .map(|(n, pts)| {
            let v = pts
                .iter()
                .filter(|(x, y)| {
                    x.is_finite()
                        && y.is_finite()
                        && (!c.log_x || *x > 0.0)
                        && (!c.log_y || *y > 0.0)
                })
                .map(|&(x, y)| (tx(x), ty(y)))
                .collect();
            (n.clone(), v)
        })
        .collect();
    let all = data.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |a: f64, b: f64| {
        if (b - a).abs() < 1e-12 {
            (a - 0.5, b + 0.5)
        } else {
            (a - (b - a) * 0.03, b + (b - a) * 0.03)
        }
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = if c.log_y {
        pad(y0, y1)
    } else {
        pad(y0.min(0.0), y1)
    };
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    // The legend has a column of its own beside the plot, so it never covers data.
    let (plot_area, legend_area) = area.split_horizontally(area.dim_in_pixel().0 * 72 / 100);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&c.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let fmt = |log: bool| {
        move |v: &f64| {
            let x = if log { 10f64.powf(*v) } else { *v };
            if x != 0.0 && (x.abs() < 0.01 || x.abs() >= 100_000.0) {
                format!("{x:.1e}")
            } else if x.abs() < 1.0 {
                format!("{x:.3}")
            } else {
                format!("{x:.1}")
            }
        }
    };
    let fx = fmt(c.log_x);
    let fy = fmt(c.log_y);
    // Replicas are whole numbers: one tick each, no 1.5.
    let integer_x = c.x == "replica";
    let fxi = |v: &f64| {
        if (v - v.round()).abs() < 1e-9 {
            format!("{}", v.round() as i64)
        } else {
            String::new()
        }
    };
    let x_ticks = if integer_x {
        ((x1 - x0).round() as usize + 1).clamp(2, 33)
    } else {
        10
    };
    chart
        .configure_mesh()
        .x_labels(x_ticks)
        .x_desc(if c.log_x {
            format!("{} (log scale)", c.x)
        } else {
            c.x.clone()
        })
        .y_desc(if c.log_y {
            format!("{} (log scale)", c.y)
        } else {
            c.y.clone()
        })
        .x_label_formatter(if integer_x { &fxi } else { &fx })
        .y_label_formatter(&fy)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut configs: Vec<&str> = Vec::new();
    let mut legend: Vec<(&str, RGBColor, bool)> = Vec::new();
    for (name, pts) in &data {
        let (config, dashed) = config_of(name);
        let i = configs
            .iter()
            .position(|c| *c == config)
            .unwrap_or_else(|| {
                configs.push(config);
                configs.len() - 1
            });
        let color = color(i);
        let style = color.stroke_width(2);
        let drawn = if dashed {
            chart.draw_series(DashedLineSeries::new(pts.iter().copied(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(pts.iter().copied(), style))
        };
        drawn.map_err(|e| e.to_string())?;
        legend.push((name.as_str(), color, dashed));
        if c.points {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    draw_legend(&legend_area, &legend)?;
    area.present().map_err(|e| e.to_string())
}

/// One row per series in the column beside the plot: its line (dashed for tail percentiles) and
/// its name, shortened to fit; rows past the column's height are summarised in a last row.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[(&str, RGBColor, bool)],
) -> std::result::Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let (top, step) = (40i32, 18i32);
    let fits = ((h as i32 - top - 10) / step).max(1) as usize;
    let max_chars = (w as usize).saturating_sub(50) / 7;
    let shown = if rows.len() > fits {
        fits - 1
    } else {
        rows.len()
    };
    for (k, (name, color, dashed)) in rows.iter().take(shown).enumerate() {
        let y = top + step * k as i32;
        let style = color.stroke_width(2);
        let segments: &[(i32, i32)] = if *dashed {
            &[(8, 14), (19, 25)]
        } else {
            &[(8, 25)]
        };
        for &(a, b) in segments {
            area.draw(&PathElement::new(vec![(a, y), (b, y)], style))
                .map_err(|e| e.to_string())?;
        }
        // Shortened in the middle: the end (`qps=8`, `p99`) tells series apart.
        let chars: Vec<char> = name.chars().collect();
        let label: String = if chars.len() > max_chars {
            let tail = (max_chars / 3).max(4);
            let head = max_chars.saturating_sub(tail + 1);
            let (a, b) = (&chars[..head], &chars[chars.len() - tail..]);
            format!(
                "{}…{}",
                a.iter().collect::<String>(),
                b.iter().collect::<String>()
            )
        } else {
            (*name).to_owned()
        };
        area.draw(&Text::new(label, (32, y - 7), ("sans-serif", 13)))
            .map_err(|e| e.to_string())?;
    }
    if shown < rows.len() {
        let y = top + step * shown as i32;
        area.draw(&Text::new(
            format!("… and {} more", rows.len() - shown),
            (32, y - 7),
            ("sans-serif", 13),
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draws `c` as `dir/<file>.png` and `.svg`; returns the SVG text.
pub(crate) fn render(c: &Chart, dir: &Path) -> Result<String> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let png = dir.join(format!("{}.png", c.file));
    let svg = dir.join(format!("{}.svg", c.file));
    draw(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), c).map_err(write_err(&png))?;
    draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), c).map_err(write_err(&svg))?;
    std::fs::read_to_string(&svg).map_err(write_err(&svg))
}

fn read_cdf(dir: &Path, metric: &str) -> Vec<(f64, f64)> {
    let Ok(mut r) = csv::Reader::from_path(dir.join("cdf").join(format!("{metric}.csv"))) else {
        return Vec::new();
    };
    r.records()
        .flatten()
        .filter_map(|rec| Some((rec.get(1)?.parse().ok()?, rec.get(0)?.parse().ok()?)))
        .collect()
}

/// The columns of one `batches.parquet` row the charts use: (start_s, replica, num_requests,
/// num_tokens, kv_usage).
type BatchRow = (f64, i32, i32, i32, f64);

/// A labelled line.
type Series = (String, Vec<(f64, f64)>);

/// Reads the chart columns of `batches.parquet` (None when absent or unreadable).
fn read_batches(dir: &Path) -> Option<Vec<BatchRow>> {
    let f = std::fs::File::open(dir.join("batches.parquet")).ok()?;
    let r = SerializedFileReader::new(f).ok()?;
    let schema = r.metadata().file_metadata().schema_descr_ptr();
    // A column by name, if it has the physical type this reader expects.
    let idx = |n: &str, t: PhysicalType| {
        (0..schema.num_columns())
            .find(|&i| schema.column(i).name() == n && schema.column(i).physical_type() == t)
    };
    let (start, replica, size, tokens, kv) = (
        idx("start_s", PhysicalType::DOUBLE)?,
        idx("replica", PhysicalType::INT32)?,
        idx("num_requests", PhysicalType::INT32)?,
        idx("num_tokens", PhysicalType::INT32)?,
        idx("kv_usage", PhysicalType::DOUBLE)?,
    );
    let mut out = Vec::new();
    for g in 0..r.num_row_groups() {
        let rg = r.get_row_group(g).ok()?;
        let n = rg.metadata().num_rows() as usize;
        let t = read_column::<DoubleType>(rg.as_ref(), start, n)?;
        let rep = read_column::<Int32Type>(rg.as_ref(), replica, n)?;
        let sz = read_column::<Int32Type>(rg.as_ref(), size, n)?;
        let tok = read_column::<Int32Type>(rg.as_ref(), tokens, n)?;
        let u = read_column::<DoubleType>(rg.as_ref(), kv, n)?;
        let m = [t.len(), rep.len(), sz.len(), tok.len(), u.len()]
            .into_iter()
            .min()
            .unwrap_or(0);
        out.extend((0..m).map(|i| (t[i], rep[i], sz[i], tok[i], u[i])));
    }
    Some(out)
}

/// Every value of a required column of one row group (the caller checked its type).
fn read_column<T: DataType>(rg: &dyn RowGroupReader, col: usize, n: usize) -> Option<Vec<T::T>> {
    let mut cr = get_typed_column_reader::<T>(rg.get_column_reader(col).ok()?);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let (k, _, _) = cr.read_records(n - v.len(), None, None, &mut v).ok()?;
        if k == 0 {
            break;
        }
    }
    Some(v)
}

/// Mean of `value` over batches in `buckets` equal time bins, as (bin middle, mean).
fn over_time(rows: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    let (t0, t1) = rows
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(t, _)| {
            (a.min(t), b.max(t))
        });
    if !t0.is_finite() || t1 <= t0 {
        return rows.to_vec();
    }
    let w = (t1 - t0) / buckets as f64;
    let mut sum = vec![0.0; buckets];
    let mut n = vec![0u64; buckets];
    for &(t, v) in rows {
        let b = (((t - t0) / w) as usize).min(buckets - 1);
        sum[b] += v;
        n[b] += 1;
    }
    (0..buckets)
        .filter(|&b| n[b] > 0)
        .map(|b| (t0 + (b as f64 + 0.5) * w, sum[b] / n[b] as f64))
        .collect()
}

fn cdf_points(mut v: Vec<f64>) -> Vec<(f64, f64)> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    (0..=200)
        .map(|i| {
            let q = i as f64 / 200.0;
            (v[((q * (n - 1) as f64).round()) as usize], q)
        })
        .collect()
}

/// Reads one number of a summary.
type Get = fn(&Summary) -> f64;

/// A summary number as a table or chart value: NaN (written as `null`, e.g. the MFU of a run
/// without FLOP counts) is no value.
fn value(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

/// Headline columns: (header, the number, lower is better).
const COLUMNS: [(&str, Get, Option<bool>); 21] = [
    ("TTFT p50 (s)", |s| s.latency_s.ttft.p50, Some(true)),
    ("TTFT p90 (s)", |s| s.latency_s.ttft.p90, Some(true)),
    ("TTFT p99 (s)", |s| s.latency_s.ttft.p99, Some(true)),
    ("TBT p50 (s)", |s| s.latency_s.tbt.p50, Some(true)),
    ("TBT p90 (s)", |s| s.latency_s.tbt.p90, Some(true)),
    ("TBT p99 (s)", |s| s.latency_s.tbt.p99, Some(true)),
    ("TPOT p50 (s)", |s| s.latency_s.tpot.p50, Some(true)),
    ("TPOT p90 (s)", |s| s.latency_s.tpot.p90, Some(true)),
    ("TPOT p99 (s)", |s| s.latency_s.tpot.p99, Some(true)),
    ("E2E p50 (s)", |s| s.latency_s.e2e.p50, Some(true)),
    ("E2E p90 (s)", |s| s.latency_s.e2e.p90, Some(true)),
    ("E2E p99 (s)", |s| s.latency_s.e2e.p99, Some(true)),
    ("req/s", |s| s.throughput.requests_per_s, Some(false)),
    (
        "out tok/s",
        |s| s.throughput.output_tokens_per_s,
        Some(false),
    ),
    ("goodput (req/s)", |s| s.slo.goodput_rps, Some(false)),
    ("SLO attainment", |s| s.slo.attainment, Some(false)),
    ("preemptions", |s| s.preemptions as f64, Some(true)),
    ("prefix hit rate", |s| s.prefix_cache_hit_rate, Some(false)),
    ("KV usage (mean)", |s| s.kv_usage_mean, None),
    ("MFU", |s| s.mfu, Some(false)),
    ("MBU", |s| s.mbu, None),
];

fn fmt(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `report.html`, `report.md` and `plots/*.{png,svg}` into `out`. Returns the paths of
/// the images written.
///
/// # Errors
/// No runs, or a file that cannot be written.
pub fn write_report(runs: &[RunData], out: &Path) -> Result<Vec<PathBuf>> {
    if runs.is_empty() {
        return Err(SimError::invalid(
            "report",
            "(no runs)",
            "at least one run folder",
        ));
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots).map_err(io(&plots))?;
    let mut charts: Vec<Chart> = Vec::new();
    for (metric, file, title) in [
        ("ttft_s", "cdf_ttft", "Time to first token"),
        ("tbt_s", "cdf_tbt", "Time between tokens (pooled gaps)"),
        ("tpot_s", "cdf_tpot", "Time per output token"),
        ("e2e_s", "cdf_e2e", "End-to-end latency"),
    ] {
        charts.push(Chart {
            file,
            title: format!("{title}: CDF"),
            x: "latency (s)".into(),
            y: "fraction of samples".into(),
            log_x: true,
            log_y: false,
            series: runs
                .iter()
                .map(|r| (r.label.clone(), read_cdf(&r.dir, metric)))
                .collect(),
            points: false,
        });
    }
    // Load curves when a rate is swept.
    let mut qs: Vec<f64> = runs.iter().filter_map(|r| r.qps).collect();
    qs.sort_by(f64::total_cmp);
    qs.dedup();
    if qs.len() >= 2 {
        let mut series: Vec<String> = runs.iter().map(|r| r.series.clone()).collect();
        series.dedup();
        series.sort();
        series.dedup();
        let line = |get: Get, tag: &str| -> Vec<(String, Vec<(f64, f64)>)> {
            series
                .iter()
                .map(|s| {
                    let mut pts: Vec<(f64, f64)> = runs
                        .iter()
                        .filter(|r| &r.series == s)
                        .filter_map(|r| Some((r.qps?, value(get(&r.summary.metrics))?)))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (format!("{s} {tag}"), pts)
                })
                .collect()
        };
        for (file, title, p50, p99) in [
            (
                "load_ttft",
                "TTFT against load",
                (|s: &Summary| s.latency_s.ttft.p50) as Get,
                (|s: &Summary| s.latency_s.ttft.p99) as Get,
            ),
            (
                "load_tbt",
                "TBT against load",
                |s: &Summary| s.latency_s.tbt.p50,
                |s: &Summary| s.latency_s.tbt.p99,
            ),
        ] {
            let mut s = line(p50, "p50");
            s.extend(line(p99, "p99"));
            charts.push(Chart {
                file,
                title: title.into(),
                x: "offered load (requests/s)".into(),
                y: "latency (s)".into(),
                log_x: false,
                log_y: true,
                series: s,
                points: true,
            });
        }
        charts.push(Chart {
            file: "load_goodput",
            title: "Goodput against load".into(),
            x: "offered load (requests/s)".into(),
            y: "goodput (requests/s meeting every SLO)".into(),
            log_x: false,
            log_y: false,
            series: line(|s| s.slo.goodput_rps, ""),
            points: true,
        });
        charts.push(Chart {
            file: "load_slo_attainment",
            title: "SLO attainment against load".into(),
            x: "offered load (requests/s)".into(),
            y: "fraction of requests meeting every SLO".into(),
            log_x: false,
            log_y: false,
            series: line(|s| s.slo.attainment, ""),
            points: true,
        });
    }
    // From batches.parquet.
    let batches: Vec<(String, Vec<BatchRow>)> = runs
        .iter()
        .filter_map(|r| Some((r.label.clone(), read_batches(&r.dir)?)))
        .collect();
    if !batches.is_empty() {
        let series = |f: &dyn Fn(&BatchRow) -> f64| -> Vec<Series> {
            batches
                .iter()
                .map(|(l, rows)| {
                    let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.0, f(r))).collect();
                    (l.clone(), over_time(&pts, 300))
                })
                .collect()
        };
        charts.push(Chart {
            file: "time_kv_usage",
            title: "KV-cache usage over time (mean over replicas' batches)".into(),
            x: "time since the first arrival (s)".into(),
            y: "fraction of KV blocks in use".into(),
            log_x: false,
            log_y: false,
            series: series(&|r| r.4),
            points: false,
        });
        charts.push(Chart {
            file: "time_batch_size",
            title: "Batch size over time".into(),
            x: "time since the first arrival (s)".into(),
            y: "requests per batch".into(),
            log_x: false,
            log_y: false,
            series: series(&|r| f64::from(r.2)),
            points: false,
        });
        for (file, title, x, pick) in [
            (
                "dist_batch_size",
                "Batch size distribution",
                "requests per batch",
                2usize,
            ),
            (
                "dist_batch_tokens",
                "Tokens per batch distribution",
                "tokens per batch",
                3usize,
            ),
        ] {
            charts.push(Chart {
                file,
                title: format!("{title} (CDF)"),
                x: x.into(),
                y: "fraction of batches".into(),
                log_x: false,
                log_y: false,
                series: batches
                    .iter()
                    .map(|(l, rows)| {
                        let v: Vec<f64> = rows
                            .iter()
                            .map(|r| f64::from(if pick == 2 { r.2 } else { r.3 }))
                            .collect();
                        (l.clone(), cdf_points(v))
                    })
                    .collect(),
                points: false,
            });
        }
    }
    if runs.iter().any(|r| r.summary.metrics.replicas.len() > 1) {
        charts.push(Chart {
            file: "replica_busy",
            title: "Per-replica load".into(),
            x: "replica".into(),
            y: "busy fraction (stage busy time / run span)".into(),
            log_x: false,
            log_y: false,
            series: runs
                .iter()
                .map(|r| {
                    let pts = r
                        .summary
                        .metrics
                        .replicas
                        .iter()
                        .filter_map(|x| Some((f64::from(x.replica), value(x.busy_fraction)?)))
                        .collect();
                    (r.label.clone(), pts)
                })
                .collect(),
            points: true,
        });
    }
    let disagg: Vec<&RunData> = runs
        .iter()
        .filter(|r| r.summary.metrics.disaggregation.is_some())
        .collect();
    if !disagg.is_empty() {
        charts.push(Chart {
            file: "ttft_parts",
            title:
                "TTFT in parts: 1 prefill queue, 2 prefill, 3 hand-off wait, 4 KV transfer (mean)"
                    .into(),
            x: "part".into(),
            y: "mean seconds".into(),
            log_x: false,
            log_y: false,
            series: disagg
                .iter()
                .map(|r| {
                    let d = r.summary.metrics.disaggregation.as_ref().expect("filtered");
                    let parts = [
                        d.prefill_queue.mean,
                        d.prefill.mean,
                        d.handoff_wait.mean,
                        d.kv_transfer.mean,
                    ];
                    let pts = parts
                        .iter()
                        .enumerate()
                        .filter_map(|(i, &v)| Some((i as f64 + 1.0, value(v)?)))
                        .collect();
                    (r.label.clone(), pts)
                })
                .collect(),
            points: true,
        });
    }
    // Table.
    let values: Vec<Vec<Option<f64>>> = runs
        .iter()
        .map(|r| {
            COLUMNS
                .iter()
                .map(|(_, get, _)| value(get(&r.summary.metrics)))
                .collect()
        })
        .collect();
    let best: Vec<Option<f64>> = (0..COLUMNS.len())
        .map(|c| {
            let lower = COLUMNS[c].2?;
            let vs = values.iter().filter_map(|row| row[c]);
            if lower {
                vs.min_by(f64::total_cmp)
            } else {
                vs.max_by(f64::total_cmp)
            }
        })
        .collect();
    let mut md = String::from("# Vajra report\n\n");
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Vajra report</title>\n<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 6px;text-align:right}th:first-child,td:first-child{text-align:left}td.best{font-weight:bold;background:#e6f4ea}.chart{margin:18px 0}</style></head><body>\n<h1>Vajra report</h1>\n",
    );
    let _ = writeln!(
        md,
        "{} run(s). Best value per column in **bold** (lower is better for latencies and preemptions, higher for throughput, goodput, attainment, hit rate and MFU).\n",
        runs.len()
    );
    let _ = writeln!(
        html,
        "<p>{} run(s). Best value per column highlighted (lower is better for latencies and preemptions, higher for throughput, goodput, attainment, hit rate and MFU).</p>\n<table><tr><th>run</th>",
        runs.len()
    );
    let _ = write!(md, "| run |");
    for (h, _, _) in COLUMNS {
        let _ = write!(md, " {h} |");
        let _ = write!(html, "<th>{}</th>", esc(h));
    }
    let _ = writeln!(md, "\n|---|{}", "---:|".repeat(COLUMNS.len()));
    html.push_str("</tr>\n");
    for (r, row) in runs.iter().zip(&values) {
        let _ = write!(md, "| {} |", r.label);
        let _ = write!(html, "<tr><td>{}</td>", esc(&r.label));
        for (c, v) in row.iter().enumerate() {
            let is_best = v.is_some() && best[c] == *v && runs.len() > 1;
            // Not known for this run (a benchmarked server's KV pool and peak FLOP/s, say).
            let s = v.map_or_else(|| "n/a".to_owned(), fmt);
            if is_best {
                let _ = write!(md, " **{s}** |");
                let _ = write!(html, "<td class=\"best\">{s}</td>");
            } else {
                let _ = write!(md, " {s} |");
                let _ = write!(html, "<td>{s}</td>");
            }
        }
        md.push('\n');
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    md.push('\n');
    class_table(runs, &mut md, &mut html);
    pool_table(runs, &mut md, &mut html);
    let mut images = Vec::new();
    for c in &charts {
        let svg = render(c, &plots)?;
        images.push(plots.join(format!("{}.png", c.file)));
        images.push(plots.join(format!("{}.svg", c.file)));
        let _ = writeln!(
            md,
            "## {}\n\n![{}](plots/{}.png)\n",
            c.title, c.title, c.file
        );
        let svg_body = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
        let _ = writeln!(
            html,
            "<div class=\"chart\"><h2>{}</h2>{}<p><a href=\"plots/{}.png\">PNG</a> · <a href=\"plots/{}.svg\">SVG</a></p></div>",
            esc(&c.title),
            svg_body,
            c.file,
            c.file
        );
    }
    html.push_str("</body></html>\n");
    let p = out.join("report.md");
    std::fs::write(&p, md).map_err(io(&p))?;
    let p = out.join("report.html");
    std::fs::write(&p, html).map_err(io(&p))?;
    Ok(images)
}

/// Per SLO class (runs that define `[[slo.classes]]`): each class against its own targets.
fn class_table(runs: &[RunData], md: &mut String, html: &mut String) {
    if runs.iter().all(|r| r.summary.metrics.classes.is_empty()) {
        return;
    }
    const HEAD: [&str; 9] = [
        "run",
        "class",
        "completed",
        "rejected",
        "attainment",
        "goodput (req/s)",
        "TTFT p50 (s)",
        "TTFT p99 (s)",
        "TPOT p50 (s)",
    ];
    let mut rows = Vec::new();
    for r in runs {
        for c in &r.summary.metrics.classes {
            rows.push(vec![
                r.label.clone(),
                c.name.clone(),
                c.completed.to_string(),
                c.rejected.to_string(),
                fmt(c.attainment),
                fmt(c.goodput_rps),
                fmt(c.ttft.p50),
                fmt(c.ttft.p99),
                fmt(c.tpot.p50),
            ]);
        }
    }
    table("SLO classes", &HEAD, &rows, md, html);
}

/// Per pool of a disaggregated run: its load, and TTFT in parts.
fn pool_table(runs: &[RunData], md: &mut String, html: &mut String) {
    if runs.iter().all(|r| r.summary.metrics.pools.is_empty()) {
        return;
    }
    const HEAD: [&str; 7] = [
        "run",
        "pool",
        "replicas",
        "devices",
        "busy fraction",
        "KV usage mean",
        "KV usage max",
    ];
    let mut rows = Vec::new();
    for r in runs {
        for p in &r.summary.metrics.pools {
            rows.push(vec![
                r.label.clone(),
                p.role.clone(),
                p.num_replicas.to_string(),
                p.num_devices.to_string(),
                fmt(p.busy_fraction),
                fmt(p.kv_usage_mean),
                fmt(p.kv_usage_max),
            ]);
        }
    }
    table("Pools", &HEAD, &rows, md, html);
    const PARTS: [&str; 8] = [
        "run",
        "prefill queue mean / p99 (s)",
        "prefill mean / p99 (s)",
        "hand-off wait mean / p99 (s)",
        "KV transfer mean / p99 (s)",
        "decode queue mean / p99 (s)",
        "TTFT mean (s)",
        "KV sent (GB)",
    ];
    let both = |d: &vajra_metrics::stats::Distribution| format!("{} / {}", fmt(d.mean), fmt(d.p99));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .filter_map(|r| {
            let d = r.summary.metrics.disaggregation.as_ref()?;
            Some(vec![
                r.label.clone(),
                both(&d.prefill_queue),
                both(&d.prefill),
                both(&d.handoff_wait),
                both(&d.kv_transfer),
                both(&d.decode_queue),
                fmt(r.summary.metrics.latency_s.ttft.mean),
                fmt(d.kv_bytes / 1e9),
            ])
        })
        .collect();
    table(
        "TTFT in parts (disaggregated runs)",
        &PARTS,
        &rows,
        md,
        html,
    );
}

/// A titled table in both documents.
fn table(title: &str, head: &[&str], rows: &[Vec<String>], md: &mut String, html: &mut String) {
    let _ = writeln!(md, "## {title}\n\n| {} |", head.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(head.len() - 1));
    let _ = write!(html, "<h2>{}</h2>\n<table><tr>", esc(title));
    for h in head {
        let _ = write!(html, "<th>{}</th>", esc(h));
    }
    html.push_str("</tr>\n");
    for cells in rows {
        let _ = writeln!(md, "| {} |", cells.join(" | "));
        html.push_str("<tr>");
        for cell in cells {
            let _ = write!(html, "<td>{}</td>", esc(cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    md.push('\n');
}
