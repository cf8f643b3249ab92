//! A batching policy defined outside `vajra-core` — shortest remaining prompt first — runs in
//! the simulator and in the engine (CPU backend, a tiny random Llama) through the public
//! `BatchPolicy` trait, with no edit to `vajra-core`. Both runs check the policy's defining
//! property: requests that wait together are admitted in order of their prompt length; and the
//! same workload under FCFS (in-tree `vllm_v1`) admits them in arrival order, so the check can
//! fail.

use std::path::{Path, PathBuf};
use vajra_core::sched::config::{PolicyConfig, SchedulerConfig, VllmV1Config};
use vajra_core::sched::policy::BatchPolicy;
use vajra_core::time::Timestamp;

use vajra_tests::srpf;

/// Whether, over requests sorted by `key`, first-scheduled times never fall.
fn monotone(mut rows: Vec<(u32, u64, Timestamp)>) -> bool {
    rows.sort_by_key(|r| (r.0, r.1));
    rows.windows(2).all(|w| w[0].2 <= w[1].2)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const EXPERIMENT: &str = r#"
name = "srpf"
seed = 3
[model]
name = "meta-llama/Meta-Llama-3-8B"
[cluster]
device = "h100"
[scheduler]
max_num_seqs = 256
policy = { type = "vllm_v1", max_num_batched_tokens = 512 }
[workload]
num_requests = 200
max_tokens = 4096
arrival = { type = "all_at_once" }
lengths = { type = "independent", prompt = { type = "lognormal", median = 400.0, sigma = 0.8, max = 3000 }, output = { type = "lognormal", median = 30.0, sigma = 0.5, max = 100 } }
"#;

#[test]
fn an_out_of_tree_policy_runs_in_the_simulator_and_admits_shortest_prompts_first() {
    let dir = std::env::temp_dir().join(format!("vajra-srpf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("srpf.toml");
    std::fs::write(&path, EXPERIMENT).unwrap();
    let file = vajra_experiment::experiment::ExperimentFile::load(&path).expect("valid experiment");
    let point = &file.points[0];
    let prep = vajra_sim::run::prepare(&file, point).expect("prepares");
    let make = || srpf(512);
    let res = vajra_sim::run::simulate_with_policy(&file, point, &prep, &make).expect("runs");
    let rows = |res: &vajra_sim::sim::SimResult| -> Vec<(u32, u64, Timestamp)> {
        res.collector
            .requests
            .iter()
            .map(|r| {
                let t = r.first_scheduled_s.expect("every request ran");
                (r.prompt_tokens, r.request_id, Timestamp((t * 1e9) as u64))
            })
            .collect()
    };
    assert_eq!(res.collector.requests.len(), 200, "every request finished");
    assert!(monotone(rows(&res)), "SRPF admits in prompt-length order");
    let summary = vajra_sim::run::summarize(point, &prep, &res);
    let srpf_ttft = summary.metrics.latency_s.ttft.mean;

    // The in-tree FCFS policy on the same workload: arrival (id) order, not length order.
    let fcfs = vajra_sim::run::simulate_with_policy(&file, point, &prep, &|| {
        PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 512,
            ..Default::default()
        })
        .build()
    })
    .expect("runs");
    assert!(!monotone(rows(&fcfs)), "FCFS does not sort by length");
    let fcfs_ttft = vajra_sim::run::summarize(point, &prep, &fcfs)
        .metrics
        .latency_s
        .ttft
        .mean;
    assert!(
        srpf_ttft < fcfs_ttft,
        "shortest-first lowers mean TTFT on a burst: {srpf_ttft} vs FCFS {fcfs_ttft}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_out_of_tree_policy_runs_in_the_engine_on_the_cpu_backend() {
    use vajra_core::sampling::SamplingParams;
    use vajra_engine::engine::{EngineConfig, GenerateRequest};
    let model = root().join("tests/fixtures/tiny-llama");
    let cfg = |policy| EngineConfig {
        scheduler: SchedulerConfig::new(policy),
        ..EngineConfig::default()
    };
    let run = |policy: Box<dyn BatchPolicy>| {
        let v1 = PolicyConfig::VllmV1(Default::default());
        let mut e = vajra_engine::load_engine_with_policy(
            &model,
            cfg(v1),
            vajra_engine::BackendKind::Cpu,
            16,
            policy,
        )
        .expect("tiny-llama loads");
        // Added longest first, so arrival order is the reverse of length order.
        for len in [90u32, 70, 50, 30, 10] {
            let prompt = (0..len).map(|i| 1 + (i * 7 + len) % 300).collect();
            let sampling = SamplingParams {
                max_tokens: 4,
                ignore_eos: true,
                temperature: 0.0,
                ..SamplingParams::default()
            };
            e.add_request(GenerateRequest {
                prompt,
                sampling,
                priority: 0,
            })
            .expect("valid request");
        }
        let outs = e.run_to_completion().expect("runs");
        assert_eq!(outs.len(), 5);
        outs.iter()
            .map(|o| {
                let r = o.record.as_ref().expect("finished");
                assert_eq!(r.output_tokens, 4);
                (
                    r.prompt_tokens,
                    r.id.0,
                    r.first_scheduled.expect("scheduled"),
                )
            })
            .collect::<Vec<_>>()
    };
    // A budget of 40 tokens: one or two prompts start per step.
    assert!(monotone(run(srpf(40))), "SRPF on the engine");
    let fcfs = PolicyConfig::VllmV1(VllmV1Config {
        max_num_batched_tokens: 40,
        ..Default::default()
    })
    .build();
    assert!(
        !monotone(run(fcfs)),
        "FCFS on the engine starts the longest first"
    );
}
