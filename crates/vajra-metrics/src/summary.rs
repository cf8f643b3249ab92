//! Run-level metrics from a [`Collector`].

use crate::collector::Collector;
use crate::outcomes::{distribution, distribution_where};
use crate::slo::SloConfig;
use crate::stats::Distribution;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Facts about the cluster that metrics normalise by.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterFacts {
    /// Replicas.
    pub num_replicas: u32,
    /// Pipeline stages per replica.
    pub stages: u32,
    /// KV blocks per replica.
    pub num_blocks: u32,
    /// Peak dense FLOP/s of one replica (all its devices).
    pub peak_flops: f64,
    /// Peak memory bandwidth of one replica in bytes/s (all its devices).
    pub peak_bytes_per_s: f64,
    /// Requests issued (completed or not).
    pub issued: u64,
    /// Requests whose prompt + output the workload clipped to the longest sequence allowed.
    pub clipped: u64,
    /// The pools of a disaggregated cluster, in replica order (empty: every replica has the
    /// shape above). A pool's replicas use its own blocks, stages and peaks.
    pub pools: Vec<PoolFacts>,
}

/// One pool of a disaggregated cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFacts {
    /// `prefill` or `decode`.
    pub role: String,
    /// Replicas in it (they follow the previous pool's).
    pub num_replicas: u32,
    /// Pipeline stages per replica.
    pub stages: u32,
    /// KV blocks per replica.
    pub num_blocks: u32,
    /// Peak dense FLOP/s of one replica.
    pub peak_flops: f64,
    /// Peak memory bandwidth of one replica (bytes/s).
    pub peak_bytes_per_s: f64,
    /// Devices per replica.
    pub devices_per_replica: u32,
}

/// One pool's share of a disaggregated run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSummary {
    /// `prefill` or `decode`.
    pub role: String,
    /// Replicas.
    pub num_replicas: u32,
    /// Devices (replicas × devices per replica).
    pub num_devices: u32,
    /// Mean busy fraction of its replicas.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub busy_fraction: f64,
    /// Mean time-weighted KV usage of its replicas.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_mean: f64,
    /// Largest KV usage of any of its replicas.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_max: f64,
}

/// TTFT in parts and the KV transfers of a disaggregated run (seconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisaggSummary {
    /// Requests handed from a prefill to a decode replica and finished.
    pub requests: u64,
    /// Arrival to first scheduled on the prefill replica.
    pub prefill_queue: Distribution,
    /// First scheduled to first token on the prefill replica.
    pub prefill: Distribution,
    /// First token to blocks reserved on a decode replica (waiting for decode room).
    pub handoff_wait: Distribution,
    /// Blocks reserved to KV arrived (link queueing, the exposed transfer, latency).
    pub kv_transfer: Distribution,
    /// KV arrived to first decode step.
    pub decode_queue: Distribution,
    /// KV bytes sent in all.
    pub kv_bytes: f64,
}

/// Latency distributions, seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latencies {
    /// Time to first token.
    pub ttft: Distribution,
    /// Pooled gaps between consecutive output tokens.
    pub tbt: Distribution,
    /// Per-request (E2E − TTFT)/(n − 1), requests with n ≥ 2.
    pub tpot: Distribution,
    /// End to end.
    pub e2e: Distribution,
    /// E2E / output tokens.
    pub normalized_e2e: Distribution,
    /// First scheduled − arrival.
    pub scheduling_delay: Distribution,
}

/// Throughput over the run's span (first arrival to last completion).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Throughput {
    /// Completed requests per second.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub requests_per_s: f64,
    /// Output tokens per second.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub output_tokens_per_s: f64,
    /// Prompt + output tokens per second.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub total_tokens_per_s: f64,
}

/// SLO results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SloResult {
    /// Requests meeting every per-request SLO given (all requests when none is given).
    pub good_requests: u64,
    /// Good requests per second.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub goodput_rps: f64,
    /// Fraction of completed requests that are good.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub attainment: f64,
    /// Each run-level limit: name, limit, measured value, met.
    pub limits: Vec<SloLimit>,
    /// Whether every run-level limit is met.
    pub all_limits_met: bool,
}

/// One run-level SLO check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SloLimit {
    /// Which metric.
    pub metric: String,
    /// The limit.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub limit: f64,
    /// What the run measured.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub value: f64,
    /// `value ≤ limit`.
    pub met: bool,
}

/// Deadline metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deadlines {
    /// Requests with a completion deadline.
    pub requests_with_deadline: u64,
    /// Fraction of those that completed after it.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub request_deadline_miss_rate: f64,
    /// Etalon: missed / counted token deadlines over all requests (0 when off).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub token_deadline_miss_rate: f64,
    /// Etalon: per-request fluidity index (1 − the request's miss rate).
    pub fluidity_index: Distribution,
}

/// Batch distributions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batches {
    /// Number of batches (scheduler steps that ran something).
    pub count: u64,
    /// Requests per batch.
    pub size: Distribution,
    /// Tokens per batch.
    pub tokens: Distribution,
    /// Prompt tokens per batch.
    pub prefill_tokens: Distribution,
    /// Output tokens per batch.
    pub decode_tokens: Distribution,
    /// Batch latency, schedule to last stage end (s).
    pub latency_s: Distribution,
}

/// One replica's utilisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaSummary {
    /// Replica id.
    pub replica: u32,
    /// Requests it completed.
    pub requests: u64,
    /// Batches it ran.
    pub batches: u64,
    /// Stage busy time / (stages × run span).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub busy_fraction: f64,
    /// Time-weighted mean fraction of KV blocks in use.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_mean: f64,
    /// Largest fraction of KV blocks in use.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_max: f64,
    /// Model FLOPs utilisation while busy.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub mfu: f64,
    /// Memory-bandwidth utilisation while busy.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub mbu: f64,
}

/// One tenant's share of the service (multi-tenant runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantSummary {
    /// Tenant id (index in the workload's tenant list).
    pub tenant: u32,
    /// Requests completed.
    pub completed: u64,
    /// Prompt plus output tokens served.
    pub tokens_served: u64,
    /// Time to first token (s).
    pub ttft: Distribution,
    /// End-to-end latency (s).
    pub e2e: Distribution,
    /// Fraction of its requests meeting every per-request SLO.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub slo_attainment: f64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// One SLO class's service (runs that define `[[slo.classes]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassSummary {
    /// Class index (as tenants' `slo_class`).
    pub class: u32,
    /// Its name.
    pub name: String,
    /// Requests of the class completed.
    pub completed: u64,
    /// Those meeting the class's targets.
    pub good_requests: u64,
    /// Requests of the class rejected as late (not in `completed`).
    #[serde(default)]
    pub rejected: u64,
    /// Good requests of the class per second of the run.
    pub goodput_rps: f64,
    /// Fraction of the class's requests meeting its targets (0 when it has none).
    pub attainment: f64,
    /// Time to first token (s).
    pub ttft: Distribution,
    /// Time per output token (s).
    pub tpot: Distribution,
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Requests issued.
    pub requests_issued: u64,
    /// Requests completed.
    pub requests_completed: u64,
    /// Requests whose prompt + output were clipped to the longest sequence allowed
    /// (`model.max_model_len`, `workload.max_tokens`) before they were issued.
    #[serde(default)]
    pub requests_clipped: u64,
    /// Requests the scheduler rejected, unserved, once they could no longer meet their TTFT
    /// target (`scheduler.late_requests = "reject"`); not in `requests_completed`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests_rejected: u64,
    /// Prompt tokens of completed requests.
    pub prompt_tokens: u64,
    /// Output tokens of completed requests.
    pub output_tokens: u64,
    /// First arrival to last completion (s).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub duration_s: f64,
    /// Throughput.
    pub throughput: Throughput,
    /// Latencies (s).
    pub latency_s: Latencies,
    /// Total preemptions.
    pub preemptions: u64,
    /// Requests preempted at least once.
    pub requests_preempted: u64,
    /// Cached prompt tokens / prompt tokens.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub prefix_cache_hit_rate: f64,
    /// SLOs.
    pub slo: SloResult,
    /// Deadlines.
    pub deadlines: Deadlines,
    /// Batches.
    pub batches: Batches,
    /// Per replica.
    pub replicas: Vec<ReplicaSummary>,
    /// Per tenant (empty with a single tenant).
    pub tenants: Vec<TenantSummary>,
    /// Per SLO class (absent when the run defines none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassSummary>,
    /// Mean over replicas of their time-weighted KV usage.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_mean: f64,
    /// Largest KV usage of any replica.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub kv_usage_max: f64,
    /// Mean MFU over replicas' busy time (FLOPs / (busy × peak)).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub mfu: f64,
    /// Mean MBU over replicas' busy time.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub mbu: f64,
    /// Per pool (disaggregated runs only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSummary>,
    /// TTFT in parts and KV transfers (disaggregated runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<DisaggSummary>,
}

/// A run folder's `summary.json`: the run's name and point, and its metrics. The engine's
/// served runs and `bench` write it as it is; the simulator writes the same keys with its
/// `setup` between (which readers skip). So a renamed metric is a compile error in the reader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SummaryFile {
    /// Experiment name.
    #[serde(default)]
    pub name: String,
    /// Sweep point label, `measured` or `served` (empty for a single simulated point).
    #[serde(default)]
    pub point: String,
    /// Root seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `measured` (bench) or `served` (a served run); absent for a simulated run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// What the benchmark client counted (bench runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<BenchFacts>,
    /// The metrics.
    #[serde(flatten)]
    pub metrics: Summary,
}

/// What `vajra-engine bench` counts besides the simulator's metrics (`summary.json`'s `bench`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchFacts {
    /// Server URL.
    pub url: String,
    /// Model name sent.
    pub model: String,
    /// Requests sent.
    pub sent: u64,
    /// Requests that completed and are in the metrics.
    pub completed: u64,
    /// Failed requests by reason (`connect`, `status 429`, `timeout`, `stream`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Completed requests whose output length differs from the target (`ignore_eos` ignored
    /// by the server, or a stop it enforced).
    pub length_mismatches: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Engine steps during the run, from the server's Prometheus counters (vajra servers).
    #[serde(default)]
    pub server_steps: Option<u64>,
    /// Mean requests per step, from the same counters.
    #[serde(default)]
    pub server_mean_batch_size: Option<f64>,
    /// Mean tokens per step, from the same counters.
    #[serde(default)]
    pub server_mean_batch_tokens: Option<f64>,
    /// Mean wall time of a step on the server, ms (scheduling, forward, sampling, detokenizing).
    #[serde(default)]
    pub server_mean_step_ms: Option<f64>,
    /// Mean time of a step's forward pass, ms; the rest of the step is CPU overhead.
    #[serde(default)]
    pub server_mean_forward_ms: Option<f64>,
    /// Session turns whose answer came back without token ids (`return_token_ids`): their next
    /// turns carried synthetic answers.
    #[serde(default)]
    pub answers_without_token_ids: u64,
    /// Completed requests whose usage did not say how many prompt tokens the prefix cache
    /// served (`prompt_tokens_details.cached_tokens`): counted as none, so the run's prefix hit
    /// rate is a lower bound when this is not 0.
    #[serde(default)]
    pub cached_tokens_unknown: u64,
}

impl Summary {
    /// Computes the summary.
    pub fn compute(c: &Collector, slo: &SloConfig, facts: &ClusterFacts) -> Self {
        let o = &c.outcomes;
        let completed = o.len() as u64;
        let duration = if o.is_empty() {
            0.0
        } else {
            (o.last_done_s - o.first_arrival_s).max(0.0)
        };
        let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
        let (prompt_tokens, output_tokens) = (o.prompt_tokens, o.output_tokens);
        // A request of a defined class is judged by its class's targets.
        let good = |i: usize| {
            let (ttft, tpot, e2e) = slo.targets(o.class_of(i));
            o.good(i, ttft, tpot, e2e)
        };
        let good_requests = (0..o.len()).filter(|&i| good(i)).count() as u64;

        let latency = Latencies {
            ttft: distribution(&o.ttft),
            tbt: c.tbt.distribution(1e-9),
            tpot: distribution(&o.tpot),
            e2e: distribution(&o.e2e),
            normalized_e2e: distribution(&o.normalized_e2e),
            scheduling_delay: distribution(&o.scheduling_delay),
        };

        let deadlines = Deadlines {
            requests_with_deadline: o.with_deadline,
            request_deadline_miss_rate: if o.with_deadline == 0 {
                0.0
            } else {
                o.missed_deadline as f64 / o.with_deadline as f64
            },
            token_deadline_miss_rate: if o.token_deadlines == 0 {
                0.0
            } else {
                o.token_deadline_misses as f64 / o.token_deadlines as f64
            },
            fluidity_index: if o.token_deadlines == 0 {
                Distribution::default()
            } else {
                distribution(&o.fluidity)
            },
        };

        let mut limits = Vec::new();
        let mut check = |metric: &str, limit: Option<f64>, value: f64| {
            if let Some(l) = limit {
                limits.push(SloLimit {
                    metric: metric.into(),
                    limit: l,
                    value,
                    met: value <= l,
                });
            }
        };
        check("p99_ttft_s", slo.p99_ttft_s, latency.ttft.p99);
        check("p99_tbt_s", slo.p99_tbt_s, latency.tbt.p99);
        check(
            "p50_scheduling_delay_s",
            slo.p50_scheduling_delay_s,
            latency.scheduling_delay.p50,
        );
        check(
            "deadline_miss_rate",
            slo.max_deadline_miss_rate,
            deadlines.token_deadline_miss_rate,
        );
        let all_limits_met = limits.iter().all(|l| l.met) && completed == facts.issued;

        let bs = &c.batches;
        let batches = Batches {
            count: bs.count,
            size: bs.size.distribution(1.0),
            tokens: bs.tokens.distribution(1.0),
            prefill_tokens: bs.prefill.distribution(1.0),
            decode_tokens: bs.decode.distribution(1.0),
            latency_s: bs.latency.distribution(1e-6),
        };

        let replicas = replica_summaries(c, facts, duration);
        let pools = pool_summaries(&replicas, facts);
        let disaggregation = disagg_summary(c);
        let tenant_ids: Vec<u32> = o.tokens_by_tenant.keys().copied().collect();
        let tenants = if tenant_ids.len() > 1 {
            tenant_ids
                .iter()
                .map(|&t| {
                    let mine = |i: usize| o.tenant[i] == t;
                    let rows: Vec<usize> = (0..o.len()).filter(|&i| mine(i)).collect();
                    let n_good = rows.iter().filter(|&&i| good(i)).count();
                    TenantSummary {
                        tenant: t,
                        completed: rows.len() as u64,
                        tokens_served: o.tenant_tokens(t),
                        ttft: distribution_where(&o.ttft, mine),
                        e2e: distribution_where(&o.e2e, mine),
                        slo_attainment: n_good as f64 / rows.len().max(1) as f64,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let classes = slo
            .classes
            .iter()
            .enumerate()
            .map(|(c, def)| {
                let c = c as u32;
                let mine = |i: usize| o.class_of(i) == Some(c);
                let rows: Vec<usize> = (0..o.len()).filter(|&i| mine(i)).collect();
                let good_requests = rows.iter().filter(|&&i| good(i)).count() as u64;
                let rejected = o.rejected_by_class.get(&c).copied().unwrap_or(0);
                let offered = rows.len() as u64 + rejected;
                ClassSummary {
                    class: c,
                    name: def.name.clone(),
                    completed: rows.len() as u64,
                    good_requests,
                    rejected,
                    goodput_rps: per_s(good_requests as f64),
                    attainment: if offered == 0 {
                        0.0
                    } else {
                        good_requests as f64 / offered as f64
                    },
                    ttft: distribution_where(&o.ttft, mine),
                    tpot: distribution_where(&o.tpot, mine),
                }
            })
            .collect();
        let busy_total: f64 = bs.replicas.iter().map(|r| r.busy_ns as f64 * 1e-9).sum();
        let flops: f64 = bs.replicas.iter().map(|r| r.flops).sum();
        let bytes: f64 = bs.replicas.iter().map(|r| r.bytes).sum();
        let stage_busy = busy_total / f64::from(facts.stages.max(1));
        // An unknown peak (a served or benchmarked run: 0) makes the ratio unknown, not 0.
        let ratio = |x: f64, peak: f64| {
            if peak <= 0.0 {
                f64::NAN
            } else if stage_busy > 0.0 {
                x / (stage_busy * peak)
            } else {
                0.0
            }
        };
        Summary {
            requests_issued: facts.issued,
            requests_clipped: facts.clipped,
            requests_rejected: o.rejected,
            requests_completed: completed,
            prompt_tokens,
            output_tokens,
            duration_s: duration,
            throughput: Throughput {
                requests_per_s: per_s(completed as f64),
                output_tokens_per_s: per_s(output_tokens as f64),
                total_tokens_per_s: per_s((prompt_tokens + output_tokens) as f64),
            },
            latency_s: latency,
            preemptions: o.preemptions,
            requests_preempted: o.requests_preempted,
            prefix_cache_hit_rate: if prompt_tokens == 0 {
                0.0
            } else {
                o.cached_prompt_tokens as f64 / prompt_tokens as f64
            },
            slo: SloResult {
                good_requests,
                goodput_rps: per_s(good_requests as f64),
                // A rejected request was not served well.
                attainment: if o.is_empty() && o.rejected == 0 {
                    0.0
                } else {
                    good_requests as f64 / (completed + o.rejected) as f64
                },
                limits,
                all_limits_met,
            },
            deadlines,
            batches,
            // No pool size (a benchmarked server's is not known): unknown, not 0.
            kv_usage_mean: if facts.num_blocks == 0 {
                f64::NAN
            } else if replicas.is_empty() {
                0.0
            } else {
                replicas.iter().map(|r| r.kv_usage_mean).sum::<f64>() / replicas.len() as f64
            },
            kv_usage_max: if facts.num_blocks == 0 {
                f64::NAN
            } else {
                replicas.iter().map(|r| r.kv_usage_max).fold(0.0, f64::max)
            },
            replicas,
            tenants,
            classes,
            mfu: ratio(flops, facts.peak_flops),
            mbu: ratio(bytes, facts.peak_bytes_per_s),
            pools,
            disaggregation,
        }
    }
}

/// Each pool's replicas, aggregated.
fn pool_summaries(replicas: &[ReplicaSummary], facts: &ClusterFacts) -> Vec<PoolSummary> {
    let mut first = 0usize;
    facts
        .pools
        .iter()
        .map(|p| {
            let n = p.num_replicas as usize;
            let rs = &replicas[first.min(replicas.len())..(first + n).min(replicas.len())];
            first += n;
            let mean = |f: &dyn Fn(&ReplicaSummary) -> f64| {
                if rs.is_empty() {
                    0.0
                } else {
                    rs.iter().map(f).sum::<f64>() / rs.len() as f64
                }
            };
            PoolSummary {
                role: p.role.clone(),
                num_replicas: p.num_replicas,
                num_devices: p.num_replicas * p.devices_per_replica,
                busy_fraction: mean(&|r| r.busy_fraction),
                kv_usage_mean: mean(&|r| r.kv_usage_mean),
                kv_usage_max: rs.iter().map(|r| r.kv_usage_max).fold(0.0, f64::max),
            }
        })
        .collect()
}

/// The hand-off distributions, when any request was handed off.
fn disagg_summary(c: &Collector) -> Option<DisaggSummary> {
    let t = &c.transfer_stats;
    (!t.prefill_queue.is_empty()).then(|| DisaggSummary {
        requests: t.prefill_queue.len(),
        prefill_queue: t.prefill_queue.distribution(1e-6),
        prefill: t.prefill.distribution(1e-6),
        handoff_wait: t.handoff_wait.distribution(1e-6),
        kv_transfer: t.kv_transfer.distribution(1e-6),
        decode_queue: t.decode_queue.distribution(1e-6),
        kv_bytes: t.bytes,
    })
}

fn replica_summaries(c: &Collector, facts: &ClusterFacts, duration: f64) -> Vec<ReplicaSummary> {
    let requests = &c.outcomes.per_replica;
    // Each replica's pool shape (one shape without pools).
    let mut shapes = Vec::new();
    for p in &facts.pools {
        for _ in 0..p.num_replicas {
            shapes.push((p.num_blocks, p.stages, p.peak_flops, p.peak_bytes_per_s));
        }
    }
    c.batches
        .replicas
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (num_blocks, stages, peak_flops, peak_bytes_per_s) =
                shapes.get(i).copied().unwrap_or((
                    facts.num_blocks,
                    facts.stages,
                    facts.peak_flops,
                    facts.peak_bytes_per_s,
                ));
            let blocks = f64::from(num_blocks.max(1));
            let stages = f64::from(stages.max(1));
            let busy = a.busy_ns as f64 * 1e-9 / stages;
            let (kv_int, kv_span) = a.kv_totals();
            ReplicaSummary {
                replica: i as u32,
                requests: requests.get(i).copied().unwrap_or(0),
                batches: a.batches,
                busy_fraction: if duration > 0.0 { busy / duration } else { 0.0 },
                kv_usage_mean: if kv_span > 0 {
                    kv_int / kv_span as f64 / blocks
                } else {
                    0.0
                },
                kv_usage_max: f64::from(a.kv_max_blocks) / blocks,
                mfu: if peak_flops <= 0.0 {
                    f64::NAN
                } else if busy > 0.0 {
                    a.flops / (busy * peak_flops)
                } else {
                    0.0
                },
                mbu: if peak_bytes_per_s <= 0.0 {
                    f64::NAN
                } else if busy > 0.0 {
                    a.bytes / (busy * peak_bytes_per_s)
                } else {
                    0.0
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::Collector;
    use vajra_core::ids::{RequestId, TenantId};
    use vajra_core::request::FinishReason;
    use vajra_core::sched::output::FinishedRecord;
    use vajra_core::time::Timestamp;

    #[test]
    fn a_written_summary_reads_back_typed_with_nan_for_null() {
        let mut c = Collector::new(&SloConfig::default(), 1);
        let id = RequestId(1);
        c.on_arrival(id, Timestamp(0));
        for t in [10, 20, 35] {
            c.on_token(id, Timestamp(t * 1_000_000));
        }
        c.on_finished(&FinishedRecord {
            id,
            reason: FinishReason::Length,
            tenant: TenantId(0),
            priority: 0,
            slo_class: None,
            arrival: Timestamp(0),
            deadline: None,
            first_scheduled: Some(Timestamp(1_000_000)),
            first_token: Some(Timestamp(10_000_000)),
            finished_at: Timestamp(35_000_000),
            prompt_tokens: 8,
            output_tokens: 3,
            cached_prompt_tokens: 4,
            num_preemptions: 1,
            disagg: None,
        });
        let facts = ClusterFacts {
            num_replicas: 1,
            stages: 1,
            num_blocks: 16,
            peak_flops: 0.0,
            peak_bytes_per_s: 0.0,
            pools: Vec::new(),
            clipped: 0,
            issued: 1,
        };
        let s = Summary::compute(&c, &SloConfig::default(), &facts);
        let mut json = serde_json::to_value(&s).unwrap();
        json["name"] = "x".into();
        json["setup"] = serde_json::json!({"ignored": true});
        json["mbu"] = serde_json::Value::Null; // how serde_json writes a NaN
        let back: SummaryFile = serde_json::from_value(json).expect("reads back");
        assert_eq!(back.name, "x");
        assert_eq!(back.metrics.requests_completed, 1);
        assert_eq!(back.metrics.preemptions, 1);
        assert_eq!(back.metrics.latency_s.ttft, s.latency_s.ttft);
        assert!(back.metrics.mbu.is_nan(), "null reads back as NaN");
        assert!((back.metrics.prefix_cache_hit_rate - 0.5).abs() < 1e-12);
    }

    /// Facts of a 3-replica cluster of 16 blocks each that was offered `issued` requests.
    fn three_replicas(issued: u64) -> ClusterFacts {
        ClusterFacts {
            num_replicas: 3,
            stages: 1,
            num_blocks: 16,
            peak_flops: 0.0,
            peak_bytes_per_s: 0.0,
            pools: Vec::new(),
            clipped: 0,
            issued,
        }
    }

    /// Feeds request `i` (varied tenants, lengths, deadlines, a one-token answer, an answer
    /// aborted before its first token) into `c` on replica `i % 3`.
    fn feed(c: &mut Collector, i: u64) {
        let id = RequestId(i);
        let t0 = i * 3_000_000;
        c.on_arrival(id, Timestamp(t0));
        c.on_routed(id, (i % 3) as u32);
        let n = if i.is_multiple_of(11) {
            0
        } else {
            1 + (i * 7) % 5
        } as u32;
        let mut t = t0 + 2_000_000 + (i % 4) * 1_000_000;
        let first = (n > 0).then_some(Timestamp(t));
        for k in 0..n {
            if k > 0 {
                t += 1_000_000 * (1 + (i + u64::from(k)) % 3);
            }
            c.on_token(id, Timestamp(t));
        }
        c.on_finished(&FinishedRecord {
            id,
            reason: FinishReason::Length,
            tenant: TenantId((i % 2) as u32),
            priority: 0,
            slo_class: Some((i % 2) as u32),
            arrival: Timestamp(t0),
            deadline: i.is_multiple_of(3).then_some(Timestamp(t0 + 6_000_000)),
            first_scheduled: Some(Timestamp(t0 + 1_000_000)),
            first_token: first,
            finished_at: Timestamp(t + 1),
            prompt_tokens: 10 + i as u32,
            output_tokens: n,
            cached_prompt_tokens: (i % 4) as u32,
            num_preemptions: u32::from(i.is_multiple_of(5)),
            disagg: None,
        });
    }

    #[test]
    fn the_summary_is_the_same_with_or_without_records_and_in_any_merge_order() {
        let slo = SloConfig {
            ttft_s: Some(0.004),
            tpot_s: Some(0.0015),
            ttft_deadline_s: Some(0.004),
            tbt_deadline_s: Some(0.0015),
            ..SloConfig::default()
        };
        let facts = three_replicas(60);
        let json =
            |c: &Collector| serde_json::to_string(&Summary::compute(c, &slo, &facts)).unwrap();
        let mut whole = Collector::new(&slo, 3);
        (0..60).for_each(|i| feed(&mut whole, i));
        let mut lean = Collector::new(&slo, 3).without_records();
        (0..60).for_each(|i| feed(&mut lean, i));
        assert!(lean.requests.is_empty() && whole.requests.len() == 60);
        assert_eq!(json(&whole), json(&lean));

        let part = |range: std::ops::Range<u64>| {
            let mut c = Collector::new(&slo, 3).without_records();
            range.for_each(|i| feed(&mut c, i));
            c
        };
        let (mut ab, mut ba) = (part(0..25), part(25..60));
        ab.merge(part(25..60));
        ba.merge(part(0..25));
        assert_eq!(json(&ab), json(&whole));
        assert_eq!(json(&ba), json(&whole));

        let s = Summary::compute(&whole, &slo, &facts);
        let r = &whole.requests;
        assert_eq!(
            s.latency_s.ttft.count,
            r.iter().filter(|q| q.ttft_s.is_some()).count() as u64
        );
        assert_eq!(
            s.latency_s.tpot.count,
            r.iter().filter(|q| q.tpot_s.is_some()).count() as u64
        );
        assert_eq!(s.latency_s.e2e.count, 60);
        assert_eq!(s.tenants.len(), 2);
        assert_eq!(
            s.tenants[1].tokens_served,
            r.iter()
                .filter(|q| q.tenant == 1)
                .map(|q| u64::from(q.prompt_tokens + q.output_tokens))
                .sum::<u64>()
        );
        assert_eq!(
            s.replicas.iter().map(|x| x.requests).collect::<Vec<_>>(),
            vec![20, 20, 20]
        );
        assert_eq!(s.deadlines.requests_with_deadline, 20);
        assert!(s.deadlines.fluidity_index.count > 0);
        let good = r
            .iter()
            .filter(|q| q.ttft_s.is_some_and(|x| x <= 0.004) && q.tpot_s.unwrap_or(0.0) <= 0.0015)
            .count() as u64;
        assert!(good > 0 && good < 60, "the SLO splits the requests: {good}");
        assert_eq!(s.slo.good_requests, good);
    }

    #[test]
    fn a_request_of_a_class_is_judged_by_its_class_targets_and_reported_per_class() {
        let slo = SloConfig {
            // The run-level target would pass everything; the classes decide instead.
            ttft_s: Some(100.0),
            classes: vec![
                crate::slo::SloClass {
                    name: "interactive".into(),
                    ttft_s: Some(1e-6),
                    ..Default::default()
                },
                crate::slo::SloClass {
                    name: "batch".into(),
                    e2e_s: Some(100.0),
                    ..Default::default()
                },
            ],
            ..SloConfig::default()
        };
        slo.validate().unwrap();
        let facts = three_replicas(40);
        let mut c = Collector::new(&slo, 3).without_records();
        (0..40).for_each(|i| feed(&mut c, i)); // even ids are class 0, odd class 1
        let s = Summary::compute(&c, &slo, &facts);
        let names: Vec<&str> = s.classes.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["interactive", "batch"]);
        assert_eq!((s.classes[0].completed, s.classes[1].completed), (20, 20));
        assert_eq!(
            s.classes[0].attainment, 0.0,
            "1 µs TTFT: no interactive request is good"
        );
        assert_eq!(s.classes[1].attainment, 1.0);
        assert_eq!(s.slo.good_requests, 20);
        // Without classes the same run is judged by the run-level target alone.
        let plain = SloConfig {
            ttft_s: Some(100.0),
            ..SloConfig::default()
        };
        let mut c = Collector::new(&plain, 3);
        (0..40).for_each(|i| feed(&mut c, i));
        let s = Summary::compute(&c, &plain, &facts);
        assert!(s.classes.is_empty());
        let with_ttft = c.requests.iter().filter(|r| r.ttft_s.is_some()).count() as u64;
        assert_eq!(s.slo.good_requests, with_ttft);
        // Duplicate or empty names are refused by name.
        let mut dup = slo.clone();
        dup.classes[1].name = "interactive".into();
        assert!(
            dup.validate()
                .unwrap_err()
                .to_string()
                .contains("slo.classes[1].name")
        );
    }
}
