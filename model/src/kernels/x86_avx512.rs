//! AVX-512 (F, BW, VL, VNNI): one 512-bit register per tile, `vpdpbusd` for the byte products.

use std::arch::x86_64::*;

use super::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

#[inline(always)]
unsafe fn count(n: u32) -> __m128i {
    _mm_cvtsi32_si128(n as i32)
}

// SAFETY: only instantiated inside functions compiled with the AVX-512 features (see `kernels::entries`), which the
// dispatcher calls only when the CPU reports them; loads/stores are unaligned and in bounds.
unsafe impl Simd for Avx512 {
    type U8 = __m512i;
    type I32 = __m512i;
    type F32 = __m512;

    const ACCUMULATORS: usize = 8;
    const S8_BIAS: i32 = 128;

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p.cast())
    }
    #[inline(always)]
    unsafe fn and_u8(x: __m512i, mask: u8) -> __m512i {
        _mm512_and_si512(x, _mm512_set1_epi8(mask as i8))
    }
    #[inline(always)]
    unsafe fn or_u8(x: __m512i, y: __m512i) -> __m512i {
        _mm512_or_si512(x, y)
    }
    #[inline(always)]
    unsafe fn shr_u8(x: __m512i, n: u32, mask: u8) -> __m512i {
        Self::and_u8(_mm512_srl_epi16(x, count(n)), mask)
    }
    #[inline(always)]
    unsafe fn shl_u8(x: __m512i, n: u32, mask: u8) -> __m512i {
        Self::and_u8(_mm512_sll_epi16(x, count(n)), mask)
    }
    #[inline(always)]
    unsafe fn dot_u(acc: __m512i, w: __m512i, a: i32) -> __m512i {
        _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(a))
    }
    #[inline(always)]
    unsafe fn dot_s8(acc: __m512i, w: __m512i, a: i32) -> __m512i {
        // w + 128 as unsigned bytes; the kernel subtracts 128 * sum(a).
        let u = _mm512_xor_si512(w, _mm512_set1_epi8(-128));
        _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(a))
    }

    #[inline(always)]
    unsafe fn zero_i32() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn splat_i32(v: i32) -> __m512i {
        _mm512_set1_epi32(v)
    }
    #[inline(always)]
    unsafe fn add_i32(x: __m512i, y: __m512i) -> __m512i {
        _mm512_add_epi32(x, y)
    }
    #[inline(always)]
    unsafe fn sub_i32(x: __m512i, y: __m512i) -> __m512i {
        _mm512_sub_epi32(x, y)
    }
    /// `s` in the low 16 bits of each lane, zeros above: `vpdpwssd` then adds `x_lo * s` plus
    /// `x_hi * 0`, whatever the sign bits in `x`'s upper half.
    #[inline(always)]
    unsafe fn scale16(s: __m512i) -> __m512i {
        _mm512_and_si512(s, _mm512_set1_epi32(0xFFFF))
    }
    #[inline(always)]
    unsafe fn madd16(acc: __m512i, x: __m512i, s: __m512i) -> __m512i {
        _mm512_dpwssd_epi32(acc, x, s)
    }
    #[inline(always)]
    unsafe fn and_i32(x: __m512i, mask: i32) -> __m512i {
        _mm512_and_si512(x, _mm512_set1_epi32(mask))
    }
    #[inline(always)]
    unsafe fn or_i32(x: __m512i, y: __m512i) -> __m512i {
        _mm512_or_si512(x, y)
    }
    #[inline(always)]
    unsafe fn shr_i32(x: __m512i, n: u32) -> __m512i {
        _mm512_srl_epi32(x, count(n))
    }
    #[inline(always)]
    unsafe fn shl_i32(x: __m512i, n: u32) -> __m512i {
        _mm512_sll_epi32(x, count(n))
    }
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))
    }

    #[inline(always)]
    unsafe fn zero_f32() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat_f32(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> __m512 {
        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const u8) -> __m512 {
        _mm512_loadu_ps(p.cast())
    }
    #[inline(always)]
    unsafe fn to_f32(x: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(x)
    }
    #[inline(always)]
    unsafe fn add_f32(x: __m512, y: __m512) -> __m512 {
        _mm512_add_ps(x, y)
    }
    #[inline(always)]
    unsafe fn mul_f32(x: __m512, y: __m512) -> __m512 {
        _mm512_mul_ps(x, y)
    }
    #[inline(always)]
    unsafe fn fma_f32(x: __m512, y: __m512, z: __m512) -> __m512 {
        _mm512_fmadd_ps(x, y, z)
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, x: __m512) {
        _mm512_storeu_ps(p, x)
    }
}
