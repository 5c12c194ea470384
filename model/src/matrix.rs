//! Weight matrices viewed straight from the GGUF mapping, and the parallel matrix product that
//! every block, the LM head and the embeddings go through.

use std::ops::Range;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::gguf::{Pod, TensorView};
use crate::quant::{self, ActQ8, BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};

// SAFETY: candle's GGML blocks are repr(C) structs of f16/f32/integer arrays; any bit pattern is
// a valid value, so they may be viewed directly from file bytes.
unsafe impl Pod for k_quants::BlockQ5_0 {}
unsafe impl Pod for k_quants::BlockQ5_1 {}
unsafe impl Pod for k_quants::BlockQ2K {}
unsafe impl Pod for k_quants::BlockQ3K {}
unsafe impl Pod for k_quants::BlockQ4K {}
unsafe impl Pod for k_quants::BlockQ5K {}
unsafe impl Pod for k_quants::BlockQ6K {}

/// A `[rows, cols]` weight matrix: `out = W · x` maps `cols` inputs to `rows` outputs.
#[derive(Clone)]
pub struct QMatrix {
    view: TensorView,
    pub rows: usize,
    pub cols: usize,
}

/// The inputs of a matrix product (`tokens` rows of `cols` floats), quantized once and shared
/// by every matrix that reads the same input (Q, K and V; gate and up).
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub tokens: usize,
    pub cols: usize,
    q8: Vec<ActQ8>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], tokens: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), tokens * cols);
        let mut q8 = Vec::new();
        if cols.is_multiple_of(QK) {
            q8 = vec![ActQ8::default(); tokens * cols / QK];
            for (row, out) in x.chunks_exact(cols).zip(q8.chunks_exact_mut(cols / QK)) {
                quant::quantize_row(row, out);
            }
        }
        Self {
            x,
            tokens,
            cols,
            q8,
        }
    }

    fn q8_row(&self, t: usize) -> &[ActQ8] {
        let n = self.cols / QK;
        &self.q8[t * n..(t + 1) * n]
    }

    fn row(&self, t: usize) -> &[f32] {
        &self.x[t * self.cols..(t + 1) * self.cols]
    }
}

impl QMatrix {
    pub fn new(view: TensorView) -> Result<Self> {
        let (rows, cols) = match view.dims.as_slice() {
            [r, c] => (*r, *c),
            dims => {
                return Err(ModelError::BadTensor {
                    name: view.name.clone(),
                    reason: format!("expected a matrix, found shape {dims:?}"),
                })
            }
        };
        let m = Self { view, rows, cols };
        // Fail at load, not at the first token: the format must be one we can multiply, and
        // the bytes must be castable to its blocks.
        m.check()?;
        Ok(m)
    }

    pub fn name(&self) -> &str {
        &self.view.name
    }

    pub fn dtype(&self) -> GgmlDType {
        self.view.dtype
    }

    pub fn view(&self) -> &TensorView {
        &self.view
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| ModelError::BadTensor {
            name: self.view.name.clone(),
            reason,
        };
        let block = self.view.dtype.block_size();
        if !self.cols.is_multiple_of(block) {
            return Err(bad(format!(
                "row length {} is not a multiple of the {:?} block size {block}",
                self.cols, self.view.dtype
            )));
        }
        match self.view.dtype {
            GgmlDType::F32 => self.view.cast::<f32>().map(drop),
            GgmlDType::F16 => self.view.cast::<f16>().map(drop),
            GgmlDType::BF16 => self.view.cast::<bf16>().map(drop),
            GgmlDType::Q4_0 => self.view.cast::<BlockQ4_0>().map(drop),
            GgmlDType::Q4_1 => self.view.cast::<BlockQ4_1>().map(drop),
            GgmlDType::Q8_0 => self.view.cast::<BlockQ8_0>().map(drop),
            GgmlDType::Q5_0 => self.view.cast::<k_quants::BlockQ5_0>().map(drop),
            GgmlDType::Q5_1 => self.view.cast::<k_quants::BlockQ5_1>().map(drop),
            GgmlDType::Q2K => self.view.cast::<k_quants::BlockQ2K>().map(drop),
            GgmlDType::Q3K => self.view.cast::<k_quants::BlockQ3K>().map(drop),
            GgmlDType::Q4K => self.view.cast::<k_quants::BlockQ4K>().map(drop),
            GgmlDType::Q5K => self.view.cast::<k_quants::BlockQ5K>().map(drop),
            GgmlDType::Q6K => self.view.cast::<k_quants::BlockQ6K>().map(drop),
            other => Err(bad(format!("weight format {other:?} is not supported"))),
        }
    }

    /// Writes row `r`, dequantized, into `out` (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(ModelError::Shape(format!(
                "row {r} of {} ({}x{}) into {} floats",
                self.view.name,
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let per_row = self.cols / self.view.dtype.block_size();
        let span = r * per_row..(r + 1) * per_row;
        match self.view.dtype {
            GgmlDType::F32 => out.copy_from_slice(&self.view.cast::<f32>()?[span]),
            GgmlDType::F16 => {
                for (o, v) in out.iter_mut().zip(&self.view.cast::<f16>()?[span]) {
                    *o = v.to_f32();
                }
            }
            GgmlDType::BF16 => {
                for (o, v) in out.iter_mut().zip(&self.view.cast::<bf16>()?[span]) {
                    *o = v.to_f32();
                }
            }
            GgmlDType::Q4_0 => quant::dequantize_q4_0(&self.view.cast()?[span], out),
            GgmlDType::Q4_1 => quant::dequantize_q4_1(&self.view.cast()?[span], out),
            GgmlDType::Q8_0 => quant::dequantize_q8_0(&self.view.cast()?[span], out),
            GgmlDType::Q5_0 => k_quants::BlockQ5_0::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q5_1 => k_quants::BlockQ5_1::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q2K => k_quants::BlockQ2K::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q3K => k_quants::BlockQ3K::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q4K => k_quants::BlockQ4K::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q5K => k_quants::BlockQ5K::to_float(&self.view.cast()?[span], out),
            GgmlDType::Q6K => k_quants::BlockQ6K::to_float(&self.view.cast()?[span], out),
            _ => self.check()?,
        }
        Ok(())
    }

    /// Computes output rows `rows` for every token; `out` receives `out[t][r]` through `put`.
    fn rows_into(&self, acts: &Activations, rows: Range<usize>, put: &impl Fn(usize, usize, f32)) {
        let cols = self.cols;
        let per_row = cols / self.view.dtype.block_size();
        // `check` ran at construction, so these casts cannot fail; an `Err` would only mean a
        // broken invariant, and then writing nothing is the safe failure.
        macro_rules! quantized {
            ($block:ty, $dot:path) => {{
                let Ok(w) = self.view.cast::<$block>() else {
                    return;
                };
                for r in rows {
                    let wr = &w[r * per_row..(r + 1) * per_row];
                    for t in 0..acts.tokens {
                        put(t, r, $dot(wr, acts.q8_row(t)));
                    }
                }
            }};
        }
        macro_rules! candle {
            ($block:ty) => {{
                let Ok(w) = self.view.cast::<$block>() else {
                    return;
                };
                type A = <$block as GgmlType>::VecDotType;
                let n = cols / A::BLCK_SIZE;
                let mut a: Vec<A> = (0..acts.tokens * n).map(|_| A::zeros()).collect();
                for t in 0..acts.tokens {
                    A::from_float(acts.row(t), &mut a[t * n..(t + 1) * n]);
                }
                for r in rows {
                    let wr = &w[r * per_row..(r + 1) * per_row];
                    for t in 0..acts.tokens {
                        put(t, r, <$block>::vec_dot(cols, wr, &a[t * n..(t + 1) * n]));
                    }
                }
            }};
        }
        macro_rules! float {
            ($ty:ty) => {{
                let Ok(w) = self.view.cast::<$ty>() else {
                    return;
                };
                let mut buf = vec![0f32; cols];
                for r in rows {
                    for (b, v) in buf.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                        *b = v.to_f32();
                    }
                    for t in 0..acts.tokens {
                        put(t, r, quant::dot_f32(&buf, acts.row(t)));
                    }
                }
            }};
        }
        match self.view.dtype {
            GgmlDType::Q4_1 => quantized!(BlockQ4_1, quant::dot_q4_1),
            GgmlDType::Q4_0 => quantized!(BlockQ4_0, quant::dot_q4_0),
            GgmlDType::Q8_0 => quantized!(BlockQ8_0, quant::dot_q8_0),
            GgmlDType::F32 => {
                let Ok(w) = self.view.cast::<f32>() else {
                    return;
                };
                for r in rows {
                    for t in 0..acts.tokens {
                        put(
                            t,
                            r,
                            quant::dot_f32(&w[r * cols..(r + 1) * cols], acts.row(t)),
                        );
                    }
                }
            }
            GgmlDType::F16 => float!(f16),
            GgmlDType::BF16 => float!(bf16),
            GgmlDType::Q5_0 => candle!(k_quants::BlockQ5_0),
            GgmlDType::Q5_1 => candle!(k_quants::BlockQ5_1),
            GgmlDType::Q2K => candle!(k_quants::BlockQ2K),
            GgmlDType::Q3K => candle!(k_quants::BlockQ3K),
            GgmlDType::Q4K => candle!(k_quants::BlockQ4K),
            GgmlDType::Q5K => candle!(k_quants::BlockQ5K),
            GgmlDType::Q6K => candle!(k_quants::BlockQ6K),
            _ => {}
        }
    }
}

/// Output buffer shared by the tasks of one parallel product.
///
/// Each task owns a disjoint set of rows, so no two tasks ever write the same element; that is
/// what makes handing out the raw pointer sound.
struct Disjoint {
    ptr: *mut f32,
    len: usize,
    rows: usize,
}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    fn put(&self, t: usize, r: usize, v: f32) {
        let i = t * self.rows + r;
        assert!(i < self.len);
        // SAFETY: in bounds (checked), and rows are partitioned between tasks (see type docs).
        unsafe { *self.ptr.add(i) = v }
    }
}

/// `outs[k] = mats[k] · x` for every token, as one parallel region.
///
/// Several matrices that read the same input run together so that a 576-wide model does not
/// pay a thread hand-off per matrix; rows are split into a few chunks per thread so work
/// stealing can balance unequal matrices. Outputs are `[tokens, rows]`.
pub fn matmul_many(
    acts: &Activations,
    mats: &[&QMatrix],
    outs: &mut [&mut Vec<f32>],
) -> Result<()> {
    for m in mats {
        if m.cols != acts.cols {
            return Err(ModelError::Shape(format!(
                "{} expects {} inputs, got {}",
                m.view.name, m.cols, acts.cols
            )));
        }
    }
    let threads = rayon::current_num_threads().max(1);
    let mut tasks = Vec::new();
    let sinks: Vec<Disjoint> = mats
        .iter()
        .zip(outs.iter_mut())
        .map(|(m, out)| {
            out.clear();
            out.resize(acts.tokens * m.rows, 0.0);
            Disjoint {
                ptr: out.as_mut_ptr(),
                len: out.len(),
                rows: m.rows,
            }
        })
        .collect();
    for (k, m) in mats.iter().enumerate() {
        // Enough chunks for balance, few enough that per-task overhead stays invisible.
        let chunk = m.rows.div_ceil(threads * 4).max(16);
        let mut start = 0;
        while start < m.rows {
            let end = (start + chunk).min(m.rows);
            tasks.push((k, start..end));
            start = end;
        }
    }
    let run = |(k, rows): &(usize, Range<usize>)| {
        let sink = &sinks[*k];
        mats[*k].rows_into(acts, rows.clone(), &|t, r, v| sink.put(t, r, v));
    };
    if threads == 1 || tasks.len() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
    Ok(())
}

/// `out = m · x` for every token.
pub fn matmul(acts: &Activations, m: &QMatrix, out: &mut Vec<f32>) -> Result<()> {
    matmul_many(acts, &[m], &mut [out])
}
