//! The tile kernels, written once over [`Simd`] and instantiated per instruction set.
//!
//! Each kernel computes one tile (16 rows) against `TT` tokens and returns one f32 vector per
//! token. The arithmetic per row is exactly [`super::reference`]'s: exact integer sums per block
//! (any order), then per block, in block order, `acc = fma(float(sum), w_scale * a_scale, acc)`.
//! Byte offsets follow the tile layout in [`super::pack`] (16 times each ggml field's length).

// Per-token loops index several arrays of the same length in step (accumulators, integer lanes,
// activations); iterator chains over them would only obscure the arithmetic.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use super::act::{ActQ8, ActQ8K, Activations};
use super::pack::{Packed, TILE};
use super::simd::Simd;

/// A format's tile kernel.
pub(crate) trait TileKernel {
    type Act: 'static;
    /// # Safety
    /// `tile` points at `nb` tile blocks of this format; each activation slice holds `nb`
    /// blocks; the CPU runs `S`. `scratch` is reusable space for decoded block scales.
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[Self::Act]; TT],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT];
    /// The activations of token `t`.
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [Self::Act];

    /// Four tiles against one token (decode). The float kernels override this to interleave
    /// the tiles: their one accumulator per row would otherwise wait on each multiply-add.
    ///
    /// # Safety
    /// As for [`TileKernel::tile`], for each of the four tiles.
    #[inline(always)]
    unsafe fn tiles4<S: Simd>(
        tiles: [*const u8; 4],
        nb: usize,
        acts: &[Self::Act],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; 4] {
        // Written out, not `map`: a closure need not inline, and the kernel's instructions
        // must stay inside the caller's target features.
        [
            Self::tile::<S, 1>(tiles[0], nb, [acts], scratch)[0],
            Self::tile::<S, 1>(tiles[1], nb, [acts], scratch)[0],
            Self::tile::<S, 1>(tiles[2], nb, [acts], scratch)[0],
            Self::tile::<S, 1>(tiles[3], nb, [acts], scratch)[0],
        ]
    }
}

// No closures in this file's kernels: a closure is a function of its own, compiled without the
// caller's target features, so intrinsics inside it would not inline (and the optimiser need not
// inline the closure). Loops and `#[inline(always)]` helpers only.

/// Token `t`'s activation block `b`.
#[inline(always)]
unsafe fn at<'a, T, const TT: usize>(acts: &[&'a [T]; TT], t: usize, b: usize) -> &'a T {
    acts.get_unchecked(t).get_unchecked(b)
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

/// ggml's `hsum_float_8` over the 8 lane accumulators, per token (`reference::hsum8`).
#[inline(always)]
unsafe fn hsum8<S: Simd, const TT: usize>(l: &[[S::F32; TT]; 8]) -> [S::F32; TT] {
    let mut out = [S::zero_f32(); TT];
    for (t, o) in out.iter_mut().enumerate() {
        *o = S::add_f32(
            S::add_f32(S::add_f32(l[4][t], l[0][t]), S::add_f32(l[6][t], l[2][t])),
            S::add_f32(S::add_f32(l[5][t], l[1][t]), S::add_f32(l[7][t], l[3][t])),
        );
    }
    out
}

/// `fma(w_scale * a_scale, float(lane), acc)` for every token: the per-block float step.
#[inline(always)]
unsafe fn step<S: Simd, A: Scaled, const TT: usize>(
    acc: &mut [S::F32; TT],
    dw: S::F32,
    acts: &[&[A]; TT],
    b: usize,
    lane: &[S::I32; TT],
) {
    for t in 0..TT {
        let dd = S::mul_f32(S::splat_f32(at(acts, t, b).scale()), dw);
        acc[t] = S::fma_f32(dd, S::to_f32(lane[t]), acc[t]);
    }
}

/// An activation block's scale.
trait Scaled {
    fn scale(&self) -> f32;
}
impl Scaled for ActQ8 {
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d
    }
}
impl Scaled for ActQ8K {
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d
    }
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

/// The 32-blocks, one lane (elements `4l..4l + 4` of every block) at a time: Q4_0, Q4_1, Q5_0,
/// Q5_1 (nibbles, `QH` = offset of the regrouped fifth bits or 0) and Q8_0 (`BYTES`).
///
/// `MIN` is the offset of the minimum (0 = none), `QS` that of the quants, `OFFSET` the zero
/// point subtracted from each quant (`-1` marks Q8_0: signed bytes, bias per instruction set).
#[inline(always)]
unsafe fn blocks32<
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
    let mut lanes = [[S::zero_f32(); TT]; 8];
    for (l, lane_acc) in lanes.iter_mut().enumerate() {
        let mut acc = [S::zero_f32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * BLOCK);
            let mut ints = [S::zero_i32(); TT];
            if OFFSET < 0 {
                let w = S::load_u8(blk.add(QS + 64 * l));
                for t in 0..TT {
                    let i = S::dot_s8(S::zero_i32(), w, at(&acts, t, b).word(l));
                    ints[t] = S::sub_i32(i, S::splat_i32(S::S8_BIAS * at(&acts, t, b).g4[l]));
                }
            } else {
                let w = S::load_u8(blk.add(QS + 64 * (l % 4)));
                let mut q = if l < 4 {
                    S::and_u8(w, 0x0F)
                } else {
                    S::shr_u8(w, 4, 0x0F)
                };
                if QH != 0 {
                    q = S::or_u8(q, mv::<S>(S::load_u8(blk.add(QH)), l as u32, 4, 0x10));
                }
                for t in 0..TT {
                    let i = S::dot_u(S::zero_i32(), q, at(&acts, t, b).word(l));
                    ints[t] = if OFFSET != 0 {
                        S::sub_i32(i, S::splat_i32(OFFSET * at(&acts, t, b).g4[l]))
                    } else {
                        i
                    };
                }
            }
            step::<S, _, TT>(&mut acc, S::load_f16(blk), &acts, b, &ints);
        }
        *lane_acc = acc;
    }
    let mut out = hsum8::<S, TT>(&lanes);
    if MIN != 0 {
        let mut summs = [S::zero_f32(); TT];
        for b in 0..nb {
            let m = S::load_f16(tile.add(b * BLOCK + MIN));
            for t in 0..TT {
                let s = acts[t].get_unchecked(b).s;
                summs[t] = S::fma_f32(m, S::splat_f32(s), summs[t]);
            }
        }
        for t in 0..TT {
            out[t] = S::add_f32(out[t], summs[t]);
        }
    }
    out
}

macro_rules! blocks32_kernel {
    ($name:ident, $block:expr, $min:expr, $qh:expr, $qs:expr, $offset:expr) => {
        pub(crate) struct $name;
        impl TileKernel for $name {
            q8_acts!();
            #[inline(always)]
            unsafe fn tile<S: Simd, const TT: usize>(
                tile: *const u8,
                nb: usize,
                acts: [&[ActQ8]; TT],
                _: &mut Vec<S::I32>,
            ) -> [S::F32; TT] {
                blocks32::<S, TT, $block, $min, $qh, $qs, $offset>(tile, nb, acts)
            }
        }
    };
}

blocks32_kernel!(Q4_0, 288, 0, 0, 32, 8);
blocks32_kernel!(Q4_1, 320, 32, 0, 64, 0);
blocks32_kernel!(Q5_0, 352, 0, 32, 96, 16);
blocks32_kernel!(Q5_1, 384, 32, 64, 128, 0);
blocks32_kernel!(Q8_0, 544, 0, 0, 32, -1);

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

/// `scratch` as `n` vectors, for a tile's decoded block scales: the eight lane passes read them
/// instead of decoding them eight times.
#[inline(always)]
unsafe fn sized<S: Simd>(scratch: &mut Vec<S::I32>, n: usize) -> &mut [S::I32] {
    scratch.clear();
    scratch.resize(n, S::zero_i32());
    scratch.as_mut_slice()
}

pub(crate) struct Q2K;
impl TileKernel for Q2K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT] {
        const BLOCK: usize = 1344;
        let out = sized::<S>(scratch, nb * 32);
        for b in 0..nb {
            for j in 0..16 {
                let raw = S::widen_u8(tile.add(b * BLOCK + 16 * j));
                out[b * 32 + j] = S::and_i32(raw, 0xF);
                out[b * 32 + 16 + j] = S::shr_i32(raw, 4);
            }
        }
        let mut lanes = [[S::zero_f32(); TT]; 8];
        for (l, lane_acc) in lanes.iter_mut().enumerate() {
            let (half, cc) = (l / 4, l % 4);
            let mut acc = [S::zero_f32(); TT];
            for b in 0..nb {
                let blk = tile.add(b * BLOCK);
                let sc = &scratch[b * 32..b * 32 + 32];
                let dmin = S::load_f16(blk.add(1312));
                for t in 0..TT {
                    let mins = S::add_i32(
                        S::mul_i32(sc[16 + 2 * l], S::splat_i32(at(&acts, t, b).bsums[2 * l])),
                        S::mul_i32(
                            sc[17 + 2 * l],
                            S::splat_i32(at(&acts, t, b).bsums[2 * l + 1]),
                        ),
                    );
                    let dd = S::mul_f32(S::splat_f32(-at(&acts, t, b).d), dmin);
                    acc[t] = S::fma_f32(dd, S::to_f32(mins), acc[t]);
                }
                let mut sumi = [S::zero_i32(); TT];
                for n in 0..2 {
                    let w = S::load_u8(blk.add(256 + 64 * (8 * n + 4 * half + cc)));
                    for jj in 0..4 {
                        let q = S::shr_u8(w, 2 * jj as u32, 3);
                        let word = 32 * n + 8 * jj + 4 * half + cc;
                        let s = sc[8 * n + 2 * jj + half];
                        for t in 0..TT {
                            let d = S::dot_u(S::zero_i32(), q, at(&acts, t, b).word(word));
                            sumi[t] = S::add_i32(sumi[t], S::mul_i32(d, s));
                        }
                    }
                }
                step::<S, _, TT>(&mut acc, S::load_f16(blk.add(1280)), &acts, b, &sumi);
            }
            *lane_acc = acc;
        }
        hsum8::<S, TT>(&lanes)
    }
}

pub(crate) struct Q3K;
impl TileKernel for Q3K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT] {
        const BLOCK: usize = 1760;
        let out = sized::<S>(scratch, nb * 16);
        for b in 0..nb {
            for j in 0..16 {
                out[b * 16 + j] = q3k_scale::<S>(tile.add(b * BLOCK + 1536), j);
            }
        }
        let mut lanes = [[S::zero_f32(); TT]; 8];
        for (l, lane_acc) in lanes.iter_mut().enumerate() {
            let (half, cc) = (l / 4, l % 4);
            let mut acc = [S::zero_f32(); TT];
            for b in 0..nb {
                let blk = tile.add(b * BLOCK);
                let sc = &scratch[b * 16..b * 16 + 16];
                let h = S::load_u8(blk.add(64 * (4 * half + cc)));
                let mut sumi = [S::zero_i32(); TT];
                for n in 0..2 {
                    let q = S::load_u8(blk.add(512 + 64 * (8 * n + 4 * half + cc)));
                    for jj in 0..4 {
                        let u = S::or_u8(
                            S::shr_u8(q, 2 * jj as u32, 3),
                            mv::<S>(h, (4 * n + jj) as u32, 2, 4),
                        );
                        let word = 32 * n + 8 * jj + 4 * half + cc;
                        let s = sc[8 * n + 2 * jj + half];
                        for t in 0..TT {
                            let d = S::sub_i32(
                                S::dot_u(S::zero_i32(), u, at(&acts, t, b).word(word)),
                                S::splat_i32(4 * at(&acts, t, b).g4[word]),
                            );
                            sumi[t] = S::add_i32(sumi[t], S::mul_i32(d, s));
                        }
                    }
                }
                step::<S, _, TT>(&mut acc, S::load_f16(blk.add(1728)), &acts, b, &sumi);
            }
            *lane_acc = acc;
        }
        hsum8::<S, TT>(&lanes)
    }
}

/// Q4_K (`QH` = 0, minimums in 4 lanes) and Q5_K (`QH` = offset of the fifth bits, minimums in
/// one scalar), as ggml's two kernels differ there.
#[inline(always)]
unsafe fn k4<S: Simd, const TT: usize, const BLOCK: usize, const QH: usize, const QS: usize>(
    tile: *const u8,
    nb: usize,
    acts: [&[ActQ8K]; TT],
    scratch: &mut Vec<S::I32>,
) -> [S::F32; TT] {
    let out = sized::<S>(scratch, nb * 16);
    for b in 0..nb {
        for j in 0..8 {
            let (s, m) = k4_scale_min::<S>(tile.add(b * BLOCK + 64), j);
            out[b * 16 + j] = s;
            out[b * 16 + 8 + j] = m;
        }
    }
    let mut lanes = [[S::zero_f32(); TT]; 8];
    for (l, lane_acc) in lanes.iter_mut().enumerate() {
        let mut acc = [S::zero_f32(); TT];
        for b in 0..nb {
            let blk = tile.add(b * BLOCK);
            let sc = &scratch[b * 16..b * 16 + 8];
            let h = if QH != 0 {
                S::load_u8(blk.add(QH + 64 * l))
            } else {
                S::load_u8(blk)
            };
            let mut sumi = [S::zero_i32(); TT];
            for g in 0..4 {
                let w = S::load_u8(blk.add(QS + 64 * (8 * g + l)));
                let mut lo = S::and_u8(w, 0x0F);
                let mut hi = S::shr_u8(w, 4, 0x0F);
                if QH != 0 {
                    lo = S::or_u8(lo, mv::<S>(h, 2 * g as u32, 4, 0x10));
                    hi = S::or_u8(hi, mv::<S>(h, 2 * g as u32 + 1, 4, 0x10));
                }
                for t in 0..TT {
                    let dl = S::dot_u(S::zero_i32(), lo, at(&acts, t, b).word(16 * g + l));
                    let dh = S::dot_u(S::zero_i32(), hi, at(&acts, t, b).word(16 * g + 8 + l));
                    let s = S::add_i32(S::mul_i32(dl, sc[2 * g]), S::mul_i32(dh, sc[2 * g + 1]));
                    sumi[t] = S::add_i32(sumi[t], s);
                }
            }
            step::<S, _, TT>(&mut acc, S::load_f16(blk), &acts, b, &sumi);
        }
        *lane_acc = acc;
    }
    let mut out = hsum8::<S, TT>(&lanes);
    // The minimum terms: sub-block j's minimum times the activations' sum over it.
    #[inline(always)]
    unsafe fn mins<S: Simd>(scratch: &[S::I32], b: usize, a: &ActQ8K, j: usize) -> S::I32 {
        S::mul_i32(
            *scratch.get_unchecked(b * 16 + 8 + j),
            S::splat_i32(a.bsums[2 * j] + a.bsums[2 * j + 1]),
        )
    }
    if QH == 0 {
        let mut accm = [[S::zero_f32(); TT]; 4];
        for (k, accm) in accm.iter_mut().enumerate() {
            for b in 0..nb {
                let dmin = S::load_f16(tile.add(b * BLOCK + 32));
                for t in 0..TT {
                    let a = acts[t].get_unchecked(b);
                    let m = S::add_i32(
                        mins::<S>(scratch, b, a, 2 * k),
                        mins::<S>(scratch, b, a, 2 * k + 1),
                    );
                    let dd = S::mul_f32(S::splat_f32(-a.d), dmin);
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
                let a = acts[t].get_unchecked(b);
                let mut m = mins::<S>(scratch, b, a, 0);
                for j in 1..8 {
                    m = S::add_i32(m, mins::<S>(scratch, b, a, j));
                }
                let dd = S::mul_f32(S::splat_f32(-a.d), dmin);
                summs[t] = S::fma_f32(dd, S::to_f32(m), summs[t]);
            }
        }
        for t in 0..TT {
            out[t] = S::add_f32(out[t], summs[t]);
        }
    }
    out
}

pub(crate) struct Q4K;
impl TileKernel for Q4K {
    q8k_acts!();
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[ActQ8K]; TT],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT] {
        k4::<S, TT, 2304, 0, 256>(tile, nb, acts, scratch)
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
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT] {
        k4::<S, TT, 2816, 256, 768>(tile, nb, acts, scratch)
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
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; TT] {
        const BLOCK: usize = 3360;
        let out = sized::<S>(scratch, nb * 16);
        for b in 0..nb {
            for j in 0..16 {
                out[b * 16 + j] = S::widen_i8(tile.add(b * BLOCK + 3072 + 16 * j));
            }
        }
        let mut lanes = [[S::zero_f32(); TT]; 8];
        for (l, lane_acc) in lanes.iter_mut().enumerate() {
            let half = l / 4;
            let mut acc = [S::zero_f32(); TT];
            for b in 0..nb {
                let blk = tile.add(b * BLOCK);
                let sc = &scratch[b * 16..b * 16 + 16];
                let mut sumi = [S::zero_i32(); TT];
                for n in 0..2 {
                    let wa = S::load_u8(blk.add(64 * (16 * n + l)));
                    let wb = S::load_u8(blk.add(64 * (16 * n + 8 + l)));
                    let h = S::load_u8(blk.add(2048 + 64 * (8 * n + l)));
                    let q = [
                        S::or_u8(S::and_u8(wa, 0x0F), S::shl_u8(h, 4, 0x30)),
                        S::or_u8(S::and_u8(wb, 0x0F), S::shl_u8(h, 2, 0x30)),
                        S::or_u8(S::shr_u8(wa, 4, 0x0F), S::and_u8(h, 0x30)),
                        S::or_u8(S::shr_u8(wb, 4, 0x0F), S::shr_u8(h, 2, 0x30)),
                    ];
                    for (p, q) in q.into_iter().enumerate() {
                        let s = sc[8 * n + 2 * p + half];
                        for t in 0..TT {
                            let d = S::dot_u(
                                S::zero_i32(),
                                q,
                                at(&acts, t, b).word(32 * n + 8 * p + l),
                            );
                            sumi[t] = S::add_i32(sumi[t], S::mul_i32(d, s));
                        }
                    }
                }
                // ggml subtracts the zero point per pair of sub-blocks (2l, 2l + 1).
                for t in 0..TT {
                    let z = S::add_i32(
                        S::mul_i32(sc[2 * l], S::splat_i32(at(&acts, t, b).bsums[2 * l])),
                        S::mul_i32(
                            sc[2 * l + 1],
                            S::splat_i32(at(&acts, t, b).bsums[2 * l + 1]),
                        ),
                    );
                    sumi[t] = S::sub_i32(sumi[t], S::shl_i32(z, 5));
                }
                step::<S, _, TT>(&mut acc, S::load_f16(blk.add(3328)), &acts, b, &sumi);
            }
            *lane_acc = acc;
        }
        hsum8::<S, TT>(&lanes)
    }
}

/// Float weights: `[k][row]` per tile, one fused multiply-add per element, in column order,
/// for `G` tiles and `TT` tokens at once (independent accumulators hide the latency).
/// `ELEM` is the weight size in bytes (4 = f32, 2 = f16, 3 = bf16 stored in 2 bytes).
#[inline(always)]
unsafe fn floats<S: Simd, const G: usize, const TT: usize, const ELEM: usize>(
    tiles: [*const u8; G],
    cols: usize,
    acts: [&[f32]; TT],
) -> [[S::F32; TT]; G] {
    let mut acc = [[S::zero_f32(); TT]; G];
    let stride = if ELEM == 4 { 64 } else { 32 };
    for k in 0..cols {
        let mut x = [S::zero_f32(); TT];
        for (t, x) in x.iter_mut().enumerate() {
            *x = S::splat_f32(*at(&acts, t, k));
        }
        for (g, acc) in acc.iter_mut().enumerate() {
            let p = tiles[g].add(k * stride);
            let w = match ELEM {
                4 => S::load_f32(p),
                2 => S::load_f16(p),
                _ => S::load_bf16(p),
            };
            for t in 0..TT {
                acc[t] = S::fma_f32(w, x[t], acc[t]);
            }
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
                _: &mut Vec<S::I32>,
            ) -> [S::F32; TT] {
                floats::<S, 1, TT, $elem>([tile], nb, acts)[0]
            }
            #[inline(always)]
            unsafe fn tiles4<S: Simd>(
                tiles: [*const u8; 4],
                nb: usize,
                acts: &[f32],
                _: &mut Vec<S::I32>,
            ) -> [S::F32; 4] {
                let r = floats::<S, 4, 1, $elem>(tiles, nb, [acts]);
                [r[0][0], r[1][0], r[2][0], r[3][0]]
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
    let mut scratch = Vec::new();
    let mut tiles = tiles;
    if tokens == 1 {
        let a = K::acts(acts, 0, nb);
        while tiles.len() >= 4 {
            let t0 = tiles.start;
            let w = [
                p.tile(t0).as_ptr(),
                p.tile(t0 + 1).as_ptr(),
                p.tile(t0 + 2).as_ptr(),
                p.tile(t0 + 3).as_ptr(),
            ];
            for (i, v) in K::tiles4::<S>(w, nb, a, &mut scratch)
                .into_iter()
                .enumerate()
            {
                store::<S>(out, 0, t0 + i, v);
            }
            tiles.start += 4;
        }
    }
    for tile in tiles {
        let w = p.tile(tile).as_ptr();
        let mut t = 0;
        while t + TT <= tokens && TT > 1 {
            let mut a: [&[K::Act]; TT] = [&[]; TT];
            for (i, a) in a.iter_mut().enumerate() {
                *a = K::acts(acts, t + i, nb);
            }
            let r = K::tile::<S, TT>(w, nb, a, &mut scratch);
            for (i, v) in r.into_iter().enumerate() {
                store::<S>(out, t + i, tile, v);
            }
            t += TT;
        }
        while t < tokens {
            let r = K::tile::<S, 1>(w, nb, [K::acts(acts, t, nb)], &mut scratch);
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
