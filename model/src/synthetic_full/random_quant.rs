//! Random weights written directly in their quantized block layouts.
//!
//! Why not quantize random floats: that would mean 7 billion floats through ggml's quantizers
//! (Q4_K's search is slow) for numbers whose only job is to be random with a chosen spread.
//! Drawing the quantized codes and scales directly is as fast as the disk and yields, by
//! construction, values of mean ~0 and standard deviation `std` in every format.

use half::f16;

/// Weight formats the full-size files use, with their ggml type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F32,
    Q4_0,
    Q4K,
    Q6K,
}

impl Format {
    pub fn ggml_type(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::Q4_0 => 2,
            Format::Q4K => 12,
            Format::Q6K => 14,
        }
    }

    pub fn block_elems(self) -> usize {
        match self {
            Format::F32 => 1,
            Format::Q4_0 => 32,
            Format::Q4K | Format::Q6K => 256,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::Q4_0 => 18,
            Format::Q4K => 144,
            Format::Q6K => 210,
        }
    }
}

/// xoshiro256** seeded through SplitMix64: fast, and the same stream on every machine.
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn put_f16(out: &mut [u8], v: f32) {
    out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A random sign: halves of the blocks are negated, so the small bias of the unsigned codes
/// (their mean is not exactly the centre) cancels across a row.
fn sign(rng: &mut Rng) -> f32 {
    if rng.next_u64() & 1 == 0 {
        1.0
    } else {
        -1.0
    }
}

/// Fills `out` (a whole number of `format` blocks) with random weights of spread `std`.
/// For F32, `std` is the spread around `center` (norm weights).
pub fn fill_blocks(format: Format, rng: &mut Rng, std: f32, center: f32, out: &mut [u8]) {
    let bb = format.block_bytes();
    debug_assert_eq!(out.len() % bb, 0);
    match format {
        Format::F32 => {
            for v in out.chunks_exact_mut(4) {
                let x = center + std * (2.0 * rng.unit() - 1.0);
                v.copy_from_slice(&x.to_le_bytes());
            }
        }
        Format::Q4_0 => {
            // x = d * (q - 8), q uniform in 0..16: standard deviation 4.61 d.
            for b in out.chunks_exact_mut(bb) {
                let d = std / 4.61 * (0.75 + 0.5 * rng.unit()) * sign(rng);
                put_f16(&mut b[..2], d);
                rng.fill(&mut b[2..]);
            }
        }
        Format::Q4K => {
            // x = d * sc * q - dmin * m per 32 values; with m = sc and dmin = 7.5 d that is
            // d * sc * (q - 7.5), q uniform in 0..16 (deviation 4.61), sc in 32..64 (~48).
            for b in out.chunks_exact_mut(bb) {
                let d = std / (4.61 * 48.0) * (0.75 + 0.5 * rng.unit()) * sign(rng);
                put_f16(&mut b[..2], d);
                put_f16(&mut b[2..4], 7.5 * d);
                let mut sc = [0u8; 8];
                for s in &mut sc {
                    *s = 32 + (rng.next_u64() % 32) as u8;
                }
                let scales = &mut b[4..16];
                for j in 0..4 {
                    scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
                    scales[j + 4] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
                    scales[j + 8] = (sc[j + 4] & 0xF) | ((sc[j + 4] & 0xF) << 4);
                }
                rng.fill(&mut b[16..]);
            }
        }
        Format::Q6K => {
            // x = d * scale * (q - 32), q uniform in 0..64 (deviation 18.5), |scale| in
            // 32..64 (~48) with a random sign per 16 values.
            for b in out.chunks_exact_mut(bb) {
                rng.fill(&mut b[..192]);
                for s in &mut b[192..208] {
                    let mag = 32 + (rng.next_u64() % 32) as i8;
                    *s = (mag * sign(rng) as i8) as u8;
                }
                let d = std / (18.5 * 48.0) * (0.75 + 0.5 * rng.unit());
                put_f16(&mut b[208..210], d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::WeightFormat;

    /// The drawn blocks, dequantized by the kernels' own code, have the asked spread and a
    /// mean near zero in every format.
    #[test]
    fn blocks_have_the_asked_spread() {
        for (format, ty) in [(Format::Q4_0, 2u32), (Format::Q4K, 12), (Format::Q6K, 14)] {
            let mut rng = Rng::new(7);
            let blocks = 4096;
            let mut bytes = vec![0u8; blocks * format.block_bytes()];
            fill_blocks(format, &mut rng, 0.02, 0.0, &mut bytes);
            let wf = WeightFormat::from_type(crate::gguf_header::TensorType(ty)).unwrap();
            let mut vals = vec![0f32; blocks * format.block_elems()];
            wf.dequantize(&bytes, &mut vals);
            let n = vals.len() as f64;
            let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (vals.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(mean.abs() < 0.002, "{format:?}: mean {mean}");
            assert!((0.017..0.023).contains(&std), "{format:?}: std {std}");
        }
    }
}
