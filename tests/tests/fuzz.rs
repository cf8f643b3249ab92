//! Property-based fuzzing of what users hand the tools: experiment files (read through the
//! experiment schema, set up as a run and, when small, simulated), trace files, and bodies of
//! the OpenAI endpoints. Each property: no panic, no hang, and every rejection says what it
//! rejects (the key, its line, or the parameter).
//!
//! Cases per property: 64 (what CI runs in well under a minute); `VAJRA_FUZZ_CASES=N` for more.
//! proptest shrinks a failing input and prints it; the inputs that found bugs are kept as
//! regression tests beside the code they broke (the hardening tests of `vajra-sim/tests/e2e.rs`
//! and `vajra-engine/tests/server.rs`).

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use vajra_experiment::ExperimentFile;

fn config() -> ProptestConfig {
    let cases = std::env::var("VAJRA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        // Inputs are cheap; a failure is shrunk to a small one.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn scratch(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "vajra-fuzz-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const EXPERIMENT: &str = r#"
name = "fuzz"
seed = 3
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
num_replicas = 2
[scheduler]
policy = { type = "sarathi", chunk_size = 256 }
max_num_seqs = 32
[cache]
block_size = 16
[predictor]
profile = "roofline"
[workload]
num_requests = 8
arrival = { type = "poisson", qps = 4.0 }
lengths = { type = "fixed", prompt = 100, output = 10 }
[slo]
ttft_s = 1.0
"#;

/// Leaves of the experiment a user may get wrong.
const KEYS: &[&str] = &[
    "name",
    "seed",
    "model.name",
    "model.max_model_len",
    "cluster.device",
    "cluster.num_replicas",
    "cluster.tensor_parallel",
    "cluster.pipeline_parallel",
    "scheduler.policy.type",
    "scheduler.policy.chunk_size",
    "scheduler.max_num_seqs",
    "scheduler.preemption",
    "cache.block_size",
    "cache.num_blocks",
    "cache.gpu_memory_utilization",
    "cache.watermark",
    "cache.swap_blocks",
    "workload.num_requests",
    "workload.duration_s",
    "workload.max_tokens",
    "workload.arrival.type",
    "workload.arrival.qps",
    "workload.lengths.prompt",
    "workload.lengths.output",
    "slo.ttft_s",
    "predictor.cpu_overhead_us",
    "router.type",
    "output.dir",
];

fn toml_value() -> impl Strategy<Value = toml::Value> {
    use toml::Value as V;
    prop_oneof![
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(3),
            Just(4096),
            Just(i64::from(u32::MAX)),
            Just(i64::from(u32::MAX) + 1),
            Just(i64::MAX),
            any::<i64>(),
        ]
        .prop_map(V::Integer),
        prop_oneof![
            Just(0.0f64),
            Just(-1.0),
            Just(0.5),
            Just(1e-12),
            Just(1e30),
            Just(f64::NAN),
            Just(f64::INFINITY),
            any::<f64>(),
        ]
        .prop_map(V::Float),
        prop_oneof![
            Just(String::new()),
            Just("x".to_owned()),
            Just("../../etc".to_owned()),
            Just("vllm_v1".to_owned()),
            Just("swap".to_owned()),
            "[a-z_]{1,12}",
        ]
        .prop_map(V::String),
        any::<bool>().prop_map(V::Boolean),
        Just(V::Array(Vec::new())),
        Just(V::Table(toml::Table::new())),
    ]
}

/// Sets `value` at the dotted `key`, making tables on the way (a scalar on the way is replaced).
fn set(root: &mut toml::Table, key: &str, value: toml::Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = root;
    for p in &parts[..parts.len() - 1] {
        let e = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !e.is_table() {
            *e = toml::Value::Table(toml::Table::new());
        }
        t = e.as_table_mut().expect("a table");
    }
    t.insert(parts[parts.len() - 1].to_owned(), value);
}

/// Whether an error message points at `key` (its last part or its table) or at a line.
fn names(message: &str, key: &str) -> bool {
    let mut parts = key.rsplit('.');
    let leaf = parts.next().unwrap_or(key);
    let table = parts.next().unwrap_or(leaf);
    message.contains(leaf) || message.contains(table) || message.contains("line")
}

/// Reads, sets up and (when it is small) simulates one experiment file; an error must name
/// what it rejects.
fn try_experiment(path: &Path, mutated: &[&str]) -> Result<(), TestCaseError> {
    let file = match ExperimentFile::load(path) {
        Ok(f) => f,
        Err(e) => {
            let m = e.to_string();
            prop_assert!(
                mutated.iter().any(|k| names(&m, k)),
                "the rejection names none of {mutated:?}: {m}"
            );
            return Ok(());
        }
    };
    for p in &file.points {
        let prep = match vajra_sim::run::prepare(&file, p) {
            Ok(prep) => prep,
            Err(e) => {
                let m = e.to_string();
                prop_assert!(
                    mutated.iter().any(|k| names(&m, k)) || m.contains("does not fit"),
                    "set-up error names none of {mutated:?}: {m}"
                );
                continue;
            }
        };
        let e = &p.experiment;
        let small = e.workload.num_requests.is_some_and(|n| n <= 64)
            && e.cluster.num_replicas <= 16
            && e.workload.duration_s.is_none();
        if small {
            // Errors are allowed (a request longer than the cache, ...); panics and hangs not.
            if let Err(err) = vajra_sim::run::simulate(&file, p, &prep, None, false, true, None) {
                prop_assert!(!err.to_string().is_empty());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn experiment_files_are_run_or_rejected_by_name(
        edits in prop::collection::vec((0..KEYS.len(), toml_value()), 1..4)
    ) {
        let mut t: toml::Table = toml::from_str(EXPERIMENT).unwrap();
        let mut mutated = Vec::new();
        for (k, v) in edits {
            set(&mut t, KEYS[k], v);
            mutated.push(KEYS[k]);
        }
        let dir = scratch("exp");
        let path = dir.join("e.toml");
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
        let r = try_experiment(&path, &mutated);
        let _ = std::fs::remove_dir_all(&dir);
        r?;
    }

    #[test]
    fn trace_files_are_read_or_rejected_with_their_place(
        header in prop_oneof![
            Just("arrived_at,num_prefill_tokens,num_decode_tokens".to_owned()),
            Just("num_prefill_tokens,num_decode_tokens".to_owned()),
            Just("TIMESTAMP,ContextTokens,GeneratedTokens".to_owned()),
            Just(String::new()),
            "[a-z_,]{0,40}",
        ],
        rows in prop::collection::vec(
            prop::collection::vec(
                prop_oneof![
                    Just(String::new()),
                    Just("-1".to_owned()),
                    Just("0".to_owned()),
                    Just("12.5".to_owned()),
                    Just("1e300".to_owned()),
                    Just("nan".to_owned()),
                    Just("2023-11-16 18:15:46.5000000".to_owned()),
                    (0u64..5_000_000).prop_map(|n| n.to_string()),
                    "[ -~]{0,8}",
                ],
                0..5,
            ),
            0..12,
        )
    ) {
        let dir = scratch("trace");
        let path = dir.join("t.csv");
        let mut text = header.clone();
        for r in &rows {
            text.push('\n');
            text.push_str(&r.join(","));
        }
        std::fs::write(&path, &text).unwrap();
        for need_arrivals in [false, true] {
            if let Err(e) = vajra_workload::trace::read_trace(
                &path,
                vajra_workload::config::TraceFormat::Auto,
                need_arrivals,
            ) {
                let m = e.to_string();
                prop_assert!(m.contains("t.csv"), "the error does not name the file: {m}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn http_bodies_are_served_or_rejected_naming_the_parameter(
        chat in any::<bool>(),
        edits in prop::collection::vec((0..BODY_KEYS.len(), json_value()), 0..4),
        garbage in prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        use vajra_engine::server::openai;
        let body = match garbage {
            Some(bytes) => bytes,
            None => {
                let mut v: serde_json::Value = serde_json::from_str(if chat {
                    r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#
                } else {
                    r#"{"prompt":"hi","max_tokens":4}"#
                })
                .unwrap();
                for (k, val) in edits {
                    v[BODY_KEYS[k]] = val;
                }
                serde_json::to_vec(&v).unwrap()
            }
        };
        let checked: Result<(), openai::ApiError> = if chat {
            openai::parse::<openai::ChatBody>(&body).and_then(|b| {
                b.check_unsupported()?;
                openai::messages(&b.messages)?;
                let max = openai::max_tokens(b.common.max_tokens, "max_tokens", 8, 256, true)?;
                openai::sampling(&b.common, max, b.top_logprobs).map(|_| ())
            })
        } else {
            openai::parse::<openai::CompletionBody>(&body).and_then(|b| {
                let max = openai::max_tokens(b.common.max_tokens, "max_tokens", 8, 256, false)?;
                openai::sampling(&b.common, max, b.logprobs).map(|_| ())
            })
        };
        if let Err(e) = checked {
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.param.as_deref().is_some_and(|p| !p.is_empty()), "no parameter: {e:?}");
        }
    }
}

/// Keys of the two OpenAI bodies, and a few no client sends.
const BODY_KEYS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "priority",
    "user",
    "tools",
    "tool_choice",
    "response_format",
    "echo",
    "best_of",
    "bogus",
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value as J, json};
    prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        prop_oneof![
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(1)),
            Just(json!(1.5)),
            Just(json!(1e300)),
            Just(json!(u64::MAX)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
        ],
        "[ -~]{0,10}".prop_map(J::String),
        Just(json!([])),
        Just(json!([1, -1, 2.5])),
        Just(json!(["a", "b"])),
        Just(json!({})),
        Just(json!({"include_usage": "yes"})),
        Just(json!([{"role": "user", "content": 5}])),
        Just(json!([{"role": "user", "content": [{"type": "text"}]}])),
        Just(json!({"type": "json_object"})),
    ]
}
