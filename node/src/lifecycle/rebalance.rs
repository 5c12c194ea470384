//! Rebalance: whether moving to other blocks would make the swarm's weakest block worthwhile
//! faster (the decision itself is `swarm::placement::should_move`, a pure function).

use std::ops::Range;
use std::time::Duration;

use swarm::placement::should_move;

use super::ModelFile;
use crate::announce::{served, Announcer, Evidence};
use crate::config::JoinConfig;
use crate::probe::Probes;

/// When to check next. Checks are staggered so servers of the same range do not all move at
/// once: a random extra of up to half the period. Any period is safe here (the flag is bounded
/// where it is parsed, but a library caller may pass anything).
pub fn next_check(every: Duration) -> tokio::time::Instant {
    let every = swarm::deadline::bounded(every);
    let jitter = rand::random_range(0..=u64::try_from(every.as_millis() / 2).unwrap_or(u64::MAX));
    swarm::deadline::after(every.saturating_add(Duration::from_millis(jitter)))
}

/// The range to move to, if moving is worth it now. Other servers count only as measured from
/// here (`probes` keeps the measurements between checks).
pub async fn better_range(
    config: &JoinConfig,
    model: &ModelFile,
    announcer: &Announcer,
    probes: &mut Probes,
) -> Option<Range<usize>> {
    let block_count = model.spec.block_count as u32;
    let dim = model.spec.embedding_length;
    let swarm = served(
        &announcer.net,
        &announcer.fp,
        block_count,
        dim,
        probes,
        Evidence::Move,
    )
    .await;
    let me = announcer.net.peer_id();
    let m = should_move(&swarm, &me, block_count, config.rebalance_min_gain)?;
    tracing::info!(
        "the weakest block would go from {:.1} to {:.1} tokens/s",
        m.min_before,
        m.min_after
    );
    Some(m.to.start as usize..m.to.end as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_check_is_after_the_period_whatever_the_period() {
        let now = tokio::time::Instant::now();
        let at = next_check(Duration::from_secs(30));
        assert!(at >= now + Duration::from_secs(30));
        assert!(at <= tokio::time::Instant::now() + Duration::from_secs(45));
        // Overflowed `Instant + every + jitter` before.
        assert!(next_check(Duration::MAX) > now + Duration::from_secs(86_400));
    }
}
