//! Global routers: which replica of a cluster receives an arriving request.
//!
//! The caller (the simulator's cluster, or a future multi-replica engine) passes the arriving
//! request and the current [`ReplicaLoad`] of every replica; randomness comes in through
//! [`RandomSource`], so this module owns no RNG. Load is *outstanding* requests, waiting plus
//! running (Vidur's LOR counts only the waiting queue and so piles load onto replica 0).
//!
//! Ties break by a rotation that starts at a random replica drawn from the run's routing
//! stream (reproducible for a seed), never toward the lowest index: with ties to the lowest
//! index, a burst that finds every replica idle lands on replica 0 first every time.

use crate::error::{Result, ensure};
use crate::ids::ReplicaId;
use crate::request::Request;
use serde::{Deserialize, Serialize};

/// Default absolute imbalance (outstanding requests) above which prefix affinity gives way to
/// load balance (SGLang's `balance_abs_threshold`).
pub const DEFAULT_BALANCE_ABS_THRESHOLD: u32 = 32;
/// Default relative imbalance above which prefix affinity gives way to load balance.
pub const DEFAULT_BALANCE_REL_THRESHOLD: f64 = 1.5;
/// Default weight of the cached-prefix score (llm-d's default profile weighs its prefix
/// scorer 3 against its queue scorer 2).
pub const DEFAULT_PREFIX_WEIGHT: f64 = 3.0;
/// Default weight of the queue score.
pub const DEFAULT_QUEUE_WEIGHT: f64 = 2.0;
/// Default weight of the free-KV score.
pub const DEFAULT_KV_WEIGHT: f64 = 1.0;

/// What a router knows about one replica when a request arrives.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReplicaLoad {
    /// The replica.
    pub replica: ReplicaId,
    /// Requests waiting.
    pub num_waiting: u32,
    /// Requests running.
    pub num_running: u32,
    /// Fraction of KV blocks held.
    pub kv_usage: f64,
    /// Fraction of KV blocks held plus those the waiting requests will need on admission:
    /// queued requests hold no KV yet, so `kv_usage` alone sends a whole burst to one replica.
    pub kv_demand: f64,
    /// Prompt + `max_tokens` of the requests waiting and running there.
    pub outstanding_tokens: u64,
    /// Prompt tokens of the arriving request already cached there (filled only when
    /// [`Router::needs_prefix_lookup`]).
    pub cached_prefix_tokens: u32,
}

impl ReplicaLoad {
    /// Waiting plus running requests.
    pub fn outstanding(&self) -> u32 {
        self.num_waiting + self.num_running
    }
}

/// A source of uniform random 64-bit numbers, derived by the caller from the run's seed.
pub trait RandomSource {
    /// The next number.
    fn next_u64(&mut self) -> u64;
}

/// The routing policy.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterConfig {
    /// Replicas in turn.
    #[default]
    RoundRobin,
    /// A uniformly random replica.
    Random,
    /// The replica with the fewest outstanding (waiting + running) requests.
    LeastOutstanding,
    /// The replica with the fewest outstanding tokens (prompt + `max_tokens` of its waiting and
    /// running requests): a 4,000-token prompt weighs a hundred times a 40-token one.
    LeastTokens,
    /// The replica with the smallest KV demand: blocks held plus the blocks its waiting
    /// requests will need.
    LeastKvUsage,
    /// Two distinct random replicas; the less loaded one.
    PowerOfTwo,
    /// The replica holding the longest cached prefix of the prompt, unless the cluster is
    /// imbalanced (max − min outstanding > `balance_abs_threshold` and max >
    /// `balance_rel_threshold` × min), or nothing is cached anywhere: then least outstanding.
    PrefixAffinity {
        /// Absolute imbalance threshold, in requests.
        #[serde(default = "default_abs")]
        balance_abs_threshold: u32,
        /// Relative imbalance threshold (≥ 1).
        #[serde(default = "default_rel")]
        balance_rel_threshold: f64,
    },
    /// A session's turns go to the replica that served its previous turn (where its
    /// conversation is cached), unless that replica is overloaded (its outstanding requests
    /// exceed the least loaded replica's by more than `spill_abs_threshold` and by a factor
    /// over `spill_rel_threshold`): then the turn spills to the least loaded replica, which
    /// the session follows from then on. First turns and requests without a session go to
    /// the least loaded replica.
    SessionAffinity {
        /// Absolute overload threshold, in requests.
        #[serde(default = "default_abs")]
        spill_abs_threshold: u32,
        /// Relative overload threshold (≥ 1).
        #[serde(default = "default_rel")]
        spill_rel_threshold: f64,
    },
    /// The replica with the highest weighted score (llm-d's scorer profile): `prefix` × the
    /// fraction of the prompt cached there + `queue` × (max − own outstanding) / (max − min)
    /// over the replicas (1 when all are equal) + `kv` × the free fraction of its KV demand.
    Weighted {
        /// Weight of the cached-prefix fraction (≥ 0).
        #[serde(default = "default_prefix_weight")]
        prefix: f64,
        /// Weight of the queue score (≥ 0).
        #[serde(default = "default_queue_weight")]
        queue: f64,
        /// Weight of the free-KV score (≥ 0).
        #[serde(default = "default_kv_weight")]
        kv: f64,
    },
}

fn default_abs() -> u32 {
    DEFAULT_BALANCE_ABS_THRESHOLD
}
fn default_rel() -> f64 {
    DEFAULT_BALANCE_REL_THRESHOLD
}
fn default_prefix_weight() -> f64 {
    DEFAULT_PREFIX_WEIGHT
}
fn default_queue_weight() -> f64 {
    DEFAULT_QUEUE_WEIGHT
}
fn default_kv_weight() -> f64 {
    DEFAULT_KV_WEIGHT
}

impl RouterConfig {
    /// Every router with its default parameters (the registry's list of names).
    pub fn registered() -> [RouterConfig; 9] {
        [
            RouterConfig::RoundRobin,
            RouterConfig::Random,
            RouterConfig::LeastOutstanding,
            RouterConfig::LeastTokens,
            RouterConfig::LeastKvUsage,
            RouterConfig::PowerOfTwo,
            RouterConfig::PrefixAffinity {
                balance_abs_threshold: default_abs(),
                balance_rel_threshold: default_rel(),
            },
            RouterConfig::Weighted {
                prefix: default_prefix_weight(),
                queue: default_queue_weight(),
                kv: default_kv_weight(),
            },
            RouterConfig::SessionAffinity {
                spill_abs_threshold: default_abs(),
                spill_rel_threshold: default_rel(),
            },
        ]
    }

    /// The router's name as written in config files.
    pub fn name(&self) -> &'static str {
        match self {
            RouterConfig::RoundRobin => "round_robin",
            RouterConfig::Random => "random",
            RouterConfig::LeastOutstanding => "least_outstanding",
            RouterConfig::LeastTokens => "least_tokens",
            RouterConfig::LeastKvUsage => "least_kv_usage",
            RouterConfig::PowerOfTwo => "power_of_two",
            RouterConfig::PrefixAffinity { .. } => "prefix_affinity",
            RouterConfig::Weighted { .. } => "weighted",
            RouterConfig::SessionAffinity { .. } => "session_affinity",
        }
    }

    /// Checks the thresholds and weights.
    ///
    /// # Errors
    /// A relative threshold below 1 or not finite; a weight negative or not finite, or all
    /// weights zero.
    pub fn validate(&self) -> Result<()> {
        match *self {
            RouterConfig::PrefixAffinity {
                balance_rel_threshold: r,
                ..
            } => ensure(
                r.is_finite() && r >= 1.0,
                "router.balance_rel_threshold",
                r,
                "a finite number ≥ 1",
            ),
            RouterConfig::SessionAffinity {
                spill_rel_threshold: r,
                ..
            } => ensure(
                r.is_finite() && r >= 1.0,
                "router.spill_rel_threshold",
                r,
                "a finite number ≥ 1",
            ),
            RouterConfig::Weighted { prefix, queue, kv } => {
                for (field, w) in [
                    ("router.prefix", prefix),
                    ("router.queue", queue),
                    ("router.kv", kv),
                ] {
                    ensure(w.is_finite() && w >= 0.0, field, w, "a finite weight ≥ 0")?;
                }
                ensure(
                    prefix + queue + kv > 0.0,
                    "router.prefix + router.queue + router.kv",
                    prefix + queue + kv,
                    "> 0 (at least one weight)",
                )
            }
            _ => Ok(()),
        }
    }
}

/// A router instance (holds the round-robin cursor and, for session affinity, each session's
/// replica).
#[derive(Debug, Clone)]
pub struct Router {
    cfg: RouterConfig,
    next: usize,
    sessions: std::collections::HashMap<u64, u32>,
}

fn uniform(rng: &mut dyn RandomSource, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// The replica with the smallest key, scanning from `start` round the ring, so that ties go to
/// the first tied replica at or after `start`.
fn least_by<K: PartialOrd>(
    loads: &[ReplicaLoad],
    start: usize,
    key: impl Fn(&ReplicaLoad) -> K,
) -> usize {
    let n = loads.len();
    let mut best = start % n;
    let mut best_key = key(&loads[best]);
    for k in 1..n {
        let i = (start + k) % n;
        let v = key(&loads[i]);
        if v < best_key {
            best = i;
            best_key = v;
        }
    }
    best
}

impl Router {
    /// A router for `cfg`.
    pub fn new(cfg: RouterConfig) -> Self {
        Router {
            cfg,
            next: 0,
            sessions: std::collections::HashMap::new(),
        }
    }

    /// Whether [`ReplicaLoad::cached_prefix_tokens`] must be filled in.
    pub fn needs_prefix_lookup(&self) -> bool {
        matches!(
            self.cfg,
            RouterConfig::PrefixAffinity { .. } | RouterConfig::Weighted { .. }
        )
    }

    /// Picks a replica for `req`.
    ///
    /// # Panics
    /// If `loads` is empty.
    pub fn route(
        &mut self,
        req: &Request,
        loads: &[ReplicaLoad],
        rng: &mut dyn RandomSource,
    ) -> ReplicaId {
        assert!(!loads.is_empty(), "routing needs at least one replica");
        let n = loads.len();
        let i = match self.cfg {
            RouterConfig::RoundRobin => {
                let i = self.next % n;
                self.next = (self.next + 1) % n;
                i
            }
            RouterConfig::Random => uniform(rng, n),
            RouterConfig::LeastOutstanding => {
                least_by(loads, uniform(rng, n), ReplicaLoad::outstanding)
            }
            RouterConfig::LeastTokens => least_by(loads, uniform(rng, n), |l| {
                (l.outstanding_tokens, l.outstanding())
            }),
            RouterConfig::LeastKvUsage => {
                least_by(loads, uniform(rng, n), |l| (l.kv_demand, l.outstanding()))
            }
            RouterConfig::PowerOfTwo => {
                if n == 1 {
                    0
                } else {
                    // Both picks are random, so on a tie the first is as good as a coin.
                    let a = uniform(rng, n);
                    let b = (a + 1 + uniform(rng, n - 1)) % n;
                    if loads[b].outstanding() < loads[a].outstanding() {
                        b
                    } else {
                        a
                    }
                }
            }
            RouterConfig::PrefixAffinity {
                balance_abs_threshold,
                balance_rel_threshold,
            } => {
                let start = uniform(rng, n);
                let least = least_by(loads, start, ReplicaLoad::outstanding);
                let min = loads[least].outstanding();
                let max = loads
                    .iter()
                    .map(ReplicaLoad::outstanding)
                    .max()
                    .unwrap_or(0);
                let imbalanced = max - min > balance_abs_threshold
                    && f64::from(max) > balance_rel_threshold * f64::from(min);
                let best = least_by(loads, start, |l| {
                    (std::cmp::Reverse(l.cached_prefix_tokens), l.outstanding())
                });
                if imbalanced || loads[best].cached_prefix_tokens == 0 {
                    least
                } else {
                    best
                }
            }
            RouterConfig::SessionAffinity {
                spill_abs_threshold,
                spill_rel_threshold,
            } => {
                let least = least_by(loads, uniform(rng, n), ReplicaLoad::outstanding);
                let min = loads[least].outstanding();
                let pick = match req.session.and_then(|s| self.sessions.get(&s)) {
                    Some(&r) if (r as usize) < n => {
                        let own = loads[r as usize].outstanding();
                        let overloaded = own - min > spill_abs_threshold
                            && f64::from(own) > spill_rel_threshold * f64::from(min);
                        if overloaded { least } else { r as usize }
                    }
                    _ => least,
                };
                // A session's last turn ends it: the map holds the sessions in flight only.
                match req.session {
                    Some(s) if req.last_turn => {
                        self.sessions.remove(&s);
                    }
                    Some(s) => {
                        self.sessions.insert(s, pick as u32);
                    }
                    None => {}
                }
                pick
            }
            RouterConfig::Weighted { prefix, queue, kv } => {
                let prompt = f64::from(req.prompt.len().max(1));
                let outstanding = loads.iter().map(ReplicaLoad::outstanding);
                let lo = outstanding.clone().min().unwrap_or(0);
                let hi = outstanding.max().unwrap_or(0);
                let score = |l: &ReplicaLoad| {
                    let q = if hi > lo {
                        f64::from(hi - l.outstanding()) / f64::from(hi - lo)
                    } else {
                        1.0
                    };
                    prefix * f64::from(l.cached_prefix_tokens) / prompt
                        + queue * q
                        + kv * (1.0 - l.kv_demand).max(0.0)
                };
                // The highest score: the smallest negated one (scores are finite).
                least_by(loads, uniform(rng, n), |l| -score(l))
            }
        };
        loads[i].replica
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u64);
    impl RandomSource for Counter {
        fn next_u64(&mut self) -> u64 {
            // SplitMix64: a fixed, well-mixed sequence for tests.
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    fn req(prompt: u32) -> Request {
        Request::new(
            crate::ids::RequestId(1),
            crate::request::Prompt::synthetic(prompt),
            10,
            crate::time::Timestamp::ZERO,
        )
    }

    fn loads(outstanding: &[(u32, u32)]) -> Vec<ReplicaLoad> {
        outstanding
            .iter()
            .enumerate()
            .map(|(i, &(w, r))| ReplicaLoad {
                replica: ReplicaId(i as u32),
                num_waiting: w,
                num_running: r,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles_through_replicas() {
        let mut r = Router::new(RouterConfig::RoundRobin);
        let l = loads(&[(0, 0); 3]);
        let picks: Vec<u32> = (0..5)
            .map(|_| r.route(&req(100), &l, &mut Counter(0)).0)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1]);
    }

    #[test]
    fn least_outstanding_counts_running_requests_not_just_waiting() {
        let mut r = Router::new(RouterConfig::LeastOutstanding);
        // Replica 0 has an empty queue but 10 running; replica 1 has 2 waiting.
        let l = loads(&[(0, 10), (2, 0)]);
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(1));
    }

    #[test]
    fn random_is_reproducible_for_the_same_source_and_covers_all_replicas() {
        let l = loads(&[(0, 0); 4]);
        let run = |seed| {
            let mut r = Router::new(RouterConfig::Random);
            let mut rng = Counter(seed);
            (0..64)
                .map(|_| r.route(&req(100), &l, &mut rng).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        let picks = run(1);
        assert!((0..4).all(|i| picks.contains(&i)));
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_two_replicas() {
        let mut r = Router::new(RouterConfig::PowerOfTwo);
        let l = loads(&[(9, 9), (0, 1)]);
        for _ in 0..20 {
            assert_eq!(r.route(&req(100), &l, &mut Counter(3)), ReplicaId(1));
        }
    }

    #[test]
    fn least_kv_usage_picks_the_smallest_kv_demand_not_the_fewest_blocks_held() {
        let mut r = Router::new(RouterConfig::LeastKvUsage);
        let mut l = loads(&[(0, 0); 3]);
        // Replica 1 holds the fewest blocks but has a queue that will need half the pool.
        for (x, (usage, demand)) in l.iter_mut().zip([(0.5, 0.5), (0.1, 0.6), (0.3, 0.3)]) {
            x.kv_usage = usage;
            x.kv_demand = demand;
        }
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(2));
    }

    #[test]
    fn ties_rotate_over_the_tied_replicas_instead_of_going_to_the_lowest_index() {
        for cfg in [
            RouterConfig::LeastOutstanding,
            RouterConfig::LeastTokens,
            RouterConfig::LeastKvUsage,
            RouterConfig::PowerOfTwo,
            RouterConfig::registered()[6],
            RouterConfig::registered()[7],
            RouterConfig::registered()[8],
        ] {
            let mut r = Router::new(cfg);
            let l = loads(&[(1, 1); 4]);
            let mut rng = Counter(7);
            let mut hits = [0u32; 4];
            for _ in 0..400 {
                hits[r.route(&req(100), &l, &mut rng).0 as usize] += 1;
            }
            assert!(
                hits.iter().all(|&h| (60..=140).contains(&h)),
                "{}: equal loads spread evenly, got {hits:?}",
                cfg.name()
            );
        }
    }

    #[test]
    fn least_tokens_weighs_requests_by_their_tokens() {
        let mut r = Router::new(RouterConfig::LeastTokens);
        // Replica 0: one 4,000-token request; replica 1: three 40-token ones.
        let mut l = loads(&[(1, 0), (3, 0)]);
        l[0].outstanding_tokens = 4_100;
        l[1].outstanding_tokens = 150;
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(1));
        let mut lo = Router::new(RouterConfig::LeastOutstanding);
        assert_eq!(lo.route(&req(100), &l, &mut Counter(0)), ReplicaId(0));
    }

    #[test]
    fn the_weighted_scorer_trades_cached_prefix_against_queue_and_kv() {
        let cfg = RouterConfig::registered()[7];
        let mut r = Router::new(cfg);
        let mut l = loads(&[(4, 4), (2, 2), (0, 0)]);
        // Replica 0 holds the whole 1,000-token prompt: 3 × 1.0 beats the idle replica's
        // 2 × 1.0 queue score.
        l[0].cached_prefix_tokens = 1_000;
        assert_eq!(r.route(&req(1_000), &l, &mut Counter(0)), ReplicaId(0));
        // A tenth of it cached is not worth the queue.
        l[0].cached_prefix_tokens = 100;
        assert_eq!(r.route(&req(1_000), &l, &mut Counter(0)), ReplicaId(2));
        // Weights are checked.
        let bad = RouterConfig::Weighted {
            prefix: -1.0,
            queue: 1.0,
            kv: 1.0,
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("router.prefix")
        );
        let zero = RouterConfig::Weighted {
            prefix: 0.0,
            queue: 0.0,
            kv: 0.0,
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn prefix_affinity_follows_the_cache_until_load_is_imbalanced() {
        let cfg = RouterConfig::PrefixAffinity {
            balance_abs_threshold: 4,
            balance_rel_threshold: 1.5,
        };
        let mut r = Router::new(cfg);
        let mut l = loads(&[(2, 2), (1, 1)]);
        l[0].cached_prefix_tokens = 512;
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(0));
        // Replica 0 now far busier: balance wins.
        l[0].num_waiting = 20;
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(1));
        // Nothing cached anywhere: least outstanding.
        let l = loads(&[(3, 0), (1, 0)]);
        assert_eq!(r.route(&req(100), &l, &mut Counter(0)), ReplicaId(1));
    }

    #[test]
    fn session_affinity_sticks_to_the_sessions_replica_until_it_is_overloaded() {
        let mut r = Router::new(RouterConfig::SessionAffinity {
            spill_abs_threshold: 4,
            spill_rel_threshold: 1.5,
        });
        let mut turn = req(100);
        turn.session = Some(9);
        let mut l = loads(&[(3, 3), (0, 0), (2, 2)]);
        // First turn: the least loaded replica.
        assert_eq!(r.route(&turn, &l, &mut Counter(0)), ReplicaId(1));
        // Replica 1 is now the busiest but within the thresholds: the session stays.
        l[1].num_waiting = 8;
        assert_eq!(r.route(&turn, &l, &mut Counter(0)), ReplicaId(1));
        // Overloaded: spill to the least loaded, and the session follows it.
        l[1].num_waiting = 20;
        assert_eq!(r.route(&turn, &l, &mut Counter(0)), ReplicaId(2));
        l[1].num_waiting = 0;
        assert_eq!(r.route(&turn, &l, &mut Counter(0)), ReplicaId(2));
        // Another session starts on the least loaded replica.
        let mut other = req(100);
        other.session = Some(10);
        assert_eq!(r.route(&other, &l, &mut Counter(0)), ReplicaId(1));
        // Their last turns still follow them, and end them.
        turn.last_turn = true;
        other.last_turn = true;
        assert_eq!(r.route(&turn, &l, &mut Counter(0)), ReplicaId(2));
        assert_eq!(r.route(&other, &l, &mut Counter(0)), ReplicaId(1));
        assert!(r.sessions.is_empty(), "sessions that ended are forgotten");
    }
}
