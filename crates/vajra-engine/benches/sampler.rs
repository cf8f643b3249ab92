//! The host sampler's cost per token over a vocabulary of logits (`cargo bench -p vajra-engine
//! --bench sampler`): pure temperature, top-k 50, top-p 0.9, at SmolLM2's and Llama-3's
//! vocabulary sizes. Every sampled request of a step that does not draw on the device pays it.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vajra_core::sampling::SamplingParams;
use vajra_engine::sampler::RequestSampler;

/// Logits of a trained model's rough shape: most tokens far below a few dozen plausible ones.
fn row(vocab: usize) -> Vec<f32> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            // A long tail with a few high logits.
            12.0 * u.powi(8) - 4.0 * (1.0 - u)
        })
        .collect()
}

fn sampler(c: &mut Criterion) {
    let mut g = c.benchmark_group("host_sampler");
    for vocab in [49_152usize, 128_256] {
        let logits = row(vocab);
        let cases = [
            ("temperature", 0, 1.0),
            ("top_k_50", 50, 1.0),
            ("top_p_0.9", 0, 0.9),
        ];
        for (name, top_k, top_p) in cases {
            let params = SamplingParams {
                temperature: 1.0,
                top_k,
                top_p,
                seed: Some(1),
                ..SamplingParams::default()
            };
            let mut s = RequestSampler::new(params, &[], 1);
            g.bench_with_input(BenchmarkId::new(name, vocab), &logits, |b, l| {
                b.iter(|| black_box(s.sample(&mut l.clone())))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, sampler);
criterion_main!(benches);
