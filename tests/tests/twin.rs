//! The proof that the two modes share one scheduler: the engine (CPU backend, a tiny random
//! Llama) serves a workload whose requests arrive between its steps, into a KV pool small
//! enough to force preemptions; the simulator, fed the engine's step times and arrivals
//! (`vajra-sim twin`), must form the very same steps — requests, new tokens, context,
//! sampling — for every in-tree policy and the out-of-tree test policy.

use std::path::{Path, PathBuf};
use vajra_core::config::{CacheConfig, SchedulerConfig};
use vajra_core::sampling::SamplingParams;
use vajra_engine::engine::{EngineConfig, GenerateRequest};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The experiment both modes run on `model` (a folder with `config.json`): a 16-block pool.
fn experiment(model: &Path, policy: &str, blocks: u32) -> String {
    format!(
        r#"name = "twin"
seed = 7
[model]
config = "{}"
max_model_len = 256
[cluster]
device = "h100"
[predictor]
profile = "roofline"
[scheduler]
max_num_seqs = 8
policy = {policy}
[cache]
block_size = 16
num_blocks = {blocks}
enable_prefix_caching = true
[workload]
num_requests = 1
arrival = {{ type = "all_at_once" }}
lengths = {{ type = "fixed", prompt = 8, output = 8 }}
"#,
        model.join("config.json").display()
    )
}

/// Serves the workload on the engine, writing the run folder and the step log into `dir`;
/// returns the engine's preemption count.
fn serve(
    model: &Path,
    exp: &str,
    dir: &Path,
    policy: Option<Box<dyn vajra_core::sched::policy::BatchPolicy>>,
) -> u64 {
    let t: toml::Table = exp.parse().unwrap();
    let scheduler: SchedulerConfig = t["scheduler"].clone().try_into().unwrap();
    let cache: CacheConfig = t["cache"].clone().try_into().unwrap();
    let cfg = EngineConfig {
        scheduler: scheduler.clone(),
        cache,
        max_model_len: Some(256),
        seed: 7,
    };
    let policy = policy.unwrap_or_else(|| scheduler.policy.build());
    let mut e = vajra_engine::load_engine_with_policy(
        model,
        cfg,
        vajra_engine::BackendKind::Cpu,
        16,
        policy,
    )
    .expect("the model loads");
    e.log_steps(Box::new(
        std::fs::File::create(dir.join("steps.csv")).unwrap(),
    ))
    .unwrap();
    e.record_run(&dir.join("run"), "tiny", Default::default())
        .unwrap();
    // Waves of requests between steps; prompts share no full block (distinct first tokens).
    let waves: [&[(u32, u32)]; 4] = [
        &[(70, 12), (40, 20), (90, 8)],
        &[(30, 24), (60, 10)],
        &[(100, 16)],
        &[(20, 30), (50, 12), (80, 6)],
    ];
    let mut next = 0u32;
    for (w, wave) in waves.iter().enumerate() {
        for &(len, out) in *wave {
            next += 1;
            let prompt = (0..len).map(|i| 1 + (next * 31 + i * 7) % 300).collect();
            e.add_request(GenerateRequest {
                prompt,
                sampling: SamplingParams {
                    max_tokens: out,
                    ignore_eos: true,
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                priority: 0,
            })
            .expect("valid request");
        }
        // A few steps before the next wave (the last wave runs to the end).
        let steps = if w + 1 < waves.len() { 3 } else { usize::MAX };
        for _ in 0..steps {
            if !e.has_unfinished() {
                break;
            }
            e.step().expect("a step");
        }
    }
    let preemptions = e.stats().num_preemptions;
    e.finish_run().unwrap();
    preemptions
}

fn check(model: &Path, name: &str, policy_toml: &str, oot: bool) -> u64 {
    let tag = model
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy());
    let dir = std::env::temp_dir().join(format!("vajra-twin-{tag}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exp = experiment(model, policy_toml, 16);
    let path = dir.join("exp.toml");
    std::fs::write(&path, &exp).unwrap();
    let engine_policy = oot.then(|| vajra_tests::srpf(64));
    let preemptions = serve(model, &exp, &dir, engine_policy);
    let factory = || vajra_tests::srpf(64);
    let report = vajra_sim::twin::twin(
        &path,
        &dir.join("run"),
        &dir.join("steps.csv"),
        None,
        &dir.join("twin"),
        oot.then_some(&factory as &vajra_sim::sim::PolicyFactory),
    )
    .unwrap();
    assert!(
        report.divergence.is_none(),
        "{name}: {} (engine preemptions {preemptions})",
        report.text()
    );
    assert!(
        report.engine_steps > 10,
        "{name}: {} steps",
        report.engine_steps
    );
    let _ = std::fs::remove_dir_all(&dir);
    preemptions
}

/// Every in-tree policy, then the out-of-tree one, on `model`.
fn every_policy(model: &Path) {
    let mut preempted = 0;
    for (name, policy) in [
        (
            "vllm_v1",
            r#"{ type = "vllm_v1", max_num_batched_tokens = 64 }"#,
        ),
        (
            "vllm_v1_whole",
            r#"{ type = "vllm_v1", max_num_batched_tokens = 256, enable_chunked_prefill = false }"#,
        ),
        (
            "vllm_v0",
            r#"{ type = "vllm_v0", max_num_batched_tokens = 256 }"#,
        ),
        ("sarathi", r#"{ type = "sarathi", chunk_size = 48 }"#),
        ("orca", r#"{ type = "orca" }"#),
        ("faster_transformer", r#"{ type = "faster_transformer" }"#),
        (
            "lightllm",
            r#"{ type = "lightllm", max_num_batched_tokens = 256 }"#,
        ),
    ] {
        preempted += check(model, name, policy, false);
    }
    assert!(preempted > 0, "the small pool forced preemptions somewhere");
    check(
        model,
        "out_of_tree",
        r#"{ type = "vllm_v1", max_num_batched_tokens = 64 }"#,
        true,
    );
}

#[test]
fn the_simulator_fed_the_engines_step_times_makes_the_engines_batches() {
    every_policy(&root().join("tests/fixtures/tiny-llama"));
}

#[test]
fn the_twin_holds_on_smollm2_too() {
    // `$VAJRA_SMOLLM2_DIR` (scripts/test.sh fetches it), else target/models/smollm2.
    let dir = std::env::var_os("VAJRA_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/models/smollm2"));
    if !dir.join("model.safetensors").exists() {
        let why = format!(
            "no converted SmolLM2 at {} (run scripts/fetch-smollm2.sh, or scripts/test.sh which does)",
            dir.display()
        );
        assert!(
            std::env::var_os("VAJRA_REQUIRE_ALL").is_none(),
            "VAJRA_REQUIRE_ALL is set and the SmolLM2 twin cannot run: {why}"
        );
        eprintln!("SKIPPED the_twin_holds_on_smollm2_too: {why}");
        return;
    }
    every_policy(&dir);
}
