//! End-to-end: the `vajra-sim` binary on the shipped experiments, checked through the files it
//! writes; determinism; bad input.

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::RowAccessor;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vajra-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vajra-sim"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("vajra-sim runs")
}

/// `vajra-sim validate FILE`, or `run FILE -o OUT` (validate writes nothing): whether it
/// succeeded, and its stderr.
fn check_or_run(cmd: &str, file: &Path, out: &Path) -> (bool, String) {
    let f = file.to_str().unwrap();
    let o = if cmd == "run" {
        sim(&["run", f, "-o", out.to_str().unwrap()])
    } else {
        sim(&[cmd, f])
    };
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run_ok(file: &str, out: &Path) {
    let o = sim(&["run", file, "-o", out.to_str().unwrap(), "--quiet"]);
    assert!(
        o.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Point folders of a run root (the root itself without a sweep).
fn points(root: &Path) -> Vec<PathBuf> {
    if root.join("summary.json").exists() {
        return vec![root.to_owned()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("summary.json").exists())
        .collect();
    v.sort();
    v
}

fn num(rec: &csv::StringRecord, h: &csv::StringRecord, col: &str) -> Option<f64> {
    let i = h
        .iter()
        .position(|x| x == col)
        .unwrap_or_else(|| panic!("column {col}"));
    let s = rec.get(i).unwrap();
    if s.is_empty() {
        None
    } else {
        Some(s.parse().unwrap())
    }
}

/// Every invariant a run folder must satisfy.
fn check_point(dir: &Path) {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let issued = summary["requests_issued"].as_u64().unwrap();
    // Rejected requests (scheduler.late_requests = "reject") are counted apart.
    let rejected = summary["requests_rejected"].as_u64().unwrap_or(0);
    assert_eq!(
        summary["requests_completed"].as_u64().unwrap() + rejected,
        issued,
        "{}",
        dir.display()
    );
    let mut rejected_rows = 0u64;
    let mut rdr = csv::Reader::from_path(dir.join("requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let mut rows = 0u64;
    let mut tbt_samples = 0u64;
    for rec in rdr.records() {
        let rec = rec.unwrap();
        rows += 1;
        let reason = &rec[h.iter().position(|x| x == "finish_reason").unwrap()];
        if reason == "rejected" {
            // Never scheduled, nothing generated.
            rejected_rows += 1;
            assert!(num(&rec, &h, "first_scheduled_s").is_none(), "{rec:?}");
            assert_eq!(num(&rec, &h, "output_tokens"), Some(0.0), "{rec:?}");
            continue;
        }
        let a = num(&rec, &h, "arrival_s").unwrap();
        let s = num(&rec, &h, "first_scheduled_s").unwrap();
        let f = num(&rec, &h, "first_token_s").unwrap();
        let c = num(&rec, &h, "completed_s").unwrap();
        assert!(
            a <= s && s <= f && f <= c,
            "timestamps out of order: {rec:?}"
        );
        let ttft = num(&rec, &h, "ttft_s").unwrap();
        let e2e = num(&rec, &h, "e2e_s").unwrap();
        assert!(ttft <= e2e + 1e-12, "TTFT > E2E: {rec:?}");
        let n = num(&rec, &h, "output_tokens").unwrap() as u64;
        let k = num(&rec, &h, "tbt_samples").unwrap() as u64;
        assert_eq!(k, n - 1, "one TBT sample per gap: {rec:?}");
        tbt_samples += k;
        assert_eq!(reason, "length");
    }
    assert_eq!(rows, issued, "every request has a row");
    assert_eq!(rejected_rows, rejected, "every rejection has a row");
    assert_eq!(
        summary["latency_s"]["tbt"]["count"].as_u64().unwrap(),
        tbt_samples
    );

    // Per-replica KV never exceeds capacity, read back from batches.parquet.
    let blocks = summary["setup"]["memory"]["num_blocks"].as_u64().unwrap() as i64;
    let r = SerializedFileReader::new(std::fs::File::open(dir.join("batches.parquet")).unwrap())
        .unwrap();
    let schema = r.metadata().file_metadata().schema_descr();
    let kv_col = (0..schema.num_columns())
        .find(|&i| schema.column(i).name() == "kv_blocks_used")
        .unwrap();
    let mut batches = 0u64;
    for row in r.get_row_iter(None).unwrap() {
        let row = row.unwrap();
        assert!(i64::from(row.get_int(kv_col).unwrap()) <= blocks);
        batches += 1;
    }
    assert_eq!(batches, summary["batches"]["count"].as_u64().unwrap());
    for m in ["ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s"] {
        assert!(
            dir.join("cdf").join(format!("{m}.csv")).exists(),
            "cdf/{m}.csv"
        );
    }
    if dir.join("trace.json").exists() {
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trace.json")).unwrap())
                .unwrap();
        let slices = t["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .count() as u64;
        let stages = summary["setup"]["pipeline_parallel"].as_u64().unwrap();
        assert_eq!(slices, batches * stages, "one slice per batch stage");
    }
    // The resolved file runs as is from its own folder: relative inputs were made absolute.
    let resolved = dir.join("config.resolved.toml");
    let o = sim(&["validate", resolved.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The experiments under `experiments/` (all run without the reference data).
const SHIPPED: [&str; 7] = [
    "quickstart",
    "routing",
    "prefix_caching",
    "fairness",
    "sessions",
    "slo_classes",
    "disaggregation",
];

#[test]
fn every_shipped_experiment_runs_and_its_outputs_hold_their_invariants() {
    for name in SHIPPED {
        let out = tmp(name);
        run_ok(&format!("experiments/{name}.toml"), &out);
        let pts = points(&out);
        assert!(!pts.is_empty(), "{name}: no run folders");
        for p in &pts {
            check_point(p);
        }
        if pts.len() > 1 {
            assert!(out.join("sweep.csv").exists() && out.join("sweep.md").exists());
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn the_same_experiment_twice_gives_byte_identical_outputs() {
    let (a, b) = (tmp("det-a"), tmp("det-b"));
    run_ok("experiments/prefix_caching.toml", &a);
    run_ok("experiments/prefix_caching.toml", &b);
    let (pa, pb) = (points(&a), points(&b));
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(&pb) {
        for f in ["summary.json", "requests.csv", "trace.json"] {
            assert!(
                std::fs::read(x.join(f)).unwrap() == std::fs::read(y.join(f)).unwrap(),
                "{} differs",
                x.join(f).display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn a_pipeline_parallel_tensor_parallel_cluster_runs_with_pp_micro_batches() {
    let dir = tmp("pp");
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("pp.toml");
    std::fs::write(
        &exp,
        r#"
[model]
name = "meta-llama/Meta-Llama-3-70B"
[cluster]
device = "h100"
num_replicas = 2
tensor_parallel = 4
pipeline_parallel = 2
[scheduler]
policy = { type = "vllm_v1", max_num_batched_tokens = 2048 }
[predictor]
profile = "roofline"
[workload]
num_requests = 200
arrival = { type = "poisson", qps = 8.0 }
lengths = { type = "independent", prompt = { type = "uniform", min = 100, max = 3000 }, output = { type = "uniform", min = 1, max = 200 } }
"#,
    )
    .unwrap();
    let out = dir.join("out");
    run_ok(exp.to_str().unwrap(), &out);
    check_point(&out);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // Two stages overlap: the stage busy fraction of a loaded replica stays meaningful.
    assert_eq!(s["setup"]["pipeline_parallel"], 2);
    assert!(s["replicas"][0]["busy_fraction"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validate_accepts_the_shipped_files() {
    for name in SHIPPED {
        let o = sim(&["validate", &format!("experiments/{name}.toml")]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("valid"));
    }
}

fn fails_with(body: &str, needles: &[&str]) {
    fails_in(body, needles, &["run", "validate"]);
}

fn fails_in(body: &str, needles: &[&str], cmds: &[&str]) {
    // A folder per call: tests of one binary run on parallel threads.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = tmp(&format!("bad{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("t.csv"), "arrived_at,num_prefill_tokens\n0.0,12\n").unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, body).unwrap();
    for &cmd in cmds {
        let (ok, err) = check_or_run(cmd, &f, &dir.join("out"));
        assert!(!ok, "{cmd} should fail");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{cmd}: `{n}` not in: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const GOOD: &str = r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[scheduler]
policy = { type = "sarathi" }
[predictor]
profile = "roofline"
[workload]
num_requests = 10
arrival = { type = "poisson", qps = 1.0 }
lengths = { type = "fixed", prompt = 100, output = 10 }
"#;

#[test]
fn malformed_toml_is_reported_with_its_location() {
    fails_with("[model\nname = 1", &["not valid TOML", "line"]);
}

#[test]
fn an_unknown_policy_names_the_allowed_ones() {
    fails_with(
        &GOOD.replace("\"sarathi\"", "\"lifo\""),
        &["lifo", "vllm_v1", "sarathi"],
    );
}

#[test]
fn a_trace_missing_a_column_names_the_column() {
    fails_with(
        &GOOD.replace(
            "lengths = { type = \"fixed\", prompt = 100, output = 10 }",
            "lengths = { type = \"trace\", path = \"t.csv\" }",
        ),
        &["num_decode_tokens"],
    );
}

#[test]
fn a_model_too_big_for_the_device_says_so() {
    fails_with(
        &GOOD.replace("Llama-2-7b-hf", "Meta-Llama-3-70B"),
        &["does not fit", "tensor_parallel"],
    );
}

#[test]
fn a_request_longer_than_the_kv_cache_is_an_error_not_a_hang() {
    fails_in(
        &GOOD.replace("[predictor]", "[cache]\nnum_blocks = 4\n[predictor]"),
        &["request 0", "KV cache capacity", "cache.num_blocks"],
        &["run"],
    );
}

#[test]
fn replica_partitions_on_threads_give_the_same_results_as_one_loop() {
    let (a, b) = (tmp("part-a"), tmp("part-b"));
    run_ok("experiments/routing.toml", &a);
    let o = sim(&[
        "run",
        "experiments/routing.toml",
        "-o",
        b.to_str().unwrap(),
        "--quiet",
        "--sequential",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // round_robin and random are partitioned (load-independent); the others run one loop
    // either way.
    for (x, y) in points(&a).iter().zip(points(&b).iter()) {
        for f in ["summary.json", "requests.csv"] {
            assert!(
                std::fs::read(x.join(f)).unwrap() == std::fs::read(y.join(f)).unwrap(),
                "{} differs between partitioned and sequential runs",
                x.join(f).display()
            );
        }
        check_point(x);
    }
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

/// A fresh folder holding `e.toml` (`body`) and `files`; returns the folder and the file.
fn experiment(name: &str, body: &str, files: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, text) in files {
        std::fs::write(dir.join(f), text).unwrap();
    }
    let exp = dir.join("e.toml");
    std::fs::write(&exp, body).unwrap();
    (dir, exp)
}

/// Names in `dir` that start with a dot (a run's temporary part files).
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn run_body(name: &str, body: &str, files: &[(&str, &str)]) -> (PathBuf, serde_json::Value) {
    let (dir, exp) = experiment(name, body, files);
    let out = dir.join("out");
    run_ok(exp.to_str().unwrap(), &out);
    check_point(&out);
    let s =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    (dir, s)
}

const HEAD: &str = r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[scheduler]
policy = { type = "vllm_v1", max_num_batched_tokens = 2048 }
[predictor]
profile = "roofline"
"#;

#[test]
fn a_closed_loop_keeps_at_most_its_clients_in_flight() {
    let (dir, s) = run_body(
        "closed",
        &format!(
            "{HEAD}[workload]\nnum_requests = 60\narrival = {{ type = \"closed_loop\", clients = 3, think_time_s = 0.5 }}\nlengths = {{ type = \"fixed\", prompt = 200, output = 20 }}\n"
        ),
        &[],
    );
    assert_eq!(s["requests_completed"], 60);
    // Never more than 3 requests between arrival and completion at once.
    let mut rdr = csv::Reader::from_path(dir.join("out/requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let mut spans: Vec<(f64, f64)> = rdr
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                num(&r, &h, "arrival_s").unwrap(),
                num(&r, &h, "completed_s").unwrap(),
            )
        })
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (i, &(a, _)) in spans.iter().enumerate() {
        let live = spans[..i].iter().filter(|&&(_, c)| c > a).count();
        assert!(live < 3, "request {i} arrived with {live} others in flight");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mooncake_hash_ids_produce_prefix_cache_hits() {
    let mut lines = String::new();
    for i in 0..40 {
        // Every request shares its first two 512-token blocks; the third is its own.
        lines.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": 1500, \"output_length\": 8, \"hash_ids\": [1, 2, {}]}}\n",
            i * 200,
            100 + i
        ));
    }
    let (dir, s) = run_body(
        "mooncake",
        &format!("{HEAD}[workload]\narrival = {{ type = \"trace\", path = \"m.jsonl\" }}\n"),
        &[("m.jsonl", &lines)],
    );
    assert_eq!(s["requests_completed"], 40);
    let hit = s["prefix_cache_hit_rate"].as_f64().unwrap();
    // 39 of 40 requests find 1,024 of their 1,500 tokens cached.
    assert!(hit > 0.6 && hit < 0.7, "{hit}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_azure_trace_replays_with_time_scaling_and_a_window() {
    let mut csv_text = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
    for i in 0..50 {
        csv_text.push_str(&format!(
            "2023-11-16 18:{:02}:{:02}.5000000,{},{}\n",
            15 + i / 60,
            i % 60,
            300 + i,
            10 + i % 7
        ));
    }
    let (dir, s) = run_body(
        "azure",
        &format!(
            "{HEAD}[workload]\narrival = {{ type = \"trace\", path = \"az.csv\", start_s = 10.0, end_s = 30.0, time_scale = 0.5 }}\n"
        ),
        &[("az.csv", &csv_text)],
    );
    assert_eq!(s["requests_completed"], 20, "rows 10..30 s");
    let mut rdr = csv::Reader::from_path(dir.join("out/requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let arrivals: Vec<f64> = rdr
        .records()
        .map(|r| num(&r.unwrap(), &h, "arrival_s").unwrap())
        .collect();
    assert!(
        (arrivals[19] - 9.5).abs() < 1e-9,
        "19 s of trace at half time: {}",
        arrivals[19]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// Hardening: inputs a hostile user tried, each once silently wrong or a crash.

#[test]
fn a_rate_or_trace_past_the_simulators_clock_is_an_error_naming_the_unit() {
    // 40 requests at 1e-9 requests/s would arrive over 1,268 years: times used to saturate and
    // 37 of 40 requests reported TTFT = E2E = 0.
    fails_with(
        &GOOD
            .replace("qps = 1.0", "qps = 1e-9")
            .replace("num_requests = 10", "num_requests = 40"),
        &["workload.arrival.qps", "317 years", "requests per second"],
    );
    fails_with(
        &GOOD.replace("num_requests = 10", "duration_s = 1e30"),
        &["workload.duration_s", "simulator's clock"],
    );
    // A trace whose arrival column is in nanoseconds.
    let (dir, f) = experiment(
        "ns-trace",
        &format!("{HEAD}[workload]\narrival = {{ type = \"trace\", path = \"ns.csv\" }}\n"),
        &[(
            "ns.csv",
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0,12,5\n1700000000000000000,12,5\n",
        )],
    );
    let out = dir.join("out");
    for cmd in ["validate", "run"] {
        let (ok, err) = check_or_run(cmd, &f, &out);
        assert!(!ok && !err.contains("panicked"), "{err}");
        assert!(
            err.contains("ns.csv") && err.contains("time_scale = 1e-3, 1e-6 or 1e-9"),
            "{cmd}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kv_pool_larger_than_the_device_is_refused_before_it_is_allocated() {
    // 100,000 blocks of Llama-2-7B are 50 GiB beyond what an H100 holds beside the weights.
    fails_with(
        &GOOD.replace("[predictor]", "[cache]\nnum_blocks = 100000\n[predictor]"),
        &["cache.num_blocks", "at most", "GiB"],
    );
    // These used to panic in the block pool, or abort on a 64 GiB allocation.
    for n in ["4294967295", "4294967294"] {
        fails_with(
            &GOOD.replace(
                "[predictor]",
                &format!("[cache]\nnum_blocks = {n}\n[predictor]"),
            ),
            &["cache.num_blocks", n],
        );
    }
}

#[test]
fn validate_rejects_what_a_run_rejects() {
    // Each was `valid` for validate and an error at the start of run.
    fails_with(
        &GOOD.replace(
            "policy = { type = \"sarathi\" }",
            "policy = { type = \"sarathi\" }\npreemption = \"swap\"",
        ),
        &["cache.swap_blocks", "swap"],
    );
    fails_with(
        &GOOD.replace(
            "policy = { type = \"sarathi\" }",
            "policy = { type = \"vllm_v0\", max_num_batched_tokens = 1024 }",
        ),
        &["max_num_batched_tokens", "max_model_len = 4096"],
    );
}

#[test]
fn a_run_owns_its_folder_and_never_mixes_with_an_earlier_one() {
    let (dir, f) = experiment("owns", GOOD, &[]);
    let out = dir.join("out");
    let (fs, os) = (f.to_str().unwrap(), out.to_str().unwrap());
    run_ok(fs, &out);
    // A file only the earlier run wrote: before, it stayed beside the new run's files.
    std::fs::write(out.join("trace.json"), "stale").unwrap();
    let o = sim(&["run", fs, "-o", os, "--quiet"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--overwrite"), "{err}");
    let o = sim(&["run", fs, "-o", os, "--quiet", "--overwrite", "--no-trace"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !out.join("trace.json").exists(),
        "the earlier run's file is gone"
    );
    assert!(out.join("summary.json").exists());
    // A folder that is not a run is never deleted, even with --overwrite.
    let other = dir.join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("mine.txt"), "keep").unwrap();
    let o = sim(&["run", fs, "-o", other.to_str().unwrap(), "--overwrite"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a vajra run"),
        "{err}"
    );
    assert!(other.join("mine.txt").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_experiment_name_is_a_name_not_a_path() {
    for bad in ["../../x", "a/b", ".."] {
        fails_with(&format!("name = {bad:?}\n{GOOD}"), &["name", "without `/`"]);
    }
}

#[test]
fn jobs_have_an_upper_bound() {
    let (dir, f) = experiment("jobs", GOOD, &[]);
    let out = dir.join("out");
    for cmd in ["run", "capacity"] {
        let o = sim(&[
            cmd,
            f.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-j",
            "5000",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--jobs") && err.contains("1024"),
            "{cmd}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clipped_requests_are_counted_and_warned() {
    // 100 + 10 tokens do not fit 64: every request is clipped (used to be silent).
    let body = GOOD.replace(
        "name = \"Llama-2-7b-hf\"",
        "name = \"Llama-2-7b-hf\"\nmax_model_len = 64",
    );
    let (dir, f) = experiment("clip", &body, &[]);
    let out = dir.join("out");
    let o = sim(&[
        "run",
        f.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("10 of 10 requests (100.0 %) were clipped to 64 tokens"),
        "{err}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["requests_clipped"], 10);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replay_asked_for_more_requests_than_its_trace_has_is_refused() {
    let mut text = String::from("arrived_at,num_prefill_tokens,num_decode_tokens\n");
    for i in 0..5 {
        text.push_str(&format!("{i}.0,12,5\n"));
    }
    let (dir, f) = experiment(
        "short-trace",
        &format!(
            "{HEAD}[workload]\nnum_requests = 10\narrival = {{ type = \"trace\", path = \"five.csv\" }}\n"
        ),
        &[("five.csv", &text)],
    );
    let out = dir.join("out");
    for cmd in ["validate", "run"] {
        let (ok, err) = check_or_run(cmd, &f, &out);
        assert!(!ok, "{cmd} ran 5 of the 10 requests asked for");
        assert!(
            err.contains("workload.num_requests") && err.contains("the 5 rows"),
            "{cmd}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trace_and_cluster_messages_say_what_is_wrong() {
    let dir = tmp("msgs");
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, trace: &str, needles: &[&str]| {
        std::fs::write(dir.join(name), trace).unwrap();
        let f = dir.join(format!("{name}.toml"));
        std::fs::write(
            &f,
            format!("{HEAD}[workload]\narrival = {{ type = \"trace\", path = \"{name}\" }}\n"),
        )
        .unwrap();
        let o = sim(&["validate", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}");
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in {err}");
        }
    };
    // Was "missing column … found: ".
    check("empty.csv", "", &["empty", "header row"]);
    // Was "is not a token count ≥ 1".
    check(
        "huge.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1000000000000,5\n",
        &["from 1 to 4294967295"],
    );
    // Was rounded silently.
    check(
        "frac.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0,12.5,5\n",
        &["12.5", "whole number of tokens"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    // Was reported as `parallel.tensor_parallel`.
    fails_with(
        &GOOD.replace(
            "device = \"h100\"",
            "device = \"h100\"\ntensor_parallel = 0",
        ),
        &["cluster.tensor_parallel"],
    );
}

#[test]
fn a_failed_partitioned_run_leaves_no_hidden_part_files() {
    // Two replicas on threads (round robin), each with a KV cache too small for its requests.
    let body = GOOD
        .replace("device = \"h100\"", "device = \"h100\"\nnum_replicas = 2")
        .replace(
            "[predictor]",
            "[router]\ntype = \"round_robin\"\n[cache]\nnum_blocks = 4\n[predictor]",
        );
    let (dir, f) = experiment("parts", &body, &[]);
    let out = dir.join("out");
    let o = sim(&[
        "run",
        f.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let hidden = hidden_files(&out);
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_partitioned_run_removes_its_part_files() {
    // Long enough to be interrupted mid-loop: two replicas on threads, 500k requests.
    let body = GOOD
        .replace("device = \"h100\"", "device = \"h100\"\nnum_replicas = 2")
        .replace(
            "[predictor]",
            "[router]\ntype = \"round_robin\"\n[predictor]",
        )
        .replace("num_requests = 10", "num_requests = 500000")
        .replace("qps = 1.0", "qps = 50.0");
    let (dir, f) = experiment("sigint", &body, &[]);
    let out = dir.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vajra-sim"))
        .args([
            "run",
            f.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .spawn()
        .unwrap();
    let part = out.join(".batches.part00.parquet");
    let t0 = std::time::Instant::now();
    while !part.exists() {
        if t0.elapsed().as_secs() > 120 || child.try_wait().unwrap().is_some() {
            panic!("the run ended or never started its partitions");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(out.is_dir(), "the run's folder exists");
    let hidden = hidden_files(&out);
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sessions workload on `replicas` replicas behind `router`.
fn sessions_body(router: &str, replicas: u32, turns_max: u32) -> String {
    format!(
        r#"seed = 3
{}[cache]
enable_prefix_caching = true
[router]
type = "{router}"
[workload]
num_requests = 600
max_tokens = 4096
arrival = {{ type = "sessions", qps = 3.0, turns_min = 1, turns_max = {turns_max}, think_time_s = 2.0, think = "exponential" }}
lengths = {{ type = "independent", prompt = {{ type = "uniform", min = 40, max = 300 }}, output = {{ type = "uniform", min = 20, max = 200 }} }}
"#,
        cluster_head(&format!("num_replicas = {replicas}\n"))
    )
}

/// `[model]` to `[predictor]` of a small roofline cluster, with `cluster` lines added to
/// `[cluster]`.
fn cluster_head(cluster: &str) -> String {
    format!(
        "[model]\nname = \"Llama-2-7b-hf\"\n[cluster]\ndevice = \"h100\"\n{cluster}[scheduler]\npolicy = {{ type = \"vllm_v1\", max_num_batched_tokens = 2048 }}\n[predictor]\nprofile = \"roofline\"\n"
    )
}

#[test]
fn sessions_reuse_their_conversation_and_cache_aware_routing_finds_it() {
    // Single-turn sessions without a system prompt share nothing: no hit at all.
    let (d0, single) = run_body(
        "sess-single",
        &sessions_body("least_outstanding", 2, 1),
        &[],
    );
    assert_eq!(single["requests_completed"], 600);
    assert_eq!(
        single["prefix_cache_hit_rate"], 0.0,
        "nothing shared, nothing hit"
    );
    // Multi-turn: each turn's prompt is the conversation so far, cached where it ran.
    let (d1, lo) = run_body("sess-lo", &sessions_body("least_outstanding", 4, 8), &[]);
    let (d2, pa) = run_body("sess-pa", &sessions_body("prefix_affinity", 4, 8), &[]);
    let (d3, w) = run_body("sess-w", &sessions_body("weighted", 4, 8), &[]);
    let hit = |s: &serde_json::Value| s["prefix_cache_hit_rate"].as_f64().unwrap();
    let ttft = |s: &serde_json::Value| s["latency_s"]["ttft"]["p50"].as_f64().unwrap();
    assert!(
        hit(&lo) > 0.05,
        "some turns land where their session ran: {}",
        hit(&lo)
    );
    for (name, s) in [("prefix_affinity", &pa), ("weighted", &w)] {
        assert!(
            hit(s) > hit(&lo) + 0.2,
            "{name} follows the conversation: hit {} vs {}",
            hit(s),
            hit(&lo)
        );
        assert!(
            ttft(s) < ttft(&lo),
            "{name}: TTFT p50 {} vs {}",
            ttft(s),
            ttft(&lo)
        );
    }
    // Cached tokens never exceed the prompt minus the one token computed for its logits.
    let mut rdr = csv::Reader::from_path(d2.join("out/requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    for r in rdr.records() {
        let r = r.unwrap();
        let cached = num(&r, &h, "cached_prompt_tokens").unwrap();
        let prompt = num(&r, &h, "prompt_tokens").unwrap();
        assert!(cached < prompt, "{r:?}");
    }
    // Byte-identical when run again.
    let (d4, again) = run_body("sess-pa2", &sessions_body("prefix_affinity", 4, 8), &[]);
    assert_eq!(
        std::fs::read(d2.join("out/requests.csv")).unwrap(),
        std::fs::read(d4.join("out/requests.csv")).unwrap()
    );
    assert_eq!(pa["latency_s"], again["latency_s"]);
    for d in [d0, d1, d2, d3, d4] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_stale_router_counts_its_own_decisions_between_load_reports() {
    let body = |staleness: &str| {
        format!(
            r#"seed = 4
{}[router]
type = "least_outstanding"
[workload]
num_requests = 300
arrival = {{ type = "gamma", qps = 40.0, cv = 3.0 }}
lengths = {{ type = "independent", prompt = {{ type = "uniform", min = 10, max = 2000 }}, output = {{ type = "uniform", min = 1, max = 300 }} }}
"#,
            cluster_head(&format!(
                "num_replicas = 3\nrouter_staleness_s = {staleness}\n"
            ))
        )
    };
    let per_replica = |s: &serde_json::Value| -> Vec<u64> {
        s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests"].as_u64().unwrap())
            .collect()
    };
    // A report older than the run: the router sees only its own count of what it sent, so
    // least-outstanding deals requests out evenly, one each in turn.
    let (d1, stale) = run_body("stale", &body("1e6"), &[]);
    let n = per_replica(&stale);
    assert_eq!(n.iter().sum::<u64>(), 300);
    assert!(n.iter().all(|&x| x == 100), "{n:?}");
    // Exact loads follow the replicas' real progress, which is not even.
    let (d2, exact) = run_body("exact", &body("0.0"), &[]);
    assert_ne!(per_replica(&exact), n);
    // Bad values are named.
    let (d3, exp) = experiment("stale-bad", &body("-1.0"), &[]);
    let (ok, err) = check_or_run("validate", &exp, &d3.join("out"));
    assert!(!ok && err.contains("cluster.router_staleness_s"), "{err}");
    for d in [d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_tenant_naming_an_undefined_slo_class_is_refused_by_name() {
    fails_with(
        &format!(
            "{HEAD}[workload]\nnum_requests = 10\narrival = {{ type = \"poisson\", qps = 1.0 }}\n[[workload.tenants]]\nname = \"a\"\nslo_class = 2\nlengths = {{ type = \"fixed\", prompt = 5, output = 5 }}\n[[slo.classes]]\nname = \"interactive\"\nttft_s = 0.5\n"
        ),
        &["workload.tenants[0].slo_class", "0 = \"interactive\""],
    );
}

#[test]
fn rejecting_late_requests_needs_a_ttft_target() {
    fails_with(
        &format!(
            "{HEAD}[workload]\nnum_requests = 10\narrival = {{ type = \"poisson\", qps = 1.0 }}\nlengths = {{ type = \"fixed\", prompt = 5, output = 5 }}\n"
        )
        .replace(
            "policy = { type = \"vllm_v1\", max_num_batched_tokens = 2048 }",
            "policy = { type = \"vllm_v1\", max_num_batched_tokens = 2048 }\nlate_requests = \"reject\"",
        ),
        &["scheduler.late_requests", "slo.ttft_s"],
    );
}

#[test]
fn sessions_replay_a_conversation_file_and_its_turns_hit_the_cache() {
    let dir = tmp("conversations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("conv.jsonl"),
        "{\"id\": 1, \"turns\": [[300, 200], [40, 150], [60, 90], [20, 300]]}\n{\"id\": 2, \"turns\": [[900, 50], [30, 30]]}\n",
    )
    .unwrap();
    let body = GOOD
        .replace(
            "arrival = { type = \"poisson\", qps = 1.0 }\nlengths = { type = \"fixed\", prompt = 100, output = 10 }",
            "arrival = { type = \"sessions\", qps = 2.0, think_time_s = 5.0, conversations = \"conv.jsonl\" }",
        )
        .replace("num_requests = 10", "num_requests = 300")
        .replace("[predictor]", "[cache]\nenable_prefix_caching = true\n[predictor]");
    let f = dir.join("conv.toml");
    std::fs::write(&f, body).unwrap();
    let out = dir.join("out");
    run_ok(f.to_str().unwrap(), &out);
    check_point(&out);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["requests_completed"], 300);
    // Later turns find their conversation (one replica): most of their prompts are cached.
    let hit = s["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!(hit > 0.5, "hit rate {hit}");
    let mut rdr = csv::Reader::from_path(out.join("requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let expected = [300.0, 540.0, 750.0, 860.0, 900.0, 980.0];
    for r in rdr.records() {
        let r = r.unwrap();
        let p = num(&r, &h, "prompt_tokens").unwrap();
        assert!(expected.contains(&p), "prompt {p} is no turn's");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
