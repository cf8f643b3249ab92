//! The engine loop: a vajra-core [`ReplicaDriver`] (the scheduler and its step in flight)
//! decides each step, the model runner ([`runner`]) executes it on a [`Backend`] and picks the
//! tokens, and the output processor ([`output`]) detokenizes them, decides stop strings and
//! turns the driver's events into [`RequestOutput`]s.
//!
//! ```text
//!   add_request ─► driver.begin_step ─► runner: Backend::execute + sample ─► output: detokenize, stops
//!                        ▲                                                        │
//!                        └──────── driver.end_step (update_from_output) ◄─────────┘  ─► RequestOutput
//! ```
//!
//! The engine keeps, per live request, its tokens (prompt and output), its block table (rebuilt
//! from `new` data after admission or preemption, extended by `new_blocks` otherwise), its
//! sampler and its detokenizer. Time is the wall clock since the engine started, as integer
//! nanoseconds, so lifecycle records have the form the simulator's metrics use.

mod disagg;
mod output;
mod runner;

pub use disagg::KvHandoff;

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::sampler::RequestSampler;
use crate::tokenizer::{IncrementalDetokenizer, TextCodec};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use vajra_core::config::{CacheConfig, SchedulerConfig};
use vajra_core::driver::ReplicaDriver;
use vajra_core::ids::{BlockId, IdAllocator, RequestId};
use vajra_core::request::{FinishReason, Prompt, Request};
use vajra_core::sampling::SamplingParams;
use vajra_core::sched::Scheduler;
use vajra_core::sched::output::{FinishedRecord, SchedulerStats};
use vajra_core::sched::policy::BatchPolicy;
use vajra_core::time::{Duration, Timestamp};

/// How the engine schedules and caches.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The scheduler (any vajra-core policy).
    pub scheduler: SchedulerConfig,
    /// Block size, prefix caching, watermark, swap blocks (the block count comes from the
    /// backend).
    #[serde(default)]
    pub cache: CacheConfig,
    /// Longest prompt + output accepted; at most the model's `max_position_embeddings`.
    #[serde(default)]
    pub max_model_len: Option<u32>,
    /// Seed of the random streams of requests that set no seed of their own.
    #[serde(default)]
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            scheduler: SchedulerConfig::new(vajra_core::config::PolicyConfig::VllmV1(
                Default::default(),
            )),
            cache: CacheConfig::default(),
            max_model_len: None,
            seed: 0,
        }
    }
}

/// What a caller asks the engine to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Scheduling priority (lower first).
    pub priority: i32,
}

/// A token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// What one step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    /// The request.
    pub id: RequestId,
    /// Tokens appended in this step.
    pub tokens: Vec<u32>,
    /// Text that became final in this step.
    pub text: String,
    /// Log-probabilities of the new tokens (when the request asked for them).
    pub logprobs: Vec<TokenLogprob>,
    /// Set when the request finished.
    pub finish: Option<FinishReason>,
    /// The lifecycle record, when the request finished.
    pub record: Option<Box<FinishedRecord>>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
    /// Time from arrival to this output's first token, when this step made the request's first token.
    pub ttft: Option<Duration>,
    /// Time since the previous token, for a later token.
    pub itl: Option<Duration>,
}

impl RequestOutput {
    /// An output of `id` with nothing in it yet.
    pub fn empty(id: RequestId, prompt_tokens: u32) -> Self {
        RequestOutput {
            id,
            tokens: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish: None,
            record: None,
            prompt_tokens,
            output_tokens: 0,
            ttft: None,
            itl: None,
        }
    }
}

/// A request the engine is generating for.
struct Live {
    tokens: Vec<u32>,
    prompt_len: usize,
    table: Vec<BlockId>,
    sampler: RequestSampler,
    detok: IncrementalDetokenizer,
    /// Output text decided so far (after stop-string truncation).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    arrival: Timestamp,
    last_token: Option<Timestamp>,
    pending: RequestOutput,
}

/// The engine: scheduler, backend, tokenizer and live request state.
pub struct Engine {
    driver: ReplicaDriver,
    backend: Box<dyn Backend>,
    codec: Arc<TextCodec>,
    live: HashMap<RequestId, Live>,
    ids: IdAllocator,
    start: Instant,
    seed: u64,
    max_model_len: u32,
    counters: StepCounters,
    step_log: Option<StepLog>,
    run: Option<RunRecorder>,
    /// Under `late_requests = "reject"`: each request's TTFT deadline, after its arrival.
    ttft_budget: Option<Duration>,
    /// Requests a prefill instance handed off and nobody has exported yet
    /// ([`Engine::take_handed_off`]).
    handed_off: Vec<RequestId>,
}

/// The engine's own run records, written as the simulator's run folder
/// ([`Engine::record_run`]).
struct RunRecorder {
    dir: std::path::PathBuf,
    name: String,
    seed: u64,
    slo: vajra_metrics::SloConfig,
    collector: vajra_metrics::Collector,
    issued: u64,
}

/// The header of [`Engine::log_steps`]'s CSV.
pub use vajra_metrics::steplog::STEP_LOG_HEADER;

/// Where [`Engine::log_steps`] writes, and the step being recorded.
struct StepLog {
    out: vajra_metrics::steplog::StepLogWriter,
    row: vajra_metrics::steplog::StepLogRow,
}

/// Cumulative counts of the steps an engine ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounters {
    /// Steps that ran a batch.
    pub steps: u64,
    /// Sum over steps of the requests in the batch.
    pub scheduled_requests: u64,
    /// Sum over steps of the tokens in the batch.
    pub batched_tokens: u64,
    /// Wall time of the steps, from scheduling to the outputs, in nanoseconds.
    pub step_ns: u64,
    /// The part of it spent in the backend's forward pass (and its argmax).
    pub forward_ns: u64,
}

impl Engine {
    /// An engine over `backend` running the in-tree policy `cfg.scheduler.policy` names.
    ///
    /// # Errors
    /// An invalid scheduler or cache config, or `max_model_len` above the model's.
    pub fn new(
        cfg: EngineConfig,
        backend: Box<dyn Backend>,
        codec: Arc<TextCodec>,
    ) -> Result<Self> {
        let policy = cfg.scheduler.policy.build();
        Self::with_policy(cfg, backend, codec, policy)
    }

    /// An engine over `backend` running `policy` — in-tree or not — instead of the one
    /// `cfg.scheduler.policy` names (see [`Scheduler::with_policy`]).
    ///
    /// # Errors
    /// As [`Engine::new`].
    pub fn with_policy(
        cfg: EngineConfig,
        backend: Box<dyn Backend>,
        codec: Arc<TextCodec>,
        policy: Box<dyn BatchPolicy>,
    ) -> Result<Self> {
        let model_len = backend.spec().config.max_model_len;
        let max_model_len = cfg.max_model_len.unwrap_or(model_len);
        if max_model_len == 0 || max_model_len > model_len {
            return Err(EngineError::invalid(
                "max_model_len",
                max_model_len,
                format!("1 to the model's max_position_embeddings = {model_len}"),
            ));
        }
        let mut cache = cfg.cache.clone();
        cache.swap_blocks = backend.num_host_blocks();
        let sched = Scheduler::with_policy(
            cfg.scheduler,
            &cache,
            backend.num_blocks(),
            max_model_len,
            policy,
        )?;
        Ok(Engine {
            driver: ReplicaDriver::new(sched, 1),
            backend,
            codec,
            live: HashMap::new(),
            ids: IdAllocator::new(),
            start: Instant::now(),
            seed: cfg.seed,
            max_model_len,
            counters: StepCounters::default(),
            step_log: None,
            run: None,
            ttft_budget: None,
            handed_off: Vec::new(),
        })
    }

    /// Writes one CSV line per step from now on ([`STEP_LOG_HEADER`]): the step's start (s
    /// since the engine was built), its wall time and its forward pass (ms), and its requests
    /// as `tokens@context` items, `*` marking the ones that sample — what the simulator's
    /// predictor takes, so `vajra-sim compare --steps` can price the very batches that ran.
    /// Each line is flushed, so a killed server loses none.
    ///
    /// # Errors
    /// The header cannot be written.
    pub fn log_steps(&mut self, out: Box<dyn std::io::Write + Send>) -> std::io::Result<()> {
        self.step_log = Some(StepLog {
            out: vajra_metrics::steplog::StepLogWriter::new(out)?,
            row: vajra_metrics::steplog::StepLogRow {
                step: 0,
                start_s: 0.0,
                step_ms: 0.0,
                forward_ms: 0.0,
                requests: Vec::new(),
            },
        });
        Ok(())
    }

    /// Records every request's lifecycle and every step from now on, from the engine's own
    /// records (the replica driver's events and step records, not what a client saw), and
    /// streams `batches.parquet` into `dir`; [`Engine::finish_run`] writes the rest of the
    /// simulator's run folder there (`requests.csv`/`.parquet`, `summary.json`, `cdf/`), so
    /// `vajra-sim report` and `compare` read a served run with scheduling delay, cached prompt
    /// tokens, preemptions, batch sizes and KV usage filled in. `name` and `seed` label the
    /// summary; `slo` sets its goodput and deadline metrics.
    ///
    /// # Errors
    /// The folder or `batches.parquet` cannot be created.
    pub fn record_run(
        &mut self,
        dir: &std::path::Path,
        name: &str,
        slo: vajra_metrics::SloConfig,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::model_file(dir, e))?;
        let mut collector = vajra_metrics::Collector::new(&slo, 1);
        let kv = self.driver.scheduler().kv();
        collector
            .stream_batches(&dir.join("batches.parquet"), kv.num_blocks())
            .map_err(|e| EngineError::model_file(dir, e))?;
        self.run = Some(RunRecorder {
            dir: dir.to_owned(),
            name: name.to_owned(),
            seed: self.seed,
            slo,
            collector,
            issued: 0,
        });
        Ok(())
    }

    /// Writes the run folder started by [`Engine::record_run`] (requests finished so far;
    /// ones still running are counted as issued, not completed) and stops recording. Returns
    /// the folder, or `None` when no run was being recorded.
    ///
    /// # Errors
    /// A file that cannot be written.
    pub fn finish_run(&mut self) -> Result<Option<std::path::PathBuf>> {
        let Some(mut r) = self.run.take() else {
            return Ok(None);
        };
        let err = |e: vajra_metrics::MetricsError| EngineError::model_file(&r.dir, e);
        r.collector.finish().map_err(err)?;
        r.collector.requests.sort_by_key(|q| q.request_id);
        let facts = vajra_metrics::summary::ClusterFacts {
            num_replicas: 1,
            stages: 1,
            num_blocks: self.driver.scheduler().kv().num_blocks(),
            peak_flops: 0.0,
            peak_bytes_per_s: 0.0,
            issued: r.issued,
            // The server refuses what does not fit; it never clips.
            pools: Vec::new(),
            clipped: 0,
        };
        let summary = vajra_metrics::summary::SummaryFile {
            name: r.name.clone(),
            point: "served".into(),
            seed: Some(r.seed),
            kind: Some("served".into()),
            bench: None,
            metrics: vajra_metrics::Summary::compute(&r.collector, &r.slo, &facts),
        };
        let tables = vajra_metrics::output::Tables {
            csv: true,
            parquet: true,
        };
        vajra_metrics::output::write_run(&r.dir, &r.collector, &summary, tables).map_err(err)?;
        Ok(Some(r.dir))
    }

    /// The tokenizer.
    pub fn codec(&self) -> &Arc<TextCodec> {
        &self.codec
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, to profile it before serving (`serve --profile-out`). Steps run through it
    /// write KV blocks the scheduler may later hand out, which is harmless before the first
    /// request (every block is written before it is read, and no block is cached yet); do not
    /// call it while requests are in flight.
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    /// Longest prompt + output accepted.
    pub fn max_model_len(&self) -> u32 {
        self.max_model_len
    }

    /// Scheduler counters (running, waiting, KV usage, preemptions, prefix-cache hits).
    pub fn stats(&self) -> SchedulerStats {
        self.driver.scheduler().stats()
    }

    /// Steps, batched requests and batched tokens so far.
    pub fn counters(&self) -> StepCounters {
        self.counters
    }

    /// The scheduler's settings (policy, queue order, limits).
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        self.driver.scheduler().config()
    }

    /// The KV cache (block count, block size, free blocks).
    pub fn kv(&self) -> &vajra_core::kv::manager::KvCacheManager {
        self.driver.scheduler().kv()
    }

    /// Blocks currently held by requests.
    pub fn allocated_blocks(&self) -> u32 {
        let kv = self.driver.scheduler().kv();
        kv.num_blocks() - kv.num_free()
    }

    /// Whether any request is live: waiting, running, or held for a hand-off.
    pub fn has_unfinished(&self) -> bool {
        self.driver.scheduler().has_unfinished()
    }

    /// Whether any request can be stepped (waiting or running; a request handed off to a
    /// decode engine and still held here is neither).
    pub fn has_schedulable(&self) -> bool {
        let s = self.driver.scheduler();
        s.num_waiting() + s.num_running() > 0
    }

    /// Wall time since the engine started.
    pub fn now(&self) -> Timestamp {
        Timestamp(self.start.elapsed().as_nanos() as u64)
    }

    /// Gives every request from now on a TTFT deadline `ttft` after its arrival, which a
    /// scheduler with `late_requests = "reject"` acts on: a request still waiting, never
    /// scheduled, at its deadline is rejected unserved (its output finishes with
    /// [`FinishReason::Rejected`](vajra_core::request::FinishReason::Rejected)), as the
    /// simulator does with the run's TTFT target.
    pub fn set_ttft_deadline(&mut self, ttft: Duration) {
        self.ttft_budget = Some(ttft);
    }

    /// Queues a request and returns its id.
    ///
    /// # Errors
    /// Invalid sampling parameters, an empty prompt, or prompt + `max_tokens` over
    /// `max_model_len` or the KV cache.
    pub fn add_request(&mut self, req: GenerateRequest) -> Result<RequestId> {
        if self.driver.scheduler().role() == vajra_core::config::InstanceRole::Decode {
            return Err(EngineError::invalid(
                "request",
                "a new request",
                "none on a decode instance: it takes prefilled requests (Engine::accept_handoff)",
            ));
        }
        let id = self.ids.next_request();
        let now = self.now();
        let mut r = Request::new(
            id,
            Prompt::Tokens(req.prompt.clone()),
            req.sampling.max_tokens,
            now,
        );
        r.sampling = req.sampling.clone();
        r.priority = req.priority;
        r.ttft_deadline = self.ttft_budget.map(|t| now + t);
        self.driver.scheduler_mut().add_request(r, now)?;
        if let Some(run) = &mut self.run {
            run.issued += 1;
            run.collector.on_arrival(id, now);
        }
        let prompt_len = req.prompt.len();
        let fallback = self.seed ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.live.insert(
            id,
            Live {
                sampler: RequestSampler::new(req.sampling, &req.prompt, fallback),
                detok: IncrementalDetokenizer::new(prompt_len),
                tokens: req.prompt,
                prompt_len,
                table: Vec::new(),
                text: String::new(),
                emitted: 0,
                arrival: now,
                last_token: None,
                pending: RequestOutput::empty(id, prompt_len as u32),
            },
        );
        Ok(id)
    }

    /// Aborts a request and frees its blocks; `None` if it already finished.
    pub fn abort(&mut self, id: RequestId) -> Option<RequestOutput> {
        let rec = self.driver.abort(id, self.now()).ok()?;
        if let Some(run) = &mut self.run {
            run.collector.on_finished(&rec);
        }
        let live = self.live.remove(&id)?;
        let mut out = live.pending;
        out.output_tokens = (live.tokens.len() - live.prompt_len) as u32;
        out.finish = Some(FinishReason::Abort);
        out.record = Some(Box::new(rec));
        Some(out)
    }

    /// Runs one step; returns an output for every request that gained text or tokens or
    /// finished. Returns nothing when no request is waiting or running.
    ///
    /// # Errors
    /// A backend failure or a tokenizer failure; the step's requests stay as they were before
    /// the failed step only in the scheduler's view, so callers should abort them.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let began = Instant::now();
        let steps = self.counters.steps;
        let outputs = self.step_inner()?;
        let step_ns = began.elapsed().as_nanos() as u64;
        if !outputs.is_empty() || self.has_unfinished() {
            self.counters.step_ns += step_ns;
        }
        if self.counters.steps > steps
            && let Some(log) = &mut self.step_log
        {
            log.row.step = self.counters.steps - 1;
            log.row.start_s = began.duration_since(self.start).as_secs_f64();
            log.row.step_ms = step_ns as f64 / 1e6;
            if let Err(e) = log.out.write(&log.row) {
                tracing::error!(error = %e, "step log: cannot write; logging stops");
                self.step_log = None;
            }
        }
        Ok(outputs)
    }

    /// Rejects the waiting requests past their TTFT deadline (none unless
    /// [`Engine::set_ttft_deadline`]); returns their final outputs.
    fn reject_late(&mut self) -> Vec<RequestOutput> {
        if self.ttft_budget.is_none() {
            return Vec::new();
        }
        let mut sink = output::OutputSink {
            live: &mut self.live,
            touched: Vec::new(),
            collector: self.run.as_mut().map(|r| &mut r.collector),
            handed_off: &mut self.handed_off,
        };
        let now = Timestamp(self.start.elapsed().as_nanos() as u64);
        self.driver.reject_late(now, &mut sink);
        let touched = sink.touched;
        output::take_outputs(&mut self.live, touched)
    }

    fn step_inner(&mut self) -> Result<Vec<RequestOutput>> {
        let mut rejected = self.reject_late();
        let Some(ticket) = self.driver.begin_step(self.now()) else {
            return Ok(rejected);
        };
        let out = self.driver.output(ticket);
        self.counters.steps += 1;
        self.counters.scheduled_requests += out.scheduled.len() as u64;
        self.counters.batched_tokens += u64::from(out.num_batched_tokens);
        runner::update_tables(out, &mut self.live);
        let ran = runner::run(self.backend.as_mut(), out, &mut self.live).and_then(|r| {
            let forward_ns = r.forward_ns;
            output::apply_picks(out, r.picks, &mut self.live, &self.codec).map(|o| (o, forward_ns))
        });
        let (result, forward_ns) = match ran {
            Ok(r) => r,
            Err(e) => {
                self.driver.abandon_step(ticket);
                return Err(e);
            }
        };
        self.counters.forward_ns += forward_ns;
        if let Some(log) = &mut self.step_log {
            log.row.forward_ms = forward_ns as f64 / 1e6;
            log.row.requests.clear();
            log.row.requests.extend(out.scheduled.iter().map(|s| {
                vajra_metrics::steplog::StepItem {
                    tokens: s.num_tokens,
                    context: s.num_computed,
                    samples: s.samples,
                }
            }));
        }
        let mut sink = output::OutputSink {
            live: &mut self.live,
            touched: Vec::new(),
            collector: self.run.as_mut().map(|r| &mut r.collector),
            handed_off: &mut self.handed_off,
        };
        let now = Timestamp(self.start.elapsed().as_nanos() as u64);
        self.driver.end_step(ticket, &result, now, &mut sink);
        let touched = sink.touched;
        rejected.extend(output::take_outputs(&mut self.live, touched));
        Ok(rejected)
    }

    /// Runs steps until every request finished; collects all outputs per request.
    ///
    /// # Errors
    /// As [`Engine::step`].
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>> {
        let mut all: Vec<RequestOutput> = Vec::new();
        let mut at: HashMap<RequestId, usize> = HashMap::new();
        while self.has_unfinished() {
            for o in self.step()? {
                match at.get(&o.id) {
                    Some(&i) => merge(&mut all[i], o),
                    None => {
                        at.insert(o.id, all.len());
                        all.push(o);
                    }
                }
            }
        }
        Ok(all)
    }
}

/// Appends a later output of the same request to an earlier one.
pub fn merge(into: &mut RequestOutput, o: RequestOutput) {
    into.tokens.extend(o.tokens);
    into.text.push_str(&o.text);
    into.logprobs.extend(o.logprobs);
    into.finish = o.finish.or(into.finish);
    into.record = o.record.or(into.record.take());
    into.output_tokens = o.output_tokens;
    into.ttft = into.ttft.or(o.ttft);
    into.itl = o.itl.or(into.itl);
}
