//! `vajra-engine`: run a Hugging Face model folder on the shared scheduler.
//!
//! - `generate --model DIR --prompt TEXT`: one completion, streamed to stdout.
//! - `serve --model DIR`: the OpenAI-compatible server.
//! - `throughput --model DIR`: prefill and decode tokens per second at given batch sizes.

#![allow(clippy::print_stdout)] // a command-line tool: its results go to stdout

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vajra_core::config::PolicyConfig;
use vajra_core::sampling::SamplingParams;
use vajra_core::sched::config::LatePolicy;
use vajra_engine::backend::cpu::DEFAULT_KV_CACHE_MIB;
use vajra_engine::engine::{EngineConfig, GenerateRequest};
use vajra_engine::server::{DEFAULT_MAX_CONCURRENT, ServerConfig};
use vajra_engine::tokenizer::ChatMessage;
use vajra_experiment::Sections;

#[derive(Parser)]
#[command(
    name = "vajra-engine",
    version,
    about = "Run Llama-family models on Vajra's scheduler"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate one completion and stream it to stdout.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Measure prefill and decode throughput with random prompts.
    Throughput(ThroughputArgs),
    /// Replay an experiment's workload against an OpenAI-compatible server and write a run
    /// folder with the simulator's metrics.
    Bench(BenchArgs),
    /// CUDA: decode step time against the bandwidth floor and prefill TFLOP/s against cuBLAS,
    /// on a named shape with random weights (needs `--features cuda` and a device).
    GpuBench(GpuBenchArgs),
    /// Per-operator times of the CPU or CUDA backend over a grid, written as
    /// `<out>/<model>/{mlp,attention}.csv` in Vidur's schema with provenance.
    Profile(ProfileArgs),
    /// Token counts of ShareGPT-style conversations with a model's tokenizer and chat
    /// template, as the simulator's sessions replay them (`workload.arrival.conversations`).
    Conversations(ConversationsArgs),
}

#[derive(Args)]
struct ConversationsArgs {
    /// Model folder whose `tokenizer.json` and chat template count the tokens.
    #[arg(long)]
    model: PathBuf,
    /// ShareGPT-style JSON (an array of `{"conversations": [{"from", "value"}, ...]}`) or JSONL.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (`{"id", "turns": [[new_tokens, answer_tokens], ...]}` a line).
    #[arg(short, long)]
    out: PathBuf,
    /// Write at most this many conversations.
    #[arg(long)]
    max_conversations: Option<u64>,
}

#[derive(Args)]
struct BenchArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Experiment file: its `seed`, `[workload]` and `[slo]` are used.
    #[arg(long)]
    experiment: PathBuf,
    /// The served model's folder (prompt token ids are drawn from its vocabulary).
    #[arg(long)]
    model_dir: PathBuf,
    /// The `model` field to send (default: the first model the server lists).
    #[arg(long)]
    model: Option<String>,
    /// Replace the workload's number of requests.
    #[arg(long)]
    num_requests: Option<u64>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Output run folder.
    #[arg(short, long, default_value = "runs/bench")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct GpuBenchArgs {
    /// Model shape: a Llama-architecture model of `vajra-sim list` (by its name after the `/`).
    #[arg(long, default_value = "Meta-Llama-3-8B")]
    shape: String,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    decode_batches: Vec<usize>,
    /// Context length of every decoding request.
    #[arg(long, default_value_t = 512)]
    decode_context: u32,
    /// Prefill lengths (one request each).
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prefill: Vec<usize>,
    /// Also time the decode batches at these split-K aims: attention blocks per SM (1–32), or
    /// `waves` (whole waves of the decode kernel's resident blocks).
    #[arg(long, value_delimiter = ',')]
    split_sweep: Vec<String>,
    /// Also time sampled decode steps (temperature 1, top-p 0.9) at these batch sizes, drawn on
    /// the device and on the host.
    #[arg(long, value_delimiter = ',')]
    sampled_batches: Vec<usize>,
    /// Also write the numbers as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct ProfileArgs {
    /// Model shape with random weights: a Llama-architecture model of `vajra-sim list`.
    #[arg(long, default_value = "Meta-Llama-3-8B", conflicts_with = "model")]
    shape: String,
    /// A Hugging Face model folder to profile with its own weights, instead of a named shape
    /// (required for the CPU backend).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend to profile: cpu or cuda.
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// Output folder: writes `<out>/<model>/`.
    #[arg(long)]
    out: PathBuf,
    /// A small grid (seconds instead of minutes).
    #[arg(long)]
    quick: bool,
}

#[derive(Args)]
struct EngineArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Engine config TOML: `[scheduler]` (any vajra-core policy), `[cache]`, `max_model_len`, `seed`.
    #[arg(long, conflicts_with = "experiment")]
    config: Option<PathBuf>,
    /// Take `[scheduler]`, `[cache]` and `seed` from a vajra-sim experiment file, so the engine
    /// runs what the simulator simulates (`cache.num_blocks` sets the pool size).
    #[arg(long)]
    experiment: Option<PathBuf>,
    /// Scheduling policy with its default parameters, replacing the config's (names from the
    /// vajra-core registry; `vajra-sim list` shows their parameters).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PolicyConfig::registered().map(|p| p.name())))]
    policy: Option<String>,
    /// Executor: cpu (f32 reference) or cuda (bf16; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// KV-cache memory, in MiB.
    #[arg(long, default_value_t = DEFAULT_KV_CACHE_MIB)]
    kv_cache_mib: u64,
    /// Longest prompt + output accepted (default: the model's max_position_embeddings).
    #[arg(long)]
    max_model_len: Option<u32>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user chat message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k (-1 = off).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    top_k: i32,
    /// Seed of the sampling stream.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings.
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model name clients send (default: the folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests in flight beyond which new ones get 429.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_concurrent: usize,
    /// Append each finished request's lifecycle record to this JSON-lines file.
    #[arg(long)]
    requests_log: Option<PathBuf>,
    /// Write one CSV line per engine step (start, wall and forward time, and every request's
    /// new tokens and context) to this file, for `vajra-sim compare --steps`.
    #[arg(long)]
    steps_log: Option<PathBuf>,
    /// Write the simulator's run folder (requests.csv/.parquet, batches.parquet, summary.json,
    /// cdf/) from the engine's own records into this folder when the server shuts down
    /// (Ctrl-C or SIGTERM), for `vajra-sim report` and `compare`.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// On Ctrl-C or SIGTERM, stop accepting, let requests in flight finish for at most this
    /// many seconds (then cut what is left), write the run folder, and exit 0.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = drain_seconds)]
    drain_timeout_s: f64,
    /// Before serving, profile this very backend (the `profile` command's full grid) into
    /// `<DIR>/<model>/`, so that the profile and the served steps share the process, its
    /// memory and the minutes around them (scripts/calibrate.sh).
    #[arg(long, value_name = "DIR")]
    profile_out: Option<PathBuf>,
    /// Disaggregated serving: `prefill` runs each request to its first token and hands it,
    /// with its KV blocks, to the decode server at `--decode-peer`, relaying that server's
    /// tokens to the client; `decode` takes hand-offs on `--kv-listen`.
    #[arg(long, value_enum, default_value_t = Role::Colocated)]
    role: Role,
    /// The decode server's KV listener, `HOST:PORT` (with `--role prefill`).
    #[arg(long, value_name = "HOST:PORT")]
    decode_peer: Option<String>,
    /// Where to take hand-offs, `HOST:PORT` (with `--role decode`).
    #[arg(long, value_name = "HOST:PORT")]
    kv_listen: Option<String>,
}

/// `serve --role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Prefill and decode in this server.
    Colocated,
    /// Prefill only; decode on `--decode-peer`.
    Prefill,
    /// Decode only; hand-offs on `--kv-listen`.
    Decode,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<u32>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_len: u32,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    output_len: u32,
}

fn engine_config(a: &EngineArgs) -> Result<EngineConfig> {
    let mut cfg = match (&a.config, &a.experiment) {
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<EngineConfig>(&text).with_context(|| format!("{}", p.display()))?
        }
        (None, Some(p)) => {
            // The experiment schema's own types; every section the file has is checked.
            let e = Sections::load(p)?;
            if e.cluster.as_ref().is_some_and(|c| !c.pools.is_empty()) {
                anyhow::bail!(
                    "{}: cluster.pools (disaggregated prefill and decode) is not served by the engine yet: `serve` runs one colocated instance; simulate the file with `vajra-sim run`, or remove cluster.pools to serve it colocated",
                    p.display()
                );
            }
            let mut cfg = EngineConfig {
                seed: e.seed(),
                ..EngineConfig::default()
            };
            if let Some(sched) = e.scheduler {
                cfg.scheduler = sched;
            }
            if let Some(cache) = e.cache {
                cfg.cache = cache;
            }
            cfg
        }
        (None, None) => EngineConfig::default(),
    };
    if let Some(name) = &a.policy {
        cfg.scheduler.policy =
            PolicyConfig::by_name(name).with_context(|| format!("--policy {name}"))?;
    }
    if a.max_model_len.is_some() {
        cfg.max_model_len = a.max_model_len;
    }
    Ok(cfg)
}

fn load(a: &EngineArgs) -> Result<vajra_engine::engine::Engine> {
    let cfg = engine_config(a)?;
    // Late requests are rejected at the run's TTFT target, as in the simulator.
    let reject_after = if cfg.scheduler.late_requests == LatePolicy::Reject {
        let ttft = run_slo(a)?.ttft_s.context(
            "scheduler.late_requests = \"reject\" needs a TTFT target to reject at: [slo] ttft_s in --experiment",
        )?;
        Some(vajra_core::time::Duration::from_secs_f64(ttft))
    } else {
        None
    };
    let t = Instant::now();
    let kind: vajra_engine::BackendKind = a.backend.parse()?;
    let mut e = vajra_engine::load_engine(&a.model, cfg, kind, a.kv_cache_mib)?;
    if let Some(ttft) = reject_after {
        e.set_ttft_deadline(ttft);
    }
    tracing::info!(
        model = %a.model.display(),
        backend = e.backend().name(),
        blocks = e.backend().num_blocks(),
        secs = t.elapsed().as_secs_f64(),
        "loaded"
    );
    Ok(e)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let mut engine = load(&a.engine)?;
    let codec = engine.codec().clone();
    let prompt = if a.chat {
        let text = codec.apply_chat_template(&[ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        }])?;
        codec.encode(&text, false)?
    } else {
        codec.encode(&a.prompt, true)?
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        max_tokens: a.max_tokens,
        seed: a.seed,
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    let n_prompt = prompt.len();
    engine.add_request(GenerateRequest {
        prompt,
        sampling,
        priority: 0,
    })?;
    let start = Instant::now();
    let mut first = None;
    let mut generated = 0;
    let mut stdout = std::io::stdout().lock();
    let mut reason = None;
    while engine.has_unfinished() {
        for o in engine.step()? {
            if first.is_none() && !o.tokens.is_empty() {
                first = Some(start.elapsed());
            }
            generated += o.tokens.len();
            write!(stdout, "{}", o.text)?;
            stdout.flush()?;
            reason = o.finish.or(reason);
        }
    }
    writeln!(stdout)?;
    let total = start.elapsed().as_secs_f64();
    let ttft = first.map_or(0.0, |d| d.as_secs_f64());
    eprintln!(
        "prompt {n_prompt} tokens, output {generated} tokens ({reason:?}); time to first token {ttft:.3} s, decode {:.1} tokens/s",
        generated.saturating_sub(1) as f64 / (total - ttft).max(1e-9)
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let drain = a.drain_timeout_s;
    // Bound before the model loads, so a busy port fails at once rather than after the load.
    let std_listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    std_listener.set_nonblocking(true)?;
    let link = match (a.role, &a.decode_peer, &a.kv_listen) {
        (Role::Colocated, None, None) => None,
        (Role::Prefill, Some(peer), None) => Some(vajra_engine::server::KvLink::Prefill {
            decode: peer.clone(),
        }),
        (Role::Decode, None, Some(addr)) => Some(vajra_engine::server::KvLink::Decode {
            listener: std::net::TcpListener::bind(addr)
                .with_context(|| format!("--kv-listen {addr}"))?,
        }),
        (Role::Prefill, None, _) => {
            bail!("--role prefill needs --decode-peer HOST:PORT (the decode server's --kv-listen)")
        }
        (Role::Decode, _, None) => bail!("--role decode needs --kv-listen HOST:PORT"),
        (role, _, _) => bail!(
            "--decode-peer goes with --role prefill and --kv-listen with --role decode (got --role {})",
            format!("{role:?}").to_lowercase()
        ),
    };
    if let Some(vajra_engine::server::KvLink::Decode { listener }) = &link {
        // The one line scripts and tests wait for, beside the HTTP one.
        eprintln!(
            "vajra-engine taking hand-offs on {}",
            listener.local_addr()?
        );
    }
    if a.profile_out.is_some() {
        let block = engine_config(&a.engine)?.cache.block_size;
        if block != vajra_engine::profile::BLOCK {
            bail!(
                "--profile-out profiles with {}-token KV blocks (the profile schema's block_size), but cache.block_size is {block}",
                vajra_engine::profile::BLOCK
            );
        }
    }
    let mut engine = load(&a.engine)?;
    engine.set_role(match a.role {
        Role::Colocated => vajra_core::config::InstanceRole::Colocated,
        Role::Prefill => vajra_core::config::InstanceRole::Prefill,
        Role::Decode => vajra_core::config::InstanceRole::Decode,
    })?;
    if let Some(out) = &a.profile_out {
        use vajra_engine::profile::{Grid, profile};
        let cmd = std::env::args().collect::<Vec<_>>().join(" ");
        let b = engine.backend_mut();
        let grid = if b.name() == "cpu" {
            Grid::cpu(false)
        } else {
            Grid::gpu(false)
        };
        let name = b.name();
        let p = b
            .as_profiled()
            .with_context(|| format!("--profile-out: the {name} backend cannot be profiled"))?;
        let dir = profile(p, &grid, out, &cmd).context("--profile-out")?;
        eprintln!("wrote {}", dir.display());
    }
    if let Some(p) = &a.steps_log {
        let f = std::fs::File::create(p).with_context(|| format!("--steps-log {}", p.display()))?;
        engine
            .log_steps(Box::new(std::io::BufWriter::new(f)))
            .with_context(|| format!("--steps-log {}", p.display()))?;
    }
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| folder_name(&a.engine.model));
    if let Some(dir) = &a.run_dir {
        let slo = run_slo(&a.engine)?;
        engine
            .record_run(dir, &name, slo)
            .with_context(|| format!("--run-dir {}", dir.display()))?;
    }
    let policy = format!(
        "{} ({} KV blocks, max_model_len {})",
        serde_json::to_string(engine.scheduler_config())?,
        engine.backend().num_blocks(),
        engine.max_model_len()
    );
    let (app, engine_thread) = vajra_engine::server::router_with_kv_link(
        engine,
        ServerConfig {
            model_name: name.clone(),
            max_concurrent: a.max_concurrent,
            requests_log: a.requests_log.clone(),
        },
        link,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        eprintln!("scheduler: {policy}");
        // The one line scripts and tests wait for.
        eprintln!("vajra-engine serving `{name}` on http://{addr}");
        let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let sig = shutdown_signal().await;
            eprintln!(
                "{sig}: draining (at most {drain:.0} s): no new connections, requests in flight finish"
            );
            let _ = signalled.send(true);
        });
        let deadline = async move {
            let _ = on_signal.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs_f64(drain)).await;
        };
        tokio::select! {
            r = serve => r?,
            () = deadline => eprintln!("the drain deadline passed: open connections were cut"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // The router is gone: the engine thread writes the run folder, then ends. A stream still
    // held by a client keeps it alive; give up waiting at the drain deadline rather than hang.
    let waited = Instant::now();
    while !engine_thread.is_finished() && waited.elapsed().as_secs_f64() < drain {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(dir) = &a.run_dir {
        if engine_thread.is_finished() {
            eprintln!("wrote the run folder {}", dir.display());
        } else {
            eprintln!(
                "the engine was still busy after {drain:.0} s: {} was not written",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Ctrl-C (SIGINT) or SIGTERM (what containers, Kubernetes and systemd send); its name.
async fn shutdown_signal() -> &'static str {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = term => "SIGTERM",
    }
}

/// `--drain-timeout-s`: a finite number of seconds ≥ 0.
fn drain_seconds(v: &str) -> std::result::Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!("{v}: allowed a number of seconds from 0 to 86400")),
    }
}

/// The SLOs of `--experiment`'s `[slo]` (for the served run's goodput), else none.
fn run_slo(a: &EngineArgs) -> Result<vajra_metrics::SloConfig> {
    match &a.experiment {
        Some(p) => Ok(Sections::load(p)?.slo.unwrap_or_default()),
        None => Ok(vajra_metrics::SloConfig::default()),
    }
}

fn conversations(a: ConversationsArgs) -> Result<()> {
    let codec = vajra_engine::tokenizer::TextCodec::load(&a.model, &[])?;
    let c = vajra_engine::conversations::convert(&codec, &a.input, &a.out, a.max_conversations)?;
    let per = |x: u64| x as f64 / c.turns.max(1) as f64;
    eprintln!(
        "wrote {}: {} conversations, {} turns ({:.2} a conversation), {:.1} new and {:.1} answer tokens a turn; {} cut where the user/assistant alternation broke; skipped {:?}",
        a.out.display(),
        c.conversations,
        c.turns,
        c.turns as f64 / c.conversations.max(1) as f64,
        per(c.new_tokens),
        per(c.answer_tokens),
        c.cut,
        c.skipped
    );
    Ok(())
}

fn folder_name(p: &Path) -> String {
    std::fs::canonicalize(p)
        .ok()
        .as_deref()
        .unwrap_or(p)
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

fn throughput(a: ThroughputArgs) -> Result<()> {
    let vocab = {
        let spec = vajra_engine::spec::ModelSpec::from_dir(&a.engine.model)?;
        spec.config.vocab_size
    };
    if a.prompt_len == 0 || a.output_len < 2 {
        bail!("--prompt-len must be ≥ 1 and --output-len ≥ 2");
    }
    let mut engine = load(&a.engine)?;
    println!("| batch | prompt | output | prefill tokens/s | decode tokens/s | decode step ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &b in &a.batch {
        // Deterministic pseudo-random prompts (distinct, so no prefix-cache hits).
        let mut x = 0x2545_f491_4f6c_dd1du64 ^ u64::from(b);
        for _ in 0..b {
            let prompt = (0..a.prompt_len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % u64::from(vocab)) as u32
                })
                .collect();
            let mut sampling = SamplingParams::greedy(a.output_len);
            sampling.ignore_eos = true;
            engine.add_request(GenerateRequest {
                prompt,
                sampling,
                priority: 0,
            })?;
        }
        // Steps until every request has its first token are prefill; the rest decode.
        let t0 = Instant::now();
        let mut started = 0;
        let mut prefill_secs = 0.0;
        let mut decode_steps = 0u32;
        let mut decode_tokens = 0usize;
        let mut decode_secs = 0.0;
        while engine.has_unfinished() {
            let t = Instant::now();
            let outs = engine.step()?;
            let dt = t.elapsed().as_secs_f64();
            if started < b as usize {
                started += outs.iter().filter(|o| o.ttft.is_some()).count();
                prefill_secs += dt;
            } else {
                decode_steps += 1;
                decode_tokens += outs.iter().map(|o| o.tokens.len()).sum::<usize>();
                decode_secs += dt;
            }
        }
        let _ = t0;
        println!(
            "| {b} | {} | {} | {:.0} | {:.1} | {:.1} |",
            a.prompt_len,
            a.output_len,
            f64::from(b * a.prompt_len) / prefill_secs,
            decode_tokens as f64 / decode_secs,
            1e3 * decode_secs / f64::from(decode_steps.max(1)),
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if !(a.timeout_s.is_finite() && a.timeout_s > 0.0) {
        bail!(
            "--timeout-s {}: allowed a number of seconds > 0",
            a.timeout_s
        );
    }
    let vocab = vajra_engine::spec::ModelSpec::from_dir(&a.model_dir)?
        .config
        .vocab_size;
    let cfg = vajra_engine::bench::BenchConfig {
        url: a.url,
        model: a.model,
        experiment: a.experiment,
        out: a.out.clone(),
        timeout: std::time::Duration::from_secs_f64(a.timeout_s),
        num_requests: a.num_requests,
        progress: !a.quiet,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let facts = rt.block_on(vajra_engine::bench::run(&cfg, vocab))?;
    println!(
        "{} sent, {} completed, {} failed {:?}, {} length mismatches, {:.1} s → {}",
        facts.sent,
        facts.completed,
        facts.errors.values().sum::<u64>(),
        facts.errors,
        facts.length_mismatches,
        facts.wall_s,
        a.out.display()
    );
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_bench(a: GpuBenchArgs) -> Result<()> {
    let spec = vajra_engine::shapes::named(&a.shape)?;
    if a.decode_context < 2 {
        bail!("--decode-context must be ≥ 2");
    }
    let split_sweep = a
        .split_sweep
        .iter()
        .map(|v| v.parse())
        .collect::<vajra_engine::Result<Vec<vajra_engine::backend::cuda::SplitAim>>>()
        .context("--split-sweep")?;
    let (md, json) = vajra_engine::gpu_tools::bench(
        &spec,
        &vajra_engine::gpu_tools::BenchPlan {
            decode_batches: &a.decode_batches,
            decode_ctx: a.decode_context,
            prefill_lens: &a.prefill,
            split_sweep: &split_sweep,
            sampled_batches: &a.sampled_batches,
        },
    )?;
    println!("{md}");
    if let Some(p) = a.out {
        std::fs::write(&p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_bench(_: GpuBenchArgs) -> Result<()> {
    bail!(
        "gpu-bench needs the CUDA backend: build with `cargo build --release -p vajra-engine --features cuda`"
    )
}

fn profile(a: ProfileArgs) -> Result<()> {
    use vajra_engine::profile::{Grid, profile};
    let cmd = std::env::args().collect::<Vec<_>>().join(" ");
    let dir = match (a.backend.parse::<vajra_engine::BackendKind>()?, &a.model) {
        (vajra_engine::BackendKind::Cpu, None) => {
            bail!("--backend cpu profiles a model folder: give --model DIR")
        }
        (vajra_engine::BackendKind::Cpu, Some(dir)) => {
            let grid = Grid::cpu(a.quick);
            let mut b = vajra_engine::profile::cpu_backend(dir, &grid)?;
            profile(&mut b, &grid, &a.out, &cmd)?
        }
        (vajra_engine::BackendKind::Cuda, model) => cuda_profile(model.as_deref(), &a, &cmd)?,
    };
    println!("wrote {}", dir.display());
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_profile(model: Option<&Path>, a: &ProfileArgs, cmd: &str) -> Result<PathBuf> {
    use vajra_engine::backend::CacheShape;
    use vajra_engine::profile::{BLOCK, Grid, profile};
    let grid = Grid::gpu(a.quick);
    let mut b = match model {
        Some(dir) => vajra_engine::backend::cuda::CudaBackend::load(dir, |_| CacheShape {
            block_size: BLOCK,
            num_blocks: grid.blocks(),
            num_host_blocks: 0,
        })?,
        None => vajra_engine::gpu_tools::random_backend(
            &vajra_engine::shapes::named(&a.shape)?,
            grid.blocks(),
        )?,
    };
    Ok(profile(&mut b, &grid, &a.out, cmd)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_profile(_: Option<&Path>, _: &ProfileArgs, _: &str) -> Result<PathBuf> {
    bail!(
        "--backend cuda needs a build with `--features cuda` (cargo build --release -p vajra-engine --features cuda)"
    )
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vajra_engine=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Throughput(a) => throughput(a),
        Cmd::Bench(a) => bench(a),
        Cmd::GpuBench(a) => gpu_bench(a),
        Cmd::Profile(a) => profile(a),
        Cmd::Conversations(a) => conversations(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
