//! The scheduler: one state machine with plain-data input and output, shared by the simulator
//! and the engine.
//!
//! ```text
//! add_request(request, now)
//! schedule(now)                       -> SchedulerOutput   (how many tokens each request runs)
//! update_from_output(out, result, now) -> Vec<RequestEvent> (tokens appended, finished)
//! abort(id, now)
//! ```
//!
//! There is no prefill/decode phase. Every request has `num_computed` tokens and a target of
//! `num_tokens = prompt + output so far`; a step hands out tokens under a budget. Chunked
//! prefill, prefix hits and recompute after preemption are all "how many tokens this step". A
//! step advances `num_computed` at once, so with several micro-batches in flight (pipeline
//! parallelism) a request whose known tokens are all in flight has nothing to schedule; a
//! request in flight is never chosen as a preemption victim.
//!
//! Policies are types ([`policy::BatchPolicy`]) that differ in the order they visit running
//! and waiting requests and in how much KV they reserve. They form a step through a toolbox
//! ([`policy::Step`], implemented in `toolbox.rs`: admission, growing a running request with
//! preemption, victim choice) that keeps the invariants; this file keeps the request slab, the
//! step bookkeeping and the lifecycle. In-tree policies are built from
//! [`config::PolicyConfig`] (the registry); [`Scheduler::with_policy`] takes any other. The
//! waiting order ([`config::QueuePolicy`]), the victim rule ([`policy::VictimPolicy`]) and the
//! preemption mode are orthogonal choices.
//!
//! Cost: a decode step over `n` running requests is O(n) with no hashing of ids: sequences live
//! in a slab and the output carries slot numbers back to `update_from_output`.

pub mod config;
pub mod faster_transformer;
pub mod handoff;
pub mod lightllm;
pub mod orca;
pub mod output;
pub use handoff::Handoff;
pub mod policy;
mod queue;
pub mod sarathi;
mod toolbox;
pub mod vllm_v0;
pub mod vllm_v1;

use crate::config::CacheConfig;
use crate::config::InstanceRole;
use crate::error::{CoreError, Result, ensure};
use crate::ids::{HostBlockId, RequestId, StepId, TenantId};
use crate::kv::{BlockTable, HostBlockPool, KvCacheManager, SeqContent};
use crate::request::{FinishReason, Prompt, Request, RequestStatus};
use crate::time::Timestamp;
use config::{PreemptionMode, QueuePolicy, SchedulerConfig};
use output::{
    FinishedRecord, ModelRunnerOutput, RequestEvent, ScheduledRequest, SchedulerOutput,
    SchedulerStats,
};
use policy::{BatchPolicy, Candidate, LowestPriorityVictim, NewestVictim, Step, VictimPolicy};
use queue::{EntryInfo, Key, WaitingQueue};
use std::collections::HashMap;

/// A request inside the scheduler.
///
/// Laid out by hand: a decode step reads and writes only the first two cache lines (the
/// fields up to the block table's ids), so 256 running requests touch 32 KiB rather than all
/// of their ~450-byte records.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Seq {
    id: RequestId,
    num_computed: u32,
    /// Tokens generated so far.
    num_output: u32,
    /// `req.prompt.len()`, `req.max_tokens()`, `req.tenant` and whether `req` has stop token
    /// ids, kept here so a decode step reads neither the prompt enum nor the sampling
    /// parameters.
    prompt_len: u32,
    max_tokens: u32,
    in_flight: u32,
    tenant: TenantId,
    status: RequestStatus,
    has_stop_ids: bool,
    send_full: bool,
    /// The prompt is token ids, so generated tokens are kept (see `output`).
    keeps_tokens: bool,
    /// Generated tokens, kept for a token prompt only: a synthetic request's tokens are an
    /// oracle's placeholders that nothing reads, and storing them would cost a cache-missing
    /// store per request per decode step.
    output: Vec<u32>,
    first_scheduled: Option<Timestamp>,
    first_token: Option<Timestamp>,
    table: BlockTable,
    // Cold: read at admission, preemption and finish.
    req: Request,
    swapped: Vec<HostBlockId>,
    num_preemptions: u32,
    cached_prompt_tokens: Option<u32>,
    queue_key: Option<Key>,
    /// Its hand-off's times, when it was prefilled on another instance.
    disagg: Option<output::DisaggTimes>,
    /// The first output token, on either side of a hand-off (`output` keeps it only for a
    /// token prompt).
    handoff_token: u32,
}

/// Tokens a waiting sequence needs KV for on admission.
fn queued_tokens_of(s: &Seq) -> u32 {
    s.prompt_len + s.num_output
}

impl Seq {
    fn prompt_len(&self) -> u32 {
        self.prompt_len
    }
    fn num_tokens(&self) -> u32 {
        self.prompt_len() + self.num_output
    }
    fn remaining(&self) -> u32 {
        self.num_tokens() - self.num_computed
    }
    fn prefill_done(&self) -> bool {
        self.num_computed >= self.prompt_len()
    }
    fn remaining_output(&self) -> u32 {
        self.max_tokens.saturating_sub(self.num_output)
    }
}

fn content<'a>(req: &'a Request, output: &'a [u32], num_output: u32) -> SeqContent<'a> {
    SeqContent {
        request: req.id,
        prompt: &req.prompt,
        output,
        num_output,
        salt: req.cache_salt,
    }
}

/// Outcome of growing a running request's allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grow {
    /// Allocated; this many blocks were appended.
    Allocated(u32),
    /// The request itself was preempted (it left `running`).
    SelfPreempted,
    /// Short of blocks, with no victim that may be preempted (all others in flight).
    Blocked,
}

/// The scheduler of one replica.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    max_model_len: u32,
    kv: KvCacheManager,
    host: HostBlockPool,
    slots: Vec<Option<Seq>>,
    free_slots: Vec<u32>,
    index: HashMap<RequestId, u32>,
    waiting: WaitingQueue,
    running: Vec<u32>,
    finished_ids: Vec<RequestId>,
    steps: u64,
    num_preemptions: u64,
    num_finished: u64,
    num_swapped: u32,
    /// Prompt + `max_tokens` of every live request (what a router balancing by tokens sees).
    outstanding_tokens: u64,
    /// Requests rejected as late.
    num_rejected: u64,
    /// Requests added while a step was in flight under `async_scheduling`: they join the
    /// waiting queue once the next step is formed.
    staged: Vec<u32>,
    /// Non-empty steps formed and not yet applied.
    steps_in_flight: u32,
    /// Tokens of the waiting requests, which need KV blocks when they are admitted (what a
    /// router balancing by KV demand adds to the blocks held).
    queued_tokens: u64,
    /// The batching policy; taken out while it forms a step (it is always there otherwise).
    policy: Option<Box<dyn BatchPolicy>>,
    /// The preemption-victim rule.
    victim: Box<dyn VictimPolicy>,
    /// Reused by every victim choice.
    victim_candidates: Vec<Candidate>,
    /// Whether scheduled requests carry [`NewRequestData`] after (re)admission: what a
    /// request's `send_full` is set to when it is added or preempted.
    request_data: bool,
    /// Emptied `scheduled` and `block_ids` buffers handed back by [`Scheduler::recycle`].
    spare_outputs: Vec<(Vec<ScheduledRequest>, Vec<crate::ids::BlockId>)>,
    /// What this instance does (prefill instances hand requests off after their first token).
    role: InstanceRole,
    /// Requests whose KV is in transit (held for, or reserved from, another instance).
    num_transferring: u32,
    /// Of those, the ones reserved here for a transfer from a prefill instance (they count
    /// against `max_num_seqs`: each joins the running list when its KV lands).
    num_reserved: u32,
    num_handed_off: u64,
    num_received: u64,
    /// Requests whose KV landed since the last step (their decode start is recorded when the
    /// next step is formed).
    remote_admitted: Vec<u32>,
}

impl Scheduler {
    /// What a scheduler checks of its settings before it starts, without building one: the
    /// configs themselves, a token budget of at least `max_model_len` for a policy that never
    /// splits a prompt (`whole_prompt_budget`, [`BatchPolicy::whole_prompt_budget`]), and host
    /// blocks for swap preemption. `vajra-sim validate` and a run go through this one check.
    ///
    /// # Errors
    /// The first setting that cannot run, named.
    pub fn check_config(
        cfg: &SchedulerConfig,
        cache: &CacheConfig,
        max_model_len: u32,
        whole_prompt_budget: Option<u32>,
    ) -> Result<()> {
        cfg.validate()?;
        cache.validate()?;
        if let Some(b) = whole_prompt_budget {
            ensure(
                b >= max_model_len,
                "scheduler.policy.max_num_batched_tokens",
                b,
                &format!(
                    "at least max_model_len = {max_model_len} for a policy that never splits a prompt"
                ),
            )?;
        }
        if cfg.preemption == PreemptionMode::Swap {
            ensure(
                cache.swap_blocks > 0,
                "cache.swap_blocks",
                cache.swap_blocks,
                "≥ 1 when scheduler.preemption = \"swap\"",
            )?;
        }
        Ok(())
    }

    /// A scheduler over `num_blocks` device KV blocks for a model of `max_model_len` tokens,
    /// running the in-tree policy of `cfg.policy` (built by [`config::PolicyConfig::build`]).
    ///
    /// # Errors
    /// An invalid config, or a combination that could never schedule some valid request: a
    /// non-chunking policy whose token budget is below `max_model_len`, or swap preemption
    /// without swap blocks.
    pub fn new(
        cfg: SchedulerConfig,
        cache: &CacheConfig,
        num_blocks: u32,
        max_model_len: u32,
    ) -> Result<Self> {
        let policy = cfg.policy.build();
        Self::with_policy(cfg, cache, num_blocks, max_model_len, policy)
    }

    /// A scheduler running `policy` — in-tree or not — instead of the one `cfg.policy` names
    /// (whose parameters are then unused); the rest of `cfg` (running cap, queue order,
    /// preemption mode) applies as in [`Scheduler::new`]. The victim rule follows the queue
    /// order until [`Scheduler::set_victim_policy`] replaces it.
    ///
    /// # Errors
    /// As [`Scheduler::new`].
    pub fn with_policy(
        cfg: SchedulerConfig,
        cache: &CacheConfig,
        num_blocks: u32,
        max_model_len: u32,
        policy: Box<dyn BatchPolicy>,
    ) -> Result<Self> {
        ensure(
            (1..=crate::config::MAX_BLOCKS).contains(&num_blocks),
            "cache.num_blocks",
            num_blocks,
            &format!("an integer from 1 to {}", crate::config::MAX_BLOCKS),
        )?;
        Self::check_config(&cfg, cache, max_model_len, policy.whole_prompt_budget())?;
        let victim: Box<dyn VictimPolicy> = match cfg.queue {
            QueuePolicy::Priority { .. } => Box::new(LowestPriorityVictim),
            QueuePolicy::Fcfs
            | QueuePolicy::Sjf { .. }
            | QueuePolicy::Edf
            | QueuePolicy::Vtc { .. } => Box::new(NewestVictim),
        };
        Ok(Scheduler {
            waiting: WaitingQueue::new(cfg.queue),
            kv: KvCacheManager::new(
                &CacheConfig {
                    watermark: Some(cache.watermark.unwrap_or(policy.default_watermark())),
                    ..cache.clone()
                },
                num_blocks,
            ),
            host: HostBlockPool::new(cache.swap_blocks),
            cfg,
            max_model_len,
            slots: Vec::new(),
            free_slots: Vec::new(),
            index: HashMap::new(),
            running: Vec::new(),
            finished_ids: Vec::new(),
            steps: 0,
            num_preemptions: 0,
            num_finished: 0,
            num_swapped: 0,
            outstanding_tokens: 0,
            num_rejected: 0,
            staged: Vec::new(),
            steps_in_flight: 0,
            queued_tokens: 0,
            policy: Some(policy),
            victim,
            victim_candidates: Vec::new(),
            request_data: true,
            spare_outputs: Vec::new(),
            role: InstanceRole::Colocated,
            num_transferring: 0,
            num_reserved: 0,
            num_handed_off: 0,
            num_received: 0,
            remote_admitted: Vec::new(),
        })
    }

    /// Stops attaching [`NewRequestData`] (prompt, sampling parameters, whole block table) to
    /// requests scheduled after admission: `SchedulerOutput::new_data` stays `None`. For an
    /// executor that keeps no per-request state, such as the simulator's, which needs only the
    /// token counts; building and dropping the copies was ~5 % of a large simulation.
    pub fn omit_request_data(&mut self) {
        self.request_data = false;
        for seq in self.slots.iter_mut().flatten() {
            seq.send_full = false;
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Replaces the preemption-victim rule.
    pub fn set_victim_policy(&mut self, victim: Box<dyn VictimPolicy>) {
        self.victim = victim;
    }

    /// The KV-cache manager (read-only).
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Requests waiting (including swapped ones, and those staged under `async_scheduling`).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.staged.len()
    }

    /// Requests running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests rejected as late so far.
    pub fn num_rejected(&self) -> u64 {
        self.num_rejected
    }

    /// Prompt + `max_tokens` summed over the live (waiting and running) requests.
    pub fn outstanding_tokens(&self) -> u64 {
        self.outstanding_tokens
    }

    /// Tokens (prompt and any output so far) of the waiting requests: the KV they will need on
    /// admission, before prefix hits.
    pub fn queued_tokens(&self) -> u64 {
        self.queued_tokens
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.index.is_empty()
    }

    /// Ids of the running requests, in running order.
    pub fn running_ids(&self) -> Vec<RequestId> {
        self.running.iter().map(|&s| self.seq(s).req.id).collect()
    }

    /// The lifecycle state of a request still known to the scheduler.
    pub fn status(&self, id: RequestId) -> Option<RequestStatus> {
        self.index.get(&id).map(|&s| self.seq(s).status)
    }

    /// Tokens computed so far for a live request.
    pub fn num_computed_tokens(&self, id: RequestId) -> Option<u32> {
        self.index.get(&id).map(|&s| self.seq(s).num_computed)
    }

    /// The block table of a live request.
    pub fn block_table(&self, id: RequestId) -> Option<&[crate::ids::BlockId]> {
        self.index
            .get(&id)
            .map(|&s| self.seq(s).table.blocks.as_slice())
    }

    /// VTC: a tenant's virtual token counter (None under other queue policies or for a tenant
    /// never seen).
    pub fn vtc_counter(&self, tenant: TenantId) -> Option<f64> {
        self.waiting.counter(tenant)
    }

    /// Counters.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            steps: self.steps,
            num_waiting: self.waiting.len() as u32,
            num_running: self.running.len() as u32,
            num_swapped: self.num_swapped,
            num_preemptions: self.num_preemptions,
            num_finished: self.num_finished,
            num_handed_off: self.num_handed_off,
            num_received: self.num_received,
            kv: self.kv.stats(),
        }
    }

    /// Forgets the prefix cache; succeeds only when no request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv.reset_prefix_cache()
    }

    fn seq(&self, slot: u32) -> &Seq {
        self.slots[slot as usize]
            .as_ref()
            .expect("slot referenced by a queue or list is live")
    }

    fn seq_mut(&mut self, slot: u32) -> &mut Seq {
        self.slots[slot as usize]
            .as_mut()
            .expect("slot referenced by a queue or list is live")
    }

    /// Queues a new request.
    ///
    /// # Errors
    /// An invalid request, a duplicate id, or a request that could never fit this replica's KV
    /// cache even alone (prompt + `max_tokens` over the pool's capacity).
    pub fn add_request(&mut self, req: Request, _now: Timestamp) -> Result<()> {
        self.check_admissible(&req)?;
        // A prefill instance runs a request to its first token only (then hands it off).
        let max_tokens = match self.role {
            InstanceRole::Prefill => req.max_tokens().min(1),
            InstanceRole::Colocated | InstanceRole::Decode => req.max_tokens(),
        };
        let seq = self.new_seq(req, max_tokens);
        let slot = self.insert(seq);
        if self.cfg.async_scheduling && self.steps_in_flight > 0 {
            self.staged.push(slot);
        } else {
            self.enqueue(slot, false);
        }
        Ok(())
    }

    /// What every request must pass to enter this scheduler (added, or reserved for a
    /// hand-off): valid here, not live already, and able to fit the KV pool alone.
    fn check_admissible(&self, req: &Request) -> Result<()> {
        req.validate(self.max_model_len)?;
        if self.index.contains_key(&req.id) {
            return Err(CoreError::DuplicateRequest(req.id));
        }
        let capacity = u64::from(self.kv.num_blocks()) * u64::from(self.kv.block_size());
        let total = u64::from(req.prompt.len()) + u64::from(req.max_tokens());
        ensure(
            total <= capacity,
            "prompt + max_tokens",
            total,
            &format!("at most the KV cache capacity of {capacity} tokens"),
        )
    }

    /// A new waiting sequence for `req`, nothing computed, running to `max_tokens`.
    fn new_seq(&self, req: Request, max_tokens: u32) -> Seq {
        // Sized once: pushing one token per step would otherwise reallocate log(n) times.
        let keeps_tokens = matches!(req.prompt, Prompt::Tokens(_));
        let output = if keeps_tokens {
            Vec::with_capacity(max_tokens.min(4096) as usize)
        } else {
            Vec::new()
        };
        Seq {
            id: req.id,
            tenant: req.tenant,
            prompt_len: req.prompt.len(),
            max_tokens,
            has_stop_ids: !req.sampling.stop_token_ids.is_empty(),
            keeps_tokens,
            req,
            output,
            num_output: 0,
            status: RequestStatus::Waiting,
            num_computed: 0,
            table: BlockTable::default(),
            swapped: Vec::new(),
            in_flight: 0,
            num_preemptions: 0,
            first_scheduled: None,
            first_token: None,
            cached_prompt_tokens: None,
            queue_key: None,
            send_full: self.request_data,
            disagg: None,
            handoff_token: 0,
        }
    }

    /// Puts `seq` in a slot and indexes it; returns the slot.
    fn insert(&mut self, seq: Seq) -> u32 {
        self.outstanding_tokens += u64::from(seq.prompt_len) + u64::from(seq.max_tokens);
        let id = seq.id;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(seq);
                s
            }
            None => {
                self.slots.push(Some(seq));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        slot
    }

    fn enqueue(&mut self, slot: u32, front: bool) {
        let s = self.seq(slot);
        let info = EntryInfo {
            slot,
            id: s.req.id.0,
            arrival_ns: s.req.arrival.0,
            priority: s.req.priority,
            remaining_tokens: s.remaining(),
            deadline_ns: s.req.deadline.map(|d| d.0),
            tenant: s.req.tenant,
        };
        let key = self.waiting.push(&info, front);
        self.queued_tokens += u64::from(queued_tokens_of(self.seq(slot)));
        self.seq_mut(slot).queue_key = Some(key);
    }

    /// Builds the next step.
    pub fn schedule(&mut self, now: Timestamp) -> SchedulerOutput {
        let (scheduled, block_ids) = self.spare_outputs.pop().unwrap_or_default();
        let mut out = SchedulerOutput {
            scheduled,
            block_ids,
            ..SchedulerOutput::default()
        };
        self.schedule_into(now, &mut out);
        out
    }

    /// [`Scheduler::schedule`] into a caller's output, which is cleared first and whose
    /// buffers are reused (a simulator keeps one per batch in flight, so a step neither
    /// allocates nor moves its output).
    pub fn schedule_into(&mut self, now: Timestamp, out: &mut SchedulerOutput) {
        out.clear();
        out.step = StepId(self.steps);
        out.scheduled.reserve(self.running.len() + 16);
        let mut policy = self
            .policy
            .take()
            .expect("the policy is present between steps");
        policy.schedule(&mut Step { sched: self, out });
        if out.scheduled.is_empty() && !self.staged.is_empty() {
            // Nothing else to run: the engine would have formed no step ahead, so the
            // requests that came meanwhile go now.
            self.release_staged();
            policy.schedule(&mut Step { sched: self, out });
        }
        self.policy = Some(policy);
        self.finish_step(out, now);
        if !out.scheduled.is_empty() {
            self.steps_in_flight += 1;
        }
        self.release_staged();
    }

    /// Moves requests staged under `async_scheduling` into the waiting queue, in arrival order.
    fn release_staged(&mut self) {
        for slot in std::mem::take(&mut self.staged) {
            self.enqueue(slot, false);
        }
    }

    /// Advances computed tokens, caches newly full blocks and charges tenants.
    fn finish_step(&mut self, out: &mut SchedulerOutput, now: Timestamp) {
        let mut total = 0;
        let charge = matches!(self.cfg.queue, QueuePolicy::Vtc { .. });
        for e in &out.scheduled {
            total += e.num_tokens;
            let seq = self.slots[e.slot as usize]
                .as_mut()
                .expect("scheduled slot is live");
            seq.num_computed += e.num_tokens;
            seq.in_flight += 1;
            seq.first_scheduled.get_or_insert(now);
            let upto = seq.num_computed;
            if self.kv.full_blocks(upto) > self.kv.full_blocks(upto - e.num_tokens) {
                self.kv.cache_full_blocks(
                    &mut seq.table,
                    &content(&seq.req, &seq.output, seq.num_output),
                    upto,
                );
            }
            if charge {
                self.waiting
                    .charge(e.tenant, e.prefill_tokens(), e.decode_tokens());
            }
        }
        out.num_batched_tokens = total;
        for slot in self.remote_admitted.drain(..) {
            if let Some(d) = self.slots[slot as usize]
                .as_mut()
                .and_then(|s| s.disagg.as_mut())
            {
                d.decode_scheduled.get_or_insert(now);
            }
        }
        std::mem::swap(&mut out.finished, &mut self.finished_ids);
        if !out.scheduled.is_empty() {
            self.steps += 1;
        }
    }

    /// Applies an executor's results: appends sampled tokens, finishes requests that reached
    /// `max_tokens`, a stop token id or an executor-detected stop.
    ///
    /// # Panics
    /// If `result` does not have one entry per scheduled request, or lacks a token for a
    /// request whose step reached its end (an executor bug).
    pub fn update_from_output(
        &mut self,
        out: &SchedulerOutput,
        result: &ModelRunnerOutput,
        now: Timestamp,
    ) -> Vec<RequestEvent> {
        let mut events = Vec::with_capacity(out.scheduled.len());
        self.update_from_output_into(out, result, now, &mut events);
        events
    }

    /// Hands back a step's output once the caller is done with it, so the next `schedule()`
    /// reuses its buffer instead of allocating one (optional; a few are kept).
    pub fn recycle(&mut self, out: SchedulerOutput) {
        if self.spare_outputs.len() < 4 {
            let (mut v, mut b) = (out.scheduled, out.block_ids);
            v.clear();
            b.clear();
            self.spare_outputs.push((v, b));
        }
    }

    /// [`Scheduler::update_from_output`] appending to a caller's buffer (a simulator reuses
    /// one buffer for every step instead of allocating one per step).
    ///
    /// # Panics
    /// As [`Scheduler::update_from_output`].
    pub fn update_from_output_into(
        &mut self,
        out: &SchedulerOutput,
        result: &ModelRunnerOutput,
        now: Timestamp,
        events: &mut Vec<RequestEvent>,
    ) {
        assert_eq!(
            result.sampled.len(),
            out.scheduled.len(),
            "runner output must have one entry per scheduled request"
        );
        if !out.scheduled.is_empty() {
            self.steps_in_flight = self.steps_in_flight.saturating_sub(1);
        }
        for (e, sampled) in out.scheduled.iter().zip(&result.sampled) {
            let Some(seq) = self.slots[e.slot as usize].as_mut() else {
                continue; // aborted while in flight
            };
            if seq.id != e.id {
                continue; // aborted while in flight, slot reused
            }
            seq.in_flight -= 1;
            if !e.samples {
                continue;
            }
            let tok = sampled.expect("executor must sample a token when a step reaches the end");
            let index = seq.num_output;
            if self.role == InstanceRole::Prefill
                && index == 0
                && seq.req.max_tokens() > 1
                && !(tok.stop
                    || (seq.has_stop_ids && seq.req.sampling.stop_token_ids.contains(&tok.token)))
            {
                self.hand_off(e.slot, tok.token, now);
                events.push(RequestEvent::HandedOff {
                    id: e.id,
                    token: tok.token,
                });
                continue;
            }
            seq.num_output += 1;
            if seq.keeps_tokens {
                seq.output.push(tok.token);
            }
            seq.first_token.get_or_insert(now);
            events.push(RequestEvent::Token {
                id: e.id,
                token: tok.token,
                index,
            });
            let stop = tok.stop
                || (seq.has_stop_ids && seq.req.sampling.stop_token_ids.contains(&tok.token));
            let reason = if stop {
                Some(FinishReason::Stop)
            } else if index + 1 >= seq.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let rec = self.finish(e.slot, reason, now);
                events.push(RequestEvent::Finished(Box::new(rec)));
            }
        }
    }

    /// Under `late_requests = "reject"`, rejects every waiting request never scheduled whose
    /// TTFT deadline is at or before `now` (it can no longer meet it), appending a finished
    /// event for each to `events`. A no-op under `"serve"`.
    pub fn reject_late(&mut self, now: Timestamp, events: &mut Vec<RequestEvent>) {
        if self.cfg.late_requests != config::LatePolicy::Reject {
            return;
        }
        let late: Vec<u32> = self
            .waiting
            .slots()
            .filter(|&slot| {
                let s = self.seq(slot);
                s.first_scheduled.is_none() && s.req.ttft_deadline.is_some_and(|d| d <= now)
            })
            .collect();
        for slot in late {
            let seq = self.seq(slot);
            let (key, tenant) = (
                seq.queue_key.expect("a waiting request has a key"),
                seq.req.tenant,
            );
            let found = self.waiting.remove(slot, key, tenant);
            assert!(found, "a waiting request is in the waiting queue");
            self.queued_tokens -= u64::from(queued_tokens_of(self.seq(slot)));
            self.num_rejected += 1;
            let rec = self.finish(slot, FinishReason::Rejected, now);
            events.push(RequestEvent::Finished(Box::new(rec)));
        }
    }

    /// Aborts a live request, freeing its blocks.
    ///
    /// # Errors
    /// [`CoreError::UnknownRequest`] if it is not live (never added, or already finished).
    pub fn abort(&mut self, id: RequestId, now: Timestamp) -> Result<FinishedRecord> {
        let slot = *self.index.get(&id).ok_or(CoreError::UnknownRequest(id))?;
        let seq = self.seq(slot);
        if let Some(key) = seq.queue_key {
            let tenant = seq.req.tenant;
            let found = self.waiting.remove(slot, key, tenant);
            assert!(found, "a waiting request is in the waiting queue");
            self.queued_tokens -= u64::from(queued_tokens_of(self.seq(slot)));
        }
        self.staged.retain(|&s| s != slot);
        Ok(self.finish(slot, FinishReason::Abort, now))
    }

    fn finish(&mut self, slot: u32, reason: FinishReason, now: Timestamp) -> FinishedRecord {
        let mut seq = self.slots[slot as usize]
            .take()
            .expect("finishing a live slot");
        match seq.status {
            RequestStatus::Running => {
                let pos = self
                    .running
                    .iter()
                    .position(|&s| s == slot)
                    .expect("a running request is in the running list");
                self.running.remove(pos);
                self.waiting.running_changed(seq.req.tenant, false);
            }
            RequestStatus::Swapped => {
                self.host.free(&seq.swapped);
                self.num_swapped -= 1;
            }
            RequestStatus::Transferring => {
                self.num_transferring -= 1;
                if seq.disagg.is_some() {
                    self.num_reserved -= 1;
                }
            }
            RequestStatus::Waiting | RequestStatus::Finished(_) => {}
        }
        self.kv.free(&mut seq.table);
        self.free_slots.push(slot);
        self.index.remove(&seq.req.id);
        self.outstanding_tokens -= u64::from(seq.prompt_len) + u64::from(seq.max_tokens);
        self.finished_ids.push(seq.req.id);
        self.num_finished += 1;
        FinishedRecord {
            id: seq.req.id,
            reason,
            tenant: seq.req.tenant,
            priority: seq.req.priority,
            slo_class: seq.req.slo_class,
            arrival: seq.req.arrival,
            deadline: seq.req.deadline,
            first_scheduled: seq.first_scheduled,
            first_token: seq.first_token,
            finished_at: now,
            prompt_tokens: seq.prompt_len(),
            output_tokens: seq.num_output,
            cached_prompt_tokens: seq.cached_prompt_tokens.unwrap_or(0),
            num_preemptions: seq.num_preemptions,
            disagg: seq.disagg,
        }
    }
}

/// Checks the scheduler's internal invariants (block conservation, reference counts equal
/// holders, lists consistent). O(blocks + requests); for tests.
///
/// # Panics
/// Names the broken invariant.
pub fn check_invariants(s: &Scheduler) {
    let pool = s.kv.pool();
    pool.check_invariants();
    let mut holders = vec![0u32; pool.num_blocks() as usize];
    let mut held = 0usize;
    let (mut outstanding, mut queued) = (0u64, 0u64);
    for seq in s.slots.iter().flatten() {
        outstanding += u64::from(seq.prompt_len) + u64::from(seq.max_tokens);
        if seq.queue_key.is_some() {
            queued += u64::from(queued_tokens_of(seq));
        }
        for b in &seq.table.blocks {
            holders[b.index()] += 1;
        }
        held += seq.table.blocks.len();
        match seq.status {
            RequestStatus::Running => {
                assert!(
                    seq.queue_key.is_none(),
                    "a running request has no queue key"
                );
                assert!(
                    seq.table.len() as u32 >= s.kv.blocks_for(seq.num_computed),
                    "a running request holds blocks for its computed tokens"
                );
            }
            RequestStatus::Waiting => {
                assert!(seq.table.is_empty(), "a waiting request holds no blocks");
                assert_eq!(
                    seq.num_computed, 0,
                    "a waiting request has nothing computed"
                );
            }
            RequestStatus::Transferring => {
                assert!(
                    seq.queue_key.is_none(),
                    "a transferring request is not queued"
                );
                assert!(
                    seq.table.len() as u32 >= s.kv.blocks_for(seq.prompt_len),
                    "a transferring request holds its prompt's blocks"
                );
            }
            RequestStatus::Swapped => {
                assert!(
                    seq.table.is_empty(),
                    "a swapped request holds no device blocks"
                );
                assert!(
                    !seq.swapped.is_empty(),
                    "a swapped request holds host blocks"
                );
            }
            RequestStatus::Finished(_) => panic!("finished requests leave the slab"),
        }
    }
    assert_eq!(
        s.outstanding_tokens, outstanding,
        "outstanding tokens are those of the live requests"
    );
    assert_eq!(
        s.queued_tokens, queued,
        "queued tokens are those of the waiting requests"
    );
    for (b, &h) in holders.iter().enumerate() {
        let rc = pool.ref_count(crate::ids::BlockId(b as u32));
        assert_eq!(rc, h, "reference count of block {b} equals its holders");
    }
    let allocated = holders.iter().filter(|&&h| h > 0).count() as u32;
    assert_eq!(
        allocated + pool.num_free(),
        pool.num_blocks(),
        "allocated + free = total blocks"
    );
    assert!(held >= allocated as usize, "shared blocks are counted once");
    let running = s
        .slots
        .iter()
        .flatten()
        .filter(|q| q.status == RequestStatus::Running)
        .count();
    assert_eq!(
        running,
        s.running.len(),
        "running list matches running statuses"
    );
    let transferring = s
        .slots
        .iter()
        .flatten()
        .filter(|q| q.status == RequestStatus::Transferring)
        .count();
    assert_eq!(
        transferring, s.num_transferring as usize,
        "the transferring count matches transferring statuses"
    );
    let reserved = s
        .slots
        .iter()
        .flatten()
        .filter(|q| q.status == RequestStatus::Transferring && q.disagg.is_some())
        .count();
    assert_eq!(
        reserved, s.num_reserved as usize,
        "the reserved count matches requests reserved for a transfer"
    );
    assert!(
        s.running.len() + reserved <= s.cfg.max_num_seqs as usize,
        "running and reserved requests are within max_num_seqs"
    );
    assert_eq!(
        s.index.len(),
        running + s.waiting.len() + s.staged.len() + transferring,
        "every live request is running, waiting, staged or transferring"
    );
    let host_held: usize = s.slots.iter().flatten().map(|q| q.swapped.len()).sum();
    assert_eq!(
        host_held as u32 + s.host.num_free(),
        s.host.num_blocks(),
        "host blocks are conserved"
    );
}

#[cfg(test)]
mod tests;
