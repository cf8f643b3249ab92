//! The simulator's hot path: predicting a batch, and a whole 1,000-request run (one replica,
//! Llama-2-7B on H100, roofline predictor, `sarathi`). Run:
//! `cargo bench -p vajra-benches --bench sim`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;
use vajra_core::config::{CacheConfig, ParallelConfig, PolicyConfig, SchedulerConfig};
use vajra_core::ids::RequestId;
use vajra_core::request::{Prompt, Request};
use vajra_core::router::RouterConfig;
use vajra_core::sched::Scheduler;
use vajra_core::sched::config::SarathiConfig;
use vajra_core::time::Timestamp;
use vajra_experiment::catalog::{device, model};
use vajra_metrics::{Collector, SloConfig};
use vajra_sim::predictor::{Predictor, PredictorConfig};
use vajra_sim::sim::{SimSpec, run};
use vajra_workload::{RequestSource, WorkloadConfig};

fn predictor() -> Predictor {
    Predictor::new(
        &model("Llama-2-7b-hf").expect("built-in"),
        &device("h100").expect("built-in"),
        ParallelConfig::default(),
        &PredictorConfig::default(),
        None,
        None,
        512,
    )
    .expect("roofline predictor")
}

fn sarathi() -> SchedulerConfig {
    let mut c = SchedulerConfig::new(PolicyConfig::Sarathi(SarathiConfig {
        chunk_size: 512,
        ..Default::default()
    }));
    c.max_num_seqs = 256;
    c
}

fn bench_predict(c: &mut Criterion) {
    let p = predictor();
    let mut g = c.benchmark_group("predict");
    for n in [8u64, 256] {
        let mut s =
            Scheduler::new(sarathi(), &CacheConfig::default(), 65_536, 4096).expect("valid");
        for i in 0..n {
            s.add_request(
                Request::new(RequestId(i), Prompt::synthetic(1), 100, Timestamp::ZERO),
                Timestamp::ZERO,
            )
            .expect("fits");
        }
        // Prompts of one token: the first step already decodes every request.
        let out = s.schedule(Timestamp::ZERO);
        g.bench_function(format!("decode_batch_{n}"), |b| {
            b.iter(|| black_box(p.predict(black_box(&out))))
        });
    }
    g.finish();
}

fn bench_run(c: &mut Criterion) {
    let p = predictor();
    let sched = sarathi();
    let cache = CacheConfig::default();
    let workload: WorkloadConfig = toml::from_str(
        r#"num_requests = 1000
           arrival = { type = "poisson", qps = 4.0 }
           lengths = { type = "independent", prompt = { type = "lognormal", median = 1020.0, sigma = 0.7, max = 3500 }, output = { type = "lognormal", median = 129.0, sigma = 0.9, max = 500 } }"#,
    )
    .expect("valid workload");
    let slo = SloConfig::default();
    // The same workload on one prefill and one decode replica of the same shape, KV over
    // 400 Gbit/s RDMA sent layer by layer: the cost of the hand-off and the link model.
    let disagg = vajra_sim::sim::DisaggSpec {
        num_prefill: 1,
        decode_predictor: &p,
        decode_blocks: 7424,
        decode_router: RouterConfig::LeastKvUsage,
        decode_scheduler: &sched,
        bandwidth: 50e9,
        latency: vajra_core::time::Duration(50_000),
        layerwise: true,
        num_layers: 32,
        kv_bytes_per_token: 524_288.0,
    };
    for (name, replicas, d) in [
        ("run_1000_requests_1_replica", 1, None),
        ("run_1000_requests_1p1d", 2, Some(&disagg)),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let spec = SimSpec {
                    num_replicas: replicas,
                    scheduler: &sched,
                    cache: &cache,
                    num_blocks: 7424,
                    max_model_len: 4096,
                    router: RouterConfig::RoundRobin,
                    router_staleness: vajra_core::time::Duration(0),
                    slo: None,
                    predictor: &p,
                    seed: 1,
                    progress: None,
                    policy: None,
                    step_times: None,
                    disagg: d,
                };
                let mut src =
                    RequestSource::new(&workload, 1, Path::new("."), 4096).expect("source");
                let r = run(&spec, &mut src, Collector::new(&slo, replicas), None).expect("runs");
                black_box(r.events)
            })
        });
    }
}

criterion_group!(benches, bench_predict, bench_run);
criterion_main!(benches);
