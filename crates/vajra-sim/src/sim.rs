//! The discrete-event loop.
//!
//! Events are ordered by `(time, kind rank, sequence number)`:
//!
//! | rank | kind | what it does |
//! |---|---|---|
//! | 0 | `StageEnd` | a batch leaves a pipeline stage: the stage takes its next queued batch; the batch moves to the next stage or, after the last one, its tokens are appended (`update_from_output`), finished requests free their blocks, and the replica is asked to schedule; on a prefill replica, requests that sampled their first token are handed off (below) |
//! | 1 | `KvArrived` | a request's KV reaches its decode replica: the decode replica appends its first token and queues it to decode, the prefill replica frees its blocks, and both are asked to schedule |
//! | 2 | `Arrival` | a request arrives: the router picks a replica, whose scheduler takes it, and the replica is asked to schedule |
//! | 3 | `Schedule` | a replica forms micro-batches while fewer than PP are in flight |
//!
//! So at equal times, completions free their KV blocks before arrivals are routed (routers see
//! up-to-date loads), and a replica schedules once after every arrival and completion of that
//! instant, not once per event. Equal kinds at equal times run in creation order. (Vidur
//! intends a rank too, but its `event_type` property returns `None`, so its ties break by
//! creation only: `docs/vidur.md`.)
//!
//! Arrivals do not sit in the heap: the loop compares the request source's next arrival with
//! the heap's top, so a million-request workload is generated lazily.
//!
//! Disaggregated prefill and decode ([`DisaggSpec`]): replicas `0..P` prefill and `P..P+D`
//! decode. A request is routed to a prefill replica by the run's router; when it samples its
//! first token there it is handed off: the decode router picks a decode replica, which reserves
//! the prompt's blocks (or, when it has no room, the decode replica with the most free blocks
//! does; when none has room, the request waits on its prefill replica holding its blocks, and
//! hand-offs are retried in order whenever a decode step ends). The transfer then queues on the
//! prefill replica's outgoing link and the decode replica's incoming link (first come, first
//! served, one transfer at a time on each, so no link carries more than its bandwidth) and takes
//! `bytes / bandwidth + latency`; with `layerwise`, the part of it that fits under the last
//! prefill step (all but the last layer's share) is sent during that step.

use crate::error::{Result, SimError};
use crate::predictor::{BatchCost, Predictor, StageTimes};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use vajra_core::config::{CacheConfig, InstanceRole};
use vajra_core::driver::{ReplicaDriver, StepRecord, StepSink, StepTicket};
use vajra_core::ids::ReplicaId;
use vajra_core::ids::RequestId;
use vajra_core::kv::hash::BlockHasher;
use vajra_core::kv::{KvCacheManager, SeqContent};
use vajra_core::request::Request;
use vajra_core::router::{RandomSource, ReplicaLoad, Router, RouterConfig};
use vajra_core::sched::Scheduler;
use vajra_core::sched::config::{LatePolicy, SchedulerConfig};
use vajra_core::sched::output::{ModelRunnerOutput, RequestEvent, SchedulerStats};
use vajra_core::sched::policy::BatchPolicy;
use vajra_core::time::{Duration, Timestamp};
use vajra_metrics::{BatchRecord, Collector};
use vajra_workload::RequestSource;

/// Where requests come from, in arrival order.
pub trait Arrivals {
    /// Arrival time of the next request, if known now.
    fn peek_time(&self) -> Option<Timestamp>;
    /// The next request, with its replica (an index among the loop's replicas) when the
    /// source has routed it already.
    fn pop(&mut self) -> Option<(Request, Option<u32>)>;
    /// A request completed (closed loops issue the client's next one).
    fn on_finished(&mut self, id: RequestId, now: Timestamp);
    /// A request was rejected unserved (a session ends; a closed-loop client goes on).
    fn on_rejected(&mut self, id: RequestId, now: Timestamp) {
        self.on_finished(id, now);
    }
    /// Requests issued so far.
    fn issued(&self) -> u64;
    /// Requests issued so far whose lengths the workload clipped.
    fn clipped(&self) -> u64;
}

impl Arrivals for RequestSource {
    fn peek_time(&self) -> Option<Timestamp> {
        RequestSource::peek_time(self)
    }
    fn pop(&mut self) -> Option<(Request, Option<u32>)> {
        RequestSource::pop(self).map(|r| (r, None))
    }
    fn on_finished(&mut self, id: RequestId, now: Timestamp) {
        RequestSource::on_finished(self, id, now);
    }
    fn on_rejected(&mut self, id: RequestId, now: Timestamp) {
        RequestSource::on_rejected(self, id, now);
    }
    fn issued(&self) -> u64 {
        RequestSource::issued(self)
    }
    fn clipped(&self) -> u64 {
        RequestSource::clipped(self)
    }
}

/// The requests of replicas `lo..hi` of an open-loop workload under a load-independent router
/// (`round_robin`, `random`): the router runs over every arrival, in order and with the same
/// random stream as a whole-cluster run, and only this range's requests come out. Such
/// replicas never interact, so partitions can be simulated on separate threads with results
/// identical to one loop over the cluster.
pub struct Partition {
    source: RequestSource,
    router: Router,
    rng: Rng,
    loads: Vec<ReplicaLoad>,
    lo: u32,
    hi: u32,
    next: Option<(Request, u32)>,
    /// Whether `next` was clipped.
    next_clipped: bool,
    issued: u64,
    clipped: u64,
}

impl Partition {
    /// Replicas `lo..hi` of `num_replicas`, routed by `router` (seeded from `seed`).
    pub fn new(
        source: RequestSource,
        router: RouterConfig,
        seed: u64,
        num_replicas: u32,
        lo: u32,
        hi: u32,
    ) -> Self {
        let mut p = Partition {
            source,
            router: Router::new(router),
            rng: Rng::router(seed),
            loads: (0..num_replicas)
                .map(|i| ReplicaLoad {
                    replica: ReplicaId(i),
                    ..ReplicaLoad::default()
                })
                .collect(),
            lo,
            hi,
            next: None,
            next_clipped: false,
            issued: 0,
            clipped: 0,
        };
        p.advance();
        p
    }

    fn advance(&mut self) {
        let mut before = self.source.clipped();
        while let Some(r) = self.source.pop() {
            let clipped = self.source.clipped() > before;
            before = self.source.clipped();
            let t = self.router.route(&r, &self.loads, &mut self.rng).0;
            if (self.lo..self.hi).contains(&t) {
                self.next = Some((r, t - self.lo));
                self.next_clipped = clipped;
                return;
            }
        }
    }
}

impl Arrivals for Partition {
    fn peek_time(&self) -> Option<Timestamp> {
        self.next.as_ref().map(|(r, _)| r.arrival)
    }
    fn pop(&mut self) -> Option<(Request, Option<u32>)> {
        let (r, t) = self.next.take()?;
        self.issued += 1;
        self.clipped += u64::from(self.next_clipped);
        self.advance();
        Some((r, Some(t)))
    }
    fn on_finished(&mut self, _id: RequestId, _now: Timestamp) {}
    fn issued(&self) -> u64 {
        self.issued
    }
    fn clipped(&self) -> u64 {
        self.clipped
    }
}

/// Whether a workload and router allow partitioned simulation.
pub fn partitionable(router: &RouterConfig, closed_loop: bool) -> bool {
    !closed_loop && matches!(router, RouterConfig::RoundRobin | RouterConfig::Random)
}

/// Kind of an event, with its rank at equal times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// A batch leaves a stage.
    StageEnd = 0,
    /// A request's KV reaches its decode replica.
    KvArrived = 1,
    /// A request arrives.
    Arrival = 2,
    /// A replica schedules.
    Schedule = 3,
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
    /// Batch slot (`StageEnd`), transfer slot (`KvArrived`) or replica (`Schedule`).
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

impl Rng {
    /// The router's stream of a run. Whole-cluster loops and partitions must draw the same
    /// stream, or their routing (and results) would differ.
    fn router(seed: u64) -> Self {
        Rng(StdRng::seed_from_u64(vajra_workload::derive_seed(
            seed, "router",
        )))
    }

    /// The decode router's stream (disaggregated runs).
    fn decode_router(seed: u64) -> Self {
        Rng(StdRng::seed_from_u64(vajra_workload::derive_seed(
            seed,
            "decode_router",
        )))
    }
}

impl RandomSource for Rng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

struct Replica {
    driver: ReplicaDriver,
    /// Its pool: 0 (colocated or prefill) or 1 (decode).
    pool: usize,
    num_blocks: u32,
    stage_busy: Vec<bool>,
    stage_queue: Vec<VecDeque<u32>>,
    schedule_pending: bool,
}

/// A step in flight, as the simulated executor sees it: the driver's ticket and the
/// predictor's cost of each stage.
#[derive(Default)]
struct Batch {
    replica: u32,
    ticket: Option<StepTicket>,
    cost: BatchCost,
    stage: usize,
}

/// Where a replica driver's events and step records go in a simulation: the collector (with
/// the predictor's cost added to each step) and the request source (closed loops).
struct SimSink<'a> {
    collector: &'a mut Collector,
    source: &'a mut dyn Arrivals,
    replica: u32,
    cost: &'a BatchCost,
    /// Requests handed off in this step (a prefill replica's).
    handoffs: &'a mut Vec<RequestId>,
}

impl StepSink for SimSink<'_> {
    fn on_event(&mut self, event: RequestEvent, now: Timestamp) {
        match event {
            RequestEvent::Token { id, .. } => self.collector.on_token(id, now),
            RequestEvent::Finished(f) => {
                self.collector.on_finished(&f);
                self.source.on_finished(f.id, now);
            }
            RequestEvent::HandedOff { id, .. } => self.handoffs.push(id),
        }
    }

    fn on_step(&mut self, _: StepTicket, r: &StepRecord) {
        self.collector.on_batch(BatchRecord {
            replica: self.replica,
            step: r.step.0,
            start: r.start,
            end: r.end,
            busy: Duration(self.cost.stage_ns.iter().sum()),
            num_requests: r.num_requests,
            prefill_tokens: r.prefill_tokens,
            decode_tokens: r.decode_tokens,
            preempted: r.preempted,
            kv_blocks_used: r.kv_blocks_used,
            flops: self.cost.flops,
            bytes: self.cost.bytes,
        });
    }
}

/// Records late requests the scheduler rejected; the source hears of them from the loop (a
/// session whose turn was rejected ends there; a closed-loop client goes on).
struct RejectSink<'a> {
    collector: &'a mut Collector,
    pending: &'a mut Vec<(RequestId, Timestamp)>,
}

impl StepSink for RejectSink<'_> {
    fn on_event(&mut self, event: RequestEvent, now: Timestamp) {
        if let RequestEvent::Finished(f) = event {
            self.collector.on_finished(&f);
            self.pending.push((f.id, now));
        }
    }

    fn on_step(&mut self, _: StepTicket, _: &StepRecord) {}
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
    /// How old the loads the router sees may be (0: exact at every arrival).
    pub router_staleness: Duration,
    /// The SLOs: a request's TTFT target (its class's, else the run's) sets its TTFT deadline,
    /// which `scheduler.late_requests = "reject"` acts on.
    pub slo: Option<&'a vajra_metrics::SloConfig>,
    /// Predictor (one replica shape).
    pub predictor: &'a Predictor,
    /// Root seed (the router's random stream derives from it).
    pub seed: u64,
    /// Called now and then with the number of requests completed since the previous call.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
    /// Builds each replica's batching policy instead of `scheduler.policy` (an out-of-tree
    /// policy); `None` runs the in-tree policy the config names.
    pub policy: Option<&'a PolicyFactory>,
    /// Step-time replay (`vajra-sim twin`): the (start, end) of each step, in the order the
    /// replica forms them (one replica, one stage). Step k is formed no earlier than its start
    /// and lasts until its end instead of the predictor's duration; every step's requests are
    /// recorded in [`SimResult::steps`]. Steps past the list run at the predictor's pace.
    pub step_times: Option<&'a [(Timestamp, Timestamp)]>,
    /// Disaggregated prefill and decode: `num_replicas` is the prefill pool's replicas plus
    /// the decode pool's, and `scheduler`, `predictor` and `num_blocks` are the prefill
    /// pool's.
    pub disagg: Option<&'a DisaggSpec<'a>>,
}

/// The decode pool and the KV link of a disaggregated cluster.
pub struct DisaggSpec<'a> {
    /// Prefill replicas (the first ones).
    pub num_prefill: u32,
    /// Predictor of a decode replica.
    pub decode_predictor: &'a Predictor,
    /// KV blocks of a decode replica.
    pub decode_blocks: u32,
    /// Picks the decode replica of a prefilled request.
    pub decode_router: RouterConfig,
    /// The scheduler of a decode replica.
    pub decode_scheduler: &'a SchedulerConfig,
    /// Bytes/s between one prefill and one decode replica, each way.
    pub bandwidth: f64,
    /// Latency of one transfer.
    pub latency: Duration,
    /// Whether a transfer overlaps the last prefill step layer by layer.
    pub layerwise: bool,
    /// Layers of the model (a layer's share of the transfer is what `layerwise` leaves after
    /// the prefill).
    pub num_layers: u32,
    /// KV bytes of one token, all layers and heads.
    pub kv_bytes_per_token: f64,
}

/// A request handed off and not yet placed on a decode replica.
struct PendingHandoff {
    handoff: vajra_core::sched::Handoff,
    /// Its prefill replica (local index).
    prefill: usize,
    /// When it was handed off.
    since: Timestamp,
    /// Duration of its last prefill step (ns), which a layer-wise transfer overlaps.
    step_ns: u64,
    /// The decode replica its router picked (local index), once routed.
    decode: Option<usize>,
}

/// A KV transfer in flight.
#[derive(Clone, Copy)]
struct Transfer {
    id: RequestId,
    prefill: usize,
    decode: usize,
}

/// Makes one replica's batching policy (called once per replica).
pub type PolicyFactory = dyn Fn() -> Box<dyn BatchPolicy> + Sync;

/// What a run produced.
pub struct SimResult {
    /// Lifecycle records and pooled distributions.
    pub collector: Collector,
    /// Requests issued.
    pub issued: u64,
    /// Requests issued with lengths the workload clipped.
    pub clipped: u64,
    /// Simulated time of the last event.
    pub end: Timestamp,
    /// Events processed (arrivals included).
    pub events: u64,
    /// Final scheduler counters per replica.
    pub replica_stats: Vec<SchedulerStats>,
    /// Under step-time replay: each step's requests as (new tokens, tokens computed before,
    /// samples), in batch order.
    pub steps: Vec<Vec<(u32, u32, bool)>>,
}

/// The global router of a loop, its random stream and its load buffer.
struct Routing {
    router: Router,
    rng: Rng,
    loads: Vec<ReplicaLoad>,
    /// When `loads` were last read from the replicas (with a router staleness).
    refreshed: Option<Timestamp>,
    /// Hashes prompts for prefix lookups (every replica's cache config is the same).
    hasher: Option<BlockHasher>,
    /// Cached prefix tokens per replica, for the arriving request.
    prefix: Vec<u32>,
}

impl Routing {
    /// The router of replicas `lo..lo + n` of `replicas`.
    fn new(cfg: RouterConfig, rng: Rng, replicas: &[Replica], lo: usize, n: usize) -> Self {
        Routing {
            router: Router::new(cfg),
            rng,
            loads: vec![ReplicaLoad::default(); n],
            refreshed: None,
            hasher: replicas.get(lo).map(|r| r.driver.scheduler().kv().hasher()),
            prefix: Vec::new(),
        }
    }

    /// Picks one of `replicas` (this router's pool) for `req` at `now`; returns its index in
    /// the slice.
    fn route(
        &mut self,
        replicas: &[Replica],
        req: &Request,
        now: Timestamp,
        staleness: Duration,
        block_size: u32,
    ) -> u32 {
        let needs_prefix = self.router.needs_prefix_lookup();
        // With staleness, loads are re-read only once the snapshot is that old; in between the
        // router counts its own decisions (below).
        let refresh = staleness.0 == 0 || self.refreshed.is_none_or(|t| now >= t + staleness);
        if needs_prefix {
            let kvs: Vec<&KvCacheManager> =
                replicas.iter().map(|r| r.driver.scheduler().kv()).collect();
            self.prefix.resize(kvs.len(), 0);
            KvCacheManager::cached_prefix_tokens_in(
                self.hasher.as_mut().expect("a hasher when replicas exist"),
                &SeqContent::prompt_of(req),
                &kvs,
                &mut self.prefix,
            );
        }
        for (i, (l, r)) in self.loads.iter_mut().zip(replicas.iter()).enumerate() {
            if refresh {
                let sched = r.driver.scheduler();
                let num_blocks = r.num_blocks;
                let used = f64::from(num_blocks - sched.kv().num_free());
                let queued = sched.queued_tokens().div_ceil(u64::from(block_size)) as f64;
                *l = ReplicaLoad {
                    replica: ReplicaId(i as u32),
                    num_waiting: sched.num_waiting() as u32,
                    num_running: sched.num_running() as u32,
                    kv_usage: 1.0 - f64::from(sched.kv().num_free()) / f64::from(num_blocks),
                    kv_demand: (used + queued) / f64::from(num_blocks),
                    outstanding_tokens: sched.outstanding_tokens(),
                    cached_prefix_tokens: 0,
                };
            }
            // The router's own view of what it sent where (SGLang's approximate tree, llm-d's
            // KV events) is current: the prefix lookup is never stale.
            if needs_prefix {
                l.cached_prefix_tokens = self.prefix[i];
            }
        }
        if refresh {
            self.refreshed = Some(now);
        }
        let t = self.router.route(req, &self.loads, &mut self.rng).0;
        if staleness.0 > 0 {
            let num_blocks = replicas[t as usize].num_blocks;
            let l = &mut self.loads[t as usize];
            l.num_waiting += 1;
            l.outstanding_tokens += u64::from(req.prompt.len()) + u64::from(req.max_tokens());
            l.kv_demand += f64::from(req.prompt.len().div_ceil(block_size)) / f64::from(num_blocks);
        }
        t
    }
}

/// The loop's mutable state, so its handlers can be methods.
struct Loop<'a, 's> {
    spec: &'a SimSpec<'s>,
    /// Reused every step: the token oracle's output.
    runner_out: ModelRunnerOutput,
    /// Global id of the first replica of this loop.
    base: u32,
    replicas: Vec<Replica>,
    q: EventQueue,
    /// Batch slots, reused (with their output buffers) through `free_slots`.
    batches: Vec<Batch>,
    free_slots: Vec<u32>,
    collector: Collector,
    /// Requests rejected as late whose source has not heard of it yet.
    rejected: Vec<(RequestId, Timestamp)>,
    /// Under step-time replay, every step's requests.
    steps: Vec<Vec<(u32, u32, bool)>>,
    /// Requests handed off by the step being applied.
    handoffs: Vec<RequestId>,
    /// Hand-offs waiting for room on a decode replica, in hand-off order.
    pending: VecDeque<PendingHandoff>,
    /// Transfers in flight, reused through `free_transfers`.
    transfers: Vec<Option<Transfer>>,
    free_transfers: Vec<u32>,
    /// When each prefill replica's outgoing link and each decode replica's incoming link is
    /// free (by local replica index).
    link_free: Vec<Timestamp>,
    /// The decode router (disaggregated runs).
    decode_routing: Option<Routing>,
    /// The first error a handler met (the loop stops on it).
    error: Option<SimError>,
}

impl Loop<'_, '_> {
    /// Forms micro-batches on replica `r` while fewer than PP are in flight.
    fn schedule(&mut self, r: usize, now: Timestamp) {
        let spec = self.spec;
        let rep = &mut self.replicas[r];
        let predictor = match (rep.pool, spec.disagg) {
            (1, Some(d)) => d.decode_predictor,
            _ => spec.predictor,
        };
        rep.schedule_pending = false;
        if rep.driver.scheduler().config().late_requests == LatePolicy::Reject {
            let mut sink = RejectSink {
                collector: &mut self.collector,
                pending: &mut self.rejected,
            };
            rep.driver.reject_late(now, &mut sink);
        }
        if let Some(times) = self.spec.step_times
            && let Some(&(start, _)) = times.get(self.steps.len())
            && now < start
        {
            // The replayed engine began this step later (it was idle until then).
            rep.schedule_pending = true;
            self.q.push(start, EventKind::Schedule, r as u32);
            return;
        }
        while let Some(ticket) = rep.driver.begin_step(now) {
            let slot = match self.free_slots.pop() {
                Some(s) => s,
                None => {
                    self.batches.push(Batch::default());
                    (self.batches.len() - 1) as u32
                }
            };
            let b = &mut self.batches[slot as usize];
            b.cost = predictor.predict(rep.driver.output(ticket));
            if let Some(times) = self.spec.step_times {
                let out = rep.driver.output(ticket);
                if let Some((_, end)) = times.get(self.steps.len()) {
                    b.cost.stage_ns = StageTimes::single(end.0.saturating_sub(now.0).max(1));
                }
                self.steps.push(
                    out.scheduled
                        .iter()
                        .map(|s| (s.num_tokens, s.num_computed, s.samples))
                        .collect(),
                );
            }
            b.replica = r as u32;
            b.ticket = Some(ticket);
            b.stage = 0;
            if rep.stage_busy[0] {
                rep.stage_queue[0].push_back(slot);
            } else {
                rep.stage_busy[0] = true;
                self.q.push(
                    now + Duration(b.cost.stage_ns[0]),
                    EventKind::StageEnd,
                    slot,
                );
            }
        }
    }

    /// Request `req` arrives at `now`: it is routed (unless the source routed it), its
    /// replica's scheduler takes it, and that replica is asked to schedule at `now` once every
    /// arrival of the instant is in.
    fn arrive(
        &mut self,
        mut req: Request,
        routed: Option<u32>,
        now: Timestamp,
        routing: &mut Routing,
    ) -> Result<()> {
        let block_size = self.spec.cache.block_size;
        let lo = self.base;
        self.collector.on_arrival(req.id, now);
        // Only a scheduler that rejects late requests reads the deadline.
        if self.spec.scheduler.late_requests == LatePolicy::Reject
            && let Some(slo) = self.spec.slo
            && let (Some(ttft), _, _) = slo.targets(req.slo_class)
        {
            req.ttft_deadline = Some(req.arrival + Duration::from_secs_f64(ttft));
        }
        let target = match routed {
            Some(t) => t,
            None => {
                let pool = self
                    .spec
                    .disagg
                    .map_or(self.replicas.len(), |d| d.num_prefill as usize);
                routing.route(
                    &self.replicas[..pool],
                    &req,
                    now,
                    self.spec.router_staleness,
                    block_size,
                )
            }
        };
        self.collector.on_routed(req.id, lo + target);
        let (id, prompt, out) = (req.id, req.prompt.len(), req.max_tokens());
        self.replicas[target as usize]
            .driver
            .scheduler_mut()
            .add_request(req, now)
            .map_err(|e| {
                SimError::Memory(format!(
                    "request {id} ({prompt} prompt + {out} output tokens) cannot run on replica {}: {e} (raise cache.num_blocks or cache.gpu_memory_utilization, or lower workload.max_tokens)",
                    lo + target
                ))
            })?;
        // Arrivals at the same instant are routed first, then the replica schedules once.
        let rep = &mut self.replicas[target as usize];
        if !rep.schedule_pending {
            rep.schedule_pending = true;
            self.q.push(now, EventKind::Schedule, target);
        }
        Ok(())
    }

    /// Asks replica `r` to schedule at `now`: inline when nothing else can happen at `now`
    /// before its `Schedule` event would run (no arrival and no stage end at `now` still
    /// queued), otherwise through the queue.
    fn request_schedule(&mut self, r: usize, now: Timestamp, next_arrival: Option<Timestamp>) {
        if self.replicas[r].schedule_pending {
            return;
        }
        let arrival_now = next_arrival == Some(now);
        let stage_end_now = self
            .q
            .peek()
            .is_some_and(|(t, k)| t == now && k == EventKind::StageEnd);
        if !arrival_now && !stage_end_now {
            self.schedule(r, now);
        } else {
            self.replicas[r].schedule_pending = true;
            self.q.push(now, EventKind::Schedule, r as u32);
        }
    }

    /// Batch `slot` leaves its current stage at `now`.
    fn stage_end(
        &mut self,
        slot: u32,
        now: Timestamp,
        source: &mut dyn Arrivals,
        on_slice: &mut Option<&mut dyn FnMut(&StageSlice)>,
    ) {
        let b = &mut self.batches[slot as usize];
        let r = b.replica as usize;
        let s = b.stage;
        let ticket = b.ticket.expect("a batch in a stage has a step");
        if let Some(f) = on_slice.as_mut() {
            let dur = Duration(b.cost.stage_ns[s]);
            let rec = self.replicas[r].driver.record(ticket);
            f(&StageSlice {
                replica: self.base + b.replica,
                stage: s as u32,
                step: rec.step.0,
                start: Timestamp(now.0 - dur.0),
                dur,
                size: rec.num_requests,
                prefill_tokens: rec.prefill_tokens,
                decode_tokens: rec.decode_tokens,
            });
        }
        let last_stage = s + 1 == self.replicas[r].stage_busy.len();
        if !last_stage {
            b.stage = s + 1;
        }
        let next_ns = (!last_stage).then(|| b.cost.stage_ns[s + 1]);
        let rep = &mut self.replicas[r];
        // The stage takes its next batch.
        rep.stage_busy[s] = false;
        if let Some(next) = rep.stage_queue[s].pop_front() {
            rep.stage_busy[s] = true;
            let ns = self.batches[next as usize].cost.stage_ns[s];
            self.q.push(now + Duration(ns), EventKind::StageEnd, next);
        }
        if let Some(ns) = next_ns {
            if rep.stage_busy[s + 1] {
                rep.stage_queue[s + 1].push_back(slot);
            } else {
                rep.stage_busy[s + 1] = true;
                self.q.push(now + Duration(ns), EventKind::StageEnd, slot);
            }
            return;
        }
        // Last stage: the token oracle samples and the driver applies the step.
        let b = &mut self.batches[slot as usize];
        b.ticket = None;
        self.free_slots.push(slot);
        self.runner_out.fill_uniform(rep.driver.output(ticket), 0);
        let mut sink = SimSink {
            collector: &mut self.collector,
            source: &mut *source,
            replica: self.base + b.replica,
            cost: &b.cost,
            handoffs: &mut self.handoffs,
        };
        rep.driver
            .end_step(ticket, &self.runner_out, now, &mut sink);
        let step_ns: u64 = b.cost.stage_ns.iter().sum();
        let decode = rep.pool == 1;
        if !self.handoffs.is_empty() {
            let sched = rep.driver.scheduler();
            for id in self.handoffs.drain(..) {
                let handoff = sched
                    .take_handoff(id)
                    .expect("a request handed off this step is held");
                self.pending.push_back(PendingHandoff {
                    handoff,
                    prefill: r,
                    since: now,
                    step_ns,
                    decode: None,
                });
            }
            self.place_handoffs(now);
        } else if decode && !self.pending.is_empty() {
            // Blocks may have freed up on this decode replica.
            self.place_handoffs(now);
        }
        self.request_schedule(r, now, source.peek_time());
    }

    /// Places waiting hand-offs on decode replicas, in order, until one does not fit.
    fn place_handoffs(&mut self, now: Timestamp) {
        let d = self
            .spec
            .disagg
            .expect("hand-offs only in a disaggregated run");
        let lo = d.num_prefill as usize;
        while let Some(p) = self.pending.front_mut() {
            let target = match p.decode {
                Some(t) => t,
                None => {
                    let routing = self.decode_routing.as_mut().expect("a decode router");
                    let t = lo
                        + routing.route(
                            &self.replicas[lo..],
                            &p.handoff.request,
                            now,
                            self.spec.router_staleness,
                            self.spec.cache.block_size,
                        ) as usize;
                    p.decode = Some(t);
                    t
                }
            };
            // The picked replica, else the one with the most free blocks (lowest index on ties).
            let spill = (lo..self.replicas.len())
                .filter(|&i| i != target)
                .max_by_key(|&i| {
                    (
                        self.replicas[i].driver.scheduler().kv().num_free(),
                        Reverse(i),
                    )
                });
            let mut placed = None;
            for cand in std::iter::once(target).chain(spill) {
                match self.replicas[cand]
                    .driver
                    .scheduler_mut()
                    .reserve_remote(&p.handoff, now)
                {
                    Ok(Some(tokens)) => {
                        placed = Some((cand, tokens));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let r = &p.handoff.request;
                        self.error = Some(SimError::Memory(format!(
                            "request {} ({} prompt + {} output tokens) cannot run on decode replica {}: {e} (raise the decode pool's KV blocks, or lower workload.max_tokens)",
                            r.id,
                            r.prompt.len(),
                            r.max_tokens(),
                            self.base as usize + cand
                        )));
                        self.pending.pop_front();
                        return;
                    }
                }
            }
            let Some((dr, tokens)) = placed else {
                return; // head of line: retried when a decode step ends
            };
            let p = self.pending.pop_front().expect("the front");
            let id = p.handoff.request.id;
            let bytes = f64::from(tokens) * d.kv_bytes_per_token;
            let tx = if bytes > 0.0 {
                ((bytes / d.bandwidth) * 1e9).ceil() as u64
            } else {
                0
            };
            // A layer-wise transfer sends all but the last layer's share during the last
            // prefill step, when the decode side was reserved at its end.
            let layers = u64::from(d.num_layers.max(1));
            let overlap = if d.layerwise && p.since == now {
                p.step_ns.min(tx / layers * (layers - 1))
            } else {
                0
            };
            let start = Timestamp(now.0 - overlap.min(now.0))
                .max(self.link_free[p.prefill])
                .max(self.link_free[dr]);
            let done = start + Duration(tx);
            self.link_free[p.prefill] = done;
            self.link_free[dr] = done;
            let arrive = (done + d.latency).max(now);
            self.collector.on_routed(id, self.base + dr as u32);
            self.collector.on_transfer(
                id,
                vajra_metrics::collector::Transfer {
                    prefill_replica: self.base + p.prefill as u32,
                    reserved: now,
                    bytes,
                    link: (start, done),
                },
            );
            let t = Transfer {
                id,
                prefill: p.prefill,
                decode: dr,
            };
            let slot = match self.free_transfers.pop() {
                Some(i) => {
                    self.transfers[i as usize] = Some(t);
                    i
                }
                None => {
                    self.transfers.push(Some(t));
                    (self.transfers.len() - 1) as u32
                }
            };
            self.q.push(arrive, EventKind::KvArrived, slot);
        }
    }

    /// Transfer `slot`'s KV reached its decode replica at `now`.
    fn kv_arrived(&mut self, slot: u32, now: Timestamp, next_arrival: Option<Timestamp>) {
        let t = self.transfers[slot as usize]
            .take()
            .expect("a transfer in flight");
        self.free_transfers.push(slot);
        self.replicas[t.decode]
            .driver
            .scheduler_mut()
            .remote_kv_arrived(t.id, now)
            .expect("a reserved request");
        self.collector.on_token(t.id, now);
        self.replicas[t.prefill]
            .driver
            .scheduler_mut()
            .release_handoff(t.id)
            .expect("a handed-off request");
        self.request_schedule(t.decode, now, next_arrival);
        self.request_schedule(t.prefill, now, next_arrival);
    }
}

/// Runs the workload to completion, recording into `collector` (see
/// [`Collector::stream_batches`]) and handing every batch stage to `on_slice` (the Chrome
/// trace) when given.
///
/// # Errors
/// A request the scheduler rejects, or a stall (requests that can never be scheduled).
pub fn run(
    spec: &SimSpec<'_>,
    source: &mut dyn Arrivals,
    collector: Collector,
    on_slice: Option<&mut dyn FnMut(&StageSlice)>,
) -> Result<SimResult> {
    run_range(spec, source, collector, on_slice, 0, spec.num_replicas)
}

/// Runs replicas `lo..hi` (global ids) on requests that `source` routes to them (see
/// [`Partition`]); [`run`] is the whole cluster.
///
/// # Errors
/// As [`run`].
pub fn run_range(
    spec: &SimSpec<'_>,
    source: &mut dyn Arrivals,
    collector: Collector,
    mut on_slice: Option<&mut dyn FnMut(&StageSlice)>,
    lo: u32,
    hi: u32,
) -> Result<SimResult> {
    let replicas: Vec<Replica> = (lo..hi)
        .map(|i| {
            let (pool, role, predictor, num_blocks, cfg) = match spec.disagg {
                None => (
                    0,
                    InstanceRole::Colocated,
                    spec.predictor,
                    spec.num_blocks,
                    spec.scheduler,
                ),
                Some(d) if i < d.num_prefill => (
                    0,
                    InstanceRole::Prefill,
                    spec.predictor,
                    spec.num_blocks,
                    spec.scheduler,
                ),
                Some(d) => (
                    1,
                    InstanceRole::Decode,
                    d.decode_predictor,
                    d.decode_blocks,
                    d.decode_scheduler,
                ),
            };
            let pp = predictor.stages();
            let policy = match spec.policy {
                Some(make) => make(),
                None => cfg.policy.build(),
            };
            let mut sched = Scheduler::with_policy(
                cfg.clone(),
                spec.cache,
                num_blocks,
                spec.max_model_len,
                policy,
            )?;
            sched.set_role(role)?;
            // The simulated executor reads token counts only.
            sched.omit_request_data();
            Ok(Replica {
                driver: ReplicaDriver::new(sched, pp as u32),
                pool,
                num_blocks,
                stage_busy: vec![false; pp],
                stage_queue: vec![VecDeque::new(); pp],
                schedule_pending: false,
            })
        })
        .collect::<Result<_>>()?;
    let num_prefill = spec
        .disagg
        .map_or(replicas.len(), |d| d.num_prefill as usize);
    let decode_routing = spec.disagg.map(|d| {
        Routing::new(
            d.decode_router,
            Rng::decode_router(spec.seed),
            &replicas,
            num_prefill,
            replicas.len() - num_prefill,
        )
    });
    let routing_prefill = Routing::new(
        spec.router,
        Rng::router(spec.seed),
        &replicas,
        0,
        num_prefill,
    );
    let num_local = replicas.len();
    let mut st = Loop {
        spec,
        runner_out: ModelRunnerOutput::default(),
        base: lo,
        replicas,
        q: EventQueue::default(),
        batches: Vec::new(),
        free_slots: Vec::new(),
        collector,
        rejected: Vec::new(),
        steps: Vec::new(),
        handoffs: Vec::new(),
        pending: VecDeque::new(),
        transfers: Vec::new(),
        free_transfers: Vec::new(),
        link_free: vec![Timestamp::ZERO; num_local],
        decode_routing,
        error: None,
    };
    let mut routing = routing_prefill;
    let mut now = Timestamp::ZERO;
    let mut events = 0u64;
    let mut reported = 0u64;

    loop {
        for (id, t) in st.rejected.drain(..) {
            source.on_rejected(id, t);
        }
        let next_arrival = source.peek_time();
        let arrival_first = match (next_arrival, st.q.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(ta), Some((te, ke))) => (ta, EventKind::Arrival) < (te, ke),
        };
        events += 1;
        if events & 0x3fff == 0
            && let Some(p) = spec.progress
        {
            let done = st.collector.finished();
            p(done - reported);
            reported = done;
        }
        if arrival_first {
            let (req, routed) = source.pop().expect("peeked");
            now = now.max(req.arrival);
            st.arrive(req, routed, now, &mut routing)?;
            continue;
        }
        let ev = st.q.pop().expect("peeked");
        now = ev.time;
        match ev.kind {
            EventKind::Arrival => unreachable!("arrivals are not queued"),
            EventKind::Schedule => st.schedule(ev.target as usize, now),
            EventKind::StageEnd => st.stage_end(ev.target, now, source, &mut on_slice),
            EventKind::KvArrived => st.kv_arrived(ev.target, now, source.peek_time()),
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
    }

    if let Some(p) = st.pending.front() {
        let r = &p.handoff.request;
        return Err(SimError::Stalled(format!(
            "{} prefilled requests never found room on a decode replica (the first, request {} with {} prompt tokens, since {:.3} s): the decode pool's {} KV blocks of {} tokens per replica cannot hold them (give the decode pool more replicas or memory, or lower workload.max_tokens)",
            st.pending.len(),
            r.id,
            r.prompt.len(),
            p.since.as_secs_f64(),
            spec.disagg.map_or(0, |d| d.decode_blocks),
            spec.cache.block_size
        )));
    }

    for (i, r) in st.replicas.iter().enumerate() {
        if r.driver.scheduler().has_unfinished() {
            let i = lo as usize + i;
            return Err(SimError::Stalled(format!(
                "replica {i} still has {} waiting and {} running requests that can never be scheduled: its {} KV blocks of {} tokens cannot hold them (raise cache.num_blocks or gpu_memory_utilization, or lower workload.max_tokens)",
                r.driver.scheduler().num_waiting(),
                r.driver.scheduler().num_running(),
                r.num_blocks,
                spec.cache.block_size
            )));
        }
    }
    // Saturated integer time would have made every later latency 0: an error, not a result.
    if now.as_secs_f64() > vajra_core::time::MAX_SECS {
        return Err(SimError::Stalled(format!(
            "simulated time reached {:.3e} s, past the clock of {:e} s (about 317 years), so times past it are not exact: check the units of the arrival times (seconds) and workload.arrival.qps (requests per second)",
            now.as_secs_f64(),
            vajra_core::time::MAX_SECS
        )));
    }
    Ok(SimResult {
        issued: source.issued(),
        clipped: source.clipped(),
        replica_stats: st
            .replicas
            .iter()
            .map(|r| r.driver.scheduler().stats())
            .collect(),
        collector: st.collector,
        end: now,
        events,
        steps: st.steps,
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
        assert!(EventKind::StageEnd < EventKind::KvArrived);
        assert!(EventKind::KvArrived < EventKind::Arrival);
        assert!(EventKind::Arrival < EventKind::Schedule);
    }
}
