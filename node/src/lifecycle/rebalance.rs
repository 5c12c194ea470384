//! Rebalance: whether moving to other blocks would make the swarm's weakest block worthwhile
//! faster (the decision itself is `swarm::placement::should_move`, a pure function).

use std::ops::Range;
use std::time::Duration;

use swarm::placement::should_move;

use super::ModelFile;
use crate::announce::{served, Announcer};
use crate::config::JoinConfig;

/// When to check next. Checks are staggered so servers of the same range do not all move at
/// once.
pub fn next_check(every: Duration) -> tokio::time::Instant {
    let jitter = rand::random_range(0..=every.as_millis() as u64 / 2);
    tokio::time::Instant::now() + every + Duration::from_millis(jitter)
}

/// The range to move to, if moving is worth it now.
pub async fn better_range(
    config: &JoinConfig,
    model: &ModelFile,
    announcer: &Announcer,
) -> Option<Range<usize>> {
    let block_count = model.spec.block_count as u32;
    let swarm = served(&announcer.net, &announcer.fp, block_count).await;
    let me = announcer.net.peer_id();
    let m = should_move(&swarm, &me, block_count, config.rebalance_min_gain)?;
    tracing::info!(
        "the weakest block would go from {:.1} to {:.1} tokens/s",
        m.min_before,
        m.min_after
    );
    Some(m.to.start as usize..m.to.end as usize)
}
