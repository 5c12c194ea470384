//! The float arithmetic of a block, written to give the same bits as llama.cpp's CPU backend.
//!
//! The default model amplifies float noise: summing one attention dot product in a different
//! order moves a chosen token's log-probability by up to 0.05, which is as much as llama.cpp
//! itself moves between its own attention kernels. So the parts where order and rounding matter
//! copy ggml's choices exactly: flash attention over an f16 KV cache with the query rounded to
//! f16 and the output accumulated in f16, its 4x8-lane f16 dot product, its vectorised `expf` in
//! SiLU, and f64 accumulation in RMSNorm. Each SIMD routine has a scalar twin that computes the
//! same bits, used on CPUs without AVX2 and to test the SIMD one.

use half::f16;

/// ggml's `ggml_v_expf` (Arm optimized-routines polynomial, at most 1.5 ulp from `exp`),
/// lane for lane, so SiLU matches llama.cpp to the bit.
pub fn expf_ggml(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits().wrapping_shl(23);
    let k = c(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = c(g.wrapping_add(0x7f00_0000));
    let s2 = c(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`, as ggml's `ggml_vec_swiglu_f32`: groups of 8 use the
/// vectorised exp, a tail shorter than 8 uses the C library's.
pub fn swiglu(gate: &mut [f32], up: &[f32], width: usize) {
    let vec_end = width - width % 8;
    for (g_row, u_row) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        for (i, (g, u)) in g_row.iter_mut().zip(u_row).enumerate() {
            let e = if i < vec_end {
                expf_ggml(0.0 - *g)
            } else {
                (-*g).exp()
            };
            *g = *g / (1.0 + e) * u;
        }
    }
}

/// RMSNorm of every row of `x` into `out`, accumulating in f64 like ggml.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = weight.len();
    out.clear();
    out.resize(x.len(), 0.0);
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// Portable versions, bit-identical to the AVX2 ones.
pub mod scalar {
    use super::*;

    /// ggml's `ggml_vec_dot_f16`: 4 accumulators of 8 lanes over steps of 32, reduced pairwise,
    /// the tail (length not a multiple of 32) added in f64.
    pub fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
        let n = x.len().min(y.len());
        let np = n - n % 32;
        let mut sum = [[0f32; 8]; 4];
        for i in (0..np).step_by(32) {
            for (j, acc) in sum.iter_mut().enumerate() {
                for (l, a) in acc.iter_mut().enumerate() {
                    let e = i + j * 8 + l;
                    *a = x[e].to_f32().mul_add(y[e].to_f32(), *a);
                }
            }
        }
        let mut s = [0f32; 8];
        for l in 0..8 {
            s[l] = (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]);
        }
        let t0 = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
        let mut total = ((t0[0] + t0[1]) + (t0[2] + t0[3])) as f64;
        for e in np..n {
            total += (x[e].to_f32() * y[e].to_f32()) as f64;
        }
        total as f32
    }

    /// `y = f16(y + x * v)` elementwise (ggml's `ggml_vec_mad_f16`).
    pub fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = f16::from_f32(x.to_f32().mul_add(v, y.to_f32()));
        }
    }

    /// `y = f16(y * v)` elementwise (ggml's `ggml_vec_scale_f16`).
    pub fn scale_f16(y: &mut [f16], v: f32) {
        for y in y.iter_mut() {
            *y = f16::from_f32(y.to_f32() * v);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load(p: &[f16]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().cast()))
    }

    #[inline(always)]
    unsafe fn store(p: &mut [f16], v: __m256) {
        _mm_storeu_si128(
            p.as_mut_ptr().cast(),
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
        );
    }

    pub fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
        let n = x.len().min(y.len());
        let np = n - n % 32;
        // SAFETY: the target has AVX2/FMA/F16C; every load reads 8 in-bounds halves (i+j*8+8 <= np).
        unsafe {
            let mut sum = [_mm256_setzero_ps(); 4];
            for i in (0..np).step_by(32) {
                for (j, acc) in sum.iter_mut().enumerate() {
                    let o = i + j * 8;
                    *acc = _mm256_fmadd_ps(load(&x[o..o + 8]), load(&y[o..o + 8]), *acc);
                }
            }
            let s02 = _mm256_add_ps(sum[0], sum[2]);
            let s13 = _mm256_add_ps(sum[1], sum[3]);
            let s = _mm256_add_ps(s02, s13);
            let t0 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let t1 = _mm_hadd_ps(t0, t0);
            let mut total = _mm_cvtss_f32(_mm_hadd_ps(t1, t1)) as f64;
            for e in np..n {
                total += (x[e].to_f32() * y[e].to_f32()) as f64;
            }
            total as f32
        }
    }

    pub fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
        let n = x.len().min(y.len());
        let np = n - n % 8;
        // SAFETY: as in `dot_f16`; loads and stores of 8 in-bounds halves.
        unsafe {
            let vv = _mm256_set1_ps(v);
            for o in (0..np).step_by(8) {
                let r = _mm256_fmadd_ps(load(&x[o..o + 8]), vv, load(&y[o..o + 8]));
                store(&mut y[o..o + 8], r);
            }
        }
        scalar::mad_f16(&mut y[np..n], &x[np..n], v);
    }

    pub fn scale_f16(y: &mut [f16], v: f32) {
        let n = y.len();
        let np = n - n % 8;
        // SAFETY: as in `mad_f16`.
        unsafe {
            let vv = _mm256_set1_ps(v);
            for o in (0..np).step_by(8) {
                let r = _mm256_mul_ps(load(&y[o..o + 8]), vv);
                store(&mut y[o..o + 8], r);
            }
        }
        scalar::scale_f16(&mut y[np..n], v);
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub use simd::{dot_f16, mad_f16, scale_f16};

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
pub use scalar::{dot_f16, mad_f16, scale_f16};

/// One query head attending over `len` cached positions, as ggml's CPU flash attention does it
/// (`flash_attn_ext_f16_one_chunk`): scores one at a time, a running maximum, the weighted sum of
/// values kept in f16 and divided by the softmax denominator at the end.
///
/// `acc` is caller-provided scratch of `head_dim` halves, so the hot loop never allocates.
pub fn attend(
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    acc: &mut [f16],
    out: &mut [f32],
) {
    let hd = q.len();
    acc.fill(f16::ZERO);
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    for (k, v) in keys.chunks_exact(hd).zip(values.chunks_exact(hd)) {
        let s = dot_f16(k, q) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            scale_f16(acc, ms);
        } else {
            vs = (s - m).exp();
        }
        mad_f16(acc, v, vs);
        s_sum = s_sum.mul_add(ms, vs);
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halves(n: usize, seed: u32) -> Vec<f16> {
        (0..n)
            .map(|i| {
                f16::from_f32(
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 100.0 - 10.0,
                )
            })
            .collect()
    }

    #[test]
    fn simd_and_scalar_f16_routines_agree_to_the_bit() {
        for n in [8usize, 32, 64, 80, 128] {
            let (x, y) = (halves(n, 1), halves(n, 7));
            assert_eq!(
                dot_f16(&x, &y).to_bits(),
                scalar::dot_f16(&x, &y).to_bits(),
                "dot n={n}"
            );
            let (mut a, mut b) = (y.clone(), y.clone());
            mad_f16(&mut a, &x, 0.37);
            scalar::mad_f16(&mut b, &x, 0.37);
            assert_eq!(a, b, "mad n={n}");
            scale_f16(&mut a, 0.61);
            scalar::scale_f16(&mut b, 0.61);
            assert_eq!(a, b, "scale n={n}");
        }
    }

    #[test]
    fn ggml_exp_is_within_two_ulp_of_exp() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let (a, b) = (expf_ggml(x), x.exp());
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 2, "x={x}: {a} vs {b}");
        }
        assert_eq!(expf_ggml(-200.0), 0.0);
        assert!(expf_ggml(200.0).is_infinite());
    }

    #[test]
    fn attention_is_a_softmax_weighted_mean() {
        let hd = 64;
        let q = halves(hd, 3);
        let keys = halves(hd * 5, 11);
        let values = halves(hd * 5, 13);
        let mut acc = vec![f16::ZERO; hd];
        let mut out = vec![0f32; hd];
        attend(&q, &keys, &values, 0.125, &mut acc, &mut out);
        let scores: Vec<f64> = keys
            .chunks(hd)
            .map(|k| {
                k.iter()
                    .zip(&q)
                    .map(|(a, b)| a.to_f64() * b.to_f64())
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let z: f64 = w.iter().sum();
        for d in 0..hd {
            let exact: f64 = w
                .iter()
                .zip(values.chunks(hd))
                .map(|(w, v)| w * v[d].to_f64())
                .sum::<f64>()
                / z;
            assert!(
                (exact - out[d] as f64).abs() < 0.02 * (1.0 + exact.abs()),
                "dim {d}: {exact} vs {}",
                out[d]
            );
        }
    }
}
