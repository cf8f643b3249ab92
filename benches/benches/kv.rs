//! Block pool and prefix cache: allocate + free per block, touch, and a prefix lookup over a
//! 4,096-token prompt (hashing 256 blocks and looking each up). Run:
//! `cargo bench -p vajra-benches --bench kv`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use vajra_core::config::CacheConfig;
use vajra_core::ids::{BlockId, RequestId};
use vajra_core::kv::{AllocSpec, BlockPool, BlockTable, KvCacheManager, SeqContent};
use vajra_core::request::Prompt;

fn bench_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_pool");
    for n in [1u32, 16, 256] {
        g.throughput(Throughput::Elements(u64::from(n)));
        g.bench_function(format!("allocate_free_{n}_blocks"), |b| {
            let mut pool = BlockPool::new(100_000);
            let mut out: Vec<BlockId> = Vec::with_capacity(n as usize);
            b.iter(|| {
                out.clear();
                assert!(pool.allocate_into(black_box(n), &mut out));
                pool.free(out.iter().rev().copied());
            });
        });
    }
    g.throughput(Throughput::Elements(256));
    g.bench_function("touch_256_free_cached_blocks", |b| {
        let mut pool = BlockPool::new(100_000);
        let mut blocks = Vec::new();
        pool.allocate_into(256, &mut blocks);
        pool.free(blocks.iter().rev().copied());
        b.iter(|| {
            pool.touch(black_box(&blocks));
            pool.free(blocks.iter().rev().copied());
        });
    });
    g.finish();
}

fn bench_prefix(c: &mut Criterion) {
    let cache = CacheConfig::default();
    let mut kv = KvCacheManager::new(&cache, 10_000);
    let prompt = Prompt::Tokens(
        (0..4096u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
            .collect(),
    );
    let seq = SeqContent {
        request: RequestId(0),
        prompt: &prompt,
        output: &[],
        num_output: 0,
        salt: None,
    };
    let mut t = BlockTable::default();
    let spec = AllocSpec {
        num_computed: 0,
        new_computed: &[],
        num_new_tokens: 4096,
        apply_watermark: false,
    };
    kv.allocate_slots(&mut t, &spec).expect("fits");
    kv.cache_full_blocks(&mut t, &seq, 4096);
    let mut g = c.benchmark_group("prefix_cache");
    g.bench_function("lookup_4096_token_prompt_all_hits", |b| {
        b.iter_batched_ref(
            BlockTable::default,
            |fresh| {
                let (hits, tokens) = kv.get_computed_blocks(fresh, black_box(&seq));
                assert_eq!(tokens, 4080);
                hits
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_pool, bench_prefix
}
criterion_main!(benches);
