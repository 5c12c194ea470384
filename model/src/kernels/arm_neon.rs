//! aarch64 Advanced SIMD: a tile in four 128-bit registers (rows 0..4, 4..8, 8..12, 12..16).
//! Byte products with `sdot` where the CPU has the dot-product extension, otherwise with
//! widening multiplies and pairwise adds. Both give the exact integer, so both paths (and every
//! other) produce the same bits.
//!
//! `sdot` and the f16 conversion are written as inline assembly: their intrinsics are not yet
//! stable in Rust.

use std::arch::aarch64::*;
use std::arch::asm;

use super::simd::Simd;

/// Without the dot-product extension (Cortex-A53/A72).
#[derive(Clone, Copy)]
pub(crate) struct Neon;

/// With the dot-product extension.
#[derive(Clone, Copy)]
pub(crate) struct Dotprod;

type Quad<T> = [T; 4];

/// `[f(x[0], args..), ..., f(x[3], args..)]`, written out: closures need not inline.
macro_rules! each {
    ($f:ident, $x:expr $(, $arg:expr)*) => {{
        let x = $x;
        [$f(x[0] $(, $arg)*), $f(x[1] $(, $arg)*), $f(x[2] $(, $arg)*), $f(x[3] $(, $arg)*)]
    }};
}

/// `[f(x[0], y[0]), ..., f(x[3], y[3])]`.
macro_rules! both {
    ($f:ident, $x:expr, $y:expr) => {{
        let (x, y) = ($x, $y);
        [
            $f(x[0], y[0]),
            $f(x[1], y[1]),
            $f(x[2], y[2]),
            $f(x[3], y[3]),
        ]
    }};
}

#[inline(always)]
unsafe fn shr_u32(v: int32x4_t, s: int32x4_t) -> int32x4_t {
    vreinterpretq_s32_u32(vshlq_u32(vreinterpretq_u32_s32(v), s))
}

#[inline(always)]
unsafe fn bf16x4(q: *const u16) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(q)))
}

/// Four f16 values to f32 (`fcvtl`, exact).
#[inline(always)]
unsafe fn cvt_f16(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) out, in(vreg) h, options(pure, nomem, nostack));
    out
}

/// `acc + sum of 4 adjacent byte products` per lane, without `sdot`: widening multiplies give
/// exact i16 products (|w|, |a| <= 128), pairwise adds give each row's sum of four.
#[inline(always)]
unsafe fn dot4_mull(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a)));
    let hi = vpaddlq_s16(vmull_high_s8(w, a));
    vaddq_s32(acc, vpaddq_s32(lo, hi))
}

/// The same with `sdot`. Compiled with the dot-product feature itself (not only inlined into
/// functions that have it), so the assembler accepts `sdot` wherever the optimiser places it.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot4_sdot(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
        inout(vreg) acc,
        in(vreg) w,
        in(vreg) a,
        options(pure, nomem, nostack)
    );
    acc
}

macro_rules! neon_simd {
    ($ty:ident, $dot:ident) => {
        // SAFETY: instantiated only inside functions compiled with this path's features, called
        // only when the CPU reports them; loads/stores are unaligned and in bounds.
        unsafe impl Simd for $ty {
            type U8 = Quad<uint8x16_t>;
            type I32 = Quad<int32x4_t>;
            type F32 = Quad<float32x4_t>;

            const ACCUMULATORS: usize = 4;
            const S8_BIAS: i32 = 0;

            #[inline(always)]
            unsafe fn prefetch(p: *const u8) {
                // A hint: `prfm` never faults, whatever the address.
                asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
            }
            #[inline(always)]
            unsafe fn load_u8(p: *const u8) -> Quad<uint8x16_t> {
                [
                    vld1q_u8(p),
                    vld1q_u8(p.add(16)),
                    vld1q_u8(p.add(32)),
                    vld1q_u8(p.add(48)),
                ]
            }
            #[inline(always)]
            unsafe fn and_u8(x: Quad<uint8x16_t>, mask: u8) -> Quad<uint8x16_t> {
                let m = vdupq_n_u8(mask);
                each!(vandq_u8, x, m)
            }
            #[inline(always)]
            unsafe fn or_u8(x: Quad<uint8x16_t>, y: Quad<uint8x16_t>) -> Quad<uint8x16_t> {
                both!(vorrq_u8, x, y)
            }
            #[inline(always)]
            unsafe fn shr_u8(x: Quad<uint8x16_t>, n: u32, mask: u8) -> Quad<uint8x16_t> {
                let s = vdupq_n_s8(-(n as i8));
                Self::and_u8(each!(vshlq_u8, x, s), mask)
            }
            #[inline(always)]
            unsafe fn shl_u8(x: Quad<uint8x16_t>, n: u32, mask: u8) -> Quad<uint8x16_t> {
                let s = vdupq_n_s8(n as i8);
                Self::and_u8(each!(vshlq_u8, x, s), mask)
            }
            #[inline(always)]
            unsafe fn dot_u(acc: Quad<int32x4_t>, w: Quad<uint8x16_t>, a: i32) -> Quad<int32x4_t> {
                let a = vreinterpretq_s8_s32(vdupq_n_s32(a));
                let w = each!(vreinterpretq_s8_u8, w);
                [
                    $dot(acc[0], w[0], a),
                    $dot(acc[1], w[1], a),
                    $dot(acc[2], w[2], a),
                    $dot(acc[3], w[3], a),
                ]
            }
            #[inline(always)]
            unsafe fn dot_s8(acc: Quad<int32x4_t>, w: Quad<uint8x16_t>, a: i32) -> Quad<int32x4_t> {
                Self::dot_u(acc, w, a)
            }

            #[inline(always)]
            unsafe fn zero_i32() -> Quad<int32x4_t> {
                [vdupq_n_s32(0); 4]
            }
            #[inline(always)]
            unsafe fn splat_i32(v: i32) -> Quad<int32x4_t> {
                [vdupq_n_s32(v); 4]
            }
            #[inline(always)]
            unsafe fn add_i32(x: Quad<int32x4_t>, y: Quad<int32x4_t>) -> Quad<int32x4_t> {
                both!(vaddq_s32, x, y)
            }
            #[inline(always)]
            unsafe fn sub_i32(x: Quad<int32x4_t>, y: Quad<int32x4_t>) -> Quad<int32x4_t> {
                both!(vsubq_s32, x, y)
            }
            #[inline(always)]
            unsafe fn madd16(
                acc: Quad<int32x4_t>,
                x: Quad<int32x4_t>,
                s: Quad<int32x4_t>,
            ) -> Quad<int32x4_t> {
                // `mla` on 32-bit lanes is one instruction already.
                [
                    vmlaq_s32(acc[0], x[0], s[0]),
                    vmlaq_s32(acc[1], x[1], s[1]),
                    vmlaq_s32(acc[2], x[2], s[2]),
                    vmlaq_s32(acc[3], x[3], s[3]),
                ]
            }
            #[inline(always)]
            unsafe fn and_i32(x: Quad<int32x4_t>, mask: i32) -> Quad<int32x4_t> {
                let m = vdupq_n_s32(mask);
                each!(vandq_s32, x, m)
            }
            #[inline(always)]
            unsafe fn or_i32(x: Quad<int32x4_t>, y: Quad<int32x4_t>) -> Quad<int32x4_t> {
                both!(vorrq_s32, x, y)
            }
            #[inline(always)]
            unsafe fn shr_i32(x: Quad<int32x4_t>, n: u32) -> Quad<int32x4_t> {
                let s = vdupq_n_s32(-(n as i32));
                each!(shr_u32, x, s)
            }
            #[inline(always)]
            unsafe fn shl_i32(x: Quad<int32x4_t>, n: u32) -> Quad<int32x4_t> {
                let s = vdupq_n_s32(n as i32);
                each!(vshlq_s32, x, s)
            }
            #[inline(always)]
            unsafe fn widen_u8(p: *const u8) -> Quad<int32x4_t> {
                let b = vld1q_u8(p);
                let (lo, hi) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
                [
                    vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo))),
                    vreinterpretq_s32_u32(vmovl_high_u16(lo)),
                    vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi))),
                    vreinterpretq_s32_u32(vmovl_high_u16(hi)),
                ]
            }
            #[inline(always)]
            unsafe fn widen_i8(p: *const u8) -> Quad<int32x4_t> {
                let b = vld1q_s8(p.cast());
                let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
                [
                    vmovl_s16(vget_low_s16(lo)),
                    vmovl_high_s16(lo),
                    vmovl_s16(vget_low_s16(hi)),
                    vmovl_high_s16(hi),
                ]
            }

            #[inline(always)]
            unsafe fn zero_f32() -> Quad<float32x4_t> {
                [vdupq_n_f32(0.0); 4]
            }
            #[inline(always)]
            unsafe fn splat_f32(v: f32) -> Quad<float32x4_t> {
                [vdupq_n_f32(v); 4]
            }
            #[inline(always)]
            unsafe fn load_f16(p: *const u8) -> Quad<float32x4_t> {
                let q = p.cast::<u16>();
                [
                    cvt_f16(vld1_u16(q)),
                    cvt_f16(vld1_u16(q.add(4))),
                    cvt_f16(vld1_u16(q.add(8))),
                    cvt_f16(vld1_u16(q.add(12))),
                ]
            }
            #[inline(always)]
            unsafe fn load_bf16(p: *const u8) -> Quad<float32x4_t> {
                let q = p.cast::<u16>();
                [
                    bf16x4(q),
                    bf16x4(q.add(4)),
                    bf16x4(q.add(8)),
                    bf16x4(q.add(12)),
                ]
            }
            #[inline(always)]
            unsafe fn load_f32(p: *const u8) -> Quad<float32x4_t> {
                let q = p.cast::<f32>();
                [
                    vld1q_f32(q),
                    vld1q_f32(q.add(4)),
                    vld1q_f32(q.add(8)),
                    vld1q_f32(q.add(12)),
                ]
            }
            #[inline(always)]
            unsafe fn to_f32(x: Quad<int32x4_t>) -> Quad<float32x4_t> {
                each!(vcvtq_f32_s32, x)
            }
            #[inline(always)]
            unsafe fn add_f32(x: Quad<float32x4_t>, y: Quad<float32x4_t>) -> Quad<float32x4_t> {
                both!(vaddq_f32, x, y)
            }
            #[inline(always)]
            unsafe fn mul_f32(x: Quad<float32x4_t>, y: Quad<float32x4_t>) -> Quad<float32x4_t> {
                both!(vmulq_f32, x, y)
            }
            #[inline(always)]
            unsafe fn fma_f32(
                x: Quad<float32x4_t>,
                y: Quad<float32x4_t>,
                z: Quad<float32x4_t>,
            ) -> Quad<float32x4_t> {
                [
                    vfmaq_f32(z[0], x[0], y[0]),
                    vfmaq_f32(z[1], x[1], y[1]),
                    vfmaq_f32(z[2], x[2], y[2]),
                    vfmaq_f32(z[3], x[3], y[3]),
                ]
            }
            #[inline(always)]
            unsafe fn store_f32(p: *mut f32, x: Quad<float32x4_t>) {
                vst1q_f32(p, x[0]);
                vst1q_f32(p.add(4), x[1]);
                vst1q_f32(p.add(8), x[2]);
                vst1q_f32(p.add(12), x[3]);
            }
        }
    };
}

neon_simd!(Neon, dot4_mull);
neon_simd!(Dotprod, dot4_sdot);
