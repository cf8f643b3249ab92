//! LightLLM: a prefill step (whole prompts, up to `max_num_batched_tokens`) runs when nothing
//! is running or after `max_waiting_iters` decode-only steps; otherwise the step decodes every
//! running request. A waiting request is admitted only if LightLLM's future-usage check passes:
//! with running requests (and the candidate) sorted by remaining output `r` descending and
//! current tokens `c`, the KV peak when the `i`-th finishes is
//! `Σ_{j≤i} c_j + (i+1)·r_i` tokens, plus up to one partial block per request (blocks here are
//! not one token as in LightLLM); the maximum over `i` must fit the cache. Unlike Vidur's
//! version (which raises on OOM), a short pool preempts the newest running request.

use super::config::LightllmConfig;
use super::policy::{AdmitSpec, BatchPolicy, Reserve, SeqView, Step};

/// LightLLM's steps, with its own counter of decode-only steps.
#[derive(Debug, Clone)]
pub struct Lightllm {
    cfg: LightllmConfig,
    /// Decode-only steps since the last prefill step.
    decode_steps_since_prefill: u32,
}

impl Lightllm {
    /// A LightLLM policy that has run no step yet.
    pub fn new(cfg: LightllmConfig) -> Self {
        Lightllm {
            cfg,
            decode_steps_since_prefill: 0,
        }
    }
}

impl BatchPolicy for Lightllm {
    fn name(&self) -> &str {
        "lightllm"
    }

    fn whole_prompt_budget(&self) -> Option<u32> {
        Some(self.cfg.max_num_batched_tokens)
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let prefill_turn = step.num_running() == 0
            || self.decode_steps_since_prefill >= self.cfg.max_waiting_iters;
        if prefill_turn {
            let mut budget = self.cfg.max_num_batched_tokens;
            let mut admitted = 0;
            while step.has_room() {
                let Some(head) = step.waiting_head() else {
                    break;
                };
                if step.num_running() > 0 && !future_usage_fits(step, head) {
                    break;
                }
                let spec = AdmitSpec {
                    max_tokens: budget,
                    whole: true,
                    reserve: Reserve::Remaining,
                };
                match step.admit(spec) {
                    Some(n) => {
                        budget -= n;
                        admitted += 1;
                    }
                    None => break,
                }
            }
            if admitted > 0 {
                self.decode_steps_since_prefill = 0;
                return;
            }
        }
        let mut unlimited = u32::MAX;
        step.schedule_running(&mut unlimited, |_, _| u32::MAX);
        if step.num_scheduled() > 0 {
            self.decode_steps_since_prefill += 1;
        }
    }
}

/// LightLLM's check that the running requests plus `candidate` never exceed the cache.
fn future_usage_fits(step: &Step<'_>, candidate: SeqView<'_>) -> bool {
    let bs = u64::from(step.block_size());
    let capacity = u64::from(step.num_blocks()) * bs;
    let mut v: Vec<(u64, u64)> = step
        .running()
        .chain(std::iter::once(candidate))
        .map(|q| (u64::from(q.remaining_output()), u64::from(q.num_tokens())))
        .collect();
    v.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
    let mut cum = 0u64;
    for (i, &(r, c)) in v.iter().enumerate() {
        cum += c;
        let k = i as u64 + 1;
        if cum + k * r + k * (bs - 1) > capacity {
            return false;
        }
    }
    true
}
