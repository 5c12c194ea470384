//! Token embeddings: the first thing the client does with token ids.

use crate::blocks::Hidden;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::matrix::QMatrix;

#[derive(Clone)]
pub struct Embedding {
    table: QMatrix,
    /// Gemma multiplies embeddings by `sqrt(d)` before the first block.
    scale: Option<f32>,
}

impl Embedding {
    pub fn load(file: &GgufFile) -> Result<Self> {
        Ok(Self::new(QMatrix::new(file.tensor("token_embd.weight")?)?))
    }

    /// An embedding over an already packed table (shared with a tied LM head).
    pub fn new(table: QMatrix) -> Self {
        Self { table, scale: None }
    }

    /// The same table with the family's embedding scale (`ModelSpec::embedding_scale`).
    pub fn with_scale(mut self, scale: Option<f32>) -> Self {
        self.scale = scale;
        self
    }

    pub fn matrix(&self) -> &QMatrix {
        &self.table
    }

    pub fn vocab_size(&self) -> usize {
        self.table.rows
    }

    /// Hidden states `[ids.len(), dim]`; an id outside the vocabulary is an error, not a panic.
    pub fn embed(&self, ids: &[u32]) -> Result<Hidden> {
        let dim = self.table.cols;
        let mut data = vec![0f32; ids.len() * dim];
        for (&id, row) in ids.iter().zip(data.chunks_exact_mut(dim)) {
            if id as usize >= self.table.rows {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.table.rows,
                });
            }
            self.table.dequantize_row(id as usize, row)?;
        }
        if let Some(s) = self.scale {
            crate::activation::scale(&mut data, s);
        }
        Hidden::new(ids.len(), dim, data)
    }
}
