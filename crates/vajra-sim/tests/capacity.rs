//! Capacity search: reproducible, and the rate it finds meets the SLOs while 1.05× that rate
//! does not.

use std::path::PathBuf;
use vajra_experiment::experiment::ExperimentFile;
use vajra_sim::capacity::search;
use vajra_sim::run::{prepare, simulate, summarize};

/// Model, cluster, predictor and scheduler of every file here, and the workload's first lines.
const HEAD: &str = r#"
seed = 3
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[predictor]
profile = "roofline"
[scheduler]
policy = { type = "vllm_v1", max_num_batched_tokens = 4096 }
[workload]
num_requests = 300
arrival = { type = "poisson", qps = 2.0 }
"#;

/// Writes `body` as `<name>.toml` in this test binary's folder and loads it.
fn load(name: &str, body: &str) -> ExperimentFile {
    let dir = std::env::temp_dir().join(format!("vajra-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p: PathBuf = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    ExperimentFile::load(&p).unwrap()
}

fn file(name: &str) -> ExperimentFile {
    load(
        name,
        &format!(
            r#"{HEAD}lengths = {{ type = "independent", prompt = {{ type = "uniform", min = 200, max = 2000 }}, output = {{ type = "uniform", min = 20, max = 200 }} }}
[slo]
p99_ttft_s = 0.5
"#
        ),
    )
}

fn meets(f: &ExperimentFile, qps: f64) -> bool {
    let mut point = f.points[0].clone();
    if let vajra_workload::config::ArrivalConfig::Poisson { qps: q, .. } =
        &mut point.experiment.workload.arrival
    {
        *q = qps;
    }
    let prep = prepare(f, &point).unwrap();
    let (res, _, _) = simulate(f, &point, &prep, None, false, false, None).unwrap();
    summarize(&point, &prep, &res).metrics.slo.all_limits_met
}

#[test]
fn the_capacity_meets_the_slo_and_five_percent_more_does_not() {
    let f = file("meets");
    let a = search(&f, &f.points[0]).unwrap();
    let b = search(&f, &f.points[0]).unwrap();
    let cap = a.capacity_qps.expect("some capacity");
    assert_eq!(Some(cap), b.capacity_qps, "same seed, same answer");
    assert!(
        a.failing_qps.unwrap() / cap - 1.0 <= 0.02 + 1e-12,
        "bracket within precision"
    );
    assert!(meets(&f, cap));
    assert!(!meets(&f, cap * 1.05));
}

#[test]
fn capacity_needs_a_run_level_slo() {
    let f = file("no-slo");
    let mut p = f.points[0].clone();
    p.experiment.slo.p99_ttft_s = None;
    let e = search(&f, &p).unwrap_err().to_string();
    assert!(e.contains("slo.p99_ttft_s"), "{e}");
}

#[test]
fn a_closed_loop_gets_a_whole_number_of_clients() {
    let dir = std::env::temp_dir().join(format!("vajra-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("closed.toml");
    std::fs::write(
        &p,
        r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[predictor]
profile = "roofline"
[scheduler]
policy = { type = "vllm_v1", max_num_batched_tokens = 4096 }
[workload]
num_requests = 200
arrival = { type = "closed_loop", clients = 4, think_time_s = 0.2 }
lengths = { type = "uniform_placeholder" }
[slo]
p99_tbt_s = 0.03
"#
        .replace(
            "lengths = { type = \"uniform_placeholder\" }",
            "lengths = { type = \"independent\", prompt = { type = \"uniform\", min = 200, max = 2000 }, output = { type = \"uniform\", min = 20, max = 200 } }",
        ),
    )
    .unwrap();
    let f = ExperimentFile::load(&p).unwrap();
    let c = search(&f, &f.points[0]).unwrap();
    let n = c.capacity_qps.expect("some clients pass");
    assert_eq!(n, n.round(), "whole clients");
    assert_eq!(c.failing_qps, Some(n + 1.0), "the next client fails");
}

#[test]
fn the_capacity_table_gives_each_slo_class_at_capacity() {
    let f = load(
        "classes",
        &format!(
            r#"{HEAD}[[workload.tenants]]
name = "chat"
slo_class = 0
lengths = {{ type = "fixed", prompt = 200, output = 50 }}
[[workload.tenants]]
name = "batch"
slo_class = 1
lengths = {{ type = "fixed", prompt = 2000, output = 200 }}
[slo]
p99_ttft_s = 0.5
[[slo.classes]]
name = "interactive"
ttft_s = 0.2
[[slo.classes]]
name = "offline"
e2e_s = 60.0
"#
        ),
    );
    let cap = search(&f, &f.points[0]).unwrap();
    let at = cap
        .probes
        .iter()
        .find(|p| Some(p.qps) == cap.capacity_qps)
        .expect("the passing probe");
    let names: Vec<&str> = at.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["interactive", "offline"]);
    assert!(
        at.classes
            .iter()
            .all(|c| (0.0..=1.0).contains(&c.attainment))
    );
    assert!(at.classes[1].goodput_rps > 0.0);
    let table = vajra_sim::capacity::table(std::slice::from_ref(&cap));
    assert!(
        table.contains("per SLO class") && table.contains("| interactive |"),
        "{table}"
    );
}
