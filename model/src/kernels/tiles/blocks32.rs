//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1 (nibbles, optional fifth bits and
//! minimum) and Q8_0 (signed bytes). Lane `l` of a block is elements `4l..4l + 4`: the low
//! nibbles of quant chunk `l` for `l < 4`, the high nibbles of chunk `l - 4` after (ggml unpacks
//! nibbles into the same order).

use super::{at, mv, Quant};
use crate::kernels::act::{ActQ8, Activations};
use crate::kernels::simd::Simd;

#[inline(always)]
fn q8<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8] {
    &a.q8()[t * nb..(t + 1) * nb]
}

/// Nibble formats. `BLOCK` tile block bytes, `MIN` offset of the minimum (0: none), `QH` offset
/// of the regrouped fifth bits (0: none), `QS` offset of the quants, `OFFSET` the zero point
/// (ggml subtracts it from each quant, so per lane: `offset * sum of the lane's activations`),
/// `SUM` whether the format sums whole blocks ([`Quant::BLOCK_SUM`]; four-bit quants only).
pub(crate) struct Nibbles<
    const BLOCK: usize,
    const MIN: usize,
    const QH: usize,
    const QS: usize,
    const OFFSET: i32,
    const SUM: bool,
>;

/// Q4_0 sums whole blocks: llama.cpp repacks Q4_0 on every x86 CPU with AVX2 and computes it
/// that way, and it needs one float multiply-add per 32 weights instead of eight.
pub(crate) type Q4_0 = Nibbles<288, 0, 0, 32, 8, true>;
pub(crate) type Q4_1 = Nibbles<320, 32, 0, 64, 0, false>;
pub(crate) type Q5_0 = Nibbles<352, 0, 32, 96, 16, false>;
pub(crate) type Q5_1 = Nibbles<384, 32, 64, 128, 0, false>;

impl<
        const BLOCK: usize,
        const MIN: usize,
        const QH: usize,
        const QS: usize,
        const OFFSET: i32,
        const SUM: bool,
    > Quant for Nibbles<BLOCK, MIN, QH, QS, OFFSET, SUM>
{
    type Act = ActQ8;
    const BLOCK: usize = BLOCK;
    const D: usize = 0;
    type W<S: Simd> = S::U8;
    // Short sums hold four-bit weights only (see `Simd::dot_u_short`).
    const BLOCK_SUM: bool = {
        assert!(!SUM || QH == 0, "block sums need weights below 16");
        SUM
    };

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8] {
        q8(a, t, nb)
    }

    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, _: usize, l: usize, _: &[S::I32]) -> S::U8 {
        let w = S::load_u8(blk.add(QS + 64 * (l % 4)));
        let q = if l < 4 {
            S::and_u8(w, 0x0F)
        } else {
            S::shr_u8(w, 4, 0x0F)
        };
        if QH != 0 {
            S::or_u8(q, mv::<S>(S::load_u8(blk.add(QH)), l as u32, 4, 0x10))
        } else {
            q
        }
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(w: &S::U8, l: usize, a: &ActQ8) -> S::I32 {
        // The zero point starts the sum instead of being subtracted after it.
        let init = if OFFSET != 0 {
            S::splat_i32(a.neg_offset(OFFSET, l))
        } else {
            S::zero_i32()
        };
        S::dot_u(init, *w, a.word(l))
    }

    #[inline(always)]
    unsafe fn block_start<S: Simd>(a: &ActQ8) -> S::I32 {
        S::splat_i32(-OFFSET * a.sum)
    }

    #[inline(always)]
    unsafe fn block_add<S: Simd>(acc: S::I32, w: &S::U8, l: usize, a: &ActQ8) -> S::I32 {
        S::dot_u_short(acc, *w, a.word(l))
    }

    /// ggml's `summs`: one scalar accumulator of `fma(m, s, summs)` per block, added last.
    #[inline(always)]
    unsafe fn tail<S: Simd, const TT: usize>(
        tile: *const u8,
        nb: usize,
        acts: &[&[ActQ8]; TT],
        _: &[S::I32],
        out: &mut [S::F32; TT],
    ) {
        if MIN == 0 {
            return;
        }
        let mut summs = [S::zero_f32(); TT];
        for b in 0..nb {
            let m = S::load_f16(tile.add(b * BLOCK + MIN));
            for t in 0..TT {
                summs[t] = S::fma_f32(m, S::splat_f32(at(acts, t, b).s), summs[t]);
            }
        }
        for t in 0..TT {
            out[t] = S::add_f32(out[t], summs[t]);
        }
    }
}

/// Q8_0: signed bytes, lane `l` = chunk `l`.
pub(crate) struct Q8_0;

impl Quant for Q8_0 {
    type Act = ActQ8;
    const BLOCK: usize = 544;
    const D: usize = 0;
    type W<S: Simd> = S::U8;

    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [ActQ8] {
        q8(a, t, nb)
    }

    #[inline(always)]
    unsafe fn weights<S: Simd>(blk: *const u8, _: usize, l: usize, _: &[S::I32]) -> S::U8 {
        S::load_u8(blk.add(32 + 64 * l))
    }

    #[inline(always)]
    unsafe fn int<S: Simd>(w: &S::U8, l: usize, a: &ActQ8) -> S::I32 {
        let init = if S::S8_BIAS != 0 {
            S::splat_i32(a.neg_offset(S::S8_BIAS, l))
        } else {
            S::zero_i32()
        };
        S::dot_s8(init, *w, a.word(l))
    }
}
