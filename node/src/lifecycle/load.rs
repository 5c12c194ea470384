//! Load: the model file checked once at start (its blocks, how many this node takes, its
//! fingerprint), and the weights of one range read from it.

use std::ops::Range;

use model::fingerprint::{fingerprint, Fingerprint};
use model::{load, BlockStack, GgufFile, LoadOptions, ModelSpec};
use swarm::placement::blocks_for_memory;

use crate::config::{BlockChoice, JoinConfig};
use crate::error::JoinError;

/// A node's fixed costs besides block weights and KV cache (runtime, GGUF header, buffers).
const MEMORY_OVERHEAD_BYTES: u64 = 64 << 20;

/// The model file a node serves from, checked before the network starts, so a wrong file or
/// block choice is one clear error rather than a node that joins and then fails.
pub struct ModelFile {
    pub file: GgufFile,
    pub spec: ModelSpec,
    /// How many blocks this node serves.
    pub count: usize,
    pub fingerprint: Fingerprint,
}

impl ModelFile {
    pub fn open(config: &JoinConfig) -> Result<Self, JoinError> {
        let file = GgufFile::open(&config.model)?;
        let spec = ModelSpec::from_file(&file)?;
        let block_count = spec.block_count;
        let bad_range = |start, end| model::ModelError::BadBlockRange {
            start,
            end,
            count: block_count,
        };
        let count = match &config.blocks {
            BlockChoice::Fixed(r) if r.is_empty() || r.end > block_count => {
                return Err(bad_range(r.start, r.end).into())
            }
            BlockChoice::Fixed(r) => r.len(),
            BlockChoice::Count(n) if *n == 0 || *n > block_count => {
                return Err(bad_range(0, *n).into())
            }
            BlockChoice::Count(n) => *n,
            BlockChoice::Auto { max_memory_bytes } => {
                let block_bytes = block_weight_bytes(&file, 0)?;
                blocks_for_memory(
                    *max_memory_bytes,
                    MEMORY_OVERHEAD_BYTES,
                    block_bytes,
                    spec.kv_bytes_per_token_per_block() as u64,
                    config.cache_tokens as u64,
                    block_count as u32,
                )
                .ok_or(JoinError::NoRoom {
                    max_memory_bytes: *max_memory_bytes,
                })? as usize
            }
        };
        let fingerprint = fingerprint(&file)?;
        Ok(Self {
            file,
            spec,
            count,
            fingerprint,
        })
    }

    /// The error of a block range this model does not have.
    pub fn bad_range(&self, start: usize, end: usize) -> model::ModelError {
        model::ModelError::BadBlockRange {
            start,
            end,
            count: self.spec.block_count,
        }
    }
}

/// Reads the weights of `range`, with a progress bar. Blocks the worker thread: loading is
/// disk and page-fault bound, and nothing else of this node runs meanwhile.
pub fn blocks(model: &ModelFile, range: &Range<usize>) -> Result<BlockStack, JoinError> {
    let (bar, mut progress) =
        crate::progress::loading_bar(&format!("blocks {}..{}", range.start, range.end));
    let slice = tokio::task::block_in_place(|| {
        load(
            &model.file,
            &LoadOptions::blocks(range.clone()),
            &mut progress,
        )
    });
    bar.finish_and_clear();
    Ok(slice?.stack.ok_or(model::ModelError::NotLoaded {
        what: "transformer blocks",
    })?)
}

/// Bytes of the tensors of block `index` in the file (what serving one block costs in weights).
fn block_weight_bytes(file: &GgufFile, index: usize) -> Result<u64, model::ModelError> {
    let prefix = format!("blk.{index}.");
    Ok(file
        .tensors()?
        .iter()
        .filter(|v| v.name.starts_with(&prefix))
        .map(|v| v.len_bytes() as u64)
        .sum())
}
