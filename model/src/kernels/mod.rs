//! Matrix products for every weight format of common GGUF files, on every CPU a home device has,
//! with one canonical arithmetic.
//!
//! Data flow: a weight matrix is packed once at load into 16-row tiles ([`pack`]); each input is
//! quantized once into the form its formats read ([`act`]); a tile kernel ([`tiles`], written
//! once over the vector primitives of [`simd`]) computes 16 rows for a few tokens at a time; the
//! instruction set is chosen at run time ([`cpu`]) among AVX-512, AVX2, NEON (with or without
//! the dot-product extension) and portable code. [`reference`] is the plain definition all of
//! them reproduce bit for bit, so honest peers on different CPUs compute identical hidden states.
//!
//! Hand-written rather than candle's kernels: candle's Q4_1 is scalar, its K-quant kernels are
//! chosen at compile time and accumulate in an order that differs per instruction set.

pub mod act;
pub mod cpu;
pub mod formats;
pub mod pack;
pub mod reference;
mod simd;
mod tiles;

#[cfg(target_arch = "aarch64")]
mod arm_neon;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use std::ops::Range;

pub use act::{ActKind, Activations};
pub use cpu::Isa;
pub use formats::WeightFormat;
pub use pack::{Packed, TILE};
use tiles::Out;

/// One entry point per format for an instruction set, each compiled with that set's features
/// so the generic kernel and every primitive inline into it.
macro_rules! entries {
    ($module:ident, $simd:ty, $features:literal) => {
        mod $module {
            use super::tiles::{self, drive, Out, Q};
            use super::{Activations, Packed, WeightFormat};
            use std::ops::Range;

            macro_rules! entry {
                ($name:ident, $kernel:ty) => {
                    #[target_feature(enable = $features)]
                    unsafe fn $name(p: &Packed, a: &Activations, t: Range<usize>, out: Out) {
                        drive::<$simd, $kernel>(p, a, t, out)
                    }
                };
            }
            entry!(f32, tiles::F32);
            entry!(f16, tiles::F16);
            entry!(bf16, tiles::BF16);
            entry!(q4_0, Q<tiles::Q4_0>);
            entry!(q4_1, Q<tiles::Q4_1>);
            entry!(q5_0, Q<tiles::Q5_0>);
            entry!(q5_1, Q<tiles::Q5_1>);
            entry!(q8_0, Q<tiles::Q8_0>);
            entry!(q2k, Q<tiles::Q2K>);
            entry!(q3k, Q<tiles::Q3K>);
            entry!(q4k, Q<tiles::Q4K>);
            entry!(q5k, Q<tiles::Q5K>);
            entry!(q6k, Q<tiles::Q6K>);

            /// # Safety
            /// The CPU has this module's features; see [`tiles::drive`].
            pub(super) unsafe fn run(p: &Packed, a: &Activations, t: Range<usize>, out: Out) {
                match p.format {
                    WeightFormat::F32 => f32(p, a, t, out),
                    WeightFormat::F16 => f16(p, a, t, out),
                    WeightFormat::BF16 => bf16(p, a, t, out),
                    WeightFormat::Q4_0 => q4_0(p, a, t, out),
                    WeightFormat::Q4_1 => q4_1(p, a, t, out),
                    WeightFormat::Q5_0 => q5_0(p, a, t, out),
                    WeightFormat::Q5_1 => q5_1(p, a, t, out),
                    WeightFormat::Q8_0 => q8_0(p, a, t, out),
                    WeightFormat::Q2K => q2k(p, a, t, out),
                    WeightFormat::Q3K => q3k(p, a, t, out),
                    WeightFormat::Q4K => q4k(p, a, t, out),
                    WeightFormat::Q5K => q5k(p, a, t, out),
                    WeightFormat::Q6K => q6k(p, a, t, out),
                }
            }
        }
    };
}

// Portable code gets no features: it must run on the architecture's baseline.
mod portable_entries {
    use super::portable::Portable;
    use super::tiles::{self, drive, Out};
    use super::{Activations, Packed, WeightFormat};
    use std::ops::Range;

    /// # Safety
    /// See [`tiles::drive`].
    pub(super) unsafe fn run(p: &Packed, a: &Activations, t: Range<usize>, out: Out) {
        match p.format {
            WeightFormat::F32 => drive::<Portable, tiles::F32>(p, a, t, out),
            WeightFormat::F16 => drive::<Portable, tiles::F16>(p, a, t, out),
            WeightFormat::BF16 => drive::<Portable, tiles::BF16>(p, a, t, out),
            WeightFormat::Q4_0 => drive::<Portable, tiles::Q<tiles::Q4_0>>(p, a, t, out),
            WeightFormat::Q4_1 => drive::<Portable, tiles::Q<tiles::Q4_1>>(p, a, t, out),
            WeightFormat::Q5_0 => drive::<Portable, tiles::Q<tiles::Q5_0>>(p, a, t, out),
            WeightFormat::Q5_1 => drive::<Portable, tiles::Q<tiles::Q5_1>>(p, a, t, out),
            WeightFormat::Q8_0 => drive::<Portable, tiles::Q<tiles::Q8_0>>(p, a, t, out),
            WeightFormat::Q2K => drive::<Portable, tiles::Q<tiles::Q2K>>(p, a, t, out),
            WeightFormat::Q3K => drive::<Portable, tiles::Q<tiles::Q3K>>(p, a, t, out),
            WeightFormat::Q4K => drive::<Portable, tiles::Q<tiles::Q4K>>(p, a, t, out),
            WeightFormat::Q5K => drive::<Portable, tiles::Q<tiles::Q5K>>(p, a, t, out),
            WeightFormat::Q6K => drive::<Portable, tiles::Q<tiles::Q6K>>(p, a, t, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86_avx2::Avx2;
#[cfg(target_arch = "x86_64")]
use x86_avx512::Avx512;
#[cfg(target_arch = "x86_64")]
entries!(
    avx512_entries,
    super::Avx512,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
);
#[cfg(target_arch = "x86_64")]
entries!(avx2_entries, super::Avx2, "avx2,fma,f16c");

#[cfg(target_arch = "aarch64")]
use arm_neon::{Dotprod, Neon};
#[cfg(target_arch = "aarch64")]
entries!(neon_entries, super::Neon, "neon");
#[cfg(target_arch = "aarch64")]
entries!(dotprod_entries, super::Dotprod, "neon,dotprod");

/// Computes tiles `tiles` of `p` for every token of `acts` on instruction set `isa`, writing
/// `out[token * p.rows + row]`.
///
/// # Safety
/// `out` must hold `acts.tokens * p.rows` floats, and no other thread may touch the rows of
/// these tiles while this runs. `acts` must have `p.cols` columns with the form
/// `ActKind::of(p.format)` prepared.
pub(crate) unsafe fn gemm_tiles(
    isa: Isa,
    p: &Packed,
    acts: &Activations,
    tiles: Range<usize>,
    out: *mut f32,
) {
    let out = Out {
        ptr: out,
        rows: p.rows,
    };
    debug_assert!(isa.supported());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512_entries::run(p, acts, tiles, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_entries::run(p, acts, tiles, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Dotprod => dotprod_entries::run(p, acts, tiles, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon_entries::run(p, acts, tiles, out),
        _ => portable_entries::run(p, acts, tiles, out),
    }
}

/// `out = p · x` for every token of `acts`, single-threaded, on `isa` (tests and benches use
/// this to run every path side by side; the model uses [`crate::matrix`]).
pub fn gemm(isa: Isa, p: &Packed, acts: &Activations, out: &mut Vec<f32>) -> Result<(), String> {
    if !isa.supported() {
        return Err(format!("this CPU cannot run the {isa} kernels"));
    }
    if acts.cols != p.cols {
        return Err(format!(
            "matrix has {} columns, activations {}",
            p.cols, acts.cols
        ));
    }
    acts.prepare(ActKind::of(p.format));
    out.clear();
    out.resize(acts.tokens * p.rows, 0.0);
    // SAFETY: the CPU runs `isa` (checked); `out` has the size required; one thread.
    unsafe { gemm_tiles(isa, p, acts, 0..p.tiles(), out.as_mut_ptr()) };
    Ok(())
}

#[cfg(test)]
mod tests;
