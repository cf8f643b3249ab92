//! vLLM v1's step: running requests first (decodes and unfinished prefills, in running order),
//! then waiting ones, all under `max_num_batched_tokens`; a per-request cap
//! (`long_prefill_token_threshold`); recompute or swap preemption of the newest running request
//! (or the lowest priority under the priority queue) when blocks run out; no admission in a
//! step that preempted; head-of-line blocking when the queue head does not fit. Under the
//! priority queue a waiting request that does not fit for lack of blocks may also preempt a
//! running request of strictly lower priority (as SGLang's priority preemption; vLLM v1 only
//! preempts for running requests).

use super::config::VllmV1Config;
use super::output::SchedulerOutput;
use super::{AdmitSpec, Reserve, Scheduler};

impl Scheduler {
    pub(super) fn schedule_vllm_v1(
        &mut self,
        c: &VllmV1Config,
        max_seqs: usize,
        out: &mut SchedulerOutput,
    ) {
        let cap = match c.long_prefill_token_threshold {
            0 => u32::MAX,
            t => t,
        };
        let mut budget = c.max_num_batched_tokens;
        self.run_running(out, &mut budget, |_, b| b.min(cap));
        if !out.preempted.is_empty() {
            return;
        }
        while budget > 0 && self.running.len() < max_seqs {
            let spec = AdmitSpec {
                max_tokens: budget.min(cap),
                whole: !c.enable_chunked_prefill,
                reserve: Reserve::Scheduled,
            };
            if let Some(n) = self.admit(spec, out) {
                budget -= n;
                continue;
            }
            let head = self.waiting.peek().map(|s| self.seq(s).remaining());
            let short_of_budget = !c.enable_chunked_prefill && head.is_some_and(|r| r > budget);
            if short_of_budget {
                break;
            }
            match self.preempt_for_waiting_head(out) {
                Some(refund) => budget += refund,
                None => break,
            }
        }
    }
}
