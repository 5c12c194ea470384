//! Measure: the loaded blocks timed on model-sized inputs, for the speed the node announces
//! (clients plan routes with it, servers place themselves with it).

use model::BlockStack;

use crate::announce::Speed;
use crate::compute::measure_speed;
use crate::error::JoinError;

/// A 32-token prefill and 8 decode steps: long enough to be stable, short enough that a
/// joining node is not kept from serving.
const PREFILL_TOKENS: usize = 32;
const DECODE_STEPS: usize = 8;

pub fn speed(stack: &BlockStack) -> Result<Speed, JoinError> {
    let (decode, prefill) =
        tokio::task::block_in_place(|| measure_speed(stack, PREFILL_TOKENS, DECODE_STEPS))?;
    tracing::info!(
        decode_ms_per_block = format!("{decode:.3}"),
        prefill_ms_per_block = format!("{prefill:.2}"),
        weights_mib = format!("{:.1}", stack.weight_bytes() as f64 / (1 << 20) as f64),
        "blocks loaded and measured"
    );
    Ok(Speed {
        decode_ms_per_block: decode,
        prefill_ms_per_block: prefill,
    })
}

/// Milliseconds one prompt row takes through `blocks` of the measured blocks.
pub fn prefill_ms_per_row(speed: &Speed, blocks: usize) -> f64 {
    speed.prefill_ms_per_block * blocks as f64 / PREFILL_TOKENS as f64
}
