//! The canonical arithmetic of every kernel, written plainly on ggml's own block layout: the
//! definition each SIMD path must reproduce bit for bit.
//!
//! For the quantized formats the definition is ggml's AVX2 `ggml_vec_dot_*` (the code both of
//! llama.cpp's x86 builds run for these types, and what its reference outputs come from): each
//! row keeps 8 float accumulators ("lanes"); lane `l` takes the elements `e` with
//! `(e % 32) / 4 == l`. Per block, the lane's products are summed exactly as integers (any
//! order gives the same integer), converted to f32 and added with one fused multiply-add by
//! `weight scale * activation scale`. Minimum terms are accumulated as ggml does for each format,
//! and the row's result is ggml's horizontal-sum tree over the lanes. Following ggml this closely
//! matters: the small models this runs amplify one-ulp differences through the 8-bit
//! re-quantization of activations, so a different but equally exact order drifts from llama.cpp
//! by tenths of a nat in log-probability.
//!
//! Q4_0 is the exception: llama.cpp repacks it on x86 (any CPU with AVX2) and sums each block
//! whole, with one accumulator per row, so that is its definition here too.
//!
//! Float weights use one accumulator per row and one fused multiply-add per element, in column
//! order.

use super::act::{ActQ8, ActQ8K};
use super::formats::*;

/// Activations of one token, in the form its weight format reads.
#[derive(Clone, Copy)]
pub enum ActRow<'a> {
    Q8(&'a [ActQ8]),
    Q8K(&'a [ActQ8K]),
    /// F32, or floats already rounded to f16/bf16 for those weight formats.
    Float(&'a [f32]),
}

/// ggml's `hsum_float_8`: `((l4 + l0) + (l6 + l2)) + ((l5 + l1) + (l7 + l3))`.
#[inline(always)]
pub fn hsum8(a: [f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

/// The 4-lane tail of ggml's Q4_K dot product: `(l0 + l2) + (l1 + l3)`.
#[inline(always)]
pub fn hsum4(a: [f32; 4]) -> f32 {
    (a[0] + a[2]) + (a[1] + a[3])
}

/// The lane of element `e`.
#[inline(always)]
fn lane(e: usize) -> usize {
    (e % 32) / 4
}

/// The product of one row (ggml blocks, `bytes`) with one token's activations.
pub fn dot(format: WeightFormat, bytes: &[u8], acts: ActRow) -> f32 {
    match (format, acts) {
        (WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16, ActRow::Float(x)) => {
            let mut w = vec![0f32; x.len()];
            format.dequantize(bytes, &mut w);
            let mut acc = 0f32;
            for (w, x) in w.iter().zip(x) {
                acc = w.mul_add(*x, acc);
            }
            acc
        }
        (WeightFormat::Q4_0, ActRow::Q8(a)) => block_sums(cast::<BlockQ4_0>(bytes), a, |b| {
            let q: [i32; 32] = std::array::from_fn(|j| nibble(&b.qs, j) as i32 - 8);
            (q, b.d.get())
        }),
        (WeightFormat::Q4_1, ActRow::Q8(a)) => blocks32(cast::<BlockQ4_1>(bytes), a, |b| {
            let q: [i32; 32] = std::array::from_fn(|j| nibble(&b.qs, j) as i32);
            (q, b.d.get(), Some(b.m.get()))
        }),
        (WeightFormat::Q5_0, ActRow::Q8(a)) => blocks32(cast::<BlockQ5_0>(bytes), a, |b| {
            let q: [i32; 32] =
                std::array::from_fn(|j| (nibble(&b.qs, j) | q5_high(&b.qh, j)) as i32 - 16);
            (q, b.d.get(), None)
        }),
        (WeightFormat::Q5_1, ActRow::Q8(a)) => blocks32(cast::<BlockQ5_1>(bytes), a, |b| {
            let q: [i32; 32] =
                std::array::from_fn(|j| (nibble(&b.qs, j) | q5_high(&b.qh, j)) as i32);
            (q, b.d.get(), Some(b.m.get()))
        }),
        (WeightFormat::Q8_0, ActRow::Q8(a)) => blocks32(cast::<BlockQ8_0>(bytes), a, |b| {
            (b.qs.map(|v| v as i32), b.d.get(), None)
        }),
        (WeightFormat::Q2K, ActRow::Q8K(a)) => q2k(cast(bytes), a),
        (WeightFormat::Q3K, ActRow::Q8K(a)) => q3k(cast(bytes), a),
        (WeightFormat::Q4K, ActRow::Q8K(a)) => q4k_q5k(
            cast::<BlockQ4K>(bytes),
            a,
            |b| {
                let q = std::array::from_fn(|e| q4k_quant(&b.qs, e) as i32);
                (q, b.d.get(), b.dmin.get(), b.scales)
            },
            true,
        ),
        (WeightFormat::Q5K, ActRow::Q8K(a)) => q4k_q5k(
            cast::<BlockQ5K>(bytes),
            a,
            |b| {
                let q = std::array::from_fn(|e| q5k_quant(b, e) as i32);
                (q, b.d.get(), b.dmin.get(), b.scales)
            },
            false,
        ),
        (WeightFormat::Q6K, ActRow::Q8K(a)) => q6k(cast(bytes), a),
        (f, _) => panic!("activations of the wrong kind for {f:?}"),
    }
}

/// 32-blocks: `f(block) = (signed quants, scale, minimum if any)`. ggml: `acc = fma(d, lane, acc)`
/// per block, `summs = fma(m, s, summs)`, result `hsum8(acc) + summs`.
fn blocks32<B>(w: &[B], a: &[ActQ8], f: impl Fn(&B) -> ([i32; 32], f32, Option<f32>)) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut has_min = false;
    for (b, a) in w.iter().zip(a) {
        let (q, d, m) = f(b);
        if let Some(m) = m {
            has_min = true;
            summs = m.mul_add(a.s, summs);
        }
        let dd = d * a.d;
        let mut lanes = [0i32; 8];
        for (e, q) in q.iter().enumerate() {
            lanes[lane(e)] += q * a.qs[e] as i32;
        }
        for (acc, l) in acc.iter_mut().zip(lanes) {
            *acc = dd.mul_add(l as f32, *acc);
        }
    }
    if has_min {
        hsum8(acc) + summs
    } else {
        hsum8(acc)
    }
}

/// 32-blocks summed whole (Q4_0; llama.cpp's repacked x86 arithmetic): `f(block) = (signed
/// quants, scale)`, `acc = fma(d_w * d_a, sum, acc)` per block, one accumulator.
fn block_sums<B>(w: &[B], a: &[ActQ8], f: impl Fn(&B) -> ([i32; 32], f32)) -> f32 {
    let mut acc = 0f32;
    for (b, a) in w.iter().zip(a) {
        let (q, d) = f(b);
        let sum: i32 = q.iter().zip(&a.qs).map(|(q, a)| q * *a as i32).sum();
        acc = (d * a.d).mul_add(sum as f32, acc);
    }
    acc
}

/// Integer lanes of a 256-block: `sum over e of scale(e) * q(e) * a(e)` per lane.
fn lanes256(q: &[i32; 256], scale: impl Fn(usize) -> i32, a: &ActQ8K) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for e in 0..256 {
        lanes[lane(e)] += scale(e) * q[e] * a.qs[e] as i32;
    }
    lanes
}

fn q2k(w: &[BlockQ2K], a: &[ActQ8K]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, a) in w.iter().zip(a) {
        let d = a.d * b.d.get();
        let dmin = -a.d * b.dmin.get();
        let m = |j: usize| (b.scales[j] >> 4) as i32;
        for (k, acc) in acc.iter_mut().enumerate() {
            let mins = m(2 * k) * a.bsums[2 * k] + m(2 * k + 1) * a.bsums[2 * k + 1];
            *acc = dmin.mul_add(mins as f32, *acc);
        }
        let q = std::array::from_fn(|e| q2_low(&b.qs, e) as i32);
        let lanes = lanes256(&q, |e| (b.scales[e / 16] & 0xF) as i32, a);
        for (acc, l) in acc.iter_mut().zip(lanes) {
            *acc = d.mul_add(l as f32, *acc);
        }
    }
    hsum8(acc)
}

fn q3k(w: &[BlockQ3K], a: &[ActQ8K]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, a) in w.iter().zip(a) {
        let d = a.d * b.d.get();
        let q = std::array::from_fn(|e| q3_unsigned(b, e) as i32 - 4);
        let lanes = lanes256(&q, |e| scale_q3k(e / 16, &b.scales), a);
        for (acc, l) in acc.iter_mut().zip(lanes) {
            *acc = d.mul_add(l as f32, *acc);
        }
    }
    hsum8(acc)
}

/// Q4_K (`vector_mins`: 4-lane minimum accumulator, as ggml's Q4_K) and Q5_K (a scalar one).
fn q4k_q5k<B>(
    w: &[B],
    a: &[ActQ8K],
    f: impl Fn(&B) -> ([i32; 256], f32, f32, [u8; 12]),
    vector_mins: bool,
) -> f32 {
    let mut acc = [0f32; 8];
    let mut accm = [0f32; 4];
    let mut summs = 0f32;
    for (b, a) in w.iter().zip(a) {
        let (q, dw, dminw, scales) = f(b);
        let d = a.d * dw;
        let dmin = -a.d * dminw;
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, &scales));
        let q8s = |j: usize| a.bsums[2 * j] + a.bsums[2 * j + 1];
        let mins = |j: usize| sm[j].1 as i32 * q8s(j);
        if vector_mins {
            for (k, accm) in accm.iter_mut().enumerate() {
                *accm = dmin.mul_add((mins(2 * k) + mins(2 * k + 1)) as f32, *accm);
            }
        } else {
            let total: i32 = (0..8).map(mins).sum();
            summs = dmin.mul_add(total as f32, summs);
        }
        let lanes = lanes256(&q, |e| sm[e / 32].0 as i32, a);
        for (acc, l) in acc.iter_mut().zip(lanes) {
            *acc = d.mul_add(l as f32, *acc);
        }
    }
    if vector_mins {
        hsum8(acc) + hsum4(accm)
    } else {
        hsum8(acc) + summs
    }
}

fn q6k(w: &[BlockQ6K], a: &[ActQ8K]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, a) in w.iter().zip(a) {
        let d = a.d * b.d.get();
        let sc = |j: usize| b.scales[j] as i32;
        let q = std::array::from_fn(|e| q6k_quant(b, e) as i32);
        let mut lanes = lanes256(&q, |e| sc(e / 16), a);
        // ggml subtracts the zero point per pair of sub-blocks, not per element's lane.
        for (k, l) in lanes.iter_mut().enumerate() {
            *l -= 32 * (a.bsums[2 * k] * sc(2 * k) + a.bsums[2 * k + 1] * sc(2 * k + 1));
        }
        for (acc, l) in acc.iter_mut().zip(lanes) {
            *acc = d.mul_add(l as f32, *acc);
        }
    }
    hsum8(acc)
}
