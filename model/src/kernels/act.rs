//! Activations in the form each weight format multiplies them in, computed once per input and
//! shared by every matrix that reads it (Q, K and V; gate and up).
//!
//! The quantizations are ggml's, bit for bit (its x86 `quantize_row_q8_1` for 32-blocks, its
//! `quantize_row_q8_K_ref` for 256-blocks), so products stay within float noise of llama.cpp.
//! They run once per token and width, not once per weight: plain scalar code, whose IEEE
//! arithmetic gives the same bits on every CPU, with an AVX2 twin for the 32-blocks, whose
//! operations are element-wise or order-free (a maximum), so it gives the same bits too.

use std::sync::OnceLock;

use half::{bf16, f16};

use super::formats::WeightFormat;

/// One block of 32 activations quantized to 8 bits (ggml's `block_q8_1`, with its f16 fields
/// already widened to f32, plus the integer sum the offset formats correct with).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(16))]
pub struct ActQ8 {
    pub qs: [i8; 32],
    /// The scale, rounded through f16 as ggml stores it.
    pub d: f32,
    /// `f16(d * sum(qs))`: what Q4_1/Q5_1 multiply their minimum by.
    pub s: f32,
    /// `sum(qs)`, exact.
    pub sum: i32,
    /// Sums of each 4 consecutive quants: what formats stored with an offset (Q4_0's `q - 8`)
    /// subtract per lane of ggml's 8-lane arithmetic.
    pub g4: [i32; 8],
    /// `-8`, `-16` and `-128` times `g4` (see [`ActQ8::neg_offset`]).
    pub g4_neg: [[i32; 8]; 3],
}

impl ActQ8 {
    /// `-k * g4[l]`, for the offsets the kernels take off (8: Q4_0, 16: Q5_0, 128: Q8_0 on
    /// AVX-512), computed once per activation block: in the kernel, the multiply and the
    /// broadcast from a general register on every lane of every token made Q4_0 1.7x slower
    /// than Q4_1.
    #[inline(always)]
    pub fn neg_offset(&self, k: i32, l: usize) -> i32 {
        match k {
            8 => self.g4_neg[0][l],
            16 => self.g4_neg[1][l],
            128 => self.g4_neg[2][l],
            _ => -k * self.g4[l],
        }
    }

    /// Quants `4k..4k+4` as one little-endian word, the unit every dot-product instruction takes.
    #[inline(always)]
    pub fn word(&self, k: usize) -> i32 {
        let q = &self.qs[4 * k..4 * k + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }
}

/// One block of 256 activations quantized to 8 bits (ggml's `block_q8_K`).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
pub struct ActQ8K {
    pub qs: [i8; 256],
    pub d: f32,
    /// Sums of each 16 quants, for the minimums and offsets of K-quant formats.
    pub bsums: [i32; 16],
    /// Sums of each 4 quants (Q3_K's offset, per lane).
    pub g4: [i32; 64],
}

impl Default for ActQ8K {
    fn default() -> Self {
        Self {
            qs: [0; 256],
            d: 0.0,
            bsums: [0; 16],
            g4: [0; 64],
        }
    }
}

impl ActQ8K {
    #[inline(always)]
    pub fn word(&self, k: usize) -> i32 {
        let q = &self.qs[4 * k..4 * k + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }
}

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22` (larger or non-finite values
/// map to values the callers' saturating casts handle the same way). ggml's `nearest_int` trick:
/// adding 1.5 * 2^23 leaves no fraction bits. `f32::round_ties_even` is a libm call on x86-64
/// builds without SSE4.1, which dominated activation quantization.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        (v + MAGIC) - MAGIC
    } else {
        v
    }
}

/// Quantizes a row (length a multiple of 32) like ggml's x86 `quantize_row_q8_1`.
pub fn quantize_q8(xs: &[f32], out: &mut [ActQ8]) {
    #[cfg(target_arch = "x86_64")]
    let simd = matches!(
        super::cpu::selected(),
        super::Isa::Avx2 | super::Isa::Avx512
    );
    for (chunk, block) in xs.chunks_exact(32).zip(out.iter_mut()) {
        let chunk: &[f32; 32] = chunk.try_into().expect("chunks of 32");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the selected instruction set implies AVX2.
        if simd && unsafe { quants_q8_avx2(chunk, block) } {
            finish_q8(block);
            continue;
        }
        quants_q8(chunk, block);
        finish_q8(block);
    }
}

/// The quants and scale of a block (the part of [`quantize_q8`] that touches every element).
fn quants_q8(chunk: &[f32; 32], block: &mut ActQ8) {
    let amax = chunk.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &x) in block.qs.iter_mut().zip(chunk) {
        *q = round_half_even(x * id) as i32 as i8;
    }
    block.d = amax / 127.0;
}

/// [`quants_q8`] eight lanes at a time, for blocks of finite values (the only ones a model
/// produces); returns false, having written nothing, for any other block, which the scalar
/// code then handles. The scalar loop took 3.7% of a prompt's time.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quants_q8_avx2(chunk: &[f32; 32], block: &mut ActQ8) -> bool {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(chunk.as_ptr().add(8 * i)));
    let a = v.map(|v| _mm256_and_ps(v, abs_mask));
    // Every |x| below 2^22 (so no NaN or infinity either): then the largest one is the same
    // in any order, and x * id stays where the rounding trick holds.
    let limit = _mm256_set1_ps(4_194_304.0);
    let ok = a.map(|a| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(a, limit)));
    if ok.iter().any(|&m| m != 0xFF) {
        return false;
    }
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes.iter().fold(0f32, |m, &x| m.max(x));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    if !id.is_finite() {
        // A block of tiny values (below 127 / f32::MAX): 127 / amax overflows.
        return false;
    }
    let idv = _mm256_set1_ps(id);
    let magic = _mm256_set1_ps(12_582_912.0);
    let mut q = [0i32; 32];
    for (i, v) in v.iter().enumerate() {
        let p = _mm256_mul_ps(*v, idv);
        // |p| <= 127 (|x| <= amax), so the rounding trick applies to every lane.
        let r = _mm256_sub_ps(_mm256_add_ps(p, magic), magic);
        _mm256_storeu_si256(q.as_mut_ptr().add(8 * i).cast(), _mm256_cvtps_epi32(r));
    }
    for (o, q) in block.qs.iter_mut().zip(q) {
        *o = q as i8;
    }
    block.d = amax / 127.0;
    true
}

/// The sums and rounded scales of a block whose quants and exact scale are set.
fn finish_q8(block: &mut ActQ8) {
    let d = block.d;
    let sum: i32 = block.qs.iter().map(|&q| q as i32).sum();
    block.d = f16::from_f32(d).to_f32();
    block.s = f16::from_f32(d * sum as f32).to_f32();
    block.sum = sum;
    for (g, q) in block.g4.iter_mut().zip(block.qs.chunks_exact(4)) {
        *g = q.iter().map(|&v| v as i32).sum();
    }
    for (neg, k) in block.g4_neg.iter_mut().zip([8, 16, 128]) {
        *neg = block.g4.map(|g| -k * g);
    }
}

/// Quantizes a row (length a multiple of 256) like ggml's `quantize_row_q8_K_ref`.
pub fn quantize_q8k(xs: &[f32], out: &mut [ActQ8K]) {
    for (chunk, block) in xs.chunks_exact(256).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &x in chunk {
            if x.abs() > amax {
                amax = x.abs();
                max = x;
            }
        }
        if amax == 0.0 {
            *block = ActQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &x) in block.qs.iter_mut().zip(chunk) {
            // ggml's `nearest_int` is round-half-to-even for these magnitudes.
            *q = (round_half_even(iscale * x) as i32).min(127) as i8;
        }
        for (s, q) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i32).sum();
        }
        for (g, q) in block.g4.iter_mut().zip(block.qs.chunks_exact(4)) {
            *g = q.iter().map(|&v| v as i32).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// The form a weight format multiplies activations in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    /// 8-bit per 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
    Q8,
    /// 8-bit per 256 (the K-quants).
    Q8K,
    /// Floats as they are (F32 weights).
    F32,
    /// Floats rounded to f16 (F16 weights: ggml multiplies f16 by f16).
    F16,
    /// Floats rounded to bf16 (BF16 weights).
    BF16,
}

impl ActKind {
    pub fn of(format: WeightFormat) -> Self {
        match format {
            WeightFormat::Q4_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_0
            | WeightFormat::Q5_1
            | WeightFormat::Q8_0 => Self::Q8,
            WeightFormat::Q2K
            | WeightFormat::Q3K
            | WeightFormat::Q4K
            | WeightFormat::Q5K
            | WeightFormat::Q6K => Self::Q8K,
            WeightFormat::F32 => Self::F32,
            WeightFormat::F16 => Self::F16,
            WeightFormat::BF16 => Self::BF16,
        }
    }
}

/// `tokens` rows of `cols` inputs, with each quantized form made on first use.
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub tokens: usize,
    pub cols: usize,
    q8: OnceLock<Vec<ActQ8>>,
    q8k: OnceLock<Vec<ActQ8K>>,
    f16: OnceLock<Vec<f32>>,
    bf16: OnceLock<Vec<f32>>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], tokens: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), tokens * cols);
        Self {
            x,
            tokens,
            cols,
            q8: OnceLock::new(),
            q8k: OnceLock::new(),
            f16: OnceLock::new(),
            bf16: OnceLock::new(),
        }
    }

    /// Builds the form `kind` now (callers do this before fanning out to threads, so the
    /// quantization is not done under a lock by the first task that needs it).
    pub fn prepare(&self, kind: ActKind) {
        match kind {
            ActKind::Q8 => drop(self.q8()),
            ActKind::Q8K => drop(self.q8k()),
            ActKind::F16 => drop(self.f16()),
            ActKind::BF16 => drop(self.bf16()),
            ActKind::F32 => {}
        }
    }

    /// `[tokens][cols / 32]`; requires `cols % 32 == 0` (checked when matrices are built).
    pub fn q8(&self) -> &[ActQ8] {
        self.q8
            .get_or_init(|| self.quantize(32, quantize_q8 as fn(&[f32], &mut [ActQ8])))
    }

    /// `[tokens][cols / 256]`.
    pub fn q8k(&self) -> &[ActQ8K] {
        self.q8k
            .get_or_init(|| self.quantize(256, quantize_q8k as fn(&[f32], &mut [ActQ8K])))
    }

    /// Every row quantized in blocks of `block`, rows in parallel when a prompt has many.
    fn quantize<T: Copy + Default + Send>(&self, block: usize, f: fn(&[f32], &mut [T])) -> Vec<T> {
        let n = self.cols / block;
        let mut q = vec![T::default(); self.tokens * n];
        if n == 0 {
            return q;
        }
        if self.tokens >= 16 && crate::team::threads() > 1 {
            crate::team::run_chunks(&mut q, n, &|t, out| {
                f(&self.x[t * self.cols..(t + 1) * self.cols], out)
            });
        } else {
            for (row, out) in self.x.chunks_exact(self.cols).zip(q.chunks_exact_mut(n)) {
                f(row, out);
            }
        }
        q
    }

    pub fn f16(&self) -> &[f32] {
        self.f16
            .get_or_init(|| self.x.iter().map(|&v| f16::from_f32(v).to_f32()).collect())
    }

    pub fn bf16(&self) -> &[f32] {
        self.bf16
            .get_or_init(|| self.x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect())
    }

    /// The floats as they are (what F32 weights read).
    pub fn f32(&self) -> &[f32] {
        self.x
    }

    pub fn row(&self, t: usize) -> &[f32] {
        &self.x[t * self.cols..(t + 1) * self.cols]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_ties_to_even() {
        for v in [
            -127.5f32, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 126.5, 127.0,
        ] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
        let mut x = -130.0f32;
        while x < 130.0 {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
            x += 0.013;
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        let mut q = [ActQ8::default(); 1];
        quantize_q8(&[0.0; 32], &mut q);
        assert_eq!((q[0].d, q[0].sum), (0.0, 0));
        let mut k = [ActQ8K::default(); 1];
        quantize_q8k(&[0.0; 256], &mut k);
        assert_eq!(k[0].d, 0.0);
        assert!(k[0].qs.iter().all(|&v| v == 0) && k[0].bsums.iter().all(|&v| v == 0));
    }

    /// The AVX2 twin gives the scalar code's bits, or declines, on ordinary blocks and on
    /// blocks of ties, subnormals, huge values, infinities and NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_quants_equal_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED: this CPU has no AVX2");
            return;
        }
        let mut seed = 7u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut blocks: Vec<[f32; 32]> = (0..2000)
            .map(|i| {
                let scale = [1e-3f32, 1.0, 37.5, 1e5, 1e-39][i % 5];
                std::array::from_fn(|_| (next() as i32 as f32 / i32::MAX as f32) * scale)
            })
            .collect();
        // Ties: values that land exactly on k + 0.5 after scaling by 127 / 127.
        blocks.push(std::array::from_fn(|j| {
            j as f32 * 0.5 - 8.0 + if j == 0 { -119.0 } else { 0.0 }
        }));
        blocks.push([0.0; 32]);
        blocks.push([-0.0; 32]);
        blocks.push(std::array::from_fn(|j| if j == 3 { 5e6 } else { j as f32 }));
        blocks.push(std::array::from_fn(|j| {
            if j == 9 {
                f32::INFINITY
            } else {
                1.0
            }
        }));
        blocks.push(std::array::from_fn(
            |j| if j == 31 { f32::NAN } else { -2.0 },
        ));
        blocks.push(std::array::from_fn(
            |j| if j % 2 == 0 { 1e-45 } else { 0.0 },
        ));
        let (mut fast, mut declined) = (0, 0);
        for b in &blocks {
            let mut want = ActQ8::default();
            quants_q8(b, &mut want);
            let mut got = ActQ8::default();
            // SAFETY: AVX2 checked above.
            if unsafe { quants_q8_avx2(b, &mut got) } {
                fast += 1;
                assert_eq!(got.qs, want.qs, "{b:?}");
                assert_eq!(got.d.to_bits(), want.d.to_bits(), "{b:?}");
            } else {
                declined += 1;
            }
        }
        assert!(
            fast >= 1600 && declined >= 4,
            "{fast} fast, {declined} declined"
        );
    }

    #[test]
    fn q8k_maps_the_largest_magnitude_to_minus_127() {
        let mut xs = [0.5f32; 256];
        xs[7] = -3.0;
        let mut k = [ActQ8K::default(); 1];
        quantize_q8k(&xs, &mut k);
        assert_eq!(
            k[0].qs[7], -127,
            "iscale = -127 / max sends the extreme to -127"
        );
        assert!((k[0].d * k[0].qs[7] as f32 + 3.0).abs() < 1e-6);
        assert_eq!(
            k[0].bsums[0],
            k[0].qs[..16].iter().map(|&v| v as i32).sum::<i32>()
        );
    }
}
