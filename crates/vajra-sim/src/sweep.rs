//! Running every point of an experiment file, in parallel, and the sweep summary table.

use crate::error::{Result, SimError, write_err};
use crate::run::{PointResult, run_point};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use vajra_experiment::experiment::ExperimentFile;

/// How to run a file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output root (default: the experiment's `output.dir`, else `runs/<name>`).
    pub out: Option<PathBuf>,
    /// Worker threads for sweep points (0: one per core).
    pub jobs: usize,
    /// Write Chrome traces (when the experiment asks for them).
    pub trace: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// One event loop per point, even where replicas could be partitioned across threads.
    pub sequential: bool,
    /// Replace the output root if it holds an earlier run (else a non-empty root is an error).
    pub overwrite: bool,
}

/// The most worker threads `--jobs` takes.
pub const MAX_JOBS: usize = 1024;

/// Sweeps of more points than this get a warning before they start.
const LARGE_SWEEP: usize = 10_000;

/// The files and folders whose presence marks a folder as a vajra run (or sweep, or capacity)
/// folder, which `--overwrite` may clear.
const RUN_MARKERS: &[&str] = &[
    "summary.json",
    "sweep.csv",
    "config.resolved.toml",
    "capacity.json",
    "requests.csv",
];

/// Makes `root` the run's own: absent or empty, it is used as it is; holding an earlier run, it
/// is cleared with `overwrite` and refused without, so two runs never mix in one folder (a
/// report of it would chart the old batches under the new name).
///
/// # Errors
/// A non-empty folder without `overwrite`, a non-empty folder that is not a run folder (never
/// deleted), or a folder that cannot be read or cleared.
pub fn claim_root(root: &Path, overwrite: bool) -> Result<()> {
    let entries: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(SimError::invalid(
                "-o",
                root.display(),
                "a folder (this is a file)",
            ));
        }
        Err(e) => return Err(write_err(root)(e)),
    };
    if entries.is_empty() {
        return Ok(());
    }
    let is_run = |d: &Path| RUN_MARKERS.iter().any(|m| d.join(m).exists());
    let run_folder = is_run(root) || entries.iter().any(|p| p.is_dir() && is_run(p));
    if !overwrite {
        return Err(SimError::invalid(
            "-o",
            root.display(),
            if run_folder {
                "an empty or new folder: this one holds an earlier run (pass --overwrite to replace it)"
            } else {
                "an empty or new folder: this one is not empty"
            },
        ));
    }
    if !run_folder {
        return Err(SimError::invalid(
            "-o",
            root.display(),
            "a run folder to overwrite: this one holds files that are not a vajra run, so --overwrite leaves it alone",
        ));
    }
    std::fs::remove_dir_all(root).map_err(write_err(root))
}

/// The output root of a file.
pub fn out_root(file: &ExperimentFile, opts: &RunOptions) -> PathBuf {
    opts.out.clone().unwrap_or_else(|| {
        let e = &file.points[0].experiment;
        e.output
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&e.name))
    })
}

/// Runs every point; a sweep also gets `sweep.csv` and `sweep.md` in the root. Points are
/// returned in file order.
///
/// # Errors
/// The first point that fails (naming it), or a summary that cannot be written.
pub fn run_file(file: &ExperimentFile, opts: &RunOptions) -> Result<Vec<PointResult>> {
    let root = out_root(file, opts);
    claim_root(&root, opts.overwrite)?;
    let total: Option<u64> = file
        .points
        .iter()
        .map(|p| p.experiment.workload.num_requests)
        .sum();
    let bar = if opts.progress {
        // A trace replay without num_requests has as many requests as rows, which are only
        // counted when it is read: no total then, rather than `n/0`.
        let (b, template) = match total {
            Some(t) => (
                ProgressBar::new(t),
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} requests ({per_sec}) {msg}",
            ),
            None => (
                ProgressBar::no_length(),
                "{spinner} [{elapsed_precise}] {pos} requests ({per_sec}) {msg}",
            ),
        };
        b.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_message(format!("{} point(s)", file.points.len()));
        b
    } else {
        ProgressBar::hidden()
    };
    if opts.jobs > MAX_JOBS {
        return Err(SimError::invalid(
            "--jobs",
            opts.jobs,
            format!("0 (one per core) to {MAX_JOBS}"),
        ));
    }
    if file.points.len() > LARGE_SWEEP {
        eprintln!(
            "warning: {} points: each writes a folder under {}; a sweep this large takes long and much disk (split the file to run it in parts)",
            file.points.len(),
            root.display()
        );
    }
    // More threads than points only cost memory.
    let jobs = if opts.jobs == 0 {
        0
    } else {
        opts.jobs.min(file.points.len().max(1))
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .build()
        .map_err(|e| SimError::invalid("--jobs", opts.jobs, e.to_string()))?;
    let results: Vec<Result<PointResult>> = pool.install(|| {
        file.points
            .par_iter()
            .map(|p| {
                let dir = if file.is_sweep {
                    root.join(&p.folder)
                } else {
                    root.clone()
                };
                let seen = AtomicU64::new(0);
                let cb = |delta: u64| {
                    seen.fetch_add(delta, Ordering::Relaxed);
                    bar.inc(delta);
                };
                let r = run_point(file, p, &dir, opts.trace, opts.sequential, Some(&cb));
                if let Ok(ok) = &r {
                    let done = ok.summary.metrics.requests_completed;
                    bar.inc(done.saturating_sub(seen.load(Ordering::Relaxed)));
                }
                r.map_err(|e| match file.is_sweep {
                    true => SimError::Experiment {
                        path: file.path.clone(),
                        message: format!("sweep point {}: {e}", p.label),
                    },
                    false => e,
                })
            })
            .collect()
    });
    bar.finish_and_clear();
    let results: Vec<PointResult> = results.into_iter().collect::<Result<_>>()?;
    if file.is_sweep {
        write_sweep_tables(&root, &results)?;
    }
    Ok(results)
}

/// Headline columns of a point: (name, value).
pub fn headline(r: &PointResult) -> Vec<(&'static str, f64)> {
    let m = &r.summary.metrics;
    let l = &m.latency_s;
    let kv = if m.replicas.is_empty() {
        0.0
    } else {
        m.replicas.iter().map(|x| x.kv_usage_mean).sum::<f64>() / m.replicas.len() as f64
    };
    vec![
        ("completed", m.requests_completed as f64),
        ("req_per_s", m.throughput.requests_per_s),
        ("out_tok_per_s", m.throughput.output_tokens_per_s),
        ("ttft_p50_s", l.ttft.p50),
        ("ttft_p99_s", l.ttft.p99),
        ("tbt_p50_s", l.tbt.p50),
        ("tbt_p99_s", l.tbt.p99),
        ("tpot_p50_s", l.tpot.p50),
        ("tpot_p99_s", l.tpot.p99),
        ("e2e_p50_s", l.e2e.p50),
        ("e2e_p99_s", l.e2e.p99),
        ("sched_delay_p50_s", l.scheduling_delay.p50),
        ("goodput_rps", m.slo.goodput_rps),
        ("slo_attainment", m.slo.attainment),
        ("preemptions", m.preemptions as f64),
        ("prefix_hit_rate", m.prefix_cache_hit_rate),
        ("kv_usage_mean", kv),
        ("mfu", m.mfu),
        ("batches", m.batches.count as f64),
    ]
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// The columns of the short table printed after a run.
pub const SHORT: [&str; 12] = [
    "completed",
    "req_per_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "tbt_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p50_s",
    "goodput_rps",
    "preemptions",
    "mfu",
];

/// A Markdown table of the points' headline metrics (every column, or only `only`).
pub fn markdown_table(results: &[PointResult], only: Option<&[&str]>) -> String {
    let mut s = String::new();
    let Some(first) = results.first() else {
        return s;
    };
    let keep = |n: &str| only.is_none_or(|o| o.contains(&n));
    let cols: Vec<&str> = headline(first)
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| keep(n))
        .collect();
    let rows: Vec<(String, Vec<String>)> = results
        .iter()
        .map(|r| {
            let label = if r.label.is_empty() {
                r.summary.name.clone()
            } else {
                r.label.clone()
            };
            let vals = headline(r)
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(_, v)| fmt_num(*v))
                .collect();
            (label, vals)
        })
        .collect();
    // Aligned columns: the table reads in a terminal as well as rendered.
    let label_w = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .chain(std::iter::once("point".len()))
        .max()
        .unwrap_or(5);
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|(_, v)| v[i].len())
                .chain(std::iter::once(c.len()))
                .max()
                .unwrap_or(c.len())
        })
        .collect();
    let line = |first: &str, cells: &mut dyn Iterator<Item = String>| {
        let mut l = format!("| {first:<label_w$} |");
        for (c, w) in cells.zip(&widths) {
            let _ = write!(l, " {c:>w$} |");
        }
        l
    };
    let _ = writeln!(
        s,
        "{}",
        line("point", &mut cols.iter().map(|c| (*c).to_owned()))
    );
    let _ = writeln!(
        s,
        "|{}|{}",
        "-".repeat(label_w + 2),
        widths
            .iter()
            .map(|w| format!("{}:|", "-".repeat(w + 1)))
            .collect::<String>()
    );
    for (label, vals) in rows {
        let _ = writeln!(s, "{}", line(&label, &mut vals.into_iter()));
    }
    s
}

fn write_sweep_tables(root: &Path, results: &[PointResult]) -> Result<()> {
    std::fs::create_dir_all(root).map_err(write_err(root))?;
    let p = root.join("sweep.csv");
    let mut w = csv::Writer::from_path(&p).map_err(write_err(&p))?;
    let keys: Vec<String> = results
        .first()
        .map(|r| r.overrides.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let mut header = vec!["point".to_owned(), "folder".to_owned()];
    header.extend(keys.iter().cloned());
    if let Some(r) = results.first() {
        header.extend(headline(r).iter().map(|(n, _)| (*n).to_owned()));
    }
    w.write_record(&header).map_err(write_err(&p))?;
    for r in results {
        let mut row = vec![
            r.label.clone(),
            r.dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ];
        row.extend(r.overrides.iter().map(|(_, v)| v.clone()));
        row.extend(headline(r).iter().map(|(_, v)| v.to_string()));
        w.write_record(&row).map_err(write_err(&p))?;
    }
    w.flush().map_err(write_err(&p))?;
    let p = root.join("sweep.md");
    std::fs::write(&p, markdown_table(results, None)).map_err(write_err(&p))
}
