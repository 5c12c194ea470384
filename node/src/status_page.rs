//! A node's own status page and `/metrics` (`join --http-listen`): the same page as the
//! gateway's (`swarm::page`), seen from this node, with what it serves and how fast.

use std::sync::Arc;
use std::time::Duration;

use model::fingerprint::Fingerprint;
use swarm::page::{self, StatusSource, SwarmSnapshot};
use swarm::status::ModelInfo;
use swarm::NetHandle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::JoinError;
use crate::metrics::NodeMetrics;

pub struct NodeStatus {
    pub info: ModelInfo,
    pub peer_id: String,
    pub metrics: Arc<NodeMetrics>,
    pub swarm: watch::Receiver<SwarmSnapshot>,
}

impl StatusSource for NodeStatus {
    fn status(&self) -> serde_json::Value {
        let (swarm, swarm_error) = page::swarm_fields(&self.swarm.borrow());
        let m = &self.metrics;
        let (start, end) = (m.block_start.get(), m.block_end.get());
        let free = m.kv_cache_capacity_tokens.get() - m.kv_cache_reserved_tokens.get();
        serde_json::json!({
            "role": "node",
            "model": self.info,
            "peer_id": self.peer_id,
            "swarm": swarm,
            "swarm_error": swarm_error,
            "live": {
                "blocks": if end > start { format!("{start}..{end}") } else { "loading".into() },
                "sessions": m.sessions.get(),
                "tokens_per_second": m.rate.per_second(),
                "steps_total": m.steps.get(),
                "free_cache_tokens": free.max(0),
                "batch_occupancy": m.batch_occupancy(),
            },
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

/// Serves the status page and `/metrics` on `addr` from tasks of `tasks` that end with
/// `shutdown`, and says where on stdout (scripts wait for it).
pub async fn start(
    addr: std::net::SocketAddr,
    net: &NetHandle,
    fp: Fingerprint,
    info: ModelInfo,
    metrics: Arc<NodeMetrics>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), JoinError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| JoinError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| JoinError::Http { addr, source })?;
    let (swarm, refresh) = page::swarm_watcher(
        net.clone(),
        fp,
        info.clone(),
        Duration::from_secs(3),
        shutdown.clone(),
    );
    tasks.spawn(refresh);
    let status = Arc::new(NodeStatus {
        swarm,
        info,
        peer_id: net.peer_id().to_string(),
        metrics,
    });
    let router = page::router(status);
    let stop = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = page::serve(listener, router, stop).await {
            tracing::warn!("status page stopped: {e}");
        }
    });
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "status page on http://{bound}");
        let _ = out.flush();
    }
    tracing::info!("status page on http://{bound}/, metrics on http://{bound}/metrics");
    Ok(())
}
