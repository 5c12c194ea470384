//! What batching sessions buys a node: one decode step of N sessions run as N separate
//! forward passes against one batched pass (`BlockStack::forward_batch`), on the default model's
//! blocks, 2 threads, each session with 64 positions of history.
//!
//! `cargo bench -p model --bench batch`. Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (or
//! `$EDGE_MODEL`); prints a line and does nothing without it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::{load, BatchEntry, GgufFile, Hidden, LoadOptions, ModelSpec, SessionKv};

const HISTORY: usize = 64;

fn bench(c: &mut Criterion) {
    let path = std::env::var("EDGE_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    });
    if !std::path::Path::new(&path).exists() {
        println!("batch bench SKIPPED: no model at {path} (scripts/fetch-model.sh)");
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let file = GgufFile::open(&path).unwrap();
    let count = ModelSpec::from_file(&file).unwrap().block_count;
    let slice = load(&file, &LoadOptions::blocks(0..count), &mut |_, _| {}).unwrap();
    let stack = slice.stack().unwrap();
    let blocks = stack.range();
    let dim = stack.spec().embedding_length;
    let row =
        |s: usize| -> Vec<f32> { (0..dim).map(|i| ((i * 7 + s) % 13) as f32 * 0.01).collect() };
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(20);
    for sessions in [1usize, 4, 8, 16] {
        // Caches with HISTORY positions each; every iteration appends one and truncates back.
        let mut caches: Vec<SessionKv> = (0..sessions)
            .map(|s| {
                let mut kv = stack.new_cache(blocks.clone(), HISTORY + 1);
                let data: Vec<f32> = (0..HISTORY).flat_map(|t| row(s + t)).collect();
                let mut h = Hidden::new(HISTORY, dim, data).unwrap();
                pool.install(|| stack.forward(&mut h, &mut kv, 0)).unwrap();
                kv
            })
            .collect();
        group.throughput(Throughput::Elements(sessions as u64));
        group.bench_function(BenchmarkId::new("one_by_one", sessions), |b| {
            b.iter(|| {
                for (s, kv) in caches.iter_mut().enumerate() {
                    let mut h = Hidden::new(1, dim, row(s)).unwrap();
                    pool.install(|| stack.forward(&mut h, kv, HISTORY)).unwrap();
                    kv.truncate(HISTORY);
                }
            })
        });
        group.bench_function(BenchmarkId::new("batched", sessions), |b| {
            b.iter(|| {
                let data: Vec<f32> = (0..sessions).flat_map(row).collect();
                let mut h = Hidden::new(sessions, dim, data).unwrap();
                let mut entries: Vec<BatchEntry> = caches
                    .iter_mut()
                    .map(|kv| BatchEntry {
                        tokens: 1,
                        pos: HISTORY,
                        kv,
                    })
                    .collect();
                pool.install(|| stack.forward_batch(blocks.clone(), &mut h, &mut entries))
                    .unwrap();
                drop(entries);
                for kv in caches.iter_mut() {
                    kv.truncate(HISTORY);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
