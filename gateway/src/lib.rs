//! What people who do not write Rust use: an OpenAI-compatible HTTP API, a gRPC service, a
//! status page and Prometheus metrics, all on one port, backed by one swarm client or by every
//! block in this process ([`Blocks`]).
//!
//! `edge-node serve-api` wires it up; [`Gateway::start`] and [`Gateway::router`] are the
//! library entry points for embedding it elsewhere.

pub mod auth;
pub mod blocks;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod openai;
pub mod per_client;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use coordinator::ClientModel;
use swarm::page::{self, RateMeter, StatusSource, SwarmSnapshot};
use swarm::status::ModelInfo;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

pub use auth::{ApiKeyError, ApiKeys};
pub use blocks::{Blocks, LocalBlocks};
pub use error::{ApiError, ErrorKind};
use metrics::GatewayMetrics;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Generations running at once; more wait in the queue.
    pub max_concurrent: usize,
    /// Requests allowed to wait; beyond that they are refused with 429.
    pub max_waiting: usize,
    pub queue_timeout: Duration,
    pub generation_timeout: Duration,
    /// How often the status page's swarm snapshot (and gRPC health) is refreshed.
    pub status_interval: Duration,
    /// With keys, every OpenAI and gRPC request must present one (see [`auth`]).
    pub api_keys: Option<ApiKeys>,
    /// Generations one client address runs at once (IPv6 by /64); its further requests wait
    /// for one of its own slots. 0: three quarters of `max_concurrent` (at least one), as a
    /// node gives one peer three quarters of its sessions.
    pub max_per_client: usize,
}

impl GatewayConfig {
    /// [`GatewayConfig::max_per_client`], with 0 resolved.
    pub fn per_client_limit(&self) -> usize {
        match self.max_per_client {
            0 => (self.max_concurrent.max(1) * 3).div_ceil(4),
            n => n,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            default_max_tokens: 256,
            max_concurrent: 4,
            max_waiting: 64,
            queue_timeout: Duration::from_secs(60),
            generation_timeout: Duration::from_secs(600),
            status_interval: Duration::from_secs(3),
            api_keys: None,
            max_per_client: 0,
        }
    }
}

pub struct Gateway {
    pub config: GatewayConfig,
    pub info: ModelInfo,
    pub metrics: GatewayMetrics,
    blocks: Blocks,
    model: Arc<ClientModel>,
    swarm: watch::Receiver<SwarmSnapshot>,
    permits: Arc<Semaphore>,
    per_client: Arc<per_client::PerClient>,
    waiting: AtomicUsize,
    rate: RateMeter,
    /// Unix seconds when the gateway started (the model's `created` in the OpenAI API).
    created: u64,
}

impl Gateway {
    /// Starts the background swarm snapshots; `model_id` is the name clients use.
    pub fn start(
        blocks: Blocks,
        model: ClientModel,
        model_id: String,
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let info = ModelInfo::new(model_id, &model.fingerprint, &model.spec);
        let swarm = blocks.watch(&model, &info, config.status_interval, shutdown);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            per_client: Arc::default(),
            config,
            info,
            metrics: GatewayMetrics::default(),
            blocks,
            model: Arc::new(model),
            swarm,
            waiting: AtomicUsize::new(0),
            rate: RateMeter::new(Duration::from_secs(10)),
            created: swarm::discovery::now_ms() / 1000,
        })
    }

    /// Every endpoint: OpenAI under `/v1`, gRPC (with reflection and health), the status page
    /// at `/`, `/api/status` and `/metrics`. With API keys, the OpenAI and gRPC endpoints
    /// (health excepted) answer only requests that bring one.
    pub fn router(self: &Arc<Self>, shutdown: CancellationToken) -> Router {
        let api = openai::router(self.clone()).merge(grpc::router(self.clone(), shutdown));
        let api = match &self.config.api_keys {
            Some(keys) => api.layer(axum::middleware::from_fn_with_state(
                keys.clone(),
                auth::require_key,
            )),
            None => api,
        };
        api.merge(page::router(self.clone()))
            .fallback(openai::not_found)
    }

    /// The latest swarm snapshot (refreshed every `status_interval`).
    pub fn swarm(&self) -> SwarmSnapshot {
        self.swarm.borrow().clone()
    }

    /// Swarm gauges are set from the snapshot when someone reads them.
    fn update_swarm_gauges(&self, snap: &SwarmSnapshot) {
        if let Some(Ok(view)) = snap {
            let online = view.peers.iter().filter(|p| p.state == "online").count();
            self.metrics.swarm_peers_online.set(online as i64);
            self.metrics.swarm_complete.set(view.complete() as i64);
        }
    }

    pub fn swarm_updates(&self) -> watch::Receiver<SwarmSnapshot> {
        self.swarm.clone()
    }
}

impl StatusSource for Gateway {
    fn status(&self) -> serde_json::Value {
        let snap = self.swarm();
        self.update_swarm_gauges(&snap);
        let (swarm, swarm_error) = page::swarm_fields(&snap);
        let mut status = serde_json::json!({
            "role": "gateway",
            "model": self.info,
            "swarm": swarm,
            "swarm_error": swarm_error,
            "live": {
                "tokens_per_second": self.rate.per_second(),
                "active": self.metrics.active.get(),
                "tokens_total": self.metrics.generated_tokens.get(),
                "requests_total": self.metrics.requests_total(),
                "reroutes_total": self.metrics.reroutes.get(),
            },
        });
        if let Some(node) = self.blocks.node_metrics() {
            status["local"] = true.into();
            status["live"]["batch_occupancy"] = node.batch_occupancy().into();
        }
        status
    }

    fn metrics(&self) -> String {
        self.update_swarm_gauges(&self.swarm());
        let text = self.metrics.encode();
        match self.blocks.node_metrics() {
            // One exposition: the gateway's families, then the compute thread's, one EOF.
            Some(node) => {
                let gateway = text.strip_suffix("# EOF\n").unwrap_or(&text);
                format!("{gateway}{}", node.encode())
            }
            None => text,
        }
    }
}
