//! vLLM v1's step: running requests first (decodes and unfinished prefills, in running order),
//! then waiting ones, all under `max_num_batched_tokens`; a per-request cap
//! (`long_prefill_token_threshold`); admission only when the whole prompt's blocks are free
//! (`reserve_full_isl`, vLLM's default); recompute or swap preemption of the newest running request
//! (or the lowest priority under the priority queue) when blocks run out; no admission in a
//! step that preempted; head-of-line blocking when the queue head does not fit. Under the
//! priority queue a waiting request that does not fit for lack of blocks may also preempt a
//! running request of strictly lower priority (as SGLang's priority preemption; vLLM v1 only
//! preempts for running requests).

use super::config::VllmV1Config;
use super::policy::{AdmitSpec, BatchPolicy, Reserve, Step};

/// vLLM v1's step.
#[derive(Debug, Clone)]
pub struct VllmV1(pub VllmV1Config);

impl BatchPolicy for VllmV1 {
    fn name(&self) -> &str {
        "vllm_v1"
    }

    fn default_watermark(&self) -> f64 {
        // vLLM v1 keeps no blocks back at admission.
        0.0
    }

    fn whole_prompt_budget(&self) -> Option<u32> {
        (!self.0.enable_chunked_prefill).then_some(self.0.max_num_batched_tokens)
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let c = &self.0;
        let cap = match c.long_prefill_token_threshold {
            0 => u32::MAX,
            t => t,
        };
        let mut budget = c.max_num_batched_tokens;
        step.schedule_running(&mut budget, |_, b| b.min(cap));
        if step.preempted_any() {
            return;
        }
        while budget > 0 && step.has_room() {
            let spec = AdmitSpec {
                max_tokens: budget.min(cap),
                whole: !c.enable_chunked_prefill,
                reserve: if c.reserve_full_isl {
                    Reserve::ScheduledIfAllFit
                } else {
                    Reserve::Scheduled
                },
            };
            if let Some(n) = step.admit(spec) {
                budget -= n;
                continue;
            }
            let head = step.waiting_head().map(|s| s.remaining());
            let short_of_budget = !c.enable_chunked_prefill && head.is_some_and(|r| r > budget);
            if short_of_budget {
                break;
            }
            match step.preempt_for_waiting_head() {
                Some(refund) => budget += refund,
                None => break,
            }
        }
    }
}
