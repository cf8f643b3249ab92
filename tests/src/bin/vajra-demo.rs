//! `vajra-demo`: the main job until the simulator lands. It runs every scheduling policy of
//! vajra-core on the same seeded workload through a minimal replica loop whose step time is a
//! linear stand-in (5 ms + 20 µs per batched token, not a measured profile), and prints one row
//! per policy: requests finished, steps, mean batch, preemptions, prefix-cache hit rate, and
//! TTFT / end-to-end latency percentiles in simulated seconds.
//!
//! Usage: `vajra-demo [--requests N] [--seed S] [--blocks B]`

use std::process::ExitCode;
use std::time::Instant;
use vajra_core::config::{QueuePolicy, SchedulerConfig};
use vajra_tests::{Replica, WorkloadSpec, all_policies, describe, workload};

struct Args {
    requests: usize,
    seed: u64,
    blocks: u32,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        requests: 2000,
        seed: 0,
        blocks: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("invalid value for {flag}: {value:?} (allowed: {what})");
        match flag.as_str() {
            "--requests" => a.requests = value.parse().map_err(|_| bad("an integer ≥ 1"))?,
            "--seed" => a.seed = value.parse().map_err(|_| bad("an unsigned integer"))?,
            "--blocks" => a.blocks = value.parse().map_err(|_| bad("an integer ≥ 64"))?,
            other => {
                return Err(format!(
                    "unknown flag {other} (allowed: --requests, --seed, --blocks)"
                ));
            }
        }
    }
    if a.requests == 0 || a.blocks < 64 {
        return Err("--requests must be ≥ 1 and --blocks ≥ 64".into());
    }
    Ok(a)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let spec = WorkloadSpec {
        num_requests: args.requests,
        prompt_len: (32, 900),
        output_len: (16, 120),
        mean_gap: vajra_core::time::Duration::from_millis(12),
        tenants: 4,
        priorities: 1,
        prefix_families: 8,
    };
    let reqs = workload(&spec, args.seed);
    println!(
        "{} requests, seed {}, {} KV blocks of 16 tokens; step time = 5 ms + 20 µs/token (stand-in)",
        args.requests, args.seed, args.blocks
    );
    println!(
        "{:<34} {:>6} {:>7} {:>6} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "policy",
        "done",
        "steps",
        "batch",
        "preempt",
        "hit%",
        "ttft_p50",
        "ttft_p99",
        "e2e_p50",
        "e2e_p99",
        "wall_ms"
    );
    for policy in all_policies() {
        let label = describe(&policy);
        let cfg = SchedulerConfig {
            queue: QueuePolicy::Fcfs,
            ..SchedulerConfig::new(policy)
        };
        let mut r = Replica::new(cfg, args.blocks);
        r.check = false;
        let start = Instant::now();
        let finished_all = r.run(reqs.clone(), 10_000_000);
        let wall = start.elapsed().as_secs_f64() * 1e3;
        let mut ttft: Vec<f64> = r
            .finished
            .iter()
            .filter_map(|f| f.first_token.map(|t| (t - f.arrival).as_secs_f64()))
            .collect();
        let mut e2e: Vec<f64> = r
            .finished
            .iter()
            .map(|f| (f.finished_at - f.arrival).as_secs_f64())
            .collect();
        let st = r.sched.stats();
        let hit = 100.0 * st.kv.prefix_hit_tokens as f64 / st.kv.prefix_query_tokens.max(1) as f64;
        println!(
            "{:<34} {:>6} {:>7} {:>6.1} {:>7} {:>6.1} {:>8.3} {:>8.3} {:>8.2} {:>8.2} {:>7.0}{}",
            label,
            r.finished.len(),
            r.steps,
            r.batched_requests as f64 / r.steps.max(1) as f64,
            st.num_preemptions,
            hit,
            pct(&mut ttft, 0.5),
            pct(&mut ttft, 0.99),
            pct(&mut e2e, 0.5),
            pct(&mut e2e, 0.99),
            wall,
            if finished_all {
                ""
            } else {
                "  (step limit hit)"
            }
        );
    }
    ExitCode::SUCCESS
}
