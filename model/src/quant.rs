//! Quantized dot-product kernels: the hot loop of every matrix-vector product.
//!
//! candle-core ships only a scalar Q4_1 dot product, and the default model is Q4_1, so the
//! formats that matter most get hand-written AVX2 kernels here (chosen at compile time, like
//! candle's own). They follow ggml's arithmetic: activations are quantized to 8 bits per block
//! of 32 with an f16-rounded scale, and integer dot products are scaled per block. That keeps
//! results within float noise of llama.cpp. Other formats fall back to candle's kernels.

use half::f16;

use crate::gguf::Pod;

pub const QK: usize = 32;

/// ggml `block_q4_0`: 32 weights `d * (q - 8)`, q in 0..16, low nibbles first.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// ggml `block_q4_1`: 32 weights `d * q + m`, q in 0..16, low nibbles first.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// ggml `block_q8_0`: 32 weights `d * q`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

// SAFETY: repr(C) structs of f16 and byte arrays; every bit pattern is a valid value.
unsafe impl Pod for BlockQ4_0 {}
unsafe impl Pod for BlockQ4_1 {}
unsafe impl Pod for BlockQ8_0 {}

/// One block of activations quantized to 8 bits (ggml's `block_q8_1`, with the scales kept as
/// f32 after rounding through f16 so the values are exactly ggml's but need no conversion).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(4))]
pub struct ActQ8 {
    pub d: f32,
    /// `d * sum(qs)`, which lets offset formats (Q4_1) add their minimum in one multiply.
    pub s: f32,
    pub qs: [i8; QK],
}

/// Quantizes one row (length a multiple of 32) the way ggml's x86 `quantize_row_q8_1` does.
pub fn quantize_row(xs: &[f32], out: &mut [ActQ8]) {
    for (chunk, block) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &x) in block.qs.iter_mut().zip(chunk) {
            let v = (x * id).round_ties_even() as i32;
            *q = v as i8;
            sum += v;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 nibbles of a 4-bit block spread to 32 bytes in element order.
    #[inline(always)]
    unsafe fn unpack_nibbles(qs: &[u8; 16]) -> __m256i {
        let tmp = _mm_loadu_si128(qs.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Sum of products of unsigned bytes `u` and signed bytes `s`, as 8 i32 lanes in f32.
    #[inline(always)]
    unsafe fn dot_us(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// Sum of products of two signed byte vectors (sign moved onto `y`, as ggml does).
    #[inline(always)]
    unsafe fn dot_ss(x: __m256i, y: __m256i) -> __m256 {
        dot_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    // One accumulator, blocks in order, the minimum term fused: ggml's exact arithmetic. The
    // model is sensitive enough that a different summation order moves log-probs by 0.05.
    pub fn dot_q4_1(w: &[BlockQ4_1], a: &[ActQ8]) -> f32 {
        // SAFETY: compiled only when the target has AVX2 and FMA; loads are unaligned loads of
        // in-bounds arrays.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for (w0, a0) in w.iter().zip(a) {
                mins = w0.m.to_f32().mul_add(a0.s, mins);
                let p0 = dot_us(
                    unpack_nibbles(&w0.qs),
                    _mm256_loadu_si256(a0.qs.as_ptr().cast()),
                );
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w0.d.to_f32() * a0.d), p0, acc);
            }
            hsum(acc) + mins
        }
    }

    pub fn dot_q4_0(w: &[BlockQ4_0], a: &[ActQ8]) -> f32 {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let eight = _mm256_set1_epi8(8);
            for (w0, a0) in w.iter().zip(a) {
                let x = _mm256_sub_epi8(unpack_nibbles(&w0.qs), eight);
                let p = dot_ss(x, _mm256_loadu_si256(a0.qs.as_ptr().cast()));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w0.d.to_f32() * a0.d), p, acc);
            }
            hsum(acc)
        }
    }

    pub fn dot_q8_0(w: &[BlockQ8_0], a: &[ActQ8]) -> f32 {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for (w0, a0) in w.iter().zip(a) {
                let x0 = _mm256_loadu_si256(w0.qs.as_ptr().cast());
                let p0 = dot_ss(x0, _mm256_loadu_si256(a0.qs.as_ptr().cast()));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w0.d.to_f32() * a0.d), p0, acc);
            }
            hsum(acc)
        }
    }
}

/// Portable reference kernels: the definition the SIMD versions are tested against, and the
/// path on CPUs without AVX2.
pub mod scalar {
    use super::*;

    pub fn dot_q4_1(w: &[BlockQ4_1], a: &[ActQ8]) -> f32 {
        let (mut sum, mut mins) = (0f32, 0f32);
        for (w, a) in w.iter().zip(a) {
            let mut isum = 0i32;
            for j in 0..QK / 2 {
                isum += (w.qs[j] & 0x0F) as i32 * a.qs[j] as i32;
                isum += (w.qs[j] >> 4) as i32 * a.qs[j + QK / 2] as i32;
            }
            sum += isum as f32 * w.d.to_f32() * a.d;
            mins = w.m.to_f32().mul_add(a.s, mins);
        }
        sum + mins
    }

    pub fn dot_q4_0(w: &[BlockQ4_0], a: &[ActQ8]) -> f32 {
        let mut sum = 0f32;
        for (w, a) in w.iter().zip(a) {
            let mut isum = 0i32;
            for j in 0..QK / 2 {
                isum += ((w.qs[j] & 0x0F) as i32 - 8) * a.qs[j] as i32;
                isum += ((w.qs[j] >> 4) as i32 - 8) * a.qs[j + QK / 2] as i32;
            }
            sum += isum as f32 * w.d.to_f32() * a.d;
        }
        sum
    }

    pub fn dot_q8_0(w: &[BlockQ8_0], a: &[ActQ8]) -> f32 {
        let mut sum = 0f32;
        for (w, a) in w.iter().zip(a) {
            let isum: i32 =
                w.qs.iter()
                    .zip(&a.qs)
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
            sum += isum as f32 * w.d.to_f32() * a.d;
        }
        sum
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub use simd::{dot_q4_0, dot_q4_1, dot_q8_0};

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
pub use scalar::{dot_q4_0, dot_q4_1, dot_q8_0};

/// f32 dot product with several accumulators so the compiler can vectorise it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

pub fn dequantize_q4_1(w: &[BlockQ4_1], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..QK / 2 {
            o[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            o[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_q4_0(w: &[BlockQ4_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            o[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            o[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q8_0(w: &[BlockQ8_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in o.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_acts(rng: &mut impl Rng, n: usize) -> (Vec<f32>, Vec<ActQ8>) {
        let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        let mut q = vec![ActQ8::default(); n / QK];
        quantize_row(&xs, &mut q);
        (xs, q)
    }

    #[test]
    fn simd_kernels_match_scalar_definitions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for blocks in [1usize, 2, 3, 18, 48] {
            let (_, acts) = random_acts(&mut rng, blocks * QK);
            let q41: Vec<BlockQ4_1> = (0..blocks)
                .map(|_| BlockQ4_1 {
                    d: f16::from_f32(rng.random_range(-0.1..0.1)),
                    m: f16::from_f32(rng.random_range(-0.5..0.5)),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            let q40: Vec<BlockQ4_0> = (0..blocks)
                .map(|_| BlockQ4_0 {
                    d: f16::from_f32(rng.random_range(-0.1..0.1)),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            let q80: Vec<BlockQ8_0> = (0..blocks)
                .map(|_| BlockQ8_0 {
                    d: f16::from_f32(rng.random_range(-0.01..0.01)),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()));
            let (x, y) = (dot_q4_1(&q41, &acts), scalar::dot_q4_1(&q41, &acts));
            assert!(close(x, y), "q4_1 {x} vs {y}");
            let (x, y) = (dot_q4_0(&q40, &acts), scalar::dot_q4_0(&q40, &acts));
            assert!(close(x, y), "q4_0 {x} vs {y}");
            let (x, y) = (dot_q8_0(&q80, &acts), scalar::dot_q8_0(&q80, &acts));
            assert!(close(x, y), "q8_0 {x} vs {y}");
        }
    }

    #[test]
    fn quantized_dot_approximates_float_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (xs, acts) = random_acts(&mut rng, 64 * QK);
        let ws: Vec<f32> = (0..64 * QK).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Q8_0 weights built by hand: exact float reference is the dequantized weights.
        let mut w = Vec::new();
        for c in ws.chunks_exact(QK) {
            let amax = c.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            w.push(BlockQ8_0 {
                d: f16::from_f32(d),
                qs: std::array::from_fn(|i| (c[i] / d).round() as i8),
            });
        }
        let mut deq = vec![0f32; ws.len()];
        dequantize_q8_0(&w, &mut deq);
        let exact = dot_f32(&deq, &xs);
        let approx = dot_q8_0(&w, &acts);
        assert!(
            (exact - approx).abs() < 0.02 * exact.abs().max(1.0),
            "{exact} vs {approx}"
        );
    }

    #[test]
    fn quantize_row_handles_zero_blocks() {
        let mut q = [ActQ8::default(); 1];
        quantize_row(&[0.0; QK], &mut q);
        assert_eq!(q[0].d, 0.0);
        assert!(q[0].qs.iter().all(|&v| v == 0));
    }
}
