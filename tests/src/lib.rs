//! Helpers shared by Vajra's cross-crate tests and benchmarks: a seeded workload generator and a
//! minimal replica loop (schedule → fixed-cost "execution" → update) with a linear step-time
//! model. The loop is deliberately simple; the real event loop and predictor live in the
//! simulator. Here it only has to drive the scheduler through realistic sequences of calls.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vajra_core::config::{CacheConfig, PolicyConfig, SchedulerConfig};
use vajra_core::ids::{RequestId, TenantId};
use vajra_core::request::{Prompt, Request};
use vajra_core::sched::output::{FinishedRecord, ModelRunnerOutput, RequestEvent, SchedulerOutput};
use vajra_core::sched::policy::{AdmitSpec, BatchPolicy, Reserve, Step};
use vajra_core::sched::{Scheduler, check_invariants};
use vajra_core::time::{Duration, Timestamp};

/// Every policy with its defaults, plus the non-default admission/chunking variants.
pub fn all_policies() -> Vec<PolicyConfig> {
    use vajra_core::sched::config::*;
    vec![
        PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 512,
            ..Default::default()
        }),
        PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 1024,
            enable_chunked_prefill: false,
            long_prefill_token_threshold: 0,
            reserve_full_isl: true,
        }),
        PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 512,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 128,
            reserve_full_isl: false,
        }),
        PolicyConfig::Sarathi(SarathiConfig {
            chunk_size: 256,
            ..Default::default()
        }),
        PolicyConfig::Sarathi(SarathiConfig {
            chunk_size: 256,
            admission: AdmissionMode::Incremental,
            chunk_schedule: None,
        }),
        PolicyConfig::Sarathi(SarathiConfig {
            chunk_size: 512,
            admission: AdmissionMode::Reserve,
            chunk_schedule: Some(ChunkSchedule {
                high: 512,
                low: 128,
                stages: 4,
                max_tokens: 1024,
            }),
        }),
        PolicyConfig::VllmV0(VllmV0Config {
            max_num_batched_tokens: 1024,
            padded_budget: false,
        }),
        PolicyConfig::VllmV0(VllmV0Config {
            max_num_batched_tokens: 1024,
            padded_budget: true,
        }),
        PolicyConfig::Orca(OrcaConfig {}),
        PolicyConfig::FasterTransformer(FasterTransformerConfig {}),
        PolicyConfig::Lightllm(LightllmConfig {
            max_num_batched_tokens: 1024,
            max_waiting_iters: 4,
        }),
    ]
}

/// A short label for a policy and its main knob, for tables.
pub fn describe(p: &PolicyConfig) -> String {
    use vajra_core::sched::config::AdmissionMode;
    match p {
        PolicyConfig::VllmV1(c) if !c.enable_chunked_prefill => {
            format!("vllm_v1 budget={} no-chunking", c.max_num_batched_tokens)
        }
        PolicyConfig::VllmV1(c) if c.long_prefill_token_threshold > 0 => format!(
            "vllm_v1 budget={} cap={}",
            c.max_num_batched_tokens, c.long_prefill_token_threshold
        ),
        PolicyConfig::VllmV1(c) => format!("vllm_v1 budget={}", c.max_num_batched_tokens),
        PolicyConfig::Sarathi(c) => match (c.chunk_schedule, c.admission) {
            (Some(s), _) => format!("sarathi dynamic chunk {}->{}", s.high, s.low),
            (None, AdmissionMode::Reserve) => format!("sarathi chunk={} reserve", c.chunk_size),
            (None, AdmissionMode::Incremental) => {
                format!("sarathi chunk={} incremental", c.chunk_size)
            }
        },
        PolicyConfig::VllmV0(c) if c.padded_budget => {
            format!("vllm_v0 budget={} padded", c.max_num_batched_tokens)
        }
        PolicyConfig::VllmV0(c) => format!("vllm_v0 budget={}", c.max_num_batched_tokens),
        PolicyConfig::Orca(_) => "orca".into(),
        PolicyConfig::FasterTransformer(_) => "faster_transformer".into(),
        PolicyConfig::Lightllm(c) => format!("lightllm budget={}", c.max_num_batched_tokens),
    }
}

/// Knobs of a generated workload.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Number of requests.
    pub num_requests: usize,
    /// Prompt lengths are uniform in this range.
    pub prompt_len: (u32, u32),
    /// Output lengths are uniform in this range.
    pub output_len: (u32, u32),
    /// Mean gap between arrivals (exponential); zero puts everything at time 0.
    pub mean_gap: Duration,
    /// Number of tenants (uniform).
    pub tenants: u32,
    /// Number of distinct priority values (uniform from 0).
    pub priorities: i32,
    /// Real token prompts drawn from this many shared prefix families (0: synthetic prompts
    /// without sharing).
    pub prefix_families: u32,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            num_requests: 200,
            prompt_len: (16, 600),
            output_len: (1, 64),
            mean_gap: Duration::from_millis(5),
            tenants: 1,
            priorities: 1,
            prefix_families: 0,
        }
    }
}

/// A seeded workload.
pub fn workload(spec: &WorkloadSpec, seed: u64) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed);
    let families: Vec<Vec<u32>> = (0..spec.prefix_families)
        .map(|_| {
            (0..spec.prompt_len.1)
                .map(|_| rng.random_range(0..32_000))
                .collect()
        })
        .collect();
    let mut t = 0.0f64;
    (0..spec.num_requests)
        .map(|i| {
            if spec.mean_gap > Duration::ZERO {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                t += -u.ln() * spec.mean_gap.as_secs_f64();
            }
            let len = rng.random_range(spec.prompt_len.0..=spec.prompt_len.1);
            let prompt = if families.is_empty() {
                Prompt::synthetic(len)
            } else {
                let fam = &families[rng.random_range(0..families.len())];
                let shared = rng.random_range(0..=len);
                let mut toks = fam[..shared as usize].to_vec();
                toks.extend((shared..len).map(|_| rng.random_range(0..32_000)));
                Prompt::Tokens(toks)
            };
            let out = rng.random_range(spec.output_len.0..=spec.output_len.1);
            let mut r = Request::new(
                RequestId(i as u64),
                prompt,
                out,
                Timestamp::from_secs_f64(t),
            );
            r.tenant = TenantId(rng.random_range(0..spec.tenants.max(1)));
            r.priority = rng.random_range(0..spec.priorities.max(1));
            r
        })
        .collect()
}

/// A replica whose steps take `base + per_token × tokens`.
pub struct Replica {
    /// The scheduler under test.
    pub sched: Scheduler,
    /// Simulated time.
    pub now: Timestamp,
    /// Fixed cost of a step.
    pub base: Duration,
    /// Cost per batched token.
    pub per_token: Duration,
    /// Check all invariants after every step (slow for big pools).
    pub check: bool,
    /// Finished requests.
    pub finished: Vec<FinishedRecord>,
    /// Steps run (non-empty).
    pub steps: u64,
    /// Largest batch seen (requests).
    pub max_batch: usize,
    /// Sum of batch sizes over steps (requests).
    pub batched_requests: u64,
    /// Largest number of batched tokens seen.
    pub max_tokens: u32,
    /// Time of every token, per request id (for TBT-style checks).
    pub token_times: Vec<(RequestId, Timestamp)>,
}

impl Replica {
    /// A replica with `num_blocks` blocks of 16 tokens and a 1,024-token context.
    ///
    /// # Panics
    /// If the config is invalid.
    pub fn new(cfg: SchedulerConfig, num_blocks: u32) -> Self {
        Self::with_cache(cfg, &CacheConfig::default(), num_blocks)
    }

    /// A replica with the given cache settings and a 1,024-token context.
    ///
    /// # Panics
    /// If the config is invalid.
    pub fn with_cache(cfg: SchedulerConfig, cache: &CacheConfig, num_blocks: u32) -> Self {
        Replica {
            sched: Scheduler::new(cfg, cache, num_blocks, 1024).expect("valid config"),
            now: Timestamp::ZERO,
            base: Duration::from_millis(5),
            per_token: Duration::from_micros(20),
            check: true,
            finished: Vec::new(),
            steps: 0,
            max_batch: 0,
            batched_requests: 0,
            max_tokens: 0,
            token_times: Vec::new(),
        }
    }

    /// Runs one step if anything is schedulable; returns the output (maybe empty).
    pub fn step(&mut self) -> SchedulerOutput {
        let out = self.sched.schedule(self.now);
        if !out.is_empty() {
            self.steps += 1;
            self.max_batch = self.max_batch.max(out.scheduled.len());
            self.batched_requests += out.scheduled.len() as u64;
            self.max_tokens = self.max_tokens.max(out.num_batched_tokens);
            self.now +=
                Duration(self.base.0 + self.per_token.0 * u64::from(out.num_batched_tokens));
            let res = ModelRunnerOutput::uniform(&out, 7);
            for ev in self.sched.update_from_output(&out, &res, self.now) {
                match ev {
                    RequestEvent::Finished(r) => self.finished.push(*r),
                    RequestEvent::Token { id, .. } => self.token_times.push((id, self.now)),
                    RequestEvent::HandedOff { .. } => {
                        panic!("a colocated instance hands nothing off")
                    }
                }
            }
        }
        if self.check {
            check_invariants(&self.sched);
        }
        out
    }

    /// Feeds `requests` at their arrival times and steps until all finish or `max_steps`
    /// non-empty steps have run. Returns whether everything finished.
    ///
    /// # Panics
    /// If a request is rejected.
    pub fn run(&mut self, mut requests: Vec<Request>, max_steps: u64) -> bool {
        requests.sort_by_key(|r| (r.arrival, r.id));
        let mut pending = requests.into_iter().peekable();
        loop {
            while let Some(r) = pending.next_if(|r| r.arrival <= self.now) {
                self.sched
                    .add_request(r, self.now)
                    .expect("request accepted");
            }
            if !self.sched.has_unfinished() {
                match pending.peek() {
                    Some(r) => {
                        self.now = r.arrival;
                        continue;
                    }
                    None => return true,
                }
            }
            if self.steps >= max_steps {
                return false;
            }
            let out = self.step();
            if out.is_empty() {
                // Nothing runnable now: jump to the next arrival, or report a stall.
                match pending.peek() {
                    Some(r) => self.now = self.now.max(r.arrival),
                    None => panic!(
                        "scheduler stalled with {} waiting and {} running",
                        self.sched.num_waiting(),
                        self.sched.num_running()
                    ),
                }
            }
        }
    }
}

/// Running requests first under one token budget (as vLLM v1), then waiting requests with the
/// fewest uncomputed prompt tokens first, chunked to the budget that is left.
#[derive(Debug)]
pub struct ShortestRemainingPromptFirst {
    /// Token budget of a step.
    pub budget: u32,
}

impl BatchPolicy for ShortestRemainingPromptFirst {
    fn name(&self) -> &str {
        "srpf"
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let mut budget = self.budget;
        step.schedule_running(&mut budget, |_, b| b);
        if step.preempted_any() {
            return;
        }
        while budget > 0 && step.has_room() {
            let Some(id) = step
                .waiting()
                .min_by_key(|s| (s.remaining(), s.arrival(), s.id()))
                .map(|s| s.id())
            else {
                break;
            };
            let spec = AdmitSpec {
                max_tokens: budget,
                whole: false,
                reserve: Reserve::Scheduled,
            };
            match step.admit_request(id, spec) {
                Some(n) => budget -= n,
                None => break,
            }
        }
    }
}

/// The out-of-tree test policy with a token budget of `budget`.
pub fn srpf(budget: u32) -> Box<dyn BatchPolicy> {
    Box::new(ShortestRemainingPromptFirst { budget })
}
