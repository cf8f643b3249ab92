//! Replays of two real vLLM v0.19 runs (LLMServingSim's examples: Llama-3.1-8B on an RTX 4090
//! and an RTX PRO 6000): `import vllm` writes the experiment, `run` simulates it, `compare`
//! measures the error against vLLM's request log. The simulator is deterministic, so the
//! bounds are a proper test, not a timing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sim(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_vajra-sim"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "vajra-sim {args:?}: {text}");
    text
}

/// `(metric stat) → error` from a comparison's `fidelity.csv`.
fn errors(dir: &Path) -> Vec<(String, f64)> {
    let mut rdr = csv::Reader::from_path(dir.join("fidelity/fidelity.csv")).unwrap();
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            (format!("{} {}", &r[0], &r[1]), r[4].parse().unwrap())
        })
        .collect()
}

fn replay(gpu: &str, file: &str) -> Option<Vec<(String, f64)>> {
    let example = repo().join(format!(
        "../shared/reference/llmservingsim/bench/examples/{gpu}/Llama-3.1-8B"
    ));
    if !example.exists() {
        eprintln!(
            "SKIPPED: {} is not present: the vLLM replays need ../shared/reference/llmservingsim/",
            example.display()
        );
        return None;
    }
    let tmp = std::env::temp_dir().join(format!("vajra-vllm-{gpu}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // The importer writes the same experiment as the shipped one (paths relative to it).
    let written = tmp.join(file);
    sim(&[
        "import",
        "vllm",
        example.to_str().unwrap(),
        "-o",
        written.to_str().unwrap(),
    ]);
    let shipped = repo().join("benches/experiments").join(file);
    let strip = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("path =") && !l.contains("profile ="))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        strip(&written),
        strip(&shipped),
        "{file}: the shipped experiment is what `import vllm` writes (rerun it)"
    );
    let out = tmp.join("run");
    sim(&[
        "run",
        shipped.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
        "--no-trace",
    ]);
    let table = sim(&["compare", out.to_str().unwrap(), example.to_str().unwrap()]);
    eprintln!("{gpu}:\n{table}");
    let e = errors(&out);
    let _ = std::fs::remove_dir_all(&tmp);
    Some(e)
}

/// The issue's targets: mean and median within 5 %, p90 and p99 within 10 % (p95 within 10 %
/// too), except for the metrics in `known`, each with its own (wider) bound.
fn check(gpu: &str, e: &[(String, f64)], known: &[(&str, f64)]) {
    assert_eq!(e.len(), 15, "{gpu}: three metrics × five statistics");
    for (metric, err) in e {
        let bound = known
            .iter()
            .find(|(m, _)| m == metric)
            .map(|k| k.1)
            .unwrap_or(if metric.ends_with("Mean") || metric.ends_with("Median") {
                0.05
            } else {
                0.10
            });
        assert!(
            err.abs() <= bound,
            "{gpu} {metric}: {:+.1} % against vLLM (bound {:.0} %)",
            100.0 * err,
            100.0 * bound
        );
    }
}

#[test]
fn the_rtx4090_replay_is_within_the_targets_of_vllm() {
    let Some(e) = replay("RTX4090", "vllm_rtx4090_llama31_8b.toml") else {
        return;
    };
    check("RTX4090", &e, &[]);
}

#[test]
fn the_rtxpro6000_replay_is_within_the_targets_of_vllm_but_for_ttft() {
    let Some(e) = replay("RTXPRO6000", "vllm_rtxpro6000_llama31_8b.toml") else {
        return;
    };
    // Known gap (README, "Accuracy against real vLLM"): the first requests' TTFT and decode
    // run faster than vLLM's in its first seconds, which pulls the queued requests' TTFT
    // forward. Bounded here so that a regression still fails.
    check(
        "RTXPRO6000",
        &e,
        &[("TTFT Mean", 0.08), ("TTFT Median", 0.14)],
    );
}

fn sim_err(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_vajra-sim"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!o.status.success(), "vajra-sim {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn import_names_what_a_run_folder_lacks_and_takes_a_model_config() {
    let dir = std::env::temp_dir().join(format!("vajra-vllm-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("H100/vllm");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("requests.jsonl"),
        "{\"input_toks\": 100, \"output_toks\": 20, \"queued_ts\": 5.0, \"first_token_ts\": 5.1, \"last_token_ts\": 6.0}\n\
         {\"input_toks\": 50, \"output_toks\": 10, \"queued_ts\": 5.5, \"first_token_ts\": 5.6, \"last_token_ts\": 6.1}\n",
    )
    .unwrap();
    let meta = |model: &str| {
        format!(
            "{{\"model\": \"{model}\", \"vllm_version\": \"0.19.0\", \"engine_kwargs\": {{\"model\": \"{model}\", \"tensor_parallel_size\": 1, \"max_num_seqs\": 64, \"max_num_batched_tokens\": 1024}}}}"
        )
    };
    let out = dir.join("exp.toml");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "import",
            "vllm",
            run.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    std::fs::write(run.join("meta.json"), meta("org/New-Model-7B")).unwrap();
    let a = args(&[]);
    let e = sim_err(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("New-Model-7B") && e.contains("--model-config"),
        "{e}"
    );
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"model_type":"llama","hidden_size":2048,"intermediate_size":5632,"num_attention_heads":16,"num_hidden_layers":16,"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":4096,"torch_dtype":"bfloat16"}"#,
    )
    .unwrap();
    // The device comes from a folder name (no hardware recorded); no profile is found.
    let a = args(&["--model-config", cfg.to_str().unwrap()]);
    let text = sim(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        text.contains("device h100") && text.contains("roofline"),
        "{text}"
    );
    let toml = std::fs::read_to_string(&out).unwrap();
    assert!(
        toml.contains("config = \"config.json\"") && toml.contains("max_num_seqs = 64"),
        "{toml}"
    );
    let runs = dir.join("runs");
    sim(&[
        "run",
        out.to_str().unwrap(),
        "-o",
        runs.to_str().unwrap(),
        "--quiet",
    ]);
    sim(&["compare", runs.to_str().unwrap(), run.to_str().unwrap()]);
    assert!(runs.join("fidelity/fidelity.md").exists());
    // No device anywhere: named.
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["requests.jsonl", "meta.json"] {
        std::fs::copy(run.join(f), plain.join(f)).unwrap();
    }
    let e = sim_err(&[
        "import",
        "vllm",
        plain.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model-config",
        cfg.to_str().unwrap(),
    ]);
    assert!(e.contains("--device"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
