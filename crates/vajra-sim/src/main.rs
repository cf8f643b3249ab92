//! `vajra-sim`: run, validate and inspect simulated LLM-serving experiments.

#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vajra_experiment::catalog;
use vajra_experiment::experiment::ExperimentFile;
use vajra_sim::profiles;
use vajra_sim::sweep::{RunOptions, SHORT, markdown_table, out_root, run_file};

#[derive(Parser)]
#[command(
    name = "vajra-sim",
    version,
    about = "Discrete-event simulator of LLM serving on the shared Vajra scheduler"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an experiment file (every point of its sweep, in parallel) and write run folders.
    Run {
        /// The experiment TOML.
        file: PathBuf,
        /// Output folder (default: output.dir of the file, else runs/<name>).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Worker threads for sweep points (default: one per core).
        #[arg(short, long, default_value_t = 0)]
        jobs: usize,
        /// Skip trace.json even if the experiment asks for it.
        #[arg(long)]
        no_trace: bool,
        /// No progress bar and no table on stdout.
        #[arg(short, long)]
        quiet: bool,
        /// Replace the output folder if it holds an earlier run (without it, a non-empty
        /// folder is an error).
        #[arg(long)]
        overwrite: bool,
        /// One event loop per point (no replica partitions across threads).
        #[arg(long)]
        sequential: bool,
    },
    /// The highest request rate each point sustains under its run-level SLOs (`[slo]`
    /// p99_ttft_s, p99_tbt_s, p50_scheduling_delay_s, max_deadline_miss_rate), probes in
    /// parallel in-process; writes capacity.{md,csv,json}.
    Capacity {
        /// The experiment TOML.
        file: PathBuf,
        /// Output folder (default: output.dir of the file, else runs/<name>).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Worker threads (default: one per core).
        #[arg(short, long, default_value_t = 0)]
        jobs: usize,
        /// Replace the output folder if it holds an earlier run.
        #[arg(long)]
        overwrite: bool,
        /// Search every split of this many replicas into the prefill and decode pools of the
        /// points that set cluster.pools (1P(N-1)D ... (N-1)P1D), beside the other points.
        #[arg(long, value_name = "N")]
        pd_split: Option<u32>,
    },
    /// Compare runs: a self-contained HTML report, a Markdown summary and PNG/SVG charts.
    Report {
        /// Run folders or sweep folders (e.g. runs/quickstart).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output folder (default: <first run folder>/report).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Fidelity of a simulated run against a measured one (`vajra-engine bench`): a table of
    /// latency percentiles, throughput and batches with relative errors, and the report of both
    /// runs (overlaid CDFs). The measured side may also be a real vLLM run's folder (its
    /// `requests.jsonl`, as LLMServingSim's bench writes it): TTFT, TPOT and latency mean, p50,
    /// p90, p95 and p99 against vLLM, beside LLMServingSim's own prediction when its
    /// `validation/summary.txt` is there (written to <simulated>/fidelity).
    Compare {
        /// The simulated run folder.
        simulated: PathBuf,
        /// The measured run folder.
        measured: PathBuf,
        /// Output folder (default: <measured>/fidelity).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// The server's step log (`vajra-engine serve --steps-log`): every logged batch is
        /// priced with the simulated run's predictor, separating the predictor's error from the
        /// scheduling dynamics (rows after the run's, and `steps.csv`).
        #[arg(long)]
        steps: Option<PathBuf>,
    },
    /// Check an experiment file without running it.
    Validate {
        /// The experiment TOML.
        file: PathBuf,
    },
    /// List built-in models and devices, and the registered batching policies, waiting-queue
    /// orders and routers with their parameters' defaults.
    List,
    /// Operator profiles.
    Profile {
        #[command(subcommand)]
        cmd: ProfileCmd,
    },
    /// Workload traces.
    Trace {
        #[command(subcommand)]
        cmd: TraceCmd,
    },
    /// Step-time replay: simulate an engine run (`vajra-engine serve --run-dir`,
    /// `--steps-log`) with each step taking the time the engine's took, and check that the
    /// shared scheduler made the same batches; reports the first step where they differ and
    /// why. Exits 1 on a divergence.
    Twin {
        /// The engine's run folder (requests.csv).
        run_dir: PathBuf,
        /// The engine's step log.
        #[arg(long)]
        steps: PathBuf,
        /// The experiment the engine served (`serve --experiment`).
        #[arg(long)]
        experiment: PathBuf,
        /// The engine's KV blocks (default: the experiment's cache.num_blocks).
        #[arg(long)]
        num_blocks: Option<u32>,
        /// Where the replayed experiment and its trace go (default: <run_dir>/twin).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Experiments from other tools' runs.
    Import {
        #[command(subcommand)]
        cmd: ImportCmd,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// An experiment replaying a real vLLM run (LLMServingSim's bench folder: requests.jsonl
    /// and meta.json, alone or under vllm/): arrivals, lengths, prompt token ids, engine
    /// settings, device and profile bundle.
    Vllm {
        /// The run folder.
        run: PathBuf,
        /// The experiment TOML to write.
        #[arg(short, long)]
        out: PathBuf,
        /// The profile (default: profiler/perf/<GPU>/<model>/<dtype>/ found above the run).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The workload JSONL with input_tok_ids (default: meta.json's dataset_path).
        #[arg(long)]
        workload: Option<PathBuf>,
        /// The device (default: meta.json's hardware.device_name or a folder name).
        #[arg(long)]
        device: Option<String>,
        /// The model's Hugging Face config.json (for a model that is not built in).
        #[arg(long)]
        model_config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Write a roofline-generated profile (mlp.csv, attention.csv, provenance.json).
    Generate {
        /// Device (h100, h200, a100).
        #[arg(long)]
        device: String,
        /// Built-in model name.
        #[arg(long)]
        model: String,
        /// Output folder (default: profiles/generated/<device>/<model>).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// The roofline's error (MAPE) against every measured mlp.csv under a folder.
    Error {
        /// Folder searched for <device>/<org>/<model>/mlp.csv files.
        measured: PathBuf,
    },
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Generate a trace (Vidur CSV: arrived_at, num_prefill_tokens, num_decode_tokens) from a
    /// `[workload]` TOML.
    Generate {
        /// TOML holding a workload table (the keys of an experiment's [workload]).
        #[arg(long)]
        workload: PathBuf,
        /// Root seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output CSV.
        #[arg(short, long)]
        out: PathBuf,
    },
}

// No global allocator of our own: the system allocator was as fast as mimalloc here and held
// less than half its peak memory, which kept freed pages committed (README, "Speed").
fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    // An interrupted run leaves no hidden part files (they can be gigabytes).
    let _ = ctrlc::set_handler(|| {
        let n = vajra_sim::cleanup::remove_all();
        eprintln!("interrupted: removed {n} partial file(s); the output folder is incomplete");
        std::process::exit(130);
    });
    match cli.cmd {
        Cmd::Run {
            file,
            out,
            jobs,
            no_trace,
            quiet,
            sequential,
            overwrite,
        } => {
            let t0 = Instant::now();
            let f = ExperimentFile::load(&file)?;
            let opts = RunOptions {
                out,
                jobs,
                trace: !no_trace,
                progress: !quiet,
                sequential,
                overwrite,
            };
            let root = out_root(&f, &opts);
            let results = run_file(&f, &opts)?;
            let mut warned = std::collections::BTreeSet::new();
            for r in &results {
                for w in &r.warnings {
                    if warned.insert(w.clone()) {
                        eprintln!("warning: {w}");
                    }
                }
            }
            if !quiet {
                print!("{}", markdown_table(&results, Some(&SHORT)));
            }
            let loop_s: f64 = results.iter().map(|r| r.loop_s).sum();
            let events: u64 = results.iter().map(|r| r.events).sum();
            eprintln!(
                "{} point(s) → {} in {:.2} s (event loops {:.2} s, {:.1} M events/s)",
                results.len(),
                root.display(),
                t0.elapsed().as_secs_f64(),
                loop_s,
                events as f64 / loop_s.max(1e-9) / 1e6
            );
            Ok(())
        }
        Cmd::Capacity {
            file,
            out,
            jobs,
            overwrite,
            pd_split,
        } => {
            let t0 = Instant::now();
            let f = ExperimentFile::load(&file)?;
            let opts = RunOptions {
                out,
                jobs,
                trace: false,
                progress: false,
                sequential: false,
                overwrite,
            };
            let root = out_root(&f, &opts);
            if jobs > vajra_sim::sweep::MAX_JOBS {
                anyhow::bail!(
                    "--jobs = {jobs}: allowed are 0 (one per core) to {}",
                    vajra_sim::sweep::MAX_JOBS
                );
            }
            vajra_sim::sweep::claim_root(&root, overwrite)?;
            let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs).build()?;
            let points = match pd_split {
                Some(n) => vajra_sim::capacity::pd_splits(&f.points, n)?,
                None => f.points.clone(),
            };
            let configs = vajra_sim::capacity::distinct_configs(&points);
            let caps = pool.install(|| {
                configs
                    .iter()
                    .map(|p| vajra_sim::capacity::search(&f, p))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            std::fs::create_dir_all(&root)?;
            let md = vajra_sim::capacity::table(&caps);
            std::fs::write(root.join("capacity.md"), &md)?;
            std::fs::write(
                root.join("capacity.json"),
                serde_json::to_string_pretty(&caps)? + "\n",
            )?;
            let mut w = csv::Writer::from_path(root.join("capacity.csv"))?;
            w.write_record([
                "point",
                "capacity_qps",
                "failing_qps",
                "devices",
                "price_per_hour",
                "qps_per_dollar_hour",
                "probes",
            ])?;
            let opt = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
            for c in &caps {
                w.write_record([
                    c.point.clone(),
                    opt(c.capacity_qps),
                    opt(c.failing_qps),
                    c.devices.to_string(),
                    c.price_per_hour.to_string(),
                    opt(c.qps_per_dollar_hour),
                    c.probes.len().to_string(),
                ])?;
            }
            w.flush()?;
            vajra_sim::capacity::pareto_chart(&caps, &root)?;
            print!("{md}");
            eprintln!(
                "capacity of {} point(s) → {} in {:.2} s",
                caps.len(),
                root.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Report { runs, out } => {
            let t0 = Instant::now();
            let data = vajra_sim::report::collect_runs(&runs)?;
            let out = out.unwrap_or_else(|| runs[0].join("report"));
            let images = vajra_sim::report::write_report(&data, &out)?;
            println!(
                "{} run(s), {} images → {} in {:.2} s",
                data.len(),
                images.len(),
                out.join("report.html").display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Compare {
            simulated,
            measured,
            out,
            steps,
        } => {
            if vajra_sim::vllm::run_dir(&measured).is_some() {
                if steps.is_some() {
                    return Err(vajra_sim::error::SimError::invalid(
                        "--steps",
                        "given",
                        "absent when the measured side is a vLLM run (its step log is not recorded)",
                    )
                    .into());
                }
                let out = out.unwrap_or_else(|| simulated.join("fidelity"));
                let (rows, notes) = vajra_sim::vllm::compare(&simulated, &measured)?;
                vajra_sim::vllm::write(&rows, &notes, &out)?;
                print!("{}", vajra_sim::vllm::markdown(&rows));
                for n in &notes {
                    println!("{n}");
                }
                println!("→ {}", out.display());
                return Ok(());
            }
            let out = out.unwrap_or_else(|| measured.join("fidelity"));
            let mut rows = vajra_sim::fidelity::compare(&simulated, &measured)?;
            let mut notes = Vec::new();
            if let Some(log) = steps {
                // The simulated point's own predictor, from its resolved config.
                let file = ExperimentFile::load(&simulated.join("config.resolved.toml"))?;
                let prep = vajra_sim::run::prepare(&file, &file.points[0])?;
                let priced = vajra_sim::fidelity::price_steps(&log, &prep.predictor)?;
                rows.extend(vajra_sim::fidelity::step_rows(&priced));
                if let Some(w) = vajra_sim::fidelity::step_warning(&priced) {
                    eprintln!("warning: {w}");
                    notes.push(format!("Warning: {w}."));
                }
                vajra_sim::fidelity::write_steps(&priced, &out)?;
            }
            vajra_sim::fidelity::write(&rows, &notes, &out)?;
            let data = vajra_sim::report::collect_runs(&[simulated, measured])?;
            vajra_sim::report::write_report(&data, &out)?;
            print!("{}", vajra_sim::fidelity::markdown(&rows));
            println!("→ {}", out.display());
            Ok(())
        }
        Cmd::Validate { file } => {
            let f = ExperimentFile::load(&file)?;
            for p in &f.points {
                let prep = vajra_sim::run::prepare(&f, p)?;
                // Reads traces too, so a missing column is caught before a run.
                vajra_workload::RequestSource::new(
                    &p.experiment.workload,
                    p.experiment.seed,
                    &f.base,
                    prep.setup.model.max_model_len,
                )?;
                let label = if p.label.is_empty() {
                    "(single point)"
                } else {
                    &p.label
                };
                if prep.setup.pools.is_empty() {
                    println!(
                        "ok: {label}: {} on {}× {} (TP {}, PP {}), {} KV blocks/replica, predictor: {}",
                        prep.setup.model.name,
                        prep.setup.num_replicas,
                        prep.setup.device.name,
                        prep.setup.tensor_parallel,
                        prep.setup.pipeline_parallel,
                        prep.memory.num_blocks,
                        prep.setup.predictor.join("; ")
                    );
                } else {
                    let pools: Vec<String> = prep
                        .setup
                        .pools
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {}× {} (TP {}, PP {}), {} KV blocks/replica, predictor: {}",
                                p.role,
                                p.num_replicas,
                                p.device,
                                p.tensor_parallel,
                                p.pipeline_parallel,
                                p.num_blocks,
                                p.predictor.join("; ")
                            )
                        })
                        .collect();
                    println!(
                        "ok: {label}: {}: {}",
                        prep.setup.model.name,
                        pools.join("; ")
                    );
                }
                for w in &prep.predictor.warnings {
                    eprintln!("warning: {w}");
                }
                let e = &p.experiment;
                let longest = e.workload.longest_request(prep.setup.model.max_model_len);
                let capacity = u64::from(prep.memory.num_blocks) * u64::from(e.cache.block_size);
                if u64::from(longest) > capacity {
                    eprintln!(
                        "warning: {label}: requests may reach {longest} tokens but a replica's KV cache holds {capacity}; such a request stops the run (raise cache.num_blocks or lower workload.max_tokens)"
                    );
                }
            }
            println!("{}: {} point(s) valid", file.display(), f.points.len());
            Ok(())
        }
        Cmd::List => {
            println!("models:");
            for m in catalog::models() {
                println!(
                    "  {:40} {:>6.2} B params, {} layers, {} heads ({} KV), max_model_len {}",
                    m.name,
                    m.num_params() as f64 / 1e9,
                    m.num_layers,
                    m.num_heads,
                    m.num_kv_heads,
                    m.max_model_len
                );
            }
            println!("devices:");
            for d in catalog::devices() {
                println!(
                    "  {:6} {:>5.0} GiB, {:>5.0} TFLOP/s bf16, {:>5.0} GB/s HBM, ${:.2}/h",
                    d.name,
                    d.memory_bytes as f64 / f64::from(1u32 << 30),
                    d.peak_flops / 1e12,
                    d.mem_bandwidth / 1e9,
                    d.price_per_hour
                );
            }
            println!("cluster.kv_transfer.link (disaggregated pools; per GPU and direction):");
            for l in catalog::links() {
                println!(
                    "  {:10} {:>6.1} GB/s ({:>4.0} Gbit/s), {:>3.0} µs a transfer",
                    l.name,
                    l.bandwidth / 1e9,
                    l.bandwidth * 8.0 / 1e9,
                    l.latency_s * 1e6
                );
            }
            use vajra_core::config::{PolicyConfig, QueuePolicy};
            use vajra_core::router::RouterConfig;
            println!("scheduler.policy (type = ...):");
            for p in PolicyConfig::registered() {
                println!("  {:20} {}", p.name(), params(&p));
            }
            println!("scheduler.queue (type = ...):");
            for q in QueuePolicy::registered() {
                println!("  {:20} {}", q.name(), params(&q));
            }
            println!("router (type = ...):");
            for r in RouterConfig::registered() {
                println!("  {:20} {}", r.name(), params(&r));
            }
            Ok(())
        }
        Cmd::Profile {
            cmd: ProfileCmd::Generate { device, model, out },
        } => {
            let d = catalog::device(&device).ok_or_else(|| {
                anyhow::anyhow!(
                    "--device {device}: unknown (allowed: {})",
                    catalog::device_names()
                )
            })?;
            let m = catalog::model(&model).ok_or_else(|| {
                anyhow::anyhow!(
                    "--model {model}: unknown (allowed: {})",
                    catalog::model_names()
                )
            })?;
            let short = m.name.rsplit('/').next().unwrap_or(&m.name).to_owned();
            let dir = out.unwrap_or_else(|| {
                PathBuf::from("profiles/generated")
                    .join(&d.name)
                    .join(&short)
            });
            let cmd = format!(
                "vajra-sim profile generate --device {} --model {}",
                d.name, m.name
            );
            profiles::generate(&m, &d, &dir, &cmd)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
        Cmd::Profile {
            cmd: ProfileCmd::Error { measured },
        } => {
            let rows = profiles::roofline_error(&measured)?;
            if rows.is_empty() {
                anyhow::bail!(
                    "no mlp.csv of a built-in model under {} (expected <device>/<org>/<model>/mlp.csv)",
                    measured.display()
                );
            }
            print!("{}", profiles::error_table(&rows));
            Ok(())
        }
        Cmd::Twin {
            run_dir,
            steps,
            experiment,
            num_blocks,
            out,
        } => {
            let out = out.unwrap_or_else(|| run_dir.join("twin"));
            let r = vajra_sim::twin::twin(&experiment, &run_dir, &steps, num_blocks, &out, None)?;
            print!("{}", r.text());
            if r.divergence.is_some() {
                anyhow::bail!("the simulated run is not the engine's twin");
            }
            Ok(())
        }
        Cmd::Import {
            cmd:
                ImportCmd::Vllm {
                    run,
                    out,
                    profile,
                    workload,
                    device,
                    model_config,
                },
        } => {
            let opts = vajra_sim::vllm::ImportOptions {
                profile,
                workload,
                device,
                model_config,
            };
            for n in vajra_sim::vllm::import(&run, &out, &opts)? {
                eprintln!("  {n}");
            }
            ExperimentFile::load(&out)?;
            println!("→ {} (validated)", out.display());
            Ok(())
        }
        Cmd::Trace {
            cmd:
                TraceCmd::Generate {
                    workload,
                    seed,
                    out,
                },
        } => {
            let text = std::fs::read_to_string(&workload)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", workload.display()))?;
            let cfg: vajra_workload::WorkloadConfig = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", workload.display()))?;
            let base = workload.parent().map(PathBuf::from).unwrap_or_default();
            let reqs = vajra_workload::source::collect(&cfg, seed, &base, u32::MAX)?;
            let mut w = csv::Writer::from_path(&out)?;
            w.write_record(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])?;
            for r in &reqs {
                w.write_record([
                    format!("{:.6}", r.arrival.as_secs_f64()),
                    r.prompt.len().to_string(),
                    r.max_tokens().to_string(),
                ])?;
            }
            w.flush()?;
            println!("wrote {} requests to {}", reqs.len(), out.display());
            Ok(())
        }
    }
}

/// A tagged config's parameters with their defaults, as TOML-like `key = value` pairs.
fn params(v: &impl serde::Serialize) -> String {
    let json = serde_json::to_value(v).expect("configs serialize");
    let pairs: Vec<String> = json
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "type")
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    if pairs.is_empty() {
        "(no parameters)".into()
    } else {
        pairs.join(", ")
    }
}
