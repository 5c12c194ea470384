//! Every kernel path against the reference definition, bit for bit, on random and extreme
//! blocks, with tile counts, token counts and row counts that exercise every remainder.

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cpu::available;
use super::reference::{self, ActRow};
use super::*;

/// Which bytes of a block hold an f16 field (so random blocks can be given sane scales).
fn f16_fields(format: WeightFormat) -> &'static [usize] {
    match format {
        WeightFormat::Q4_0 | WeightFormat::Q5_0 | WeightFormat::Q8_0 => &[0],
        WeightFormat::Q4_1 | WeightFormat::Q5_1 => &[0, 2],
        WeightFormat::Q2K => &[80, 82],
        WeightFormat::Q3K => &[108],
        WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        WeightFormat::Q6K => &[208],
        WeightFormat::F16 => &[0],
        _ => &[],
    }
}

#[derive(Clone, Copy, Debug)]
enum Flavour {
    /// Random quants, scales of ordinary size.
    Random,
    /// Every quant and scale byte at 0x00 or 0xFF, scales ±65504 or subnormal, zero scales.
    Extreme,
}

fn random_matrix(
    rng: &mut StdRng,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    fl: Flavour,
) -> Vec<u8> {
    let bb = f.block_bytes();
    let n = rows * cols / f.block_elems();
    let mut bytes = vec![0u8; n * bb];
    match fl {
        Flavour::Random => rng.fill(&mut bytes[..]),
        Flavour::Extreme => {
            for b in bytes.iter_mut() {
                *b = if rng.random_bool(0.5) { 0xFF } else { 0 };
            }
        }
    }
    for block in bytes.chunks_exact_mut(bb) {
        let scale = |rng: &mut StdRng| -> f32 {
            match fl {
                Flavour::Random => rng.random_range(-0.05f32..0.05),
                Flavour::Extreme => *[0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1.0]
                    .get(rng.random_range(0..7))
                    .unwrap(),
            }
        };
        match f {
            WeightFormat::F32 => {
                let v: f32 = match fl {
                    Flavour::Random => rng.random_range(-1.0..1.0),
                    Flavour::Extreme => *[0.0, -0.0, 1e30, -1e-40, 3.0e-39, 1.0]
                        .get(rng.random_range(0..6))
                        .unwrap(),
                };
                block.copy_from_slice(&v.to_le_bytes());
            }
            WeightFormat::BF16 => {
                let v: f32 = match fl {
                    Flavour::Random => rng.random_range(-1.0..1.0),
                    Flavour::Extreme => *[0.0, -0.0, 1e30, -1e-39, 1.0]
                        .get(rng.random_range(0..5))
                        .unwrap(),
                };
                block.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
            _ => {
                for &at in f16_fields(f) {
                    block[at..at + 2].copy_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
                }
            }
        }
    }
    bytes
}

fn random_inputs(rng: &mut StdRng, n: usize, fl: Flavour) -> Vec<f32> {
    (0..n)
        .map(|i| match fl {
            Flavour::Random => rng.random_range(-4.0..4.0),
            // Whole zero blocks, huge and tiny magnitudes, sign flips.
            Flavour::Extreme => match (i / 32) % 4 {
                0 => 0.0,
                1 => {
                    if i % 2 == 0 {
                        1e6
                    } else {
                        -3e-6
                    }
                }
                2 => rng.random_range(-1.0..1.0) * 1e-30,
                _ => rng.random_range(-100.0..100.0),
            },
        })
        .collect()
}

fn reference_product(f: WeightFormat, bytes: &[u8], rows: usize, acts: &Activations) -> Vec<f32> {
    let row_bytes = bytes.len() / rows;
    let nb = acts.cols / f.block_elems();
    let mut out = vec![0f32; acts.tokens * rows];
    for t in 0..acts.tokens {
        let a = match ActKind::of(f) {
            ActKind::Q8 => ActRow::Q8(&acts.q8()[t * nb..(t + 1) * nb]),
            ActKind::Q8K => ActRow::Q8K(&acts.q8k()[t * nb..(t + 1) * nb]),
            ActKind::F32 => ActRow::Float(acts.row(t)),
            ActKind::F16 => ActRow::Float(&acts.f16()[t * acts.cols..(t + 1) * acts.cols]),
            ActKind::BF16 => ActRow::Float(&acts.bf16()[t * acts.cols..(t + 1) * acts.cols]),
        };
        for r in 0..rows {
            out[t * rows + r] = reference::dot(f, &bytes[r * row_bytes..][..row_bytes], a);
        }
    }
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
}

#[test]
fn every_path_equals_the_reference_bit_for_bit() {
    let paths = available();
    eprintln!("kernel paths exercised on this CPU: {paths:?}");
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Dotprod, Isa::Neon] {
        if !paths.contains(&isa) {
            eprintln!("SKIPPED: the {isa} path (this CPU cannot run it)");
        }
    }
    let mut rng = StdRng::seed_from_u64(11);
    for f in WeightFormat::ALL {
        let be = f.block_elems().max(32);
        // Token counts cover every tile width (1, 2, 4, 8) and their remainders.
        for (rows, blocks, tokens) in [
            (16, 1, 1),
            (35, 3, 5),
            (64, 2, 4),
            (7, 1, 2),
            (83, 2, 1),
            (40, 2, 11),
            // Prefill runs blocks in chunks of 16 on some paths: two chunk boundaries.
            (20, 37, 5),
        ] {
            for fl in [Flavour::Random, Flavour::Extreme] {
                let cols = be * blocks;
                let bytes = random_matrix(&mut rng, f, rows, cols, fl);
                let xs = random_inputs(&mut rng, tokens * cols, fl);
                let acts = Activations::new(&xs, tokens, cols);
                let want = reference_product(f, &bytes, rows, &acts);
                let packed = Packed::new(f, rows, cols, &bytes);
                for &isa in paths {
                    let mut got = Vec::new();
                    gemm(isa, &packed, &acts, &mut got).unwrap();
                    if let Some(i) = same_bits(&got, &want) {
                        panic!(
                            "{f:?} {fl:?} on {isa}: {rows}x{cols}, {tokens} tokens: element {i} \
                             (token {}, row {}) is {} ({:#x}), reference {} ({:#x})",
                            i / rows,
                            i % rows,
                            got[i],
                            got[i].to_bits(),
                            want[i],
                            want[i].to_bits()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_batch() {
    let mut rng = StdRng::seed_from_u64(12);
    for f in [
        WeightFormat::Q4_1,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
        WeightFormat::F16,
    ] {
        let cols = f.block_elems().max(32) * 2;
        let rows = 72;
        let bytes = random_matrix(&mut rng, f, rows, cols, Flavour::Random);
        let packed = Packed::new(f, rows, cols, &bytes);
        let xs = random_inputs(&mut rng, 9 * cols, Flavour::Random);
        for &isa in available() {
            let mut batch = Vec::new();
            gemm(isa, &packed, &Activations::new(&xs, 9, cols), &mut batch).unwrap();
            for t in 0..9 {
                let mut one = Vec::new();
                let x = &xs[t * cols..(t + 1) * cols];
                gemm(isa, &packed, &Activations::new(x, 1, cols), &mut one).unwrap();
                assert_eq!(
                    same_bits(&one, &batch[t * rows..(t + 1) * rows]),
                    None,
                    "{f:?} {isa}"
                );
            }
        }
    }
}

#[test]
fn quantized_products_approximate_the_float_product() {
    let mut rng = StdRng::seed_from_u64(13);
    for f in WeightFormat::ALL {
        let cols = 512;
        let rows = 16;
        let bytes = random_matrix(&mut rng, f, rows, cols, Flavour::Random);
        let xs = random_inputs(&mut rng, cols, Flavour::Random);
        let mut got = Vec::new();
        gemm(
            Isa::Portable,
            &Packed::new(f, rows, cols, &bytes),
            &Activations::new(&xs, 1, cols),
            &mut got,
        )
        .unwrap();
        let row_bytes = bytes.len() / rows;
        for r in 0..rows {
            let mut w = vec![0f32; cols];
            f.dequantize(&bytes[r * row_bytes..][..row_bytes], &mut w);
            let exact: f64 = w.iter().zip(&xs).map(|(a, b)| *a as f64 * *b as f64).sum();
            let norm: f64 = w
                .iter()
                .zip(&xs)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let err = (got[r] as f64 - exact).abs();
            assert!(
                err <= 0.02 * norm + 1e-6,
                "{f:?} row {r}: {} vs {exact} (|terms| {norm})",
                got[r]
            );
        }
    }
}
