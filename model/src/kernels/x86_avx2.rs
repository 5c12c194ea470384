//! AVX2 + FMA + F16C: a tile in two 256-bit halves (rows 0..8 and 8..16); byte products with
//! `vpmaddubsw` + `vpmaddwd`, as ggml's AVX2 kernels do.

use std::arch::x86_64::*;

use super::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

type Pair<T> = [T; 2];

#[inline(always)]
unsafe fn count(n: u32) -> __m128i {
    _mm_cvtsi32_si128(n as i32)
}

/// `[f(x[0], args..), f(x[1], args..)]`, written out: closures would not inline the intrinsics.
macro_rules! each {
    ($f:ident, $x:expr $(, $arg:expr)*) => {{
        let x = $x;
        [$f(x[0] $(, $arg)*), $f(x[1] $(, $arg)*)]
    }};
}

/// `[f(x[0], y[0]), f(x[1], y[1])]`.
macro_rules! both {
    ($f:ident, $x:expr, $y:expr) => {{
        let (x, y) = ($x, $y);
        [$f(x[0], y[0]), $f(x[1], y[1])]
    }};
}

/// Eight bf16 values as f32 (a bf16 is the upper half of an f32).
#[inline(always)]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
}

/// Signed bytes `w` times signed bytes `a`, summed by four: `|w|` times `a` with `w`'s sign,
/// ggml's trick to feed signed bytes to an unsigned multiply.
#[inline(always)]
unsafe fn madd4_signed(w: __m256i, a: __m256i) -> __m256i {
    madd4(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
}

/// `sum of 4 adjacent u8 * i8 products` per i32 lane, exact for the operand ranges used here
/// (the pairwise i16 sums of `vpmaddubsw` stay below 2^15: unsigned weights are below 128, and
/// signed ones reach it only through `dot_s8`, whose |w| <= 128 by |a| <= 127 pairs give 32512).
#[inline(always)]
unsafe fn madd4(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

// SAFETY: only instantiated inside functions compiled with the AVX2 features (see `kernels::entries`), which the
// dispatcher calls only when the CPU reports them; loads/stores are unaligned and in bounds.
unsafe impl Simd for Avx2 {
    type U8 = Pair<__m256i>;
    type I32 = Pair<__m256i>;
    type F32 = Pair<__m256>;

    const ACCUMULATORS: usize = 4;
    const S8_BIAS: i32 = 0;

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> Pair<__m256i> {
        [
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(32).cast()),
        ]
    }
    #[inline(always)]
    unsafe fn and_u8(x: Pair<__m256i>, mask: u8) -> Pair<__m256i> {
        let m = _mm256_set1_epi8(mask as i8);
        each!(_mm256_and_si256, x, m)
    }
    #[inline(always)]
    unsafe fn or_u8(x: Pair<__m256i>, y: Pair<__m256i>) -> Pair<__m256i> {
        both!(_mm256_or_si256, x, y)
    }
    #[inline(always)]
    unsafe fn shr_u8(x: Pair<__m256i>, n: u32, mask: u8) -> Pair<__m256i> {
        Self::and_u8(each!(_mm256_srl_epi16, x, count(n)), mask)
    }
    #[inline(always)]
    unsafe fn shl_u8(x: Pair<__m256i>, n: u32, mask: u8) -> Pair<__m256i> {
        Self::and_u8(each!(_mm256_sll_epi16, x, count(n)), mask)
    }
    #[inline(always)]
    unsafe fn dot_u(acc: Pair<__m256i>, w: Pair<__m256i>, a: i32) -> Pair<__m256i> {
        let a = _mm256_set1_epi32(a);
        [
            _mm256_add_epi32(acc[0], madd4(w[0], a)),
            _mm256_add_epi32(acc[1], madd4(w[1], a)),
        ]
    }
    #[inline(always)]
    unsafe fn dot_s8(acc: Pair<__m256i>, w: Pair<__m256i>, a: i32) -> Pair<__m256i> {
        let a = _mm256_set1_epi32(a);
        [
            _mm256_add_epi32(acc[0], madd4_signed(w[0], a)),
            _mm256_add_epi32(acc[1], madd4_signed(w[1], a)),
        ]
    }

    #[inline(always)]
    unsafe fn zero_i32() -> Pair<__m256i> {
        [_mm256_setzero_si256(); 2]
    }
    #[inline(always)]
    unsafe fn splat_i32(v: i32) -> Pair<__m256i> {
        [_mm256_set1_epi32(v); 2]
    }
    #[inline(always)]
    unsafe fn add_i32(x: Pair<__m256i>, y: Pair<__m256i>) -> Pair<__m256i> {
        both!(_mm256_add_epi32, x, y)
    }
    #[inline(always)]
    unsafe fn sub_i32(x: Pair<__m256i>, y: Pair<__m256i>) -> Pair<__m256i> {
        both!(_mm256_sub_epi32, x, y)
    }
    /// `s` in both 16-bit halves of each lane: `vpmaddwd` of the pairwise sums of `vpmaddubsw`
    /// with it is `s` times their total, so a scaled dot product is two instructions.
    #[inline(always)]
    unsafe fn scale16(s: Pair<__m256i>) -> Pair<__m256i> {
        let lo = Self::and_i32(s, 0xFFFF);
        Self::or_i32(lo, Self::shl_i32(lo, 16))
    }
    #[inline(always)]
    unsafe fn madd16(acc: Pair<__m256i>, x: Pair<__m256i>, s: Pair<__m256i>) -> Pair<__m256i> {
        // Only `x`'s low half is a factor (its upper half may hold sign bits).
        let x = Self::and_i32(x, 0xFFFF);
        Self::add_i32(acc, both!(_mm256_madd_epi16, x, s))
    }
    #[inline(always)]
    unsafe fn dot_u_scaled(
        acc: Pair<__m256i>,
        w: Pair<__m256i>,
        a: i32,
        s: Pair<__m256i>,
    ) -> Pair<__m256i> {
        // The pairwise i16 sums stay below 2 * 63 * 128 (weights below 64), so nothing saturates.
        let a = _mm256_set1_epi32(a);
        [
            _mm256_add_epi32(
                acc[0],
                _mm256_madd_epi16(_mm256_maddubs_epi16(w[0], a), s[0]),
            ),
            _mm256_add_epi32(
                acc[1],
                _mm256_madd_epi16(_mm256_maddubs_epi16(w[1], a), s[1]),
            ),
        ]
    }
    #[inline(always)]
    unsafe fn dot_u_short(acc: Pair<__m256i>, w: Pair<__m256i>, a: i32) -> Pair<__m256i> {
        // 16-bit partial sums: eight calls of pairs of at most 15 * 127 stay below 2^15.
        let a = _mm256_set1_epi32(a);
        [
            _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(w[0], a)),
            _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(w[1], a)),
        ]
    }
    #[inline(always)]
    unsafe fn short_end(acc: Pair<__m256i>) -> Pair<__m256i> {
        let ones = _mm256_set1_epi16(1);
        [
            _mm256_madd_epi16(acc[0], ones),
            _mm256_madd_epi16(acc[1], ones),
        ]
    }
    #[inline(always)]
    unsafe fn and_i32(x: Pair<__m256i>, mask: i32) -> Pair<__m256i> {
        let m = _mm256_set1_epi32(mask);
        each!(_mm256_and_si256, x, m)
    }
    #[inline(always)]
    unsafe fn or_i32(x: Pair<__m256i>, y: Pair<__m256i>) -> Pair<__m256i> {
        both!(_mm256_or_si256, x, y)
    }
    #[inline(always)]
    unsafe fn shr_i32(x: Pair<__m256i>, n: u32) -> Pair<__m256i> {
        each!(_mm256_srl_epi32, x, count(n))
    }
    #[inline(always)]
    unsafe fn shl_i32(x: Pair<__m256i>, n: u32) -> Pair<__m256i> {
        each!(_mm256_sll_epi32, x, count(n))
    }
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> Pair<__m256i> {
        [
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast())),
        ]
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> Pair<__m256i> {
        [
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())),
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast())),
        ]
    }

    #[inline(always)]
    unsafe fn zero_f32() -> Pair<__m256> {
        [_mm256_setzero_ps(); 2]
    }
    #[inline(always)]
    unsafe fn splat_f32(v: f32) -> Pair<__m256> {
        [_mm256_set1_ps(v); 2]
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> Pair<__m256> {
        [
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
        ]
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> Pair<__m256> {
        [bf16x8(p), bf16x8(p.add(16))]
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const u8) -> Pair<__m256> {
        [_mm256_loadu_ps(p.cast()), _mm256_loadu_ps(p.add(32).cast())]
    }
    #[inline(always)]
    unsafe fn to_f32(x: Pair<__m256i>) -> Pair<__m256> {
        each!(_mm256_cvtepi32_ps, x)
    }
    #[inline(always)]
    unsafe fn add_f32(x: Pair<__m256>, y: Pair<__m256>) -> Pair<__m256> {
        both!(_mm256_add_ps, x, y)
    }
    #[inline(always)]
    unsafe fn mul_f32(x: Pair<__m256>, y: Pair<__m256>) -> Pair<__m256> {
        both!(_mm256_mul_ps, x, y)
    }
    #[inline(always)]
    unsafe fn fma_f32(x: Pair<__m256>, y: Pair<__m256>, z: Pair<__m256>) -> Pair<__m256> {
        [
            _mm256_fmadd_ps(x[0], y[0], z[0]),
            _mm256_fmadd_ps(x[1], y[1], z[1]),
        ]
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, x: Pair<__m256>) {
        _mm256_storeu_ps(p, x[0]);
        _mm256_storeu_ps(p.add(8), x[1]);
    }
}
