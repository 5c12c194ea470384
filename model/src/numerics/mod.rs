//! The float arithmetic of a block, written to give the same bits as llama.cpp's CPU backend.
//!
//! The default model amplifies float noise: summing one attention dot product in a different
//! order moves a chosen token's log-probability by up to 0.05, which is as much as llama.cpp
//! itself moves between its own attention kernels. So the parts where order and rounding matter
//! copy ggml's choices exactly: flash attention over an f16 KV cache with the query rounded to
//! f16 and the output accumulated in f16, its 4x8-lane f16 dot product, its vectorised `expf` in
//! SiLU, and f64 accumulation in RMSNorm. Each SIMD routine has a scalar twin that computes the
//! same bits, used on CPUs without SIMD and to test the others; which one runs is chosen at run
//! time with the matrix kernels' instruction set (see `kernels::cpu`).
//!
//! Transcendental functions come from the `libm` crate, not the platform's C library: glibc
//! picks different `expf`/`cosf` code on CPUs with and without FMA, and two honest peers must
//! compute the very same bits.

use half::f16;

use crate::kernels::cpu::{self, Isa};

mod exp;
mod f16_ops;

pub use exp::expf;

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
/// vectorised exp, a tail shorter than 8 uses the C library's. Rows in parallel when there are
/// many (a prompt); each row's arithmetic is the same either way.
pub fn swiglu(gate: &mut [f32], up: &[f32], width: usize) {
    par_rows(gate, up, width, |g, u| swiglu_rows(g, u, width));
}

fn swiglu_rows(gate: &mut [f32], up: &[f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    if matches!(cpu::selected(), Isa::Avx2 | Isa::Avx512) {
        // SAFETY: the selected path implies AVX2 and FMA.
        return unsafe { swiglu_fma(gate, up, width) };
    }
    swiglu_body(gate, up, width)
}

/// Runs `f` on matching row blocks of `a` (written) and `b` (read), rows of `width`, on the
/// compute threads when there are enough rows to pay for it.
pub fn par_rows(a: &mut [f32], b: &[f32], width: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
    const ROWS_PER_TASK: usize = 8;
    let rows = a.len() / width.max(1);
    if rows < 2 * ROWS_PER_TASK || crate::team::threads() == 1 {
        return f(a, b);
    }
    let chunk = width * ROWS_PER_TASK;
    crate::team::run_chunks(a, chunk, &|i, a| {
        let start = (i * chunk).min(b.len());
        f(a, &b[start..(start + a.len()).min(b.len())])
    });
}

/// [`swiglu_body`] with AVX2 and FMA: eight lanes of ggml's `expf` at a time (as its AVX2
/// build), lanes that need its slow path (`|n| > 126` or NaN) through the scalar twin, which
/// computes the same bits. Scalar, SiLU took 6% of a prompt's time against llama.cpp's 0.7%.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32], width: usize) {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let vec_end = width - width % 8;
    let one = _mm256_set1_ps(1.0);
    for (g_row, u_row) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        for i in (0..vec_end).step_by(8) {
            let x = _mm256_loadu_ps(g_row.as_ptr().add(i));
            let neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
            let r = c(0x4b40_0000);
            let z = _mm256_fmadd_ps(neg, c(0x3fb8_aa3b), r);
            let n = _mm256_sub_ps(z, r);
            let abs = _mm256_and_ps(n, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)));
            let e = if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(abs, _mm256_set1_ps(126.0)))
                == 0
            {
                let b =
                    _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), neg));
                let k = _mm256_castsi256_ps(_mm256_add_epi32(
                    _mm256_slli_epi32::<23>(_mm256_castps_si256(z)),
                    _mm256_set1_epi32(1f32.to_bits() as i32),
                ));
                let u = _mm256_mul_ps(b, b);
                let j = _mm256_fmadd_ps(
                    _mm256_fmadd_ps(
                        _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                        u,
                        _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
                    ),
                    u,
                    _mm256_mul_ps(c(0x3f7f_fff6), b),
                );
                _mm256_fmadd_ps(j, k, k)
            } else {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), neg);
                let lanes = lanes.map(expf_ggml);
                _mm256_loadu_ps(lanes.as_ptr())
            };
            let u = _mm256_loadu_ps(u_row.as_ptr().add(i));
            let out = _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), u);
            _mm256_storeu_ps(g_row.as_mut_ptr().add(i), out);
        }
        for i in vec_end..width {
            let g = g_row[i];
            g_row[i] = g / (1.0 + exp::expf(-g)) * u_row[i];
        }
    }
}

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32], width: usize) {
    let vec_end = width - width % 8;
    for (g_row, u_row) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        for (i, (g, u)) in g_row.iter_mut().zip(u_row).enumerate() {
            let e = if i < vec_end {
                expf_ggml(0.0 - *g)
            } else {
                exp::expf(-*g)
            };
            *g = *g / (1.0 + e) * u;
        }
    }
}

/// RMSNorm of every row of `x` into `out`, accumulating in f64 like ggml (rows in parallel
/// when there are many).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = weight.len();
    out.clear();
    out.resize(x.len(), 0.0);
    par_rows(out, x, dim, |out, x| {
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
            let mean = (sum / dim as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
                *o = v * scale * w;
            }
        }
    });
}

/// Scratch of one attending thread: the f16 accumulator and the row of scores.
#[derive(Default)]
pub struct AttendScratch {
    acc: Vec<f16>,
    scores: Vec<f32>,
    raised: Vec<bool>,
}

/// One query head attending over `len` cached positions, as ggml's CPU flash attention does it
/// (`flash_attn_ext_f16_one_chunk`): scores in order, a running maximum, the weighted sum of
/// values kept in f16 and divided by the softmax denominator at the end. A `softcap` other
/// than 0 maps each score `s` to `softcap * tanh(s / softcap)` first (Gemma 2).
///
/// The exponentials are computed in one vectorised pass between finding the running maxima and
/// accumulating: they depend only on the scores, so the arithmetic is unchanged.
pub fn attend(
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    softcap: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    attend_on(
        cpu::selected(),
        q,
        keys,
        values,
        scale,
        softcap,
        scratch,
        out,
    )
}

/// [`attend`] on instruction set `isa` (which must be one this CPU runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_on(
    isa: Isa,
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    softcap: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    assert!(isa.supported(), "the {isa} path on a CPU without it");
    let args = Attend {
        q,
        keys,
        values,
        scale,
        softcap,
    };
    match isa {
        // SAFETY (both): the CPU runs `isa` (asserted), which implies the entry's features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { f16_ops::attend_x86(&args, scratch, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { f16_ops::attend_x86_512(&args, scratch, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::Dotprod => unsafe { f16_ops::attend_arm(&args, scratch, out) },
        _ => attend_body::<f16_ops::Scalar>(&args, scratch, out),
    }
}

/// The inputs of one head's attention.
pub(crate) struct Attend<'a> {
    q: &'a [f16],
    keys: &'a [f16],
    values: &'a [f16],
    scale: f32,
    softcap: f32,
}

#[inline(always)]
fn attend_body<O: f16_ops::F16Ops>(a: &Attend, scratch: &mut AttendScratch, out: &mut [f32]) {
    let hd = a.q.len();
    let AttendScratch {
        acc,
        scores,
        raised,
    } = scratch;
    acc.clear();
    acc.resize(hd, f16::ZERO);
    scores.clear();
    let scale = if a.softcap != 0.0 {
        a.scale / a.softcap
    } else {
        a.scale
    };
    for k in a.keys.chunks_exact(hd) {
        // SAFETY: `attend_on` instantiates `O` only where its instructions exist.
        let mut s = unsafe { O::dot_f16(k, a.q) } * scale;
        if a.softcap != 0.0 {
            s = a.softcap * libm::tanhf(s);
        }
        scores.push(s);
    }
    // The running maximum: a score above it rescales what came before by e^(old - new),
    // any other enters with weight e^(s - max). Keep the exponent, and which case it was.
    raised.clear();
    let mut m = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        if *s > m {
            let old = m;
            m = *s;
            *s = old - m;
            raised.push(true);
        } else {
            *s -= m;
            raised.push(false);
        }
    }
    exp::expf_in_place(scores);
    let mut s_sum = 0f32;
    for ((e, up), _) in scores
        .iter()
        .zip(raised.iter())
        .zip(a.values.chunks_exact(hd))
    {
        let (ms, vs) = if *up { (*e, 1.0) } else { (1.0, *e) };
        s_sum = s_sum.mul_add(ms, vs);
    }
    // SAFETY: as above.
    unsafe { O::accumulate(acc, a.values, scores, raised) };
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
    fn every_path_attends_to_the_same_bits() {
        // Head sizes with and without a tail past the 32- and 8-wide steps; scores that raise
        // the running maximum and scores that do not.
        for hd in [8usize, 32, 64, 80, 128, 256] {
            for len in [1usize, 7, 40] {
                let q = halves(hd, 3);
                let keys = halves(hd * len, 11 + hd as u32);
                let values = halves(hd * len, 13);
                let mut want = vec![0f32; hd];
                let mut scratch = AttendScratch::default();
                attend_on(
                    Isa::Portable,
                    &q,
                    &keys,
                    &values,
                    0.07,
                    0.0,
                    &mut scratch,
                    &mut want,
                );
                for &isa in cpu::available() {
                    let mut got = vec![0f32; hd];
                    attend_on(isa, &q, &keys, &values, 0.07, 0.0, &mut scratch, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa} hd={hd} len={len}: {got:?} vs {want:?}");
                }
            }
        }
    }

    #[test]
    fn swiglu_is_the_same_with_and_without_simd() {
        // Values reaching `expf`'s slow path (|x| above 126 ln 2, about 87), NaN and
        // infinities, in rows whose width leaves a scalar tail.
        let mut gate: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.173).collect();
        gate.extend((0..300).map(|i| (i as f32 - 150.0) * 1.37));
        gate.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            -1e-40,
        ]);
        gate.resize(700, 0.5);
        let up: Vec<f32> = (0..700).map(|i| (i % 17) as f32 * 0.3 - 2.0).collect();
        let mut a = gate.clone();
        swiglu(&mut a, &up, 100);
        let mut b = gate.clone();
        swiglu_body(&mut b, &up, 100);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
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
        let mut out = vec![0f32; hd];
        attend(
            &q,
            &keys,
            &values,
            0.125,
            0.0,
            &mut AttendScratch::default(),
            &mut out,
        );
        assert_is_softmax_mean(&q, &keys, &values, 0.125, 0.0, &out);
    }

    /// `out` is the softmax-weighted mean of `values` for the (optionally soft-capped) scaled
    /// scores of `q` against `keys`, computed in f64, within f16 accumulation error.
    fn assert_is_softmax_mean(
        q: &[f16],
        keys: &[f16],
        values: &[f16],
        scale: f64,
        cap: f64,
        out: &[f32],
    ) {
        let hd = q.len();
        let scores: Vec<f64> = keys
            .chunks(hd)
            .map(|k| {
                let s = k
                    .iter()
                    .zip(q)
                    .map(|(a, b)| a.to_f64() * b.to_f64())
                    .sum::<f64>()
                    * scale;
                if cap == 0.0 {
                    s
                } else {
                    cap * (s / cap).tanh()
                }
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

    #[test]
    fn softcapped_scores_give_the_softcapped_softmax() {
        let hd = 32;
        let q = halves(hd, 5);
        let keys = halves(hd * 6, 17);
        let values = halves(hd * 6, 19);
        let mut scratch = AttendScratch::default();
        let (mut plain, mut capped) = (vec![0f32; hd], vec![0f32; hd]);
        attend(&q, &keys, &values, 0.01, 0.0, &mut scratch, &mut plain);
        attend(&q, &keys, &values, 0.01, 2.0, &mut scratch, &mut capped);
        assert_is_softmax_mean(&q, &keys, &values, 0.01f32 as f64, 2.0, &capped);
        assert_ne!(plain, capped);
    }
}
