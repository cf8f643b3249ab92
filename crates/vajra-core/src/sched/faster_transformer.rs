//! FasterTransformer: request-level static batching. While any member of the current batch is
//! unfinished the batch runs again (finished members have already freed their blocks — Vidur's
//! version leaks them); only when the batch is empty is a new one formed, of up to
//! `max_num_seqs` waiting requests with worst-case reservation.

use super::orca::WORST_CASE_WHOLE;
use super::policy::{BatchPolicy, Step};

/// FasterTransformer's request-level batches.
#[derive(Debug, Clone, Default)]
pub struct FasterTransformer;

impl BatchPolicy for FasterTransformer {
    fn name(&self) -> &str {
        "faster_transformer"
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        if step.num_running() > 0 {
            let mut unlimited = u32::MAX;
            step.schedule_running(&mut unlimited, |_, _| u32::MAX);
            return;
        }
        while step.has_room() && step.admit(WORST_CASE_WHOLE).is_some() {}
    }
}
