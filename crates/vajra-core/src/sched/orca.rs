//! Orca: iteration-level batching with no token budget. Every running request gets all its
//! next tokens; then waiting requests are admitted with their whole prompts while
//! `max_num_seqs` allows and the worst case (prompt + `max_tokens`) can be reserved, so a
//! running request never runs out of blocks.

use super::output::SchedulerOutput;
use super::{AdmitSpec, Reserve, Scheduler};

impl Scheduler {
    pub(super) fn schedule_orca(&mut self, max_seqs: usize, out: &mut SchedulerOutput) {
        let mut unlimited = u32::MAX;
        self.run_running(out, &mut unlimited, |_, _| u32::MAX);
        while self.running.len() < max_seqs {
            let spec = AdmitSpec {
                max_tokens: u32::MAX,
                whole: true,
                reserve: Reserve::WorstCase,
            };
            if self.admit(spec, out).is_none() {
                break;
            }
        }
    }
}
