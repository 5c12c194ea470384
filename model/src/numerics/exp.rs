//! `exp` for f32 with the bits of the `libm` crate's `expf` (musl's port of FreeBSD's
//! `e_expf.c`), written without branches so a loop over a slice vectorises.
//!
//! Why these bits: they are the arithmetic the reference tests against llama.cpp were pinned
//! with, and they are the same on every CPU (plain IEEE single operations, one division, no
//! fused multiply-adds). glibc's `expf`, which llama.cpp calls, is a system library that differs
//! between versions; the correctly rounded `exp` differs from both in about 0.5% of inputs by
//! one ulp, which changes nothing in a softmax but flips an f16 rounding here and there.
//!
//! Why not call `libm::expf`: its branches and the call per element made the softmax a tenth
//! of a prompt's time; this form runs 8 or 16 lanes at once where the caller's target features
//! allow.

const LN2_HI: f32 = 6.931_457_5e-1; // 0x3f317200
const LN2_LO: f32 = 1.428_606_8e-6; // 0x35bfbe8e
const INV_LN2: f32 = 1.442_695_1; // 0x3fb8aa3b
const P1: f32 = 1.666_662_5e-1; // 0xaaaa8f.0p-26
const P2: f32 = -2.766_733_3e-3; // -0xb55215.0p-32

/// `e^x` with `libm::expf`'s bits (tested against it on a dense sample of all floats).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let bits = x.to_bits();
    let negative = bits >> 31 == 1;
    let hx = bits & 0x7fff_ffff;
    // Argument reduction, x = k ln2 + r: k is the nearest integer to x/ln2 for |x| > 1.5 ln2,
    // +-1 for 0.5 ln2 < |x| <= 1.5 ln2, and 0 below (then hi = x and lo = 0 exactly).
    let k = if hx > 0x3f85_1592 {
        (INV_LN2 * x + 0.5f32.copysign(x)) as i32
    } else if hx > 0x3eb1_7218 {
        if negative {
            -1
        } else {
            1
        }
    } else {
        0
    };
    let kf = k as f32;
    let hi = x - kf * LN2_HI;
    let lo = kf * LN2_LO;
    let r = hi - lo;
    let rr = r * r;
    let c = r - rr * (P1 + rr * P2);
    let y = 1.0 + (r * c / (2.0 - c) - lo + hi);
    // `scalbnf(y, k)`: y * 2^k with one rounding (also into the subnormals), which the exact
    // product in f64 rounded once to f32 gives; k stays in [-150, 128] below, a normal double.
    let scaled = (y as f64 * f64::from_bits(((k.clamp(-200, 200) + 1023) as u64) << 52)) as f32;
    if hx > 0x7f80_0000 {
        x // NaN
    } else if hx >= 0x42b1_7218 && !negative {
        f32::INFINITY // x >= 88.722839
    } else if hx >= 0x42cf_f1b5 && negative {
        0.0 // x <= -103.972084
    } else if hx <= 0x3900_0000 {
        1.0 + x // |x| <= 2^-14
    } else {
        scaled
    }
}

/// `x[i] = e^x[i]` for a whole slice (vectorised by the compiler where the caller's target
/// features allow; every element computed exactly as by [`expf`]).
#[inline(always)]
pub fn expf_in_place(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = expf(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 61st float (and the edges of each special range): the same bits as `libm::expf`.
    #[test]
    fn the_bits_of_libm() {
        let mut checked = 0u64;
        let mut bits = 0u32;
        loop {
            let x = f32::from_bits(bits);
            let (a, b) = (expf(x), libm::expf(x));
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "x={x:e} ({bits:#x}): {a:e} vs libm {b:e}"
            );
            checked += 1;
            match bits.checked_add(61) {
                Some(b) => bits = b,
                None => break,
            }
        }
        assert!(checked > 70_000_000);
        for x in [
            0.0f32,
            -0.0,
            88.722_83,
            88.722_84,
            -103.972_08,
            -103.972_09,
            -87.336_55,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-30,
            -1e-30,
        ] {
            assert_eq!(expf(x).to_bits(), libm::expf(x).to_bits(), "x={x:e}");
        }
        assert!(expf(f32::NAN).is_nan());
    }

    /// The vectorised slice form, compiled with the features the attention kernels use.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vectorised_form_gives_the_same_bits() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn on_avx2(x: &mut [f32]) {
            expf_in_place(x)
        }
        if !std::is_x86_feature_detected!("avx2") || !std::is_x86_feature_detected!("fma") {
            println!("SKIPPED: this CPU has no AVX2+FMA");
            return;
        }
        let xs: Vec<f32> = (0..200_000)
            .map(|i| -110.0 + i as f32 * 0.00101)
            .chain([f32::NEG_INFINITY, -0.0, 1e-9])
            .collect();
        let mut v = xs.clone();
        // SAFETY: both features checked just above.
        unsafe { on_avx2(&mut v) };
        for (x, y) in xs.iter().zip(&v) {
            assert_eq!(y.to_bits(), expf(*x).to_bits(), "x={x:e}");
        }
    }
}
