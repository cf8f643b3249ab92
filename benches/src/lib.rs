//! Fixtures for Vajra's criterion benchmarks: schedulers in a steady decode state.

use vajra_core::config::{CacheConfig, PolicyConfig, SchedulerConfig};
use vajra_core::ids::RequestId;
use vajra_core::request::{Prompt, Request};
use vajra_core::sched::Scheduler;
use vajra_core::sched::output::ModelRunnerOutput;
use vajra_core::time::Timestamp;

/// Steps a decode-state fixture can run before its requests near their end.
pub const STEPS_PER_FIXTURE: u64 = 8_000;

/// The prompts of a decode-state fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompts {
    /// Synthetic 128-token prompts (the simulator's requests).
    Synthetic,
    /// 128 real token ids each (the engine's requests): generated tokens are kept and every
    /// full block is hashed by content and indexed.
    Tokens,
}

/// A scheduler with `running` requests decoding (128-token prompts already prefilled) and
/// `waiting` more queued behind `max_num_seqs = running`.
///
/// # Panics
/// If the fixture's config is invalid (a bug in the fixture).
pub fn decode_state(
    policy: PolicyConfig,
    running: u32,
    waiting: u32,
    prompts: Prompts,
) -> Scheduler {
    let cfg = SchedulerConfig {
        max_num_seqs: running,
        ..SchedulerConfig::new(policy)
    };
    let cache = CacheConfig::default();
    let max_len = 128 + STEPS_PER_FIXTURE as u32 + 64;
    let blocks = running * max_len.div_ceil(16) + 1024;
    let mut s = Scheduler::new(cfg, &cache, blocks, max_len).expect("valid fixture");
    for i in 0..u64::from(running + waiting) {
        let prompt = match prompts {
            Prompts::Synthetic => Prompt::synthetic(128),
            Prompts::Tokens => Prompt::Tokens((0..128).map(|t| (i * 131 + t) as u32).collect()),
        };
        let r = Request::new(
            RequestId(i),
            prompt,
            STEPS_PER_FIXTURE as u32 + 32,
            Timestamp(i),
        );
        s.add_request(r, Timestamp(i)).expect("valid request");
    }
    // Prefill everything that can run, until every running request decodes one token a step.
    for _ in 0..64 {
        let out = s.schedule(Timestamp::ZERO);
        s.update_from_output(&out, &ModelRunnerOutput::uniform(&out, 1), Timestamp::ZERO);
        if out.scheduled.iter().all(|e| e.num_tokens == 1)
            && out.scheduled.len() == running as usize
        {
            break;
        }
    }
    s
}
