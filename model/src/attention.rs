//! Attention with soft-capped scores (Gemma 2): `softcap * tanh(score / softcap)` before the
//! softmax, as ggml's CPU flash attention (`flash_attn_ext_f16_one_chunk`) computes it.
//!
//! Everything else is [`crate::numerics::attend`]'s arithmetic (f16 dot products with 4x8
//! lanes, a running maximum, values accumulated in f16), written here in plain Rust: the
//! dispatched routines of `numerics` are private to it, and only one family needs the cap.
//! With a cap of zero it gives `attend`'s bits exactly (tested), so the two cannot drift apart
//! unnoticed.

use half::f16;

/// ggml's `ggml_vec_dot_f16` (4 accumulators of 8 lanes, its reduction order, the tail in f64).
fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
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
    let s: [f32; 8] = std::array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let t0 = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
    let mut total = ((t0[0] + t0[1]) + (t0[2] + t0[3])) as f64;
    for e in np..n {
        total += (x[e].to_f32() * y[e].to_f32()) as f64;
    }
    total as f32
}

/// One query head over `keys`/`values` (`[n, head_dim]` each, oldest first). A `softcap` of 0
/// means none.
pub fn attend_softcapped(
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    softcap: f32,
    acc: &mut [f16],
    out: &mut [f32],
) {
    let hd = q.len();
    acc.fill(f16::ZERO);
    let scale = if softcap != 0.0 {
        scale / softcap
    } else {
        scale
    };
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    for (k, v) in keys.chunks_exact(hd).zip(values.chunks_exact(hd)) {
        let mut s = dot_f16(k, q) * scale;
        if softcap != 0.0 {
            s = softcap * libm::tanhf(s);
        }
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = libm::expf(old - m);
            for a in acc.iter_mut() {
                *a = f16::from_f32(a.to_f32() * ms);
            }
        } else {
            vs = libm::expf(s - m);
        }
        for (a, x) in acc.iter_mut().zip(v) {
            *a = f16::from_f32(x.to_f32().mul_add(vs, a.to_f32()));
        }
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
    use crate::numerics::attend;

    fn halves(n: usize, seed: u32) -> Vec<f16> {
        (0..n)
            .map(|i| {
                f16::from_f32(
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 300.0 - 3.0,
                )
            })
            .collect()
    }

    #[test]
    fn without_a_cap_it_is_attend_to_the_bit() {
        for hd in [32, 64, 80, 256] {
            let q = halves(hd, 3);
            let keys = halves(hd * 9, 11);
            let values = halves(hd * 9, 13);
            let (mut acc, mut a, mut b) = (vec![f16::ZERO; hd], vec![0f32; hd], vec![0f32; hd]);
            attend(&q, &keys, &values, 0.125, &mut acc, &mut a);
            attend_softcapped(&q, &keys, &values, 0.125, 0.0, &mut acc, &mut b);
            assert_eq!(a, b, "head dim {hd}");
        }
    }

    #[test]
    fn softcapped_scores_give_the_softcapped_softmax() {
        let hd = 32;
        let q = halves(hd, 5);
        let keys = halves(hd * 6, 17);
        let values = halves(hd * 6, 19);
        let mut acc = vec![f16::ZERO; hd];
        let (mut plain, mut capped) = (vec![0f32; hd], vec![0f32; hd]);
        let (scale, cap) = (0.25f64, 2.0f64);
        attend_softcapped(&q, &keys, &values, 0.25, 0.0, &mut acc, &mut plain);
        attend_softcapped(&q, &keys, &values, 0.25, 2.0, &mut acc, &mut capped);
        let scores: Vec<f64> = keys
            .chunks(hd)
            .map(|k| {
                let dot: f64 = k.iter().zip(&q).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                cap * (dot * scale / cap).tanh()
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
            let got = capped[d] as f64;
            assert!(
                (exact - got).abs() < 0.02 * (1.0 + exact.abs()),
                "dim {d}: {exact} vs {got}"
            );
        }
        assert_ne!(plain, capped);
    }
}
