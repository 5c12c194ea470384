//! The tile kernels, written once over [`Simd`] and instantiated per instruction set.
//!
//! Each kernel computes one tile (16 rows) against `TT` tokens and returns one f32 vector per
//! token. The arithmetic per row is exactly [`super::reference`]'s: exact integer sums per block
//! (any order), then per block, in block order, `acc = fma(float(sum), w_scale * a_scale, acc)`.
//! Byte offsets follow the tile layout in [`super::pack`] (16 times each ggml field's length).

use std::ops::Range;

use super::act::{ActQ8, ActQ8K, Activations};
use super::pack::{Packed, TILE};
use super::simd::Simd;

/// A format's tile kernel.
pub(crate) trait TileKernel {
    type Act: 'static;
    /// # Safety
    /// `tile` points at `nb` tile blocks of this format; each activation slice holds `nb`
    /// blocks; the CPU runs `S`.
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[Self::Act]; TT],
    ) -> [S::F32; TT];
    /// The activations of token `t`.
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [Self::Act];
}

/// Moves bit `from` of each byte to bit `to`, keeping only `mask` (bits at `to`).
#[inline(always)]
unsafe fn mv<S: Simd>(x: S::U8, from: u32, to: u32, mask: u8) -> S::U8 {
    if from > to {
        S::shr_u8(x, from - to, mask)
    } else if from < to {
        S::shl_u8(x, to - from, mask)
    } else {
        S::and_u8(x, mask)
    }
}

#[inline(always)]
unsafe fn scale<S: Simd>(blk: *const u8, d_at: usize, ad: f32) -> S::F32 {
    S::mul_f32(S::load_f16(blk.add(d_at)), S::splat_f32(ad))
}

macro_rules! q8_acts {
    () => {
        type Act = ActQ8;
        #[inline(always)]
        fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8] {
            &a.q8()[t * nb..(t + 1) * nb]
        }
    };
}

macro_rules! q8k_acts {
    () => {
        type Act = ActQ8K;
        #[inline(always)]
        fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8K] {
            &a.q8k()[t * nb..(t + 1) * nb]
        }
    };
}

/// Q4_0, Q4_1, Q5_0, Q5_1: the 32-blocks with nibbles (and fifth bits), one loop for all four.
///
/// `MIN` is the offset of the minimum field (0 = none), `QH` that of the regrouped fifth bits
/// (0 = none), `QS` that of the quants, `OFFSET` the zero point subtracted from each quant.
#[inline(always)]
unsafe fn nibbles<
    S: Simd,
    const TT: usize,
    const BLOCK: usize,
    const MIN: usize,
    const QH: usize,
    const QS: usize,
    const OFFSET: i32,
>(
    tile: *const u8,
    nb: usize,
    acts: [&[ActQ8]; TT],
) -> [S::F32; TT] {
    let mut acc = [S::zero_f32(); TT];
    let mut accm = [S::zero_f32(); TT];
    for b in 0..nb {
        let blk = tile.add(b * BLOCK);
        let mut isum = [S::zero_i32(); TT];
        let qh = if QH != 0 {
            S::load_u8(blk.add(QH))
        } else {
            S::load_u8(blk.add(QS))
        };
        for c in 0..4u32 {
            let w = S::load_u8(blk.add(QS + 64 * c as usize));
            let mut lo = S::and_u8(w, 0x0F);
            let mut hi = S::shr_u8(w, 4, 0x0F);
            if QH != 0 {
                lo = S::or_u8(lo, mv::<S>(qh, c, 4, 0x10));
                hi = S::or_u8(hi, mv::<S>(qh, 4 + c, 4, 0x10));
            }
            for t in 0..TT {
                let a = acts[t].get_unchecked(b);
                isum[t] = S::dot_u(isum[t], lo, a.word(c as usize));
                isum[t] = S::dot_u(isum[t], hi, a.word(4 + c as usize));
            }
        }
        for t in 0..TT {
            let a = acts[t].get_unchecked(b);
            let i = if OFFSET != 0 {
                S::sub_i32(isum[t], S::splat_i32(OFFSET * a.sum))
            } else {
                isum[t]
            };
            acc[t] = S::fma_f32(S::to_f32(i), scale::<S>(blk, 0, a.d), acc[t]);
            if MIN != 0 {
                let m = S::load_f16(blk.add(MIN));
                accm[t] = S::fma_f32(m, S::splat_f32(a.s), accm[t]);
            }
        }
    }
    if MIN != 0 {
        for t in 0..TT {
            acc[t] = S::add_f32(acc[t], accm[t]);
        }
    }
    acc
}

pub(crate) struct Q4_0;
impl TileKernel for Q4_0 {
    q8_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8]; TT],
    ) -> [S::F32; TT] {
        nibbles::<S, TT, 288, 0, 0, 32, 8>(tile, nb, acts)
    }
}

pub(crate) struct Q4_1;
impl TileKernel for Q4_1 {
    q8_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8]; TT],
    ) -> [S::F32; TT] {
        nibbles::<S, TT, 320, 32, 0, 64, 0>(tile, nb, acts)
    }
}

pub(crate) struct Q5_0;
impl TileKernel for Q5_0 {
    q8_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8]; TT],
    ) -> [S::F32; TT] {
        nibbles::<S, TT, 352, 0, 32, 96, 16>(tile, nb, acts)
    }
}

pub(crate) struct Q5_1;
impl TileKernel for Q5_1 {
    q8_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8]; TT],
    ) -> [S::F32; TT] {
        nibbles::<S, TT, 384, 32, 64, 128, 0>(tile, nb, acts)
    }
}

pub(crate) struct Q8_0;
impl TileKernel for Q8_0 {
    q8_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8]; TT],
    ) -> [S::F32; TT] {
        let mut acc = [S::zero_f32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * 544);
            let mut isum = [S::zero_i32(); TT];
            for c in 0..8 {
                let w = S::load_u8(blk.add(32 + 64 * c));
                for t in 0..TT {
                    isum[t] = S::dot_s8(isum[t], w, acts[t].get_unchecked(b).word(c));
                }
            }
            for t in 0..TT {
                let a = acts[t].get_unchecked(b);
                let i = if S::S8_BIAS != 0 {
                    S::sub_i32(isum[t], S::splat_i32(S::S8_BIAS * a.sum))
                } else {
                    isum[t]
                };
                acc[t] = S::fma_f32(S::to_f32(i), scale::<S>(blk, 0, a.d), acc[t]);
            }
        }
        acc
    }
}

/// The float tail shared by the K-quants: `acc = fma(sumi, d * ad, acc)` and, for formats with
/// minimums, `accm = fma(summ, dmin * ad, accm)`, subtracted at the end.
#[inline(always)]
unsafe fn k_floats<S: Simd, const TT: usize>(
    blk: *const u8,
    d_at: usize,
    dmin_at: Option<usize>,
    acts: &[&ActQ8K; TT],
    sumi: &[S::I32; TT],
    summ: &[S::I32; TT],
    acc: &mut [S::F32; TT],
    accm: &mut [S::F32; TT],
) {
    for t in 0..TT {
        let ad = acts[t].d;
        acc[t] = S::fma_f32(S::to_f32(sumi[t]), scale::<S>(blk, d_at, ad), acc[t]);
        if let Some(m) = dmin_at {
            accm[t] = S::fma_f32(S::to_f32(summ[t]), scale::<S>(blk, m, ad), accm[t]);
        }
    }
}

pub(crate) struct Q2K;
impl TileKernel for Q2K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
    ) -> [S::F32; TT] {
        let mut acc = [S::zero_f32(); TT];
        let mut accm = [S::zero_f32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * 1344);
            let a: [&ActQ8K; TT] = std::array::from_fn(|t| acts[t].get_unchecked(b));
            let mut sumi = [S::zero_i32(); TT];
            let mut summ = [S::zero_i32(); TT];
            for j in 0..16usize {
                let (n, jj, half) = (j / 8, (j % 8) / 2, j % 2);
                let mut dot = [S::zero_i32(); TT];
                for cc in 0..4 {
                    let w = S::load_u8(blk.add(256 + 64 * (8 * n + 4 * half + cc)));
                    let q = S::shr_u8(w, 2 * jj as u32, 3);
                    for t in 0..TT {
                        dot[t] = S::dot_u(dot[t], q, a[t].word(4 * j + cc));
                    }
                }
                let raw = S::widen_u8(blk.add(16 * j));
                let sc = S::and_i32(raw, 0xF);
                let m = S::shr_i32(raw, 4);
                for t in 0..TT {
                    sumi[t] = S::add_i32(sumi[t], S::mul_i32(dot[t], sc));
                    summ[t] = S::add_i32(summ[t], S::mul_i32(m, S::splat_i32(a[t].bsums[j])));
                }
            }
            k_floats::<S, TT>(blk, 1280, Some(1312), &a, &sumi, &summ, &mut acc, &mut accm);
        }
        for t in 0..TT {
            acc[t] = S::sub_f32(acc[t], accm[t]);
        }
        acc
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

pub(crate) struct Q3K;
impl TileKernel for Q3K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
    ) -> [S::F32; TT] {
        let mut acc = [S::zero_f32(); TT];
        let mut none = [S::zero_f32(); TT];
        let zero = [S::zero_i32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * 1760);
            let a: [&ActQ8K; TT] = std::array::from_fn(|t| acts[t].get_unchecked(b));
            let mut sumi = [S::zero_i32(); TT];
            for j in 0..16usize {
                let (n, jj, half) = (j / 8, (j % 8) / 2, j % 2);
                let mut dot = [S::zero_i32(); TT];
                for cc in 0..4 {
                    let q = S::load_u8(blk.add(512 + 64 * (8 * n + 4 * half + cc)));
                    let h = S::load_u8(blk.add(64 * (4 * half + cc)));
                    let u = S::or_u8(
                        S::shr_u8(q, 2 * jj as u32, 3),
                        mv::<S>(h, (4 * n + jj) as u32, 2, 4),
                    );
                    for t in 0..TT {
                        dot[t] = S::dot_u(dot[t], u, a[t].word(4 * j + cc));
                    }
                }
                let sc = q3k_scale::<S>(blk.add(1536), j);
                for t in 0..TT {
                    let d = S::sub_i32(dot[t], S::splat_i32(4 * a[t].bsums[j]));
                    sumi[t] = S::add_i32(sumi[t], S::mul_i32(d, sc));
                }
            }
            k_floats::<S, TT>(blk, 1728, None, &a, &sumi, &zero, &mut acc, &mut none);
        }
        acc
    }
}

/// Sub-block `j` (0..8) scale and minimum of a Q4_K/Q5_K tile block (`formats::scale_min_k4`).
#[inline(always)]
unsafe fn k4_scale_min<S: Simd>(sc: *const u8, j: usize) -> (S::I32, S::I32) {
    let byte = |k: usize| S::widen_u8(sc.add(16 * k));
    if j < 4 {
        (S::and_i32(byte(j), 63), S::and_i32(byte(j + 4), 63))
    } else {
        let hi = byte(j + 4);
        let s = S::or_i32(
            S::and_i32(hi, 0xF),
            S::shl_i32(S::shr_i32(byte(j - 4), 6), 4),
        );
        let m = S::or_i32(S::shr_i32(hi, 4), S::shl_i32(S::shr_i32(byte(j), 6), 4));
        (s, m)
    }
}

/// Q4_K and Q5_K (`QH` = offset of the fifth bits, 0 for Q4_K).
#[inline(always)]
unsafe fn k4<S: Simd, const TT: usize, const BLOCK: usize, const QH: usize, const QS: usize>(
    tile: *const u8,
    nb: usize,
    acts: [&[ActQ8K]; TT],
) -> [S::F32; TT] {
    let mut acc = [S::zero_f32(); TT];
    let mut accm = [S::zero_f32(); TT];
    for b in 0..nb {
        let blk = tile.add(b * BLOCK);
        let a: [&ActQ8K; TT] = std::array::from_fn(|t| acts[t].get_unchecked(b));
        let mut sumi = [S::zero_i32(); TT];
        let mut summ = [S::zero_i32(); TT];
        for g in 0..4usize {
            let mut dl = [S::zero_i32(); TT];
            let mut dh = [S::zero_i32(); TT];
            for c in 0..8 {
                let w = S::load_u8(blk.add(QS + 64 * (8 * g + c)));
                let mut lo = S::and_u8(w, 0x0F);
                let mut hi = S::shr_u8(w, 4, 0x0F);
                if QH != 0 {
                    let h = S::load_u8(blk.add(QH + 64 * c));
                    lo = S::or_u8(lo, mv::<S>(h, 2 * g as u32, 4, 0x10));
                    hi = S::or_u8(hi, mv::<S>(h, 2 * g as u32 + 1, 4, 0x10));
                }
                for t in 0..TT {
                    dl[t] = S::dot_u(dl[t], lo, a[t].word(16 * g + c));
                    dh[t] = S::dot_u(dh[t], hi, a[t].word(16 * g + 8 + c));
                }
            }
            let (s0, m0) = k4_scale_min::<S>(blk.add(64), 2 * g);
            let (s1, m1) = k4_scale_min::<S>(blk.add(64), 2 * g + 1);
            for t in 0..TT {
                let s = S::add_i32(S::mul_i32(dl[t], s0), S::mul_i32(dh[t], s1));
                sumi[t] = S::add_i32(sumi[t], s);
                let b0 = a[t].bsums[4 * g] + a[t].bsums[4 * g + 1];
                let b1 = a[t].bsums[4 * g + 2] + a[t].bsums[4 * g + 3];
                let m = S::add_i32(
                    S::mul_i32(m0, S::splat_i32(b0)),
                    S::mul_i32(m1, S::splat_i32(b1)),
                );
                summ[t] = S::add_i32(summ[t], m);
            }
        }
        k_floats::<S, TT>(blk, 0, Some(32), &a, &sumi, &summ, &mut acc, &mut accm);
    }
    for t in 0..TT {
        acc[t] = S::sub_f32(acc[t], accm[t]);
    }
    acc
}

pub(crate) struct Q4K;
impl TileKernel for Q4K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
    ) -> [S::F32; TT] {
        k4::<S, TT, 2304, 0, 256>(tile, nb, acts)
    }
}

pub(crate) struct Q5K;
impl TileKernel for Q5K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
    ) -> [S::F32; TT] {
        k4::<S, TT, 2816, 256, 768>(tile, nb, acts)
    }
}

pub(crate) struct Q6K;
impl TileKernel for Q6K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
    ) -> [S::F32; TT] {
        let mut acc = [S::zero_f32(); TT];
        let mut none = [S::zero_f32(); TT];
        let zero = [S::zero_i32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * 3360);
            let a: [&ActQ8K; TT] = std::array::from_fn(|t| acts[t].get_unchecked(b));
            let mut sumi = [S::zero_i32(); TT];
            for n in 0..2usize {
                for half in 0..2usize {
                    let mut dots = [[S::zero_i32(); TT]; 4];
                    for cc in 0..4 {
                        let c = 4 * half + cc;
                        let wa = S::load_u8(blk.add(64 * (16 * n + c)));
                        let wb = S::load_u8(blk.add(64 * (16 * n + 8 + c)));
                        let h = S::load_u8(blk.add(2048 + 64 * (8 * n + c)));
                        let q = [
                            S::or_u8(S::and_u8(wa, 0x0F), S::shl_u8(h, 4, 0x30)),
                            S::or_u8(S::and_u8(wb, 0x0F), S::shl_u8(h, 2, 0x30)),
                            S::or_u8(S::shr_u8(wa, 4, 0x0F), S::and_u8(h, 0x30)),
                            S::or_u8(S::shr_u8(wb, 4, 0x0F), S::shr_u8(h, 2, 0x30)),
                        ];
                        for (p, q) in q.into_iter().enumerate() {
                            for t in 0..TT {
                                dots[p][t] = S::dot_u(dots[p][t], q, a[t].word(32 * n + 8 * p + c));
                            }
                        }
                    }
                    for (p, dot) in dots.iter().enumerate() {
                        let j = 8 * n + 2 * p + half;
                        let sc = S::widen_i8(blk.add(3072 + 16 * j));
                        for t in 0..TT {
                            let d = S::sub_i32(dot[t], S::splat_i32(32 * a[t].bsums[j]));
                            sumi[t] = S::add_i32(sumi[t], S::mul_i32(d, sc));
                        }
                    }
                }
            }
            k_floats::<S, TT>(blk, 3328, None, &a, &sumi, &zero, &mut acc, &mut none);
        }
        acc
    }
}

/// Float weights: `[k][row]` per tile, one fused multiply-add per element, in column order.
/// `ELEM` is the weight size in bytes (4 = f32, 2 = f16, 3 = bf16 stored in 2 bytes).
#[inline(always)]
unsafe fn floats<S: Simd, const TT: usize, const ELEM: usize>(
    tile: *const u8,
    cols: usize,
    acts: [&[f32]; TT],
) -> [S::F32; TT] {
    let mut acc = [S::zero_f32(); TT];
    let stride = if ELEM == 4 { 64 } else { 32 };
    for k in 0..cols {
        let p = tile.add(k * stride);
        let w = match ELEM {
            4 => S::load_f32(p),
            2 => S::load_f16(p),
            _ => S::load_bf16(p),
        };
        for t in 0..TT {
            acc[t] = S::fma_f32(w, S::splat_f32(*acts[t].get_unchecked(k)), acc[t]);
        }
    }
    acc
}

macro_rules! float_kernel {
    ($name:ident, $elem:expr, $act:ident) => {
        pub(crate) struct $name;
        impl TileKernel for $name {
            type Act = f32;
            #[inline(always)]
            unsafe fn tile<S: Simd, const TT: usize>(
                tile: *const u8,
                nb: usize,
                acts: [&[f32]; TT],
            ) -> [S::F32; TT] {
                floats::<S, TT, $elem>(tile, nb, acts)
            }
            #[inline(always)]
            fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [f32] {
                &a.$act()[t * nb..(t + 1) * nb]
            }
        }
    };
}

float_kernel!(F32, 4, f32);
float_kernel!(F16, 2, f16);
float_kernel!(BF16, 3, bf16);

/// Where a product's results go: `[tokens, rows]`, row-major.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub rows: usize,
}

/// Runs tiles `tiles` of `p` against every token of `acts`, writing into `out`.
///
/// # Safety
/// The CPU runs `S`; `acts` matches `p`'s columns and has the form `K` reads (prepared); `out`
/// holds `acts.tokens * p.rows` floats and no other thread writes the rows of these tiles.
#[inline(always)]
pub(crate) unsafe fn drive<S: Simd, K: TileKernel>(
    p: &Packed,
    acts: &Activations,
    tiles: Range<usize>,
    out: Out,
) {
    let nb = p.blocks();
    match S::TOKENS {
        4 => drive_groups::<S, K, 4>(p, acts, tiles, out, nb),
        2 => drive_groups::<S, K, 2>(p, acts, tiles, out, nb),
        _ => drive_groups::<S, K, 1>(p, acts, tiles, out, nb),
    }
}

#[inline(always)]
unsafe fn drive_groups<S: Simd, K: TileKernel, const TT: usize>(
    p: &Packed,
    acts: &Activations,
    tiles: Range<usize>,
    out: Out,
    nb: usize,
) {
    let tokens = acts.tokens;
    for tile in tiles {
        let w = p.tile(tile).as_ptr();
        let mut t = 0;
        while t + TT <= tokens && TT > 1 {
            let a: [&[K::Act]; TT] = std::array::from_fn(|i| K::acts(acts, t + i, nb));
            let r = K::tile::<S, TT>(w, nb, a);
            for (i, v) in r.into_iter().enumerate() {
                store::<S>(out, t + i, tile, v);
            }
            t += TT;
        }
        while t < tokens {
            let r = K::tile::<S, 1>(w, nb, [K::acts(acts, t, nb)]);
            store::<S>(out, t, tile, r[0]);
            t += 1;
        }
    }
}

#[inline(always)]
unsafe fn store<S: Simd>(out: Out, token: usize, tile: usize, v: S::F32) {
    let row = tile * TILE;
    let dst = out.ptr.add(token * out.rows + row);
    if row + TILE <= out.rows {
        S::store_f32(dst, v);
    } else {
        let mut tmp = [0f32; TILE];
        S::store_f32(tmp.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, out.rows - row);
    }
}
