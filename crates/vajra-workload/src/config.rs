//! The `[workload]` table of an experiment file.
//!
//! ```toml
//! [workload]
//! num_requests = 10000
//! max_tokens = 4096                       # clip prompt+output, keeping the prefill:decode ratio
//! arrival = { type = "poisson", qps = 16.0 }
//! lengths = { type = "trace", path = "traces/azure_conv_synth.csv" }
//! ```
//!
//! Arrival types: `poisson {qps}`, `gamma {qps, cv}`, `constant {qps}`, `all_at_once`,
//! `trace {path, format, time_scale, start_s, end_s, prefill_scale, decode_scale}` (replays
//! arrival times *and* lengths from the file, so `lengths` must be absent) and
//! `closed_loop {clients, think_time_s, think}`.
//!
//! Length types: `fixed {prompt, output}`, `independent {prompt = DIST, output = DIST}` where a
//! DIST is `fixed {value}`, `uniform {min, max}`, `zipf {min, max, theta}` or
//! `lognormal {median, sigma, min, max}`, and `trace {path, format, prefill_scale,
//! decode_scale}` (rows sampled with replacement).

use crate::error::{Result, ensure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use vajra_core::time::MAX_SECS;

/// The workload of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Number of requests to issue. Required except for trace replay (default: every row in
    /// the window) or when `duration_s` bounds the run.
    #[serde(default)]
    pub num_requests: Option<u64>,
    /// Stop issuing requests that would arrive after this many seconds.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Clip prompt + output to at most this many tokens, keeping the prefill:decode ratio
    /// (default: the model's `max_model_len`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// When requests arrive.
    pub arrival: ArrivalConfig,
    /// How long prompts and outputs are (absent only for trace replay).
    #[serde(default)]
    pub lengths: Option<LengthsConfig>,
    /// Shared prompt prefixes (system prompts, few-shot headers) for prefix-caching studies.
    #[serde(default)]
    pub prefix: Option<PrefixConfig>,
    /// Tenants and their shares of the requests (default: one tenant).
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Relative deadline of every request in seconds (EDF and deadline metrics); a tenant's
    /// `deadline_s` overrides it.
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

/// How requests arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArrivalConfig {
    /// Exponential gaps at `qps` requests per second.
    Poisson {
        /// Mean rate (requests/s).
        qps: f64,
        /// Clamp each gap at `3/qps` as Vidur does (which raises the offered rate by 5.2 %);
        /// only for reproducing Vidur runs.
        #[serde(default)]
        vidur_clamp: bool,
    },
    /// Gamma gaps with mean `1/qps` and coefficient of variation `cv` (shape `1/cv²`, scale
    /// `cv²/qps`). `cv = 1` is Poisson; larger is burstier. vLLM's "burstiness" is `1/cv²`.
    Gamma {
        /// Mean rate (requests/s).
        qps: f64,
        /// Coefficient of variation of the gaps (> 0).
        cv: f64,
    },
    /// Evenly spaced arrivals, `1/qps` apart, the first at time 0.
    Constant {
        /// Rate (requests/s).
        qps: f64,
    },
    /// Every request at time 0.
    AllAtOnce,
    /// Arrival times and lengths replayed from a trace.
    Trace(TraceReplayConfig),
    /// Multi-turn sessions (see [`SessionsConfig`]).
    Sessions(SessionsConfig),
    /// `clients` concurrent clients; each sends its next request `think_time_s` after its
    /// previous one completes.
    ClosedLoop {
        /// Concurrent clients (≥ 1).
        clients: u32,
        /// Mean think time between a completion and the client's next request, in seconds.
        #[serde(default)]
        think_time_s: f64,
        /// Fixed or exponentially distributed think time.
        #[serde(default)]
        think: ThinkTime,
    },
}

/// Multi-turn sessions (`arrival = { type = "sessions", ... }`): sessions start open-loop
/// (Poisson at `qps`); inside a session each turn is sent a think time after the previous
/// answer completes (closed loop). Turn k's prompt is the system prompt, every earlier turn's
/// new tokens and answer, and its own new tokens, so its prefix is cached wherever the
/// conversation ran before. `workload.lengths` gives each turn's new user tokens and answer
/// length; `workload.num_requests` counts turns. A session ends after its turns, or earlier
/// when its next turn would not fit the longest request allowed (`workload.max_tokens` or the
/// model's context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Sessions started per second (Poisson).
    pub qps: f64,
    /// Fewest turns in a session (≥ 1).
    #[serde(default = "one_u32")]
    pub turns_min: u32,
    /// Most turns in a session (≥ `turns_min`); each session draws uniformly in between.
    /// Required unless `conversations` gives every session's turns.
    #[serde(default)]
    pub turns_max: Option<u32>,
    /// Real conversations to replay instead of drawn ones: a JSONL file, one conversation a
    /// line, `{"turns": [[new_tokens, answer_tokens], ...]}` (what `vajra-engine
    /// conversations` writes from ShareGPT-style JSON with a model's tokenizer and chat
    /// template), relative to the experiment file. Each session replays one conversation
    /// drawn uniformly from the file; `turns_min`, `turns_max` and `workload.lengths` are then
    /// not used (and must be absent).
    #[serde(default)]
    pub conversations: Option<PathBuf>,
    /// Mean time between an answer and the next turn, in seconds.
    #[serde(default)]
    pub think_time_s: f64,
    /// Fixed or exponentially distributed think time.
    #[serde(default)]
    pub think: ThinkTime,
    /// Tokens of the system prompt every session starts with (0 = none).
    #[serde(default)]
    pub system_prompt_tokens: u32,
    /// Distinct system prompts, chosen uniformly per session (sessions with the same one
    /// share its blocks).
    #[serde(default = "one_u32")]
    pub system_prompts: u32,
    /// Probability that a turn is a tool call: the next turn follows after `tool_time_s`
    /// instead of a think time, carrying the tool's output as its new tokens (agentic
    /// sessions: many short turns over a long shared context).
    #[serde(default)]
    pub tool_call_probability: f64,
    /// Time a tool call takes, in seconds.
    #[serde(default)]
    pub tool_time_s: f64,
    /// Tokens per identity group of the conversation (as a trace's `hash_block_tokens`); a
    /// multiple or a divisor of `cache.block_size` wastes nothing.
    #[serde(default = "sixteen")]
    pub hash_block_tokens: u32,
}

fn sixteen() -> u32 {
    16
}

/// Distribution of a closed-loop client's think time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThinkTime {
    /// Exactly `think_time_s`.
    #[default]
    Fixed,
    /// Exponential with mean `think_time_s`.
    Exponential,
}

/// A trace file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceFormat {
    /// By extension and header: `.jsonl` is JSONL; a CSV header with `TIMESTAMP` is Azure;
    /// otherwise Vidur's CSV.
    #[default]
    Auto,
    /// Vidur's processed traces: `arrived_at` (s, optional for length-only traces),
    /// `num_prefill_tokens`, `num_decode_tokens`.
    VidurCsv,
    /// Azure LLM inference traces 2023/2024: `TIMESTAMP` (`YYYY-MM-DD HH:MM:SS[.fffffff]`),
    /// `ContextTokens`, `GeneratedTokens`.
    Azure,
    /// One JSON object per line: `timestamp` (ms), `input_length`, `output_length`, optional
    /// `hash_ids` (Mooncake prefix-block ids).
    Jsonl,
    /// A vLLM run's request log, one JSON object per line (LLMServingSim's `python -m bench
    /// run` writes it from vLLM's per-request stats): `queued_ts` (s, the engine's clock, when
    /// the request reached the scheduler), `input_toks`, `output_toks`, optional
    /// `input_tok_ids`.
    Vllm,
    /// LLMServingSim's flat workload JSONL: `arrival_time_ns`, `input_toks`, `output_toks`,
    /// optional `input_tok_ids` (the prompts' real token ids).
    Llmservingsim,
}

/// Trace replay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceReplayConfig {
    /// The trace file (relative paths resolve against the experiment file's folder).
    pub path: PathBuf,
    /// Its format.
    #[serde(default)]
    pub format: TraceFormat,
    /// Multiplies trace time: 0.5 replays twice as fast.
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Keep rows at or after this many seconds from the trace's first row.
    #[serde(default)]
    pub start_s: Option<f64>,
    /// Keep rows before this many seconds from the trace's first row.
    #[serde(default)]
    pub end_s: Option<f64>,
    /// Multiplies prompt lengths.
    #[serde(default = "one")]
    pub prefill_scale: f64,
    /// Multiplies output lengths.
    #[serde(default = "one")]
    pub decode_scale: f64,
    /// Tokens per `hash_ids` block in JSONL traces (Mooncake uses 512).
    #[serde(default = "default_hash_block")]
    pub hash_block_tokens: u32,
    /// A JSONL file whose lines carry the prompts' real token ids (`input_tok_ids`, as
    /// LLMServingSim's workload files do), matched to the trace's rows in order; each must have
    /// as many ids as its row's prompt. Prefix caching then hits what the real engine hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}
fn default_hash_block() -> u32 {
    512
}

/// How long prompts and outputs are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthsConfig {
    /// Every request the same.
    Fixed {
        /// Prompt tokens.
        prompt: u32,
        /// Output tokens.
        output: u32,
    },
    /// Prompt and output drawn independently.
    Independent {
        /// Prompt-length distribution.
        prompt: LengthDist,
        /// Output-length distribution.
        output: LengthDist,
    },
    /// (prompt, output) pairs drawn with replacement from a trace's rows.
    Trace {
        /// The trace file.
        path: PathBuf,
        /// Its format.
        #[serde(default)]
        format: TraceFormat,
        /// Multiplies prompt lengths.
        #[serde(default = "one")]
        prefill_scale: f64,
        /// Multiplies output lengths.
        #[serde(default = "one")]
        decode_scale: f64,
    },
}

/// A distribution of token counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthDist {
    /// Always `value`.
    Fixed {
        /// The length.
        value: u32,
    },
    /// Uniform on `min..=max`.
    Uniform {
        /// Smallest.
        min: u32,
        /// Largest.
        max: u32,
    },
    /// Zipf over `min..=max`: `min` is the most frequent, rank `k` has weight `1/k^theta`.
    Zipf {
        /// Smallest (most frequent).
        min: u32,
        /// Largest.
        max: u32,
        /// Exponent (> 0).
        theta: f64,
    },
    /// Lognormal with the given median and log-space standard deviation, clipped to
    /// `min..=max` (mean = median·exp(sigma²/2) before clipping).
    Lognormal {
        /// Median.
        median: f64,
        /// Standard deviation of ln(length).
        sigma: f64,
        /// Smallest kept (draws below are raised to it).
        #[serde(default = "one_u32")]
        min: u32,
        /// Largest kept (draws above are lowered to it).
        max: u32,
    },
}

fn one_u32() -> u32 {
    1
}

/// Shared prompt prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixConfig {
    /// Number of distinct shared prefixes.
    pub groups: u32,
    /// Tokens in each shared prefix (a prompt shorter than this is lengthened to it).
    pub tokens: u32,
    /// Fraction of requests that start with a shared prefix, in [0, 1].
    #[serde(default = "one")]
    pub fraction: f64,
    /// Zipf exponent of the prefixes' popularity (0 = uniform).
    #[serde(default)]
    pub theta: f64,
}

/// One tenant of a multi-tenant mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name for reports.
    pub name: String,
    /// Relative share of the requests (> 0).
    #[serde(default = "one")]
    pub weight: f64,
    /// Scheduling priority of its requests (lower first).
    #[serde(default)]
    pub priority: i32,
    /// SLO class index reported with its requests.
    #[serde(default)]
    pub slo_class: Option<u32>,
    /// Relative deadline of its requests in seconds.
    #[serde(default)]
    pub deadline_s: Option<f64>,
    /// Its own lengths (default: the workload's).
    #[serde(default)]
    pub lengths: Option<LengthsConfig>,
}

fn positive_finite(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl LengthDist {
    fn validate(&self, field: &str) -> Result<()> {
        match *self {
            LengthDist::Fixed { value } => ensure(
                value >= 1,
                &format!("{field}.value"),
                value,
                "an integer ≥ 1",
            ),
            LengthDist::Uniform { min, max } | LengthDist::Zipf { min, max, .. } => {
                ensure(min >= 1, &format!("{field}.min"), min, "an integer ≥ 1")?;
                ensure(
                    max >= min,
                    &format!("{field}.max"),
                    max,
                    &format!("an integer ≥ min = {min}"),
                )?;
                if let LengthDist::Zipf { theta, .. } = *self {
                    ensure(
                        positive_finite(theta),
                        &format!("{field}.theta"),
                        theta,
                        "a finite number > 0",
                    )?;
                }
                Ok(())
            }
            LengthDist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => {
                ensure(
                    positive_finite(median),
                    &format!("{field}.median"),
                    median,
                    "a finite number > 0",
                )?;
                ensure(
                    sigma.is_finite() && sigma >= 0.0,
                    &format!("{field}.sigma"),
                    sigma,
                    "a finite number ≥ 0",
                )?;
                ensure(min >= 1, &format!("{field}.min"), min, "an integer ≥ 1")?;
                ensure(
                    max >= min,
                    &format!("{field}.max"),
                    max,
                    &format!("an integer ≥ min = {min}"),
                )
            }
        }
    }
}

impl WorkloadConfig {
    /// Every input file the workload names (trace arrivals and their prompt tokens, a sessions'
    /// conversation file, trace lengths, tenants' trace lengths), to rebase relative paths.
    pub fn input_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut out = Vec::new();
        match &mut self.arrival {
            ArrivalConfig::Trace(t) => {
                out.push(&mut t.path);
                out.extend(t.prompt_tokens.as_mut());
            }
            ArrivalConfig::Sessions(s) => out.extend(s.conversations.as_mut()),
            _ => {}
        }
        let tenant_lengths = self.tenants.iter_mut().filter_map(|t| t.lengths.as_mut());
        for l in self.lengths.as_mut().into_iter().chain(tenant_lengths) {
            if let LengthsConfig::Trace { path, .. } = l {
                out.push(path);
            }
        }
        out
    }
}

impl LengthsConfig {
    fn validate(&self, field: &str) -> Result<()> {
        match self {
            LengthsConfig::Fixed { prompt, output } => {
                ensure(
                    *prompt >= 1,
                    &format!("{field}.prompt"),
                    prompt,
                    "an integer ≥ 1",
                )?;
                ensure(
                    *output >= 1,
                    &format!("{field}.output"),
                    output,
                    "an integer ≥ 1",
                )
            }
            LengthsConfig::Independent { prompt, output } => {
                prompt.validate(&format!("{field}.prompt"))?;
                output.validate(&format!("{field}.output"))
            }
            LengthsConfig::Trace {
                prefill_scale,
                decode_scale,
                ..
            } => {
                ensure(
                    positive_finite(*prefill_scale),
                    &format!("{field}.prefill_scale"),
                    prefill_scale,
                    "a finite number > 0",
                )?;
                ensure(
                    positive_finite(*decode_scale),
                    &format!("{field}.decode_scale"),
                    decode_scale,
                    "a finite number > 0",
                )
            }
        }
    }
}

impl SessionsConfig {
    /// Checks every field (`workload.arrival.…`).
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<()> {
        ensure(
            positive_finite(self.qps),
            "workload.arrival.qps",
            self.qps,
            "a finite rate > 0 (sessions/s)",
        )?;
        ensure(
            self.turns_min >= 1,
            "workload.arrival.turns_min",
            self.turns_min,
            "an integer ≥ 1",
        )?;
        match (self.turns_max, &self.conversations) {
            (Some(max), None) => ensure(
                max >= self.turns_min,
                "workload.arrival.turns_max",
                max,
                &format!("an integer ≥ turns_min = {}", self.turns_min),
            )?,
            (None, None) => ensure(
                false,
                "workload.arrival.turns_max",
                "(absent)",
                "an integer ≥ turns_min (or a conversations file)",
            )?,
            (Some(max), Some(_)) => ensure(
                false,
                "workload.arrival.turns_max",
                max,
                "absent with a conversations file, which gives every session's turns",
            )?,
            (None, Some(_)) => ensure(
                self.turns_min == 1,
                "workload.arrival.turns_min",
                self.turns_min,
                "absent with a conversations file, which gives every session's turns",
            )?,
        }
        for (field, v) in [
            ("workload.arrival.think_time_s", self.think_time_s),
            ("workload.arrival.tool_time_s", self.tool_time_s),
        ] {
            ensure(
                v.is_finite() && (0.0..=MAX_SECS).contains(&v),
                field,
                v,
                "a finite number of seconds ≥ 0",
            )?;
        }
        ensure(
            (0.0..=1.0).contains(&self.tool_call_probability),
            "workload.arrival.tool_call_probability",
            self.tool_call_probability,
            "a probability in [0, 1]",
        )?;
        ensure(
            self.system_prompts >= 1,
            "workload.arrival.system_prompts",
            self.system_prompts,
            "an integer ≥ 1",
        )?;
        ensure(
            self.hash_block_tokens >= 1,
            "workload.arrival.hash_block_tokens",
            self.hash_block_tokens,
            "an integer ≥ 1",
        )
    }
}

impl WorkloadConfig {
    /// The longest prompt + output a request of this workload may have when the model (or
    /// server) takes `limit` tokens: `max_tokens` when it is set and smaller. Longer requests
    /// are clipped to it.
    pub fn longest_request(&self, limit: u32) -> u32 {
        self.max_tokens.map_or(limit, |m| m.min(limit))
    }

    /// An open loop of `num_requests` at `qps` whose mean last arrival, `num_requests / qps`,
    /// is past the simulator's clock ([`MAX_SECS`]) is an error, not a run whose times saturate.
    fn check_horizon(&self) -> Result<()> {
        let qps = match &self.arrival {
            ArrivalConfig::Poisson { qps, .. }
            | ArrivalConfig::Constant { qps }
            | ArrivalConfig::Gamma { qps, .. } => *qps,
            _ => return Ok(()),
        };
        let Some(n) = self.num_requests else {
            return Ok(());
        };
        let horizon = n as f64 / qps;
        if positive_finite(qps) && horizon > MAX_SECS {
            return Err(vajra_core::CoreError::invalid(
                "workload.arrival.qps",
                qps,
                format!(
                    "a rate whose {n} requests arrive within the simulator's clock of {MAX_SECS:e} s (about 317 years; these would take {horizon:.3e} s): is the rate in requests per second?"
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Checks every field; errors name the field (`workload.…`), the value and what is allowed.
    ///
    /// # Errors
    /// The first field that is out of range or a combination that cannot run.
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.num_requests {
            ensure(n >= 1, "workload.num_requests", n, "an integer ≥ 1")?;
        }
        if let Some(d) = self.duration_s {
            ensure(
                positive_finite(d) && d <= MAX_SECS,
                "workload.duration_s",
                d,
                &format!("a number of seconds in (0, {MAX_SECS:e}] (the simulator's clock)"),
            )?;
        }
        self.check_horizon()?;
        if let Some(m) = self.max_tokens {
            ensure(m >= 2, "workload.max_tokens", m, "an integer ≥ 2")?;
        }
        if let Some(d) = self.deadline_s {
            ensure(
                positive_finite(d),
                "workload.deadline_s",
                d,
                "a finite number of seconds > 0",
            )?;
        }
        match &self.arrival {
            ArrivalConfig::Poisson { qps, .. } | ArrivalConfig::Constant { qps } => ensure(
                positive_finite(*qps),
                "workload.arrival.qps",
                qps,
                "a finite rate > 0 (requests/s)",
            )?,
            ArrivalConfig::Gamma { qps, cv } => {
                ensure(
                    positive_finite(*qps),
                    "workload.arrival.qps",
                    qps,
                    "a finite rate > 0 (requests/s)",
                )?;
                ensure(
                    positive_finite(*cv),
                    "workload.arrival.cv",
                    cv,
                    "a finite number > 0 (1 = Poisson)",
                )?;
            }
            ArrivalConfig::AllAtOnce => {}
            ArrivalConfig::Trace(t) => {
                ensure(
                    positive_finite(t.time_scale),
                    "workload.arrival.time_scale",
                    t.time_scale,
                    "a finite number > 0",
                )?;
                ensure(
                    positive_finite(t.prefill_scale),
                    "workload.arrival.prefill_scale",
                    t.prefill_scale,
                    "a finite number > 0",
                )?;
                ensure(
                    positive_finite(t.decode_scale),
                    "workload.arrival.decode_scale",
                    t.decode_scale,
                    "a finite number > 0",
                )?;
                ensure(
                    t.hash_block_tokens >= 1,
                    "workload.arrival.hash_block_tokens",
                    t.hash_block_tokens,
                    "an integer ≥ 1",
                )?;
                if let (Some(a), Some(b)) = (t.start_s, t.end_s) {
                    ensure(
                        b > a,
                        "workload.arrival.end_s",
                        b,
                        &format!("a time after start_s = {a}"),
                    )?;
                }
                ensure(
                    self.lengths.is_none(),
                    "workload.lengths",
                    "(set)",
                    "absent when arrival.type = \"trace\": a replayed trace carries its own lengths",
                )?;
            }
            ArrivalConfig::Sessions(c) => c.validate()?,
            ArrivalConfig::ClosedLoop {
                clients,
                think_time_s,
                ..
            } => {
                ensure(
                    *clients >= 1,
                    "workload.arrival.clients",
                    clients,
                    "an integer ≥ 1",
                )?;
                ensure(
                    think_time_s.is_finite() && *think_time_s >= 0.0,
                    "workload.arrival.think_time_s",
                    think_time_s,
                    "a finite number of seconds ≥ 0",
                )?;
                ensure(
                    self.num_requests.is_some() || self.duration_s.is_some(),
                    "workload.num_requests",
                    "(absent)",
                    "set (or duration_s) for a closed loop, which otherwise never ends",
                )?;
            }
        }
        let conversations =
            matches!(&self.arrival, ArrivalConfig::Sessions(s) if s.conversations.is_some());
        if conversations {
            ensure(
                self.lengths.is_none() && self.tenants.iter().all(|t| t.lengths.is_none()),
                "workload.lengths",
                "(set)",
                "absent with arrival.conversations: the conversations carry their own lengths",
            )?;
        }
        let replay = matches!(self.arrival, ArrivalConfig::Trace(_));
        if !replay {
            ensure(
                self.num_requests.is_some() || self.duration_s.is_some(),
                "workload.num_requests",
                "(absent)",
                "an integer ≥ 1 (or set duration_s)",
            )?;
            let every_tenant_has_lengths =
                !self.tenants.is_empty() && self.tenants.iter().all(|t| t.lengths.is_some());
            ensure(
                self.lengths.is_some() || every_tenant_has_lengths || conversations,
                "workload.lengths",
                "(absent)",
                "a table: type = \"fixed\" | \"independent\" | \"trace\"",
            )?;
        }
        if matches!(self.arrival, ArrivalConfig::AllAtOnce) {
            ensure(
                self.num_requests.is_some(),
                "workload.num_requests",
                "(absent)",
                "set for arrival.type = \"all_at_once\"",
            )?;
        }
        if let Some(l) = &self.lengths {
            l.validate("workload.lengths")?;
        }
        if let Some(p) = &self.prefix {
            ensure(
                !matches!(self.arrival, ArrivalConfig::Sessions(_)),
                "workload.prefix",
                "(set)",
                "absent for arrival.type = \"sessions\" (use arrival.system_prompt_tokens and system_prompts: a session's own turns share its prefix)",
            )?;
            ensure(p.groups >= 1, "workload.prefix.groups", p.groups, "≥ 1")?;
            ensure(p.tokens >= 1, "workload.prefix.tokens", p.tokens, "≥ 1")?;
            ensure(
                (0.0..=1.0).contains(&p.fraction),
                "workload.prefix.fraction",
                p.fraction,
                "a number in [0, 1]",
            )?;
            ensure(
                p.theta.is_finite() && p.theta >= 0.0,
                "workload.prefix.theta",
                p.theta,
                "a finite number ≥ 0",
            )?;
        }
        for (i, t) in self.tenants.iter().enumerate() {
            let f = format!("workload.tenants[{i}]");
            ensure(
                positive_finite(t.weight),
                &format!("{f}.weight"),
                t.weight,
                "a finite number > 0",
            )?;
            if let Some(d) = t.deadline_s {
                ensure(
                    positive_finite(d),
                    &format!("{f}.deadline_s"),
                    d,
                    "a finite number of seconds > 0",
                )?;
            }
            if let Some(l) = &t.lengths {
                ensure(
                    !replay,
                    &format!("{f}.lengths"),
                    "(set)",
                    "absent when arrival.type = \"trace\"",
                )?;
                l.validate(&format!("{f}.lengths"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<WorkloadConfig, toml::de::Error> {
        toml::from_str(s)
    }

    #[test]
    fn a_poisson_workload_with_trace_lengths_parses_and_validates() {
        let w = parse(
            r#"num_requests = 100
               arrival = { type = "poisson", qps = 4.0 }
               lengths = { type = "trace", path = "t.csv" }"#,
        )
        .unwrap();
        w.validate().unwrap();
    }

    #[test]
    fn an_unknown_arrival_type_is_rejected_naming_the_variants() {
        let e = parse(
            r#"num_requests = 1
               arrival = { type = "poison", qps = 4.0 }
               lengths = { type = "fixed", prompt = 1, output = 1 }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("poison") && e.contains("poisson"), "{e}");
    }

    #[test]
    fn a_negative_rate_is_rejected_naming_the_field() {
        let w = parse(
            r#"num_requests = 1
               arrival = { type = "gamma", qps = -1.0, cv = 2.0 }
               lengths = { type = "fixed", prompt = 1, output = 1 }"#,
        )
        .unwrap();
        let e = w.validate().unwrap_err().to_string();
        assert!(e.contains("workload.arrival.qps"), "{e}");
    }

    #[test]
    fn trace_replay_refuses_separate_lengths() {
        let w = parse(
            r#"arrival = { type = "trace", path = "t.csv" }
               lengths = { type = "fixed", prompt = 1, output = 1 }"#,
        )
        .unwrap();
        let e = w.validate().unwrap_err().to_string();
        assert!(e.contains("workload.lengths"), "{e}");
    }

    #[test]
    fn missing_request_count_is_an_error_for_synthetic_arrivals() {
        let w = parse(
            r#"arrival = { type = "poisson", qps = 1.0 }
               lengths = { type = "fixed", prompt = 1, output = 1 }"#,
        )
        .unwrap();
        let e = w.validate().unwrap_err().to_string();
        assert!(e.contains("workload.num_requests"), "{e}");
    }

    #[test]
    fn inverted_uniform_bounds_are_rejected() {
        let w = parse(
            r#"num_requests = 3
               arrival = { type = "poisson", qps = 1.0 }
               lengths = { type = "independent", prompt = { type = "uniform", min = 10, max = 5 }, output = { type = "fixed", value = 3 } }"#,
        )
        .unwrap();
        let e = w.validate().unwrap_err().to_string();
        assert!(e.contains("workload.lengths.prompt.max"), "{e}");
    }
}
