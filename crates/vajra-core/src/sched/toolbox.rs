//! The scheduler's toolbox behind [`super::policy::Step`]: admission, growing running
//! requests' allocations with preemption, victim choice and the step's bookkeeping. Every
//! change to blocks, the waiting queue and the running list that a policy causes goes through
//! here, which is what keeps block accounting, the watermark, the running cap and the
//! in-flight rule out of the policies' reach.
//!
//! Cost: scheduling a running request whose last block has room is O(1) (no allocation); a
//! victim choice is O(running).

use super::output::{NewRequestData, ScheduledRequest, SchedulerOutput};
use super::policy::{AdmitSpec, Candidate, Reserve, SeqView};
use super::{Grow, Scheduler, Seq, content};
use crate::kv::AllocSpec;
use crate::request::RequestStatus;
use crate::sched::config::{PreemptionMode, QueuePolicy};

impl Scheduler {
    /// Tries to admit the waiting request in `slot`. Returns the tokens scheduled for it, or
    /// `None` (leaving the queue as it was) when it does not fit or `max_num_seqs` requests
    /// run already.
    pub(super) fn admit_slot(
        &mut self,
        slot: u32,
        spec: AdmitSpec,
        out: &mut SchedulerOutput,
    ) -> Option<u32> {
        // Requests whose KV is on its way here join the running list when it lands.
        if self.running.len() + self.num_reserved as usize >= self.cfg.max_num_seqs as usize {
            return None;
        }
        let head = self.waiting.peek() == Some(slot);
        let others_running = !self.running.is_empty();
        let seq = self.slots[slot as usize]
            .as_mut()
            .expect("waiting slot is live");
        let swapped = seq.status == RequestStatus::Swapped;
        let (hits, hit_tokens) = if swapped {
            (Vec::new(), 0)
        } else {
            self.kv.get_computed_blocks(
                &mut seq.table,
                &content(&seq.req, &seq.output, seq.num_output),
            )
        };
        let computed = if swapped {
            seq.num_computed
        } else {
            hit_tokens
        };
        let remaining = seq.num_tokens() - computed;
        if remaining == 0 || (spec.whole && remaining > spec.max_tokens) {
            return None;
        }
        let n = remaining.min(spec.max_tokens);
        let reserve = match spec.reserve {
            Reserve::Scheduled | Reserve::ScheduledIfAllFit => n,
            Reserve::Remaining => remaining,
            Reserve::WorstCase => remaining + seq.remaining_output(),
        };
        let alloc = AllocSpec {
            num_computed: computed,
            new_computed: &hits,
            num_new_tokens: reserve,
            apply_watermark: others_running,
        };
        if spec.reserve == Reserve::ScheduledIfAllFit
            && !self.kv.can_allocate(
                &seq.table,
                &AllocSpec {
                    num_new_tokens: remaining,
                    ..alloc
                },
            )
        {
            return None;
        }
        let appended = self.kv.allocate_slots(&mut seq.table, &alloc)?;
        self.queued_tokens -= u64::from(seq.prompt_len + seq.num_output);
        if head {
            let popped = self.waiting.pop();
            assert_eq!(popped, Some(slot), "the head is popped");
        } else {
            let key = seq.queue_key.expect("a waiting request has a queue key");
            let found = self.waiting.remove(slot, key, seq.req.tenant);
            assert!(found, "a waiting request is in the waiting queue");
        }
        if swapped {
            out.swap_in.extend(
                seq.swapped
                    .iter()
                    .copied()
                    .zip(seq.table.blocks.iter().copied()),
            );
            self.host.free(&seq.swapped);
            seq.swapped.clear();
            self.num_swapped -= 1;
        } else {
            self.kv.record_prefix_query(seq.num_tokens(), hit_tokens);
            let prompt = seq.prompt_len();
            seq.cached_prompt_tokens
                .get_or_insert(hit_tokens.min(prompt));
        }
        seq.num_computed = computed;
        seq.status = RequestStatus::Running;
        seq.queue_key = None;
        let tenant = seq.req.tenant;
        self.waiting.running_changed(tenant, true);
        self.running.push(slot);
        let seq = self.slots[slot as usize].as_mut().expect("live slot");
        push_scheduled(seq, out, slot, n, appended);
        Some(n)
    }

    /// Index in `running` of the request to preempt, chosen by the victim rule among the
    /// running requests not in flight (requests in flight are never victims).
    pub(super) fn pick_victim(&mut self) -> Option<usize> {
        let mut c = std::mem::take(&mut self.victim_candidates);
        c.clear();
        c.extend(self.running.iter().enumerate().filter_map(|(i, &s)| {
            let q = self.seq(s);
            (q.in_flight == 0).then_some(Candidate {
                id: q.id,
                priority: q.req.priority,
                arrival: q.req.arrival,
                num_computed: q.num_computed,
                prompt_len: q.prompt_len,
                num_output: q.num_output,
                running_index: i,
            })
        }));
        let picked = self.victim.pick(&c).map(|i| c[i].running_index);
        self.victim_candidates = c;
        picked
    }

    /// Under the priority queue only: preempts the lowest-priority running request (not in
    /// flight) if its priority value is strictly larger than the waiting head's, to make room
    /// for the head. Returns the tokens it had been given in this step, or `None` when there is
    /// no such victim.
    pub(super) fn preempt_for_waiting_head(&mut self, out: &mut SchedulerOutput) -> Option<u32> {
        let QueuePolicy::Priority { .. } = self.cfg.queue else {
            return None;
        };
        let head = self.seq(self.waiting.peek()?).req.priority;
        let v = self.pick_victim()?;
        if self.seq(self.running[v]).req.priority <= head {
            return None;
        }
        Some(self.preempt(v, out))
    }

    /// Grows `running[*i]` by `num_new` token slots, preempting victims until it fits. Victims
    /// already scheduled this step lose their share; the tokens they gave back are added to
    /// `refund`. `*i` is kept pointing at the same request (or, if it was preempted, at the
    /// request that took its place).
    fn grow_running(
        &mut self,
        i: &mut usize,
        num_new: u32,
        out: &mut SchedulerOutput,
        refund: &mut u32,
    ) -> Grow {
        loop {
            let slot = self.running[*i];
            let seq = self.slots[slot as usize]
                .as_mut()
                .expect("running slot is live");
            let spec = AllocSpec {
                num_computed: seq.num_computed,
                new_computed: &[],
                num_new_tokens: num_new,
                apply_watermark: false,
            };
            if let Some(appended) = self.kv.allocate_slots(&mut seq.table, &spec) {
                return Grow::Allocated(appended);
            }
            let Some(v) = self.pick_victim() else {
                return Grow::Blocked;
            };
            *refund += self.preempt(v, out);
            if v == *i {
                return Grow::SelfPreempted;
            }
            if v < *i {
                *i -= 1;
            }
        }
    }

    /// Preempts `running[idx]`: its KV is freed (recompute) or copied to the host (swap), it
    /// goes back to the waiting queue's front, and any share it had in this step is removed.
    /// Returns the tokens of that share.
    fn preempt(&mut self, idx: usize, out: &mut SchedulerOutput) -> u32 {
        let slot = self.running.remove(idx);
        let refund = match out.scheduled.iter().position(|e| e.slot == slot) {
            Some(p) => out.scheduled.remove(p).num_tokens,
            None => 0,
        };
        let seq = self.slots[slot as usize]
            .as_mut()
            .expect("running slot is live");
        assert_eq!(seq.in_flight, 0, "a request in flight is never preempted");
        let keep = self.kv.blocks_for(seq.num_computed);
        let host = match self.cfg.preemption {
            PreemptionMode::Swap if keep > 0 => self.host.allocate(keep),
            PreemptionMode::Swap | PreemptionMode::Recompute => None,
        };
        match host {
            Some(host_blocks) => {
                out.swap_out.extend(
                    seq.table
                        .blocks
                        .iter()
                        .copied()
                        .zip(host_blocks.iter().copied()),
                );
                seq.swapped = host_blocks;
                seq.status = RequestStatus::Swapped;
                self.num_swapped += 1;
            }
            None => {
                seq.num_computed = 0;
                seq.status = RequestStatus::Waiting;
            }
        }
        self.kv.free(&mut seq.table);
        seq.num_preemptions += 1;
        seq.send_full = self.request_data;
        out.preempted.push(seq.req.id);
        let tenant = seq.req.tenant;
        self.num_preemptions += 1;
        self.waiting.running_changed(tenant, false);
        self.enqueue(slot, true);
        tracing::debug!(request = %self.seq(slot).req.id, "preempted");
        refund
    }

    /// Schedules every running request's next tokens (capped by `cap(seq, budget)`; 0 skips
    /// it), growing allocations and preempting as needed, in running order. `budget` falls by
    /// the tokens scheduled and rises by the shares of victims preempted after being scheduled.
    pub(super) fn run_running(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut u32,
        mut cap: impl FnMut(SeqView<'_>, u32) -> u32,
    ) {
        let mut i = 0;
        while i < self.running.len() {
            let slot = self.running[i];
            let seq = self.slots[slot as usize]
                .as_mut()
                .expect("running slot is live");
            let n = cap(SeqView(seq), *budget).min(seq.remaining());
            if n == 0 {
                i += 1;
                continue;
            }
            // Fast path (most decodes): the table's last block has room for the new tokens.
            if self.kv.blocks_for(seq.num_computed + n) <= seq.table.len() as u32 {
                push_scheduled(seq, out, slot, n, 0);
                *budget = budget.saturating_sub(n);
                i += 1;
                continue;
            }
            let mut refund = 0;
            let grow = self.grow_running(&mut i, n, out, &mut refund);
            *budget += refund;
            match grow {
                Grow::Allocated(appended) => {
                    let slot = self.running[i];
                    let seq = self.slots[slot as usize].as_mut().expect("live slot");
                    push_scheduled(seq, out, slot, n, appended);
                    *budget = budget.saturating_sub(n);
                    i += 1;
                }
                Grow::Blocked => i += 1,
                Grow::SelfPreempted => {}
            }
        }
    }
}

/// Appends `seq`'s share of the step; `appended` blocks were added to its table this step.
fn push_scheduled(seq: &mut Seq, out: &mut SchedulerOutput, slot: u32, n: u32, appended: u32) {
    let blocks = &seq.table.blocks;
    let start = out.block_ids.len() as u32;
    if appended > 0 {
        out.block_ids
            .extend_from_slice(&blocks[blocks.len() - appended as usize..]);
    }
    let new = if seq.send_full {
        seq.send_full = false;
        out.request_data.push(NewRequestData {
            prompt: seq.req.prompt.clone(),
            output: seq.output.clone(),
            sampling: seq.req.sampling.clone(),
            block_table: blocks.clone(),
            resumed: seq.num_preemptions > 0,
        });
        Some(out.request_data.len() as u32 - 1)
    } else {
        None
    };
    out.scheduled.push(ScheduledRequest {
        id: seq.id,
        num_tokens: n,
        num_computed: seq.num_computed,
        prompt_len: seq.prompt_len,
        samples: seq.num_computed + n == seq.num_tokens(),
        new_blocks: (start, appended),
        new,
        tenant: seq.tenant,
        slot,
    });
}
