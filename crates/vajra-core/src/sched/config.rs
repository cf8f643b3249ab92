//! Scheduler configuration: a batching policy (tagged enum), a waiting-queue order, a
//! preemption mode and the running-request cap. Built into a scheduler by an exhaustive
//! `match` in [`crate::sched::Scheduler::new`].
//!
//! ```toml
//! [scheduler]
//! max_num_seqs = 128
//! preemption = "recompute"
//! queue = { type = "sjf", aging_tokens_per_sec = 1000.0 }
//! policy = { type = "sarathi", chunk_size = 512 }
//! ```

use super::policy::BatchPolicy;
use crate::error::{CoreError, Result, ensure};
use serde::{Deserialize, Serialize};

/// Default cap on running requests (vLLM, Sarathi-Serve and Vidur use 128).
pub const DEFAULT_MAX_NUM_SEQS: u32 = 128;
/// Default token budget of a vLLM v1 step.
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: u32 = 2048;
/// Default Sarathi-Serve chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 512;
/// Default budget of prefill-prioritised and LightLLM batches (Vidur's `max_tokens_in_batch`).
pub const DEFAULT_PREFILL_BATCH_TOKENS: u32 = 4096;
/// Default LightLLM decode iterations before a waiting prefill may run.
pub const DEFAULT_MAX_WAITING_ITERS: u32 = 10;

/// The scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The batching policy.
    pub policy: PolicyConfig,
    /// Most requests running (holding KV and being scheduled) at once.
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: u32,
    /// Order of the waiting queue.
    #[serde(default)]
    pub queue: QueuePolicy,
    /// What preemption does with a victim's KV.
    #[serde(default)]
    pub preemption: PreemptionMode,
    /// What happens to a request still waiting, never scheduled, when its TTFT deadline
    /// (its SLO class's or the run's `ttft_s` after arrival) has passed.
    #[serde(default)]
    pub late_requests: LatePolicy,
    /// Form each step while the previous one runs (vLLM's `async_scheduling`, which vLLM
    /// v0.19 runs by default): a request that arrives while a step is in flight is first
    /// considered for the step after the next one, because the next was formed before it came
    /// (an idle replica still takes it at once). Off (the default here): each step is formed
    /// after the previous ended, as the project's engine loop runs.
    #[serde(default)]
    pub async_scheduling: bool,
}

/// What the scheduler does with a request that can no longer meet its TTFT target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Serve it anyway (vLLM, SGLang).
    #[default]
    Serve,
    /// Reject it (finish reason `rejected`, counted in the summary as `requests_rejected`)
    /// before it takes any KV or compute, so the capacity goes to requests that can still
    /// meet their targets.
    Reject,
}

fn default_max_num_seqs() -> u32 {
    DEFAULT_MAX_NUM_SEQS
}

impl SchedulerConfig {
    /// A config with the policy's defaults, FCFS, recompute and 128 running requests.
    pub fn new(policy: PolicyConfig) -> Self {
        SchedulerConfig {
            policy,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            queue: QueuePolicy::Fcfs,
            preemption: PreemptionMode::Recompute,
            late_requests: LatePolicy::Serve,
            async_scheduling: false,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// A zero budget or cap, a bad chunk schedule, or a negative weight.
    pub fn validate(&self) -> Result<()> {
        let n = self.max_num_seqs;
        ensure(n >= 1, "scheduler.max_num_seqs", n, "an integer ≥ 1")?;
        self.policy.validate()?;
        self.queue.validate()
    }
}

/// The batching policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PolicyConfig {
    /// vLLM v1: running first, then waiting, under one token budget, chunked prefill.
    VllmV1(VllmV1Config),
    /// Sarathi-Serve: stall-free decodes first, then partial prefills, then new requests.
    Sarathi(SarathiConfig),
    /// Prefill-prioritised (vLLM v0 and Vidur's `vllm`): prefill-only or decode-only steps.
    VllmV0(VllmV0Config),
    /// Orca: iteration-level batching with worst-case KV reservation.
    Orca(OrcaConfig),
    /// FasterTransformer: request-level static batches.
    FasterTransformer(FasterTransformerConfig),
    /// LightLLM: admission by a future-usage check; prefill when idle or after waiting.
    Lightllm(LightllmConfig),
}

impl PolicyConfig {
    /// Every in-tree policy with its default parameters, in the order `vajra-sim list` and
    /// the engine's `--help` show them. This is the registry's list of names: nothing else
    /// spells them (a test checks that it holds every variant).
    pub fn registered() -> [PolicyConfig; 6] {
        [
            PolicyConfig::VllmV1(VllmV1Config::default()),
            PolicyConfig::Sarathi(SarathiConfig::default()),
            PolicyConfig::VllmV0(VllmV0Config::default()),
            PolicyConfig::Orca(OrcaConfig::default()),
            PolicyConfig::FasterTransformer(FasterTransformerConfig::default()),
            PolicyConfig::Lightllm(LightllmConfig::default()),
        ]
    }

    /// Builds the in-tree policy this config names (the registry: one exhaustive `match`).
    pub fn build(&self) -> Box<dyn BatchPolicy> {
        match self {
            PolicyConfig::VllmV1(c) => Box::new(super::vllm_v1::VllmV1(*c)),
            PolicyConfig::Sarathi(c) => Box::new(super::sarathi::Sarathi(*c)),
            PolicyConfig::VllmV0(c) => Box::new(super::vllm_v0::VllmV0(*c)),
            PolicyConfig::Orca(_) => Box::new(super::orca::Orca),
            PolicyConfig::FasterTransformer(_) => {
                Box::new(super::faster_transformer::FasterTransformer)
            }
            PolicyConfig::Lightllm(c) => Box::new(super::lightllm::Lightllm::new(*c)),
        }
    }

    /// The policy named `name` with its default parameters.
    ///
    /// # Errors
    /// An unknown name; the message lists the registered ones.
    pub fn by_name(name: &str) -> Result<PolicyConfig> {
        Self::registered()
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                CoreError::invalid(
                    "scheduler.policy.type",
                    name,
                    Self::registered().map(|p| p.name()).join(", "),
                )
            })
    }

    /// The policy's name as written in config files.
    pub fn name(&self) -> &'static str {
        match self {
            PolicyConfig::VllmV1(_) => "vllm_v1",
            PolicyConfig::Sarathi(_) => "sarathi",
            PolicyConfig::VllmV0(_) => "vllm_v0",
            PolicyConfig::Orca(_) => "orca",
            PolicyConfig::FasterTransformer(_) => "faster_transformer",
            PolicyConfig::Lightllm(_) => "lightllm",
        }
    }

    /// The policy's per-step token budget, if it has one.
    pub fn token_budget(&self) -> Option<u32> {
        match self {
            PolicyConfig::VllmV1(c) => Some(c.max_num_batched_tokens),
            PolicyConfig::Sarathi(c) => Some(c.chunk_size),
            PolicyConfig::VllmV0(c) => Some(c.max_num_batched_tokens),
            PolicyConfig::Lightllm(c) => Some(c.max_num_batched_tokens),
            PolicyConfig::Orca(_) | PolicyConfig::FasterTransformer(_) => None,
        }
    }

    fn validate(&self) -> Result<()> {
        if let Some(b) = self.token_budget() {
            let field = match self {
                PolicyConfig::Sarathi(_) => "scheduler.policy.chunk_size",
                _ => "scheduler.policy.max_num_batched_tokens",
            };
            ensure(b >= 1, field, b, "an integer ≥ 1")?;
        }
        if let PolicyConfig::Sarathi(SarathiConfig {
            chunk_schedule: Some(s),
            ..
        }) = self
        {
            s.validate()?;
        }
        Ok(())
    }
}

/// vLLM v1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VllmV1Config {
    /// Token budget of one step, shared by running and waiting requests.
    pub max_num_batched_tokens: u32,
    /// Split prompts across steps. When off, a waiting prompt that does not fit the remaining
    /// budget stops admission, and the budget must be at least `max_model_len`.
    pub enable_chunked_prefill: bool,
    /// Cap on one request's tokens per step (vLLM's `long_prefill_token_threshold`); 0 is off.
    pub long_prefill_token_threshold: u32,
    /// Admit a waiting request only when blocks for all its tokens not yet computed are free
    /// now, though only its first chunk's are taken (vLLM's `scheduler_reserve_full_isl`, on
    /// by default there: it keeps chunked prefill from admitting prompts the pool cannot
    /// finish). Off: admission needs only the chunk's blocks.
    pub reserve_full_isl: bool,
}

impl Default for VllmV1Config {
    fn default() -> Self {
        VllmV1Config {
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            reserve_full_isl: true,
        }
    }
}

/// Sarathi-Serve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SarathiConfig {
    /// Tokens per step (decodes count one each).
    pub chunk_size: u32,
    /// How a new request's KV is reserved.
    pub admission: AdmissionMode,
    /// Optional dynamic chunk size that shrinks as a prompt progresses.
    pub chunk_schedule: Option<ChunkSchedule>,
}

impl Default for SarathiConfig {
    fn default() -> Self {
        SarathiConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            admission: AdmissionMode::Reserve,
            chunk_schedule: None,
        }
    }
}

/// How a new request's KV blocks are reserved at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionMode {
    /// All prompt blocks at admission (Sarathi-Serve and Vidur): ongoing prefills never need
    /// memory mid-flight.
    #[default]
    Reserve,
    /// Only the blocks of each scheduled chunk (vLLM v1 style).
    Incremental,
}

/// Sarathi-Serve's dynamic chunk schedule: the chunk size falls linearly from `high` to `low`
/// over `stages` equal slices of `max_tokens` prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkSchedule {
    /// Chunk size at the start of a prompt.
    pub high: u32,
    /// Chunk size in the last stage.
    pub low: u32,
    /// Number of stages (≥ 2).
    pub stages: u32,
    /// Prompt tokens over which the stages spread.
    pub max_tokens: u32,
}

impl ChunkSchedule {
    fn validate(&self) -> Result<()> {
        ensure(
            self.low >= 1 && self.low <= self.high,
            "scheduler.policy.chunk_schedule.low",
            self.low,
            &format!("1 ≤ low ≤ high = {}", self.high),
        )?;
        ensure(
            self.stages >= 2,
            "scheduler.policy.chunk_schedule.stages",
            self.stages,
            "an integer ≥ 2",
        )?;
        ensure(
            self.max_tokens >= self.stages,
            "scheduler.policy.chunk_schedule.max_tokens",
            self.max_tokens,
            "at least `stages`",
        )
    }

    /// The chunk size for a prompt with `done` tokens already computed.
    pub fn chunk_at(&self, done: u32) -> u32 {
        let per_stage = self.max_tokens.div_ceil(self.stages);
        let stage = (done / per_stage).min(self.stages - 1);
        let drop = u64::from(self.high - self.low) * u64::from(stage) / u64::from(self.stages - 1);
        self.high - drop as u32
    }
}

/// Prefill-prioritised scheduling (vLLM v0, Vidur's `vllm`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VllmV0Config {
    /// Token budget of a prefill step; must be at least `max_model_len`.
    pub max_num_batched_tokens: u32,
    /// Count a prefill batch as `len(batch) × longest prompt` tokens (Vidur's padded model)
    /// instead of the sum of prompt lengths.
    pub padded_budget: bool,
}

impl Default for VllmV0Config {
    fn default() -> Self {
        VllmV0Config {
            max_num_batched_tokens: DEFAULT_PREFILL_BATCH_TOKENS,
            padded_budget: false,
        }
    }
}

/// Orca (no options beyond `max_num_seqs`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrcaConfig {}

/// FasterTransformer (batch size is `max_num_seqs`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FasterTransformerConfig {}

/// LightLLM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LightllmConfig {
    /// Token budget of a prefill step; must be at least `max_model_len`.
    pub max_num_batched_tokens: u32,
    /// Decode-only steps after which a waiting prefill may run while requests are running.
    pub max_waiting_iters: u32,
}

impl Default for LightllmConfig {
    fn default() -> Self {
        LightllmConfig {
            max_num_batched_tokens: DEFAULT_PREFILL_BATCH_TOKENS,
            max_waiting_iters: DEFAULT_MAX_WAITING_ITERS,
        }
    }
}

/// Order of the waiting queue.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueuePolicy {
    /// First come, first served; preempted requests go back to the front.
    #[default]
    Fcfs,
    /// Lower `priority` first, ties by arrival. Memory pressure preempts the running request
    /// with the largest (priority, arrival). With aging, a request's priority value falls by
    /// `aging_per_sec` for each second it waits.
    Priority {
        /// Priority levels gained per second of waiting (0: no aging).
        #[serde(default)]
        aging_per_sec: f64,
    },
    /// Shortest remaining prompt first. With aging, a request's length counts
    /// `aging_tokens_per_sec` tokens less for each second it waits, so a request of `L` tokens
    /// is overtaken only by requests that arrived less than `L / aging_tokens_per_sec` seconds
    /// after it (the starvation bound).
    Sjf {
        /// Tokens of credit per second of waiting (0: no aging).
        #[serde(default)]
        aging_tokens_per_sec: f64,
    },
    /// Earliest deadline first; requests without a deadline go last, by arrival.
    Edf,
    /// Virtual token counters (Sheng et al., "Fairness in Serving LLMs"): serve the tenant with
    /// the least weighted service; a tenant that rejoins is lifted to the smallest active
    /// counter so it cannot bank idle time.
    Vtc {
        /// Weight of a prompt token.
        #[serde(default = "one")]
        input_weight: f64,
        /// Weight of an output token.
        #[serde(default = "two")]
        output_weight: f64,
    },
}

impl QueuePolicy {
    /// Every waiting-queue order with its default parameters (the registry's list of names).
    pub fn registered() -> [QueuePolicy; 5] {
        [
            QueuePolicy::Fcfs,
            QueuePolicy::Priority { aging_per_sec: 0.0 },
            QueuePolicy::Sjf {
                aging_tokens_per_sec: 0.0,
            },
            QueuePolicy::Edf,
            QueuePolicy::Vtc {
                input_weight: one(),
                output_weight: two(),
            },
        ]
    }

    /// The order's name as written in config files.
    pub fn name(&self) -> &'static str {
        match self {
            QueuePolicy::Fcfs => "fcfs",
            QueuePolicy::Priority { .. } => "priority",
            QueuePolicy::Sjf { .. } => "sjf",
            QueuePolicy::Edf => "edf",
            QueuePolicy::Vtc { .. } => "vtc",
        }
    }
}

fn one() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}

impl QueuePolicy {
    fn validate(&self) -> Result<()> {
        let checks: &[(&str, f64)] = match self {
            QueuePolicy::Priority { aging_per_sec } => {
                &[("scheduler.queue.aging_per_sec", *aging_per_sec)]
            }
            QueuePolicy::Sjf {
                aging_tokens_per_sec,
            } => &[(
                "scheduler.queue.aging_tokens_per_sec",
                *aging_tokens_per_sec,
            )],
            QueuePolicy::Vtc {
                input_weight,
                output_weight,
            } => &[
                ("scheduler.queue.input_weight", *input_weight),
                ("scheduler.queue.output_weight", *output_weight),
            ],
            QueuePolicy::Fcfs | QueuePolicy::Edf => &[],
        };
        for &(field, v) in checks {
            ensure(v.is_finite() && v >= 0.0, field, v, "a finite number ≥ 0")?;
        }
        Ok(())
    }
}

/// What preemption does with the victim's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptionMode {
    /// Free the KV and recompute it on resumption (vLLM v1, Sarathi-Serve, Vidur).
    #[default]
    Recompute,
    /// Copy the KV to host blocks and back (needs `cache.swap_blocks`); falls back to
    /// recompute when the host is full.
    Swap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_from_toml_with_defaults() {
        let c: SchedulerConfig = toml::from_str(
            r#"
            max_num_seqs = 64
            queue = { type = "sjf", aging_tokens_per_sec = 100.0 }
            policy = { type = "sarathi", chunk_size = 256 }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_num_seqs, 64);
        match c.policy {
            PolicyConfig::Sarathi(s) => {
                assert_eq!(s.chunk_size, 256);
                assert_eq!(s.admission, AdmissionMode::Reserve);
            }
            other => panic!("{other:?}"),
        }
        for name in [
            "vllm_v1",
            "sarathi",
            "vllm_v0",
            "orca",
            "faster_transformer",
            "lightllm",
        ] {
            let c: SchedulerConfig =
                toml::from_str(&format!("policy = {{ type = \"{name}\" }}")).unwrap();
            assert_eq!(c.policy.name(), name);
            c.validate().unwrap();
        }
    }

    #[test]
    fn an_unknown_policy_is_rejected_naming_the_allowed_ones() {
        let err = toml::from_str::<SchedulerConfig>("policy = { type = \"vllm_v2\" }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vllm_v2") && err.contains("sarathi"), "{err}");
    }

    #[test]
    fn an_unknown_policy_field_is_rejected() {
        let err = toml::from_str::<SchedulerConfig>("policy = { type = \"sarathi\", chunk = 5 }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunk"), "{err}");
    }

    #[test]
    fn zero_budget_is_rejected_with_the_field_path() {
        let c = SchedulerConfig::new(PolicyConfig::Sarathi(SarathiConfig {
            chunk_size: 0,
            ..Default::default()
        }));
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("scheduler.policy.chunk_size"), "{err}");
    }

    #[test]
    fn chunk_schedule_falls_linearly_from_high_to_low() {
        let s = ChunkSchedule {
            high: 1024,
            low: 256,
            stages: 4,
            max_tokens: 4096,
        };
        assert_eq!(s.chunk_at(0), 1024);
        assert_eq!(s.chunk_at(1024), 768);
        assert_eq!(s.chunk_at(2048), 512);
        assert_eq!(s.chunk_at(3072), 256);
        assert_eq!(s.chunk_at(100_000), 256);
    }

    /// An index per variant through an exhaustive match: a new variant fails to compile here
    /// until it is given one, and the test below then fails until `registered()` lists it.
    fn policy_index(p: &PolicyConfig) -> usize {
        match p {
            PolicyConfig::VllmV1(_) => 0,
            PolicyConfig::Sarathi(_) => 1,
            PolicyConfig::VllmV0(_) => 2,
            PolicyConfig::Orca(_) => 3,
            PolicyConfig::FasterTransformer(_) => 4,
            PolicyConfig::Lightllm(_) => 5,
        }
    }

    fn queue_index(q: &QueuePolicy) -> usize {
        match q {
            QueuePolicy::Fcfs => 0,
            QueuePolicy::Priority { .. } => 1,
            QueuePolicy::Sjf { .. } => 2,
            QueuePolicy::Edf => 3,
            QueuePolicy::Vtc { .. } => 4,
        }
    }

    #[test]
    fn the_registry_lists_every_policy_once_under_the_name_its_config_file_uses() {
        let all = PolicyConfig::registered();
        let idx: Vec<usize> = all.iter().map(policy_index).collect();
        assert_eq!(idx, (0..all.len()).collect::<Vec<_>>());
        for p in &all {
            let parsed: PolicyConfig =
                toml::from_str(&format!("type = {:?}", p.name())).expect("the name parses");
            assert_eq!(&parsed, p, "defaults of {}", p.name());
            assert_eq!(p.build().name(), p.name(), "the built policy's name");
            assert_eq!(PolicyConfig::by_name(p.name()).unwrap(), *p);
        }
        let err = PolicyConfig::by_name("fifo").unwrap_err().to_string();
        assert!(
            err.contains("scheduler.policy.type") && err.contains("lightllm"),
            "{err}"
        );
    }

    #[test]
    fn the_registry_lists_every_router_once_under_its_config_name() {
        use crate::router::RouterConfig;
        let index = |r: &RouterConfig| match r {
            RouterConfig::RoundRobin => 0,
            RouterConfig::Random => 1,
            RouterConfig::LeastOutstanding => 2,
            RouterConfig::LeastTokens => 3,
            RouterConfig::LeastKvUsage => 4,
            RouterConfig::PowerOfTwo => 5,
            RouterConfig::PrefixAffinity { .. } => 6,
            RouterConfig::Weighted { .. } => 7,
            RouterConfig::SessionAffinity { .. } => 8,
        };
        let all = RouterConfig::registered();
        let idx: Vec<usize> = all.iter().map(index).collect();
        assert_eq!(idx, (0..all.len()).collect::<Vec<_>>());
        for r in &all {
            let parsed: RouterConfig =
                toml::from_str(&format!("type = {:?}", r.name())).expect("the name parses");
            assert_eq!(&parsed, r, "defaults of {}", r.name());
        }
    }

    #[test]
    fn the_registry_lists_every_queue_order_once_under_its_config_name() {
        let all = QueuePolicy::registered();
        let idx: Vec<usize> = all.iter().map(queue_index).collect();
        assert_eq!(idx, (0..all.len()).collect::<Vec<_>>());
        for q in &all {
            let parsed: QueuePolicy =
                toml::from_str(&format!("type = {:?}", q.name())).expect("the name parses");
            assert_eq!(&parsed, q, "defaults of {}", q.name());
        }
    }
}
