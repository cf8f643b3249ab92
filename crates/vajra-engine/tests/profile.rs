//! `vajra-engine profile --backend cpu` writes Vidur's schema: every grid point a row, every
//! operator's median positive (the simulator reads these files unchanged; `add` is measured on
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
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["backend"], "cpu");
    assert!(prov["device"]["cpu"].is_string() && prov["date"].as_str().unwrap().len() == 20);
}
