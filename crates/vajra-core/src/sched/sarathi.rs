//! Sarathi-Serve's stall-free step under one `chunk_size`: (1) every running decode, one token
//! each (not limited by the budget, but counted in it); (2) running partial prefills, as much as
//! the chunk allows; (3) new requests while budget and `max_num_seqs` allow. With
//! [`AdmissionMode::Reserve`] a new request reserves all its prompt blocks at admission, so
//! ongoing prefills never need memory; decodes that cross a block boundary may preempt the
//! newest running request. An optional dynamic chunk schedule shrinks the chunk as a prompt
//! progresses.

use super::config::{AdmissionMode, SarathiConfig};
use super::policy::{AdmitSpec, BatchPolicy, Reserve, SeqView, Step};

/// Sarathi-Serve's step.
#[derive(Debug, Clone)]
pub struct Sarathi(pub SarathiConfig);

impl BatchPolicy for Sarathi {
    fn name(&self) -> &str {
        "sarathi"
    }

    fn schedule(&mut self, step: &mut Step<'_>) {
        let c = &self.0;
        let chunk_for = |seq: SeqView<'_>| match c.chunk_schedule {
            Some(s) => s.chunk_at(seq.num_computed().min(seq.prompt_len())),
            None => c.chunk_size,
        };
        let total = match c.chunk_schedule {
            Some(s) => s.high,
            None => c.chunk_size,
        };
        // Pass 1: decodes.
        let mut unlimited = u32::MAX;
        let mut partial = 0;
        step.schedule_running(&mut unlimited, |seq, _| {
            let done = seq.prefill_done();
            partial += u32::from(!done);
            u32::from(done)
        });
        let used = step.scheduled_tokens();
        // Pass 2: partial prefills (skipped when every running request decodes).
        let mut budget = total.saturating_sub(used);
        if partial > 0 {
            step.schedule_running(&mut budget, |seq, b| {
                if seq.prefill_done() {
                    0
                } else {
                    chunk_for(seq).saturating_sub(total - b)
                }
            });
        }
        // Pass 3: new requests.
        let reserve = match c.admission {
            AdmissionMode::Reserve => Reserve::Remaining,
            AdmissionMode::Incremental => Reserve::Scheduled,
        };
        let first_chunk = c.chunk_schedule.map_or(c.chunk_size, |s| s.chunk_at(0));
        while budget > 0 && step.has_room() {
            let spec = AdmitSpec {
                max_tokens: first_chunk.saturating_sub(total - budget),
                whole: false,
                reserve,
            };
            if spec.max_tokens == 0 {
                break;
            }
            match step.admit(spec) {
                Some(n) => budget -= n,
                None => break,
            }
        }
    }
}
