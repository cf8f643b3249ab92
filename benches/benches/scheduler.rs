//! `schedule()` + `update_from_output()` for a 256-request decode step, with 1,000 and 10,000
//! requests waiting behind `max_num_seqs`, for synthetic prompts (the simulator) and, under
//! `vllm_v1`, token prompts (the engine). Run: `cargo bench -p vajra-benches --bench scheduler`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};
use vajra_benches::{Prompts, STEPS_PER_FIXTURE, decode_state};
use vajra_core::config::PolicyConfig;
use vajra_core::sched::config::{SarathiConfig, VllmV1Config};
use vajra_core::sched::output::ModelRunnerOutput;
use vajra_core::time::Timestamp;

fn bench_decode_step(c: &mut Criterion) {
    let policies = [
        (
            "vllm_v1",
            PolicyConfig::VllmV1(VllmV1Config {
                max_num_batched_tokens: 8192,
                ..Default::default()
            }),
        ),
        ("sarathi", PolicyConfig::Sarathi(SarathiConfig::default())),
    ];
    let mut cases = Vec::new();
    for (name, policy) in &policies {
        for waiting in [1_000u32, 10_000] {
            cases.push((
                format!("{name}/waiting_{waiting}"),
                policy,
                waiting,
                Prompts::Synthetic,
            ));
        }
    }
    cases.push((
        "vllm_v1/tokens/waiting_1000".to_string(),
        &policies[0].1,
        1_000,
        Prompts::Tokens,
    ));
    let mut g = c.benchmark_group("decode_step_256_running");
    for (label, policy, waiting, prompts) in cases {
        {
            g.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let mut s = decode_state(policy.clone(), 256, waiting, prompts);
                        let n = (iters - done).min(STEPS_PER_FIXTURE);
                        // The executor loop's intended form: buffers reused across steps.
                        let mut res = ModelRunnerOutput::default();
                        let mut events = Vec::new();
                        let start = Instant::now();
                        for step in 0..n {
                            let now = Timestamp(step);
                            let out = s.schedule(now);
                            res.fill_uniform(&out, 1);
                            events.clear();
                            s.update_from_output_into(&out, &res, now, &mut events);
                            black_box(&events);
                            s.recycle(out);
                        }
                        total += start.elapsed();
                        done += n;
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_decode_step
}
criterion_main!(benches);
