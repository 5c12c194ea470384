//! Drain: leaving a range without losing anyone's work. New sessions and further steps are
//! refused with SHUTTING_DOWN (clients reroute on that code), the DHT is told OFFLINE, the
//! sessions get `drain_timeout` to move elsewhere, and then the range's tasks are stopped and
//! waited for, which also ends the compute thread once the last handle is gone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::v1::ServerState;
use swarm::load::Load;

use super::serve::Serving;
use crate::announce::Announcer;
use crate::config::JoinConfig;

/// Longest the OFFLINE announcement may take: leaving must not hang on a slow DHT.
const OFFLINE_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn drain(serving: Serving, config: &JoinConfig, announcer: &Announcer) {
    let range = &serving.range;
    tracing::info!(
        "leaving blocks {}..{}: announcing offline",
        range.start,
        range.end
    );
    serving.ctx.leaving.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(
        OFFLINE_ANNOUNCE_TIMEOUT,
        announcer.announce(
            range,
            ServerState::Offline,
            serving.speed,
            0,
            Load::default(),
        ),
    )
    .await;
    let drained = swarm::deadline::after(config.drain_timeout);
    while serving.compute.stats.sessions.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < drained
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serving.stop.cancel();
    serving.tasks.close();
    serving.tasks.wait().await;
}
