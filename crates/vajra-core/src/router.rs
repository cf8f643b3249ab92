//! Global routers: which replica of a cluster receives an arriving request.
//!
//! The caller (the simulator's cluster, or a future multi-replica engine) passes the current
//! [`ReplicaLoad`] of every replica; randomness comes in through [`RandomSource`], so this
//! module owns no RNG. Ties always go to the lowest replica index, which keeps runs
//! reproducible. Load is *outstanding* requests, waiting plus running (Vidur's LOR counts only
//! the waiting queue and so piles load onto replica 0).

use crate::error::{Result, ensure};
use crate::ids::ReplicaId;
use serde::{Deserialize, Serialize};

/// Default absolute imbalance (outstanding requests) above which prefix affinity gives way to
/// load balance (SGLang's `balance_abs_threshold`).
pub const DEFAULT_BALANCE_ABS_THRESHOLD: u32 = 32;
/// Default relative imbalance above which prefix affinity gives way to load balance.
pub const DEFAULT_BALANCE_REL_THRESHOLD: f64 = 1.5;

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
    /// The replica with the smallest fraction of KV blocks in use.
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
}

fn default_abs() -> u32 {
    DEFAULT_BALANCE_ABS_THRESHOLD
}
fn default_rel() -> f64 {
    DEFAULT_BALANCE_REL_THRESHOLD
}

impl RouterConfig {
    /// Every router with its default parameters (the registry's list of names).
    pub fn registered() -> [RouterConfig; 6] {
        [
            RouterConfig::RoundRobin,
            RouterConfig::Random,
            RouterConfig::LeastOutstanding,
            RouterConfig::LeastKvUsage,
            RouterConfig::PowerOfTwo,
            RouterConfig::PrefixAffinity {
                balance_abs_threshold: default_abs(),
                balance_rel_threshold: default_rel(),
            },
        ]
    }

    /// The router's name as written in config files.
    pub fn name(&self) -> &'static str {
        match self {
            RouterConfig::RoundRobin => "round_robin",
            RouterConfig::Random => "random",
            RouterConfig::LeastOutstanding => "least_outstanding",
            RouterConfig::LeastKvUsage => "least_kv_usage",
            RouterConfig::PowerOfTwo => "power_of_two",
            RouterConfig::PrefixAffinity { .. } => "prefix_affinity",
        }
    }

    /// Checks the thresholds.
    ///
    /// # Errors
    /// A relative threshold below 1 or not finite.
    pub fn validate(&self) -> Result<()> {
        if let RouterConfig::PrefixAffinity {
            balance_rel_threshold: r,
            ..
        } = self
        {
            ensure(
                r.is_finite() && *r >= 1.0,
                "router.balance_rel_threshold",
                r,
                "a finite number ≥ 1",
            )?;
        }
        Ok(())
    }
}

/// A router instance (holds the round-robin cursor).
#[derive(Debug, Clone)]
pub struct Router {
    cfg: RouterConfig,
    next: usize,
}

fn uniform(rng: &mut dyn RandomSource, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

fn least_by<K: PartialOrd>(loads: &[ReplicaLoad], key: impl Fn(&ReplicaLoad) -> K) -> usize {
    let mut best = 0;
    for i in 1..loads.len() {
        if key(&loads[i]) < key(&loads[best]) {
            best = i;
        }
    }
    best
}

impl Router {
    /// A router for `cfg`.
    pub fn new(cfg: RouterConfig) -> Self {
        Router { cfg, next: 0 }
    }

    /// Whether [`ReplicaLoad::cached_prefix_tokens`] must be filled in.
    pub fn needs_prefix_lookup(&self) -> bool {
        matches!(self.cfg, RouterConfig::PrefixAffinity { .. })
    }

    /// Picks a replica.
    ///
    /// # Panics
    /// If `loads` is empty.
    pub fn route(&mut self, loads: &[ReplicaLoad], rng: &mut dyn RandomSource) -> ReplicaId {
        assert!(!loads.is_empty(), "routing needs at least one replica");
        let n = loads.len();
        let i = match self.cfg {
            RouterConfig::RoundRobin => {
                let i = self.next % n;
                self.next = (self.next + 1) % n;
                i
            }
            RouterConfig::Random => uniform(rng, n),
            RouterConfig::LeastOutstanding => least_by(loads, ReplicaLoad::outstanding),
            RouterConfig::LeastKvUsage => least_by(loads, |l| (l.kv_usage, l.outstanding())),
            RouterConfig::PowerOfTwo => {
                if n == 1 {
                    0
                } else {
                    let a = uniform(rng, n);
                    let b = (a + 1 + uniform(rng, n - 1)) % n;
                    let (lo, hi) = (a.min(b), a.max(b));
                    if loads[hi].outstanding() < loads[lo].outstanding() {
                        hi
                    } else {
                        lo
                    }
                }
            }
            RouterConfig::PrefixAffinity {
                balance_abs_threshold,
                balance_rel_threshold,
            } => {
                let least = least_by(loads, ReplicaLoad::outstanding);
                let min = loads[least].outstanding();
                let max = loads
                    .iter()
                    .map(ReplicaLoad::outstanding)
                    .max()
                    .unwrap_or(0);
                let imbalanced = max - min > balance_abs_threshold
                    && f64::from(max) > balance_rel_threshold * f64::from(min);
                let best = least_by(loads, |l| {
                    (std::cmp::Reverse(l.cached_prefix_tokens), l.outstanding())
                });
                if imbalanced || loads[best].cached_prefix_tokens == 0 {
                    least
                } else {
                    best
                }
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
        let picks: Vec<u32> = (0..5).map(|_| r.route(&l, &mut Counter(0)).0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1]);
    }

    #[test]
    fn least_outstanding_counts_running_requests_not_just_waiting() {
        let mut r = Router::new(RouterConfig::LeastOutstanding);
        // Replica 0 has an empty queue but 10 running; replica 1 has 2 waiting.
        let l = loads(&[(0, 10), (2, 0)]);
        assert_eq!(r.route(&l, &mut Counter(0)), ReplicaId(1));
    }

    #[test]
    fn random_is_reproducible_for_the_same_source_and_covers_all_replicas() {
        let l = loads(&[(0, 0); 4]);
        let run = |seed| {
            let mut r = Router::new(RouterConfig::Random);
            let mut rng = Counter(seed);
            (0..64).map(|_| r.route(&l, &mut rng).0).collect::<Vec<_>>()
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
            assert_eq!(r.route(&l, &mut Counter(3)), ReplicaId(1));
        }
    }

    #[test]
    fn least_kv_usage_picks_the_emptiest_cache() {
        let mut r = Router::new(RouterConfig::LeastKvUsage);
        let mut l = loads(&[(0, 0); 3]);
        l[0].kv_usage = 0.5;
        l[1].kv_usage = 0.1;
        l[2].kv_usage = 0.3;
        assert_eq!(r.route(&l, &mut Counter(0)), ReplicaId(1));
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
        assert_eq!(r.route(&l, &mut Counter(0)), ReplicaId(0));
        // Replica 0 now far busier: balance wins.
        l[0].num_waiting = 20;
        assert_eq!(r.route(&l, &mut Counter(0)), ReplicaId(1));
        // Nothing cached anywhere: least outstanding.
        let l = loads(&[(3, 0), (1, 0)]);
        assert_eq!(r.route(&l, &mut Counter(0)), ReplicaId(1));
    }
}
