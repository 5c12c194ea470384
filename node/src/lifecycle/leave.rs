//! Leave: the node's tasks that outlive any one range (the libp2p host, the status page and
//! its swarm watcher), started together and stopped in the reverse order: the page first, so
//! nothing asks the network any more, then the network, whose task is awaited so the swarm is
//! closed before the node returns.

use std::sync::Arc;

use swarm::status::ModelInfo;
use swarm::{Host, NetHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ModelFile;
use crate::config::JoinConfig;
use crate::error::JoinError;
use crate::host::ListenAddrs;
use crate::metrics::NodeMetrics;

pub struct Background {
    host: Host,
    net_stop: CancellationToken,
    page: TaskTracker,
    page_stop: CancellationToken,
}

impl Background {
    /// Starts the host and, when asked for, the status page.
    pub async fn start(
        config: &JoinConfig,
        model: &ModelFile,
        info: ModelInfo,
        metrics: &Arc<NodeMetrics>,
    ) -> Result<(Self, ListenAddrs), JoinError> {
        let net_stop = CancellationToken::new();
        let (host, addrs) = crate::host::start(&config.net, &net_stop)?;
        let background = Self {
            host,
            net_stop,
            page: TaskTracker::new(),
            page_stop: CancellationToken::new(),
        };
        if let Some(addr) = config.http_listen {
            let started = crate::status_page::start(
                addr,
                background.net(),
                model.fingerprint,
                info,
                metrics.clone(),
                &background.page,
                &background.page_stop,
            )
            .await;
            if let Err(e) = started {
                background.leave().await;
                return Err(e);
            }
        }
        Ok((background, addrs))
    }

    pub fn net(&self) -> &NetHandle {
        &self.host.handle
    }

    pub async fn leave(self) {
        tracing::debug!(phase = %super::Phase::Leave, "stopping the status page, then the network");
        self.page_stop.cancel();
        self.page.close();
        self.page.wait().await;
        self.net_stop.cancel();
        if let Err(e) = self.host.task.await {
            tracing::warn!("network task ended abnormally: {e}");
        }
    }
}
