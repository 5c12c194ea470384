//! A node's own status page and `/metrics` (`join --http-listen`): the same page as the
//! gateway's, seen from this node, with what it serves and how fast.

use std::sync::Arc;

use coordinator::status::ModelInfo;
use gateway::page::{self, StatusSource, SwarmSnapshot};
use tokio::sync::watch;

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
            },
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}
