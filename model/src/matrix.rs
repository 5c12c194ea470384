//! Weight matrices, packed at load into the kernels' tile layout, and the parallel matrix product
//! every block, the LM head and the embeddings go through.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::gguf::TensorView;
use crate::kernels::{self, cpu, ActKind, Packed, WeightFormat};
use crate::team;

pub use crate::kernels::Activations;

/// A `[rows, cols]` weight matrix: `out = W · x` maps `cols` inputs to `rows` outputs.
///
/// The weights are copied out of the file mapping into tiles once; the mapping's pages are then
/// released, so a node's resident memory is still its slice's weights, held once.
#[derive(Clone)]
pub struct QMatrix {
    name: Arc<str>,
    packed: Arc<Packed>,
    pub rows: usize,
    pub cols: usize,
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
        let bad = |reason: String| ModelError::BadTensor {
            name: view.name.clone(),
            reason,
        };
        // Fail at load, not at the first token: the type must be one we can multiply and the
        // row length a whole number of its blocks.
        let format = WeightFormat::from_type(view.dtype).ok_or_else(|| {
            bad(format!(
                "weight type {} has no kernel (supported: {})",
                view.dtype,
                WeightFormat::ALL.map(WeightFormat::name).join(", ")
            ))
        })?;
        let block = format.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(bad(format!(
                "row length {cols} is not a multiple of the {} block size {block}",
                format.name()
            )));
        }
        let packed = Packed::new(format, rows, cols, view.bytes());
        view.release();
        Ok(Self {
            name: view.name.as_str().into(),
            packed: Arc::new(packed),
            rows,
            cols,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn format(&self) -> WeightFormat {
        self.packed.format
    }

    pub fn packed(&self) -> &Packed {
        &self.packed
    }

    /// Bytes of weights held (the same as the tensor's bytes in the file, rounded up to whole
    /// tiles of 16 rows).
    pub fn weight_bytes(&self) -> usize {
        self.packed.len_bytes()
    }

    /// Writes row `r`, dequantized, into `out` (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(ModelError::Shape(format!(
                "row {r} of {} ({}x{}) into {} floats",
                self.name,
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let f = self.format();
        let mut bytes = vec![0u8; self.cols / f.block_elems() * f.block_bytes()];
        self.packed.unpack_row(r, &mut bytes);
        f.dequantize(&bytes, out);
        Ok(())
    }
}

/// Runs `f` on a thread of rayon's pool. A forward pass has a parallel region per product and
/// per attention; started from a thread outside the pool, each would be handed to the pool and
/// waited for (two context switches per region, 150 a token). Inside the pool they start
/// directly, and the calling worker takes its share of the work.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        let mut out = None;
        rayon::scope(|_| out = Some(f()));
        // `scope` runs its body to completion before returning.
        out.expect("rayon::scope ran its body")
    }
}

/// Output buffer shared by the tasks of one parallel product.
///
/// Each task owns a disjoint set of rows (whole tiles), so no two tasks ever write the same
/// element; that is what makes handing out the raw pointer sound.
struct Disjoint(*mut f32);
unsafe impl Sync for Disjoint {}

/// `outs[k] = mats[k] · x` for every token, as one parallel region.
///
/// Several matrices that read the same input run together so that a 576-wide model does not
/// pay a thread hand-off per matrix; tiles are split into a few chunks per thread so work
/// stealing can balance unequal matrices. Outputs are `[tokens, rows]`. Results do not depend
/// on the thread count or the split: each row is computed whole by one kernel call.
pub fn matmul_many(
    acts: &Activations,
    mats: &[&QMatrix],
    outs: &mut [&mut Vec<f32>],
) -> Result<()> {
    for m in mats {
        if m.cols != acts.cols {
            return Err(ModelError::Shape(format!(
                "{} expects {} inputs, got {}",
                m.name, m.cols, acts.cols
            )));
        }
        acts.prepare(ActKind::of(m.format()));
    }
    let isa = cpu::selected();
    let threads = team::threads().max(1);
    let sinks: Vec<Disjoint> = mats
        .iter()
        .zip(outs.iter_mut())
        .map(|(m, out)| {
            out.clear();
            out.resize(acts.tokens * m.rows, 0.0);
            Disjoint(out.as_mut_ptr())
        })
        .collect();
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    for (k, m) in mats.iter().enumerate() {
        let tiles = m.packed.tiles();
        // Enough chunks for balance, few enough that per-task overhead stays invisible.
        let chunk = tiles.div_ceil(threads * 4).max(1);
        let mut start = 0;
        while start < tiles {
            let end = (start + chunk).min(tiles);
            tasks.push((k, start..end));
            start = end;
        }
    }
    let run = |(k, tiles): &(usize, Range<usize>)| {
        // SAFETY: `isa` is one this CPU runs (`cpu::selected`); each output has
        // `tokens * rows` floats; tasks cover disjoint tiles; the activations were prepared.
        unsafe {
            kernels::gemm_tiles(isa, &mats[*k].packed, acts, tiles.clone(), sinks[*k].0);
        }
    };
    team::run(tasks.len(), &|i| run(&tasks[i]));
    Ok(())
}

/// `out = m · x` for every token.
pub fn matmul(acts: &Activations, m: &QMatrix, out: &mut Vec<f32>) -> Result<()> {
    matmul_many(acts, &[m], &mut [out])
}
