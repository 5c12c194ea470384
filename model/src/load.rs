//! Loads a slice of a model: blocks `start..end`, plus the embeddings and head only when asked.
//!
//! Loading means checking every tensor's shape and format and faulting its pages in; nothing is
//! copied, so the resident memory of a node is the weights of its slice.

use std::ops::Range;

use crate::blocks::{BlockStack, DecoderBlock, FreqFactors};
use crate::embed::Embedding;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::head::Head;
use crate::matrix::QMatrix;
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

    /// Bytes of weights this slice holds, counting a tied embedding/head matrix once.
    pub fn weight_bytes(&self) -> usize {
        let blocks = self.stack.as_ref().map_or(0, BlockStack::weight_bytes);
        let embd = self
            .embedding
            .as_ref()
            .map_or(0, |e| e.matrix().weight_bytes());
        let head = match &self.head {
            Some(h) if self.spec.tied_embeddings && self.embedding.is_some() => {
                h.weight_bytes() - h.matrix().weight_bytes()
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
    // Progress counts the bytes of every tensor that gets packed, as it is packed.
    let bytes_with = |prefix: &str| -> Result<u64> {
        Ok(file
            .tensors()?
            .iter()
            .filter(|v| v.name.starts_with(prefix))
            .map(|v| v.len_bytes() as u64)
            .sum())
    };
    let block_bytes = range
        .clone()
        .map(|i| bytes_with(&format!("blk.{i}.")))
        .collect::<Result<Vec<_>>>()?;
    let tied = spec.tied_embeddings;
    let needs_embd = opts.embeddings || (opts.head && tied);
    let embd_bytes = if needs_embd {
        bytes_with("token_embd.")?
    } else {
        0
    };
    let head_bytes = if opts.head { bytes_with("output")? } else { 0 };
    let total = block_bytes.iter().sum::<u64>() + embd_bytes + head_bytes;
    let mut done = 0u64;
    progress(0, total);

    let mut blocks = Vec::with_capacity(range.len());
    for (i, bytes) in range.clone().zip(&block_bytes) {
        blocks.push(DecoderBlock::load(file, &spec, i)?);
        done += bytes;
        progress(done, total);
    }
    // A tied head multiplies by the embedding table: pack it once for both.
    let table = needs_embd
        .then(|| QMatrix::new(file.tensor("token_embd.weight")?))
        .transpose()?;
    done += embd_bytes;
    progress(done, total);
    let embedding = match (&table, opts.embeddings) {
        (Some(t), true) => Some(Embedding::new(t.clone()).with_scale(spec.embedding_scale)),
        _ => None,
    };
    let head = match opts.head {
        true => Some(Head::load(file, &spec, table.as_ref().filter(|_| tied))?),
        false => None,
    };
    done += head_bytes;
    progress(done, total);

    let stack = if range.is_empty() {
        None
    } else {
        let factors = FreqFactors::load(file, &spec)?;
        Some(BlockStack::new(&spec, range, blocks, factors))
    };
    Ok(ModelSlice {
        spec,
        stack,
        embedding,
        head,
    })
}
