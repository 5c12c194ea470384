//! Names, versions and size bounds of what edge-swarm speaks between peers. Both sides take
//! them from here, so a server and a client built from the same tree can never disagree on a
//! protocol name or on how large a frame may be.

use crate::TensorLimits;

/// libp2p stream protocol of inference sessions (one stream per session). The trailing number
/// is the protocol version: a change peers of the previous version cannot read bumps it, and
/// old and new peers then simply do not find each other's streams.
pub const INFERENCE_PROTOCOL: &str = "/edge-swarm/inference/1";

/// Kademlia protocol name: our own, so edge-swarm peers never mix with other DHTs.
pub const DHT_PROTOCOL: &str = "/edge-swarm/kad/1.0.0";

/// Protocol version peers exchange through libp2p identify.
pub const IDENTIFY_PROTOCOL: &str = "/edge-swarm/1.0.0";

/// Largest first frame of a session: an `OpenSession` is a fingerprint and a few integers.
pub const MAX_OPEN_FRAME: usize = 4096;

/// Most rows of one step a node takes unless configured otherwise (`join --max-step-tokens`),
/// and what a client assumes of a node that does not say (`SessionOpened.max_step_tokens` 0).
///
/// Why bound a step at all, when the compute thread already cuts long prompts into chunks: a
/// step is one request-answer exchange, so its whole input and output sit in memory at once on
/// both sides, its answer is one frame, and the client's step timeout covers all of it. A
/// 4,000-row step kept a node's thread busy for over a minute in one exchange; at 512 rows the
/// answer of a 576-wide model is 1.2 MB in f32, and the client's timeout covers one chunk of
/// work, not a whole prompt. 512 is also the largest chunk the node's scheduler runs in one
/// iteration, so cutting a prompt into steps of this size adds no iterations on the node, only
/// one round trip per 512 rows.
pub const DEFAULT_MAX_STEP_TOKENS: usize = 512;

/// The step bound of a session as its node announced it (`SessionOpened.max_step_tokens`);
/// 0 means the node did not say, and the protocol default holds.
pub fn step_bound(announced: u32) -> usize {
    match announced {
        0 => DEFAULT_MAX_STEP_TOKENS,
        n => n as usize,
    }
}

/// Room for the protobuf framing around a step's tensor (tags, lengths, position, timing).
const FRAME_HEADROOM: usize = 64 * 1024;

/// Largest step frame either side accepts in a session of `max_length` positions of width
/// `dim`: a whole-context prefill in f32, the widest wire dtype, plus framing.
pub fn max_step_frame(max_length: usize, dim: usize) -> usize {
    max_length
        .saturating_mul(dim)
        .saturating_mul(4)
        .saturating_add(FRAME_HEADROOM)
}

/// Bounds of the hidden states of `tokens` positions of width `dim`: a `[tokens, dim]` matrix.
pub fn hidden_limits(tokens: usize, dim: usize) -> TensorLimits {
    TensorLimits {
        max_elements: tokens.saturating_mul(dim),
        max_rank: 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_frame_bound_fits_a_full_f32_prefill() {
        assert_eq!(max_step_frame(2048, 576), 2048 * 576 * 4 + 64 * 1024);
        assert_eq!(max_step_frame(usize::MAX, 2), usize::MAX);
    }
}
