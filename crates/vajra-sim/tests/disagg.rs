//! Disaggregated prefill and decode in the simulator: seeded invariants (every request
//! finishes, no block is left held on either pool, no link carries two transfers at once or
//! one faster than its bandwidth), determinism, a transfer-bound link showing in TTFT, a full
//! decode pool making requests wait on the prefill side, and bad pool settings named.

use std::path::PathBuf;
use vajra_experiment::experiment::ExperimentFile;
use vajra_sim::run::{prepare, simulate, summarize};

fn load(name: &str, body: &str) -> ExperimentFile {
    let dir = std::env::temp_dir().join(format!("vajra-pd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p: PathBuf = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    ExperimentFile::load(&p).unwrap()
}

/// A 2P2D cluster (or what `cluster` says) on a bursty workload with shared prefixes.
fn body(seed: u64, cluster: &str, extra: &str) -> String {
    format!(
        r#"
seed = {seed}
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
{cluster}
[predictor]
profile = "roofline"
[scheduler]
max_num_seqs = 64
policy = {{ type = "sarathi", chunk_size = 512 }}
[router]
type = "least_outstanding"
{extra}
[workload]
num_requests = 400
arrival = {{ type = "gamma", qps = 12.0, cv = 3.0 }}
lengths = {{ type = "independent", prompt = {{ type = "uniform", min = 50, max = 3000 }}, output = {{ type = "uniform", min = 1, max = 300 }} }}
"#
    )
}

const PD: &str =
    r#"pools = [{ role = "prefill", num_replicas = 2 }, { role = "decode", num_replicas = 2 }]"#;

struct Run {
    summary: vajra_sim::run::RunSummary,
    result: vajra_sim::sim::SimResult,
    bandwidth: f64,
}

fn run(name: &str, text: &str) -> Run {
    let f = load(name, text);
    let point = f.points[0].clone();
    let prep = prepare(&f, &point).unwrap();
    let dir = std::env::temp_dir().join(format!("vajra-pd-{}-{name}", std::process::id()));
    let (result, _, _) = simulate(&f, &point, &prep, Some(&dir), false, false, None).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let summary = summarize(&point, &prep, &result);
    let bandwidth = prep.decode.as_ref().map_or(0.0, |d| d.bandwidth);
    Run {
        summary,
        result,
        bandwidth,
    }
}

#[test]
fn every_request_finishes_no_block_stays_held_and_no_link_is_oversubscribed() {
    for (seed, link) in [
        (1, r#"kv_transfer = { link = "rdma_100g" }"#),
        (
            2,
            r#"kv_transfer = { link = "rdma_100g", layerwise = false }"#,
        ),
        (3, r#"kv_transfer = { link = "pcie4" }"#),
    ] {
        let r = run(
            &format!("inv{seed}"),
            &body(seed, &format!("{PD}\n{link}"), ""),
        );
        let m = &r.summary.metrics;
        assert_eq!(m.requests_completed, 400, "seed {seed}");
        for (i, s) in r.result.replica_stats.iter().enumerate() {
            assert_eq!(s.kv.num_free, s.kv.num_blocks, "replica {i} holds no block");
        }
        let (p, d) = (&r.result.replica_stats[..2], &r.result.replica_stats[2..]);
        let handed: u64 = p.iter().map(|s| s.num_handed_off).sum();
        let received: u64 = d.iter().map(|s| s.num_received).sum();
        let one_token = r
            .result
            .collector
            .requests
            .iter()
            .filter(|q| q.output_tokens == 1)
            .count() as u64;
        assert_eq!(handed, received);
        assert_eq!(
            handed + one_token,
            400,
            "a 1-token request ends on its prefill replica"
        );
        let t = &r.result.collector.transfers;
        assert_eq!(t.len() as u64, handed);
        for x in t {
            assert!(x.prefill_replica < 2 && x.decode_replica >= 2, "{x:?}");
            let parts = x.prefill_queue_s + x.prefill_s + x.handoff_wait_s + x.kv_transfer_s;
            assert!((parts - x.ttft_s).abs() < 1e-6, "TTFT is its parts: {x:?}");
            let min = x.kv_transfer_bytes / r.bandwidth;
            assert!(
                x.link_end_s - x.link_start_s >= min - 1e-9,
                "a transfer takes at least bytes / bandwidth: {x:?}"
            );
        }
        // One transfer at a time on each replica's link.
        for replica in 0..4u32 {
            let mut spans: Vec<(f64, f64)> = t
                .iter()
                .filter(|x| x.prefill_replica == replica || x.decode_replica == replica)
                .map(|x| (x.link_start_s, x.link_end_s))
                .collect();
            spans.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in spans.windows(2) {
                assert!(w[1].0 >= w[0].1 - 1e-9, "replica {replica}: {w:?} overlap");
            }
        }
        let dsum = m.disaggregation.as_ref().expect("a hand-off summary");
        assert_eq!(dsum.requests, handed);
        assert_eq!(m.pools.len(), 2);
        assert_eq!(m.pools[0].role, "prefill");
    }
}

#[test]
fn the_same_seed_gives_the_same_run_and_a_colocated_cluster_has_no_hand_offs() {
    let text = body(5, PD, "");
    let (a, b) = (run("det_a", &text), run("det_b", &text));
    let json = |r: &Run| serde_json::to_string(&r.summary.metrics).unwrap();
    assert_eq!(json(&a), json(&b));
    assert_eq!(a.result.collector.transfers, b.result.collector.transfers);
    assert_eq!(a.result.collector.requests, b.result.collector.requests);
    let c = run("colocated", &body(5, "num_replicas = 4", ""));
    assert!(c.result.collector.transfers.is_empty());
    assert!(c.summary.metrics.disaggregation.is_none() && c.summary.metrics.pools.is_empty());
}

#[test]
fn a_slow_link_shows_in_ttft_by_the_transfer_time() {
    let fast = run(
        "fast",
        &body(
            7,
            &format!("{PD}\nkv_transfer = {{ link = \"nvlink\" }}"),
            "",
        ),
    );
    let slow = run(
        "slow",
        &body(
            7,
            &format!(
                "{PD}\nkv_transfer = {{ link = \"rdma_100g\", bandwidth_gbps = 5.0, layerwise = false }}"
            ),
            "",
        ),
    );
    let ttft = |r: &Run| r.summary.metrics.latency_s.ttft.mean;
    let xfer = |r: &Run| {
        r.summary
            .metrics
            .disaggregation
            .as_ref()
            .unwrap()
            .kv_transfer
            .mean
    };
    // 5 Gbit/s: a 1,500-token Llama-2-7B prompt (0.5 MiB a token) takes about 1.3 s.
    assert!(xfer(&slow) > 0.5, "{}", xfer(&slow));
    assert!(xfer(&fast) < 0.01, "{}", xfer(&fast));
    assert!(
        ttft(&slow) - ttft(&fast) > 0.8 * (xfer(&slow) - xfer(&fast)),
        "TTFT {} vs {}",
        ttft(&slow),
        ttft(&fast)
    );
}

#[test]
fn a_full_decode_pool_makes_prefilled_requests_wait_holding_their_blocks() {
    // One decode replica of 600 blocks (9,600 tokens) for a burst of 3,000-token prompts.
    let cluster = r#"pools = [{ role = "prefill", num_replicas = 2 }, { role = "decode", num_replicas = 1 }]"#;
    let text = body(9, cluster, "[cache]\nnum_blocks = 600")
        .replace("min = 50, max = 3000", "min = 2500, max = 3000")
        .replace("min = 1, max = 300", "min = 200, max = 400");
    let r = run("full", &text);
    assert_eq!(r.summary.metrics.requests_completed, 400);
    let d = r.summary.metrics.disaggregation.as_ref().unwrap();
    assert!(d.handoff_wait.p90 > 0.0, "{:?}", d.handoff_wait);
    assert!(r.summary.metrics.pools[0].kv_usage_max > 0.0);
}

#[test]
fn bad_pool_settings_are_named() {
    let bad = [
        (
            r#"pools = [{ role = "prefill", num_replicas = 1 }]"#,
            "cluster.pools",
        ),
        (
            r#"num_replicas = 2
pools = [{ role = "prefill", num_replicas = 1 }, { role = "decode", num_replicas = 1 }]"#,
            "cluster.num_replicas",
        ),
        (
            r#"kv_transfer = { link = "rdma_400g" }"#,
            "cluster.kv_transfer",
        ),
        (
            &format!("{PD}\nkv_transfer = {{ link = \"carrier_pigeon\" }}"),
            "rdma_400g",
        ),
        (
            r#"pools = [{ role = "prefill", num_replicas = 1, tensor_parallel = 3 }, { role = "decode", num_replicas = 1 }]"#,
            "cluster.pools[0].tensor_parallel",
        ),
        (
            &format!(
                "{PD}\ndecode_router = {{ type = \"prefix_affinity\", balance_rel_threshold = 0.5 }}"
            ),
            "cluster.decode_router",
        ),
        (
            r#"pools = [{ role = "prefill", num_replicas = 1 }, { role = "decode", num_replicas = 1, scheduler = { max_num_seqs = 0, policy = { type = "vllm_v1" } } }]"#,
            "cluster.pools[1].scheduler.max_num_seqs",
        ),
    ];
    for (i, (cluster, needle)) in bad.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("vajra-pd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("bad{i}.toml"));
        std::fs::write(&p, body(1, cluster, "")).unwrap();
        let Err(err) = ExperimentFile::load(&p) else {
            panic!("{cluster}: loaded");
        };
        let err = err.to_string();
        assert!(err.contains(needle), "{cluster}: `{needle}` not in {err}");
    }
}

#[test]
fn pools_of_different_devices_and_widths_run_sessions_with_their_own_shapes() {
    // Listed decode first: replicas are numbered prefill first all the same.
    let text = r#"
seed = 3
[model]
name = "meta-llama/Meta-Llama-3-8B"
[cluster]
device = "h100"
pools = [{ role = "decode", num_replicas = 2, device = "a100", pipeline_parallel = 2 }, { role = "prefill", num_replicas = 1, tensor_parallel = 2 }]
kv_transfer = { link = "rdma_200g", layerwise = false }
decode_router = { type = "least_outstanding" }
[predictor]
profile = "roofline"
[scheduler]
policy = { type = "vllm_v1" }
[router]
type = "prefix_affinity"
[workload]
num_requests = 600
arrival = { type = "sessions", qps = 2.0, turns_min = 2, turns_max = 8, think_time_s = 5.0, think = "exponential", system_prompt_tokens = 1024, system_prompts = 4 }
lengths = { type = "independent", prompt = { type = "lognormal", median = 120.0, sigma = 0.8, max = 2000 }, output = { type = "lognormal", median = 180.0, sigma = 0.7, max = 1000 } }
"#;
    let r = run("mixed", text);
    let m = &r.summary.metrics;
    assert_eq!(m.requests_completed, r.result.issued);
    let roles: Vec<&str> = r
        .summary
        .setup
        .pools
        .iter()
        .map(|p| p.role.as_str())
        .collect();
    assert_eq!(roles, ["prefill", "decode"]);
    assert_eq!((m.pools[0].num_devices, m.pools[1].num_devices), (2, 4));
    assert_eq!(r.summary.setup.num_devices, 6);
    // H100 TP 2 and two A100 PP 2 replicas: KV blocks differ per pool.
    assert_ne!(
        r.summary.setup.pools[0].num_blocks,
        r.summary.setup.pools[1].num_blocks
    );
    for s in &r.result.replica_stats {
        assert_eq!(s.kv.num_free, s.kv.num_blocks);
    }
    assert!(
        r.result.replica_stats[1..]
            .iter()
            .all(|s| s.num_received > 0)
    );
    assert!(
        m.prefix_cache_hit_rate > 0.5,
        "turns reuse their prefill replica's cache"
    );
}

#[test]
fn a_pd_split_search_tries_every_ratio_beside_the_colocated_points() {
    let text = body(4, "num_replicas = 3", "")
        + r#"
[slo]
p99_ttft_s = 1.0
[sweep]
cluster = [
  { device = "h100", num_replicas = 3 },
  { device = "h100", pools = [{ role = "prefill", num_replicas = 1 }, { role = "decode", num_replicas = 1 }] },
]
"#;
    let f = load("split", &text);
    let pts = vajra_sim::capacity::pd_splits(&f.points, 3).unwrap();
    let labels: Vec<&str> = pts.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels.len(), 3, "{labels:?}");
    assert!(labels[0].contains("num_replicas3"));
    assert!(
        labels[1].contains("1P2D") && labels[2].contains("2P1D"),
        "{labels:?}"
    );
    for p in &pts[1..] {
        assert_eq!(p.experiment.cluster.total_replicas(), 3);
    }
    let caps: Vec<_> = pts
        .iter()
        .map(|p| vajra_sim::capacity::search(&f, p).unwrap())
        .collect();
    assert!(
        caps.iter()
            .all(|c| c.capacity_qps.is_some() && c.devices == 3)
    );
    assert!(vajra_sim::capacity::pd_splits(&f.points, 1).is_err());
    let colocated = load("split_colocated", &body(4, "num_replicas = 3", ""));
    assert!(vajra_sim::capacity::pd_splits(&colocated.points, 3).is_err());
}

#[test]
fn each_pool_runs_its_own_scheduler() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::RowAccessor;
    let cluster = r#"pools = [
  { role = "prefill", num_replicas = 2, scheduler = { max_num_seqs = 64, policy = { type = "vllm_v1", max_num_batched_tokens = 8192 } } },
  { role = "decode", num_replicas = 2, scheduler = { max_num_seqs = 6, policy = { type = "sarathi", chunk_size = 256 } } },
]"#;
    let f = load("own_sched", &body(6, cluster, ""));
    let point = f.points[0].clone();
    let prep = prepare(&f, &point).unwrap();
    assert_eq!(prep.setup.policy, "vllm_v1", "the prefill pool's");
    let dir = std::env::temp_dir().join(format!("vajra-pd-{}-own", std::process::id()));
    let (res, _, _) = simulate(&f, &point, &prep, Some(&dir), false, false, None).unwrap();
    assert_eq!(res.collector.outcomes.len(), 400);
    let r = SerializedFileReader::new(std::fs::File::open(dir.join("batches.parquet")).unwrap())
        .unwrap();
    let schema = r.metadata().file_metadata().schema_descr();
    let col = |name: &str| {
        (0..schema.num_columns())
            .find(|&i| schema.column(i).name() == name)
            .unwrap()
    };
    let (replica, size, prefill) = (col("replica"), col("num_requests"), col("prefill_tokens"));
    let (mut decode_max, mut prefill_max_tokens) = (0, 0);
    for row in r.get_row_iter(None).unwrap() {
        let row = row.unwrap();
        if row.get_int(replica).unwrap() >= 2 {
            decode_max = decode_max.max(row.get_int(size).unwrap());
        } else {
            prefill_max_tokens = prefill_max_tokens.max(row.get_int(prefill).unwrap());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        decode_max <= 6,
        "decode batches keep max_num_seqs = 6: {decode_max}"
    );
    assert!(decode_max >= 2);
    assert!(
        prefill_max_tokens > 256,
        "prefill steps use their own 8,192-token budget: {prefill_max_tokens}"
    );
}
