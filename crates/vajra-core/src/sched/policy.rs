//! Policies as types: the public traits a batching policy and a preemption-victim rule
//! implement, and the toolbox ([`Step`]) through which a policy forms a step.
//!
//! A [`BatchPolicy`] decides, once per step, which running requests advance and which waiting
//! ones are admitted, in what order and with how many tokens. It owns its state (LightLLM's
//! decode counter lives in its policy, not on the scheduler). It never touches blocks, the
//! waiting queue or the output directly: [`Step`] does, and keeps the invariants a policy must
//! not be able to break —
//!
//! - block accounting: allocations, the watermark at admission, freeing on preemption, prefix
//!   hits, swap copies;
//! - the running cap: nothing is admitted beyond `max_num_seqs`;
//! - tokens: a request is never given more tokens than it has uncomputed, and a token budget
//!   passed to [`Step::schedule_running`] falls by what was scheduled and rises by the share of
//!   a victim preempted after it was scheduled;
//! - requests in flight (pipeline micro-batches) are never preempted.
//!
//! In-tree policies are built from [`super::config::PolicyConfig`] by an exhaustive `match`
//! (the registry, [`super::config::PolicyConfig::build`]); an out-of-tree one is handed to
//! [`super::Scheduler::with_policy`]. The victim rule is a [`VictimPolicy`]: by default the
//! newest running request, or the lowest priority under the priority queue.

use super::{Scheduler, Seq};
use crate::ids::{RequestId, TenantId};
use crate::sched::output::SchedulerOutput;
use crate::time::Timestamp;

/// A batching policy: forms one step at a time through a [`Step`].
///
/// The scheduler calls [`BatchPolicy::schedule`] once per step, after which it advances the
/// scheduled requests' computed tokens, caches newly full blocks and charges tenants.
pub trait BatchPolicy: std::fmt::Debug + Send {
    /// The policy's name, as written in config files and run records.
    fn name(&self) -> &str;

    /// Forms this step: schedules running requests and admits waiting ones.
    fn schedule(&mut self, step: &mut Step<'_>);

    /// For a policy that never splits a prompt across steps: its per-step token budget, which
    /// must then be at least `max_model_len` or a long prompt could never run. `None` (the
    /// default) for policies that chunk or have no budget.
    fn whole_prompt_budget(&self) -> Option<u32> {
        None
    }

    /// The admission watermark when `cache.watermark` is absent: vLLM v0's 1 % of blocks.
    fn default_watermark(&self) -> f64 {
        crate::kv::manager::DEFAULT_WATERMARK
    }
}

/// Chooses which running request to preempt when blocks run out.
pub trait VictimPolicy: std::fmt::Debug + Send {
    /// The index in `candidates` (the running requests that may be preempted — none is in
    /// flight — in running order, oldest admitted first) of the victim, or `None` to preempt
    /// nothing (the request that needed blocks then waits for them).
    fn pick(&self, candidates: &[Candidate]) -> Option<usize>;
}

/// A running request that may be preempted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The request.
    pub id: RequestId,
    /// Its priority (lower is more important).
    pub priority: i32,
    /// When it arrived.
    pub arrival: Timestamp,
    /// Tokens computed (what recompute preemption throws away).
    pub num_computed: u32,
    /// Prompt tokens.
    pub prompt_len: u32,
    /// Tokens generated so far.
    pub num_output: u32,
    /// Index in the running list.
    pub(crate) running_index: usize,
}

/// The newest admitted running request (vLLM's rule).
#[derive(Debug, Clone, Copy, Default)]
pub struct NewestVictim;

impl VictimPolicy for NewestVictim {
    fn pick(&self, candidates: &[Candidate]) -> Option<usize> {
        candidates.len().checked_sub(1)
    }
}

/// The running request of lowest priority (largest priority value), latest arrival breaking
/// ties (the priority queue's rule).
#[derive(Debug, Clone, Copy, Default)]
pub struct LowestPriorityVictim;

impl VictimPolicy for LowestPriorityVictim {
    fn pick(&self, candidates: &[Candidate]) -> Option<usize> {
        candidates
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| (c.priority, c.arrival, c.id))
            .map(|(i, _)| i)
    }
}

/// How much KV a request being admitted reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Only the tokens scheduled now (vLLM v1 without `reserve_full_isl`).
    Scheduled,
    /// Only the tokens scheduled now, and only when blocks for every known token not yet
    /// computed are free (vLLM v1's `scheduler_reserve_full_isl`).
    ScheduledIfAllFit,
    /// Every known token not yet computed (Sarathi-Serve's whole-prompt reservation).
    Remaining,
    /// Known tokens plus the largest possible output (Orca, FasterTransformer).
    WorstCase,
}

/// One admission attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmitSpec {
    /// Most tokens to schedule for it this step.
    pub max_tokens: u32,
    /// All its uncomputed tokens must fit in `max_tokens` (no chunking).
    pub whole: bool,
    /// What it reserves.
    pub reserve: Reserve,
}

/// A read-only view of a request in the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SeqView<'a>(pub(super) &'a Seq);

impl SeqView<'_> {
    /// The request.
    pub fn id(&self) -> RequestId {
        self.0.id
    }
    /// Tokens computed so far.
    pub fn num_computed(&self) -> u32 {
        self.0.num_computed
    }
    /// Prompt tokens.
    pub fn prompt_len(&self) -> u32 {
        self.0.prompt_len
    }
    /// Tokens generated so far.
    pub fn num_output(&self) -> u32 {
        self.0.num_output
    }
    /// Known tokens: prompt plus output so far.
    pub fn num_tokens(&self) -> u32 {
        self.0.num_tokens()
    }
    /// Known tokens not yet computed.
    pub fn remaining(&self) -> u32 {
        self.0.remaining()
    }
    /// Whether the whole prompt has been computed.
    pub fn prefill_done(&self) -> bool {
        self.0.prefill_done()
    }
    /// Most tokens it may still generate.
    pub fn remaining_output(&self) -> u32 {
        self.0.remaining_output()
    }
    /// Its priority (lower is more important).
    pub fn priority(&self) -> i32 {
        self.0.req.priority
    }
    /// When it arrived.
    pub fn arrival(&self) -> Timestamp {
        self.0.req.arrival
    }
    /// Its tenant.
    pub fn tenant(&self) -> TenantId {
        self.0.tenant
    }
}

/// The toolbox a [`BatchPolicy`] forms a step with. See the module docs for the invariants it
/// keeps.
pub struct Step<'a> {
    pub(super) sched: &'a mut Scheduler,
    pub(super) out: &'a mut SchedulerOutput,
}

impl Step<'_> {
    /// The most requests that may run at once (`scheduler.max_num_seqs`).
    pub fn max_num_seqs(&self) -> u32 {
        self.sched.cfg.max_num_seqs
    }
    /// Requests running (admitted and holding KV).
    pub fn num_running(&self) -> usize {
        self.sched.running.len()
    }
    /// Whether another request may be admitted under `max_num_seqs`.
    pub fn has_room(&self) -> bool {
        self.sched.running.len() < self.sched.cfg.max_num_seqs as usize
    }
    /// Requests waiting (including swapped ones).
    pub fn num_waiting(&self) -> usize {
        self.sched.waiting.len()
    }
    /// The head of the waiting queue in its configured order.
    pub fn waiting_head(&self) -> Option<SeqView<'_>> {
        let slot = self.sched.waiting.peek()?;
        Some(SeqView(self.sched.seq(slot)))
    }
    /// Every waiting request (head first for FCFS and keyed orders).
    pub fn waiting(&self) -> impl Iterator<Item = SeqView<'_>> {
        self.sched
            .waiting
            .slots()
            .map(|s| SeqView(self.sched.seq(s)))
    }
    /// The running requests, oldest admitted first.
    pub fn running(&self) -> impl Iterator<Item = SeqView<'_>> {
        self.sched
            .running
            .iter()
            .map(|&s| SeqView(self.sched.seq(s)))
    }
    /// Tokens per KV block.
    pub fn block_size(&self) -> u32 {
        self.sched.kv.block_size()
    }
    /// Device KV blocks of the replica.
    pub fn num_blocks(&self) -> u32 {
        self.sched.kv.num_blocks()
    }
    /// Requests scheduled so far in this step.
    pub fn num_scheduled(&self) -> usize {
        self.out.scheduled.len()
    }
    /// Tokens scheduled so far in this step.
    pub fn scheduled_tokens(&self) -> u32 {
        self.out.scheduled.iter().map(|e| e.num_tokens).sum()
    }
    /// Whether any request was preempted in this step.
    pub fn preempted_any(&self) -> bool {
        !self.out.preempted.is_empty()
    }

    /// Schedules every running request's next tokens in running order: `cap(request, budget)`
    /// tokens (clipped to its uncomputed tokens; 0 skips it), growing allocations and
    /// preempting victims as needed. `budget` falls by the tokens scheduled and rises by the
    /// shares of victims preempted after being scheduled; the caller's `cap` decides whether
    /// to respect it.
    pub fn schedule_running(&mut self, budget: &mut u32, cap: impl FnMut(SeqView<'_>, u32) -> u32) {
        self.sched.run_running(self.out, budget, cap);
    }

    /// Tries to admit the head of the waiting queue. Returns the tokens scheduled for it, or
    /// `None` (the queue unchanged) when it does not fit, `max_num_seqs` is reached or the
    /// queue is empty.
    pub fn admit(&mut self, spec: AdmitSpec) -> Option<u32> {
        let slot = self.sched.waiting.peek()?;
        self.sched.admit_slot(slot, spec, self.out)
    }

    /// Tries to admit the waiting request `id`, wherever it is in the queue. As
    /// [`Step::admit`]; `None` also when `id` is not waiting.
    pub fn admit_request(&mut self, id: RequestId, spec: AdmitSpec) -> Option<u32> {
        let slot = *self.sched.index.get(&id)?;
        self.sched.seq(slot).queue_key?;
        self.sched.admit_slot(slot, spec, self.out)
    }

    /// Under the priority queue only: preempts the victim rule's choice if its priority value
    /// is strictly larger than the waiting head's, to make room for the head. Returns the
    /// tokens it had been given in this step, or `None` when there is no such victim.
    pub fn preempt_for_waiting_head(&mut self) -> Option<u32> {
        self.sched.preempt_for_waiting_head(self.out)
    }
}
