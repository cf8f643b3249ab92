//! Seeded randomized invariant tests: more than 100,000 scheduler operations across every
//! policy, queue order and preemption mode, checking after each operation that blocks are
//! conserved (allocated + free = total, no double free, reference counts equal holders), that
//! the token budget and `max_num_seqs` hold, and, separately, that every request finishes when
//! memory allows and that runs are reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, VecDeque};
use vajra_core::config::{CacheConfig, PolicyConfig, PreemptionMode, QueuePolicy, SchedulerConfig};
use vajra_core::ids::RequestId;
use vajra_core::kv::{AllocSpec, BlockTable, KvCacheManager, SeqContent};
use vajra_core::request::{FinishReason, Prompt};
use vajra_core::sched::output::{ModelRunnerOutput, RequestEvent, SchedulerOutput};
use vajra_core::sched::{Scheduler, check_invariants};
use vajra_core::time::Timestamp;
use vajra_tests::{Replica, WorkloadSpec, all_policies, workload};

fn queues() -> Vec<QueuePolicy> {
    vec![
        QueuePolicy::Fcfs,
        QueuePolicy::Priority { aging_per_sec: 0.5 },
        QueuePolicy::Sjf {
            aging_tokens_per_sec: 200.0,
        },
        QueuePolicy::Edf,
        QueuePolicy::Vtc {
            input_weight: 1.0,
            output_weight: 2.0,
        },
    ]
}

/// The most tokens a step of this policy may batch, given its running decodes.
fn budget_ok(policy: &PolicyConfig, out: &SchedulerOutput) -> bool {
    let decodes = out.scheduled.iter().filter(|e| e.num_tokens == 1).count() as u32;
    match policy {
        PolicyConfig::VllmV1(c) => out.num_batched_tokens <= c.max_num_batched_tokens,
        PolicyConfig::Sarathi(c) => {
            let chunk = c.chunk_schedule.map_or(c.chunk_size, |s| s.high);
            out.num_batched_tokens <= chunk.max(decodes)
        }
        PolicyConfig::VllmV0(c) => out.num_batched_tokens <= c.max_num_batched_tokens.max(decodes),
        PolicyConfig::Lightllm(c) => {
            out.num_batched_tokens <= c.max_num_batched_tokens.max(decodes)
        }
        PolicyConfig::Orca(_) | PolicyConfig::FasterTransformer(_) => true,
    }
}

/// Random add / schedule (up to two micro-batches in flight) / complete / abort operations.
fn random_ops(cfg: SchedulerConfig, seed: u64, ops: usize) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cache = CacheConfig {
        swap_blocks: 32,
        ..CacheConfig::default()
    };
    let max_seqs = cfg.max_num_seqs as usize;
    let policy = cfg.policy.clone();
    let mut s = Scheduler::new(cfg, &cache, 64, 1024).unwrap();
    let families: Vec<Vec<u32>> = (0..4)
        .map(|_| (0..300).map(|_| rng.random_range(0..1000)).collect())
        .collect();
    let mut live: BTreeSet<u64> = BTreeSet::new();
    let mut in_flight: VecDeque<SchedulerOutput> = VecDeque::new();
    let (mut next, mut now, mut finished) = (0u64, 0u64, 0u64);
    for _ in 0..ops {
        now += 1_000;
        let t = Timestamp(now);
        match rng.random_range(0..100) {
            0..30 => {
                let len = rng.random_range(1..300u32);
                let prompt = if rng.random_bool(0.5) {
                    let fam = &families[rng.random_range(0..families.len())];
                    let shared = rng.random_range(0..=len) as usize;
                    let mut toks = fam[..shared].to_vec();
                    toks.extend((shared as u32..len).map(|_| rng.random_range(0..1000)));
                    Prompt::Tokens(toks)
                } else {
                    Prompt::synthetic(len)
                };
                let mut r = vajra_core::request::Request::new(
                    RequestId(next),
                    prompt,
                    rng.random_range(1..40),
                    t,
                );
                r.priority = rng.random_range(0..3);
                r.tenant = vajra_core::ids::TenantId(rng.random_range(0..3));
                r.deadline = rng
                    .random_bool(0.5)
                    .then(|| Timestamp(now + rng.random_range(0..1_000_000)));
                s.add_request(r, t).unwrap();
                live.insert(next);
                next += 1;
            }
            30..65 if in_flight.len() < 2 => {
                let out = s.schedule(t);
                assert!(out.scheduled.len() <= max_seqs, "max_num_seqs exceeded");
                assert!(
                    budget_ok(&policy, &out),
                    "token budget exceeded: {}",
                    out.num_batched_tokens
                );
                let total: u32 = out.scheduled.iter().map(|e| e.num_tokens).sum();
                assert_eq!(total, out.num_batched_tokens);
                if !out.is_empty() {
                    in_flight.push_back(out);
                }
            }
            30..95 => {
                if let Some(out) = in_flight.pop_front() {
                    let res = ModelRunnerOutput::uniform(&out, rng.random_range(0..1000));
                    for ev in s.update_from_output(&out, &res, t) {
                        if let RequestEvent::Finished(r) = ev {
                            assert!(live.remove(&r.id.0), "finished twice");
                            finished += 1;
                        }
                    }
                }
            }
            _ => {
                if !live.is_empty() {
                    let k = rng.random_range(0..live.len());
                    let id = *live.iter().nth(k).unwrap();
                    s.abort(RequestId(id), t).unwrap();
                    live.remove(&id);
                }
            }
        }
        check_invariants(&s);
    }
    (finished, s.stats().num_preemptions)
}

#[test]
fn block_conservation_budgets_and_caps_hold_over_100k_random_operations() {
    let policies = all_policies();
    let mut total_ops = 0;
    let mut preemptions = 0;
    for (i, policy) in policies.iter().enumerate() {
        let q = queues()[i % 5];
        for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
            let cfg = SchedulerConfig {
                policy: policy.clone(),
                max_num_seqs: 16,
                queue: q,
                preemption: mode,
                late_requests: Default::default(),
                // Half the runs form steps ahead (a staged arrival keeps every invariant).
                async_scheduling: i % 2 == 1,
            };
            let (finished, p) = random_ops(cfg, 1000 + i as u64, 5_000);
            assert!(finished > 0, "{} finished nothing", policy.name());
            preemptions += p;
            total_ops += 5_000;
        }
    }
    assert!(total_ops >= 100_000);
    assert!(
        preemptions > 0,
        "the pool is small enough to force preemptions"
    );
}

#[test]
fn identical_prefixes_return_identical_blocks_over_random_allocations() {
    let mut rng = StdRng::seed_from_u64(7);
    let cache = CacheConfig {
        block_size: 16,
        ..Default::default()
    };
    let mut kv = KvCacheManager::new(&cache, 256);
    let families: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..512).map(|_| rng.random_range(0..1000)).collect())
        .collect();
    // (prompt, table) of requests holding blocks
    let mut held: Vec<(Prompt, BlockTable)> = Vec::new();
    for i in 0..20_000u64 {
        if held.len() > 8 || (rng.random_bool(0.3) && !held.is_empty()) {
            let k = rng.random_range(0..held.len());
            let (_, mut t) = held.swap_remove(k);
            kv.free(&mut t);
            continue;
        }
        let fam = rng.random_range(0..families.len());
        let len = rng.random_range(17..512usize);
        let prompt = Prompt::Tokens(families[fam][..len].to_vec());
        let seq = SeqContent {
            request: RequestId(i),
            prompt: &prompt,
            output: &[],
            num_output: 0,
            salt: None,
        };
        let mut t = BlockTable::default();
        let (hits, hit_tokens) = kv.get_computed_blocks(&mut t, &seq);
        // A holder with the same leading full blocks, cached, hands us exactly those blocks (up
        // to the cap that leaves one token to compute). Its uncached blocks are duplicates made
        // while the cache already held that content (as in vLLM, they are not de-duplicated).
        let cap = (len - 1) / 16;
        for (p, other) in &held {
            let (Prompt::Tokens(o), Prompt::Tokens(me)) = (p, &prompt) else {
                unreachable!()
            };
            let common = (o.iter().zip(me).take_while(|(a, b)| a == b).count() / 16).min(cap);
            for (i, b) in other.blocks[..common].iter().enumerate() {
                if kv.pool().hash_of(*b).is_some() {
                    assert!(i < hits.len(), "a cached common block was missed");
                    assert_eq!(hits[i], *b, "same prefix, same block");
                }
            }
        }
        assert!(
            hit_tokens < len as u32,
            "at least one token is left to compute"
        );
        let spec = AllocSpec {
            num_computed: hit_tokens,
            new_computed: &hits,
            num_new_tokens: len as u32 - hit_tokens,
            apply_watermark: false,
        };
        if kv.allocate_slots(&mut t, &spec).is_some() {
            kv.cache_full_blocks(&mut t, &seq, len as u32);
            held.push((prompt, t));
        }
        kv.pool().check_invariants();
    }
}

#[test]
fn every_request_finishes_under_every_policy_queue_and_preemption_mode() {
    let spec = WorkloadSpec {
        num_requests: 150,
        tenants: 3,
        priorities: 3,
        prefix_families: 2,
        ..Default::default()
    };
    for (i, policy) in all_policies().into_iter().enumerate() {
        for q in queues() {
            for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
                let cfg = SchedulerConfig {
                    policy: policy.clone(),
                    max_num_seqs: 32,
                    queue: q,
                    preemption: mode,
                    late_requests: Default::default(),
                    async_scheduling: matches!(mode, PreemptionMode::Swap),
                };
                let cache = CacheConfig {
                    swap_blocks: 64,
                    ..Default::default()
                };
                let mut r = Replica::with_cache(cfg, &cache, 128);
                r.check = false;
                let reqs = workload(&spec, i as u64);
                let expected: Vec<(u64, u32)> =
                    reqs.iter().map(|r| (r.id.0, r.max_tokens())).collect();
                assert!(
                    r.run(reqs, 200_000),
                    "{} {q:?} {mode:?} did not finish",
                    policy.name()
                );
                let mut got: Vec<(u64, u32)> = r
                    .finished
                    .iter()
                    .map(|f| (f.id.0, f.output_tokens))
                    .collect();
                got.sort();
                assert_eq!(
                    got,
                    expected,
                    "{} {q:?}: exact output lengths",
                    policy.name()
                );
                assert!(r.finished.iter().all(|f| f.reason == FinishReason::Length));
                let st = r.sched.stats();
                assert_eq!(st.kv.num_free, 128, "all blocks returned");
                check_invariants(&r.sched);
            }
        }
    }
}

#[test]
fn the_same_seed_and_inputs_give_identical_results() {
    let run = || {
        let cfg = SchedulerConfig::new(all_policies()[0].clone());
        let mut r = Replica::new(cfg, 96);
        r.check = false;
        let spec = WorkloadSpec {
            prefix_families: 2,
            ..Default::default()
        };
        assert!(r.run(workload(&spec, 42), 100_000));
        (
            format!("{:?}", r.finished),
            r.sched.stats().kv.prefix_hit_tokens,
        )
    };
    assert_eq!(run(), run());
}
