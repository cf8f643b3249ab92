//! What the summary and the CDFs need of the finished requests, and nothing more.
//!
//! A [`crate::RequestRecord`] is about 180 bytes; at ten million requests the records alone
//! outgrow the memory of the machine that simulates them. Exact percentiles need every value,
//! not every record, so [`Outcomes`] keeps one column per latency (8 bytes a request each),
//! the tenant (4 bytes) and running totals for everything that is a sum, a count or an extreme.
//! The per-request records are kept besides only when a request table is written.

use crate::RequestRecord;
use crate::stats::Distribution;
use std::collections::BTreeMap;
use vajra_core::request::FinishReason;

/// Latency columns, one entry per finished request in completion order (aligned across
/// columns; `NaN` where a request has no value, e.g. no TPOT for a one-token answer), and the
/// totals the summary reports.
#[derive(Debug, Clone)]
pub struct Outcomes {
    /// Time to first token (s).
    pub ttft: Vec<f64>,
    /// Time per output token after the first (s).
    pub tpot: Vec<f64>,
    /// End-to-end latency (s); every request has one.
    pub e2e: Vec<f64>,
    /// E2E / output tokens (s).
    pub normalized_e2e: Vec<f64>,
    /// First scheduled − arrival (s).
    pub scheduling_delay: Vec<f64>,
    /// Tenant of each request.
    pub tenant: Vec<u32>,
    /// SLO class of each request ([`NO_CLASS`] for none); kept only when the run defines
    /// classes (see [`Outcomes::with_classes`]), else empty.
    pub class: Vec<u32>,
    track_classes: bool,
    /// Etalon fluidity (1 − missed / counted token deadlines), requests with token deadlines
    /// only (not aligned with the other columns).
    pub fluidity: Vec<f64>,
    /// Earliest arrival (s); `+∞` when empty.
    pub first_arrival_s: f64,
    /// Latest completion (s).
    pub last_done_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Preemptions, summed.
    pub preemptions: u64,
    /// Requests preempted at least once.
    pub requests_preempted: u64,
    /// Requests with a deadline.
    pub with_deadline: u64,
    /// Requests that completed after their deadline.
    pub missed_deadline: u64,
    /// Etalon token deadlines counted.
    pub token_deadlines: u64,
    /// Etalon token deadlines missed.
    pub token_deadline_misses: u64,
    /// Requests completed per replica.
    pub per_replica: Vec<u64>,
    /// Prompt + output tokens served per tenant.
    pub tokens_by_tenant: BTreeMap<u32, u64>,
    /// Requests the scheduler rejected as late (not in any column above).
    pub rejected: u64,
    /// Of those, per SLO class.
    pub rejected_by_class: BTreeMap<u32, u64>,
}

/// The class column's entry for a request without an SLO class.
pub const NO_CLASS: u32 = u32::MAX;

/// A NaN stands for "no value" in a column.
fn or_nan(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

impl Default for Outcomes {
    fn default() -> Self {
        Outcomes::new(0)
    }
}

impl Outcomes {
    /// Empty, for `num_replicas` replicas.
    pub fn new(num_replicas: u32) -> Self {
        Outcomes {
            ttft: Vec::new(),
            tpot: Vec::new(),
            e2e: Vec::new(),
            normalized_e2e: Vec::new(),
            scheduling_delay: Vec::new(),
            tenant: Vec::new(),
            class: Vec::new(),
            track_classes: false,
            fluidity: Vec::new(),
            first_arrival_s: f64::INFINITY,
            last_done_s: 0.0,
            prompt_tokens: 0,
            output_tokens: 0,
            cached_prompt_tokens: 0,
            preemptions: 0,
            requests_preempted: 0,
            with_deadline: 0,
            missed_deadline: 0,
            token_deadlines: 0,
            token_deadline_misses: 0,
            per_replica: vec![0; num_replicas as usize],
            tokens_by_tenant: BTreeMap::new(),
            rejected: 0,
            rejected_by_class: BTreeMap::new(),
        }
    }

    /// Also keeps each request's SLO class (4 bytes a request).
    #[must_use]
    pub fn with_classes(mut self) -> Self {
        self.track_classes = true;
        self
    }

    /// The SLO class of request `i`, if classes are kept and it has one.
    pub fn class_of(&self, i: usize) -> Option<u32> {
        self.class.get(i).copied().filter(|&c| c != NO_CLASS)
    }

    /// Requests recorded.
    pub fn len(&self) -> usize {
        self.e2e.len()
    }

    /// Whether none is recorded.
    pub fn is_empty(&self) -> bool {
        self.e2e.is_empty()
    }

    /// Records one finished request of SLO class `class`.
    pub fn add(&mut self, r: &RequestRecord, class: Option<u32>) {
        if r.finish_reason == FinishReason::Rejected {
            // Unserved: counted, but no latency of it is real.
            self.rejected += 1;
            if let Some(c) = class {
                *self.rejected_by_class.entry(c).or_insert(0) += 1;
            }
            return;
        }
        if self.track_classes {
            self.class.push(class.unwrap_or(NO_CLASS));
        }
        self.ttft.push(or_nan(r.ttft_s));
        self.tpot.push(or_nan(r.tpot_s));
        self.e2e.push(r.e2e_s);
        self.normalized_e2e.push(or_nan(r.normalized_e2e_s));
        self.scheduling_delay.push(or_nan(r.scheduling_delay_s));
        self.tenant.push(r.tenant);
        if r.token_deadlines > 0 {
            self.fluidity
                .push(1.0 - f64::from(r.token_deadline_misses) / f64::from(r.token_deadlines));
        }
        self.first_arrival_s = self.first_arrival_s.min(r.arrival_s);
        self.last_done_s = self.last_done_s.max(r.completed_s);
        self.prompt_tokens += u64::from(r.prompt_tokens);
        self.output_tokens += u64::from(r.output_tokens);
        self.cached_prompt_tokens += u64::from(r.cached_prompt_tokens);
        self.preemptions += u64::from(r.preemptions);
        self.requests_preempted += u64::from(r.preemptions > 0);
        if let Some(d) = r.deadline_s {
            self.with_deadline += 1;
            self.missed_deadline += u64::from(r.completed_s > d);
        }
        self.token_deadlines += u64::from(r.token_deadlines);
        self.token_deadline_misses += u64::from(r.token_deadline_misses);
        let i = r.replica as usize;
        if i >= self.per_replica.len() {
            self.per_replica.resize(i + 1, 0);
        }
        self.per_replica[i] += 1;
        *self.tokens_by_tenant.entry(r.tenant).or_insert(0) +=
            u64::from(r.prompt_tokens) + u64::from(r.output_tokens);
    }

    /// Prompt + output tokens served to tenant `t`.
    pub fn tenant_tokens(&self, t: u32) -> u64 {
        self.tokens_by_tenant.get(&t).copied().unwrap_or(0)
    }

    /// Adds the outcomes of a disjoint set of requests. Every statistic drawn from the result
    /// is independent of the order of the two (distributions sort before they sum).
    pub fn merge(&mut self, o: Outcomes) {
        self.ttft.extend(o.ttft);
        self.tpot.extend(o.tpot);
        self.e2e.extend(o.e2e);
        self.normalized_e2e.extend(o.normalized_e2e);
        self.scheduling_delay.extend(o.scheduling_delay);
        self.tenant.extend(o.tenant);
        self.class.extend(o.class);
        self.fluidity.extend(o.fluidity);
        self.first_arrival_s = self.first_arrival_s.min(o.first_arrival_s);
        self.last_done_s = self.last_done_s.max(o.last_done_s);
        self.prompt_tokens += o.prompt_tokens;
        self.output_tokens += o.output_tokens;
        self.cached_prompt_tokens += o.cached_prompt_tokens;
        self.preemptions += o.preemptions;
        self.requests_preempted += o.requests_preempted;
        self.with_deadline += o.with_deadline;
        self.missed_deadline += o.missed_deadline;
        self.token_deadlines += o.token_deadlines;
        self.token_deadline_misses += o.token_deadline_misses;
        if self.per_replica.len() < o.per_replica.len() {
            self.per_replica.resize(o.per_replica.len(), 0);
        }
        for (a, b) in self.per_replica.iter_mut().zip(o.per_replica) {
            *a += b;
        }
        for (t, n) in o.tokens_by_tenant {
            *self.tokens_by_tenant.entry(t).or_insert(0) += n;
        }
        self.rejected += o.rejected;
        for (c, n) in o.rejected_by_class {
            *self.rejected_by_class.entry(c).or_insert(0) += n;
        }
    }

    /// Whether request `i` meets every per-request SLO limit given.
    pub fn good(&self, i: usize, ttft: Option<f64>, tpot: Option<f64>, e2e: Option<f64>) -> bool {
        // NaN compares false: a request without a first token misses a TTFT limit, one
        // without a TPOT (fewer than two tokens) meets a TPOT limit.
        ttft.is_none_or(|l| self.ttft[i] <= l)
            && tpot.is_none_or(|l| self.tpot[i].is_nan() || self.tpot[i] <= l)
            && e2e.is_none_or(|l| self.e2e[i] <= l)
    }
}

/// The distribution of the values of a column that are present (not NaN).
pub fn distribution(column: &[f64]) -> Distribution {
    let mut v: Vec<f64> = column.iter().copied().filter(|x| !x.is_nan()).collect();
    Distribution::of(&mut v)
}

/// The distribution of the present values of `column` at the rows where `keep` holds.
pub fn distribution_where(column: &[f64], keep: impl Fn(usize) -> bool) -> Distribution {
    let mut v: Vec<f64> = column
        .iter()
        .enumerate()
        .filter(|&(i, x)| !x.is_nan() && keep(i))
        .map(|(_, &x)| x)
        .collect();
    Distribution::of(&mut v)
}
