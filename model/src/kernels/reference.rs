//! The canonical arithmetic of every kernel, written plainly on ggml's own block layout: the
//! definition each SIMD path must reproduce bit for bit.
//!
//! Every quantized product is split into an exact part and a float part. Within a block the
//! integer products and their sums are exact (i32, no overflow for any input), so any
//! instruction set may compute them in any order. The float part is fixed: for each row, one
//! f32 accumulator per term, updated once per block, in block order, with a fused multiply-add
//! of `float(integer sum)` by `weight scale * activation scale`. Float weights are likewise one
//! accumulator per row, one fused multiply-add per element, in column order.
//!
//! Offsets are folded into the integer part with the activations' exact sums: a Q4_0 weight is
//! `q - 8` with `q` in 0..16, so the block's integer is `sum(q * a) - 8 * sum(a)`.

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
        (WeightFormat::Q4_0, ActRow::Q8(a)) => blocks32(cast::<BlockQ4_0>(bytes), a, |b, a| {
            let q = |j| nibble(&b.qs, j) as i32;
            (isum(q, a) - 8 * a.sum, b.d.get(), None)
        }),
        (WeightFormat::Q4_1, ActRow::Q8(a)) => blocks32(cast::<BlockQ4_1>(bytes), a, |b, a| {
            let q = |j| nibble(&b.qs, j) as i32;
            (isum(q, a), b.d.get(), Some(b.m.get()))
        }),
        (WeightFormat::Q5_0, ActRow::Q8(a)) => blocks32(cast::<BlockQ5_0>(bytes), a, |b, a| {
            let q = |j| (nibble(&b.qs, j) | q5_high(&b.qh, j)) as i32;
            (isum(q, a) - 16 * a.sum, b.d.get(), None)
        }),
        (WeightFormat::Q5_1, ActRow::Q8(a)) => blocks32(cast::<BlockQ5_1>(bytes), a, |b, a| {
            let q = |j| (nibble(&b.qs, j) | q5_high(&b.qh, j)) as i32;
            (isum(q, a), b.d.get(), Some(b.m.get()))
        }),
        (WeightFormat::Q8_0, ActRow::Q8(a)) => blocks32(cast::<BlockQ8_0>(bytes), a, |b, a| {
            let q = |j: usize| b.qs[j] as i32;
            (isum(q, a), b.d.get(), None)
        }),
        (WeightFormat::Q2K, ActRow::Q8K(a)) => blocks256(cast::<BlockQ2K>(bytes), a, |b, a| {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..16 {
                let dot = sub_dot(16 * j, 16, |e| q2_low(&b.qs, e) as i32, a);
                sumi += dot * (b.scales[j] & 0xF) as i32;
                summ += a.bsums[j] * (b.scales[j] >> 4) as i32;
            }
            (sumi, b.d.get(), Some((summ, b.dmin.get())))
        }),
        (WeightFormat::Q3K, ActRow::Q8K(a)) => blocks256(cast::<BlockQ3K>(bytes), a, |b, a| {
            let mut sumi = 0i32;
            for j in 0..16 {
                let dot = sub_dot(16 * j, 16, |e| q3_unsigned(b, e) as i32, a) - 4 * a.bsums[j];
                sumi += dot * scale_q3k(j, &b.scales);
            }
            (sumi, b.d.get(), None)
        }),
        (WeightFormat::Q4K, ActRow::Q8K(a)) => blocks256(cast::<BlockQ4K>(bytes), a, |b, a| {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b.scales);
                let dot = sub_dot(32 * j, 32, |e| q4k_quant(&b.qs, e) as i32, a);
                sumi += dot * sc as i32;
                summ += (a.bsums[2 * j] + a.bsums[2 * j + 1]) * m as i32;
            }
            (sumi, b.d.get(), Some((summ, b.dmin.get())))
        }),
        (WeightFormat::Q5K, ActRow::Q8K(a)) => blocks256(cast::<BlockQ5K>(bytes), a, |b, a| {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b.scales);
                let dot = sub_dot(32 * j, 32, |e| q5k_quant(b, e) as i32, a);
                sumi += dot * sc as i32;
                summ += (a.bsums[2 * j] + a.bsums[2 * j + 1]) * m as i32;
            }
            (sumi, b.d.get(), Some((summ, b.dmin.get())))
        }),
        (WeightFormat::Q6K, ActRow::Q8K(a)) => blocks256(cast::<BlockQ6K>(bytes), a, |b, a| {
            let mut sumi = 0i32;
            for j in 0..16 {
                let dot = sub_dot(16 * j, 16, |e| q6k_quant(b, e) as i32, a) - 32 * a.bsums[j];
                sumi += dot * b.scales[j] as i32;
            }
            (sumi, b.d.get(), None)
        }),
        (f, _) => panic!("activations of the wrong kind for {f:?}"),
    }
}

fn isum(q: impl Fn(usize) -> i32, a: &ActQ8) -> i32 {
    (0..32).map(|j| q(j) * a.qs[j] as i32).sum()
}

fn sub_dot(start: usize, len: usize, q: impl Fn(usize) -> i32, a: &ActQ8K) -> i32 {
    (start..start + len).map(|e| q(e) * a.qs[e] as i32).sum()
}

/// 32-blocks: `f(block, act) = (integer, weight scale, weight minimum if any)`.
fn blocks32<B>(w: &[B], a: &[ActQ8], f: impl Fn(&B, &ActQ8) -> (i32, f32, Option<f32>)) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (b, a) in w.iter().zip(a) {
        let (i, d, m) = f(b, a);
        acc = (i as f32).mul_add(d * a.d, acc);
        if let Some(m) = m {
            accm = m.mul_add(a.s, accm);
        }
    }
    acc + accm
}

/// 256-blocks: `f(block, act) = (integer, scale, (minimum integer, minimum scale) if any)`;
/// the minimum term is subtracted.
fn blocks256<B>(
    w: &[B],
    a: &[ActQ8K],
    f: impl Fn(&B, &ActQ8K) -> (i32, f32, Option<(i32, f32)>),
) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (b, a) in w.iter().zip(a) {
        let (i, d, m) = f(b, a);
        acc = (i as f32).mul_add(d * a.d, acc);
        if let Some((im, dm)) = m {
            accm = (im as f32).mul_add(dm * a.d, accm);
        }
    }
    acc - accm
}
