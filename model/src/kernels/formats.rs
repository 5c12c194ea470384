//! The weight formats of GGUF files as ggml lays out their blocks, and ggml's reference
//! dequantization of each (`dequantize_row_*` in ggml-quants.c, operation for operation).
//!
//! Blocks are declared with byte arrays only (f16 fields as `[u8; 2]`), so they have alignment 1
//! and any byte slice of the right length is a valid slice of blocks: a file with misaligned
//! tensor data is read correctly instead of being undefined behaviour.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// A weight type the kernels can multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 13] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q8_0,
        WeightFormat::Q2K,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];

    /// `None` for types with no kernel (the IQ family, ternary and 1-bit types, integers).
    pub fn from_type(ty: crate::gguf_header::TensorType) -> Option<Self> {
        Some(match ty.0 {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            _ => return None,
        })
    }

    /// The same, from candle's type (the synthetic-model writer's).
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::F32 => Self::F32,
            GgmlDType::F16 => Self::F16,
            GgmlDType::BF16 => Self::BF16,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn to_ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Weights per block (1 for the float formats).
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Dequantizes `blocks` (whole blocks of this format) into `out`, as ggml does.
    pub fn dequantize(self, blocks: &[u8], out: &mut [f32]) {
        fn each<B: Block>(bytes: &[u8], out: &mut [f32]) {
            for (b, o) in cast::<B>(bytes).iter().zip(out.chunks_exact_mut(B::ELEMS)) {
                b.dequantize(o);
            }
        }
        match self {
            Self::F32 => {
                for (o, c) in out.iter_mut().zip(blocks.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Self::F16 => {
                for (o, c) in out.iter_mut().zip(blocks.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Self::BF16 => {
                for (o, c) in out.iter_mut().zip(blocks.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Self::Q4_0 => each::<BlockQ4_0>(blocks, out),
            Self::Q4_1 => each::<BlockQ4_1>(blocks, out),
            Self::Q5_0 => each::<BlockQ5_0>(blocks, out),
            Self::Q5_1 => each::<BlockQ5_1>(blocks, out),
            Self::Q8_0 => each::<BlockQ8_0>(blocks, out),
            Self::Q2K => each::<BlockQ2K>(blocks, out),
            Self::Q3K => each::<BlockQ3K>(blocks, out),
            Self::Q4K => each::<BlockQ4K>(blocks, out),
            Self::Q5K => each::<BlockQ5K>(blocks, out),
            Self::Q6K => each::<BlockQ6K>(blocks, out),
        }
    }
}

/// An f16 stored as its two little-endian bytes (alignment 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub [u8; 2]);

impl F16Bits {
    #[inline(always)]
    pub fn get(self) -> f32 {
        f16::from_le_bytes(self.0).to_f32()
    }

    pub fn new(v: f32) -> Self {
        Self(f16::from_f32(v).to_le_bytes())
    }
}

/// A ggml block: a fixed number of weights in a fixed number of bytes.
///
/// # Safety
/// Implementors are `repr(C)` structs of byte arrays (alignment 1, no padding), so every byte
/// string of `size_of::<Self>()` bytes is a valid value.
pub unsafe trait Block: Copy + 'static {
    const ELEMS: usize;
    /// Writes the block's `ELEMS` weights, with ggml's reference arithmetic.
    fn dequantize(&self, out: &mut [f32]);
}

/// Views whole blocks in `bytes` (a trailing partial block is ignored).
pub fn cast<B: Block>(bytes: &[u8]) -> &[B] {
    let n = bytes.len() / std::mem::size_of::<B>();
    // SAFETY: `Block` types have alignment 1 and accept every bit pattern; `n` whole blocks fit.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), n) }
}

/// `block_q4_0`: 32 weights `d * (q - 8)`, q in 0..16, low nibbles first.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: F16Bits,
    pub qs: [u8; 16],
}

/// `block_q4_1`: 32 weights `d * q + m`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: F16Bits,
    pub m: F16Bits,
    pub qs: [u8; 16],
}

/// `block_q5_0`: 32 weights `d * (q - 16)`, q in 0..32, the fifth bits in `qh`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: F16Bits,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q5_1`: 32 weights `d * q + m`, q in 0..32.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: F16Bits,
    pub m: F16Bits,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q8_0`: 32 weights `d * q`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: F16Bits,
    pub qs: [i8; 32],
}

/// `block_q2_K`: 256 weights in 16 groups of 16, `d * sc * q - dmin * m` with 4-bit scales.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: F16Bits,
    pub dmin: F16Bits,
}

/// `block_q3_K`: 256 weights in 16 groups of 16, `d * (sc - 32) * (q - 4)` with 6-bit scales.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: F16Bits,
}

/// `block_q4_K`: 256 weights in 8 groups of 32, `d * sc * q - dmin * m` with 6-bit scales.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: F16Bits,
    pub dmin: F16Bits,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// `block_q5_K`: like Q4_K with a fifth bit per weight in `qh`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: F16Bits,
    pub dmin: F16Bits,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

/// `block_q6_K`: 256 weights in 16 groups of 16, `d * sc * (q - 32)` with 8-bit scales.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: F16Bits,
}

const _: () = {
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ5_0>() == 22);
    assert!(std::mem::size_of::<BlockQ5_1>() == 24);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ2K>() == 84);
    assert!(std::mem::size_of::<BlockQ3K>() == 110);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
};

/// The 4-bit quants of a 32-block, unpacked: element `j` is the low nibble of byte `j` for
/// `j < 16`, the high nibble of byte `j - 16` after.
#[inline(always)]
pub fn nibble(qs: &[u8; 16], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }
}

/// The fifth bit of element `j` of a Q5 block, as 0 or 16.
#[inline(always)]
pub fn q5_high(qh: &[u8; 4], j: usize) -> u8 {
    ((u32::from_le_bytes(*qh) >> j) & 1) as u8 * 16
}

/// Sub-block `j` (0..8) scale and minimum of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j` (0..16) scale of a Q3_K block, in -32..32.
#[inline(always)]
pub fn scale_q3k(j: usize, b: &[u8; 12]) -> i32 {
    let k = j % 4;
    let v = match j / 4 {
        0 => (b[k] & 0xF) | ((b[8 + k] & 3) << 4),
        1 => (b[4 + k] & 0xF) | (((b[8 + k] >> 2) & 3) << 4),
        2 => (b[k] >> 4) | (((b[8 + k] >> 4) & 3) << 4),
        _ => (b[4 + k] >> 4) | (((b[8 + k] >> 6) & 3) << 4),
    };
    v as i32 - 32
}

/// Element `e` (0..256) of a Q2_K/Q3_K block: its 2 low bits, from `qs`.
#[inline(always)]
pub fn q2_low(qs: &[u8; 64], e: usize) -> u8 {
    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
    (qs[32 * n + l] >> (2 * j)) & 3
}

/// Element `e` of a Q3_K block as the unsigned 0..8 (`q + 4`).
#[inline(always)]
pub fn q3_unsigned(b: &BlockQ3K, e: usize) -> u8 {
    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
    let high = (b.hmask[l] >> (4 * n + j)) & 1;
    q2_low(&b.qs, e) | (high << 2)
}

/// Element `e` of a Q4_K block (0..16).
#[inline(always)]
pub fn q4k_quant(qs: &[u8; 128], e: usize) -> u8 {
    let (g, hi, l) = (e / 64, (e % 64) / 32, e % 32);
    (qs[32 * g + l] >> (4 * hi)) & 0xF
}

/// Element `e` of a Q5_K block (0..32).
#[inline(always)]
pub fn q5k_quant(b: &BlockQ5K, e: usize) -> u8 {
    let (g, hi, l) = (e / 64, (e % 64) / 32, e % 32);
    q4k_quant(&b.qs, e) | (((b.qh[l] >> (2 * g + hi)) & 1) << 4)
}

/// Element `e` of a Q6_K block as the unsigned 0..64 (`q + 32`).
#[inline(always)]
pub fn q6k_quant(b: &BlockQ6K, e: usize) -> u8 {
    let (n, part, l) = (e / 128, (e % 128) / 32, e % 32);
    let ql = b.ql[64 * n + l + 32 * (part % 2)];
    let low = if part < 2 { ql & 0xF } else { ql >> 4 };
    let high = (b.qh[32 * n + l] >> (2 * part)) & 3;
    low | (high << 4)
}

// SAFETY (all impls below): repr(C) structs of byte arrays, checked sizes above.
unsafe impl Block for BlockQ4_0 {
    const ELEMS: usize = 32;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.get();
        for (j, o) in out.iter_mut().enumerate().take(32) {
            *o = (nibble(&self.qs, j) as i32 - 8) as f32 * d;
        }
    }
}

unsafe impl Block for BlockQ4_1 {
    const ELEMS: usize = 32;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.get(), self.m.get());
        for (j, o) in out.iter_mut().enumerate().take(32) {
            *o = nibble(&self.qs, j) as f32 * d + m;
        }
    }
}

unsafe impl Block for BlockQ5_0 {
    const ELEMS: usize = 32;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.get();
        for (j, o) in out.iter_mut().enumerate().take(32) {
            let q = nibble(&self.qs, j) | q5_high(&self.qh, j);
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

unsafe impl Block for BlockQ5_1 {
    const ELEMS: usize = 32;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.get(), self.m.get());
        for (j, o) in out.iter_mut().enumerate().take(32) {
            let q = nibble(&self.qs, j) | q5_high(&self.qh, j);
            *o = q as f32 * d + m;
        }
    }
}

unsafe impl Block for BlockQ8_0 {
    const ELEMS: usize = 32;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.get();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

unsafe impl Block for BlockQ2K {
    const ELEMS: usize = 256;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, min) = (self.d.get(), self.dmin.get());
        for (e, o) in out.iter_mut().enumerate().take(256) {
            let sc = self.scales[e / 16];
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            *o = dl * q2_low(&self.qs, e) as f32 - ml;
        }
    }
}

unsafe impl Block for BlockQ3K {
    const ELEMS: usize = 256;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.get();
        for (e, o) in out.iter_mut().enumerate().take(256) {
            let dl = d * scale_q3k(e / 16, &self.scales) as f32;
            *o = dl * (q3_unsigned(self, e) as i32 - 4) as f32;
        }
    }
}

unsafe impl Block for BlockQ4K {
    const ELEMS: usize = 256;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, min) = (self.d.get(), self.dmin.get());
        for (e, o) in out.iter_mut().enumerate().take(256) {
            let (sc, m) = scale_min_k4(e / 32, &self.scales);
            *o = d * sc as f32 * q4k_quant(&self.qs, e) as f32 - min * m as f32;
        }
    }
}

unsafe impl Block for BlockQ5K {
    const ELEMS: usize = 256;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, min) = (self.d.get(), self.dmin.get());
        for (e, o) in out.iter_mut().enumerate().take(256) {
            let (sc, m) = scale_min_k4(e / 32, &self.scales);
            *o = d * sc as f32 * q5k_quant(self, e) as f32 - min * m as f32;
        }
    }
}

unsafe impl Block for BlockQ6K {
    const ELEMS: usize = 256;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.get();
        for (e, o) in out.iter_mut().enumerate().take(256) {
            let q = q6k_quant(self, e) as i32 - 32;
            *o = d * self.scales[e / 16] as f32 * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{self, GgmlType};
    use rand::{Rng, SeedableRng};

    /// candle's `to_float` is an independent transcription of the same ggml reference code, so
    /// agreeing with it on random bytes checks our element indexing.
    fn agrees_with_candle<B: Block, C: GgmlType>(format: WeightFormat) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(format.block_bytes() as u64);
        let blocks = 4;
        let mut bytes = vec![0u8; blocks * format.block_bytes()];
        rng.fill(&mut bytes[..]);
        // Keep scales finite: random f16 bits would include NaN/inf, which compare unequal.
        for b in bytes.chunks_exact_mut(format.block_bytes()) {
            for (i, v) in b.iter_mut().enumerate() {
                if is_f16_field(format, i) && i % 2 == 1 {
                    *v &= 0x3B; // exponent well below inf
                }
            }
        }
        let n = blocks * format.block_elems();
        let mut ours = vec![0f32; n];
        format.dequantize(&bytes, &mut ours);
        let mut theirs = vec![0f32; n];
        // SAFETY: candle's blocks are repr(C) with the same sizes as ours (checked).
        assert_eq!(std::mem::size_of::<C>(), format.block_bytes());
        let cs: &[C] = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<C>(), blocks) };
        C::to_float(cs, &mut theirs);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{format:?} element {i}: {a} vs candle {b}"
            );
        }
        let _ = cast::<B>(&bytes);
    }

    fn is_f16_field(format: WeightFormat, i: usize) -> bool {
        match format {
            WeightFormat::Q4_0 | WeightFormat::Q5_0 | WeightFormat::Q8_0 => i < 2,
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => i < 4,
            WeightFormat::Q2K => i >= 80,
            WeightFormat::Q3K => i >= 108,
            WeightFormat::Q4K | WeightFormat::Q5K => i < 4,
            WeightFormat::Q6K => i >= 208,
            _ => false,
        }
    }

    #[test]
    fn dequantization_matches_an_independent_transcription() {
        agrees_with_candle::<BlockQ4_0, k_quants::BlockQ4_0>(WeightFormat::Q4_0);
        agrees_with_candle::<BlockQ4_1, k_quants::BlockQ4_1>(WeightFormat::Q4_1);
        agrees_with_candle::<BlockQ5_0, k_quants::BlockQ5_0>(WeightFormat::Q5_0);
        agrees_with_candle::<BlockQ5_1, k_quants::BlockQ5_1>(WeightFormat::Q5_1);
        agrees_with_candle::<BlockQ8_0, k_quants::BlockQ8_0>(WeightFormat::Q8_0);
        agrees_with_candle::<BlockQ2K, k_quants::BlockQ2K>(WeightFormat::Q2K);
        agrees_with_candle::<BlockQ3K, k_quants::BlockQ3K>(WeightFormat::Q3K);
        agrees_with_candle::<BlockQ4K, k_quants::BlockQ4K>(WeightFormat::Q4K);
        agrees_with_candle::<BlockQ5K, k_quants::BlockQ5K>(WeightFormat::Q5K);
        agrees_with_candle::<BlockQ6K, k_quants::BlockQ6K>(WeightFormat::Q6K);
    }
}
