//! The hot paths of a block, single-threaded, for every weight format and every kernel path this
//! CPU can run, side by side in one run: a matrix-vector product (decode) and a 64-token
//! product (prefill) on the default model's widest shape (768 columns for the K-quants, whose
//! blocks are 256 wide), plus activation quantization.
//!
//! `cargo bench -p model --bench kernels -- 'matvec 1536 rows/Q4_1'` narrows the run to one
//! format.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::kernels::{self, act, cpu, Activations, Packed, WeightFormat};

/// Deterministic bytes with sane f16 scales (random bits would include NaN and inf).
fn matrix(f: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols / f.block_elems() * f.block_bytes();
    let mut bytes: Vec<u8> = (0..n).map(|i| ((i * 2654435761) >> 13) as u8).collect();
    let sane = half::f16::from_f32(0.01).to_le_bytes();
    match f {
        WeightFormat::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&0.01f32.to_le_bytes());
            }
        }
        WeightFormat::F16 | WeightFormat::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&sane);
            }
        }
        _ => {
            // Every even byte pair that could be a scale gets a sane value; quants stay varied.
            let bb = f.block_bytes();
            for block in bytes.chunks_exact_mut(bb) {
                for at in [0, 2, bb - 4, bb - 2] {
                    block[at..at + 2].copy_from_slice(&sane);
                }
            }
        }
    }
    bytes
}

fn inputs(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let rows = 1536;
    let paths = cpu::available();
    eprintln!(
        "CPU: {} [{}]; kernel paths: {paths:?}",
        cpu::cpu_model(),
        cpu::cpu_flags().join(" ")
    );
    for (group, tokens) in [("matvec 1536 rows", 1usize), ("gemm 1536 rows x64", 64)] {
        let mut g = c.benchmark_group(group);
        for f in WeightFormat::ALL {
            // The default model's width, or the next multiple of a K-quant's 256-element blocks.
            let cols = if f.block_elems() == 256 { 768 } else { 576 };
            let xs = inputs(tokens * cols);
            let packed = Packed::new(f, rows, cols, &matrix(f, rows, cols));
            g.throughput(Throughput::Bytes(packed.len_bytes() as u64));
            for &isa in paths {
                let mut out = Vec::new();
                let id = BenchmarkId::new(format!("{}x{cols}", f.name()), isa);
                g.bench_with_input(id, &isa, |b, &isa| {
                    b.iter(|| {
                        let a = Activations::new(&xs, tokens, cols);
                        kernels::gemm(isa, &packed, &a, &mut out).unwrap();
                        std::hint::black_box(&out);
                    })
                });
            }
        }
        g.finish();
    }

    // Larger than the last-level cache: what a decode step streams from memory.
    let (rows, cols) = (32768, 2048);
    let mut g = c.benchmark_group("matvec from memory 32768x2048");
    g.sample_size(10);
    let xs = inputs(cols);
    for f in [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
    ] {
        let packed = Packed::new(f, rows, cols, &matrix(f, rows, cols));
        g.throughput(Throughput::Bytes(packed.len_bytes() as u64));
        for &isa in paths.iter().filter(|i| **i != cpu::Isa::Portable) {
            let mut out = Vec::new();
            g.bench_with_input(BenchmarkId::new(f.name(), isa), &isa, |b, &isa| {
                b.iter(|| {
                    let a = Activations::new(&xs, 1, cols);
                    kernels::gemm(isa, &packed, &a, &mut out).unwrap();
                    std::hint::black_box(&out);
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("quantize activations, 1536 wide");
    let xs = inputs(1536);
    g.bench_function("Q8 (32-blocks)", |b| {
        let mut out = vec![act::ActQ8::default(); 1536 / 32];
        b.iter(|| act::quantize_q8(&xs, &mut out))
    });
    g.bench_function("Q8_K (256-blocks)", |b| {
        let mut out = vec![act::ActQ8K::default(); 1536 / 256];
        b.iter(|| act::quantize_q8k(&xs, &mut out))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
