//! Prefill-prioritised steps (vLLM v0; Vidur's `vllm`): if any waiting request fits, the step is
//! prefill-only — whole prompts, FCFS, while the token budget, the watermark and
//! `max_num_seqs` allow, each reserving its prompt's blocks. Otherwise the step is decode-only
//! over all running requests, growing one block at a time and preempting the newest running
//! request when short. With `padded_budget`, a prefill batch costs `len(batch) × longest
//! prompt` tokens, as Vidur counts it.

use super::config::VllmV0Config;
use super::policy::{AdmitSpec, BatchPolicy, Reserve, Step};

/// Prefill-prioritised steps.
#[derive(Debug, Clone)]
pub struct VllmV0(pub VllmV0Config);

impl BatchPolicy for VllmV0 {
    fn name(&self) -> &str {
        "vllm_v0"
    }

    fn whole_prompt_budget(&self) -> Option<u32> {
        Some(self.0.max_num_batched_tokens)
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let c = &self.0;
        let b = c.max_num_batched_tokens;
        let (mut used, mut count, mut longest) = (0u32, 0u32, 0u32);
        while step.has_room() {
            let max_tokens = if c.padded_budget {
                if longest * (count + 1) > b {
                    break;
                }
                b / (count + 1)
            } else {
                b - used
            };
            let spec = AdmitSpec {
                max_tokens,
                whole: true,
                reserve: Reserve::Remaining,
            };
            match step.admit(spec) {
                Some(n) => {
                    used += n;
                    count += 1;
                    longest = longest.max(n);
                }
                None => break,
            }
        }
        if count > 0 {
            return;
        }
        let mut unlimited = u32::MAX;
        step.schedule_running(&mut unlimited, |_, _| u32::MAX);
    }
}
