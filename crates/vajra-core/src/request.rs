//! Requests and their lifecycle.
//!
//! A request carries either real prompt token ids (the engine) or, for simulated traces, a
//! prompt length plus optional prefix-group ids (as Mooncake's `hash_ids`): consecutive groups
//! of `group_tokens` tokens whose ids say which requests share them, so that shared prefixes
//! hash to identical KV blocks without token ids.
//!
//! Lifecycle of a sequence inside the scheduler:
//!
//! ```text
//!   add_request ──► Waiting ──schedule──► Running ──update──► Finished(Length | Stop)
//!                     ▲                      │
//!                     └──── Preempted ◄──────┘   (recompute: KV freed; swap: KV on host)
//!   abort from any live state ──► Finished(Abort)
//! ```

use crate::error::{Result, ensure};
use crate::ids::{RequestId, TenantId};
use crate::sampling::SamplingParams;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Real token ids (engine, or simulated traces that carry tokens).
    Tokens(Vec<u32>),
    /// A simulated prompt: a length and optional prefix groups.
    Synthetic(SyntheticPrompt),
}

/// A prompt known only by its length and which prefix groups it shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticPrompt {
    /// Number of prompt tokens.
    pub len: u32,
    /// Ids of consecutive groups of `group_tokens` tokens from the start of the prompt.
    /// Two requests whose first `k` group ids are equal share their first `k·group_tokens`
    /// tokens. Tokens beyond the last group are unique to the request.
    pub prefix_groups: Vec<u64>,
    /// Tokens per prefix group (Mooncake traces use 512). Ignored when there are no groups.
    pub group_tokens: u32,
    /// Whether the groups go on past the prompt to describe the output too (a session turn,
    /// whose answer is part of the next turn's prompt): then full output blocks inside the
    /// groups get shared hashes, as generated tokens do in vLLM's prefix cache. Otherwise
    /// output blocks are private to the request.
    #[serde(default)]
    pub output_in_groups: bool,
}

impl Prompt {
    /// Number of prompt tokens.
    pub fn len(&self) -> u32 {
        match self {
            Prompt::Tokens(t) => t.len() as u32,
            Prompt::Synthetic(s) => s.len,
        }
    }
    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A synthetic prompt of `len` tokens sharing nothing.
    pub fn synthetic(len: u32) -> Self {
        Prompt::Synthetic(SyntheticPrompt {
            len,
            prefix_groups: Vec::new(),
            group_tokens: 0,
            output_in_groups: false,
        })
    }
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It generated its maximum (or, in simulation, its target) number of tokens.
    Length,
    /// It generated an end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// The client or the operator aborted it.
    Abort,
    /// The scheduler rejected it, unserved, once it could no longer meet its TTFT target
    /// (`scheduler.late_requests = "reject"`).
    Rejected,
}

/// Where a sequence is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// In the waiting queue, never scheduled (or resumed after recompute preemption).
    Waiting,
    /// Holding KV blocks and being scheduled.
    Running,
    /// Preempted to host memory (swap mode): waiting, with its KV on the host.
    Swapped,
    /// Its KV blocks are in transit between instances (disaggregated prefill and decode): on
    /// the prefill instance, held until the decode instance has them; on the decode instance,
    /// reserved until they arrive. Neither waiting nor running.
    Transferring,
    /// Done.
    Finished(FinishReason),
}

/// A request as the scheduler receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Unique id within the run.
    pub id: RequestId,
    /// The prompt.
    pub prompt: Prompt,
    /// When the request arrived.
    pub arrival: Timestamp,
    /// Scheduling priority: lower values are served first (as vLLM).
    pub priority: i32,
    /// Who sent it (fairness, accounting, optional cache isolation).
    pub tenant: TenantId,
    /// Absolute deadline for completion, if the request has one (EDF, deadline metrics).
    pub deadline: Option<Timestamp>,
    /// When its first token must come to meet its TTFT target, if it has one (rejection of
    /// late requests, `scheduler.late_requests = "reject"`).
    #[serde(default)]
    pub ttft_deadline: Option<Timestamp>,
    /// SLO class index, if the workload defines classes.
    pub slo_class: Option<u32>,
    /// Sampling parameters; `max_tokens` is the output target (in simulation, the exact length).
    pub sampling: SamplingParams,
    /// Extra key mixed into the first block's hash (LoRA adapter, cache salt, tenant isolation):
    /// requests with different salts never share cached blocks.
    pub cache_salt: Option<u64>,
    /// The conversation this request is a turn of, if any (session-affinity routing).
    #[serde(default)]
    pub session: Option<u64>,
    /// Whether this is its session's last turn: whoever keeps per-session state (a
    /// session-affine router, a client replaying the conversation) can drop it.
    #[serde(default)]
    pub last_turn: bool,
}

impl Request {
    /// A request with defaults for everything but id, prompt, output length and arrival.
    pub fn new(id: RequestId, prompt: Prompt, max_tokens: u32, arrival: Timestamp) -> Self {
        Request {
            id,
            prompt,
            arrival,
            priority: 0,
            tenant: TenantId(0),
            deadline: None,
            ttft_deadline: None,
            slo_class: None,
            sampling: SamplingParams::greedy(max_tokens),
            cache_salt: None,
            session: None,
            last_turn: false,
        }
    }

    /// Maximum number of output tokens.
    pub fn max_tokens(&self) -> u32 {
        self.sampling.max_tokens
    }

    /// Checks the request against the model's context length.
    ///
    /// # Errors
    /// An empty prompt, a prompt plus `max_tokens` longer than `max_model_len`, or invalid
    /// sampling parameters.
    pub fn validate(&self, max_model_len: u32) -> Result<()> {
        self.sampling.validate()?;
        let len = self.prompt.len();
        ensure(len >= 1, "prompt", len, "at least one token")?;
        let total = u64::from(len) + u64::from(self.max_tokens());
        ensure(
            total <= u64::from(max_model_len),
            "prompt + max_tokens",
            format!("{len} + {} = {total}", self.max_tokens()),
            &format!("at most max_model_len = {max_model_len} tokens"),
        )?;
        if let Prompt::Synthetic(s) = &self.prompt {
            ensure(
                s.prefix_groups.is_empty() || s.group_tokens >= 1,
                "prompt.group_tokens",
                s.group_tokens,
                "≥ 1 when prefix_groups are given",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_longer_than_the_context_is_rejected_with_both_lengths() {
        let r = Request::new(RequestId(1), Prompt::synthetic(4000), 200, Timestamp::ZERO);
        let msg = r.validate(4096).unwrap_err().to_string();
        assert!(msg.contains("4000 + 200"), "{msg}");
        assert!(msg.contains("4096"), "{msg}");
        r.validate(4200).unwrap();
    }

    #[test]
    fn empty_prompt_is_rejected() {
        let r = Request::new(RequestId(1), Prompt::Tokens(vec![]), 1, Timestamp::ZERO);
        assert!(r.validate(100).is_err());
    }
}
