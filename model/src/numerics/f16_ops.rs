//! The f16 vector routines of flash attention, one implementation per instruction set, all
//! computing ggml's AVX2 arithmetic: 4 accumulators of 8 lanes, reduced in its order. The NEON
//! version keeps the 8-lane structure in register pairs, so every path gives the same bits.

use half::f16;

/// # Safety
/// Implementations may use their instruction set; callers run them only where it exists.
pub(super) unsafe trait F16Ops {
    /// ggml's `ggml_vec_dot_f16`: 4 accumulators of 8 lanes over steps of 32, reduced pairwise,
    /// the tail (length not a multiple of 32) added in f64.
    unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32;
    /// `y = f16(y + x * v)` elementwise (ggml's `ggml_vec_mad_f16`).
    unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32);
    /// `y = f16(y * v)` elementwise (ggml's `ggml_vec_scale_f16`).
    unsafe fn scale_f16(y: &mut [f16], v: f32);

    /// The value pass of flash attention: for each value row with its weight `e` (the
    /// exponentiated score), `acc = f16(acc * e)` then `acc = f16(acc + row)` where the score
    /// raised the running maximum, else `acc = f16(acc + row * e)`. Rows past the scores are
    /// ignored.
    #[inline(always)]
    unsafe fn accumulate(acc: &mut [f16], values: &[f16], weights: &[f32], raised: &[bool]) {
        let hd = acc.len();
        for ((e, up), v) in weights.iter().zip(raised).zip(values.chunks_exact(hd)) {
            if *up {
                Self::scale_f16(acc, *e);
                Self::mad_f16(acc, v, 1.0);
            } else {
                Self::mad_f16(acc, v, *e);
            }
        }
    }
}

/// Plain Rust: the definition the others are tested against.
pub(super) struct Scalar;

/// The 8 lane sums of the 4 accumulators, reduced as ggml's AVX2 code reduces them.
#[inline(always)]
fn reduce(sum: [[f32; 8]; 4]) -> f32 {
    let s: [f32; 8] = std::array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let t0 = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

#[inline(always)]
fn tail_dot(x: &[f16], y: &[f16], from: usize, total: f32) -> f32 {
    let mut total = total as f64;
    for e in from..x.len().min(y.len()) {
        total += (x[e].to_f32() * y[e].to_f32()) as f64;
    }
    total as f32
}

// SAFETY: plain Rust.
unsafe impl F16Ops for Scalar {
    #[inline(always)]
    unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
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
        tail_dot(x, y, np, reduce(sum))
    }

    #[inline(always)]
    unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = f16::from_f32(x.to_f32().mul_add(v, y.to_f32()));
        }
    }

    #[inline(always)]
    unsafe fn scale_f16(y: &mut [f16], v: f32) {
        for y in y.iter_mut() {
            *y = f16::from_f32(y.to_f32() * v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{attend_x86, attend_x86_512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C.
    pub(in crate::numerics) struct Avx2;

    #[inline(always)]
    unsafe fn load(p: &[f16]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().cast()))
    }

    /// Eight halves from `p` (no bounds check: the caller keeps `p..p + 8` in bounds).
    #[inline(always)]
    unsafe fn load_at(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// The vector operations of the value pass, at one register width.
    trait Lanes: Copy {
        /// f32 lanes per register.
        const WIDTH: usize;
        /// `WIDTH` halves from `p` (the caller keeps them in bounds).
        unsafe fn load(p: *const f16) -> Self;
        /// The lanes to `WIDTH` halves at `p`, rounded to nearest even.
        unsafe fn store(self, p: *mut f16);
        unsafe fn splat(v: f32) -> Self;
        unsafe fn mul(self, m: Self) -> Self;
        /// `self * w + acc`, fused.
        unsafe fn mul_add(self, w: Self, acc: Self) -> Self;
        /// Rounded to f16 and back: what storing to and reloading from an f16 vector gives.
        unsafe fn round16(self) -> Self;
    }

    /// Eight f32 lanes (AVX2, F16C).
    #[derive(Clone, Copy)]
    struct Y8(__m256);

    /// Sixteen f32 lanes (AVX-512 F).
    #[derive(Clone, Copy)]
    struct Z16(__m512);

    impl Lanes for Y8 {
        const WIDTH: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f16) -> Self {
            Self(load_at(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f16) {
            _mm_storeu_si128(
                p.cast(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
            );
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn mul(self, m: Self) -> Self {
            Self(_mm256_mul_ps(self.0, m.0))
        }
        #[inline(always)]
        unsafe fn mul_add(self, w: Self, acc: Self) -> Self {
            Self(_mm256_fmadd_ps(self.0, w.0, acc.0))
        }
        #[inline(always)]
        unsafe fn round16(self) -> Self {
            Self(_mm256_cvtph_ps(
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
            ))
        }
    }

    impl Lanes for Z16 {
        const WIDTH: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f16) -> Self {
            Self(load16_at(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f16) {
            _mm256_storeu_si256(p.cast(), to_halves_512(self.0));
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn mul(self, m: Self) -> Self {
            Self(_mm512_mul_ps(self.0, m.0))
        }
        #[inline(always)]
        unsafe fn mul_add(self, w: Self, acc: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, w.0, acc.0))
        }
        #[inline(always)]
        unsafe fn round16(self) -> Self {
            Self(_mm512_cvtph_ps(to_halves_512(self.0)))
        }
    }

    /// Sixteen f32 to halves, rounding to nearest even (as F16C's conversion does).
    #[inline(always)]
    unsafe fn to_halves_512(x: __m512) -> __m256i {
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
    }

    /// [`F16Ops::accumulate`] with the accumulator in `N` registers of `L::WIDTH` lanes (`acc`
    /// holds `N * L::WIDTH` halves) instead of in memory. Each step rounds through f16 exactly
    /// as a store and a reload would, so the bits are the memory version's; what goes is the
    /// chain of stores, reloads and conversions per value row that bounded the loop (two
    /// thirds of a decode step's time at a 1,000-token context, measured with perf). The pass
    /// is elementwise, so the register width does not change a bit either.
    #[inline(always)]
    unsafe fn accumulate_in_registers<L: Lanes, const N: usize>(
        acc: &mut [f16],
        values: &[f16],
        weights: &[f32],
        raised: &[bool],
    ) {
        let hd = L::WIDTH * N;
        debug_assert_eq!(acc.len(), hd);
        let rows = weights.len().min(raised.len()).min(values.len() / hd);
        let mut a: [L; N] = std::array::from_fn(|c| L::load(acc.as_ptr().add(L::WIDTH * c)));
        let base = values.as_ptr();
        for r in 0..rows {
            let row = base.add(r * hd);
            let e = *weights.get_unchecked(r);
            let weight = if *raised.get_unchecked(r) {
                let m = L::splat(e);
                for x in a.iter_mut() {
                    *x = x.mul(m).round16();
                }
                L::splat(1.0)
            } else {
                L::splat(e)
            };
            for (c, x) in a.iter_mut().enumerate() {
                *x = L::load(row.add(L::WIDTH * c)).mul_add(weight, *x).round16();
            }
        }
        for (c, x) in a.iter().enumerate() {
            x.store(acc.as_mut_ptr().add(L::WIDTH * c));
        }
    }

    #[inline(always)]
    unsafe fn store(p: &mut [f16], v: __m256) {
        _mm_storeu_si128(
            p.as_mut_ptr().cast(),
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
        );
    }

    // SAFETY: instantiated only in `attend_x86`, compiled with these features and called only
    // when the CPU has them; every load/store covers 8 in-bounds halves.
    unsafe impl F16Ops for Avx2 {
        #[inline(always)]
        unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
            let n = x.len().min(y.len());
            let np = n - n % 32;
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            let mut sum = [_mm256_setzero_ps(); 4];
            for i in (0..np).step_by(32) {
                for (j, acc) in sum.iter_mut().enumerate() {
                    let o = i + j * 8;
                    *acc = _mm256_fmadd_ps(load_at(xp.add(o)), load_at(yp.add(o)), *acc);
                }
            }
            let s02 = _mm256_add_ps(sum[0], sum[2]);
            let s13 = _mm256_add_ps(sum[1], sum[3]);
            let s = _mm256_add_ps(s02, s13);
            let t0 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let t1 = _mm_hadd_ps(t0, t0);
            tail_dot(x, y, np, _mm_cvtss_f32(_mm_hadd_ps(t1, t1)))
        }

        #[inline(always)]
        unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
            let n = x.len().min(y.len());
            let np = n - n % 8;
            let vv = _mm256_set1_ps(v);
            for o in (0..np).step_by(8) {
                let r = _mm256_fmadd_ps(load(&x[o..o + 8]), vv, load(&y[o..o + 8]));
                store(&mut y[o..o + 8], r);
            }
            Scalar::mad_f16(&mut y[np..n], &x[np..n], v);
        }

        #[inline(always)]
        unsafe fn scale_f16(y: &mut [f16], v: f32) {
            let n = y.len();
            let np = n - n % 8;
            let vv = _mm256_set1_ps(v);
            for o in (0..np).step_by(8) {
                let r = _mm256_mul_ps(load(&y[o..o + 8]), vv);
                store(&mut y[o..o + 8], r);
            }
            Scalar::scale_f16(&mut y[np..n], v);
        }

        #[inline(always)]
        unsafe fn accumulate(acc: &mut [f16], values: &[f16], weights: &[f32], raised: &[bool]) {
            // Head sizes of the supported families (64, 80, 96, 128); others, and any size
            // not a multiple of 8, take the memory version.
            match acc.len() {
                32 => accumulate_in_registers::<Y8, 4>(acc, values, weights, raised),
                64 => accumulate_in_registers::<Y8, 8>(acc, values, weights, raised),
                80 => accumulate_in_registers::<Y8, 10>(acc, values, weights, raised),
                96 => accumulate_in_registers::<Y8, 12>(acc, values, weights, raised),
                128 => accumulate_in_registers::<Y8, 16>(acc, values, weights, raised),
                hd => {
                    for ((e, up), v) in weights.iter().zip(raised).zip(values.chunks_exact(hd)) {
                        if *up {
                            Self::scale_f16(acc, *e);
                            Self::mad_f16(acc, v, 1.0);
                        } else {
                            Self::mad_f16(acc, v, *e);
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::numerics) unsafe fn attend_x86(
        args: &super::super::Attend,
        scratch: &mut super::super::AttendScratch,
        out: &mut [f32],
    ) {
        super::super::attend_body::<Avx2>(args, scratch, out)
    }

    /// AVX-512 F: [`Avx2`]'s arithmetic on two of its 8-lane vectors per register. The dot
    /// product's accumulators 0|1 and 2|3 share a register each and are reduced in the same
    /// order; the value pass is elementwise, so its width does not change a bit.
    pub(in crate::numerics) struct Avx512;

    /// Sixteen halves from `p` (the caller keeps `p..p + 16` in bounds).
    #[inline(always)]
    unsafe fn load16_at(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    // SAFETY: instantiated only in `attend_x86_512`, compiled with AVX-512 F, AVX2, FMA and
    // F16C and called only when the CPU has them; every load/store is in bounds.
    unsafe impl F16Ops for Avx512 {
        #[inline(always)]
        unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
            let n = x.len().min(y.len());
            let np = n - n % 32;
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            // Lanes 0-7 and 8-15 of `lo` are Avx2's accumulators 0 and 1, of `hi` 2 and 3.
            let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in (0..np).step_by(32) {
                lo = _mm512_fmadd_ps(load16_at(xp.add(i)), load16_at(yp.add(i)), lo);
                hi = _mm512_fmadd_ps(load16_at(xp.add(i + 16)), load16_at(yp.add(i + 16)), hi);
            }
            // (0 + 2) | (1 + 3), then (0 + 2) + (1 + 3): Avx2's s02, s13 and s.
            let pairs = _mm512_add_ps(lo, hi);
            let s = _mm256_add_ps(
                _mm512_castps512_ps256(pairs),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(pairs))),
            );
            let t0 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let t1 = _mm_hadd_ps(t0, t0);
            tail_dot(x, y, np, _mm_cvtss_f32(_mm_hadd_ps(t1, t1)))
        }

        #[inline(always)]
        unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
            Avx2::mad_f16(y, x, v)
        }

        #[inline(always)]
        unsafe fn scale_f16(y: &mut [f16], v: f32) {
            Avx2::scale_f16(y, v)
        }

        #[inline(always)]
        unsafe fn accumulate(acc: &mut [f16], values: &[f16], weights: &[f32], raised: &[bool]) {
            match acc.len() {
                32 => accumulate_in_registers::<Z16, 2>(acc, values, weights, raised),
                64 => accumulate_in_registers::<Z16, 4>(acc, values, weights, raised),
                80 => accumulate_in_registers::<Z16, 5>(acc, values, weights, raised),
                96 => accumulate_in_registers::<Z16, 6>(acc, values, weights, raised),
                128 => accumulate_in_registers::<Z16, 8>(acc, values, weights, raised),
                256 => accumulate_in_registers::<Z16, 16>(acc, values, weights, raised),
                _ => Avx2::accumulate(acc, values, weights, raised),
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(in crate::numerics) unsafe fn attend_x86_512(
        args: &super::super::Attend,
        scratch: &mut super::super::AttendScratch,
        out: &mut [f32],
    ) {
        super::super::attend_body::<Avx512>(args, scratch, out)
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) use arm::attend_arm;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// Advanced SIMD (every aarch64 CPU).
    pub(in crate::numerics) struct Neon;

    /// Eight halves as two f32x4 (`fcvtl`, exact; its intrinsic is not stable yet).
    #[inline(always)]
    unsafe fn load(p: &[f16]) -> (float32x4_t, float32x4_t) {
        let h = vld1q_u16(p.as_ptr().cast());
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) lo, in(vreg) vget_low_u16(h),
             options(pure, nomem, nostack));
        asm!("fcvtl2 {0:v}.4s, {1:v}.8h", out(vreg) hi, in(vreg) h,
             options(pure, nomem, nostack));
        (lo, hi)
    }

    /// Eight f32 to halves, rounding to nearest even (`fcvtn`, as F16C's conversion does).
    #[inline(always)]
    unsafe fn store(p: &mut [f16], (lo, hi): (float32x4_t, float32x4_t)) {
        let (a, b): (uint16x4_t, uint16x4_t);
        asm!("fcvtn {0:v}.4h, {1:v}.4s", out(vreg) a, in(vreg) lo, options(pure, nomem, nostack));
        asm!("fcvtn {0:v}.4h, {1:v}.4s", out(vreg) b, in(vreg) hi, options(pure, nomem, nostack));
        vst1q_u16(p.as_mut_ptr().cast(), vcombine_u16(a, b));
    }

    // SAFETY: NEON is part of every aarch64 CPU; loads/stores cover 8 in-bounds halves.
    unsafe impl F16Ops for Neon {
        #[inline(always)]
        unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
            let n = x.len().min(y.len());
            let np = n - n % 32;
            let mut sum = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); 4];
            for i in (0..np).step_by(32) {
                for (j, acc) in sum.iter_mut().enumerate() {
                    let o = i + j * 8;
                    let (xl, xh) = load(&x[o..o + 8]);
                    let (yl, yh) = load(&y[o..o + 8]);
                    *acc = (vfmaq_f32(acc.0, xl, yl), vfmaq_f32(acc.1, xh, yh));
                }
            }
            // Lanes l and l + 4 of ggml's 8-lane vector are `.0[l]` and `.1[l]` here.
            let lo = vaddq_f32(vaddq_f32(sum[0].0, sum[2].0), vaddq_f32(sum[1].0, sum[3].0));
            let hi = vaddq_f32(vaddq_f32(sum[0].1, sum[2].1), vaddq_f32(sum[1].1, sum[3].1));
            let t0 = vaddq_f32(lo, hi);
            let t1 = vpaddq_f32(t0, t0);
            tail_dot(x, y, np, vgetq_lane_f32::<0>(vpaddq_f32(t1, t1)))
        }

        #[inline(always)]
        unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
            let n = x.len().min(y.len());
            let np = n - n % 8;
            let vv = vdupq_n_f32(v);
            for o in (0..np).step_by(8) {
                let (xl, xh) = load(&x[o..o + 8]);
                let (yl, yh) = load(&y[o..o + 8]);
                store(
                    &mut y[o..o + 8],
                    (vfmaq_f32(yl, xl, vv), vfmaq_f32(yh, xh, vv)),
                );
            }
            Scalar::mad_f16(&mut y[np..n], &x[np..n], v);
        }

        #[inline(always)]
        unsafe fn scale_f16(y: &mut [f16], v: f32) {
            let n = y.len();
            let np = n - n % 8;
            let vv = vdupq_n_f32(v);
            for o in (0..np).step_by(8) {
                let (l, h) = load(&y[o..o + 8]);
                store(&mut y[o..o + 8], (vmulq_f32(l, vv), vmulq_f32(h, vv)));
            }
            Scalar::scale_f16(&mut y[np..n], v);
        }
    }

    /// # Safety
    /// An aarch64 CPU (NEON is mandatory there).
    #[target_feature(enable = "neon")]
    pub(in crate::numerics) unsafe fn attend_arm(
        args: &super::super::Attend,
        scratch: &mut super::super::AttendScratch,
        out: &mut [f32],
    ) {
        super::super::attend_body::<Neon>(args, scratch, out)
    }
}
