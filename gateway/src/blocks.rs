//! Where a gateway's transformer blocks run: through a swarm of peers, or in this process on a
//! compute thread with the same batching scheduler a node uses (`serve-api --local`, for people
//! with one device). Generation, the APIs and the status page are the same either way.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use coordinator::generate::{Backend, GenerateError};
use coordinator::session::{InferenceSession, RouteHop};
use coordinator::{ClientModel, SwarmClient};
use libp2p::PeerId;
use model::Hidden;
use node::compute::{ComputeError, ComputeHandle, SessionId};
use node::metrics::NodeMetrics;
use swarm::page::SwarmSnapshot;
use swarm::status::{ModelInfo, PeerView, SwarmView};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ErrorKind};

pub enum Blocks {
    Swarm(Box<SwarmClient>),
    Local(LocalBlocks),
}

/// Every block of the model in this process.
pub struct LocalBlocks {
    pub compute: ComputeHandle,
    pub metrics: Arc<NodeMetrics>,
    /// Measured compute time of one decode step per block (for the status view).
    pub decode_ms_per_block: f64,
}

impl Blocks {
    /// A session over every block for `max_length` positions.
    pub(crate) async fn open(
        &self,
        model: &ClientModel,
        model_id: &str,
        max_length: u32,
    ) -> Result<Session, ApiError> {
        match self {
            Blocks::Swarm(client) => InferenceSession::open(client.router(model), max_length)
                .await
                .map(Session::Swarm)
                .map_err(|e| {
                    ApiError::new(
                        ErrorKind::SwarmUnavailable,
                        format!("the swarm cannot serve {model_id}: {e}"),
                    )
                }),
            Blocks::Local(local) => {
                let blocks = 0..model.spec.block_count;
                // Each generation is its own "peer" to the scheduler, so prompt chunks are
                // shared fairly between requests.
                let id = local
                    .compute
                    .open(blocks, max_length as usize, PeerId::random())
                    .await
                    .map_err(|e| match e {
                        ComputeError::CacheFull { .. } | ComputeError::TooManySessions(_) => {
                            ApiError::new(ErrorKind::Overloaded, format!("{e}; try again later"))
                        }
                        e => ApiError::new(
                            ErrorKind::SwarmUnavailable,
                            format!("cannot run {model_id}: {e}"),
                        ),
                    })?;
                Ok(Session::Local(LocalSession {
                    compute: local.compute.clone(),
                    id,
                }))
            }
        }
    }

    /// The swarm's state for status pages and gRPC health: watched in the swarm, and for local
    /// blocks a one-peer swarm (this process) refreshed with its free cache.
    pub(crate) fn watch(
        &self,
        model: &ClientModel,
        info: &ModelInfo,
        every: Duration,
        shutdown: CancellationToken,
    ) -> watch::Receiver<SwarmSnapshot> {
        match self {
            Blocks::Swarm(client) => swarm::page::watch_swarm(
                client.net().clone(),
                model.fingerprint,
                info.clone(),
                every,
                shutdown,
            ),
            Blocks::Local(local) => {
                let blocks = 0..model.spec.block_count as u32;
                let info = info.clone();
                let view = move |compute: &ComputeHandle, decode: f64| {
                    Some(Ok(local_view(
                        info.clone(),
                        blocks.clone(),
                        compute,
                        decode,
                    )))
                };
                let (tx, rx) = watch::channel(view(&local.compute, local.decode_ms_per_block));
                let (compute, decode) = (local.compute.clone(), local.decode_ms_per_block);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tick.tick() => {
                                if tx.send(view(&compute, decode)).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
                rx
            }
        }
    }

    /// The node's metrics too when the blocks run here (batch sizes, queue waits, cache).
    pub(crate) fn node_metrics(&self) -> Option<&NodeMetrics> {
        match self {
            Blocks::Swarm(_) => None,
            Blocks::Local(local) => Some(&local.metrics),
        }
    }
}

fn local_view(
    model: ModelInfo,
    blocks: Range<u32>,
    compute: &ComputeHandle,
    decode_ms_per_block: f64,
) -> SwarmView {
    let n = blocks.len();
    let load = compute.load();
    let step_ms = decode_ms_per_block * n as f64;
    SwarmView {
        model,
        peers: vec![PeerView {
            peer_id: "this process".into(),
            start_block: blocks.start,
            end_block: blocks.end,
            state: "online",
            decode_ms_per_block: decode_ms_per_block as f32,
            tokens_per_second: if step_ms > 0.0 {
                (1e3 / step_ms) as f32
            } else {
                0.0
            },
            free_cache_tokens: compute.free_cache_tokens(),
            sessions: load.sessions,
            max_sessions: load.max_sessions,
            waiting_steps: load.waiting_steps,
            reported_offline: false,
            rtt_ms: None,
            version: env!("CARGO_PKG_VERSION").into(),
            announced_ms_ago: 0,
        }],
        servers_per_block: vec![1; n],
        first_gap: None,
        taken_at_ms: swarm::discovery::now_ms(),
    }
}

/// One generation's blocks.
pub(crate) enum Session {
    Swarm(InferenceSession),
    Local(LocalSession),
}

impl Session {
    pub(crate) fn route(&self) -> Vec<RouteHop> {
        match self {
            Session::Swarm(s) => s.route(),
            Session::Local(_) => Vec::new(),
        }
    }

    pub(crate) fn reroutes(&self) -> usize {
        match self {
            Session::Swarm(s) => s.reroutes(),
            Session::Local(_) => 0,
        }
    }

    pub(crate) async fn close(self) {
        match self {
            Session::Swarm(s) => s.close().await,
            Session::Local(s) => drop(s),
        }
    }
}

/// A session of the local compute thread; dropping it (the generation ended or its client
/// hung up) frees its cache and withdraws its queued work.
pub(crate) struct LocalSession {
    compute: ComputeHandle,
    id: SessionId,
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        self.compute.close(self.id);
    }
}

/// The generation backend over a [`Session`].
pub(crate) struct SessionBackend<'a> {
    pub model: &'a ClientModel,
    pub session: Session,
}

impl Backend for SessionBackend<'_> {
    async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        match &mut self.session {
            Session::Swarm(s) => self.model.logits_through(s, ids, pos).await,
            Session::Local(s) => {
                let x: Hidden = self.model.embedding.embed(ids)?;
                let (y, _) = s.compute.step(s.id, pos, x).await.map_err(|e| match e {
                    ComputeError::Model(e) => GenerateError::Model(e),
                    e => GenerateError::Backend(Box::new(e)),
                })?;
                Ok(self.model.head.last_logits(&y)?)
            }
        }
    }

    fn settled(&self) -> usize {
        match &self.session {
            Session::Swarm(s) => s.settled(),
            Session::Local(_) => usize::MAX,
        }
    }

    async fn settle(&mut self) -> Result<(), GenerateError> {
        match &mut self.session {
            Session::Swarm(s) => coordinator::client::settle(s).await,
            Session::Local(_) => Ok(()),
        }
    }
}
