//! The tile kernels, written once over [`Simd`] and instantiated per instruction set.
//!
//! A tile is 16 rows; one vector lane holds one row. A kernel computes a tile against `TT`
//! tokens. For the quantized formats each row keeps ggml's 8 lane accumulators (see
//! [`super::reference`]): a format only says how to get lane `l`'s exact integer for a block
//! ([`Quant`]), and [`quant_tile`] runs the float arithmetic. It visits lanes in groups of `LG`
//! (all 8 at once when registers allow, for decode: one pass over the weights streams them from
//! memory in order; a few at a time for prefill, where `TT` tokens share each loaded weight).
//! Every lane still accumulates its blocks in order, so the grouping never changes a bit.
//!
//! No closures in these kernels: a closure is a function of its own, compiled without the
//! caller's target features, so intrinsics inside it would not inline. Loops and
//! `#[inline(always)]` helpers only.

// Per-token loops index several arrays of the same length in step (accumulators, integer lanes,
// activations); iterator chains over them would only obscure the arithmetic.
#![allow(clippy::needless_range_loop)]

mod blocks32;
mod floats;
mod kquants;

use std::mem::MaybeUninit;
use std::ops::Range;

pub(crate) use blocks32::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
pub(crate) use floats::{BF16, F16, F32};
pub(crate) use kquants::{Q2K, Q3K, Q4K, Q5K, Q6K};

use super::act::{ActQ8, ActQ8K, Activations};
use super::pack::{Packed, TILE};
use super::simd::Simd;

/// A format's tile kernel, as the driver sees it.
pub(crate) trait TileKernel {
    type Act: 'static;
    /// One integer per block and token instead of ggml's 8 lanes (see [`Quant::BLOCK_SUM`]):
    /// with no lanes to group, more tokens share each weight load.
    const BLOCK_SUM: bool = false;
    /// Vectors a lane's unpacked weights occupy while every token uses them: with few, more
    /// lanes fit in registers at once.
    const WEIGHT_VECTORS: usize = 1;
    /// Decodes what every token of a tile reuses (block scales) into `scratch`, once per tile
    /// however many tokens run against it.
    ///
    /// # Safety
    /// `tile` points at `nb` tile blocks of this format; the CPU runs `S`.
    #[inline(always)]
    unsafe fn prepare<S: Simd>(_tile: *const u8, _nb: usize, _scratch: &mut Vec<S::I32>) {}
    /// `TT` tokens of one tile, lanes in groups of `LG`.
    ///
    /// # Safety
    /// `tile` points at `nb` tile blocks of this format; each activation slice holds `nb`
    /// blocks; the CPU runs `S`. `scratch` is what [`TileKernel::prepare`] made of this tile.
    unsafe fn tile<S: Simd, const TT: usize, const LG: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[Self::Act]; TT],
        scratch: &[S::I32],
    ) -> [S::F32; TT];
    /// The activations of token `t`.
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [Self::Act];

    /// Four tiles against one token (decode). The float kernels override this to interleave
    /// the tiles: their one accumulator per row would otherwise wait on each multiply-add.
    ///
    /// # Safety
    /// As for [`TileKernel::tile`], for each of the four tiles.
    #[inline(always)]
    unsafe fn tiles4<S: Simd, const LG: usize>(
        tiles: [*const u8; 4],
        nb: usize,
        acts: &[Self::Act],
        scratch: &mut Vec<S::I32>,
    ) -> [S::F32; 4] {
        let mut out = [S::zero_f32(); 4];
        for (o, tile) in out.iter_mut().zip(tiles) {
            Self::prepare::<S>(tile, nb, scratch);
            *o = Self::tile::<S, 1, LG>(tile, nb, [acts], scratch)[0];
        }
        out
    }
}

/// An activation block's scale.
pub(crate) trait Scaled {
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

/// A quantized format: how to get one lane's exact integer for one block.
pub(crate) trait Quant {
    type Act: Scaled + 'static;
    /// Bytes of a tile block (16 ggml blocks).
    const BLOCK: usize;
    /// Offset of the 16 weight scales (f16) in a tile block.
    const D: usize;
    /// What lane `l` needs of a block's weights, unpacked once for every token.
    type W<S: Simd>: Copy;
    /// How many vectors `W` holds.
    const WEIGHT_VECTORS: usize = 1;
    /// The canonical sum is one integer per block and one multiply-add per block, with no
    /// lanes (llama.cpp's arithmetic for the formats it repacks on x86), instead of ggml's 8
    /// lanes. Such a format implements [`Quant::block_start`] and [`Quant::block_add`]
    /// instead of [`Quant::int`].
    const BLOCK_SUM: bool = false;

    /// The activations of token `t`.
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [Self::Act];

    /// Decodes what every lane pass and token reuses (block scales) into `scratch`, once per
    /// tile.
    ///
    /// # Safety
    /// `tile` holds `nb` tile blocks; the CPU runs `S`.
    #[inline(always)]
    unsafe fn prepare<S: Simd>(_tile: *const u8, _nb: usize, _scratch: &mut Vec<S::I32>) {}

    /// # Safety
    /// `blk` is block `b` of the tile `prepare` saw; `l < 8`.
    unsafe fn weights<S: Simd>(
        blk: *const u8,
        b: usize,
        l: usize,
        scratch: &[S::I32],
    ) -> Self::W<S>;

    /// Lane `l`'s integer: its products with `a`, scaled and offset as ggml does.
    ///
    /// # Safety
    /// The CPU runs `S`.
    unsafe fn int<S: Simd>(w: &Self::W<S>, l: usize, a: &Self::Act) -> S::I32;

    /// Lane `l`'s integer for one token straight from the block: what decode runs, where no
    /// other token reuses the unpacked weights. A format whose [`Quant::W`] spans many vectors
    /// overrides it to consume each vector as soon as it is unpacked; the integer is the same.
    ///
    /// # Safety
    /// As for [`Quant::weights`].
    #[inline(always)]
    unsafe fn lane_int<S: Simd>(
        blk: *const u8,
        b: usize,
        l: usize,
        scratch: &[S::I32],
        a: &Self::Act,
    ) -> S::I32 {
        Self::int::<S>(&Self::weights::<S>(blk, b, l, scratch), l, a)
    }

    /// Block-sum formats: the integer a block's sum starts from (its zero-point term).
    ///
    /// # Safety
    /// The CPU runs `S`.
    #[inline(always)]
    unsafe fn block_start<S: Simd>(_a: &Self::Act) -> S::I32 {
        S::zero_i32()
    }

    /// Block-sum formats: `acc` plus lane `l`'s products with `a`, as a short sum
    /// ([`Simd::dot_u_short`]) of the block's eight lanes.
    ///
    /// # Safety
    /// The CPU runs `S`.
    #[inline(always)]
    unsafe fn block_add<S: Simd>(
        acc: S::I32,
        _w: &Self::W<S>,
        _l: usize,
        _a: &Self::Act,
    ) -> S::I32 {
        acc
    }

    /// A float step ggml applies to lane `l` before the scale step of a block (Q2_K's minimums).
    ///
    /// # Safety
    /// As for [`Quant::weights`].
    #[inline(always)]
    unsafe fn before<S: Simd>(
        _blk: *const u8,
        _b: usize,
        _l: usize,
        _a: &Self::Act,
        _scratch: &[S::I32],
        acc: S::F32,
    ) -> S::F32 {
        acc
    }

    /// Terms ggml adds to the lanes' sum (minimum terms), per token.
    ///
    /// # Safety
    /// As for [`Quant::prepare`]; `acts` hold `nb` blocks each.
    #[inline(always)]
    unsafe fn tail<S: Simd, const TT: usize>(
        _tile: *const u8,
        _nb: usize,
        _acts: &[&[Self::Act]; TT],
        _scratch: &[S::I32],
        _out: &mut [S::F32; TT],
    ) {
    }
}

/// Token `t`'s activation block `b`.
#[inline(always)]
pub(crate) unsafe fn at<'a, T, const TT: usize>(acts: &[&'a [T]; TT], t: usize, b: usize) -> &'a T {
    acts.get_unchecked(t).get_unchecked(b)
}

/// Moves bit `from` of each byte to bit `to`, keeping only `mask` (bits at `to`).
#[inline(always)]
pub(crate) unsafe fn mv<S: Simd>(x: S::U8, from: u32, to: u32, mask: u8) -> S::U8 {
    if from > to {
        S::shr_u8(x, from - to, mask)
    } else if from < to {
        S::shl_u8(x, to - from, mask)
    } else {
        S::and_u8(x, mask)
    }
}

/// ggml's `hsum_float_8` over the 8 lane accumulators, per token (`reference::hsum8`).
///
/// # Safety
/// Every lane of every token has been written.
#[inline(always)]
unsafe fn hsum8<S: Simd, const TT: usize>(l: &[[MaybeUninit<S::F32>; TT]; 8]) -> [S::F32; TT] {
    let mut out = [S::zero_f32(); TT];
    for (t, o) in out.iter_mut().enumerate() {
        let mut lane = [S::zero_f32(); 8];
        for (i, v) in lane.iter_mut().enumerate() {
            *v = l[i][t].assume_init();
        }
        let l = lane;
        *o = S::add_f32(
            S::add_f32(S::add_f32(l[4], l[0]), S::add_f32(l[6], l[2])),
            S::add_f32(S::add_f32(l[5], l[1]), S::add_f32(l[7], l[3])),
        );
    }
    out
}

/// How far ahead of the block being computed the kernels prefetch, in bytes (about what memory
/// must have in flight to stream at full speed: bandwidth times latency).
const PREFETCH: usize = 3072;

/// One tile of a quantized format against `TT` tokens, lanes in groups of `LG`: per block and
/// lane, `acc = fma(a_scale * w_scale, float(lane integer), acc)`, then ggml's lane sum.
#[inline(always)]
pub(crate) unsafe fn quant_tile<S: Simd, K: Quant, const TT: usize, const LG: usize>(
    tile: *const u8,
    nb: usize,
    acts: [&[K::Act]; TT],
    scratch: &[S::I32],
) -> [S::F32; TT] {
    if K::BLOCK_SUM {
        return block_sum_tile::<S, K, TT>(tile, nb, acts, scratch);
    }
    // Where it measured faster (criterion, 64 tokens, Zen 4): the 32-element formats in four or
    // more passes (AVX2: +11% Q8_0, +21-31% Q4_1 and Q5_0). AVX-512's two passes lost 2-11%
    // to the chunks' extra loads and stores, and K-quants on AVX2 lost up to 5%.
    if TT > 1 && LG <= 2 && K::BLOCK <= 1024 {
        return quant_tile_tokens::<S, K, TT, LG>(tile, nb, acts, scratch);
    }
    // Written pass by pass below, never read before: zeroing it first cost a `memset` call per
    // tile (2 KiB with 4 tokens), 5% of a Gemma prompt's time.
    let mut lanes = [[MaybeUninit::<S::F32>::uninit(); TT]; 8];
    let mut g = 0;
    while g < 8 {
        let mut acc = [[S::zero_f32(); TT]; LG];
        for b in 0..nb {
            let blk = tile.add(b * K::BLOCK);
            // The hardware prefetcher alone leaves decode waiting on memory: ask for the bytes
            // a few blocks ahead (past the tile's end is the next tile; past the matrix's end
            // a harmless hint).
            let dw = S::load_f16(blk.add(K::D));
            let mut dd = [dw; TT];
            for t in 0..TT {
                dd[t] = S::mul_f32(S::splat_f32(at(&acts, t, b).scale()), dw);
            }
            for li in 0..LG {
                let l = g + li;
                if g == 0 {
                    // K-quant blocks spread theirs over the first pass's lanes: one burst of a
                    // whole block's lines (53 for Q6_K) left their decode at a third of the
                    // speed they reach on cached weights (criterion: Q6_K from memory +13% on
                    // AVX-512, +40% on AVX2 spread). Small blocks keep one burst, which measured
                    // 2-10% faster for them.
                    let lines = K::BLOCK.div_ceil(64);
                    let (first, end) = if K::BLOCK > 1024 {
                        (li * lines / LG, (li + 1) * lines / LG)
                    } else if li == 0 {
                        (0, lines)
                    } else {
                        (0, 0)
                    };
                    let mut line = first;
                    while line < end {
                        S::prefetch(blk.wrapping_add(PREFETCH.max(2 * K::BLOCK) + 64 * line));
                        line += 1;
                    }
                }
                if TT == 1 {
                    let a = at(&acts, 0, b);
                    let x = K::before::<S>(blk, b, l, a, scratch, acc[li][0]);
                    let int = K::lane_int::<S>(blk, b, l, scratch, a);
                    acc[li][0] = S::fma_f32(dd[0], S::to_f32(int), x);
                    continue;
                }
                let w = K::weights::<S>(blk, b, l, scratch);
                for t in 0..TT {
                    let a = at(&acts, t, b);
                    let x = K::before::<S>(blk, b, l, a, scratch, acc[li][t]);
                    acc[li][t] = S::fma_f32(dd[t], S::to_f32(K::int::<S>(&w, l, a)), x);
                }
            }
        }
        for li in 0..LG {
            for t in 0..TT {
                lanes[g + li][t].write(acc[li][t]);
            }
        }
        g += LG;
    }
    // SAFETY: the passes wrote lanes 0..8 (LG divides 8) for every token.
    let mut out = hsum8::<S, TT>(&lanes);
    K::tail::<S, TT>(tile, nb, &acts, scratch, &mut out);
    out
}

/// Blocks per chunk of [`quant_tile_tokens`]: their scale products fit in L1 (4 KiB for four
/// tokens of AVX-512 or AVX2 vectors).
const CHUNK: usize = 16;

/// [`quant_tile`] for several tokens (prefill): the blocks run in chunks, and each chunk's
/// scale products (weight scale times each token's activation scale) are computed once for
/// all lane passes instead of once per pass. They took a multiply per token and block from
/// the same pipes as the products, in every one of up to eight passes. The lanes still add
/// their blocks in order, so the bits are those of [`quant_tile`].
#[inline(always)]
unsafe fn quant_tile_tokens<S: Simd, K: Quant, const TT: usize, const LG: usize>(
    tile: *const u8,
    nb: usize,
    acts: [&[K::Act]; TT],
    scratch: &[S::I32],
) -> [S::F32; TT] {
    let mut lanes = [[MaybeUninit::<S::F32>::uninit(); TT]; 8];
    let mut dd = [[MaybeUninit::<S::F32>::uninit(); TT]; CHUNK];
    let mut c0 = 0;
    // At least one chunk, even an empty one: its passes write every lane.
    loop {
        let c1 = (c0 + CHUNK).min(nb);
        for b in c0..c1 {
            let dw = S::load_f16(tile.add(b * K::BLOCK + K::D));
            for t in 0..TT {
                dd[b - c0][t].write(S::mul_f32(S::splat_f32(at(&acts, t, b).scale()), dw));
            }
        }
        let mut g = 0;
        while g < 8 {
            let mut acc = [[S::zero_f32(); TT]; LG];
            if c0 > 0 {
                for li in 0..LG {
                    for t in 0..TT {
                        acc[li][t] = lanes[g + li][t].assume_init();
                    }
                }
            }
            for b in c0..c1 {
                let blk = tile.add(b * K::BLOCK);
                if g == 0 {
                    let mut line = 0;
                    while line < K::BLOCK {
                        S::prefetch(blk.wrapping_add(PREFETCH.max(2 * K::BLOCK) + line));
                        line += 64;
                    }
                }
                for li in 0..LG {
                    let l = g + li;
                    let w = K::weights::<S>(blk, b, l, scratch);
                    for t in 0..TT {
                        let a = at(&acts, t, b);
                        let x = K::before::<S>(blk, b, l, a, scratch, acc[li][t]);
                        let int = S::to_f32(K::int::<S>(&w, l, a));
                        acc[li][t] = S::fma_f32(dd[b - c0][t].assume_init(), int, x);
                    }
                }
            }
            for li in 0..LG {
                for t in 0..TT {
                    lanes[g + li][t].write(acc[li][t]);
                }
            }
            g += LG;
        }
        c0 = c1;
        if c0 >= nb {
            break;
        }
    }
    // SAFETY: the first chunk's passes wrote lanes 0..8 (LG divides 8) for every token.
    let mut out = hsum8::<S, TT>(&lanes);
    K::tail::<S, TT>(tile, nb, &acts, scratch, &mut out);
    out
}

/// One tile of a block-sum format ([`Quant::BLOCK_SUM`]) against `TT` tokens: per block,
/// `acc = fma(float(block integer), weight scale * activation scale, acc)`.
#[inline(always)]
unsafe fn block_sum_tile<S: Simd, K: Quant, const TT: usize>(
    tile: *const u8,
    nb: usize,
    acts: [&[K::Act]; TT],
    scratch: &[S::I32],
) -> [S::F32; TT] {
    let mut acc = [S::zero_f32(); TT];
    for b in 0..nb {
        let blk = tile.add(b * K::BLOCK);
        let mut line = 0;
        while line < K::BLOCK {
            S::prefetch(blk.wrapping_add(PREFETCH.max(2 * K::BLOCK) + line));
            line += 64;
        }
        // With one or two tokens, a single chain of eight dependent dot products per block
        // would wait on their latency: even and odd lanes sum apart (integers: any order
        // gives the same total). With more tokens the tokens' chains fill the pipeline.
        let split = if TT <= 2 { 2 } else { 1 };
        let mut sums = [[S::zero_i32(); TT]; 2];
        for l in 0..8 {
            let w = K::weights::<S>(blk, b, l, scratch);
            for t in 0..TT {
                let s = &mut sums[l % split][t];
                *s = K::block_add::<S>(*s, &w, l, at(&acts, t, b));
            }
        }
        let dw = S::load_f16(blk.add(K::D));
        for t in 0..TT {
            let a = at(&acts, t, b);
            let mut sum = S::short_end(sums[0][t]);
            if split == 2 {
                sum = S::add_i32(sum, S::short_end(sums[1][t]));
            }
            let sum = S::add_i32(sum, K::block_start::<S>(a));
            let dd = S::mul_f32(dw, S::splat_f32(a.scale()));
            acc[t] = S::fma_f32(S::to_f32(sum), dd, acc[t]);
        }
    }
    K::tail::<S, TT>(tile, nb, &acts, scratch, &mut acc);
    acc
}

/// A quantized format as a tile kernel.
pub(crate) struct Q<K>(std::marker::PhantomData<K>);

impl<K: Quant> TileKernel for Q<K> {
    type Act = K::Act;
    const WEIGHT_VECTORS: usize = K::WEIGHT_VECTORS;
    const BLOCK_SUM: bool = K::BLOCK_SUM;
    #[inline(always)]
    unsafe fn prepare<S: Simd>(tile: *const u8, nb: usize, scratch: &mut Vec<S::I32>) {
        K::prepare::<S>(tile, nb, scratch)
    }
    #[inline(always)]
    unsafe fn tile<S: Simd, const TT: usize, const LG: usize>(
        tile: *const u8,
        nb: usize,
        acts: [&[K::Act]; TT],
        scratch: &[S::I32],
    ) -> [S::F32; TT] {
        quant_tile::<S, K, TT, LG>(tile, nb, acts, scratch)
    }
    #[inline(always)]
    fn acts<'a>(a: &'a Activations, t: usize, nb: usize) -> &'a [K::Act] {
        K::acts(a, t, nb)
    }
}

/// `scratch` as `n` vectors, for a tile's decoded block scales.
#[inline(always)]
pub(crate) unsafe fn sized<S: Simd>(scratch: &mut Vec<S::I32>, n: usize) -> &mut [S::I32] {
    scratch.clear();
    scratch.resize(n, S::zero_i32());
    scratch.as_mut_slice()
}

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
    // Lane groups sized so that a group's accumulators and unpacked weights stay in registers
    // (decode of the many-vector K-quants in two passes of four lanes: 8-9% faster than one
    // pass of eight, whose weights spilled), except single-vector formats' decode, which takes
    // all eight lanes in one pass even where their accumulators spill (AVX2: 16 of its 16
    // registers): a second pass re-reads the tile from cache while memory idles, and one pass
    // streamed Q8_0 from memory at 19-25 GiB/s against 13 (criterion, AVX2, Zen 4; in cache
    // unchanged), and whose prefill on AVX2 takes four tokens a tile in one-lane passes
    // (criterion, 64 tokens: Q5_0 and Q5_1 +10-13%, F32 and F16 about 1.7x; Q8_0 level);
    // block-sum formats keep two vectors per token (integer and float sums) and no lanes.
    if K::BLOCK_SUM {
        return match S::ACCUMULATORS {
            8 => drive_tokens::<S, K, 8, 8, 8>(p, acts, tiles, out),
            _ => drive_tokens::<S, K, 2, 4, 4>(p, acts, tiles, out),
        };
    }
    match (S::ACCUMULATORS, K::WEIGHT_VECTORS) {
        (8, 0..=2) => drive_tokens::<S, K, 4, 4, 8>(p, acts, tiles, out),
        (8, _) => drive_tokens::<S, K, 4, 2, 4>(p, acts, tiles, out),
        (_, 0..=1) => drive_tokens::<S, K, 4, 1, 8>(p, acts, tiles, out),
        _ => drive_tokens::<S, K, 2, 2, 4>(p, acts, tiles, out),
    }
}

/// `TT` tokens at a time with lane groups of `LG` (prefill); single tokens with groups of `LG1`
/// (decode), four tiles at a time.
#[inline(always)]
unsafe fn drive_tokens<
    S: Simd,
    K: TileKernel,
    const TT: usize,
    const LG: usize,
    const LG1: usize,
>(
    p: &Packed,
    acts: &Activations,
    tiles: Range<usize>,
    out: Out,
) {
    let nb = p.blocks();
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
            let r = K::tiles4::<S, LG1>(w, nb, a, &mut scratch);
            for (i, v) in r.into_iter().enumerate() {
                store::<S>(out, 0, t0 + i, v);
            }
            tiles.start += 4;
        }
    }
    for tile in tiles {
        let w = p.tile(tile).as_ptr();
        K::prepare::<S>(w, nb, &mut scratch);
        let mut t = 0;
        while t + TT <= tokens {
            let mut a: [&[K::Act]; TT] = [&[]; TT];
            for (i, a) in a.iter_mut().enumerate() {
                *a = K::acts(acts, t + i, nb);
            }
            let r = K::tile::<S, TT, LG>(w, nb, a, &scratch);
            for (i, v) in r.into_iter().enumerate() {
                store::<S>(out, t + i, tile, v);
            }
            t += TT;
        }
        while t < tokens {
            let r = K::tile::<S, 1, LG1>(w, nb, [K::acts(acts, t, nb)], &scratch);
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
