//! The tile kernels in plain Rust (arrays of 16 lanes): the path for CPUs with no SIMD we
//! target, and a second, independent check of the tile layout against the reference.

use super::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Portable;

#[inline(always)]
fn map<T: Copy, const N: usize>(x: [T; N], f: impl Fn(T) -> T) -> [T; N] {
    x.map(f)
}

#[inline(always)]
fn zip<T: Copy, const N: usize>(x: [T; N], y: [T; N], f: impl Fn(T, T) -> T) -> [T; N] {
    std::array::from_fn(|i| f(x[i], y[i]))
}

// SAFETY: plain Rust on any CPU; pointers are read for exactly the stated sizes.
unsafe impl Simd for Portable {
    type U8 = [u8; 64];
    type I32 = [i32; 16];
    type F32 = [f32; 16];

    const ACCUMULATORS: usize = 4;
    const S8_BIAS: i32 = 0;

    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> [u8; 64] {
        std::ptr::read_unaligned(p.cast())
    }
    #[inline(always)]
    unsafe fn and_u8(x: [u8; 64], mask: u8) -> [u8; 64] {
        map(x, |v| v & mask)
    }
    #[inline(always)]
    unsafe fn or_u8(x: [u8; 64], y: [u8; 64]) -> [u8; 64] {
        zip(x, y, |a, b| a | b)
    }
    #[inline(always)]
    unsafe fn shr_u8(x: [u8; 64], n: u32, mask: u8) -> [u8; 64] {
        map(x, |v| (v >> n) & mask)
    }
    #[inline(always)]
    unsafe fn shl_u8(x: [u8; 64], n: u32, mask: u8) -> [u8; 64] {
        map(x, |v| (v << n) & mask)
    }
    #[inline(always)]
    unsafe fn dot_u(acc: [i32; 16], w: [u8; 64], a: i32) -> [i32; 16] {
        let a = a.to_le_bytes().map(|b| b as i8 as i32);
        std::array::from_fn(|r| {
            let w = &w[4 * r..4 * r + 4];
            acc[r] + (0..4).map(|k| w[k] as i32 * a[k]).sum::<i32>()
        })
    }
    #[inline(always)]
    unsafe fn dot_s8(acc: [i32; 16], w: [u8; 64], a: i32) -> [i32; 16] {
        let a = a.to_le_bytes().map(|b| b as i8 as i32);
        std::array::from_fn(|r| {
            let w = &w[4 * r..4 * r + 4];
            acc[r] + (0..4).map(|k| w[k] as i8 as i32 * a[k]).sum::<i32>()
        })
    }

    #[inline(always)]
    unsafe fn zero_i32() -> [i32; 16] {
        [0; 16]
    }
    #[inline(always)]
    unsafe fn splat_i32(v: i32) -> [i32; 16] {
        [v; 16]
    }
    #[inline(always)]
    unsafe fn add_i32(x: [i32; 16], y: [i32; 16]) -> [i32; 16] {
        zip(x, y, i32::wrapping_add)
    }
    #[inline(always)]
    unsafe fn sub_i32(x: [i32; 16], y: [i32; 16]) -> [i32; 16] {
        zip(x, y, i32::wrapping_sub)
    }
    #[inline(always)]
    unsafe fn madd16(acc: [i32; 16], x: [i32; 16], s: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|r| acc[r].wrapping_add(x[r].wrapping_mul(s[r])))
    }
    #[inline(always)]
    unsafe fn and_i32(x: [i32; 16], mask: i32) -> [i32; 16] {
        map(x, |v| v & mask)
    }
    #[inline(always)]
    unsafe fn or_i32(x: [i32; 16], y: [i32; 16]) -> [i32; 16] {
        zip(x, y, |a, b| a | b)
    }
    #[inline(always)]
    unsafe fn shr_i32(x: [i32; 16], n: u32) -> [i32; 16] {
        map(x, |v| ((v as u32) >> n) as i32)
    }
    #[inline(always)]
    unsafe fn shl_i32(x: [i32; 16], n: u32) -> [i32; 16] {
        map(x, |v| v << n)
    }
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> [i32; 16] {
        let b: [u8; 16] = std::ptr::read_unaligned(p.cast());
        b.map(|v| v as i32)
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> [i32; 16] {
        let b: [u8; 16] = std::ptr::read_unaligned(p.cast());
        b.map(|v| v as i8 as i32)
    }

    #[inline(always)]
    unsafe fn zero_f32() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn splat_f32(v: f32) -> [f32; 16] {
        [v; 16]
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> [f32; 16] {
        let b: [[u8; 2]; 16] = std::ptr::read_unaligned(p.cast());
        b.map(|h| half::f16::from_le_bytes(h).to_f32())
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> [f32; 16] {
        let b: [[u8; 2]; 16] = std::ptr::read_unaligned(p.cast());
        b.map(|h| half::bf16::from_le_bytes(h).to_f32())
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const u8) -> [f32; 16] {
        let b: [[u8; 4]; 16] = std::ptr::read_unaligned(p.cast());
        b.map(f32::from_le_bytes)
    }
    #[inline(always)]
    unsafe fn to_f32(x: [i32; 16]) -> [f32; 16] {
        x.map(|v| v as f32)
    }
    #[inline(always)]
    unsafe fn add_f32(x: [f32; 16], y: [f32; 16]) -> [f32; 16] {
        zip(x, y, |a, b| a + b)
    }
    #[inline(always)]
    unsafe fn mul_f32(x: [f32; 16], y: [f32; 16]) -> [f32; 16] {
        zip(x, y, |a, b| a * b)
    }
    #[inline(always)]
    unsafe fn fma_f32(x: [f32; 16], y: [f32; 16], z: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|i| x[i].mul_add(y[i], z[i]))
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, x: [f32; 16]) {
        std::ptr::write_unaligned(p.cast(), x)
    }
}
