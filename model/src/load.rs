//! Loads a slice of a model: blocks `start..end`, plus the embeddings and head only when asked.
//!
//! Loading means checking every tensor's shape and format and faulting its pages in; nothing is
//! copied, so the resident memory of a node is the weights of its slice.

use std::ops::Range;

use crate::blocks::{load_vector, BlockStack, DecoderBlock};
use crate::embed::Embedding;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::head::Head;
use crate::spec::ModelSpec;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub blocks: Range<usize>,
    pub embeddings: bool,
    pub head: bool,
}

impl LoadOptions {
    /// Everything: what a single-process run needs.
    pub fn full(spec: &ModelSpec) -> Self {
        Self {
            blocks: 0..spec.block_count,
            embeddings: true,
            head: true,
        }
    }

    /// Only the blocks: what a serving peer needs.
    pub fn blocks(range: Range<usize>) -> Self {
        Self {
            blocks: range,
            embeddings: false,
            head: false,
        }
    }

    /// Only embeddings and head: what a swarm client needs.
    pub fn client() -> Self {
        Self {
            blocks: 0..0,
            embeddings: true,
            head: true,
        }
    }
}

/// What one process holds of a model.
pub struct ModelSlice {
    pub spec: ModelSpec,
    pub stack: Option<BlockStack>,
    pub embedding: Option<Embedding>,
    pub head: Option<Head>,
}

impl ModelSlice {
    pub fn stack(&self) -> Result<&BlockStack> {
        self.stack.as_ref().ok_or(ModelError::NotLoaded {
            what: "transformer blocks",
        })
    }

    pub fn embedding(&self) -> Result<&Embedding> {
        self.embedding.as_ref().ok_or(ModelError::NotLoaded {
            what: "the token embedding",
        })
    }

    pub fn head(&self) -> Result<&Head> {
        self.head.as_ref().ok_or(ModelError::NotLoaded {
            what: "the LM head",
        })
    }

    /// Bytes of weights this slice maps, counting a tied embedding/head matrix once.
    pub fn weight_bytes(&self) -> usize {
        let blocks = self.stack.as_ref().map_or(0, BlockStack::weight_bytes);
        let embd = self
            .embedding
            .as_ref()
            .map_or(0, |e| e.matrix().view().len_bytes());
        let head = match &self.head {
            Some(h) if self.spec.tied_embeddings && self.embedding.is_some() => {
                h.weight_bytes() - h.matrix().view().len_bytes()
            }
            Some(h) => h.weight_bytes(),
            None => 0,
        };
        blocks + embd + head
    }
}

/// Loads `opts` from `file`, reporting progress in bytes through `progress(done, total)`.
pub fn load(
    file: &GgufFile,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ModelSlice> {
    let spec = ModelSpec::from_file(file)?;
    let range = opts.blocks.clone();
    if range.start > range.end || range.end > spec.block_count {
        return Err(ModelError::BadBlockRange {
            start: range.start,
            end: range.end,
            count: spec.block_count,
        });
    }
    let mut blocks = Vec::with_capacity(range.len());
    for i in range.clone() {
        blocks.push(DecoderBlock::load(file, &spec, i)?);
    }
    let embedding = opts.embeddings.then(|| Embedding::load(file)).transpose()?;
    let head = opts.head.then(|| Head::load(file, &spec)).transpose()?;

    // Every view was validated above; now fault the pages in, reporting as we go.
    let mut views: Vec<_> = blocks
        .iter()
        .flat_map(|b| b.matrices().map(|m| m.view().clone()))
        .collect();
    if let Some(e) = &embedding {
        views.push(e.matrix().view().clone());
    }
    if let Some(h) = &head {
        if !(spec.tied_embeddings && embedding.is_some()) {
            views.push(h.matrix().view().clone());
        }
    }
    let total: u64 = views.iter().map(|v| v.len_bytes() as u64).sum();
    let mut done = 0u64;
    progress(0, total);
    for v in &views {
        v.prefault();
        done += v.len_bytes() as u64;
        progress(done, total);
    }

    let stack = if range.is_empty() {
        None
    } else {
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            Some(load_vector(file, "rope_freqs.weight", spec.rope_dim / 2)?)
        } else {
            None
        };
        Some(BlockStack::new(&spec, range, blocks, freq_factors))
    };
    Ok(ModelSlice {
        spec,
        stack,
        embedding,
        head,
    })
}
