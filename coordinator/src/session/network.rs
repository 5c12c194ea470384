//! The seam between the session logic and the outside world.
//!
//! Rerouting, bans and replay are the subtle part of the client, and they must behave the same
//! on a real swarm and in a simulated one of thousands of peers. So everything they need from
//! outside (the clock, discovery, round-trip measurements, the route choice, and opening and
//! stepping span sessions) goes through [`Network`], and every failure comes back as a
//! [`SessionError`], so an implementation needs nothing of the libp2p host. The client uses [`Libp2pNetwork`]; the
//! simulator supplies virtual time and modelled links, and runs the very same
//! [`Router`](super::Router) and [`InferenceSession`](super::InferenceSession) code.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use model::Hidden;
use proto::v1::ServerState;
use proto::Wire;

use swarm::discovery::{self, Server};
use swarm::NetHandle;
use tokio_util::task::TaskTracker;

use super::push::{push_through, pushable, Pushed};
use super::span::{SessionError, SpanSession, Timeouts};
use crate::route::{
    plan_load_aware, plan_route, PlanError, PlanRequest, Routing, ServerInfo, Span,
};

/// Everything a session needs from the swarm. Futures are `Send` so that sessions can run on
/// any runtime; a simulation backs them with virtual time.
///
/// `'static` because verification runs a check in a task of its own, beside the session.
pub trait Network: Send + Sync + 'static {
    /// An open session on one peer for one span of blocks.
    type Span: Send + 'static;

    /// Milliseconds since the Unix epoch (or any fixed origin), for bans and record expiry.
    fn now_ms(&self) -> u64;

    /// Every server discovery knows for the model, one entry per peer.
    fn lookup(&self) -> impl Future<Output = Result<Vec<Server>, SessionError>> + Send;

    /// The measured round trip to `peer`, if there is one.
    fn rtt(&self, peer: PeerId) -> impl Future<Output = Option<Duration>> + Send;

    /// The measured round trips of `peers`, in order. One call per plan rather than one per
    /// server: a swarm of thousands of servers is looked at on every plan.
    fn rtts(&self, peers: &[PeerId]) -> impl Future<Output = Vec<Option<Duration>>> + Send {
        async move {
            let mut out = Vec::with_capacity(peers.len());
            for &p in peers {
                out.push(self.rtt(p).await);
            }
            out
        }
    }

    /// Every server [`lookup`](Network::lookup) returns and the planner's picture of each,
    /// with its measured round trip ([`rtts`](Network::rtts)). A network that answers many
    /// clients from the same data (a simulation of thousands) may share one picture among
    /// every client that would build the same.
    fn candidates(&self) -> impl Future<Output = Result<Candidates, SessionError>> + Send {
        async move {
            let servers = self.lookup().await?;
            let peers: Vec<PeerId> = servers.iter().map(|s| s.peer).collect();
            let rtts = self.rtts(&peers).await;
            let infos = server_infos(&servers, rtts);
            Ok(Candidates {
                servers: Arc::new(servers),
                infos: Arc::new(infos),
            })
        }
    }

    /// Chooses a route; the real planner unless a simulation compares it with other policies.
    fn plan(
        &self,
        servers: &[ServerInfo<PeerId>],
        req: &PlanRequest<'_, PeerId>,
    ) -> Result<Vec<Span<PeerId>>, PlanError> {
        plan_route(servers, req)
    }

    /// Opens a session for `blocks` on `server`, with room for `max_length` positions.
    fn open(
        &self,
        server: &Server,
        blocks: Range<u32>,
        max_length: u32,
    ) -> impl Future<Output = Result<Self::Span, SessionError>> + Send;

    /// Runs positions `pos..pos + hidden.tokens` through the span's blocks.
    fn step(
        &self,
        span: &mut Self::Span,
        pos: u32,
        hidden: &Hidden,
    ) -> impl Future<Output = Result<Hidden, SessionError>> + Send;

    /// Tells other clients that `peer`, serving `block`, did not answer this one; best effort,
    /// in the background. A network without shared discovery has nobody to tell.
    fn report_unreachable(&self, peer: PeerId, block: u32) {
        let _ = (peer, block);
    }

    /// Frees the span on its peer; best effort, bounded.
    fn close(&self, span: Self::Span) -> impl Future<Output = ()> + Send;

    /// Runs positions `pos..pos + hidden.tokens` through `spans` node to node (see
    /// [`super::push`]), when this network can. Nothing pushed (no outputs, no stop) tells the
    /// caller to relay every span itself, which is what a network without push does.
    fn push(
        &self,
        spans: Vec<&mut Self::Span>,
        pos: u32,
        hidden: &Hidden,
    ) -> impl Future<Output = Pushed> + Send {
        let _ = (spans, pos, hidden);
        async { Pushed::default() }
    }
}

/// What one lookup found: the servers, and the planner's picture of them in the same order.
#[derive(Clone, Debug)]
pub struct Candidates {
    pub servers: Arc<Vec<Server>>,
    pub infos: Arc<Vec<ServerInfo<PeerId>>>,
}

/// The planner's picture of `servers`, given the measured round trip of each (in order).
pub fn server_infos(servers: &[Server], rtts: Vec<Option<Duration>>) -> Vec<ServerInfo<PeerId>> {
    servers
        .iter()
        .zip(rtts)
        .map(|(s, rtt)| ServerInfo {
            peer: s.peer,
            blocks: s.blocks.clone(),
            online: s.state == ServerState::Online,
            decode_ms_per_block: s.decode_ms_per_block,
            rtt_ms: rtt.map(|d| d.as_secs_f32() * 1e3),
            // A server some client could not reach since its last announcement is priced like
            // one without cache room: used only where nobody else serves its blocks, and back
            // to normal at its next announcement if it is alive (see `swarm::offline`).
            free_cache_tokens: if s.reported_offline {
                0
            } else {
                s.free_cache_tokens
            },
            load: s.load,
        })
        .collect()
}

/// The real swarm: DHT discovery and span sessions over libp2p streams.
pub struct Libp2pNetwork {
    pub net: NetHandle,
    pub fingerprint: Fingerprint,
    pub block_count: u32,
    pub dim: usize,
    pub wire: Wire,
    pub timeouts: Timeouts,
    pub routing: Routing,
    /// Whether steps go node to node (server-to-server push) where every peer of the route
    /// takes pushes, instead of back through this client after every span.
    pub push: bool,
    /// Peers this client claimed offline lately, shared by its sessions.
    pub reported: Arc<Mutex<Reported>>,
    /// The claims being written, which closing the client waits for (bounded).
    pub reports: TaskTracker,
}

/// Which peers this client claimed offline lately. Readers believe a claim for a minute, so
/// one per peer per half of that is enough; the bound caps what one client writes to the DHT
/// however many peers fail around it.
#[derive(Debug, Default)]
pub struct Reported {
    last: HashMap<PeerId, u64>,
}

const REPORT_EVERY_MS: u64 = swarm::offline::CLAIM_TTL_MS / 2;
const MAX_REPORTED: usize = 64;

impl Reported {
    /// Whether to claim `peer` offline at `now_ms` (and, if so, that it was).
    pub fn due(&mut self, peer: PeerId, now_ms: u64) -> bool {
        self.last
            .retain(|_, at| now_ms.saturating_sub(*at) < REPORT_EVERY_MS);
        if self.last.contains_key(&peer) || self.last.len() >= MAX_REPORTED {
            return false;
        }
        self.last.insert(peer, now_ms);
        true
    }
}

/// Most peers measured before one plan, and how long their measurements may take.
const PROBE_LIMIT: usize = 32;
const PROBE_WAIT: Duration = Duration::from_millis(500);

impl Libp2pNetwork {
    /// Servers this client never talked to have no measured round trip, and the planner would
    /// give them all the same default: a node behind a 100 ms link would look as good as one
    /// on the LAN. Connecting lets ping measure them; the results get a short, bounded wait,
    /// and whatever is still unmeasured keeps the default (which a measured LAN peer beats).
    async fn measure_unknown(&self, servers: &[Server]) {
        let mut unknown = Vec::new();
        for s in servers.iter().filter(|s| s.state == ServerState::Online) {
            if unknown.len() == PROBE_LIMIT {
                break;
            }
            if self.net.rtt(s.peer).await.is_none() {
                unknown.push((s.peer, s.addrs.clone()));
            }
        }
        if unknown.is_empty() {
            return;
        }
        let peers: Vec<PeerId> = unknown.iter().map(|(p, _)| *p).collect();
        self.net.probe(unknown).await;
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        while tokio::time::Instant::now() < deadline {
            let mut measured = 0;
            for p in &peers {
                if self.net.rtt(*p).await.is_some() {
                    measured += 1;
                }
            }
            if measured == peers.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Network for Libp2pNetwork {
    type Span = SpanSession;

    fn report_unreachable(&self, peer: PeerId, block: u32) {
        let now = discovery::now_ms();
        if !self.reported.lock().is_ok_and(|mut r| r.due(peer, now)) {
            return;
        }
        let (net, fp) = (self.net.clone(), self.fingerprint);
        self.reports.spawn(async move {
            match discovery::report_offline(&net, &fp, peer, block).await {
                Ok(()) => tracing::info!(%peer, "told the swarm this peer did not answer"),
                Err(e) => tracing::debug!(%peer, "could not claim the peer offline: {e}"),
            }
        });
    }

    fn now_ms(&self) -> u64 {
        discovery::now_ms()
    }

    async fn lookup(&self) -> Result<Vec<Server>, SessionError> {
        let servers = discovery::lookup(&self.net, &self.fingerprint, self.block_count).await?;
        self.measure_unknown(&servers).await;
        Ok(servers)
    }

    async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        self.net.rtt(peer).await
    }

    fn plan(
        &self,
        servers: &[ServerInfo<PeerId>],
        req: &PlanRequest<'_, PeerId>,
    ) -> Result<Vec<Span<PeerId>>, PlanError> {
        match self.routing {
            Routing::Planner => plan_route(servers, req),
            Routing::LoadAware => plan_load_aware(servers, req, &mut rand::rng()),
        }
    }

    async fn open(
        &self,
        server: &Server,
        blocks: Range<u32>,
        max_length: u32,
    ) -> Result<SpanSession, SessionError> {
        SpanSession::open(
            &self.net,
            server,
            blocks,
            &self.fingerprint,
            self.dim,
            max_length,
            self.wire,
            self.timeouts,
        )
        .await
    }

    async fn step(
        &self,
        span: &mut SpanSession,
        pos: u32,
        hidden: &Hidden,
    ) -> Result<Hidden, SessionError> {
        span.step(pos, hidden).await
    }

    async fn close(&self, span: SpanSession) {
        span.close().await;
    }

    async fn push(&self, mut spans: Vec<&mut SpanSession>, pos: u32, hidden: &Hidden) -> Pushed {
        if !self.push || !pushable(&spans, hidden) {
            return Pushed::default();
        }
        push_through(&mut spans, pos, hidden).await
    }
}
