//! The replica driver: one replica's loop — schedule, execute, update — with its steps in
//! flight and a record of every step, shared by the simulator's event loop and the engine loop.
//!
//! ```text
//!             begin_step(now) ──► StepTicket ──► output(ticket): &SchedulerOutput
//!                  │                                   │
//!   Scheduler::schedule_into                    executor runs it (predictor + token oracle
//!   (kv usage, prefill/decode split recorded)    in the simulator, a model backend in the engine)
//!                  │                                   │
//!   end_step(ticket, &ModelRunnerOutput, now, sink) ◄──┘
//!     Scheduler::update_from_output ─► sink.on_event(Token | Finished) ─► sink.on_step(record)
//! ```
//!
//! The driver owns no clock and does no I/O: `now` comes in as an argument and everything a step
//! did goes out through a [`StepSink`]. Up to `max_in_flight` steps may be in flight at once
//! (pipeline micro-batches; the engine runs one); each has a slot whose output buffer is reused
//! by later steps, so a step neither allocates nor moves its [`SchedulerOutput`].
//!
//! Invariants: a ticket is ended exactly once; steps may end in any order (a simulator ends them
//! in stage order, which for a pipeline is begin order); `in_flight()` counts begun, unended
//! steps.

use crate::ids::{RequestId, StepId};
use crate::sched::Scheduler;
use crate::sched::output::{ModelRunnerOutput, RequestEvent, SchedulerOutput};
use crate::time::Timestamp;

/// What one step did, as both modes' metrics record it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepRecord {
    /// Step number on the replica.
    pub step: StepId,
    /// When it was scheduled.
    pub start: Timestamp,
    /// When its results were applied (equal to `start` until then).
    pub end: Timestamp,
    /// Requests in it.
    pub num_requests: u32,
    /// Prompt tokens computed.
    pub prefill_tokens: u32,
    /// Output tokens computed (decodes, and output tokens recomputed after preemption).
    pub decode_tokens: u32,
    /// Requests preempted while forming it.
    pub preempted: u32,
    /// KV blocks in use right after it was scheduled.
    pub kv_blocks_used: u32,
}

/// Receives what each step did: the scheduler's events (tokens appended, requests finished)
/// in order, then the step's record.
pub trait StepSink {
    /// A token was appended to a request or a request finished, at `now`.
    fn on_event(&mut self, event: RequestEvent, now: Timestamp);
    /// The step behind `ticket` ended; called after its events.
    fn on_step(&mut self, ticket: StepTicket, record: &StepRecord);
}

/// A step begun by [`ReplicaDriver::begin_step`] and not yet ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepTicket(u32);

impl StepTicket {
    /// The slot's index (below the most steps ever in flight at once), for an executor that
    /// keeps per-step data of its own beside the driver's.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Default)]
struct Slot {
    out: SchedulerOutput,
    record: StepRecord,
    busy: bool,
}

/// One replica's scheduler and its steps in flight.
#[derive(Debug)]
pub struct ReplicaDriver {
    sched: Scheduler,
    max_in_flight: u32,
    in_flight: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Reused by every `end_step`.
    events: Vec<RequestEvent>,
}

impl ReplicaDriver {
    /// A driver over `sched` running at most `max_in_flight` steps at once (the pipeline depth;
    /// 1 without pipeline parallelism).
    ///
    /// # Panics
    /// If `max_in_flight` is 0.
    pub fn new(sched: Scheduler, max_in_flight: u32) -> Self {
        assert!(
            max_in_flight >= 1,
            "a replica runs at least one step at a time"
        );
        ReplicaDriver {
            sched,
            max_in_flight,
            in_flight: 0,
            slots: Vec::new(),
            free: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The scheduler (read-only: loads for routers, counters).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// The scheduler, to add or abort requests between steps.
    pub fn scheduler_mut(&mut self) -> &mut Scheduler {
        &mut self.sched
    }

    /// Steps begun and not yet ended.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether another step may begin now.
    pub fn can_begin(&self) -> bool {
        self.in_flight < self.max_in_flight
    }

    /// Schedules a step at `now`. `None` when the step limit is reached or nothing can run
    /// (the scheduler's output was empty).
    pub fn begin_step(&mut self, now: Timestamp) -> Option<StepTicket> {
        if !self.can_begin() {
            return None;
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        self.sched.schedule_into(now, &mut slot.out);
        if slot.out.is_empty() {
            self.free.push(index);
            return None;
        }
        let (mut prefill, mut decode) = (0, 0);
        for s in &slot.out.scheduled {
            let p = s.prefill_tokens();
            prefill += p;
            decode += s.num_tokens - p;
        }
        let kv = self.sched.kv();
        slot.record = StepRecord {
            step: slot.out.step,
            start: now,
            end: now,
            num_requests: slot.out.scheduled.len() as u32,
            prefill_tokens: prefill,
            decode_tokens: decode,
            preempted: slot.out.preempted.len() as u32,
            kv_blocks_used: kv.num_blocks() - kv.num_free(),
        };
        slot.busy = true;
        self.in_flight += 1;
        Some(StepTicket(index))
    }

    /// What the step behind `ticket` runs.
    pub fn output(&self, ticket: StepTicket) -> &SchedulerOutput {
        &self.slot(ticket).out
    }

    /// The record of the step behind `ticket` so far (its `end` is set by `end_step`).
    pub fn record(&self, ticket: StepTicket) -> &StepRecord {
        &self.slot(ticket).record
    }

    /// Applies the executor's results of the step behind `ticket` at `now`: tokens are appended
    /// and finished requests free their blocks (the scheduler's `update_from_output`); `sink`
    /// receives every event, then the step's record. The ticket's slot is free afterwards.
    ///
    /// # Panics
    /// If the ticket was already ended, or `result` does not match the step (see
    /// [`Scheduler::update_from_output`]).
    pub fn end_step<S: StepSink + ?Sized>(
        &mut self,
        ticket: StepTicket,
        result: &ModelRunnerOutput,
        now: Timestamp,
        sink: &mut S,
    ) {
        let slot = &mut self.slots[ticket.index()];
        assert!(slot.busy, "a step is ended once");
        slot.busy = false;
        slot.record.end = now;
        self.events.clear();
        self.sched
            .update_from_output_into(&slot.out, result, now, &mut self.events);
        for e in self.events.drain(..) {
            sink.on_event(e, now);
        }
        sink.on_step(ticket, &slot.record);
        self.in_flight -= 1;
        self.free.push(ticket.0);
    }

    /// Gives up the step behind `ticket` without results (its executor failed): the slot is
    /// freed and no record is written. Its requests stay as scheduled, in flight, and never
    /// advance; the caller must abort them. Returns their ids.
    ///
    /// # Panics
    /// If the ticket was already ended.
    pub fn abandon_step(&mut self, ticket: StepTicket) -> Vec<RequestId> {
        let slot = &mut self.slots[ticket.index()];
        assert!(slot.busy, "a step is ended once");
        slot.busy = false;
        self.in_flight -= 1;
        self.free.push(ticket.0);
        slot.out.scheduled.iter().map(|s| s.id).collect()
    }

    /// Rejects the waiting requests that can no longer meet their TTFT deadline at `now`
    /// (see [`Scheduler::reject_late`]); `sink` receives a finished event for each. Call it
    /// before [`Self::begin_step`].
    pub fn reject_late<S: StepSink + ?Sized>(&mut self, now: Timestamp, sink: &mut S) {
        self.events.clear();
        self.sched.reject_late(now, &mut self.events);
        for e in self.events.drain(..) {
            sink.on_event(e, now);
        }
    }

    /// Aborts a live request, freeing its blocks (see [`Scheduler::abort`]).
    ///
    /// # Errors
    /// As [`Scheduler::abort`].
    pub fn abort(
        &mut self,
        id: RequestId,
        now: Timestamp,
    ) -> crate::Result<crate::sched::output::FinishedRecord> {
        self.sched.abort(id, now)
    }

    fn slot(&self, ticket: StepTicket) -> &Slot {
        let s = &self.slots[ticket.index()];
        assert!(s.busy, "the ticket's step is in flight");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use crate::ids::RequestId;
    use crate::request::{Prompt, Request};
    use crate::sched::config::{PolicyConfig, SchedulerConfig};
    use crate::sched::output::FinishedRecord;

    #[derive(Default)]
    struct Log {
        tokens: Vec<(RequestId, Timestamp)>,
        finished: Vec<FinishedRecord>,
        steps: Vec<StepRecord>,
    }

    impl StepSink for Log {
        fn on_event(&mut self, event: RequestEvent, now: Timestamp) {
            match event {
                RequestEvent::Token { id, .. } => self.tokens.push((id, now)),
                RequestEvent::Finished(f) => self.finished.push(*f),
                RequestEvent::HandedOff { .. } => panic!("a colocated instance hands nothing off"),
            }
        }
        fn on_step(&mut self, _: StepTicket, record: &StepRecord) {
            self.steps.push(*record);
        }
    }

    fn driver(max_in_flight: u32) -> ReplicaDriver {
        let cfg = SchedulerConfig::new(PolicyConfig::VllmV1(Default::default()));
        let sched = Scheduler::new(cfg, &CacheConfig::default(), 64, 1024).unwrap();
        ReplicaDriver::new(sched, max_in_flight)
    }

    fn add(d: &mut ReplicaDriver, id: u64, prompt: u32, out: u32) {
        let r = Request::new(
            RequestId(id),
            Prompt::synthetic(prompt),
            out,
            Timestamp::ZERO,
        );
        d.scheduler_mut().add_request(r, Timestamp::ZERO).unwrap();
    }

    #[test]
    fn runs_requests_to_completion_recording_every_step_and_token() {
        let mut d = driver(1);
        add(&mut d, 1, 40, 3);
        add(&mut d, 2, 10, 2);
        let mut log = Log::default();
        let mut now = 0;
        while let Some(t) = d.begin_step(Timestamp(now)) {
            assert!(d.begin_step(Timestamp(now)).is_none(), "one step in flight");
            let r = ModelRunnerOutput::uniform(d.output(t), 7);
            now += 10;
            d.end_step(t, &r, Timestamp(now), &mut log);
        }
        assert!(!d.scheduler().has_unfinished());
        assert_eq!(log.finished.len(), 2);
        assert_eq!(log.tokens.len(), 5, "3 + 2 output tokens");
        assert_eq!(log.steps[0].prefill_tokens, 50);
        assert_eq!(log.steps[0].decode_tokens, 0);
        assert_eq!(log.steps[0].num_requests, 2);
        assert!(log.steps.iter().all(|s| s.end.0 == s.start.0 + 10));
        let total: u32 = log.steps.iter().map(|s| s.decode_tokens).sum();
        assert_eq!(total, 3, "decode steps after each request's first token");
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn keeps_at_most_max_in_flight_steps_and_reuses_their_slots() {
        let mut d = driver(2);
        for i in 0..4 {
            add(&mut d, i, 16, 4);
        }
        let a = d.begin_step(Timestamp(0)).expect("first micro-batch");
        let b = d.begin_step(Timestamp(0));
        // Every request is in flight in `a`, so nothing is left to schedule in a second one.
        assert!(b.is_none());
        assert_eq!(d.in_flight(), 1);
        let r = ModelRunnerOutput::uniform(d.output(a), 1);
        let mut log = Log::default();
        d.end_step(a, &r, Timestamp(5), &mut log);
        let c = d.begin_step(Timestamp(5)).expect("decodes");
        assert_eq!(c.index(), a.index(), "the freed slot is reused");
        assert_eq!(log.steps.len(), 1);
        assert_eq!(log.steps[0].kv_blocks_used, 4);
    }

    #[test]
    #[should_panic(expected = "the ticket's step is in flight")]
    fn an_ended_ticket_cannot_be_read() {
        let mut d = driver(1);
        add(&mut d, 1, 8, 2);
        let t = d.begin_step(Timestamp(0)).unwrap();
        let r = ModelRunnerOutput::uniform(d.output(t), 1);
        d.end_step(t, &r, Timestamp(1), &mut Log::default());
        let _ = d.output(t);
    }
}
