//! `edge-node bootstrap`: a peer that hosts no blocks, the swarm's meeting point.

use tokio_util::sync::CancellationToken;

use crate::config::NetOptions;
use crate::error::JoinError;

/// Runs the host until `shutdown`, then stops it and waits for its task to end, so the
/// process exits with the swarm closed rather than torn down.
pub async fn run_bootstrap(opts: NetOptions, shutdown: CancellationToken) -> Result<(), JoinError> {
    let net_shutdown = CancellationToken::new();
    let (host, _addrs) = crate::host::start(&opts, &net_shutdown)?;
    shutdown.cancelled().await;
    net_shutdown.cancel();
    if let Err(e) = host.task.await {
        tracing::warn!("network task ended abnormally: {e}");
    }
    Ok(())
}
