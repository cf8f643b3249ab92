//! FasterTransformer: request-level static batching. While any member of the current batch is
//! unfinished the batch runs again (finished members have already freed their blocks — Vidur's
//! version leaks them); only when the batch is empty is a new one formed, of up to
//! `max_num_seqs` waiting requests with worst-case reservation.

use super::output::SchedulerOutput;
use super::{AdmitSpec, Reserve, Scheduler};

impl Scheduler {
    pub(super) fn schedule_faster_transformer(
        &mut self,
        max_seqs: usize,
        out: &mut SchedulerOutput,
    ) {
        if !self.running.is_empty() {
            let mut unlimited = u32::MAX;
            self.run_running(out, &mut unlimited, |_, _| u32::MAX);
            return;
        }
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
