//! Weights rearranged at load time into tiles of 16 rows, the layout every kernel path reads.
//!
//! Within a tile the 16 rows' copies of each field sit side by side, so one 64-byte load gives
//! every row four bytes of quants and one SIMD lane holds one row. Lanes never mix rows: each
//! row's dot product is accumulated alone, block after block, in a fixed order. That is what makes
//! AVX-512 (16 lanes), AVX2 (2x8), NEON (4x4) and portable code produce the same bits, and a
//! row's result independent of the other rows and tokens of a batch.
//!
//! A tile block has exactly the bytes of 16 ggml blocks, so the packed matrix is the size of the
//! original; rows past the end of the matrix are zero (their outputs are discarded).

use super::formats::WeightFormat;

/// Rows per tile.
pub const TILE: usize = 16;

/// How one field of a ggml block is laid out across the 16 rows of a tile block.
#[derive(Clone, Copy, Debug)]
enum Field {
    /// `[row][n]`: scales and minimums (16 f16 values load as one vector).
    PerRow(usize),
    /// `[byte][row]`: packed sub-block scales (byte `k` of every row loads as one vector).
    ByteMajor(usize),
    /// `[n / 4][row][4]`: quants, four bytes of each row per 64-byte chunk.
    Chunk4(usize),
    /// A Q5_0/Q5_1 `qh` word, its bits regrouped so chunk `c` of the quants finds its fifth
    /// bits at bit `c` (low nibbles) and `4 + c` (high nibbles) of the row's byte `k`; stored
    /// `[row][4]`.
    Q5High,
}

impl Field {
    fn len(self) -> usize {
        match self {
            Field::PerRow(n) | Field::ByteMajor(n) | Field::Chunk4(n) => n,
            Field::Q5High => 4,
        }
    }
}

/// `(offset in the ggml block, layout)` of each field, in tile order. The kernels hard-code the
/// resulting offsets (16 times the sum of the preceding lengths).
fn fields(format: WeightFormat) -> &'static [(usize, Field)] {
    use Field::*;
    match format {
        WeightFormat::F32 => &[(0, PerRow(4))],
        WeightFormat::F16 | WeightFormat::BF16 => &[(0, PerRow(2))],
        WeightFormat::Q4_0 => &[(0, PerRow(2)), (2, Chunk4(16))],
        WeightFormat::Q4_1 => &[(0, PerRow(2)), (2, PerRow(2)), (4, Chunk4(16))],
        WeightFormat::Q5_0 => &[(0, PerRow(2)), (2, Q5High), (6, Chunk4(16))],
        WeightFormat::Q5_1 => &[(0, PerRow(2)), (2, PerRow(2)), (4, Q5High), (8, Chunk4(16))],
        WeightFormat::Q8_0 => &[(0, PerRow(2)), (2, Chunk4(32))],
        WeightFormat::Q2K => &[
            (0, ByteMajor(16)),
            (16, Chunk4(64)),
            (80, PerRow(2)),
            (82, PerRow(2)),
        ],
        WeightFormat::Q3K => &[
            (0, Chunk4(32)),
            (32, Chunk4(64)),
            (96, ByteMajor(12)),
            (108, PerRow(2)),
        ],
        WeightFormat::Q4K => &[
            (0, PerRow(2)),
            (2, PerRow(2)),
            (4, ByteMajor(12)),
            (16, Chunk4(128)),
        ],
        WeightFormat::Q5K => &[
            (0, PerRow(2)),
            (2, PerRow(2)),
            (4, ByteMajor(12)),
            (16, Chunk4(32)),
            (48, Chunk4(128)),
        ],
        WeightFormat::Q6K => &[
            (0, Chunk4(128)),
            (128, Chunk4(64)),
            (192, ByteMajor(16)),
            (208, PerRow(2)),
        ],
    }
}

fn q5_regroup(qh: [u8; 4]) -> [u8; 4] {
    let bits = u32::from_le_bytes(qh);
    let mut out = [0u8; 4];
    for (k, o) in out.iter_mut().enumerate() {
        for c in 0..4 {
            *o |= (((bits >> (4 * c + k)) & 1) as u8) << c;
            *o |= (((bits >> (16 + 4 * c + k)) & 1) as u8) << (4 + c);
        }
    }
    out
}

fn q5_ungroup(g: [u8; 4]) -> [u8; 4] {
    let mut bits = 0u32;
    for (k, &b) in g.iter().enumerate() {
        for c in 0..4 {
            bits |= (((b >> c) & 1) as u32) << (4 * c + k);
            bits |= (((b >> (4 + c)) & 1) as u32) << (16 + 4 * c + k);
        }
    }
    bits.to_le_bytes()
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Bytes aligned to a cache line, so every 64-byte chunk load is aligned.
pub struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialised bytes, contiguous (repr(C) arrays).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A `[rows, cols]` matrix in tiles: `[tile][block][tile block]`.
pub struct Packed {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    data: AlignedBytes,
}

impl Packed {
    /// Rearranges `bytes`, the matrix as ggml stores it (row after row of blocks). The caller has
    /// checked that `cols` is a multiple of the block size and `bytes` holds exactly the matrix.
    pub fn new(format: WeightFormat, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        let nb = cols / format.block_elems();
        let bb = format.block_bytes();
        let row_bytes = nb * bb;
        debug_assert_eq!(bytes.len(), rows * row_bytes);
        let tiles = rows.div_ceil(TILE);
        let mut data = AlignedBytes::zeroed(tiles * nb * TILE * bb);
        let dst = data.as_mut_slice();
        for tile in 0..tiles {
            for b in 0..nb {
                let out = &mut dst[(tile * nb + b) * TILE * bb..][..TILE * bb];
                let mut at = 0;
                for &(src, field) in fields(format) {
                    let len = field.len();
                    for r in 0..TILE {
                        let row = tile * TILE + r;
                        if row >= rows {
                            continue;
                        }
                        let s = &bytes[row * row_bytes + b * bb + src..][..len];
                        match field {
                            Field::PerRow(_) => out[at + r * len..][..len].copy_from_slice(s),
                            Field::ByteMajor(_) => {
                                for (k, &v) in s.iter().enumerate() {
                                    out[at + k * TILE + r] = v;
                                }
                            }
                            Field::Chunk4(_) => {
                                for (c, w) in s.chunks_exact(4).enumerate() {
                                    out[at + c * 64 + r * 4..][..4].copy_from_slice(w);
                                }
                            }
                            Field::Q5High => {
                                let g = q5_regroup([s[0], s[1], s[2], s[3]]);
                                out[at + r * 4..][..4].copy_from_slice(&g);
                            }
                        }
                    }
                    at += len * TILE;
                }
            }
        }
        Self {
            format,
            rows,
            cols,
            data,
        }
    }

    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / self.format.block_elems()
    }

    /// Bytes of one tile block (16 rows of one block).
    pub fn tile_block_bytes(&self) -> usize {
        TILE * self.format.block_bytes()
    }

    /// The packed bytes of tile `t`: `blocks()` tile blocks.
    pub fn tile(&self, t: usize) -> &[u8] {
        let n = self.blocks() * self.tile_block_bytes();
        &self.data.as_slice()[t * n..(t + 1) * n]
    }

    pub fn len_bytes(&self) -> usize {
        self.data.len
    }

    /// Row `row` as ggml stored it (the inverse of packing), into `out` (one row of blocks).
    pub fn unpack_row(&self, row: usize, out: &mut [u8]) {
        let nb = self.blocks();
        let bb = self.format.block_bytes();
        let (tile, r) = (row / TILE, row % TILE);
        let src = self.tile(tile);
        for b in 0..nb {
            let tb = &src[b * TILE * bb..][..TILE * bb];
            let mut at = 0;
            for &(off, field) in fields(self.format) {
                let len = field.len();
                let d = &mut out[b * bb + off..][..len];
                match field {
                    Field::PerRow(_) => d.copy_from_slice(&tb[at + r * len..][..len]),
                    Field::ByteMajor(_) => {
                        for (k, v) in d.iter_mut().enumerate() {
                            *v = tb[at + k * TILE + r];
                        }
                    }
                    Field::Chunk4(_) => {
                        for (c, w) in d.chunks_exact_mut(4).enumerate() {
                            w.copy_from_slice(&tb[at + c * 64 + r * 4..][..4]);
                        }
                    }
                    Field::Q5High => {
                        let g = &tb[at + r * 4..][..4];
                        d.copy_from_slice(&q5_ungroup([g[0], g[1], g[2], g[3]]));
                    }
                }
                at += len * TILE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn field_lengths_add_up_to_the_block() {
        for f in WeightFormat::ALL {
            let total: usize = fields(f).iter().map(|(_, fl)| fl.len()).sum();
            assert_eq!(total, f.block_bytes(), "{f:?}");
            let mut end = 0;
            for &(off, fl) in fields(f) {
                end = end.max(off + fl.len());
            }
            assert_eq!(end, f.block_bytes(), "{f:?}");
        }
    }

    #[test]
    fn unpacking_restores_every_row() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for f in WeightFormat::ALL {
            for rows in [1usize, 16, 17, 40] {
                let cols = 2 * f.block_elems().max(32);
                let row_bytes = cols / f.block_elems() * f.block_bytes();
                let mut bytes = vec![0u8; rows * row_bytes];
                rng.fill(&mut bytes[..]);
                let p = Packed::new(f, rows, cols, &bytes);
                assert_eq!(p.len_bytes(), rows.div_ceil(TILE) * TILE * row_bytes);
                let mut row = vec![0u8; row_bytes];
                for r in 0..rows {
                    p.unpack_row(r, &mut row);
                    assert_eq!(row, bytes[r * row_bytes..][..row_bytes], "{f:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn q5_high_bits_regroup_and_back() {
        for v in [0u32, 1, 0x8000_0001, 0xdead_beef, u32::MAX] {
            let b = v.to_le_bytes();
            assert_eq!(q5_ungroup(q5_regroup(b)), b);
        }
    }
}
