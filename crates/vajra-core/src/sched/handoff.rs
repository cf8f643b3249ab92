//! Disaggregated prefill and decode: the hand-off of a request from a prefill instance to a
//! decode instance, as both sides' schedulers see it.
//!
//! ```text
//!  prefill instance                                  decode instance
//!  add_request ─► prefill ─► first token sampled
//!     update_from_output emits HandedOff{id, token}
//!     (status Transferring, KV blocks held)
//!  take_handoff(id) ─► Handoff ────────────────────► reserve_remote(handoff) ─► Some(tokens)
//!                                                     (status Transferring, prompt's blocks
//!                                                      reserved; None: no room, nothing held)
//!                        ... the KV blocks move ...
//!  release_handoff(id)  (blocks freed)               remote_kv_arrived(id)
//!                                                     (running, prompt computed: it decodes)
//! ```
//!
//! The prefill instance runs a request to its first token only (its `max_tokens` is 1 there),
//! as in vLLM's disaggregated serving and SGLang's PD mode; the decode instance appends the
//! first token when the KV arrives (the client sees it then) and generates the rest. A decode
//! instance that has part of the prompt in its own prefix cache reserves those blocks as hits
//! and asks for the rest only (as vLLM's KV connectors do). Until `reserve_remote` succeeds the
//! request stays on the prefill instance holding its blocks: the pressure of a full decode pool
//! shows on the prefill side, and nothing is dropped.

use super::output::DisaggTimes;
use super::{Scheduler, content};
use crate::config::InstanceRole;
use crate::error::{CoreError, Result, ensure};
use crate::ids::RequestId;
use crate::kv::AllocSpec;
use crate::request::{Request, RequestStatus};
use crate::time::Timestamp;

/// A request leaving a prefill instance: what the decode instance needs to go on with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    /// The request as it arrived (its `max_tokens` is the client's).
    pub request: Request,
    /// The first output token.
    pub first_token: u32,
    /// When the prefill instance first scheduled it.
    pub first_scheduled: Timestamp,
    /// When the prefill instance sampled the first token.
    pub prefill_done: Timestamp,
    /// Prompt tokens the prefill instance found in its prefix cache.
    pub cached_prompt_tokens: u32,
    /// Times the prefill instance preempted it.
    pub num_preemptions: u32,
}

impl Scheduler {
    /// Sets what this instance does. A prefill instance runs every request it is given to its
    /// first token and then hands it off (see the module docs); a decode instance takes
    /// requests through [`Self::reserve_remote`] (and runs any added by
    /// [`Self::add_request`] as a colocated instance would).
    ///
    /// # Errors
    /// Requests are already live (a role is set before the first one).
    pub fn set_role(&mut self, role: InstanceRole) -> Result<()> {
        ensure(
            self.index.is_empty(),
            "role",
            role.name(),
            "set before the first request is added",
        )?;
        self.role = role;
        Ok(())
    }

    /// What this instance does.
    pub fn role(&self) -> InstanceRole {
        self.role
    }

    /// Requests whose KV is in transit (held for, or reserved from, another instance).
    pub fn num_transferring(&self) -> u32 {
        self.num_transferring
    }

    /// The running request in `slot` sampled its first token on a prefill instance: it leaves
    /// the running list and keeps its blocks until [`Self::release_handoff`].
    pub(super) fn hand_off(&mut self, slot: u32, token: u32, now: Timestamp) {
        let seq = self.slots[slot as usize].as_mut().expect("live slot");
        seq.num_output = 1;
        seq.handoff_token = token;
        if seq.keeps_tokens {
            seq.output.push(token);
        }
        seq.first_token = Some(now);
        seq.status = RequestStatus::Transferring;
        let tenant = seq.req.tenant;
        let pos = self
            .running
            .iter()
            .position(|&s| s == slot)
            .expect("a request that sampled is running");
        self.running.remove(pos);
        self.waiting.running_changed(tenant, false);
        self.num_transferring += 1;
    }

    fn transferring_slot(&self, id: RequestId) -> Result<u32> {
        let slot = *self.index.get(&id).ok_or(CoreError::UnknownRequest(id))?;
        ensure(
            self.seq(slot).status == RequestStatus::Transferring,
            "request status",
            format!("{:?}", self.seq(slot).status),
            "transferring (handed off, or reserved for a transfer)",
        )?;
        Ok(slot)
    }

    /// What a decode instance needs of a request this prefill instance handed off (its KV
    /// blocks stay held here until [`Self::release_handoff`]).
    ///
    /// # Errors
    /// The request is unknown or not handed off.
    pub fn take_handoff(&self, id: RequestId) -> Result<Handoff> {
        let slot = self.transferring_slot(id)?;
        let s = self.seq(slot);
        Ok(Handoff {
            request: s.req.clone(),
            first_token: s.handoff_token,
            first_scheduled: s
                .first_scheduled
                .expect("a handed-off request was scheduled"),
            prefill_done: s
                .first_token
                .expect("a handed-off request has its first token"),
            cached_prompt_tokens: s.cached_prompt_tokens.unwrap_or(0),
            num_preemptions: s.num_preemptions,
        })
    }

    /// The decode instance has a handed-off request's KV: its blocks are freed here and it
    /// leaves this instance (the executor hears of it in the next step's `finished` ids).
    ///
    /// # Errors
    /// The request is unknown or not handed off.
    pub fn release_handoff(&mut self, id: RequestId) -> Result<()> {
        let slot = self.transferring_slot(id)?;
        let mut seq = self.slots[slot as usize].take().expect("live slot");
        self.kv.free(&mut seq.table);
        self.free_slots.push(slot);
        self.index.remove(&id);
        self.outstanding_tokens -= u64::from(seq.prompt_len) + u64::from(seq.max_tokens);
        self.finished_ids.push(id);
        self.num_transferring -= 1;
        self.num_handed_off += 1;
        Ok(())
    }

    /// Reserves, on this decode instance, the blocks for a handed-off request's prompt: those
    /// its prefix cache already holds count as hits; the rest are allocated for the transfer.
    /// Returns the prompt tokens whose KV must be transferred, or `None` when the blocks do not
    /// fit now (nothing is held; try again once blocks free up).
    ///
    /// # Errors
    /// The request is invalid here (too long for this instance's model length or its KV pool)
    /// or already live.
    pub fn reserve_remote(&mut self, h: &Handoff, now: Timestamp) -> Result<Option<u32>> {
        let req = &h.request;
        self.check_admissible(req)?;
        // A reserved request joins the running list when its KV lands: the running cap
        // counts it now.
        if self.running.len() + self.num_reserved as usize >= self.cfg.max_num_seqs as usize {
            return Ok(None);
        }
        let mut seq = self.new_seq(req.clone(), req.max_tokens());
        seq.num_output = 1;
        seq.handoff_token = h.first_token;
        if seq.keeps_tokens {
            seq.output.push(h.first_token);
        }
        let prompt_len = seq.prompt_len;
        let (hits, hit_tokens) = self.kv.get_computed_blocks(
            &mut seq.table,
            &content(&seq.req, &seq.output, seq.num_output),
        );
        let hit_tokens = hit_tokens.min(prompt_len);
        let alloc = AllocSpec {
            num_computed: hit_tokens,
            new_computed: &hits,
            num_new_tokens: prompt_len - hit_tokens,
            apply_watermark: !self.running.is_empty(),
        };
        if self.kv.allocate_slots(&mut seq.table, &alloc).is_none() {
            return Ok(None);
        }
        seq.status = RequestStatus::Transferring;
        seq.num_computed = hit_tokens;
        seq.num_preemptions = h.num_preemptions;
        seq.first_scheduled = Some(h.first_scheduled);
        seq.cached_prompt_tokens = Some(h.cached_prompt_tokens);
        seq.disagg = Some(DisaggTimes {
            prefill_done: h.prefill_done,
            kv_arrived: now,
            decode_scheduled: None,
        });
        self.insert(seq);
        self.num_transferring += 1;
        self.num_reserved += 1;
        Ok(Some(prompt_len - hit_tokens))
    }

    /// A reserved request's KV arrived at `now`: its first token is appended (the client
    /// receives it now) and it joins the running list, its prompt computed, to decode from the
    /// next step on. (It never waits in the queue holding blocks, where a preempted request
    /// at the queue's head that needs more blocks than are free could block it for good.)
    /// Returns the first token's id.
    ///
    /// # Errors
    /// The request is unknown or not reserved for a transfer.
    pub fn remote_kv_arrived(&mut self, id: RequestId, now: Timestamp) -> Result<u32> {
        let slot = self.transferring_slot(id)?;
        let seq = self.slots[slot as usize].as_mut().expect("live slot");
        let prompt = seq.prompt_len;
        seq.num_computed = prompt;
        seq.first_token = Some(now);
        if let Some(d) = seq.disagg.as_mut() {
            d.kv_arrived = now;
        }
        let token = seq.handoff_token;
        self.kv.cache_full_blocks(
            &mut seq.table,
            &content(&seq.req, &seq.output, seq.num_output),
            prompt,
        );
        seq.status = RequestStatus::Running;
        let tenant = seq.req.tenant;
        self.num_transferring -= 1;
        self.num_reserved -= 1;
        self.num_received += 1;
        self.waiting.running_changed(tenant, true);
        self.running.push(slot);
        self.remote_admitted.push(slot);
        Ok(token)
    }
}
