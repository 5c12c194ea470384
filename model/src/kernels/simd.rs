//! The vector operations the tile kernels are written in, one implementation per instruction
//! set. A vector holds one value per row of a tile (16 lanes), so no operation ever combines
//! lanes: the order of float operations per row is the kernel's, whatever the hardware width.
//!
//! Every method is `#[inline(always)]` and carries no target features itself: the kernels are
//! instantiated inside `#[target_feature]` entry points, into which all of this inlines.

/// Instruction-set primitives over 16 lanes (one per tile row).
///
/// # Safety
/// Methods may use instructions of the implementing instruction set; callers must run them only
/// on CPUs that have it (the dispatcher checks), and pointers must be valid for the stated sizes.
pub(crate) unsafe trait Simd: Copy {
    /// 64 bytes: four bytes of each of the 16 rows (`[row][4]`).
    type U8: Copy;
    /// One i32 per row.
    type I32: Copy;
    /// One f32 per row.
    type F32: Copy;

    /// Accumulator vectors the kernels may keep in registers (16-lane vectors: 8 with 32 AVX-512
    /// registers; 4 where a vector takes two or four registers).
    const ACCUMULATORS: usize;
    /// What `dot_s8` adds to each signed weight byte before multiplying; the kernel subtracts
    /// `S8_BIAS * sum(a)` afterwards (AVX-512 VNNI multiplies unsigned by signed bytes only).
    const S8_BIAS: i32;

    /// Asks for the cache line at `p` ahead of its use (a hint: never faults, any address).
    unsafe fn prefetch(p: *const u8);
    /// Loads 64 bytes.
    unsafe fn load_u8(p: *const u8) -> Self::U8;
    unsafe fn and_u8(x: Self::U8, mask: u8) -> Self::U8;
    unsafe fn or_u8(x: Self::U8, y: Self::U8) -> Self::U8;
    /// `(x >> n) & mask` per byte; `mask` must lie within `0xFF >> n`.
    unsafe fn shr_u8(x: Self::U8, n: u32, mask: u8) -> Self::U8;
    /// `(x << n) & mask` per byte; `mask` must lie within `0xFF << n`.
    unsafe fn shl_u8(x: Self::U8, n: u32, mask: u8) -> Self::U8;
    /// `acc + sum_k w[row][k] * a[k]` with `w` bytes in 0..=127 and `a` four signed bytes.
    unsafe fn dot_u(acc: Self::I32, w: Self::U8, a: i32) -> Self::I32;
    /// `acc + sum_k (w[row][k] + S8_BIAS) * a[k]` with `w` signed bytes.
    unsafe fn dot_s8(acc: Self::I32, w: Self::U8, a: i32) -> Self::I32;

    unsafe fn zero_i32() -> Self::I32;
    unsafe fn splat_i32(v: i32) -> Self::I32;
    unsafe fn add_i32(x: Self::I32, y: Self::I32) -> Self::I32;
    unsafe fn sub_i32(x: Self::I32, y: Self::I32) -> Self::I32;
    /// A multiplier `s` (`|s| < 2^15`) in the form [`Simd::madd16`] and [`Simd::dot_u_scaled`]
    /// take, made once per tile. The K-quants multiply every block's dot products by a sub-block
    /// scale: a 32-bit multiply there (`vpmulld`: two micro-ops, ten cycles of latency) cost more
    /// than the byte products themselves, while a 16-bit one fuses with the add
    /// (`vpdpwssd`, `vpmaddwd`).
    #[inline(always)]
    unsafe fn scale16(s: Self::I32) -> Self::I32 {
        s
    }
    /// `acc + x * s`, exactly, for `x` in i16 range and `s` from [`Simd::scale16`].
    unsafe fn madd16(acc: Self::I32, x: Self::I32, s: Self::I32) -> Self::I32;
    /// `acc + s * sum_k w[row][k] * a[k]` with `w` bytes in 0..=63 (so the sum fits in 16 bits)
    /// and `s` from [`Simd::scale16`].
    #[inline(always)]
    unsafe fn dot_u_scaled(acc: Self::I32, w: Self::U8, a: i32, s: Self::I32) -> Self::I32 {
        Self::madd16(acc, Self::dot_u(Self::zero_i32(), w, a), s)
    }
    /// `acc + sum_k w[row][k] * a[k]` in a short sum: at most eight calls from
    /// [`Simd::zero_i32`], with weights below 16 and `|a[k]| <= 127`, then [`Simd::short_end`].
    /// Within those bounds every partial sum fits in 16 bits, which AVX2 uses to add the
    /// `vpmaddubsw` products directly and widen once per block instead of once per call.
    #[inline(always)]
    unsafe fn dot_u_short(acc: Self::I32, w: Self::U8, a: i32) -> Self::I32 {
        Self::dot_u(acc, w, a)
    }
    /// The exact total of a short sum (see [`Simd::dot_u_short`]).
    #[inline(always)]
    unsafe fn short_end(acc: Self::I32) -> Self::I32 {
        acc
    }
    unsafe fn and_i32(x: Self::I32, mask: i32) -> Self::I32;
    unsafe fn or_i32(x: Self::I32, y: Self::I32) -> Self::I32;
    /// Logical shifts.
    unsafe fn shr_i32(x: Self::I32, n: u32) -> Self::I32;
    unsafe fn shl_i32(x: Self::I32, n: u32) -> Self::I32;
    /// 16 bytes, zero-extended.
    unsafe fn widen_u8(p: *const u8) -> Self::I32;
    /// 16 bytes, sign-extended.
    unsafe fn widen_i8(p: *const u8) -> Self::I32;

    unsafe fn zero_f32() -> Self::F32;
    unsafe fn splat_f32(v: f32) -> Self::F32;
    /// 16 little-endian f16 values (exact conversion).
    unsafe fn load_f16(p: *const u8) -> Self::F32;
    /// 16 little-endian bf16 values (exact conversion).
    unsafe fn load_bf16(p: *const u8) -> Self::F32;
    /// 16 little-endian f32 values.
    unsafe fn load_f32(p: *const u8) -> Self::F32;
    /// Round to nearest, ties to even.
    unsafe fn to_f32(x: Self::I32) -> Self::F32;
    unsafe fn add_f32(x: Self::F32, y: Self::F32) -> Self::F32;
    unsafe fn mul_f32(x: Self::F32, y: Self::F32) -> Self::F32;
    /// `x * y + z`, rounded once.
    unsafe fn fma_f32(x: Self::F32, y: Self::F32, z: Self::F32) -> Self::F32;
    unsafe fn store_f32(p: *mut f32, x: Self::F32);
}
