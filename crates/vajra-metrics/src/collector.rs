//! Online collection of lifecycle events.

use crate::error::Result;
use crate::outcomes::Outcomes;
use crate::output::BatchSink;
use crate::slo::{DeadlineState, SloConfig};
use crate::stats::{IntHasher, Multiset};
use serde::Serialize;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::path::Path;
use vajra_core::ids::RequestId;
use vajra_core::request::FinishReason;
use vajra_core::sched::output::FinishedRecord;
use vajra_core::time::{Duration, Timestamp};

/// One finished request, with its derived latencies (seconds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Request id.
    pub request_id: u64,
    /// Replica that served it.
    pub replica: u32,
    /// Tenant.
    pub tenant: u32,
    /// Priority.
    pub priority: i32,
    /// Arrival (s from run start).
    pub arrival_s: f64,
    /// First time it was scheduled (s), if ever.
    pub first_scheduled_s: Option<f64>,
    /// First output token (s), if any.
    pub first_token_s: Option<f64>,
    /// Completion (s).
    pub completed_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens.
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: u32,
    /// Times preempted.
    pub preemptions: u32,
    /// Time to first token (s).
    pub ttft_s: Option<f64>,
    /// Time per output token after the first (s), for n ≥ 2.
    pub tpot_s: Option<f64>,
    /// End-to-end latency (s).
    pub e2e_s: f64,
    /// E2E / output tokens (s).
    pub normalized_e2e_s: Option<f64>,
    /// First scheduled − arrival (s).
    pub scheduling_delay_s: Option<f64>,
    /// Largest gap between consecutive output tokens (s).
    pub max_tbt_s: Option<f64>,
    /// Number of inter-token gaps recorded (output tokens − 1).
    pub tbt_samples: u32,
    /// Absolute deadline (s), if any.
    pub deadline_s: Option<f64>,
    /// Etalon token deadlines counted.
    pub token_deadlines: u32,
    /// Etalon token deadlines missed.
    pub token_deadline_misses: u32,
    /// Why it finished.
    pub finish_reason: FinishReason,
}

/// One batch (a scheduler step) on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchRecord {
    /// Replica.
    pub replica: u32,
    /// Step number on that replica.
    pub step: u64,
    /// When it was scheduled (ns).
    pub start: Timestamp,
    /// When its last stage ended (ns).
    pub end: Timestamp,
    /// Sum of its stage execution times (ns): busy time it caused.
    pub busy: Duration,
    /// Requests in it.
    pub num_requests: u32,
    /// Prompt tokens computed.
    pub prefill_tokens: u32,
    /// Output tokens computed.
    pub decode_tokens: u32,
    /// Requests preempted while forming it.
    pub preempted: u32,
    /// KV blocks in use after scheduling it.
    pub kv_blocks_used: u32,
    /// Floating-point operations it performed (whole replica).
    pub flops: f64,
    /// Bytes it moved through device memory (whole replica).
    pub bytes: f64,
}

/// One request's hand-off from a prefill replica to a decode replica (disaggregated runs):
/// its TTFT in parts, `prefill_queue_s + prefill_s + handoff_wait_s + kv_transfer_s = ttft_s`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferRecord {
    /// Request id.
    pub request_id: u64,
    /// Replica that prefilled it.
    pub prefill_replica: u32,
    /// Replica that decoded it.
    pub decode_replica: u32,
    /// Arrival to first scheduled on the prefill replica (s).
    pub prefill_queue_s: f64,
    /// First scheduled to first token on the prefill replica (s).
    pub prefill_s: f64,
    /// First token to blocks reserved on a decode replica (s): waiting for decode room.
    pub handoff_wait_s: f64,
    /// Blocks reserved to KV arrived on the decode replica (s): link queueing, the part of
    /// the transfer not hidden behind the prefill, and the link latency.
    pub kv_transfer_s: f64,
    /// Bytes of KV sent (prompt tokens the decode replica did not have cached).
    pub kv_transfer_bytes: f64,
    /// When the bytes began to move on the link (s; before the prefill's end when the
    /// transfer overlaps it layer by layer).
    pub link_start_s: f64,
    /// When the last byte left the link (s; the KV arrives a link latency later).
    pub link_end_s: f64,
    /// KV arrived to first scheduled on the decode replica (s).
    pub decode_queue_s: Option<f64>,
    /// Time to first token (s), as the client sees it: when the KV and first token arrive.
    pub ttft_s: f64,
}

/// Hand-off distributions of a disaggregated run, in whole microseconds.
#[derive(Debug, Clone, Default)]
pub struct TransferStats {
    /// Arrival to first scheduled on the prefill replica.
    pub prefill_queue: Multiset,
    /// First scheduled to first token on the prefill replica.
    pub prefill: Multiset,
    /// First token to decode blocks reserved.
    pub handoff_wait: Multiset,
    /// Decode blocks reserved to KV arrived.
    pub kv_transfer: Multiset,
    /// KV arrived to first decode step.
    pub decode_queue: Multiset,
    /// Bytes sent.
    pub bytes: f64,
}

impl TransferStats {
    fn merge(&mut self, o: &TransferStats) {
        self.prefill_queue.merge(&o.prefill_queue);
        self.prefill.merge(&o.prefill);
        self.handoff_wait.merge(&o.handoff_wait);
        self.kv_transfer.merge(&o.kv_transfer);
        self.decode_queue.merge(&o.decode_queue);
        self.bytes += o.bytes;
    }
}

/// A hand-off's transfer, as the simulator scheduled it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Replica that prefilled the request.
    pub prefill_replica: u32,
    /// When the decode replica reserved its blocks.
    pub reserved: Timestamp,
    /// Bytes sent.
    pub bytes: f64,
    /// When the bytes began and finished moving on the link.
    pub link: (Timestamp, Timestamp),
}

#[derive(Debug, Clone, Copy, Default)]
struct Live {
    replica: u32,
    /// A hand-off's transfer.
    transfer: Option<Transfer>,
    last: Timestamp,
    tokens: u32,
    max_gap: Duration,
    deadlines: DeadlineState,
}

/// One replica's batch aggregates, kept online.
#[derive(Debug, Clone, Default)]
pub struct ReplicaAgg {
    /// Batches run.
    pub batches: u64,
    /// Sum of stage busy time (ns).
    pub busy_ns: u128,
    /// FLOPs.
    pub flops: f64,
    /// Bytes moved.
    pub bytes: f64,
    /// ∫ KV blocks in use dt (blocks·ns), a step function between batch starts.
    pub kv_block_ns: f64,
    /// Span the integral covers (ns).
    pub kv_span_ns: u64,
    /// Most KV blocks in use.
    pub kv_max_blocks: u32,
    /// Start, KV blocks and end of the latest batch.
    last: Option<(Timestamp, u32, Timestamp)>,
}

impl ReplicaAgg {
    /// Adds another collector's view of the same replica (one of the two is empty when
    /// replicas are simulated in disjoint partitions).
    fn merge(&mut self, o: &ReplicaAgg) {
        if o.batches == 0 {
            return;
        }
        if self.batches == 0 {
            *self = o.clone();
            return;
        }
        // Both saw batches of this replica: the sums are still exact; the KV step function
        // joins at the boundary as if the batches were consecutive.
        let mut o = o.clone();
        if let (Some((s, kv, _)), Some((os, _, _))) = (self.last, o.last)
            && os >= s
        {
            let w = os.since(s).0;
            self.kv_block_ns += f64::from(kv) * w as f64;
            self.kv_span_ns += w;
            self.last = o.last.take();
        }
        self.batches += o.batches;
        self.busy_ns += o.busy_ns;
        self.flops += o.flops;
        self.bytes += o.bytes;
        self.kv_block_ns += o.kv_block_ns;
        self.kv_span_ns += o.kv_span_ns;
        self.kv_max_blocks = self.kv_max_blocks.max(o.kv_max_blocks);
    }

    /// The integral and span including the latest batch up to its end.
    pub fn kv_totals(&self) -> (f64, u64) {
        match self.last {
            Some((s, kv, e)) => {
                let w = e.since(s).0;
                (
                    self.kv_block_ns + f64::from(kv) * w as f64,
                    self.kv_span_ns + w,
                )
            }
            None => (self.kv_block_ns, self.kv_span_ns),
        }
    }
}

/// Batch distributions and per-replica aggregates, kept online so that a run of millions of
/// batches never holds them in memory (they stream to `batches.parquet` when asked).
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Batches.
    pub count: u64,
    /// Requests per batch.
    pub size: Multiset,
    /// Tokens per batch.
    pub tokens: Multiset,
    /// Prompt tokens per batch.
    pub prefill: Multiset,
    /// Output tokens per batch.
    pub decode: Multiset,
    /// Schedule-to-end latency per batch, in whole microseconds (exact at that resolution;
    /// nanosecond keys would make the table too large to stay in cache).
    pub latency: Multiset,
    /// Per replica.
    pub replicas: Vec<ReplicaAgg>,
}

/// Collects lifecycle events into records and pooled distributions.
#[derive(Debug, Default)]
pub struct Collector {
    token_deadlines: Option<(Duration, Duration)>,
    /// Requests in flight (removed when they finish, so memory follows concurrency, not run
    /// length).
    live: HashMap<u64, Live, BuildHasherDefault<IntHasher>>,
    /// Pooled inter-token gaps (ns).
    pub tbt: Multiset,
    /// What the summary needs of every finished request.
    pub outcomes: Outcomes,
    /// Finished requests, in completion order; empty after [`Collector::without_records`].
    pub requests: Vec<RequestRecord>,
    keep_records: bool,
    /// Batch aggregates.
    pub batches: BatchStats,
    sink: Option<BatchSink>,
    /// Hand-offs of requests finished (disaggregated runs), in completion order; empty after
    /// [`Collector::without_records`].
    pub transfers: Vec<TransferRecord>,
    /// Hand-off distributions.
    pub transfer_stats: TransferStats,
}

fn secs(t: Timestamp) -> f64 {
    t.as_secs_f64()
}

impl Collector {
    /// A collector for the given SLOs (token deadlines are tracked when set) and replicas,
    /// keeping every finished request's record.
    pub fn new(slo: &SloConfig, num_replicas: u32) -> Self {
        Collector {
            token_deadlines: slo.token_deadlines(),
            outcomes: if slo.classes.is_empty() {
                Outcomes::new(num_replicas)
            } else {
                Outcomes::new(num_replicas).with_classes()
            },
            keep_records: true,
            batches: BatchStats {
                replicas: vec![ReplicaAgg::default(); num_replicas as usize],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Keeps only the [`Outcomes`] of finished requests, not their records: for a run that
    /// writes no request table (memory then grows by 44 bytes a request, not about 230).
    #[must_use]
    pub fn without_records(mut self) -> Self {
        self.keep_records = false;
        self
    }

    /// Finished requests: served, or rejected as late.
    pub fn finished(&self) -> u64 {
        self.outcomes.len() as u64 + self.outcomes.rejected
    }

    /// Streams every batch to a Parquet file at `path` (`num_blocks` per replica gives the
    /// `kv_usage` column).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn stream_batches(&mut self, path: &Path, num_blocks: u32) -> Result<()> {
        self.sink = Some(BatchSink::create(path, num_blocks)?);
        Ok(())
    }

    /// Folds the records of a collector that simulated a disjoint set of replicas into this
    /// one. Request records are appended (sort them by id before computing a summary);
    /// distributions and per-replica aggregates add exactly.
    pub fn merge(&mut self, other: Collector) {
        self.requests.extend(other.requests);
        self.transfers.extend(other.transfers);
        self.transfer_stats.merge(&other.transfer_stats);
        self.outcomes.merge(other.outcomes);
        self.tbt.merge(&other.tbt);
        let (a, b) = (&mut self.batches, &other.batches);
        a.count += b.count;
        a.size.merge(&b.size);
        a.tokens.merge(&b.tokens);
        a.prefill.merge(&b.prefill);
        a.decode.merge(&b.decode);
        a.latency.merge(&b.latency);
        if a.replicas.len() < b.replicas.len() {
            a.replicas.resize(b.replicas.len(), ReplicaAgg::default());
        }
        for (x, y) in a.replicas.iter_mut().zip(&b.replicas) {
            x.merge(y);
        }
    }

    /// Flushes and closes the batch stream, if any.
    ///
    /// # Errors
    /// A write that failed during the run or now.
    pub fn finish(&mut self) -> Result<()> {
        match self.sink.take() {
            Some(s) => s.close(),
            None => Ok(()),
        }
    }

    /// A request arrived.
    pub fn on_arrival(&mut self, id: RequestId, at: Timestamp) {
        self.live.insert(
            id.0,
            Live {
                last: at,
                ..Live::default()
            },
        );
    }

    /// A request was routed to `replica`.
    pub fn on_routed(&mut self, id: RequestId, replica: u32) {
        if let Some(l) = self.live.get_mut(&id.0) {
            l.replica = replica;
        }
    }

    /// A prefilled request's KV transfer to the decode replica it was routed to was scheduled.
    pub fn on_transfer(&mut self, id: RequestId, t: Transfer) {
        if let Some(l) = self.live.get_mut(&id.0) {
            l.transfer = Some(t);
        }
    }

    /// A request's next output token was produced at `at`.
    #[inline]
    pub fn on_token(&mut self, id: RequestId, at: Timestamp) {
        let deadlines = self.token_deadlines;
        let l = self
            .live
            .get_mut(&id.0)
            .expect("token of a request that arrived and has not finished");
        let gap = at.since(l.last);
        let first = l.tokens == 0;
        if !first {
            l.max_gap = l.max_gap.max(gap);
        }
        if let Some(d) = deadlines {
            l.deadlines.on_token(gap, first, d);
        }
        l.last = at;
        l.tokens += 1;
        if !first {
            self.tbt.add(gap.0);
        }
    }

    /// A request finished (on the replica it was routed to).
    pub fn on_finished(&mut self, rec: &FinishedRecord) {
        let l = self.live.remove(&rec.id.0).unwrap_or_default();
        let rec_class = rec.slo_class;
        let (disagg, arrival, first_scheduled) = (rec.disagg, rec.arrival, rec.first_scheduled);
        let replica = l.replica;
        let n = rec.output_tokens;
        let e2e = rec.finished_at.since(rec.arrival);
        let ttft = rec.first_token.map(|t| t.since(rec.arrival));
        let tpot = match (rec.first_token, n) {
            (Some(f), n) if n >= 2 => {
                Some(rec.finished_at.since(f).as_secs_f64() / f64::from(n - 1))
            }
            _ => None,
        };
        let rec = RequestRecord {
            request_id: rec.id.0,
            replica,
            tenant: rec.tenant.0,
            priority: rec.priority,
            arrival_s: secs(rec.arrival),
            first_scheduled_s: rec.first_scheduled.map(secs),
            first_token_s: rec.first_token.map(secs),
            completed_s: secs(rec.finished_at),
            prompt_tokens: rec.prompt_tokens,
            output_tokens: n,
            cached_prompt_tokens: rec.cached_prompt_tokens,
            preemptions: rec.num_preemptions,
            ttft_s: ttft.map(Duration::as_secs_f64),
            tpot_s: tpot,
            e2e_s: e2e.as_secs_f64(),
            normalized_e2e_s: (n > 0).then(|| e2e.as_secs_f64() / f64::from(n)),
            scheduling_delay_s: rec
                .first_scheduled
                .map(|s| s.since(rec.arrival).as_secs_f64()),
            max_tbt_s: (l.tokens >= 2).then(|| l.max_gap.as_secs_f64()),
            tbt_samples: l.tokens.saturating_sub(1),
            deadline_s: rec.deadline.map(secs),
            token_deadlines: l.deadlines.total,
            token_deadline_misses: l.deadlines.missed,
            finish_reason: rec.reason,
        };
        if let (Some(d), Some(t), Some(first)) = (disagg, l.transfer, first_scheduled) {
            let (prefill_replica, reserved, bytes) = (t.prefill_replica, t.reserved, t.bytes);
            let us = |a: Timestamp, b: Timestamp| b.since(a).0 / 1000;
            let st = &mut self.transfer_stats;
            st.prefill_queue.add(us(arrival, first));
            st.prefill.add(us(first, d.prefill_done));
            st.handoff_wait.add(us(d.prefill_done, reserved));
            st.kv_transfer.add(us(reserved, d.kv_arrived));
            if let Some(s) = d.decode_scheduled {
                st.decode_queue.add(us(d.kv_arrived, s));
            }
            st.bytes += bytes;
            if self.keep_records {
                let s = |a: Timestamp, b: Timestamp| b.since(a).as_secs_f64();
                self.transfers.push(TransferRecord {
                    request_id: rec.request_id,
                    prefill_replica,
                    decode_replica: replica,
                    prefill_queue_s: s(arrival, first),
                    prefill_s: s(first, d.prefill_done),
                    handoff_wait_s: s(d.prefill_done, reserved),
                    kv_transfer_s: s(reserved, d.kv_arrived),
                    kv_transfer_bytes: bytes,
                    link_start_s: secs(t.link.0),
                    link_end_s: secs(t.link.1),
                    decode_queue_s: d.decode_scheduled.map(|t| s(d.kv_arrived, t)),
                    ttft_s: s(arrival, d.kv_arrived),
                });
            }
        }
        self.outcomes.add(&rec, rec_class);
        if self.keep_records {
            self.requests.push(rec);
        }
    }

    /// A batch ended. Batches of one replica arrive in start order.
    pub fn on_batch(&mut self, b: BatchRecord) {
        let st = &mut self.batches;
        st.count += 1;
        st.size.add(u64::from(b.num_requests));
        st.tokens.add(u64::from(b.prefill_tokens + b.decode_tokens));
        st.prefill.add(u64::from(b.prefill_tokens));
        st.decode.add(u64::from(b.decode_tokens));
        st.latency.add(b.end.since(b.start).0 / 1000);
        if let Some(r) = st.replicas.get_mut(b.replica as usize) {
            r.batches += 1;
            r.busy_ns += u128::from(b.busy.0);
            r.flops += b.flops;
            r.bytes += b.bytes;
            r.kv_max_blocks = r.kv_max_blocks.max(b.kv_blocks_used);
            if let Some((s, kv, _)) = r.last {
                let w = b.start.since(s).0;
                r.kv_block_ns += f64::from(kv) * w as f64;
                r.kv_span_ns += w;
            }
            r.last = Some((b.start, b.kv_blocks_used, b.end));
        }
        if let Some(sink) = &mut self.sink {
            sink.push(b);
        }
    }
}
