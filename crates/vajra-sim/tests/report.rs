//! `vajra-sim report` on a small sweep: every image the HTML and Markdown reference exists and
//! decodes; the table marks a best value; a run folder that is not one is an error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vajra-sim"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .output()
        .expect("vajra-sim runs")
}

#[test]
fn a_report_of_a_sweep_references_only_images_that_exist_and_decode() {
    let dir = std::env::temp_dir().join(format!("vajra-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("sweep.toml");
    std::fs::write(
        &exp,
        r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
num_replicas = 2
[predictor]
profile = "roofline"
[scheduler]
policy = { type = "sarathi", chunk_size = 512 }
[workload]
num_requests = 150
arrival = { type = "poisson", qps = 4.0 }
lengths = { type = "independent", prompt = { type = "uniform", min = 100, max = 1500 }, output = { type = "uniform", min = 5, max = 100 } }
[slo]
ttft_s = 0.5
[sweep]
"scheduler.policy" = [{ type = "sarathi", chunk_size = 512 }, { type = "vllm_v1" }]
"workload.arrival.qps" = [4.0, 16.0]
"#,
    )
    .unwrap();
    let runs = dir.join("runs");
    let o = sim(&[
        "run",
        exp.to_str().unwrap(),
        "-o",
        runs.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("report");
    let o = sim(&[
        "report",
        runs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let mut refs: Vec<PathBuf> = Vec::new();
    for text in [&html, &md] {
        for (i, _) in text.match_indices("plots/") {
            let rest = &text[i..];
            let end = rest.find(['"', ')']).unwrap();
            refs.push(out.join(&rest[..end]));
        }
    }
    assert!(
        refs.len() >= 20,
        "CDFs, load curves, time series and distributions: {refs:?}"
    );
    for r in &refs {
        assert!(r.exists(), "{} referenced but missing", r.display());
        if r.extension().is_some_and(|e| e == "png") {
            let dec = png::Decoder::new(std::fs::File::open(r).unwrap());
            let mut reader = dec.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height), (960, 600), "{}", r.display());
        } else {
            let svg = std::fs::read_to_string(r).unwrap();
            assert!(
                svg.contains("<svg") && svg.contains("</svg>"),
                "{}",
                r.display()
            );
        }
    }
    for chart in [
        "cdf_ttft",
        "cdf_tbt",
        "cdf_tpot",
        "cdf_e2e",
        "load_ttft",
        "load_tbt",
        "load_goodput",
        "time_kv_usage",
        "dist_batch_size",
        "replica_busy",
    ] {
        assert!(
            html.contains(&format!("plots/{chart}.png")),
            "{chart} missing"
        );
    }
    assert!(html.contains("class=\"best\""), "a best value is marked");
    assert!(md.contains("**"), "a best value is marked in Markdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_without_runs_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("vajra-report-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = sim(&["report", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("summary.json") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_runs_of_one_experiment_get_distinct_labels_and_unknown_values_read_na() {
    let dir = std::env::temp_dir().join(format!("vajra-report-twice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("same.toml");
    std::fs::write(
        &exp,
        r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[predictor]
profile = "roofline"
[scheduler]
policy = { type = "sarathi" }
[workload]
num_requests = 20
arrival = { type = "poisson", qps = 4.0 }
lengths = { type = "fixed", prompt = 100, output = 10 }
"#,
    )
    .unwrap();
    for run in ["a", "b"] {
        let out = dir.join(run);
        let o = sim(&[
            "run",
            exp.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // A run whose MFU is unknown (as a benchmarked server's is): written as null.
    let p = dir.join("b/summary.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["mfu"] = serde_json::Value::Null;
    std::fs::write(&p, v.to_string()).unwrap();
    let out = dir.join("report");
    let o = sim(&[
        "report",
        dir.join("a").to_str().unwrap(),
        dir.join("b").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("same (a)") && md.contains("same (b)"), "{md}");
    assert!(md.contains("n/a"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_with_slo_classes_gets_a_table_per_class() {
    let dir = std::env::temp_dir().join(format!("vajra-report-classes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("run");
    let o = sim(&[
        "run",
        "experiments/slo_classes.toml",
        "-o",
        out.to_str().unwrap(),
        "--quiet",
        "--no-trace",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = dir.join("report");
    let o = sim(&["report", out.to_str().unwrap(), "-o", rep.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    let table = md.split("## SLO classes").nth(1).expect("a class table");
    for row in [
        "| late_requests=serve,queue=fcfs | interactive |",
        "| late_requests=reject,queue=priority | batch |",
    ] {
        assert!(table.contains(row), "{row} in {table}");
    }
    // The class-aware order serves the interactive class far better than FCFS.
    let attainment = |label: &str| -> f64 {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {label} | interactive |")))
            .unwrap();
        line.split('|').nth(5).unwrap().trim().parse().unwrap()
    };
    let fcfs = attainment("late_requests=serve,queue=fcfs");
    assert!(attainment("late_requests=serve,queue=priority") > fcfs + 0.3);
    // Rejecting requests already past their TTFT target frees capacity for the rest.
    assert!(attainment("late_requests=reject,queue=fcfs") > fcfs + 0.1);
    let _ = std::fs::remove_dir_all(&dir);
}
