//! Hot paths of a decode step on the default model's shapes: one Q4_1 matrix-vector product of
//! each size a block uses, and the Q8_0 LM head. Compare the SIMD kernel against the scalar
//! definition in the same run to see what the hand-written code buys.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use model::quant::{self, ActQ8, BlockQ4_1, BlockQ8_0, QK};

fn q4_1(rows: usize, cols: usize) -> Vec<BlockQ4_1> {
    (0..rows * cols / QK)
        .map(|i| BlockQ4_1 {
            d: f16::from_f32(0.01 + (i % 7) as f32 * 1e-3),
            m: f16::from_f32(-0.05),
            qs: std::array::from_fn(|j| ((i * 31 + j * 7) % 256) as u8),
        })
        .collect()
}

fn acts(cols: usize) -> Vec<ActQ8> {
    let xs: Vec<f32> = (0..cols)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut a = vec![ActQ8::default(); cols / QK];
    quant::quantize_row(&xs, &mut a);
    a
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    for (name, rows, cols) in [
        ("attn_q 576x576", 576, 576),
        ("ffn_up 1536x576", 1536, 576),
        ("ffn_down 576x1536", 576, 1536),
    ] {
        let w = q4_1(rows, cols);
        let a = acts(cols);
        let per_row = cols / QK;
        g.throughput(Throughput::Bytes(
            (w.len() * std::mem::size_of::<BlockQ4_1>()) as u64,
        ));
        g.bench_function(format!("q4_1 simd {name}"), |b| {
            b.iter(|| {
                let mut s = 0f32;
                for r in w.chunks_exact(per_row) {
                    s += quant::dot_q4_1(r, &a);
                }
                s
            })
        });
        g.bench_function(format!("q4_1 scalar {name}"), |b| {
            b.iter(|| {
                let mut s = 0f32;
                for r in w.chunks_exact(per_row) {
                    s += quant::scalar::dot_q4_1(r, &a);
                }
                s
            })
        });
    }
    let (rows, cols) = (49152, 576);
    let head: Vec<BlockQ8_0> = (0..rows * cols / QK)
        .map(|i| BlockQ8_0 {
            d: f16::from_f32(0.01),
            qs: std::array::from_fn(|j| ((i * 13 + j) % 255) as i8),
        })
        .collect();
    let a = acts(cols);
    g.throughput(Throughput::Bytes(
        (head.len() * std::mem::size_of::<BlockQ8_0>()) as u64,
    ));
    g.bench_function("q8_0 simd lm_head 49152x576", |b| {
        b.iter(|| {
            head.chunks_exact(cols / QK)
                .map(|r| quant::dot_q8_0(r, &a))
                .sum::<f32>()
        })
    });
    g.finish();

    let xs: Vec<f32> = (0..576).map(|i| i as f32 / 576.0).collect();
    c.bench_function("quantize_row 576", |b| {
        let mut out = vec![ActQ8::default(); 576 / QK];
        b.iter(|| quant::quantize_row(&xs, &mut out))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
