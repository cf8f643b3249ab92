//! The request source a simulator (or benchmark client) pulls from, in arrival order.
//!
//! Open-loop sources (synthetic arrivals, trace replay) know every arrival time in advance and
//! generate requests lazily, one ahead, so a million-request run never holds its whole
//! workload in memory. A closed-loop source issues a client's next request only after
//! [`RequestSource::on_finished`] reports its previous one done.
//!
//! Random streams (all derived from the root seed): `workload.arrival`, `workload.lengths`,
//! `workload.tenant`, `workload.prefix`, `workload.think`. Each request draws from each stream
//! a fixed number of times whatever its outcome, so changing one knob (say, the prefix
//! fraction) does not reshuffle the others.

use crate::arrival::ArrivalProcess;
use crate::config::{ArrivalConfig, PrefixConfig, ThinkTime, TraceReplayConfig, WorkloadConfig};
use crate::derive_seed;
use crate::error::{Result, WorkloadError};
use crate::length::{LengthSampler, clip, scale_len};
use crate::session::{Draw, Sessions};
use crate::trace::{TraceRow, read_trace, resolve};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use vajra_core::ids::{RequestId, TenantId};
use vajra_core::request::{Prompt, Request, SyntheticPrompt};
use vajra_core::time::{Duration, Timestamp};

#[derive(Clone)]
enum Mode {
    Open {
        process: ArrivalProcess,
        t: f64,
    },
    Replay {
        rows: Vec<TraceRow>,
        cursor: usize,
        hash_block_tokens: u32,
    },
    Sessions(Box<Sessions>),
    Closed {
        think: Option<Exp<f64>>,
        think_s: f64,
        ready: BinaryHeap<Reverse<(Timestamp, u32)>>,
        client_of: HashMap<RequestId, u32>,
    },
}

#[derive(Clone)]
struct Tenant {
    cumulative_weight: f64,
    priority: i32,
    slo_class: Option<u32>,
    deadline: Option<Duration>,
    lengths: usize,
}

/// Requests in arrival order. A clone continues independently from the same state (replica
/// partitions each walk the whole workload without reading its traces again).
#[derive(Clone)]
pub struct RequestSource {
    mode: Mode,
    samplers: Vec<LengthSampler>,
    tenants: Vec<Tenant>,
    prefix: Option<(PrefixConfig, Option<Zipf<f64>>)>,
    max_tokens: u32,
    limit: Option<u64>,
    end: Option<Timestamp>,
    /// Whether `next` was clipped.
    next_clipped: bool,
    /// Popped requests that were clipped.
    clipped: u64,
    issued: u64,
    next: Option<Request>,
    rng_arrival: StdRng,
    rng_lengths: StdRng,
    rng_tenant: StdRng,
    rng_prefix: StdRng,
    rng_think: StdRng,
}

impl std::fmt::Debug for RequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSource")
            .field("issued", &self.issued)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RequestSource {
    /// A source for `cfg` (validated here), seeded from `seed`. Relative trace paths resolve
    /// against `base`; prompt + output are clipped to `max_tokens` unless the workload sets a
    /// smaller `max_tokens`.
    ///
    /// # Errors
    /// An invalid config or an unreadable trace.
    pub fn new(cfg: &WorkloadConfig, seed: u64, base: &Path, max_tokens: u32) -> Result<Self> {
        cfg.validate()?;
        let mut samplers = Vec::new();
        if let Some(l) = &cfg.lengths {
            samplers.push(LengthSampler::new(l, base)?);
        }
        let mut tenants = Vec::new();
        let mut acc = 0.0;
        for t in &cfg.tenants {
            acc += t.weight;
            let lengths = match &t.lengths {
                Some(l) => {
                    samplers.push(LengthSampler::new(l, base)?);
                    samplers.len() - 1
                }
                None => 0,
            };
            tenants.push(Tenant {
                cumulative_weight: acc,
                priority: t.priority,
                slo_class: t.slo_class,
                deadline: t.deadline_s.or(cfg.deadline_s).map(Duration::from_secs_f64),
                lengths,
            });
        }
        if tenants.is_empty() {
            tenants.push(Tenant {
                cumulative_weight: 1.0,
                priority: 0,
                slo_class: None,
                deadline: cfg.deadline_s.map(Duration::from_secs_f64),
                lengths: 0,
            });
        }
        let mut limit = cfg.num_requests;
        let mode = match &cfg.arrival {
            ArrivalConfig::Trace(t) => {
                let rows = replay_rows(t, base)?;
                // A replay has as many requests as rows: asking for more used to run fewer
                // without a word.
                if let Some(n) = limit
                    && n > rows.len() as u64
                {
                    return Err(vajra_core::CoreError::invalid(
                        "workload.num_requests",
                        n,
                        format!(
                            "at most the {} rows the trace {} has in its window (or leave it unset to replay them all)",
                            rows.len(),
                            t.path.display()
                        ),
                    )
                    .into());
                }
                limit = Some(limit.unwrap_or(rows.len() as u64));
                Mode::Replay {
                    rows,
                    cursor: 0,
                    hash_block_tokens: t.hash_block_tokens,
                }
            }
            ArrivalConfig::ClosedLoop {
                clients,
                think_time_s,
                think,
            } => Mode::Closed {
                think: match think {
                    ThinkTime::Exponential if *think_time_s > 0.0 => {
                        Some(Exp::new(1.0 / think_time_s).expect("validated think time"))
                    }
                    _ => None,
                },
                think_s: *think_time_s,
                ready: (0..*clients)
                    .map(|c| Reverse((Timestamp::ZERO, c)))
                    .collect(),
                client_of: HashMap::new(),
            },
            ArrivalConfig::Sessions(c) => Mode::Sessions(Box::new(Sessions::new(
                c,
                tenants
                    .iter()
                    .map(|t| (t.cumulative_weight, t.lengths))
                    .collect(),
                match &c.conversations {
                    Some(p) => crate::trace::read_conversations(&base.join(p))?,
                    None => Vec::new(),
                },
            ))),
            other => Mode::Open {
                process: ArrivalProcess::new(other).expect("open-loop arrival"),
                t: 0.0,
            },
        };
        let prefix = cfg.prefix.map(|p| {
            let z = (p.theta > 0.0 && p.groups > 1)
                .then(|| Zipf::new(f64::from(p.groups), p.theta).expect("validated prefix zipf"));
            (p, z)
        });
        let mut s = RequestSource {
            mode,
            samplers,
            tenants,
            prefix,
            max_tokens: cfg.longest_request(max_tokens),
            limit,
            end: cfg.duration_s.map(Timestamp::from_secs_f64),
            issued: 0,
            next: None,
            next_clipped: false,
            clipped: 0,
            rng_arrival: StdRng::seed_from_u64(derive_seed(seed, "workload.arrival")),
            rng_lengths: StdRng::seed_from_u64(derive_seed(seed, "workload.lengths")),
            rng_tenant: StdRng::seed_from_u64(derive_seed(seed, "workload.tenant")),
            rng_prefix: StdRng::seed_from_u64(derive_seed(seed, "workload.prefix")),
            rng_think: StdRng::seed_from_u64(derive_seed(seed, "workload.think")),
        };
        s.refill();
        Ok(s)
    }

    /// Arrival time of the next request, if it is known now (a closed loop whose clients are
    /// all busy has none until a completion).
    pub fn peek_time(&self) -> Option<Timestamp> {
        self.next.as_ref().map(|r| r.arrival)
    }

    /// The next request in arrival order.
    pub fn pop(&mut self) -> Option<Request> {
        let r = self.next.take();
        if r.is_some() {
            if let Mode::Sessions(s) = &mut self.mode {
                s.issued();
            }
            self.clipped += u64::from(self.next_clipped);
            self.refill();
        }
        r
    }

    /// Requests popped so far whose prompt + output were clipped to the longest sequence
    /// allowed (the source's `max_tokens`).
    pub fn clipped(&self) -> u64 {
        self.clipped
    }

    /// Requests issued so far.
    pub fn issued(&self) -> u64 {
        self.issued - u64::from(self.next.is_some())
    }

    /// Tells a closed-loop source that request `id` completed at `now`: its client sends the
    /// next one after its think time. A no-op for open-loop sources.
    pub fn on_finished(&mut self, id: RequestId, now: Timestamp) {
        if let Mode::Sessions(s) = &mut self.mode {
            let Some(at) = s.on_finished(id, now, &mut self.rng_think) else {
                return;
            };
            match &self.next {
                // The turn that just became ready goes before the one drawn ahead.
                Some(next) if at < next.arrival => {
                    s.put_back();
                    self.next = None;
                    self.issued -= 1;
                    self.next_clipped = false;
                    self.refill();
                }
                Some(_) => {}
                None => self.refill(),
            }
            return;
        }
        if let Mode::Closed {
            think,
            think_s,
            ready,
            client_of,
        } = &mut self.mode
            && let Some(c) = client_of.remove(&id)
        {
            let gap = match think {
                Some(d) => d.sample(&mut self.rng_think),
                None => *think_s,
            };
            ready.push(Reverse((now + Duration::from_secs_f64(gap), c)));
            if self.next.is_none() {
                self.refill();
            }
        }
    }

    /// Sessions that ended before their last turn (the conversation outgrew the context, or
    /// a turn was rejected); 0 for other workloads.
    pub fn sessions_cut_short(&self) -> u64 {
        match &self.mode {
            Mode::Sessions(s) => s.cut_short,
            _ => 0,
        }
    }

    /// Tells the source that request `id` was rejected unserved at `now`: a session ends there
    /// (its user saw no answer to continue from); a closed-loop client sends its next request
    /// as after an answer.
    pub fn on_rejected(&mut self, id: RequestId, now: Timestamp) {
        if let Mode::Sessions(s) = &mut self.mode {
            s.end(id);
            return;
        }
        self.on_finished(id, now);
    }

    /// Whether no request will ever come again.
    pub fn is_exhausted(&self) -> bool {
        self.next.is_none()
            && match &self.mode {
                Mode::Closed { client_of, .. } => {
                    client_of.is_empty() || self.limit.is_some_and(|l| self.issued >= l)
                }
                Mode::Sessions(s) => s.is_done() || self.limit.is_some_and(|l| self.issued >= l),
                _ => true,
            }
    }

    fn refill(&mut self) {
        debug_assert!(self.next.is_none());
        if self.limit.is_some_and(|l| self.issued >= l) {
            return;
        }
        let id = RequestId(self.issued);
        if let Mode::Sessions(s) = &mut self.mode {
            let mut d = Draw {
                rng_arrival: &mut self.rng_arrival,
                rng_lengths: &mut self.rng_lengths,
                rng_tenant: &mut self.rng_tenant,
                samplers: &mut self.samplers,
                end: self.end,
            };
            let Some(turn) = s.next_turn(id, self.max_tokens, &mut d) else {
                return;
            };
            let mut req = self.request(
                id,
                Prompt::Synthetic(SyntheticPrompt {
                    len: turn.prompt,
                    prefix_groups: turn.groups,
                    group_tokens: turn.group_tokens,
                    output_in_groups: true,
                }),
                turn.output,
                turn.arrival,
                turn.tenant,
            );
            req.session = Some(turn.session);
            req.last_turn = turn.last;
            self.next_clipped = turn.clipped;
            self.issued += 1;
            self.next = Some(req);
            return;
        }
        let mut tokens = Vec::new();
        let (arrival, lengths, hash) = match &mut self.mode {
            Mode::Open { process, t } => {
                *t += process.gap(self.issued, &mut self.rng_arrival);
                (Timestamp::from_secs_f64(*t), None, None)
            }
            Mode::Replay {
                rows,
                cursor,
                hash_block_tokens,
            } => {
                let Some(r) = rows.get(*cursor) else { return };
                *cursor += 1;
                let hash = (!r.hash_ids.is_empty()).then(|| {
                    (
                        std::mem::take(&mut rows[*cursor - 1].hash_ids),
                        *hash_block_tokens,
                    )
                });
                tokens = std::mem::take(&mut rows[*cursor - 1].tokens);
                let r = &rows[*cursor - 1];
                (
                    Timestamp::from_secs_f64(r.arrival_s.unwrap_or(0.0)),
                    Some((r.prompt, r.output)),
                    hash,
                )
            }
            Mode::Closed {
                ready, client_of, ..
            } => {
                let Some(Reverse((t, c))) = ready.pop() else {
                    return;
                };
                client_of.insert(id, c);
                (t, None, None)
            }
            Mode::Sessions(_) => unreachable!("sessions are drawn above"),
        };
        if self.end.is_some_and(|e| arrival > e) {
            return;
        }
        // Fixed draw counts per request and stream (see the module docs).
        let tenant_u: f64 = self.rng_tenant.random();
        let total_w = self.tenants.last().map_or(1.0, |t| t.cumulative_weight);
        let ti = self
            .tenants
            .iter()
            .position(|t| tenant_u * total_w < t.cumulative_weight)
            .unwrap_or(self.tenants.len() - 1);
        let tenant = &self.tenants[ti];
        let (mut prompt, output) =
            lengths.unwrap_or_else(|| self.samplers[tenant.lengths].sample(&mut self.rng_lengths));
        let prefix_u: f64 = self.rng_prefix.random();
        let prefix_g: u64 = match &self.prefix {
            Some((p, z)) => match z {
                Some(z) => z.sample(&mut self.rng_prefix) as u64 - 1,
                None => self.rng_prefix.random_range(0..u64::from(p.groups)),
            },
            None => 0,
        };
        let mut groups = Vec::new();
        let mut group_tokens = 0;
        if let Some((p, _)) = &self.prefix
            && prefix_u < p.fraction
        {
            prompt = prompt.max(p.tokens);
            groups.push(prefix_g);
            group_tokens = p.tokens;
        }
        if let Some((ids, gt)) = hash {
            groups = ids;
            group_tokens = gt;
        }
        let (wanted_prompt, wanted_output) = (prompt, output);
        let (prompt, output) = clip(prompt, output, self.max_tokens);
        self.next_clipped = (prompt, output) != (wanted_prompt, wanted_output);
        let prompt = if tokens.is_empty() {
            Prompt::Synthetic(SyntheticPrompt {
                len: prompt,
                prefix_groups: groups,
                group_tokens,
                output_in_groups: false,
            })
        } else {
            tokens.truncate(prompt as usize);
            Prompt::Tokens(tokens)
        };
        let req = self.request(id, prompt, output, arrival, ti);
        self.issued += 1;
        self.next = Some(req);
    }

    /// A synthetic request of tenant `ti` (its priority, SLO class and deadline), generating
    /// exactly `output` tokens.
    fn request(
        &self,
        id: RequestId,
        prompt: Prompt,
        output: u32,
        arrival: Timestamp,
        ti: usize,
    ) -> Request {
        let tenant = &self.tenants[ti];
        let mut req = Request::new(id, prompt, output, arrival);
        req.tenant = TenantId(ti as u32);
        req.priority = tenant.priority;
        req.slo_class = tenant.slo_class;
        req.deadline = tenant.deadline.map(|d| arrival + d);
        req.sampling.ignore_eos = true;
        req
    }
}

fn replay_rows(t: &TraceReplayConfig, base: &Path) -> Result<Vec<TraceRow>> {
    let path = resolve(base, &t.path);
    let mut rows = read_trace(&path, t.format, true)?;
    if let Some(p) = &t.prompt_tokens {
        crate::trace::attach_prompt_tokens(&mut rows, &resolve(base, p))?;
    }
    if t.prefill_scale != 1.0 && rows.iter().any(|r| !r.tokens.is_empty()) {
        return Err(vajra_core::CoreError::invalid(
            "workload.arrival.prefill_scale",
            t.prefill_scale,
            "1 for a trace with real prompt tokens (their lengths are the tokens')",
        )
        .into());
    }
    // Replayed by arrival (stable: equal times keep the file's order).
    rows.sort_by(|a, b| {
        a.arrival_s
            .unwrap_or(0.0)
            .total_cmp(&b.arrival_s.unwrap_or(0.0))
    });
    let start = t.start_s.unwrap_or(f64::NEG_INFINITY);
    let end = t.end_s.unwrap_or(f64::INFINITY);
    let mut kept: Vec<TraceRow> = rows
        .into_iter()
        .filter(|r| {
            let a = r.arrival_s.unwrap_or(0.0);
            a >= start && a < end
        })
        .collect();
    let Some(t0) = kept.first().and_then(|r| r.arrival_s) else {
        return Err(WorkloadError::EmptyTrace {
            path,
            message: format!(
                "no rows in the window start_s = {:?}, end_s = {:?}",
                t.start_s, t.end_s
            ),
        });
    };
    for r in &mut kept {
        r.arrival_s = r.arrival_s.map(|a| (a - t0) * t.time_scale);
        r.prompt = scale_len(r.prompt, t.prefill_scale);
        r.output = scale_len(r.output, t.decode_scale);
    }
    // Times past the simulator's clock would saturate (every later latency would read 0).
    let last = kept.iter().filter_map(|r| r.arrival_s).fold(0.0, f64::max);
    if last > vajra_core::time::MAX_SECS {
        return Err(WorkloadError::TraceTimes {
            path,
            message: format!(
                "the last arrival is {last:.3e} s after the first, past the simulator's clock of {:e} s (about 317 years): arrival times are read in seconds; for a column in milliseconds, microseconds or nanoseconds set workload.arrival.time_scale = 1e-3, 1e-6 or 1e-9",
                vajra_core::time::MAX_SECS
            ),
        });
    }
    Ok(kept)
}

/// Every request of an open-loop workload (tests, trace generation). Closed loops return
/// only the first round (one request per client).
///
/// # Errors
/// As [`RequestSource::new`].
pub fn collect(
    cfg: &WorkloadConfig,
    seed: u64,
    base: &Path,
    max_tokens: u32,
) -> Result<Vec<Request>> {
    let mut s = RequestSource::new(cfg, seed, base, max_tokens)?;
    let mut out = Vec::new();
    while let Some(r) = s.pop() {
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> WorkloadConfig {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn same_seed_same_requests_and_another_seed_differs() {
        let c = cfg(r#"num_requests = 50
            arrival = { type = "poisson", qps = 5.0 }
            lengths = { type = "independent", prompt = { type = "uniform", min = 1, max = 900 }, output = { type = "zipf", min = 1, max = 50, theta = 1.1 } }"#);
        let a = collect(&c, 1, Path::new("."), 4096).unwrap();
        let b = collect(&c, 1, Path::new("."), 4096).unwrap();
        let d = collect(&c, 2, Path::new("."), 4096).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, d);
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0].arrival <= w[1].arrival));
    }

    #[test]
    fn duration_stops_issuing() {
        let c = cfg(r#"duration_s = 10.0
            arrival = { type = "constant", qps = 2.0 }
            lengths = { type = "fixed", prompt = 5, output = 5 }"#);
        let a = collect(&c, 1, Path::new("."), 4096).unwrap();
        assert_eq!(a.len(), 21, "0, 0.5, …, 10.0");
    }

    #[test]
    fn max_tokens_clips_every_request() {
        let c = cfg(r#"num_requests = 20
            max_tokens = 100
            arrival = { type = "all_at_once" }
            lengths = { type = "fixed", prompt = 300, output = 100 }"#);
        for r in collect(&c, 1, Path::new("."), 4096).unwrap() {
            assert_eq!((r.prompt.len(), r.max_tokens()), (75, 25));
        }
    }

    #[test]
    fn tenants_split_requests_by_weight_and_carry_priority_and_deadline() {
        let c = cfg(r#"num_requests = 4000
            arrival = { type = "poisson", qps = 100.0 }
            lengths = { type = "fixed", prompt = 5, output = 5 }
            [[tenants]]
            name = "a"
            weight = 3.0
            priority = 1
            deadline_s = 2.0
            [[tenants]]
            name = "b"
            lengths = { type = "fixed", prompt = 7, output = 2 }"#);
        let reqs = collect(&c, 1, Path::new("."), 4096).unwrap();
        let a = reqs.iter().filter(|r| r.tenant == TenantId(0)).count();
        assert!((2850..3150).contains(&a), "{a}");
        for r in &reqs {
            if r.tenant == TenantId(0) {
                assert_eq!(r.priority, 1);
                assert_eq!(r.deadline, Some(r.arrival + Duration::from_secs_f64(2.0)));
            } else {
                assert_eq!((r.prompt.len(), r.max_tokens()), (7, 2));
            }
        }
    }

    #[test]
    fn shared_prefixes_lengthen_short_prompts_and_set_groups() {
        let c = cfg(r#"num_requests = 200
            arrival = { type = "poisson", qps = 100.0 }
            lengths = { type = "fixed", prompt = 10, output = 5 }
            prefix = { groups = 4, tokens = 256, fraction = 0.5 }"#);
        let reqs = collect(&c, 1, Path::new("."), 4096).unwrap();
        let shared = reqs.iter().filter(|r| r.prompt.len() == 256).count();
        assert!((70..130).contains(&shared), "{shared}");
        for r in reqs.iter().filter(|r| r.prompt.len() == 256) {
            let Prompt::Synthetic(s) = &r.prompt else {
                panic!()
            };
            assert_eq!(s.group_tokens, 256);
            assert!(s.prefix_groups[0] < 4);
        }
    }

    #[test]
    fn a_closed_loop_issues_a_clients_next_request_after_completion_plus_think_time() {
        let c = cfg(r#"num_requests = 5
            arrival = { type = "closed_loop", clients = 2, think_time_s = 1.0 }
            lengths = { type = "fixed", prompt = 5, output = 5 }"#);
        let mut s = RequestSource::new(&c, 1, Path::new("."), 4096).unwrap();
        let a = s.pop().unwrap();
        let b = s.pop().unwrap();
        assert_eq!((a.arrival, b.arrival), (Timestamp::ZERO, Timestamp::ZERO));
        assert_eq!(s.peek_time(), None, "both clients busy");
        assert!(!s.is_exhausted());
        s.on_finished(b.id, Timestamp::from_secs_f64(3.0));
        assert_eq!(s.peek_time(), Some(Timestamp::from_secs_f64(4.0)));
        let c3 = s.pop().unwrap();
        s.on_finished(a.id, Timestamp::from_secs_f64(5.0));
        s.on_finished(c3.id, Timestamp::from_secs_f64(5.5));
        let d = s.pop().unwrap();
        let e = s.pop().unwrap();
        assert_eq!(d.arrival, Timestamp::from_secs_f64(6.0));
        assert_eq!(e.arrival, Timestamp::from_secs_f64(6.5));
        assert!(s.pop().is_none());
        assert!(s.is_exhausted(), "the limit of 5 is reached");
    }

    #[test]
    fn trace_replay_applies_window_and_time_scale() {
        let dir = std::env::temp_dir().join(format!("vajra-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("t.csv"),
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,2,2\n2,3,3\n3,4,4\n",
        )
        .unwrap();
        let c = cfg(
            r#"arrival = { type = "trace", path = "t.csv", start_s = 1.0, end_s = 3.0, time_scale = 0.5 }"#,
        );
        let reqs = collect(&c, 1, &dir, 4096).unwrap();
        let got: Vec<(f64, u32)> = reqs
            .iter()
            .map(|r| (r.arrival.as_secs_f64(), r.prompt.len()))
            .collect();
        assert_eq!(got, vec![(0.0, 2), (0.5, 3)]);
    }

    /// Drives a session source as a server would: each issued turn completes `serve_s` after
    /// it arrives. Returns the requests in issue order with their completion times.
    fn serve_sessions(c: &WorkloadConfig, seed: u64, serve_s: f64) -> Vec<(Request, Timestamp)> {
        serve_sessions_from(c, seed, serve_s).0
    }

    /// As [`serve_sessions`], also returning the source at the end.
    fn serve_sessions_from(
        c: &WorkloadConfig,
        seed: u64,
        serve_s: f64,
    ) -> (Vec<(Request, Timestamp)>, RequestSource) {
        serve_sessions_in(c, seed, serve_s, Path::new("."))
    }

    /// As [`serve_sessions_from`], with the config's paths relative to `base`.
    fn serve_sessions_in(
        c: &WorkloadConfig,
        seed: u64,
        serve_s: f64,
        base: &Path,
    ) -> (Vec<(Request, Timestamp)>, RequestSource) {
        let mut src = RequestSource::new(c, seed, base, 4096).unwrap();
        let mut done: BinaryHeap<Reverse<(Timestamp, RequestId)>> = BinaryHeap::new();
        let mut out = Vec::new();
        loop {
            let next = src.peek_time();
            let fin = done.peek().map(|d| d.0.0);
            match (next, fin) {
                (Some(a), f) if f.is_none_or(|f| a <= f) => {
                    let r = src.pop().unwrap();
                    let _ = a;
                    let end = r.arrival + Duration::from_secs_f64(serve_s);
                    done.push(Reverse((end, r.id)));
                    out.push((r, end));
                }
                (None, None) => break,
                _ => {
                    let Reverse((t, id)) = done.pop().unwrap();
                    src.on_finished(id, t);
                }
            }
        }
        assert!(src.is_exhausted());
        (out, src)
    }

    fn groups(r: &Request) -> &SyntheticPrompt {
        match &r.prompt {
            Prompt::Synthetic(s) => s,
            Prompt::Tokens(_) => panic!("synthetic"),
        }
    }

    #[test]
    fn a_sessions_turns_follow_its_answers_and_carry_the_whole_conversation() {
        let c = cfg(r#"num_requests = 300
            arrival = { type = "sessions", qps = 4.0, turns_min = 2, turns_max = 6, think_time_s = 3.0, think = "exponential", system_prompt_tokens = 100, system_prompts = 2 }
            lengths = { type = "independent", prompt = { type = "uniform", min = 5, max = 60 }, output = { type = "uniform", min = 1, max = 40 } }"#);
        let served = serve_sessions(&c, 3, 0.5);
        assert_eq!(served.len(), 300, "num_requests counts turns");
        assert!(
            served.windows(2).all(|w| w[0].0.arrival <= w[1].0.arrival),
            "issued in arrival order"
        );
        // Chain turns by shared leading groups: a turn continues the earlier turn whose whole
        // stream (prompt + answer) is its prefix.
        let mut continued = 0;
        for (i, (r, _)) in served.iter().enumerate() {
            let g = groups(r);
            assert!(g.output_in_groups && g.group_tokens == 16);
            assert_eq!(
                g.prefix_groups.len() as u32,
                (g.len + r.max_tokens()).div_ceil(16)
            );
            let prev = served[..i].iter().rev().find(|(p, _)| {
                let pg = groups(p);
                let stream = pg.len + p.max_tokens();
                pg.prefix_groups.len() > 7 // past the 100-token system prompt
                    && g.prefix_groups.len() >= pg.prefix_groups.len()
                    && g.prefix_groups[..(stream / 16) as usize] == pg.prefix_groups[..(stream / 16) as usize]
                    && pg.prefix_groups[6] == g.prefix_groups[6]
            });
            if let Some((p, p_done)) = prev {
                continued += 1;
                let stream = groups(p).len + p.max_tokens();
                assert!(
                    g.len > stream,
                    "turn prompt = previous prompt + answer + new tokens"
                );
                assert!(
                    r.arrival >= *p_done,
                    "a turn arrives only after the previous answer"
                );
                assert_eq!(r.tenant, p.tenant);
            }
        }
        assert!(
            continued > 150,
            "most turns continue a conversation: {continued}"
        );
        // Sessions with the same system prompt share its full groups; only two exist.
        let mut firsts: Vec<u64> = served
            .iter()
            .map(|(r, _)| groups(r).prefix_groups[0])
            .collect();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 2);
        // Byte-identical for the same seed, different for another.
        let again = serve_sessions(&c, 3, 0.5);
        assert!(served.iter().zip(&again).all(|(a, b)| a.0 == b.0));
        assert_ne!(serve_sessions(&c, 4, 0.5)[5].0, served[5].0);
    }

    #[test]
    fn only_a_sessions_last_turn_says_it_is_the_last() {
        let c = cfg(r#"num_requests = 400
            arrival = { type = "sessions", qps = 4.0, turns_min = 3, turns_max = 3, think_time_s = 1.0 }
            lengths = { type = "fixed", prompt = 10, output = 10 }"#);
        let served = serve_sessions(&c, 2, 0.5);
        let mut turns: HashMap<u64, Vec<bool>> = Default::default();
        for (r, _) in &served {
            turns
                .entry(r.session.unwrap())
                .or_default()
                .push(r.last_turn);
        }
        let whole = turns.values().filter(|t| t.len() == 3).count();
        assert!(whole > 120, "{whole} whole sessions");
        for t in turns.values() {
            assert!(t.len() <= 3);
            let expected: Vec<bool> = (0..t.len()).map(|i| i == 2).collect();
            assert_eq!(*t, expected, "the third turn, and only it, is the last");
        }
    }

    #[test]
    fn a_session_ends_when_its_conversation_outgrows_the_context() {
        let c = cfg(r#"num_requests = 1000
            max_tokens = 1000
            arrival = { type = "sessions", qps = 1.0, turns_min = 50, turns_max = 50 }
            lengths = { type = "fixed", prompt = 100, output = 100 }"#);
        let (served, src) = serve_sessions_from(&c, 1, 1.0);
        // Each turn adds 200 tokens: turns of 100, 300, 500, 700 prompt tokens fit (900 total
        // at most), the fifth (900 + 100) would not.
        for (r, _) in &served {
            assert!(groups(r).len + r.max_tokens() <= 1000);
        }
        let per_session = served.iter().filter(|(r, _)| groups(r).len == 100).count();
        // Every session that got to its fifth turn was cut at its sixth.
        assert!(
            src.sessions_cut_short() + 5 >= per_session as u64,
            "{}",
            src.sessions_cut_short()
        );
        assert!(src.sessions_cut_short() <= per_session as u64);
        // Five turns a session; the turn limit may cut the last few sessions short.
        assert!(served.len() <= 5 * per_session && served.len() > 5 * per_session - 25);
        let longest = served.iter().map(|(r, _)| groups(r).len).max();
        assert_eq!(longest, Some(900), "the fifth turn's prompt is 900 tokens");
    }

    #[test]
    fn sessions_reject_bad_fields_by_name() {
        for (body, field) in [
            ("qps = 0.0, turns_max = 2", "workload.arrival.qps"),
            (
                "qps = 1.0, turns_min = 3, turns_max = 2",
                "workload.arrival.turns_max",
            ),
            (
                "qps = 1.0, turns_max = 2, tool_call_probability = 2.0",
                "workload.arrival.tool_call_probability",
            ),
            (
                "qps = 1.0, turns_max = 2, system_prompts = 0",
                "workload.arrival.system_prompts",
            ),
        ] {
            let c = cfg(&format!(
                "num_requests = 10\narrival = {{ type = \"sessions\", {body} }}\nlengths = {{ type = \"fixed\", prompt = 5, output = 5 }}"
            ));
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn sessions_replay_the_conversations_of_a_file_turn_by_turn() {
        let dir = std::env::temp_dir().join(format!("vajra-conv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("c.jsonl"),
            "{\"id\": \"a\", \"turns\": [[30, 12], [7, 40], [5, 3]]}\n\n{\"turns\": [[100, 1]]}\n",
        )
        .unwrap();
        let c = cfg(r#"num_requests = 200
            arrival = { type = "sessions", qps = 2.0, think_time_s = 1.0, system_prompt_tokens = 64, conversations = "c.jsonl" }"#);
        let (served, _) = serve_sessions_in(&c, 5, 0.5, &dir);
        assert_eq!(served.len(), 200);
        // Each session is one of the two conversations: (prompt, answer) of every turn.
        let a = [
            (64 + 30, 12),
            (64 + 30 + 12 + 7, 40),
            (64 + 30 + 12 + 7 + 40 + 5, 3),
        ];
        let mut sessions: HashMap<u64, Vec<(u32, u32)>> = Default::default();
        for (r, _) in &served {
            let turn = (r.prompt.len(), r.max_tokens());
            sessions.entry(r.session.unwrap()).or_default().push(turn);
        }
        let (mut long, mut short) = (0, 0);
        for turns in sessions.values() {
            if turns[0] == (164, 1) {
                assert_eq!(turns.len(), 1);
                short += 1;
            } else {
                assert!(a.starts_with(turns), "{turns:?}");
                long += usize::from(turns.len() == 3);
            }
        }
        assert!(long > 20 && short > 20, "both drawn: {long} {short}");

        // Bad files and fields are named.
        for (text, needle) in [
            (
                "{\"turns\": [[30, 0]]}",
                "line 1: field `turns[0]`: answer tokens = 0",
            ),
            ("{\"turns\": []}\n", "field `turns` is empty"),
            ("\n{\"turns\": [[1.5, 2]]}", "line 2"),
            ("{\"turn\": [[1, 2]]}", "expected {\"turns\""),
            ("", "no conversation"),
        ] {
            std::fs::write(dir.join("bad.jsonl"), text).unwrap();
            let e = crate::trace::read_conversations(&dir.join("bad.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("bad.jsonl"), "{text}: {e}");
        }
        for (body, field) in [
            (
                "turns_max = 3, conversations = \"c.jsonl\"",
                "workload.arrival.turns_max",
            ),
            (
                "turns_min = 2, conversations = \"c.jsonl\"",
                "workload.arrival.turns_min",
            ),
            ("", "workload.arrival.turns_max"),
        ] {
            let c = cfg(&format!(
                "num_requests = 10\narrival = {{ type = \"sessions\", qps = 1.0, {body} }}"
            ));
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{body}: {e}");
        }
        let c = cfg(r#"num_requests = 10
            arrival = { type = "sessions", qps = 1.0, conversations = "c.jsonl" }
            lengths = { type = "fixed", prompt = 5, output = 5 }"#);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("workload.lengths"), "{e}");
    }

    #[test]
    fn a_session_whose_turn_is_rejected_ends_there() {
        let c = cfg(r#"duration_s = 100.0
            arrival = { type = "sessions", qps = 1.0, turns_min = 3, turns_max = 3 }
            lengths = { type = "fixed", prompt = 10, output = 10 }"#);
        let mut src = RequestSource::new(&c, 1, Path::new("."), 4096).unwrap();
        let mut n = 0;
        while let Some(r) = src.pop() {
            n += 1;
            src.on_rejected(r.id, r.arrival);
        }
        assert!(src.is_exhausted());
        // Only first turns were ever sent: about 100 sessions in 100 s, one turn each.
        assert!((70..=130).contains(&n), "{n}");
        let all = serve_sessions(&c, 1, 0.1);
        assert!(all.len() > 2 * n, "served sessions send all three turns");
    }
}
