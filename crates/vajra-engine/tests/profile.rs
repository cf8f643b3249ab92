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

/// `serve --profile-out DIR` profiles the serving backend itself before it listens.
fn serve_with_profile(kv_cache_mib: &str, out: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["serve", "--port", "0", "--kv-cache-mib", kv_cache_mib])
        .arg("--model")
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .arg("--profile-out")
        .arg(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn serve_profiles_its_own_backend_before_listening() {
    use std::io::{BufRead, BufReader};
    let out = std::env::temp_dir().join(format!("vajra-serve-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut child = serve_with_profile("64", &out);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = loop {
        let Some(line) = lines.next() else {
            break false;
        };
        let line = line.unwrap();
        if line.contains("http://") {
            break true;
        }
        seen.push(line);
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "server exited before listening: {seen:?}");
    assert!(
        seen.iter().any(|l| l.starts_with("wrote ")),
        "the profile is written before the server listens: {seen:?}"
    );
    let dir = out.join("tiny-llama");
    let mlp = csv::Reader::from_path(dir.join("mlp.csv"))
        .unwrap()
        .records()
        .count();
    assert_eq!(mlp, 10, "the full CPU grid: 1 to 512 tokens");
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("provenance.json")).unwrap())
            .unwrap();
    assert!(prov["command"].as_str().unwrap().contains("serve"));
}

#[test]
fn serve_profile_with_too_few_kv_blocks_fails_naming_both_counts() {
    let out =
        std::env::temp_dir().join(format!("vajra-serve-profile-small-{}", std::process::id()));
    // 1 MiB of KV for the tiny Llama is far fewer blocks than the grid's largest point needs.
    let o = serve_with_profile("1", &out).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--profile-out") && err.contains("KV blocks") && err.contains("holds"),
        "{err}"
    );
}

#[test]
fn serve_profile_refuses_a_block_size_other_than_the_profiles() {
    let dir = std::env::temp_dir().join(format!("vajra-serve-profile-bs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("experiment.toml");
    let text = "[scheduler]\npolicy = { type = \"vllm_v1\" }\n[cache]\nblock_size = 32\n";
    std::fs::write(&cfg, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["serve", "--port", "0", "--experiment"])
        .arg(&cfg)
        .arg("--model")
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .arg("--profile-out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("cache.block_size is 32"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
