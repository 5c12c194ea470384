//! The compute thread's limits, as `join` and `serve-api --local` both take them.

use clap::Args;
use node::compute::ComputeLimits;

#[derive(Args, Debug)]
pub struct ComputeArgs {
    /// Most inference sessions served, and batched, at once.
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,
    /// KV-cache positions for all sessions together (each on every block it uses), taken in
    /// pages as sessions grow.
    #[arg(long, default_value_t = 16384)]
    pub cache_tokens: usize,
    /// Most prompt rows computed in one batch; longer prompts run in chunks with other
    /// sessions' steps in between (default: sized to about 20 ms of work as measured).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub prefill_chunk: Option<u64>,
}

impl ComputeArgs {
    pub fn max_sessions(&self) -> usize {
        self.max_sessions.max(1)
    }

    pub fn prefill_chunk(&self) -> Option<usize> {
        self.prefill_chunk.map(|n| n as usize)
    }

    /// The limits for blocks that take `ms_per_row` per prompt row (measured), served in this
    /// process (`serve-api --local`). No remote peer reaches them: each generation is its own
    /// "peer" to the scheduler, so a per-peer limit would only shrink what one request may use.
    pub fn limits(&self, ms_per_row: f64) -> ComputeLimits {
        ComputeLimits {
            max_sessions: self.max_sessions(),
            cache_tokens: self.cache_tokens,
            max_sessions_per_peer: self.max_sessions(),
            cache_tokens_per_peer: self.cache_tokens,
            prefill_chunk: self
                .prefill_chunk()
                .unwrap_or_else(|| ComputeLimits::prefill_chunk_for(ms_per_row)),
            adaptive_chunk: self.prefill_chunk.is_none(),
        }
    }
}
