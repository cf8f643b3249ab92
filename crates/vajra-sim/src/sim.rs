//! The discrete-event loop.
//!
//! Events are ordered by `(time, kind rank, sequence number)`:
//!
//! | rank | kind | what it does |
//! |---|---|---|
//! | 0 | `StageEnd` | a batch leaves a pipeline stage: the stage takes its next queued batch; the batch moves to the next stage or, after the last one, its tokens are appended (`update_from_output`), finished requests free their blocks, and the replica is asked to schedule |
//! | 1 | `Arrival` | a request arrives: the router picks a replica, whose scheduler takes it, and the replica is asked to schedule |
//! | 2 | `Schedule` | a replica forms micro-batches while fewer than PP are in flight |
//!
//! So at equal times, completions free their KV blocks before arrivals are routed (routers see
//! up-to-date loads), and a replica schedules once after every arrival and completion of that
//! instant, not once per event. Equal kinds at equal times run in creation order. (Vidur
//! intends a rank too, but its `event_type` property returns `None`, so its ties break by
//! creation only: `../shared/VIDUR.md` §1.)
//!
//! Arrivals do not sit in the heap: the loop compares the request source's next arrival with
//! the heap's top, so a million-request workload is generated lazily.

use crate::error::{Result, SimError};
use crate::predictor::{BatchCost, Predictor};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use vajra_core::config::CacheConfig;
use vajra_core::ids::ReplicaId;
use vajra_core::router::{RandomSource, ReplicaLoad, Router, RouterConfig};
use vajra_core::sched::Scheduler;
use vajra_core::sched::config::SchedulerConfig;
use vajra_core::sched::output::{ModelRunnerOutput, RequestEvent, SchedulerOutput, SchedulerStats};
use vajra_core::time::{Duration, Timestamp};
use vajra_metrics::{BatchRecord, Collector};
use vajra_workload::RequestSource;

/// Kind of an event, with its rank at equal times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// A batch leaves a stage.
    StageEnd = 0,
    /// A request arrives.
    Arrival = 1,
    /// A replica schedules.
    Schedule = 2,
}

/// A queued event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Event {
    /// When.
    pub time: Timestamp,
    /// Kind (its rank orders equal times).
    pub kind: EventKind,
    /// Creation order.
    pub seq: u64,
    /// Batch slot (`StageEnd`) or replica (`Schedule`).
    pub target: u32,
}

/// A min-queue of events in `(time, kind, seq)` order.
#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<Event>>,
    seq: u64,
}

impl EventQueue {
    /// Queues an event.
    pub fn push(&mut self, time: Timestamp, kind: EventKind, target: u32) {
        self.seq += 1;
        self.heap.push(Reverse(Event {
            time,
            kind,
            seq: self.seq,
            target,
        }));
    }
    /// The next event.
    pub fn pop(&mut self) -> Option<Event> {
        self.heap.pop().map(|r| r.0)
    }
    /// The next event's time and kind.
    pub fn peek(&self) -> Option<(Timestamp, EventKind)> {
        self.heap.peek().map(|r| (r.0.time, r.0.kind))
    }
    /// Number of queued events.
    pub fn len(&self) -> usize {
        self.heap.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

struct Rng(StdRng);

impl RandomSource for Rng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

struct Replica {
    sched: Scheduler,
    stage_busy: Vec<bool>,
    stage_queue: Vec<VecDeque<u32>>,
    in_flight: u32,
    schedule_pending: bool,
}

struct Batch {
    replica: u32,
    out: SchedulerOutput,
    cost: BatchCost,
    start: Timestamp,
    stage: usize,
    kv_used: u32,
}

/// One batch on one stage, for the Chrome trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSlice {
    /// Replica.
    pub replica: u32,
    /// Stage.
    pub stage: u32,
    /// Step number on the replica.
    pub step: u64,
    /// Start.
    pub start: Timestamp,
    /// Duration.
    pub dur: Duration,
    /// Requests in the batch.
    pub size: u32,
    /// Prompt tokens.
    pub prefill_tokens: u32,
    /// Output tokens.
    pub decode_tokens: u32,
}

/// Everything the loop needs.
pub struct SimSpec<'a> {
    /// Replicas.
    pub num_replicas: u32,
    /// Scheduler of every replica.
    pub scheduler: &'a SchedulerConfig,
    /// Cache of every replica.
    pub cache: &'a CacheConfig,
    /// KV blocks per replica.
    pub num_blocks: u32,
    /// Longest sequence.
    pub max_model_len: u32,
    /// Router.
    pub router: RouterConfig,
    /// Predictor (one replica shape).
    pub predictor: &'a Predictor,
    /// Root seed (the router's random stream derives from it).
    pub seed: u64,
    /// Called now and then with the number of completed requests.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

/// What a run produced.
pub struct SimResult {
    /// Lifecycle records and pooled distributions.
    pub collector: Collector,
    /// Requests issued.
    pub issued: u64,
    /// Simulated time of the last event.
    pub end: Timestamp,
    /// Events processed (arrivals included).
    pub events: u64,
    /// Final scheduler counters per replica.
    pub replica_stats: Vec<SchedulerStats>,
}

/// Runs the workload to completion, recording into `collector` (see
/// [`Collector::stream_batches`]) and handing every batch stage to `on_slice` (the Chrome
/// trace) when given.
///
/// # Errors
/// A request the scheduler rejects, or a stall (requests that can never be scheduled).
pub fn run(
    spec: &SimSpec<'_>,
    source: &mut RequestSource,
    mut collector: Collector,
    mut on_slice: Option<&mut dyn FnMut(&StageSlice)>,
) -> Result<SimResult> {
    let pp = spec.predictor.stages();
    let mut replicas: Vec<Replica> = (0..spec.num_replicas)
        .map(|_| {
            Ok(Replica {
                sched: Scheduler::new(
                    spec.scheduler.clone(),
                    spec.cache,
                    spec.num_blocks,
                    spec.max_model_len,
                )?,
                stage_busy: vec![false; pp],
                stage_queue: vec![VecDeque::new(); pp],
                in_flight: 0,
                schedule_pending: false,
            })
        })
        .collect::<Result<_>>()?;
    let mut router = Router::new(spec.router);
    let mut rng = Rng(StdRng::seed_from_u64(vajra_workload::derive_seed(
        spec.seed, "router",
    )));
    let mut q = EventQueue::default();
    let mut batches: Vec<Option<Batch>> = Vec::new();
    let mut free_slots: Vec<u32> = Vec::new();
    let mut loads = vec![ReplicaLoad::default(); spec.num_replicas as usize];
    let mut replica_of: Vec<u32> = Vec::new();
    let mut now = Timestamp::ZERO;
    let mut events = 0u64;
    let mut steps = vec![0u64; spec.num_replicas as usize];
    let num_blocks = spec.num_blocks;

    loop {
        let arrival_first = match (source.peek_time(), q.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(ta), Some((te, ke))) => (ta, EventKind::Arrival) < (te, ke),
        };
        events += 1;
        if events & 0x3fff == 0
            && let Some(p) = spec.progress
        {
            p(collector.requests.len() as u64);
        }
        if arrival_first {
            let req = source.pop().expect("peeked");
            now = now.max(req.arrival);
            collector.on_arrival(req.id, now);
            let needs_prefix = router.needs_prefix_lookup();
            for (i, (l, r)) in loads.iter_mut().zip(replicas.iter_mut()).enumerate() {
                *l = ReplicaLoad {
                    replica: ReplicaId(i as u32),
                    num_waiting: r.sched.num_waiting() as u32,
                    num_running: r.sched.num_running() as u32,
                    kv_usage: 1.0 - f64::from(r.sched.kv().num_free()) / f64::from(num_blocks),
                    cached_prefix_tokens: if needs_prefix {
                        r.sched.cached_prefix_tokens(&req)
                    } else {
                        0
                    },
                };
            }
            let target = router.route(&loads, &mut rng).0;
            let idx = req.id.0 as usize;
            if idx >= replica_of.len() {
                replica_of.resize(idx + 1, 0);
            }
            replica_of[idx] = target;
            let rep = &mut replicas[target as usize];
            let (id, prompt, out) = (req.id, req.prompt.len(), req.max_tokens());
            rep.sched.add_request(req, now).map_err(|e| {
                SimError::Memory(format!(
                    "request {id} ({prompt} prompt + {out} output tokens) cannot run on replica {target}: {e} (raise cache.num_blocks or cache.gpu_memory_utilization, or lower workload.max_tokens)"
                ))
            })?;
            if !rep.schedule_pending {
                rep.schedule_pending = true;
                q.push(now, EventKind::Schedule, target);
            }
            continue;
        }
        let ev = q.pop().expect("peeked");
        now = ev.time;
        match ev.kind {
            EventKind::Arrival => unreachable!("arrivals are not queued"),
            EventKind::Schedule => {
                let r = ev.target as usize;
                replicas[r].schedule_pending = false;
                while (replicas[r].in_flight as usize) < pp {
                    let rep = &mut replicas[r];
                    let out = rep.sched.schedule(now);
                    if out.is_empty() {
                        break;
                    }
                    let cost = spec.predictor.predict(&out);
                    let kv_used = num_blocks - rep.sched.kv().num_free();
                    let slot = match free_slots.pop() {
                        Some(s) => s,
                        None => {
                            batches.push(None);
                            (batches.len() - 1) as u32
                        }
                    };
                    let first_ns = cost.stage_ns[0];
                    batches[slot as usize] = Some(Batch {
                        replica: r as u32,
                        out,
                        cost,
                        start: now,
                        stage: 0,
                        kv_used,
                    });
                    rep.in_flight += 1;
                    if rep.stage_busy[0] {
                        rep.stage_queue[0].push_back(slot);
                    } else {
                        rep.stage_busy[0] = true;
                        q.push(now + Duration(first_ns), EventKind::StageEnd, slot);
                    }
                }
            }
            EventKind::StageEnd => {
                let slot = ev.target;
                let b = batches[slot as usize].as_mut().expect("live batch");
                let r = b.replica as usize;
                let s = b.stage;
                let rep = &mut replicas[r];
                if let Some(f) = on_slice.as_mut() {
                    let dur = Duration(b.cost.stage_ns[s]);
                    f(&StageSlice {
                        replica: b.replica,
                        stage: s as u32,
                        step: b.out.step.0,
                        start: Timestamp(now.0 - dur.0),
                        dur,
                        size: b.out.scheduled.len() as u32,
                        prefill_tokens: b.out.scheduled.iter().map(|x| x.prefill_tokens()).sum(),
                        decode_tokens: b.out.scheduled.iter().map(|x| x.decode_tokens()).sum(),
                    });
                }
                // The stage takes its next batch.
                rep.stage_busy[s] = false;
                if let Some(next) = rep.stage_queue[s].pop_front() {
                    rep.stage_busy[s] = true;
                    let ns = batches[next as usize]
                        .as_ref()
                        .expect("queued batch")
                        .cost
                        .stage_ns[s];
                    q.push(now + Duration(ns), EventKind::StageEnd, next);
                }
                let b = batches[slot as usize].as_mut().expect("live batch");
                if s + 1 < pp {
                    b.stage = s + 1;
                    let ns = b.cost.stage_ns[s + 1];
                    if rep.stage_busy[s + 1] {
                        rep.stage_queue[s + 1].push_back(slot);
                    } else {
                        rep.stage_busy[s + 1] = true;
                        q.push(now + Duration(ns), EventKind::StageEnd, slot);
                    }
                    continue;
                }
                // Last stage: the batch is done.
                let b = batches[slot as usize].take().expect("live batch");
                free_slots.push(slot);
                let res = ModelRunnerOutput::uniform(&b.out, 0);
                for e in rep.sched.update_from_output(&b.out, &res, now) {
                    match e {
                        RequestEvent::Token { id, .. } => collector.on_token(id, now),
                        RequestEvent::Finished(f) => {
                            collector.on_finished(&f, replica_of[f.id.0 as usize]);
                            source.on_finished(f.id, now);
                        }
                    }
                }
                steps[r] += 1;
                let (mut pre, mut dec) = (0, 0);
                for x in &b.out.scheduled {
                    pre += x.prefill_tokens();
                    dec += x.decode_tokens();
                }
                collector.on_batch(BatchRecord {
                    replica: b.replica,
                    step: b.out.step.0,
                    start: b.start,
                    end: now,
                    busy: Duration(b.cost.stage_ns.iter().sum()),
                    num_requests: b.out.scheduled.len() as u32,
                    prefill_tokens: pre,
                    decode_tokens: dec,
                    preempted: b.out.preempted.len() as u32,
                    kv_blocks_used: b.kv_used,
                    flops: b.cost.flops,
                    bytes: b.cost.bytes,
                });
                rep.in_flight -= 1;
                if !rep.schedule_pending {
                    rep.schedule_pending = true;
                    q.push(now, EventKind::Schedule, r as u32);
                }
            }
        }
    }

    for (i, r) in replicas.iter().enumerate() {
        if r.sched.has_unfinished() {
            return Err(SimError::Stalled(format!(
                "replica {i} still has {} waiting and {} running requests that can never be scheduled: its {} KV blocks of {} tokens cannot hold them (raise cache.num_blocks or gpu_memory_utilization, or lower workload.max_tokens)",
                r.sched.num_waiting(),
                r.sched.num_running(),
                num_blocks,
                spec.cache.block_size
            )));
        }
    }
    Ok(SimResult {
        issued: source.issued(),
        replica_stats: replicas.iter().map(|r| r.sched.stats()).collect(),
        collector,
        end: now,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_times_pop_by_rank_then_creation_order() {
        let mut q = EventQueue::default();
        let t = Timestamp(100);
        q.push(t, EventKind::Schedule, 1);
        q.push(t, EventKind::StageEnd, 2);
        q.push(Timestamp(50), EventKind::Schedule, 3);
        q.push(t, EventKind::StageEnd, 4);
        q.push(t, EventKind::Schedule, 5);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|e| e.target).collect();
        assert_eq!(order, vec![3, 2, 4, 1, 5]);
    }

    #[test]
    fn arrivals_rank_between_stage_ends_and_schedules() {
        assert!(EventKind::StageEnd < EventKind::Arrival);
        assert!(EventKind::Arrival < EventKind::Schedule);
    }
}
