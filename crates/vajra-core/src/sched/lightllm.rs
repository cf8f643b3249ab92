//! LightLLM: a prefill step (whole prompts, up to `max_num_batched_tokens`) runs when nothing
//! is running or after `max_waiting_iters` decode-only steps; otherwise the step decodes every
//! running request. A waiting request is admitted only if LightLLM's future-usage check passes:
//! with running requests (and the candidate) sorted by remaining output `r` descending and
//! current tokens `c`, the KV peak when the `i`-th finishes is
//! `Σ_{j≤i} c_j + (i+1)·r_i` tokens, plus up to one partial block per request (blocks here are
//! not one token as in LightLLM); the maximum over `i` must fit the cache. Unlike Vidur's
//! version (which raises on OOM), a short pool preempts the newest running request.

use super::config::LightllmConfig;
use super::output::SchedulerOutput;
use super::{AdmitSpec, Reserve, Scheduler};

impl Scheduler {
    pub(super) fn schedule_lightllm(
        &mut self,
        c: &LightllmConfig,
        max_seqs: usize,
        out: &mut SchedulerOutput,
    ) {
        let prefill_turn =
            self.running.is_empty() || self.decode_steps_since_prefill >= c.max_waiting_iters;
        if prefill_turn {
            let mut budget = c.max_num_batched_tokens;
            let mut admitted = 0;
            while self.running.len() < max_seqs {
                let Some(head) = self.waiting.peek() else {
                    break;
                };
                if !self.running.is_empty() && !self.future_usage_fits(head) {
                    break;
                }
                let spec = AdmitSpec {
                    max_tokens: budget,
                    whole: true,
                    reserve: Reserve::Remaining,
                };
                match self.admit(spec, out) {
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
        self.run_running(out, &mut unlimited, |_, _| u32::MAX);
        if !out.scheduled.is_empty() {
            self.decode_steps_since_prefill += 1;
        }
    }

    /// LightLLM's check that the running requests plus `candidate` never exceed the cache.
    fn future_usage_fits(&self, candidate: u32) -> bool {
        let bs = u64::from(self.kv.block_size());
        let capacity = u64::from(self.kv.num_blocks()) * bs;
        let mut v: Vec<(u64, u64)> = self
            .running
            .iter()
            .chain(std::iter::once(&candidate))
            .map(|&s| {
                let q = self.seq(s);
                (u64::from(q.remaining_output()), u64::from(q.num_tokens()))
            })
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
}
