//! An inference session through the swarm: a chain of span sessions covering every block, that
//! survives the loss of any peer.
//!
//! For each span the client keeps every hidden state it has sent. When a peer fails (connection
//! lost, no answer within the step timeout, or an error code that says another peer may do
//! better), the client bans it for a while, plans a new route for just that span's blocks,
//! replays the kept inputs so the replacements rebuild the KV cache, and retries the step.
//! Blocks compute the same bits whether positions arrive one by one or in one batch, so the
//! replacement's cache, and therefore the generated text, is identical to a run without failure.

pub mod bans;
pub mod span;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use model::fingerprint::{short_hex, Fingerprint};
use model::Hidden;
use proto::v1::{Dtype, ServerState};
use proto::ErrorAction;
use serde::Serialize;

pub use bans::Bans;
pub use span::{SessionError, SpanSession, Timeouts};

use crate::discovery::{self, now_ms, Server};
use crate::net::{NetError, NetHandle};
use crate::route::{plan_route, PlanError, PlanRequest, ServerInfo, Span};

/// One hop of a route as reported to users: which peer ran which blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteHop {
    pub peer: String,
    pub blocks: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot build a route for model {model}: {source}")]
    Plan { model: String, source: PlanError },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("blocks {}..{} could not be served again within {secs:.0}s: {last}", blocks.start, blocks.end)]
    GaveUp {
        blocks: Range<u32>,
        secs: f64,
        last: Box<RouteError>,
    },
}

/// What a session needs to find and open peers, shared by the client and its sessions.
pub struct Router {
    pub net: NetHandle,
    pub fingerprint: Fingerprint,
    pub block_count: u32,
    pub dim: usize,
    pub dtype: Dtype,
    pub timeouts: Timeouts,
    /// Bound on finding a complete route (at open, and again after each failure).
    pub discovery_timeout: Duration,
    pub bans: Arc<Mutex<Bans>>,
}

impl Router {
    fn ban(&self, peer: PeerId) {
        if let Ok(mut b) = self.bans.lock() {
            let until = b.ban(peer, now_ms());
            tracing::info!(%peer, "banned for {:.1}s", (until.saturating_sub(now_ms())) as f64 / 1e3);
        }
    }

    /// The cheapest route over `blocks` from the DHT's current view, waiting (bounded) for
    /// servers to appear.
    pub async fn plan(
        &self,
        blocks: Range<u32>,
        cache_tokens: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<Server>, Vec<Span<PeerId>>), RouteError> {
        loop {
            let servers = discovery::lookup(&self.net, &self.fingerprint, self.block_count).await?;
            let mut infos = Vec::with_capacity(servers.len());
            for s in &servers {
                infos.push(ServerInfo {
                    peer: s.peer,
                    blocks: s.blocks.clone(),
                    online: s.state == ServerState::Online,
                    decode_ms_per_block: s.decode_ms_per_block,
                    rtt_ms: self.net.rtt(s.peer).await.map(|d| d.as_secs_f32() * 1e3),
                    free_cache_tokens: s.free_cache_tokens,
                });
            }
            let banned: HashMap<PeerId, u64> =
                self.bans.lock().map(|b| b.snapshot()).unwrap_or_default();
            let req = PlanRequest {
                blocks: blocks.clone(),
                cache_tokens,
                now_ms: now_ms(),
                banned_until_ms: &banned,
                default_rtt_ms: 20.0,
            };
            match plan_route(&infos, &req) {
                Ok(route) => return Ok((servers, route)),
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(RouteError::Plan {
                        model: short_hex(&self.fingerprint),
                        source,
                    })
                }
                Err(e) => {
                    tracing::debug!("route not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// Plans a route over `blocks` and opens a session on every hop. A peer that fails to
    /// open is banned and the route planned again, until the discovery timeout.
    pub async fn open(
        &self,
        blocks: Range<u32>,
        max_length: u32,
    ) -> Result<Vec<SpanSession>, RouteError> {
        let deadline = tokio::time::Instant::now() + self.discovery_timeout;
        loop {
            let (servers, route) = self
                .plan(blocks.clone(), max_length as u64, deadline)
                .await?;
            let mut spans = Vec::with_capacity(route.len());
            let mut failure = None;
            for hop in &route {
                let Some(server) = servers.iter().find(|s| s.peer == hop.peer) else {
                    continue;
                };
                let opened = SpanSession::open(
                    &self.net,
                    server,
                    hop.blocks.clone(),
                    &self.fingerprint,
                    self.dim,
                    max_length,
                    self.dtype,
                    self.timeouts,
                )
                .await;
                match opened {
                    Ok(s) => spans.push(s),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(e) = failure else {
                return Ok(spans);
            };
            futures::future::join_all(spans.into_iter().map(SpanSession::close)).await;
            if e.action() == ErrorAction::GiveUp || tokio::time::Instant::now() >= deadline {
                return Err(e.into());
            }
            tracing::warn!("opening a session failed: {e}; trying another route");
            if let Some(peer) = e.peer() {
                self.ban(peer);
            }
        }
    }
}

/// A span of the route and the inputs it has been sent (positions `0..len`), kept for replay.
struct SpanState {
    session: SpanSession,
    inputs: Vec<f32>,
}

impl SpanState {
    fn record(&mut self, pos: u32, x: &Hidden) {
        self.inputs.truncate(pos as usize * x.dim);
        self.inputs.extend_from_slice(&x.data);
    }
}

pub struct InferenceSession {
    router: Arc<Router>,
    spans: Vec<SpanState>,
    max_length: u32,
    reroutes: usize,
}

impl InferenceSession {
    pub async fn open(router: Arc<Router>, max_length: u32) -> Result<Self, RouteError> {
        let spans = router.open(0..router.block_count, max_length).await?;
        Ok(Self {
            spans: spans
                .into_iter()
                .map(|session| SpanState {
                    session,
                    inputs: Vec::new(),
                })
                .collect(),
            router,
            max_length,
            reroutes: 0,
        })
    }

    pub fn route(&self) -> Vec<RouteHop> {
        self.spans
            .iter()
            .map(|s| RouteHop {
                peer: s.session.peer.to_string(),
                blocks: format!("{}..{}", s.session.blocks.start, s.session.blocks.end),
            })
            .collect()
    }

    /// How many times a failed span was replaced.
    pub fn reroutes(&self) -> usize {
        self.reroutes
    }

    /// Runs positions `pos..pos + x.tokens` through the whole chain, replacing failed peers.
    pub async fn forward(&mut self, mut x: Hidden, pos: u32) -> Result<Hidden, RouteError> {
        let mut i = 0;
        while i < self.spans.len() {
            match self.spans[i].session.step(pos, &x).await {
                Ok(y) => {
                    self.spans[i].record(pos, &x);
                    x = y;
                    i += 1;
                }
                Err(e) if e.action() == ErrorAction::GiveUp => return Err(e.into()),
                Err(e) => self.replace(i, e).await?,
            }
        }
        Ok(x)
    }

    /// Replaces span `i` (whose peer just failed) by a fresh route over the same blocks and
    /// replays its history there. Bounded by the discovery timeout.
    async fn replace(&mut self, i: usize, error: SessionError) -> Result<(), RouteError> {
        let failed = self.spans.remove(i);
        let blocks = failed.session.blocks.clone();
        tracing::warn!("{error}; rerouting blocks {}..{}", blocks.start, blocks.end);
        self.router.ban(failed.session.peer);
        self.reroutes += 1;
        let started = tokio::time::Instant::now();
        let deadline = started + self.router.discovery_timeout;
        let dim = self.router.dim;
        let history = failed.inputs;
        drop(failed.session);
        let mut last: RouteError = error.into();
        while tokio::time::Instant::now() < deadline {
            let spans = match self.router.open(blocks.clone(), self.max_length).await {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            match replay(spans, &history, dim).await {
                Ok(states) => {
                    tracing::info!(
                        "blocks {}..{} rerouted in {:.0} ms ({} positions replayed)",
                        blocks.start,
                        blocks.end,
                        started.elapsed().as_secs_f64() * 1e3,
                        history.len() / dim
                    );
                    self.spans.splice(i..i, states);
                    return Ok(());
                }
                Err(e) => {
                    if let Some(peer) = e.peer() {
                        self.router.ban(peer);
                    }
                    last = e.into();
                }
            }
        }
        Err(RouteError::GaveUp {
            blocks,
            secs: self.router.discovery_timeout.as_secs_f64(),
            last: Box::new(last),
        })
    }

    /// Frees every span's cache on its peer (best effort, bounded).
    pub async fn close(self) {
        futures::future::join_all(self.spans.into_iter().map(|s| s.session.close())).await;
    }
}

/// Sends the kept inputs through the new spans in order, so each rebuilds its cache; each new
/// span's own history is what it was just sent.
async fn replay(
    spans: Vec<SpanSession>,
    history: &[f32],
    dim: usize,
) -> Result<Vec<SpanState>, SessionError> {
    let tokens = history.len() / dim;
    let mut x = Hidden {
        tokens,
        dim,
        data: history.to_vec(),
    };
    let mut states = Vec::with_capacity(spans.len());
    for mut session in spans {
        let inputs = x.data.clone();
        if tokens > 0 {
            x = session.step(0, &x).await?;
        }
        states.push(SpanState { session, inputs });
    }
    Ok(states)
}
