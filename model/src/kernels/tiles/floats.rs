//! Float weights (F32, F16, BF16): `[k][row]` per tile, one fused multiply-add per element into
//! one accumulator per row, in column order. Activations are rounded to the weights' precision
//! first for F16 and BF16, as ggml does.

use super::{at, TileKernel};
use crate::kernels::act::Activations;
use crate::kernels::simd::Simd;

/// `G` tiles and `TT` tokens at once: independent accumulators hide the multiply-add latency.
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
            unsafe fn tile<S: Simd, const TT: usize, const LG: usize>(
                tile: *const u8,
                nb: usize,
                acts: [&[f32]; TT],
                _: &[S::I32],
            ) -> [S::F32; TT] {
                floats::<S, 1, TT, $elem>([tile], nb, acts)[0]
            }
            #[inline(always)]
            unsafe fn tiles4<S: Simd, const LG: usize>(
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
