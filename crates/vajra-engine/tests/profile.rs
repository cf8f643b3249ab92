//! `vajra-engine profile --backend cpu` writes Vidur's schema (and `lm_head.csv`): every grid
//! point a row, every operator's median positive (the simulator reads these files unchanged; `add` is measured on
//! the CPU, where the residual adds are separate).

mod common;

use std::process::Command;

#[test]
fn cpu_profile_writes_every_grid_point_in_the_simulators_schema() {
    let out = std::env::temp_dir().join(format!("vajra-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["profile", "--backend", "cpu", "--quick", "--model"])
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = out.join("tiny-llama");
    let mut mlp = csv::Reader::from_path(dir.join("mlp.csv")).unwrap();
    let h = mlp.headers().unwrap().clone();
    let rows: Vec<_> = mlp.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3, "quick CPU grid: 1, 8 and 64 tokens");
    for op in vajra_core::config::MLP_OPS {
        let i = h
            .iter()
            .position(|c| c == format!("time_stats.{op}.median"))
            .unwrap_or_else(|| panic!("no column for {op}"));
        for r in &rows {
            assert!(
                r[i].parse::<f64>().unwrap() > 0.0,
                "{op} median not positive"
            );
        }
    }
    let mut att = csv::Reader::from_path(dir.join("attention.csv")).unwrap();
    let h = att.headers().unwrap().clone();
    let rows: Vec<_> = att.records().map(Result::unwrap).collect();
    assert_eq!(
        rows.len(),
        8,
        "2 chunks × 2 contexts + 2 batches × 2 contexts"
    );
    let pre = h.iter().position(|c| c == "is_prefill").unwrap();
    assert_eq!(rows.iter().filter(|r| &r[pre] == "True").count(), 4);
    let mut head = csv::Reader::from_path(dir.join("lm_head.csv")).unwrap();
    let h = head.headers().unwrap().clone();
    let rows: Vec<_> = head.records().map(Result::unwrap).collect();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let sampled: Vec<&str> = rows.iter().map(|r| &r[col("num_sampled")]).collect();
    assert_eq!(sampled, ["1", "8"], "one row per decode batch size");
    for r in &rows {
        for op in ["final_norm", "lm_head"] {
            let m: f64 = r[col(&format!("time_stats.{op}.median"))].parse().unwrap();
            assert!(m > 0.0, "{op} median not positive");
        }
    }
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["backend"], "cpu");
    assert!(prov["device"]["cpu"].is_string() && prov["date"].as_str().unwrap().len() == 20);
}
