//! Load: the model file checked once at start (its blocks, how many this node takes, its
//! fingerprint), and the weights of one range read from it.

use std::ops::Range;

use model::fingerprint::{fingerprint, Fingerprint};
use model::{load, BlockStack, GgufFile, LoadOptions, ModelSpec};
use swarm::placement::blocks_for_memory;

use crate::config::{BlockChoice, JoinConfig};
use crate::error::{BlockCost, JoinError};

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
            // The command line refuses `auto` without a budget; a library caller gets the
            // whole model.
            BlockChoice::Auto => block_count,
        };
        let count = match config.max_memory_bytes {
            Some(budget) => fit_budget(&file, &spec, config, budget, count)?,
            None => count,
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

/// The number of blocks to serve under `budget`: all of `asked` for `auto`, else `asked`
/// itself, refused when it does not fit. Decided from the tensor directory alone, before any
/// weight is read. A block's cost is its weights plus a KV cache of `--cache-tokens`
/// positions: the largest block's for a count placed later, the range's own for a fixed range.
fn fit_budget(
    file: &GgufFile,
    spec: &ModelSpec,
    config: &JoinConfig,
    budget: u64,
    asked: usize,
) -> Result<usize, JoinError> {
    let weights = (0..spec.block_count)
        .map(|i| block_weight_bytes(file, i))
        .collect::<Result<Vec<_>, _>>()?;
    let kv_per_token = spec.kv_bytes_per_token_per_block() as u64;
    let cost = |weight_bytes: u64| BlockCost {
        weight_bytes,
        kv_bytes: kv_per_token.saturating_mul(config.cache_tokens as u64),
        cache_tokens: config.cache_tokens,
        overhead_bytes: MEMORY_OVERHEAD_BYTES,
    };
    let largest = cost(weights.iter().copied().max().unwrap_or(0));
    let fit = |block_bytes: u64| {
        blocks_for_memory(
            budget,
            MEMORY_OVERHEAD_BYTES,
            block_bytes,
            kv_per_token,
            config.cache_tokens as u64,
            spec.block_count as u32,
        )
    };
    let fit_largest = fit(largest.weight_bytes).ok_or(JoinError::NoRoom {
        max_memory_bytes: budget,
        cost: largest,
    })? as usize;
    match &config.blocks {
        BlockChoice::Auto => Ok(fit_largest),
        BlockChoice::Count(_) if asked <= fit_largest => Ok(asked),
        BlockChoice::Fixed(r) => {
            // Exact for a known range: its own blocks, each with its KV cache.
            let need = weights[r.clone()]
                .iter()
                .map(|w| w + largest.kv_bytes)
                .sum::<u64>()
                .saturating_add(MEMORY_OVERHEAD_BYTES);
            if need <= budget {
                return Ok(asked);
            }
            let mean = weights[r.clone()].iter().sum::<u64>() / asked.max(1) as u64;
            Err(JoinError::TooManyBlocks {
                max_memory_bytes: budget,
                asked,
                fit: fit(mean).unwrap_or(0) as usize,
                cost: cost(mean),
            })
        }
        BlockChoice::Count(_) => Err(JoinError::TooManyBlocks {
            max_memory_bytes: budget,
            asked,
            fit: fit_largest,
            cost: largest,
        }),
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
