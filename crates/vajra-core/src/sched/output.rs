//! Plain, owned data that crosses the seam between the scheduler and an executor.
//!
//! [`SchedulerOutput`] says what runs this step: per request the number of tokens, the position
//! of the first one, the blocks appended to its table and, the first time a request runs after
//! admission, its full data. [`ModelRunnerOutput`] brings back one optional sampled token per
//! scheduled request, in the same order. [`RequestEvent`]s tell the caller which tokens were
//! appended and which requests finished, with their lifecycle timestamps.

use crate::ids::{BlockId, HostBlockId, RequestId, StepId, TenantId};
use crate::kv::KvStats;
use crate::request::{FinishReason, Prompt};
use crate::sampling::SamplingParams;
use crate::time::Timestamp;
use serde::Serialize;

/// Data an executor needs the first time it sees a request (or sees it again after it was
/// preempted).
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequestData {
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens generated before a preemption (empty for a fresh request, and always empty for
    /// a synthetic prompt, whose generated tokens are not kept).
    pub output: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// The request's whole block table after this step's allocation.
    pub block_table: Vec<BlockId>,
    /// Whether this is a request resumed after preemption.
    pub resumed: bool,
}

/// One request's share of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduledRequest {
    /// The request.
    pub id: RequestId,
    /// Tokens computed in this step.
    pub num_tokens: u32,
    /// Tokens already computed before this step (the position of the first token, and the
    /// attention context length the new tokens see).
    pub num_computed: u32,
    /// Prompt length (to split prefill and decode tokens).
    pub prompt_len: u32,
    /// Whether this step reaches the end of the known tokens, so a token is sampled.
    pub samples: bool,
    /// Blocks appended to the request's table in this step, as a range of
    /// [`SchedulerOutput::block_ids`] (read them with [`SchedulerOutput::new_blocks`]).
    pub(crate) new_blocks: (u32, u32),
    /// Full data, the first time the request runs after (re)admission, as an index into
    /// [`SchedulerOutput::request_data`] (read it with [`SchedulerOutput::new_data`]). Kept out
    /// of line so that this entry is plain `Copy` data and a step's buffer is reused without
    /// visiting its entries.
    pub(crate) new: Option<u32>,
    /// Tenant (for accounting and fairness).
    pub tenant: TenantId,
    pub(crate) slot: u32,
}

impl ScheduledRequest {
    /// Tokens of this step that belong to the prompt (prefill tokens).
    pub fn prefill_tokens(&self) -> u32 {
        self.prompt_len
            .saturating_sub(self.num_computed)
            .min(self.num_tokens)
    }
    /// Tokens of this step past the prompt (decode or recomputed output tokens).
    pub fn decode_tokens(&self) -> u32 {
        self.num_tokens - self.prefill_tokens()
    }
}

/// What runs in one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOutput {
    /// Step number.
    pub step: StepId,
    /// Requests in batch order.
    pub scheduled: Vec<ScheduledRequest>,
    /// The blocks appended in this step, every request's run end to end (one buffer per step
    /// instead of one per request).
    pub block_ids: Vec<BlockId>,
    /// Full data of the requests (re)admitted in this step.
    pub request_data: Vec<NewRequestData>,
    /// Sum of `num_tokens` over `scheduled`.
    pub num_batched_tokens: u32,
    /// Requests preempted in this step.
    pub preempted: Vec<RequestId>,
    /// Requests that finished or were aborted since the last step (the executor drops them).
    pub finished: Vec<RequestId>,
    /// Device blocks to copy to host blocks before the step (swap preemption).
    pub swap_out: Vec<(BlockId, HostBlockId)>,
    /// Host blocks to copy to device blocks before the step (swap resume).
    pub swap_in: Vec<(HostBlockId, BlockId)>,
}

impl SchedulerOutput {
    /// Whether nothing runs in this step.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Empties every list, keeping the buffers.
    pub fn clear(&mut self) {
        self.step = StepId::default();
        self.scheduled.clear();
        self.block_ids.clear();
        self.request_data.clear();
        self.num_batched_tokens = 0;
        self.preempted.clear();
        self.finished.clear();
        self.swap_out.clear();
        self.swap_in.clear();
    }

    /// `e`'s full data if it was (re)admitted in this step (`e` must come from this output).
    pub fn new_data(&self, e: &ScheduledRequest) -> Option<&NewRequestData> {
        e.new.map(|i| &self.request_data[i as usize])
    }

    /// Blocks appended to `e`'s table in this step (`e` must come from this output).
    pub fn new_blocks(&self, e: &ScheduledRequest) -> &[BlockId] {
        let (start, len) = e.new_blocks;
        &self.block_ids[start as usize..(start + len) as usize]
    }
}

/// A token an executor sampled for one scheduled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampledToken {
    /// The token id.
    pub token: u32,
    /// The executor decided the request stops here (end-of-sequence token without
    /// `ignore_eos`, or a stop string matched). Stop token ids and `max_tokens` are checked by
    /// the scheduler itself.
    pub stop: bool,
}

/// What an executor returns for a step: one entry per scheduled request, in batch order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRunnerOutput {
    /// `Some` for each request whose step sampled a token (`samples` was set).
    pub sampled: Vec<Option<SampledToken>>,
}

impl ModelRunnerOutput {
    /// An output that samples `token` for every request whose step reaches its end (what a
    /// simulator's token oracle returns).
    pub fn uniform(out: &SchedulerOutput, token: u32) -> Self {
        let mut r = ModelRunnerOutput::default();
        r.fill_uniform(out, token);
        r
    }

    /// Refills this output as [`ModelRunnerOutput::uniform`] would build it, reusing its
    /// buffer.
    pub fn fill_uniform(&mut self, out: &SchedulerOutput, token: u32) {
        self.sampled.clear();
        self.sampled.extend(
            out.scheduled
                .iter()
                .map(|s| s.samples.then_some(SampledToken { token, stop: false })),
        );
    }
}

/// The lifecycle of a finished request, in the form both modes' metrics consume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinishedRecord {
    /// The request.
    pub id: RequestId,
    /// Why it finished.
    pub reason: FinishReason,
    /// Tenant.
    pub tenant: TenantId,
    /// Priority.
    pub priority: i32,
    /// SLO class, if the workload defines classes.
    pub slo_class: Option<u32>,
    /// Arrival.
    pub arrival: Timestamp,
    /// Deadline, if any.
    pub deadline: Option<Timestamp>,
    /// First time it was scheduled.
    pub first_scheduled: Option<Timestamp>,
    /// When its first output token was appended.
    pub first_token: Option<Timestamp>,
    /// When it finished.
    pub finished_at: Timestamp,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens generated.
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: u32,
    /// Times it was preempted.
    pub num_preemptions: u32,
    /// When it was prefilled on another instance and decoded here: the hand-off's times.
    pub disagg: Option<DisaggTimes>,
}

/// The hand-off times of a request prefilled on one instance and decoded on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DisaggTimes {
    /// When the prefill instance sampled the first token (its prefill's end).
    pub prefill_done: Timestamp,
    /// When its KV blocks (and the first token) reached the decode instance: the first token
    /// reaches the client then.
    pub kv_arrived: Timestamp,
    /// When the decode instance first scheduled it.
    pub decode_scheduled: Option<Timestamp>,
}

/// Something that happened to a request in `update_from_output` or `abort`.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    /// A token was appended to the request's output.
    Token {
        /// The request.
        id: RequestId,
        /// The token id.
        token: u32,
        /// Its index in the output (0 for the first token).
        index: u32,
    },
    /// The request finished.
    Finished(Box<FinishedRecord>),
    /// A prefill instance sampled the request's first token and keeps its KV blocks for a
    /// decode instance ([`crate::sched::Scheduler::take_handoff`]): the token is not appended
    /// here; it reaches the client from the decode instance, with the KV.
    HandedOff {
        /// The request.
        id: RequestId,
        /// The first token's id.
        token: u32,
    },
}

/// Scheduler counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SchedulerStats {
    /// Steps scheduled.
    pub steps: u64,
    /// Requests waiting (including swapped ones).
    pub num_waiting: u32,
    /// Requests running.
    pub num_running: u32,
    /// Requests waiting with their KV on the host.
    pub num_swapped: u32,
    /// Preemptions so far.
    pub num_preemptions: u64,
    /// Requests finished so far (any reason).
    pub num_finished: u64,
    /// Requests handed to a decode instance after their prefill (a prefill instance's).
    pub num_handed_off: u64,
    /// Requests whose KV arrived from a prefill instance (a decode instance's).
    pub num_received: u64,
    /// KV-cache counters.
    pub kv: KvStats,
}
