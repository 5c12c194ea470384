//! The K-quants (256-element super-blocks with integer sub-block scales): Q2_K, Q3_K, Q4_K,
//! Q5_K, Q6_K. Lane `l` of a super-block takes the elements `e` with `(e % 32) / 4 == l`: one
//! 4-byte chunk of every 32 quants. Its integer is the sum over those chunks of
//! `scale(sub-block) * dot(chunk, activations)`, with each format's zero point or minimum
//! handled where ggml handles it.

use super::{at, mv, sized, Quant};
use crate::kernels::act::{ActQ8K, Activations};
use crate::kernels::simd::Simd;

#[inline(always)]
fn q8k<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
    &a.q8k()[t * nb..(t + 1) * nb]
}

/// Eight unpacked quant vectors of a lane and the scale each is multiplied by (in
/// [`Simd::scale16`] form).
#[derive(Clone, Copy)]
pub(crate) struct Parts<S: Simd> {
    q: [S::U8; 8],
    sc: [S::I32; 8],
}

/// `sum_k sc[k] * dot(q[k], a.word(word(k)))`, the integer of most K-quant lanes.
#[inline(always)]
unsafe fn scaled_dots<S: Simd>(p: &Parts<S>, a: &ActQ8K, word: [usize; 8]) -> S::I32 {
    // Two chains: one chain of eight dependent multiply-adds (5 cycles each) was what a decode
    // step waited on. Integers, so the split changes no bit.
    let mut sum = [S::zero_i32(); 2];
    for k in 0..8 {
        sum[k % 2] = S::dot_u_scaled(sum[k % 2], p.q[k], a.word(word[k]), p.sc[k]);
    }
    S::add_i32(sum[0], sum[1])
}

/// Q2_K: 2-bit quants, 16 sub-blocks with 4-bit scales and minimums.
pub(crate) struct Q2K;

impl Quant for Q2K {
    type Act = ActQ8K;
    const BLOCK: usize = 1344;
    const D: usize = 1280;
    type W<S: Simd> = Parts<S>;
    const WEIGHT_VECTORS: usize = 16;

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
        q8k(a, t, nb)
    }

    /// Scales at `b * 32 + j`, minimums at `b * 32 + 16 + j` (both in [`Simd::scale16`] form).
    #[inline(always)]
    unsafe fn prepare<S: Simd>(tile: *const u8, nb: usize, scratch: &mut Vec<S::I32>) {
        let out = sized::<S>(scratch, nb * 32);
        for b in 0..nb {
            for j in 0..16 {
                let raw = S::widen_u8(tile.add(b * Self::BLOCK + 16 * j));
                out[b * 32 + j] = S::scale16(S::and_i32(raw, 0xF));
                out[b * 32 + 16 + j] = S::scale16(S::shr_i32(raw, 4));
            }
        }
    }

    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, b: usize, l: usize, sc: &[S::I32]) -> Parts<S> {
        let (half, cc) = (l / 4, l % 4);
        let mut p = Parts {
            q: [S::load_u8(blk); 8],
            sc: [S::zero_i32(); 8],
        };
        for n in 0..2 {
            let w = S::load_u8(blk.add(256 + 64 * (8 * n + 4 * half + cc)));
            for jj in 0..4 {
                p.q[4 * n + jj] = S::shr_u8(w, 2 * jj as u32, 3);
                p.sc[4 * n + jj] = *sc.get_unchecked(b * 32 + 8 * n + 2 * jj + half);
            }
        }
        p
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(p: &Parts<S>, l: usize, a: &ActQ8K) -> S::I32 {
        let (half, cc) = (l / 4, l % 4);
        let word = |k: usize| 32 * (k / 4) + 8 * (k % 4) + 4 * half + cc;
        scaled_dots::<S>(
            p,
            a,
            [
                word(0),
                word(1),
                word(2),
                word(3),
                word(4),
                word(5),
                word(6),
                word(7),
            ],
        )
    }

    /// ggml adds `dmin` times the lane's minimum terms (sub-blocks `2l`, `2l + 1`) before the
    /// scale step of each block.
    #[inline(always)]
    unsafe fn before<S: Simd>(
        blk: *const u8,
        b: usize,
        l: usize,
        a: &ActQ8K,
        sc: &[S::I32],
        acc: S::F32,
    ) -> S::F32 {
        let m0 = *sc.get_unchecked(b * 32 + 16 + 2 * l);
        let m1 = *sc.get_unchecked(b * 32 + 17 + 2 * l);
        // Activation sums of 16: below 2^15 in magnitude.
        let mins = S::madd16(
            S::madd16(S::zero_i32(), S::splat_i32(a.bsums[2 * l]), m0),
            S::splat_i32(a.bsums[2 * l + 1]),
            m1,
        );
        let dmin = S::mul_f32(S::splat_f32(-a.d), S::load_f16(blk.add(1312)));
        S::fma_f32(dmin, S::to_f32(mins), acc)
    }
}

/// Sub-block `j` (0..16) scale of a Q3_K tile block, minus 32 (see `formats::scale_q3k`).
#[inline(always)]
unsafe fn q3k_scale<S: Simd>(sc: *const u8, j: usize) -> S::I32 {
    let (k, g) = (j % 4, j / 4);
    let lowsrc = S::widen_u8(sc.add(16 * if g % 2 == 0 { k } else { 4 + k }));
    let low = if g < 2 {
        S::and_i32(lowsrc, 0xF)
    } else {
        S::shr_i32(lowsrc, 4)
    };
    let hs = S::widen_u8(sc.add(16 * (8 + k)));
    let high = S::shl_i32(S::and_i32(S::shr_i32(hs, 2 * g as u32), 3), 4);
    S::sub_i32(S::or_i32(low, high), S::splat_i32(32))
}

/// Q3_K: 3-bit quants (2 low bits and a high-bit mask), 16 sub-blocks with 6-bit scales; each
/// quant is `u - 4` with `u` in 0..8, so a lane subtracts 4 times its activations' sums.
pub(crate) struct Q3K;

impl Quant for Q3K {
    type Act = ActQ8K;
    const BLOCK: usize = 1760;
    const D: usize = 1728;
    type W<S: Simd> = Parts<S>;
    const WEIGHT_VECTORS: usize = 16;

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
        q8k(a, t, nb)
    }

    #[inline(always)]
    unsafe fn prepare<S: Simd>(tile: *const u8, nb: usize, scratch: &mut Vec<S::I32>) {
        let out = sized::<S>(scratch, nb * 16);
        for b in 0..nb {
            for j in 0..16 {
                out[b * 16 + j] = S::scale16(q3k_scale::<S>(tile.add(b * Self::BLOCK + 1536), j));
            }
        }
    }

    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, b: usize, l: usize, sc: &[S::I32]) -> Parts<S> {
        let (half, cc) = (l / 4, l % 4);
        let h = S::load_u8(blk.add(64 * (4 * half + cc)));
        let mut p = Parts {
            q: [h; 8],
            sc: [S::zero_i32(); 8],
        };
        for n in 0..2 {
            let q = S::load_u8(blk.add(512 + 64 * (8 * n + 4 * half + cc)));
            for jj in 0..4 {
                p.q[4 * n + jj] = S::or_u8(
                    S::shr_u8(q, 2 * jj as u32, 3),
                    mv::<S>(h, (4 * n + jj) as u32, 2, 4),
                );
                p.sc[4 * n + jj] = *sc.get_unchecked(b * 16 + 8 * n + 2 * jj + half);
            }
        }
        p
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(p: &Parts<S>, l: usize, a: &ActQ8K) -> S::I32 {
        let (half, cc) = (l / 4, l % 4);
        let mut sum = S::zero_i32();
        for k in 0..8 {
            let word = 32 * (k / 4) + 8 * (k % 4) + 4 * half + cc;
            // Below 2^15 in magnitude: 4 * 7 * 127 plus 4 * 4 * 127.
            let d = S::dot_u(S::splat_i32(-4 * a.g4[word]), p.q[k], a.word(word));
            sum = S::madd16(sum, d, p.sc[k]);
        }
        sum
    }
}

/// Sub-block `j` (0..8) scale and minimum of a Q4_K/Q5_K tile block (`formats::scale_min_k4`).
#[inline(always)]
unsafe fn k4_scale_min<S: Simd>(sc: *const u8, j: usize) -> (S::I32, S::I32) {
    let byte = sc.add(16 * j);
    if j < 4 {
        (
            S::and_i32(S::widen_u8(byte), 63),
            S::and_i32(S::widen_u8(byte.add(64)), 63),
        )
    } else {
        let hi = S::widen_u8(byte.add(64));
        let s = S::or_i32(
            S::and_i32(hi, 0xF),
            S::shl_i32(S::shr_i32(S::widen_u8(byte.sub(64)), 6), 4),
        );
        let m = S::or_i32(
            S::shr_i32(hi, 4),
            S::shl_i32(S::shr_i32(S::widen_u8(byte), 6), 4),
        );
        (s, m)
    }
}

/// Q4_K (`QH` = 0) and Q5_K (`QH` = offset of the fifth bits): 8 sub-blocks of 32 with 6-bit
/// scales and minimums. Their minimum terms are summed differently by ggml (see `tail`).
pub(crate) struct K4<const BLOCK: usize, const QH: usize, const QS: usize>;

pub(crate) type Q4K = K4<2304, 0, 256>;
pub(crate) type Q5K = K4<2816, 256, 768>;

impl<const BLOCK: usize, const QH: usize, const QS: usize> Quant for K4<BLOCK, QH, QS> {
    type Act = ActQ8K;
    const BLOCK: usize = BLOCK;
    const D: usize = 0;
    type W<S: Simd> = Parts<S>;
    const WEIGHT_VECTORS: usize = 16;

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
        q8k(a, t, nb)
    }

    /// Scales at `b * 16 + j`, minimums at `b * 16 + 8 + j` (both in [`Simd::scale16`] form).
    #[inline(always)]
    unsafe fn prepare<S: Simd>(tile: *const u8, nb: usize, scratch: &mut Vec<S::I32>) {
        let out = sized::<S>(scratch, nb * 16);
        for b in 0..nb {
            for j in 0..8 {
                let (s, m) = k4_scale_min::<S>(tile.add(b * BLOCK + 64), j);
                out[b * 16 + j] = S::scale16(s);
                out[b * 16 + 8 + j] = S::scale16(m);
            }
        }
    }

    /// `q[2g]` the low nibbles (sub-block `2g`), `q[2g + 1]` the high ones (`2g + 1`).
    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, b: usize, l: usize, sc: &[S::I32]) -> Parts<S> {
        let h = S::load_u8(blk.add(if QH != 0 { QH + 64 * l } else { QS }));
        let mut p = Parts {
            q: [h; 8],
            sc: [S::zero_i32(); 8],
        };
        for g in 0..4 {
            let w = S::load_u8(blk.add(QS + 64 * (8 * g + l)));
            let mut lo = S::and_u8(w, 0x0F);
            let mut hi = S::shr_u8(w, 4, 0x0F);
            if QH != 0 {
                lo = S::or_u8(lo, mv::<S>(h, 2 * g as u32, 4, 0x10));
                hi = S::or_u8(hi, mv::<S>(h, 2 * g as u32 + 1, 4, 0x10));
            }
            p.q[2 * g] = lo;
            p.q[2 * g + 1] = hi;
            p.sc[2 * g] = *sc.get_unchecked(b * 16 + 2 * g);
            p.sc[2 * g + 1] = *sc.get_unchecked(b * 16 + 2 * g + 1);
        }
        p
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(p: &Parts<S>, l: usize, a: &ActQ8K) -> S::I32 {
        scaled_dots::<S>(
            p,
            a,
            [l, 8 + l, 16 + l, 24 + l, 32 + l, 40 + l, 48 + l, 56 + l],
        )
    }

    /// The minimum terms, `dmin * sum_j m_j * (activation sum over sub-block j)`: Q4_K keeps
    /// them in 4 lanes (sub-blocks `2k`, `2k + 1`) reduced as `(m0 + m2) + (m1 + m3)`; Q5_K in
    /// one scalar.
    #[inline(always)]
    unsafe fn tail<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: &[&[ActQ8K]; TT],
        sc: &[S::I32],
        out: &mut [S::F32; TT],
    ) {
        /// `acc + m_j * (activation sum over sub-block j)`; the sums of 32 stay below 2^15.
        #[inline(always)]
        unsafe fn mins<S: Simd>(
            acc: S::I32,
            sc: &[S::I32],
            b: usize,
            a: &ActQ8K,
            j: usize,
        ) -> S::I32 {
            S::madd16(
                acc,
                S::splat_i32(a.bsums[2 * j] + a.bsums[2 * j + 1]),
                *sc.get_unchecked(b * 16 + 8 + j),
            )
        }
        if QH == 0 {
            // Each of the 4 accumulators still takes its blocks in order; visiting them per
            // block shares `dd` and the activation loads.
            let mut accm = [[S::zero_f32(); TT]; 4];
            for b in 0..nb {
                let dmin = S::load_f16(tile.add(b * BLOCK + 32));
                for t in 0..TT {
                    let a = at(acts, t, b);
                    let dd = S::mul_f32(S::splat_f32(-a.d), dmin);
                    for (k, accm) in accm.iter_mut().enumerate() {
                        let m = mins::<S>(S::zero_i32(), sc, b, a, 2 * k);
                        let m = mins::<S>(m, sc, b, a, 2 * k + 1);
                        accm[t] = S::fma_f32(dd, S::to_f32(m), accm[t]);
                    }
                }
            }
            for t in 0..TT {
                let m = S::add_f32(
                    S::add_f32(accm[0][t], accm[2][t]),
                    S::add_f32(accm[1][t], accm[3][t]),
                );
                out[t] = S::add_f32(out[t], m);
            }
        } else {
            let mut summs = [S::zero_f32(); TT];
            for b in 0..nb {
                let dmin = S::load_f16(tile.add(b * BLOCK + 32));
                for t in 0..TT {
                    let a = at(acts, t, b);
                    let mut m = S::zero_i32();
                    for j in 0..8 {
                        m = mins::<S>(m, sc, b, a, j);
                    }
                    let dd = S::mul_f32(S::splat_f32(-a.d), dmin);
                    summs[t] = S::fma_f32(dd, S::to_f32(m), summs[t]);
                }
            }
            for t in 0..TT {
                out[t] = S::add_f32(out[t], summs[t]);
            }
        }
    }
}

/// Q6_K: 6-bit quants (low nibbles in `ql`, 2 high bits in `qh`), 16 sub-blocks with signed
/// 8-bit scales; quants are stored `+ 32`, subtracted per pair of sub-blocks as ggml does.
pub(crate) struct Q6K;

/// The four quant vectors of lane `l` in half `n` of a Q6_K tile block: low nibbles and their
/// two high bits joined.
#[inline(always)]
unsafe fn q6_parts<S: Simd>(blk: *const u8, n: usize, l: usize) -> [S::U8; 4] {
    let wa = S::load_u8(blk.add(64 * (16 * n + l)));
    let wb = S::load_u8(blk.add(64 * (16 * n + 8 + l)));
    let h = S::load_u8(blk.add(2048 + 64 * (8 * n + l)));
    [
        S::or_u8(S::and_u8(wa, 0x0F), S::shl_u8(h, 4, 0x30)),
        S::or_u8(S::and_u8(wb, 0x0F), S::shl_u8(h, 2, 0x30)),
        S::or_u8(S::shr_u8(wa, 4, 0x0F), S::and_u8(h, 0x30)),
        S::or_u8(S::shr_u8(wb, 4, 0x0F), S::shr_u8(h, 2, 0x30)),
    ]
}

/// A Q6_K lane: its eight quant vectors and scales, plus the two scales of the zero-point term.
#[derive(Clone, Copy)]
pub(crate) struct Q6Parts<S: Simd> {
    parts: Parts<S>,
    zero: [S::I32; 2],
}

impl Quant for Q6K {
    type Act = ActQ8K;
    const BLOCK: usize = 3360;
    const D: usize = 3328;
    type W<S: Simd> = Q6Parts<S>;
    const WEIGHT_VECTORS: usize = 18;

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
        q8k(a, t, nb)
    }

    #[inline(always)]
    unsafe fn prepare<S: Simd>(tile: *const u8, nb: usize, scratch: &mut Vec<S::I32>) {
        let out = sized::<S>(scratch, nb * 16);
        for b in 0..nb {
            for j in 0..16 {
                out[b * 16 + j] =
                    S::scale16(S::widen_i8(tile.add(b * Self::BLOCK + 3072 + 16 * j)));
            }
        }
    }

    /// `q[4n + p]`: part `p` (0..4) of half `n` of the super-block, sub-block `8n + 2p + l / 4`.
    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, b: usize, l: usize, sc: &[S::I32]) -> Q6Parts<S> {
        let half = l / 4;
        let mut p = Parts {
            q: [S::load_u8(blk); 8],
            sc: [S::zero_i32(); 8],
        };
        for n in 0..2 {
            p.q[4 * n..4 * n + 4].copy_from_slice(&q6_parts::<S>(blk, n, l));
            for part in 0..4 {
                p.sc[4 * n + part] = *sc.get_unchecked(b * 16 + 8 * n + 2 * part + half);
            }
        }
        let zero = [
            *sc.get_unchecked(b * 16 + 2 * l),
            *sc.get_unchecked(b * 16 + 2 * l + 1),
        ];
        Q6Parts { parts: p, zero }
    }

    /// [`Quant::weights`] and [`Quant::int`] in one pass, each quant vector multiplied as soon
    /// as it is made: eight vectors and their scales held at once spilled in decode.
    #[inline(always)]
    unsafe fn lane_int<S: Simd>(
        blk: *const u8,
        b: usize,
        l: usize,
        sc: &[S::I32],
        a: &ActQ8K,
    ) -> S::I32 {
        let half = l / 4;
        let mut sum = [S::zero_i32(); 2];
        for n in 0..2 {
            let q = q6_parts::<S>(blk, n, l);
            for part in 0..4 {
                let s = *sc.get_unchecked(b * 16 + 8 * n + 2 * part + half);
                let word = 32 * n + 8 * part + l;
                sum[part % 2] = S::dot_u_scaled(sum[part % 2], q[part], a.word(word), s);
            }
        }
        let sum = S::add_i32(sum[0], sum[1]);
        let z = S::madd16(
            S::madd16(
                S::zero_i32(),
                S::splat_i32(a.bsums[2 * l]),
                *sc.get_unchecked(b * 16 + 2 * l),
            ),
            S::splat_i32(a.bsums[2 * l + 1]),
            *sc.get_unchecked(b * 16 + 2 * l + 1),
        );
        S::sub_i32(sum, S::shl_i32(z, 5))
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(w: &Q6Parts<S>, l: usize, a: &ActQ8K) -> S::I32 {
        let word = |k: usize| 32 * (k / 4) + 8 * (k % 4) + l;
        let sum = scaled_dots::<S>(
            &w.parts,
            a,
            [
                word(0),
                word(1),
                word(2),
                word(3),
                word(4),
                word(5),
                word(6),
                word(7),
            ],
        );
        // Sums of 16 activations: below 2^15 in magnitude.
        let z = S::madd16(
            S::madd16(S::zero_i32(), S::splat_i32(a.bsums[2 * l]), w.zero[0]),
            S::splat_i32(a.bsums[2 * l + 1]),
            w.zero[1],
        );
        S::sub_i32(sum, S::shl_i32(z, 5))
    }
}
