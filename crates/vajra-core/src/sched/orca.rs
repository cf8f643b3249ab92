//! Orca: iteration-level batching with no token budget. Every running request gets all its
//! next tokens; then waiting requests are admitted with their whole prompts while
//! `max_num_seqs` allows and the worst case (prompt + `max_tokens`) can be reserved, so a
//! running request never runs out of blocks.

use super::policy::{AdmitSpec, BatchPolicy, Reserve, Step};

/// Orca's iteration-level batching.
#[derive(Debug, Clone, Default)]
pub struct Orca;

/// What Orca and FasterTransformer admit with: whole prompts, worst-case KV.
pub(super) const WORST_CASE_WHOLE: AdmitSpec = AdmitSpec {
    max_tokens: u32::MAX,
    whole: true,
    reserve: Reserve::WorstCase,
};

impl BatchPolicy for Orca {
    fn name(&self) -> &str {
        "orca"
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let mut unlimited = u32::MAX;
        step.schedule_running(&mut unlimited, |_, _| u32::MAX);
        while step.has_room() && step.admit(WORST_CASE_WHOLE).is_some() {}
    }
}
