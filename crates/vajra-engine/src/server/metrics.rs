//! Prometheus metrics of a serving engine (`GET /metrics`), named after vLLM's where one exists:
//! latency histograms (time to first token, inter-token latency, end-to-end), running and
//! waiting gauges, KV-cache usage, preemptions, prefix-cache queries and hits, token counters.
//! Updated by the engine thread after each step; read by the HTTP handler.

use crate::engine::RequestOutput;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use vajra_core::sched::output::SchedulerStats;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

/// The engine's metrics.
#[derive(Clone)]
pub struct EngineMetrics {
    registry: Registry,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    kv_blocks: IntGauge,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    finished: IntCounterVec,
    rejected: IntCounter,
    steps: IntCounter,
    scheduled: IntCounter,
    batched_tokens: IntCounter,
    step_us: IntCounter,
    forward_us: IntCounter,
}

fn hist(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid histogram options")
}

impl EngineMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let m = EngineMetrics {
            registry: Registry::new(),
            ttft: hist(
                "vajra_time_to_first_token_seconds",
                "Time from arrival to the first output token.",
            ),
            itl: hist(
                "vajra_inter_token_latency_seconds",
                "Time between consecutive output tokens of a request.",
            ),
            e2e: hist(
                "vajra_e2e_request_latency_seconds",
                "Time from arrival to the last token of finished requests.",
            ),
            running: IntGauge::new(
                "vajra_num_requests_running",
                "Requests holding KV blocks and being scheduled.",
            )
            .expect("gauge"),
            waiting: IntGauge::new(
                "vajra_num_requests_waiting",
                "Requests waiting to be scheduled.",
            )
            .expect("gauge"),
            kv_usage: Gauge::new(
                "vajra_kv_cache_usage_perc",
                "Fraction of KV blocks held by requests (0 to 1).",
            )
            .expect("gauge"),
            kv_blocks: IntGauge::new("vajra_kv_blocks_allocated", "KV blocks held by requests.")
                .expect("gauge"),
            preemptions: IntCounter::new("vajra_num_preemptions_total", "Requests preempted.")
                .expect("counter"),
            prefix_queries: IntCounter::new(
                "vajra_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            )
            .expect("counter"),
            prefix_hits: IntCounter::new(
                "vajra_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            )
            .expect("counter"),
            prompt_tokens: IntCounter::new(
                "vajra_prompt_tokens_total",
                "Prompt tokens of admitted requests.",
            )
            .expect("counter"),
            generation_tokens: IntCounter::new(
                "vajra_generation_tokens_total",
                "Output tokens generated.",
            )
            .expect("counter"),
            finished: IntCounterVec::new(
                Opts::new(
                    "vajra_request_success_total",
                    "Finished requests by reason.",
                ),
                &["finished_reason"],
            )
            .expect("counter vec"),
            steps: IntCounter::new("vajra_engine_steps_total", "Engine steps that ran a batch.")
                .expect("counter"),
            scheduled: IntCounter::new(
                "vajra_engine_scheduled_requests_total",
                "Sum over steps of the requests in the batch.",
            )
            .expect("counter"),
            batched_tokens: IntCounter::new(
                "vajra_engine_batched_tokens_total",
                "Sum over steps of the tokens in the batch.",
            )
            .expect("counter"),
            step_us: IntCounter::new(
                "vajra_engine_step_microseconds_total",
                "Wall time of engine steps, scheduling to outputs.",
            )
            .expect("counter"),
            forward_us: IntCounter::new(
                "vajra_engine_forward_microseconds_total",
                "Part of the step time spent in the backend's forward pass.",
            )
            .expect("counter"),
            rejected: IntCounter::new(
                "vajra_requests_rejected_total",
                "Requests answered 429 because the concurrency limit was reached.",
            )
            .expect("counter"),
        };
        let r = &m.registry;
        for c in [&m.ttft, &m.itl, &m.e2e] {
            r.register(Box::new(c.clone())).expect("unique metric");
        }
        for g in [&m.running, &m.waiting, &m.kv_blocks] {
            r.register(Box::new(g.clone())).expect("unique metric");
        }
        r.register(Box::new(m.kv_usage.clone()))
            .expect("unique metric");
        for c in [
            &m.preemptions,
            &m.prefix_queries,
            &m.prefix_hits,
            &m.prompt_tokens,
            &m.generation_tokens,
            &m.rejected,
            &m.steps,
            &m.scheduled,
            &m.batched_tokens,
            &m.step_us,
            &m.forward_us,
        ] {
            r.register(Box::new(c.clone())).expect("unique metric");
        }
        r.register(Box::new(m.finished.clone()))
            .expect("unique metric");
        m
    }

    /// Records one request's step output.
    pub fn observe(&self, o: &RequestOutput) {
        if let Some(t) = o.ttft {
            self.ttft.observe(t.as_secs_f64());
        }
        if let Some(t) = o.itl {
            self.itl.observe(t.as_secs_f64());
        }
        self.generation_tokens.inc_by(o.tokens.len() as u64);
        if let Some(rec) = &o.record {
            self.e2e
                .observe(rec.finished_at.since(rec.arrival).as_secs_f64());
            let reason = match rec.reason {
                vajra_core::request::FinishReason::Length => "length",
                vajra_core::request::FinishReason::Stop => "stop",
                vajra_core::request::FinishReason::Abort => "abort",
                vajra_core::request::FinishReason::Rejected => "rejected",
            };
            self.finished.with_label_values(&[reason]).inc();
        }
    }

    /// A request was admitted with this many prompt tokens.
    pub fn admitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// A request was refused by the concurrency limit.
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// Refreshes gauges and cumulative counters from the scheduler and the engine.
    pub fn update(&self, s: &SchedulerStats, c: crate::engine::StepCounters) {
        catch_up(&self.steps, c.steps);
        catch_up(&self.scheduled, c.scheduled_requests);
        catch_up(&self.batched_tokens, c.batched_tokens);
        catch_up(&self.step_us, c.step_ns / 1000);
        catch_up(&self.forward_us, c.forward_ns / 1000);
        self.running.set(i64::from(s.num_running));
        self.waiting.set(i64::from(s.num_waiting));
        self.kv_usage.set(s.kv.usage);
        self.kv_blocks
            .set(i64::from(s.kv.num_blocks - s.kv.num_free));
        catch_up(&self.preemptions, s.num_preemptions);
        catch_up(&self.prefix_queries, s.kv.prefix_query_tokens);
        catch_up(&self.prefix_hits, s.kv.prefix_hit_tokens);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Advances a counter to a cumulative total kept elsewhere.
fn catch_up(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}
