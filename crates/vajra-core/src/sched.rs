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
//! Policies ([`config::PolicyConfig`]) differ in the order they visit running and waiting
//! requests and in how much KV they reserve; the shared pieces are here: admission
//! (`admit`), growing a running request with preemption (`grow_running`), victim choice, and
//! the step bookkeeping. The waiting order ([`config::QueuePolicy`]) and the preemption mode
//! are orthogonal choices.
//!
//! Cost: a decode step over `n` running requests is O(n) with no hashing of ids: sequences live
//! in a slab and the output carries slot numbers back to `update_from_output`.

pub mod config;
mod faster_transformer;
mod lightllm;
mod orca;
pub mod output;
mod queue;
mod sarathi;
mod vllm_v0;
mod vllm_v1;

use crate::config::CacheConfig;
use crate::error::{CoreError, Result, ensure};
use crate::ids::{HostBlockId, RequestId, StepId, TenantId};
use crate::kv::{AllocSpec, BlockTable, HostBlockPool, KvCacheManager, SeqContent};
use crate::request::{FinishReason, Prompt, Request, RequestStatus};
use crate::time::Timestamp;
use config::{PolicyConfig, PreemptionMode, QueuePolicy, SchedulerConfig};
use output::{
    FinishedRecord, ModelRunnerOutput, NewRequestData, RequestEvent, ScheduledRequest,
    SchedulerOutput, SchedulerStats,
};
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

/// How much KV a request being admitted reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    /// Only the tokens scheduled now (vLLM v1).
    Scheduled,
    /// Every known token not yet computed (Sarathi-Serve's whole-prompt reservation).
    Remaining,
    /// Known tokens plus the largest possible output (Orca, FasterTransformer).
    WorstCase,
}

/// One admission attempt.
#[derive(Debug, Clone, Copy)]
struct AdmitSpec {
    /// Most tokens to schedule for it this step.
    max_tokens: u32,
    /// All its uncomputed tokens must fit in `max_tokens` (no chunking).
    whole: bool,
    reserve: Reserve,
}

/// Outcome of growing a running request's allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grow {
    /// Allocated; this many blocks were appended.
    Allocated(u32),
    /// The request itself was preempted (it left `running`).
    SelfPreempted,
    /// Short of blocks, with no victim that may be preempted (all others in flight).
    Blocked,
}

/// The scheduler of one replica.
#[derive(Debug, Clone)]
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
    /// LightLLM: decode-only steps since the last prefill step.
    decode_steps_since_prefill: u32,
    /// Whether scheduled requests carry [`NewRequestData`] after (re)admission: what a
    /// request's `send_full` is set to when it is added or preempted.
    request_data: bool,
    /// Emptied `scheduled` and `block_ids` buffers handed back by [`Scheduler::recycle`].
    spare_outputs: Vec<(Vec<ScheduledRequest>, Vec<crate::ids::BlockId>)>,
}

impl Scheduler {
    /// A scheduler over `num_blocks` device KV blocks for a model of `max_model_len` tokens.
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
        cfg.validate()?;
        cache.validate()?;
        ensure(
            num_blocks >= 1,
            "cache.num_blocks",
            num_blocks,
            "an integer ≥ 1",
        )?;
        let whole_prompt_budget = match &cfg.policy {
            PolicyConfig::VllmV1(c) if !c.enable_chunked_prefill => Some(c.max_num_batched_tokens),
            PolicyConfig::VllmV0(c) => Some(c.max_num_batched_tokens),
            PolicyConfig::Lightllm(c) => Some(c.max_num_batched_tokens),
            PolicyConfig::VllmV1(_)
            | PolicyConfig::Sarathi(_)
            | PolicyConfig::Orca(_)
            | PolicyConfig::FasterTransformer(_) => None,
        };
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
        Ok(Scheduler {
            waiting: WaitingQueue::new(cfg.queue),
            kv: KvCacheManager::new(cache, num_blocks),
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
            decode_steps_since_prefill: 0,
            request_data: true,
            spare_outputs: Vec::new(),
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

    /// The KV-cache manager (read-only).
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Tokens of `req`'s prompt found in this scheduler's prefix cache (for routing).
    pub fn cached_prefix_tokens(&mut self, req: &Request) -> u32 {
        self.kv.cached_prefix_tokens(&content(req, &[], 0))
    }

    /// Requests waiting (including swapped ones).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running.
    pub fn num_running(&self) -> usize {
        self.running.len()
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
        match self.cfg.queue {
            QueuePolicy::Vtc { .. } => self.waiting.counter(tenant),
            _ => None,
        }
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
        )?;
        // Sized once: pushing one token per step would otherwise reallocate log(n) times.
        let keeps_tokens = matches!(req.prompt, Prompt::Tokens(_));
        let output = if keeps_tokens {
            Vec::with_capacity(req.max_tokens().min(4096) as usize)
        } else {
            Vec::new()
        };
        let seq = Seq {
            id: req.id,
            tenant: req.tenant,
            prompt_len: req.prompt.len(),
            max_tokens: req.max_tokens(),
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
        };
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
        self.index.insert(self.seq(slot).req.id, slot);
        self.enqueue(slot, false);
        Ok(())
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
        let max_seqs = self.cfg.max_num_seqs as usize;
        match self.cfg.policy {
            PolicyConfig::VllmV1(c) => self.schedule_vllm_v1(&c, max_seqs, out),
            PolicyConfig::Sarathi(c) => self.schedule_sarathi(&c, max_seqs, out),
            PolicyConfig::VllmV0(c) => self.schedule_vllm_v0(&c, max_seqs, out),
            PolicyConfig::Orca(_) => self.schedule_orca(max_seqs, out),
            PolicyConfig::FasterTransformer(_) => self.schedule_faster_transformer(max_seqs, out),
            PolicyConfig::Lightllm(c) => self.schedule_lightllm(&c, max_seqs, out),
        }
        self.finish_step(out, now);
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
        std::mem::swap(&mut out.finished, &mut self.finished_ids);
        if !out.scheduled.is_empty() {
            self.steps += 1;
        }
    }

    /// Tries to admit the head of the waiting queue. Returns the tokens scheduled for it, or
    /// `None` (leaving the queue as it was) when it does not fit.
    fn admit(&mut self, spec: AdmitSpec, out: &mut SchedulerOutput) -> Option<u32> {
        let slot = self.waiting.peek()?;
        let others_running = !self.running.is_empty();
        let seq = self.slots[slot as usize]
            .as_mut()
            .expect("waiting slot is live");
        let swapped = seq.status == RequestStatus::Swapped;
        let (hits, hit_tokens) = if swapped {
            (Vec::new(), 0)
        } else {
            self.kv.get_computed_blocks(
                &mut seq.table,
                &content(&seq.req, &seq.output, seq.num_output),
            )
        };
        let computed = if swapped {
            seq.num_computed
        } else {
            hit_tokens
        };
        let remaining = seq.num_tokens() - computed;
        if remaining == 0 || (spec.whole && remaining > spec.max_tokens) {
            return None;
        }
        let n = remaining.min(spec.max_tokens);
        let reserve = match spec.reserve {
            Reserve::Scheduled => n,
            Reserve::Remaining => remaining,
            Reserve::WorstCase => remaining + seq.remaining_output(),
        };
        let alloc = AllocSpec {
            num_computed: computed,
            new_computed: &hits,
            num_new_tokens: reserve,
            apply_watermark: others_running,
        };
        let appended = self.kv.allocate_slots(&mut seq.table, &alloc)?;
        let popped = self.waiting.pop();
        assert_eq!(
            popped,
            Some(slot),
            "admitted request must be the queue head"
        );
        if swapped {
            out.swap_in.extend(
                seq.swapped
                    .iter()
                    .copied()
                    .zip(seq.table.blocks.iter().copied()),
            );
            self.host.free(&seq.swapped);
            seq.swapped.clear();
            self.num_swapped -= 1;
        } else {
            self.kv.record_prefix_query(seq.num_tokens(), hit_tokens);
            let prompt = seq.prompt_len();
            seq.cached_prompt_tokens
                .get_or_insert(hit_tokens.min(prompt));
        }
        seq.num_computed = computed;
        seq.status = RequestStatus::Running;
        seq.queue_key = None;
        let tenant = seq.req.tenant;
        self.waiting.running_changed(tenant, true);
        self.running.push(slot);
        let seq = self.slots[slot as usize].as_mut().expect("live slot");
        push_scheduled(seq, out, slot, n, appended);
        Some(n)
    }

    /// Index in `running` of the request to preempt: the lowest priority (largest
    /// (priority, arrival)) under the priority queue, otherwise the newest admitted. Requests in
    /// flight are never victims.
    fn pick_victim(&self) -> Option<usize> {
        let idle = |&(_, &s): &(usize, &u32)| self.seq(s).in_flight == 0;
        match self.cfg.queue {
            QueuePolicy::Priority { .. } => self
                .running
                .iter()
                .enumerate()
                .filter(idle)
                .max_by_key(|&(_, &s)| {
                    let r = &self.seq(s).req;
                    (r.priority, r.arrival, r.id)
                })
                .map(|(i, _)| i),
            _ => self
                .running
                .iter()
                .enumerate()
                .rev()
                .find(idle)
                .map(|(i, _)| i),
        }
    }

    /// Under the priority queue only: preempts the lowest-priority running request (not in
    /// flight) if its priority value is strictly larger than the waiting head's, to make room
    /// for the head. Returns the tokens it had been given in this step, or `None` when there is
    /// no such victim.
    fn preempt_for_waiting_head(&mut self, out: &mut SchedulerOutput) -> Option<u32> {
        let QueuePolicy::Priority { .. } = self.cfg.queue else {
            return None;
        };
        let head = self.seq(self.waiting.peek()?).req.priority;
        let v = self.pick_victim()?;
        if self.seq(self.running[v]).req.priority <= head {
            return None;
        }
        Some(self.preempt(v, out))
    }

    /// Grows `running[*i]` by `num_new` token slots, preempting victims until it fits. Victims
    /// already scheduled this step lose their share; the tokens they gave back are added to
    /// `refund`. `*i` is kept pointing at the same request (or, if it was preempted, at the
    /// request that took its place).
    fn grow_running(
        &mut self,
        i: &mut usize,
        num_new: u32,
        out: &mut SchedulerOutput,
        refund: &mut u32,
    ) -> Grow {
        loop {
            let slot = self.running[*i];
            let seq = self.slots[slot as usize]
                .as_mut()
                .expect("running slot is live");
            let spec = AllocSpec {
                num_computed: seq.num_computed,
                new_computed: &[],
                num_new_tokens: num_new,
                apply_watermark: false,
            };
            if let Some(appended) = self.kv.allocate_slots(&mut seq.table, &spec) {
                return Grow::Allocated(appended);
            }
            let Some(v) = self.pick_victim() else {
                return Grow::Blocked;
            };
            *refund += self.preempt(v, out);
            if v == *i {
                return Grow::SelfPreempted;
            }
            if v < *i {
                *i -= 1;
            }
        }
    }

    /// Preempts `running[idx]`: its KV is freed (recompute) or copied to the host (swap), it
    /// goes back to the waiting queue's front, and any share it had in this step is removed.
    /// Returns the tokens of that share.
    fn preempt(&mut self, idx: usize, out: &mut SchedulerOutput) -> u32 {
        let slot = self.running.remove(idx);
        let refund = match out.scheduled.iter().position(|e| e.slot == slot) {
            Some(p) => out.scheduled.remove(p).num_tokens,
            None => 0,
        };
        let seq = self.slots[slot as usize]
            .as_mut()
            .expect("running slot is live");
        assert_eq!(seq.in_flight, 0, "a request in flight is never preempted");
        let keep = self.kv.blocks_for(seq.num_computed);
        let host = match self.cfg.preemption {
            PreemptionMode::Swap if keep > 0 => self.host.allocate(keep),
            PreemptionMode::Swap | PreemptionMode::Recompute => None,
        };
        match host {
            Some(host_blocks) => {
                out.swap_out.extend(
                    seq.table
                        .blocks
                        .iter()
                        .copied()
                        .zip(host_blocks.iter().copied()),
                );
                seq.swapped = host_blocks;
                seq.status = RequestStatus::Swapped;
                self.num_swapped += 1;
            }
            None => {
                seq.num_computed = 0;
                seq.status = RequestStatus::Waiting;
            }
        }
        self.kv.free(&mut seq.table);
        seq.num_preemptions += 1;
        seq.send_full = self.request_data;
        out.preempted.push(seq.req.id);
        let tenant = seq.req.tenant;
        self.num_preemptions += 1;
        self.waiting.running_changed(tenant, false);
        self.enqueue(slot, true);
        tracing::debug!(request = %self.seq(slot).req.id, "preempted");
        refund
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
        }
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
            RequestStatus::Waiting | RequestStatus::Finished(_) => {}
        }
        self.kv.free(&mut seq.table);
        self.free_slots.push(slot);
        self.index.remove(&seq.req.id);
        self.finished_ids.push(seq.req.id);
        self.num_finished += 1;
        FinishedRecord {
            id: seq.req.id,
            reason,
            tenant: seq.req.tenant,
            priority: seq.req.priority,
            arrival: seq.req.arrival,
            deadline: seq.req.deadline,
            first_scheduled: seq.first_scheduled,
            first_token: seq.first_token,
            finished_at: now,
            prompt_tokens: seq.prompt_len(),
            output_tokens: seq.num_output,
            cached_prompt_tokens: seq.cached_prompt_tokens.unwrap_or(0),
            num_preemptions: seq.num_preemptions,
        }
    }

    /// Schedules every running request's next tokens (capped by `cap(seq, budget)`; 0 skips
    /// it), growing allocations and preempting as needed, in running order. `budget` falls by
    /// the tokens scheduled and rises by the shares of victims preempted after being scheduled.
    fn run_running(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut u32,
        mut cap: impl FnMut(&Seq, u32) -> u32,
    ) {
        let mut i = 0;
        while i < self.running.len() {
            let slot = self.running[i];
            let seq = self.slots[slot as usize]
                .as_mut()
                .expect("running slot is live");
            let n = cap(seq, *budget).min(seq.remaining());
            if n == 0 {
                i += 1;
                continue;
            }
            // Fast path (most decodes): the table's last block has room for the new tokens.
            if self.kv.blocks_for(seq.num_computed + n) <= seq.table.len() as u32 {
                push_scheduled(seq, out, slot, n, 0);
                *budget = budget.saturating_sub(n);
                i += 1;
                continue;
            }
            let mut refund = 0;
            let grow = self.grow_running(&mut i, n, out, &mut refund);
            *budget += refund;
            match grow {
                Grow::Allocated(appended) => {
                    let slot = self.running[i];
                    let seq = self.slots[slot as usize].as_mut().expect("live slot");
                    push_scheduled(seq, out, slot, n, appended);
                    *budget = budget.saturating_sub(n);
                    i += 1;
                }
                Grow::Blocked => i += 1,
                Grow::SelfPreempted => {}
            }
        }
    }
}

/// Appends `seq`'s share of the step; `appended` blocks were added to its table this step.
fn push_scheduled(seq: &mut Seq, out: &mut SchedulerOutput, slot: u32, n: u32, appended: u32) {
    let blocks = &seq.table.blocks;
    let start = out.block_ids.len() as u32;
    if appended > 0 {
        out.block_ids
            .extend_from_slice(&blocks[blocks.len() - appended as usize..]);
    }
    let new = if seq.send_full {
        seq.send_full = false;
        out.request_data.push(NewRequestData {
            prompt: seq.req.prompt.clone(),
            output: seq.output.clone(),
            sampling: seq.req.sampling.clone(),
            block_table: blocks.clone(),
            resumed: seq.num_preemptions > 0,
        });
        Some(out.request_data.len() as u32 - 1)
    } else {
        None
    };
    out.scheduled.push(ScheduledRequest {
        id: seq.id,
        num_tokens: n,
        num_computed: seq.num_computed,
        prompt_len: seq.prompt_len,
        samples: seq.num_computed + n == seq.num_tokens(),
        new_blocks: (start, appended),
        new,
        tenant: seq.tenant,
        slot,
    });
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
    for seq in s.slots.iter().flatten() {
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
    assert_eq!(
        s.index.len(),
        running + s.waiting.len(),
        "every live request is running or waiting"
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
