//! An inference session through the swarm: a chain of span sessions covering every block, that
//! survives the loss of any peer.
//!
//! For each span the client keeps every hidden state it has sent. When a peer fails (connection
//! lost, no answer within the step timeout, or an error code that says another peer may do
//! better), the client bans it for a while, plans a new route for just that span's blocks,
//! replays the kept inputs so the replacements rebuild the KV cache, and retries the step.
//! Blocks compute the same bits whether positions arrive one by one or in one batch, so the
//! replacement's cache, and therefore the generated text, is identical to a run without failure.
//!
//! A peer that answers, but wrongly, is caught by [`verify`]: a second peer checks every span's
//! outputs, and a session rolls back to where a wrong answer began.

pub mod bans;
pub mod network;
pub mod push;
pub mod span;
pub mod verify;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use model::fingerprint::{short_hex, Fingerprint};
use model::Hidden;
use proto::ErrorAction;
use serde::Serialize;

pub use bans::Bans;
pub use network::{server_infos, Candidates, Libp2pNetwork, Network, Reported};
pub use span::{SessionError, SpanSession, Timeouts};
use verify::first_difference as verify_diff;
pub use verify::VerifyPolicy;

use swarm::discovery::Server;

use crate::route::{PlanError, PlanRequest, ServerInfo, Span};

/// One hop of a route as reported to users: which peer ran which blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteHop {
    pub peer: String,
    pub blocks: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The plan error is part of the message, not a `source`: chained reports (`{:#}`) would
    /// print it twice.
    #[error("cannot build a route for model {model}: {reason}")]
    Plan { model: String, reason: PlanError },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("blocks {}..{} could not be served again within {secs:.0}s: {last}", blocks.start, blocks.end)]
    GaveUp {
        blocks: Range<u32>,
        secs: f64,
        last: Box<RouteError>,
    },
    /// A peer was caught returning wrong outputs from position `to` on (and banned): every
    /// span was rolled back to `to`, and the caller must run its tokens again from there.
    #[error("a peer's outputs were wrong from position {to}; run again from there")]
    Rewound { to: usize },
}

/// What a session needs to find and open peers, shared by the client and its sessions.
/// Generic over the [`Network`] so that simulations run this same code.
pub struct Router<N: Network = Libp2pNetwork> {
    pub network: N,
    pub fingerprint: Fingerprint,
    pub block_count: u32,
    pub dim: usize,
    /// Bound on finding a complete route (at open, and again after each failure).
    pub discovery_timeout: Duration,
    pub bans: Arc<Mutex<Bans>>,
    /// Whether and how often sessions check their peers' outputs on a second peer.
    pub verify: VerifyPolicy,
}

/// Round trip the planner assumes for a peer with no measurement. Lookup probes unknown peers
/// and waits up to 500 ms; a libp2p connection takes about five round trips (TCP, protocol
/// negotiation, Noise, Yamux) before a ping can even start, so a peer still unmeasured after
/// that wait is roughly 100 ms away or worse. Assuming less let a peer behind a slow link beat
/// a measured LAN peer whenever the two announced slightly different compute times.
const UNMEASURED_RTT_MS: f32 = 100.0;

impl<N: Network> Router<N> {
    fn ban(&self, peer: PeerId) {
        let now = self.network.now_ms();
        if let Ok(mut b) = self.bans.lock() {
            let until = b.ban(peer, now);
            tracing::info!(%peer, "banned for {:.1}s", (until.saturating_sub(now)) as f64 / 1e3);
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
        let (view, route) = self
            .plan_skipping(blocks, cache_tokens, deadline, &HashMap::new(), None)
            .await?;
        Ok((Arc::unwrap_or_clone(view.servers), route))
    }

    /// What discovery lists now, with the round trips measured to each server.
    async fn view(&self) -> Result<View, RouteError> {
        let found = self.network.candidates().await?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            for i in found.infos.iter() {
                tracing::debug!(peer = %i.peer, blocks = ?i.blocks, rtt_ms = ?i.rtt_ms, decode_ms = i.decode_ms_per_block, "candidate");
            }
        }
        Ok(View {
            servers: found.servers,
            infos: found.infos,
            at: tokio::time::Instant::now(),
        })
    }

    /// [`Router::plan`], also leaving out each peer of `skip` until its time (ms), on top of
    /// the bans. Plans on `reuse` first when given (a view this request just looked up), and
    /// looks up again only if that fails.
    async fn plan_skipping(
        &self,
        blocks: Range<u32>,
        cache_tokens: u64,
        deadline: tokio::time::Instant,
        skip: &HashMap<PeerId, u64>,
        mut reuse: Option<View>,
    ) -> Result<(View, Vec<Span<PeerId>>), RouteError> {
        loop {
            let reused = reuse.is_some();
            let view = match reuse.take() {
                Some(view) => view,
                None => self.view().await?,
            };
            let mut banned: HashMap<PeerId, u64> =
                self.bans.lock().map(|b| b.snapshot()).unwrap_or_default();
            for (&peer, &until) in skip {
                let at = banned.entry(peer).or_insert(until);
                *at = (*at).max(until);
            }
            let req = PlanRequest {
                blocks: blocks.clone(),
                cache_tokens,
                now_ms: self.network.now_ms(),
                banned_until_ms: &banned,
                default_rtt_ms: UNMEASURED_RTT_MS,
            };
            match self.network.plan(&view.infos, &req) {
                Ok(route) => return Ok((view, route)),
                // The reused view lacks a peer this request's failures left out: look again.
                Err(_) if reused => {}
                Err(reason) if tokio::time::Instant::now() >= deadline => {
                    return Err(RouteError::Plan {
                        model: short_hex(&self.fingerprint),
                        reason,
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
    ///
    /// A peer that refuses for want of room (cache full, as many sessions as it takes) has
    /// done nothing wrong: the request may simply be larger than it holds, or others came
    /// first. It is left out of this request's routes for [`CAPACITY_RETRY_MS`] and not
    /// banned, so one client's oversized request does not keep the peer from everyone else.
    pub async fn open(
        &self,
        blocks: Range<u32>,
        max_length: u32,
    ) -> Result<Vec<OpenSpan<N::Span>>, RouteError> {
        Ok(self.open_within(blocks, max_length, None, None).await?.0)
    }

    /// [`Router::open`], giving the first route's peers at most `first_connect` each to open,
    /// less for a peer whose round trip is known (see [`reroute_connect`]); later routes get
    /// the network's own timeout.
    ///
    /// A reroute is already late, and the peer it tries first is often one the DHT still lists
    /// but that is gone (records outlive a crash by up to three announce intervals): waiting
    /// the full connect timeout on it is most of a slow recovery. A live peer opens in a few
    /// round trips; one that does not within `first_connect` is banned like any failed peer,
    /// and the next route is planned without it. A peer that is merely slow to reach (behind a
    /// relay) still gets the full timeout on a later route if nothing else serves its blocks.
    ///
    /// With `seen` (a view this client looked up earlier), the first route is planned on it
    /// instead of a fresh lookup (see [`SESSION_VIEW_REUSE`]); any later one on a fresh
    /// lookup. Returns the spans and the view their route was planned on.
    async fn open_within(
        &self,
        blocks: Range<u32>,
        max_length: u32,
        mut first_connect: Option<Duration>,
        seen: Option<View>,
    ) -> Result<(Vec<OpenSpan<N::Span>>, View), RouteError> {
        let deadline = swarm::deadline::after(self.discovery_timeout);
        let mut refusals = Refusals::default();
        let mut full: HashMap<PeerId, u64> = HashMap::new();
        let mut last_full: Option<SessionError> = None;
        let mut reuse: Option<View> = seen;
        loop {
            let planned = self
                .plan_skipping(
                    blocks.clone(),
                    max_length as u64,
                    deadline,
                    &full,
                    reuse.take(),
                )
                .await;
            let (view, route) = match (planned, last_full) {
                (Ok(planned), last) => {
                    last_full = last;
                    planned
                }
                // Peers that serve the blocks exist; they said why they would not.
                (Err(RouteError::Plan { .. }), Some(refused)) => return Err(refused.into()),
                (Err(e), _) => return Err(e),
            };
            let mut spans = Vec::with_capacity(route.len());
            let mut failure = None;
            for hop in &route {
                let Some(k) = view.servers.iter().position(|s| s.peer == hop.peer) else {
                    continue;
                };
                let server = &view.servers[k];
                let opening = self.network.open(server, hop.blocks.clone(), max_length);
                let within = first_connect.map(|cap| reroute_connect(view.infos[k].rtt_ms, cap));
                let opened = match within {
                    None => opening.await,
                    Some(within) => {
                        tokio::time::timeout(within, opening)
                            .await
                            .unwrap_or_else(|_| {
                                Err(SessionError::Timeout {
                                    peer: hop.peer,
                                    what: "stream open on reroute",
                                    secs: within.as_secs_f64(),
                                })
                            })
                    }
                };
                match opened {
                    Ok(session) => spans.push(OpenSpan {
                        peer: hop.peer,
                        blocks: hop.blocks.clone(),
                        session,
                    }),
                    Err(e) => {
                        failure = Some((e, hop.blocks.start));
                        break;
                    }
                }
            }
            let Some((e, block)) = failure else {
                return Ok((spans, view));
            };
            first_connect = None;
            self.close_all(spans).await;
            // The next route is planned on the same view, without the peer that failed, while
            // the view is fresh: a lookup is a DHT query per block, and the view cannot have
            // learnt much in the time one open took.
            if view.at.elapsed() < VIEW_REUSE {
                reuse = Some(view);
            }
            if refusals.agree(&e) || tokio::time::Instant::now() >= deadline {
                return Err(e.into());
            }
            match (e.peer(), capacity_refusal(&e)) {
                (Some(peer), true) => {
                    tracing::info!("{e}; trying another route");
                    full.insert(peer, self.network.now_ms() + CAPACITY_RETRY_MS);
                    last_full = Some(e);
                }
                (Some(peer), false) => {
                    tracing::warn!("opening a session failed: {e}; trying another route");
                    self.ban(peer);
                    if e.unreachable() {
                        self.network.report_unreachable(peer, block);
                    }
                }
                (None, _) => tracing::warn!("opening a session failed: {e}; trying again"),
            }
        }
    }

    async fn close_all(&self, spans: Vec<OpenSpan<N::Span>>) {
        futures::future::join_all(spans.into_iter().map(|s| self.network.close(s.session))).await;
    }
}

/// What one lookup found, and the planner's picture of it.
struct View {
    servers: Arc<Vec<Server>>,
    infos: Arc<Vec<ServerInfo<PeerId>>>,
    /// When the lookup answered.
    at: tokio::time::Instant,
}

/// How old the view a session was planned on may be for its reroutes to plan on it first,
/// instead of waiting for a lookup. A reroute is on the generation's critical path, and a
/// lookup (a DHT query per block, over a home link) is a large part of it: in the simulated
/// swarm 120-330 ms of a recovery's ~1 s, the rest mostly the replay. A peer in the old view
/// that is still there and serving (most of them: the failed one is banned) opens as from a
/// fresh view. One that has gone or moved since costs the first attempt at most its
/// [`reroute_connect`] bound, or a refusal's round trip, and the next route is planned on a
/// fresh lookup, as before. Past a minute, enough of a swarm changes (records last 30 s
/// after a crash) for a lookup to be worth its time.
pub const SESSION_VIEW_REUSE: Duration = Duration::from_secs(60);

/// How long a view serves for further attempts of the same request (after a peer on its
/// route failed to open) before discovery is asked again. Announcements are seconds old
/// anyway; a lookup asks the DHT for every block's record.
pub const VIEW_REUSE: Duration = Duration::from_secs(2);

/// How long the first peers tried on a reroute get to open (see [`Router::open_within`]):
/// several round trips of the slowest links the simulator models (100 ms each way), well
/// short of the 10 s the network allows a first connection.
pub const REROUTE_CONNECT: Duration = Duration::from_millis(1_500);

/// Least time a peer tried first on a reroute gets to open, whatever its round trip.
pub const REROUTE_CONNECT_MIN: Duration = Duration::from_millis(300);

/// Round trips a peer tried first on a reroute gets to open, on top of
/// [`REROUTE_CONNECT_MIN`]: opening a session on a peer takes two (dial and the open
/// exchange) when nothing goes wrong, a fresh connection a few more.
pub const REROUTE_CONNECT_RTTS: f32 = 4.0;

/// How long a peer tried first on a reroute gets to open: [`REROUTE_CONNECT_MIN`] plus
/// [`REROUTE_CONNECT_RTTS`] of its measured round trip, at most `cap` (and `cap` when the
/// round trip was never measured). A frozen peer whose record still lingers in the DHT then
/// costs the reroute a few of its round trips instead of the whole `cap`; a live peer that
/// misses the bound (a lost packet) is banned briefly like any failed one.
pub fn reroute_connect(rtt_ms: Option<f32>, cap: Duration) -> Duration {
    let Some(rtt_ms) = rtt_ms.filter(|ms| ms.is_finite() && *ms >= 0.0) else {
        return cap;
    };
    let scaled = REROUTE_CONNECT_MIN.as_millis() as f32 + REROUTE_CONNECT_RTTS * rtt_ms;
    Duration::from_micros((scaled * 1e3) as u64).min(cap)
}

/// How long a peer that refused a session for want of room is left out of that request's
/// routes before it is asked again (sessions end and free their room all the time).
pub const CAPACITY_RETRY_MS: u64 = 1_000;

/// Whether `e` is a peer saying it has no room for this session now: not a fault of the peer.
fn capacity_refusal(e: &SessionError) -> bool {
    matches!(
        e,
        SessionError::Remote {
            code: proto::v1::ErrorCode::CacheFull | proto::v1::ErrorCode::TooManySessions,
            ..
        }
    )
}

/// A session opened on one hop of a route.
pub struct OpenSpan<S> {
    pub peer: PeerId,
    pub blocks: Range<u32>,
    pub session: S,
}

/// Up to this many values (256 KiB), a span's whole history is reserved at once (see
/// [`SpanState::record`]): a few hundred tokens of a small model, or all of a simulated
/// session's. Larger histories grow as usual, as most of a long session's room may never be
/// used.
const RESERVE_WHOLE_HISTORY_FLOATS: usize = 1 << 16;

/// A span of the route and the inputs it has been sent (positions `0..len`), kept for replay
/// and for checking its outputs on a second peer.
struct SpanState<S> {
    span: OpenSpan<S>,
    inputs: Vec<f32>,
    check: verify::Check<S>,
}

impl<S> SpanState<S> {
    /// A span sent `inputs` so far, whose outputs for positions `0..verified` need no check.
    fn new(span: OpenSpan<S>, inputs: Vec<f32>, verified: usize) -> Self {
        Self {
            span,
            inputs,
            check: verify::Check::new(verified),
        }
    }

    /// Keeps `x` as the inputs of positions `pos..`. A session's history grows a row per token,
    /// so growing it by doubling reallocates it every so often: when the whole session's
    /// (`max_length` rows) is small, room for all of it is made at the first growth instead.
    fn record(&mut self, pos: u32, x: &Hidden, max_length: u32) {
        self.inputs.truncate(pos as usize * x.dim);
        let whole = max_length as usize * x.dim;
        let needed = self.inputs.len() + x.data.len();
        if needed > self.inputs.capacity() && whole <= RESERVE_WHOLE_HISTORY_FLOATS {
            self.inputs
                .reserve_exact(whole.max(needed) - self.inputs.len());
        }
        self.inputs.extend_from_slice(&x.data);
    }

    /// The kept inputs of `rows`.
    fn input_rows(&self, rows: Range<usize>, dim: usize) -> Hidden {
        Hidden {
            tokens: rows.len(),
            dim,
            data: self.inputs[rows.start * dim..rows.end * dim].to_vec(),
        }
    }
}

/// How many distinct peers must call a request malformed before the client believes it.
/// One peer's BAD_REQUEST may be a lie meant to stop the generation (or a broken node); our own
/// requests are well-formed, so a second, independent peer saying the same is the signal.
pub const AGREEING_REFUSALS: usize = 2;

/// Peers that answered the current request with "the request itself is wrong".
#[derive(Default)]
struct Refusals(Vec<PeerId>);

impl Refusals {
    /// Notes `e`; true when enough distinct peers now refuse the request as malformed (or the
    /// error names no peer to doubt).
    fn agree(&mut self, e: &SessionError) -> bool {
        if e.action() != ErrorAction::GiveUp {
            return false;
        }
        let Some(peer) = e.peer() else {
            return true;
        };
        if !self.0.contains(&peer) {
            self.0.push(peer);
        }
        self.0.len() >= AGREEING_REFUSALS
    }
}

pub struct InferenceSession<N: Network = Libp2pNetwork> {
    router: Arc<Router<N>>,
    spans: Vec<SpanState<N::Span>>,
    /// The view the route was last planned on: a reroute plans on it first while it is recent
    /// (see [`SESSION_VIEW_REUSE`]).
    view: Option<View>,
    max_length: u32,
    recoveries: Vec<Duration>,
    /// Peers caught returning wrong outputs (and banned for it).
    caught: Vec<PeerId>,
    /// Span steps that came node to node, and span steps this client relayed itself
    /// (replays not counted).
    pushed_spans: usize,
    relayed_spans: usize,
}

impl<N: Network> InferenceSession<N> {
    pub async fn open(router: Arc<Router<N>>, max_length: u32) -> Result<Self, RouteError> {
        let (spans, view) = router
            .open_within(0..router.block_count, max_length, None, None)
            .await?;
        Ok(Self {
            view: Some(view),
            spans: spans
                .into_iter()
                .map(|span| SpanState::new(span, Vec::new(), 0))
                .collect(),
            router,
            max_length,
            recoveries: Vec::new(),
            caught: Vec::new(),
            pushed_spans: 0,
            relayed_spans: 0,
        })
    }

    pub fn route(&self) -> Vec<RouteHop> {
        self.spans
            .iter()
            .map(|s| RouteHop {
                peer: s.span.peer.to_string(),
                blocks: format!("{}..{}", s.span.blocks.start, s.span.blocks.end),
            })
            .collect()
    }

    /// Span steps that came node to node (server-to-server push) and span steps this client
    /// relayed itself, so far; replays are not counted.
    pub fn hops(&self) -> (usize, usize) {
        (self.pushed_spans, self.relayed_spans)
    }

    /// How many times a failed span was replaced.
    pub fn reroutes(&self) -> usize {
        self.recoveries.len()
    }

    /// Peers caught returning wrong outputs, in the order they were caught.
    pub fn caught(&self) -> &[PeerId] {
        &self.caught
    }

    /// How long each successful replacement took, from the failure to the replayed history;
    /// what users wait on top of the step itself.
    pub fn recoveries(&self) -> &[Duration] {
        &self.recoveries
    }

    /// Runs positions `pos..pos + x.tokens` through the whole chain, replacing failed peers.
    /// With verification on, checks that are due start after the step and run beside the next
    /// ones; one that catches a wrong peer rolls the session back and a later call answers
    /// [`RouteError::Rewound`].
    ///
    /// Without verification the step is first pushed node to node where the network can (see
    /// [`push`]); the spans it did not get through are then run one by one from where it
    /// stopped, exactly as if the client had relayed every span. With verification on, every
    /// span is relayed by the client: a node could forward one thing and tell the client
    /// another, and the check of the next span would then blame the wrong peer.
    pub async fn run_blocks(&mut self, mut x: Hidden, pos: u32) -> Result<Hidden, RouteError> {
        self.checks_before_step(pos as usize).await?;
        let mut i = 0;
        let mut refusals = Refusals::default();
        let verifying = self.router.verify.is_on();
        if !verifying {
            let sessions = self.spans.iter_mut().map(|s| &mut s.span.session).collect();
            let pushed = self.router.network.push(sessions, pos, &x).await;
            self.pushed_spans += pushed.outputs.len();
            for y in pushed.outputs {
                self.spans[i].record(pos, &x, self.max_length);
                x = y;
                i += 1;
            }
            match pushed.stop {
                None => {}
                Some(push::PushStop::NotForwarded(reason)) => {
                    tracing::info!("push stopped at span {i} ({reason}); relaying the rest");
                }
                Some(push::PushStop::Failed(e)) if refusals.agree(&e) => return Err(e.into()),
                Some(push::PushStop::Failed(e)) => self.replace(i, e).await?,
            }
        }
        while i < self.spans.len() {
            let state = &mut self.spans[i];
            match self
                .router
                .network
                .step(&mut state.span.session, pos, &x)
                .await
            {
                Ok(y) => {
                    self.relayed_spans += 1;
                    state.record(pos, &x, self.max_length);
                    if verifying {
                        state.check.record(pos as usize, &y);
                    }
                    x = y;
                    i += 1;
                }
                Err(e) if refusals.agree(&e) => return Err(e.into()),
                Err(e) => self.replace(i, e).await?,
            }
        }
        self.checks_after_step().await?;
        Ok(x)
    }

    /// Replaces span `i` (whose peer just failed) by a fresh route over the same blocks and
    /// replays its history there. Bounded by the discovery timeout.
    ///
    /// With verification on, the replacement's answers for the replayed positions not checked
    /// yet are checked like any others; where they differ from the failed peer's, which the
    /// session has already used, the failed peer was wrong (or the replacement is, and its
    /// check will say so): the session rolls back there and answers [`RouteError::Rewound`].
    async fn replace(&mut self, i: usize, error: SessionError) -> Result<(), RouteError> {
        let mut failed = self.spans.remove(i);
        let verified = self.router.verify.is_on().then_some(failed.check.verified);
        let old_outputs = std::mem::take(&mut failed.check.outputs);
        let check = std::mem::replace(&mut failed.check, verify::Check::new(0));
        if let Some(v) = check.into_verifier() {
            self.router.network.close(v).await;
        }
        let blocks = failed.span.blocks.clone();
        tracing::warn!("{error}; rerouting blocks {}..{}", blocks.start, blocks.end);
        self.router.ban(failed.span.peer);
        if error.unreachable() {
            self.router
                .network
                .report_unreachable(failed.span.peer, blocks.start);
        }
        let started = tokio::time::Instant::now();
        let deadline = started + swarm::deadline::bounded(self.router.discovery_timeout);
        let dim = self.router.dim;
        let history = failed.inputs;
        drop(failed.span);
        let mut last: RouteError = error.into();
        let mut seen = self
            .view
            .take()
            .filter(|v| v.at.elapsed() < SESSION_VIEW_REUSE);
        while tokio::time::Instant::now() < deadline {
            let spans = match self
                .router
                .open_within(
                    blocks.clone(),
                    self.max_length,
                    Some(REROUTE_CONNECT),
                    seen.take(),
                )
                .await
            {
                Ok((s, view)) => {
                    self.view = Some(view);
                    s
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            match replay(&self.router.network, spans, &history, dim, verified).await {
                Ok((states, y)) => {
                    self.recoveries.push(started.elapsed());
                    tracing::info!(
                        "blocks {}..{} rerouted in {:.0} ms ({} positions replayed)",
                        blocks.start,
                        blocks.end,
                        started.elapsed().as_secs_f64() * 1e3,
                        history.len() / dim
                    );
                    self.spans.splice(i..i, states);
                    let Some(from) = verified else {
                        return Ok(());
                    };
                    let theirs = y.data.get(from * dim..).unwrap_or_default();
                    let n = theirs.len().min(old_outputs.len());
                    if let Some(row) = verify_diff(&old_outputs[..n], &theirs[..n], dim) {
                        let to = from + row;
                        tracing::warn!(
                            "blocks {}..{}: the replacement's outputs differ from the failed peer's unchecked ones from position {to}; generating again from there",
                            blocks.start,
                            blocks.end
                        );
                        self.rewind(to);
                        return Err(RouteError::Rewound { to });
                    }
                    return Ok(());
                }
                Err(e) => {
                    if let Some(peer) = e.peer() {
                        self.router.ban(peer);
                        // Any block of the peer's range will do: readers merge claims across
                        // every block's record.
                        let served = self.view.as_ref().and_then(|v| {
                            v.servers
                                .iter()
                                .find(|s| s.peer == peer)
                                .map(|s| s.blocks.start)
                        });
                        if let (true, Some(block)) = (e.unreachable(), served) {
                            self.router.network.report_unreachable(peer, block);
                        }
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

    /// Frees every span's cache on its peer, and on its verifier (best effort, bounded).
    pub async fn close(self) {
        let mut verifiers = Vec::new();
        let mut spans = Vec::new();
        for s in self.spans {
            verifiers.extend(s.check.into_verifier());
            spans.push(s.span);
        }
        let network = &self.router.network;
        futures::future::join_all(verifiers.into_iter().map(|s| network.close(s))).await;
        self.router.close_all(spans).await;
    }
}

/// Sends the kept inputs through the new spans in order, so each rebuilds its cache; each new
/// span's own history is what it was just sent. With `verified` (verification on, the
/// positions the replaced span had checked), each new span's answers from there on wait for
/// its own check: a replacement's word is worth no more than any other peer's. Returns the
/// states and the last span's answer.
async fn replay<N: Network>(
    network: &N,
    spans: Vec<OpenSpan<N::Span>>,
    history: &[f32],
    dim: usize,
    verified: Option<usize>,
) -> Result<(Vec<SpanState<N::Span>>, Hidden), SessionError> {
    let tokens = history.len() / dim;
    let mut x = Hidden {
        tokens,
        dim,
        data: history.to_vec(),
    };
    let mut states = Vec::with_capacity(spans.len());
    for mut span in spans {
        let inputs = x.data.clone();
        if tokens > 0 {
            x = network.step(&mut span.session, 0, &x).await?;
        }
        let mut state = SpanState::new(span, inputs, verified.unwrap_or(tokens));
        if let Some(from) = verified {
            state.check.outputs = x.data.get(from * dim..).unwrap_or_default().to_vec();
        }
        states.push(state);
    }
    Ok((states, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::ServerState;

    /// A swarm in memory: each span adds its block count to every value, `dead` peers fail
    /// every step from position `dies_at` on, and `liars` call every step a bad request.
    struct Fake {
        servers: Vec<Server>,
        dead: PeerId,
        dies_at: u32,
        liars: Vec<PeerId>,
        /// Refuse every open for want of cache.
        full: Vec<PeerId>,
        /// Answer every step with wrong values, each its own.
        corrupt: Vec<PeerId>,
        /// The `corrupt` peers answer honestly before this position.
        corrupt_from: u32,
        /// Take 20 ms per step.
        slow: Vec<PeerId>,
        steps: Mutex<Vec<(PeerId, u32, usize)>>,
        /// Push steps node to node; `Some(k)`: the node of span k cannot forward its output.
        push: Option<Option<usize>>,
        /// Spans run by pushes.
        pushed: Mutex<usize>,
        /// Never answer an open (a frozen machine whose record lingers).
        frozen: Vec<PeerId>,
        /// Open, then time out every step (a machine that froze after the open).
        stalls: Vec<PeerId>,
        /// Lookups made.
        lookups: Mutex<usize>,
        /// Peers claimed offline, with the block named.
        reported: Mutex<Vec<(PeerId, u32)>>,
    }

    impl Fake {
        /// `servers`, all answering honestly, none dying.
        fn new(servers: Vec<Server>) -> Self {
            Fake {
                servers,
                dead: PeerId::random(),
                dies_at: 0,
                liars: Vec::new(),
                full: Vec::new(),
                corrupt: Vec::new(),
                corrupt_from: 0,
                slow: Vec::new(),
                steps: Mutex::default(),
                push: None,
                pushed: Mutex::default(),
                frozen: Vec::new(),
                stalls: Vec::new(),
                lookups: Mutex::default(),
                reported: Mutex::default(),
            }
        }
    }

    fn server(peer: PeerId, blocks: Range<u32>, ms: f32) -> Server {
        Server {
            peer,
            addrs: Vec::new(),
            blocks,
            state: ServerState::Online,
            decode_ms_per_block: ms,
            prefill_ms_per_block: ms,
            free_cache_tokens: 1 << 20,
            version: String::new(),
            announced_at_ms: 0,
            load: Default::default(),
            reported_offline: false,
        }
    }

    impl Network for Fake {
        type Span = (PeerId, Range<u32>);

        fn now_ms(&self) -> u64 {
            1_000
        }

        async fn lookup(&self) -> Result<Vec<Server>, SessionError> {
            *self.lookups.lock().unwrap() += 1;
            Ok(self.servers.clone())
        }

        async fn rtt(&self, _peer: PeerId) -> Option<Duration> {
            Some(Duration::from_millis(1))
        }

        async fn open(
            &self,
            server: &Server,
            blocks: Range<u32>,
            max_length: u32,
        ) -> Result<Self::Span, SessionError> {
            if self.frozen.contains(&server.peer) {
                std::future::pending::<()>().await;
            }
            if self.full.contains(&server.peer) {
                return Err(SessionError::Remote {
                    peer: server.peer,
                    code: proto::v1::ErrorCode::CacheFull,
                    message: format!("no room for {max_length} more cached positions"),
                });
            }
            Ok((server.peer, blocks))
        }

        async fn step(
            &self,
            span: &mut Self::Span,
            pos: u32,
            hidden: &Hidden,
        ) -> Result<Hidden, SessionError> {
            let (peer, blocks) = span.clone();
            if peer == self.dead && pos + hidden.tokens as u32 > self.dies_at {
                return Err(SessionError::Closed { peer });
            }
            if self.stalls.contains(&peer) {
                return Err(SessionError::Timeout {
                    peer,
                    what: "step",
                    secs: 1.0,
                });
            }
            if self.liars.contains(&peer) {
                return Err(SessionError::Remote {
                    peer,
                    code: proto::v1::ErrorCode::BadRequest,
                    message: "malformed step".into(),
                });
            }
            if let Ok(mut s) = self.steps.lock() {
                s.push((peer, pos, hidden.tokens));
            }
            if self.slow.contains(&peer) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let lie = self.corrupt.iter().position(|&p| p == peer);
            let data = hidden
                .data
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let row = pos + (i / hidden.dim) as u32;
                    let wrong = lie.filter(|_| row >= self.corrupt_from);
                    v + blocks.len() as f32 + wrong.map_or(0.0, |k| 1000.0 * (k + 1) as f32)
                })
                .collect();
            Ok(Hidden { data, ..*hidden })
        }

        async fn close(&self, _span: Self::Span) {}

        fn report_unreachable(&self, peer: PeerId, block: u32) {
            self.reported.lock().unwrap().push((peer, block));
        }

        async fn push(
            &self,
            spans: Vec<&mut Self::Span>,
            pos: u32,
            hidden: &Hidden,
        ) -> push::Pushed {
            let mut out = push::Pushed::default();
            let Some(unforwarded) = self.push else {
                return out;
            };
            let mut x = hidden.clone();
            for (i, span) in spans.into_iter().enumerate() {
                match Network::step(self, span, pos, &x).await {
                    Ok(y) => {
                        *self.pushed.lock().unwrap() += 1;
                        x = y.clone();
                        out.outputs.push(y);
                        if unforwarded == Some(i) {
                            out.stop = Some(push::PushStop::NotForwarded("unreachable".into()));
                            break;
                        }
                    }
                    Err(e) => {
                        out.stop = Some(push::PushStop::Failed(e));
                        break;
                    }
                }
            }
            out
        }
    }

    fn hidden(values: &[f32]) -> Hidden {
        Hidden {
            tokens: values.len(),
            dim: 1,
            data: values.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_lost_peer_is_banned_replaced_and_its_history_replayed() {
        let (fast, slow, tail) = (PeerId::random(), PeerId::random(), PeerId::random());
        let network = Fake {
            dead: fast,
            dies_at: 3,
            ..Fake::new(vec![
                server(fast, 0..4, 1.0),
                server(slow, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        };
        let router = Arc::new(Router {
            network,
            fingerprint: [0; 32],
            block_count: 6,
            dim: 1,
            discovery_timeout: Duration::from_secs(1),
            bans: Arc::default(),
            verify: VerifyPolicy::OFF,
        });
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, fast.to_string());

        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        let y = session.run_blocks(hidden(&[3.0]), 2).await.unwrap();
        assert_eq!(y.data, [9.0]);
        // Position 3 is past the fast peer's death: the same answer comes from the slow one.
        let y = session.run_blocks(hidden(&[4.0]), 3).await.unwrap();
        assert_eq!(y.data, [10.0]);

        assert_eq!(session.reroutes(), 1);
        assert_eq!(session.recoveries().len(), 1);
        assert_eq!(session.route()[0].peer, slow.to_string());
        assert!(router.bans.lock().unwrap().snapshot()[&fast] > 1_000);
        let steps = router.network.steps.lock().unwrap().clone();
        // The replacement first rebuilt its cache from the three kept positions, then stepped.
        let on_slow: Vec<_> = steps.iter().filter(|s| s.0 == slow).collect();
        assert_eq!(on_slow, [&(slow, 0, 3), &(slow, 3, 1)]);
    }

    fn router_of(network: Fake) -> Arc<Router<Fake>> {
        Arc::new(Router {
            network,
            fingerprint: [0; 32],
            block_count: 6,
            dim: 1,
            discovery_timeout: Duration::from_secs(5),
            bans: Arc::default(),
            verify: VerifyPolicy::OFF,
        })
    }

    #[tokio::test]
    async fn one_peer_calling_every_step_bad_is_routed_around_not_believed() {
        let (liar, honest, tail) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = router_of(Fake {
            liars: vec![liar],
            ..Fake::new(vec![
                server(liar, 0..4, 1.0),
                server(honest, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        });
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, liar.to_string());
        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        assert_eq!(session.route()[0].peer, honest.to_string());
        assert!(router.bans.lock().unwrap().snapshot().contains_key(&liar));
    }

    #[tokio::test]
    async fn a_request_two_peers_call_bad_fails_at_once() {
        let (a, b, tail) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = router_of(Fake {
            liars: vec![a, b],
            ..Fake::new(vec![
                server(a, 0..4, 1.0),
                server(b, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        });
        let mut session = InferenceSession::open(router, 16).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = session.run_blocks(hidden(&[1.0]), 0).await.unwrap_err();
        assert!(e.to_string().contains("malformed step"), "{e}");
        // Not after the 5 s discovery timeout: the two refusals are believed.
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_peer_without_room_is_skipped_for_the_request_not_banned() {
        let (full, roomy, tail) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = router_of(Fake {
            full: vec![full],
            ..Fake::new(vec![
                server(full, 0..4, 1.0),
                server(roomy, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        });
        let session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, roomy.to_string());
        assert!(router.bans.lock().unwrap().snapshot().is_empty());
    }

    /// A server another client could not reach is passed over while somebody else serves its
    /// blocks, however fast it says it is, and still used where nobody else does.
    #[tokio::test]
    async fn servers_claimed_offline_are_used_only_where_nobody_else_serves() {
        let [claimed, other, tail] = [(); 3].map(|_| PeerId::random());
        let offline = |mut s: Server| {
            s.reported_offline = true;
            s
        };
        let router = router_of(Fake::new(vec![
            offline(server(claimed, 0..6, 1.0)),
            server(other, 0..4, 10.0),
            server(tail, 4..6, 10.0),
        ]));
        let session = InferenceSession::open(router, 16).await.unwrap();
        let peers: Vec<String> = session.route().into_iter().map(|h| h.peer).collect();
        assert_eq!(peers, [other.to_string(), tail.to_string()]);

        let router = router_of(Fake::new(vec![
            offline(server(claimed, 0..6, 1.0)),
            server(other, 0..4, 10.0),
        ]));
        let session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route().last().unwrap().peer, claimed.to_string());
        // Nothing failed, so nothing is reported.
        assert!(router.network.reported.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_refused_open_is_planned_again_on_the_same_lookup() {
        let (full, roomy, tail) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = router_of(Fake {
            full: vec![full],
            ..Fake::new(vec![
                server(full, 0..4, 1.0),
                server(roomy, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        });
        let session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, roomy.to_string());
        assert_eq!(*router.network.lookups.lock().unwrap(), 1);
    }

    #[test]
    fn reroute_connect_is_a_few_round_trips_within_the_cap() {
        let cap = REROUTE_CONNECT;
        assert_eq!(reroute_connect(None, cap), cap);
        assert_eq!(reroute_connect(Some(f32::NAN), cap), cap);
        assert_eq!(reroute_connect(Some(0.0), cap), REROUTE_CONNECT_MIN);
        assert_eq!(reroute_connect(Some(10.0), cap), Duration::from_millis(340));
        // A far peer (100 ms each way) gets the cap, no more.
        assert_eq!(reroute_connect(Some(1_000.0), cap), cap);
    }

    /// The fast peer dies; the next best is frozen (its record still listed) and never
    /// answers an open. The reroute gives it a few of its round trips, not the whole bound,
    /// bans it and goes on to the third.
    #[tokio::test(start_paused = true)]
    async fn a_frozen_replacement_costs_a_reroute_a_few_round_trips() {
        let [fast, frozen, slow, tail] = [(); 4].map(|_| PeerId::random());
        let router = router_of(Fake {
            dead: fast,
            dies_at: 1,
            frozen: vec![frozen],
            ..Fake::new(vec![
                server(fast, 0..4, 1.0),
                server(frozen, 0..4, 2.0),
                server(slow, 0..4, 10.0),
                server(tail, 4..6, 1.0),
            ])
        });
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        let y = session.run_blocks(hidden(&[2.0]), 1).await.unwrap();
        assert_eq!(y.data, [8.0]);
        assert_eq!(session.route()[0].peer, slow.to_string());
        let bans = router.bans.lock().unwrap().snapshot();
        assert!(
            bans.contains_key(&fast) && bans.contains_key(&frozen),
            "{bans:?}"
        );
        // Only the frozen peer did not answer; the fast one closed its session, so it is there.
        assert_eq!(*router.network.reported.lock().unwrap(), [(frozen, 0)]);
        // Virtual time: the frozen peer's bound (1 ms round trips) and nothing else.
        let bound = reroute_connect(Some(1.0), REROUTE_CONNECT);
        assert_eq!(session.recoveries().len(), 1);
        assert!(session.recoveries()[0] >= bound);
        assert!(session.recoveries()[0] < REROUTE_CONNECT);
    }

    /// The fast peer dies; the next best opens but its machine froze, so the replay into it
    /// times out: it is banned and claimed offline like a peer that never opened, and the third
    /// takes the blocks.
    #[tokio::test(start_paused = true)]
    async fn a_replacement_silent_during_the_replay_is_claimed_offline() {
        let (router, mut session, [next, slow]) = session_losing_fast(Next::Stalls).await;
        let y = session.run_blocks(hidden(&[2.0]), 1).await.unwrap();
        assert_eq!(y.data, [8.0]);
        assert_eq!(session.route()[0].peer, slow.to_string());
        assert_eq!(*router.network.reported.lock().unwrap(), [(next, 0)]);
    }

    /// What the peer after `fast` does in [`session_losing_fast`].
    enum Next {
        Answers,
        /// Never answers an open.
        Frozen,
        /// Opens, then times out every step.
        Stalls,
    }

    /// A session over `fast` (which dies at position 1) and a tail, after its first token;
    /// `next` and then `slow` serve the fast peer's blocks too, `next` behaving as told.
    async fn session_losing_fast(
        behaviour: Next,
    ) -> (Arc<Router<Fake>>, InferenceSession<Fake>, [PeerId; 2]) {
        let [fast, next, slow] = [(); 3].map(|_| PeerId::random());
        let router = router_of(Fake {
            dead: fast,
            dies_at: 1,
            frozen: if matches!(behaviour, Next::Frozen) {
                vec![next]
            } else {
                Vec::new()
            },
            stalls: if matches!(behaviour, Next::Stalls) {
                vec![next]
            } else {
                Vec::new()
            },
            ..Fake::new(vec![
                server(fast, 0..4, 1.0),
                server(next, 0..4, 2.0),
                server(slow, 0..4, 10.0),
                server(PeerId::random(), 4..6, 1.0),
            ])
        });
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, fast.to_string());
        session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        (router, session, [next, slow])
    }

    #[tokio::test(start_paused = true)]
    async fn a_reroute_plans_on_the_sessions_recent_view_without_a_lookup() {
        let (router, mut session, [next, _]) = session_losing_fast(Next::Answers).await;
        // Older than a request's own reuse, younger than a session's.
        tokio::time::sleep(VIEW_REUSE * 5).await;
        session.run_blocks(hidden(&[2.0]), 1).await.unwrap();
        assert_eq!(session.reroutes(), 1);
        assert_eq!(session.route()[0].peer, next.to_string());
        assert_eq!(*router.network.lookups.lock().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reroute_looks_up_again_when_the_sessions_view_is_old_or_fails_it() {
        let (router, mut session, [next, _]) = session_losing_fast(Next::Answers).await;
        tokio::time::sleep(SESSION_VIEW_REUSE).await;
        session.run_blocks(hidden(&[2.0]), 1).await.unwrap();
        assert_eq!(session.route()[0].peer, next.to_string());
        assert_eq!(*router.network.lookups.lock().unwrap(), 2);

        // Recent, but the peer it offers froze since: one bounded attempt on it, then a
        // fresh lookup for the next route.
        let (router, mut session, [next, slow]) = session_losing_fast(Next::Frozen).await;
        tokio::time::sleep(VIEW_REUSE * 5).await;
        session.run_blocks(hidden(&[2.0]), 1).await.unwrap();
        assert_eq!(session.route()[0].peer, slow.to_string());
        assert!(router.bans.lock().unwrap().snapshot().contains_key(&next));
        assert_eq!(*router.network.lookups.lock().unwrap(), 2);
        assert!(session.recoveries()[0] < REROUTE_CONNECT);
    }

    #[tokio::test]
    async fn a_request_no_peer_has_room_for_fails_with_their_answer_and_bans_nobody() {
        let (full, tail) = (PeerId::random(), PeerId::random());
        let network = Fake {
            full: vec![full],
            ..Fake::new(vec![server(full, 0..4, 1.0), server(tail, 4..6, 1.0)])
        };
        let router = Arc::new(Router {
            network,
            fingerprint: [0; 32],
            block_count: 6,
            dim: 1,
            discovery_timeout: Duration::from_millis(1500),
            bans: Arc::default(),
            verify: VerifyPolicy::OFF,
        });
        let Err(e) = InferenceSession::open(router.clone(), 1 << 20).await else {
            panic!("opened without room");
        };
        assert!(e.to_string().contains("no room for"), "{e}");
        assert!(router.bans.lock().unwrap().snapshot().is_empty());
    }

    fn verifying(network: Fake, every: usize) -> Arc<Router<Fake>> {
        verifying_with(network, VerifyPolicy::every(every))
    }

    fn verifying_with(network: Fake, verify: VerifyPolicy) -> Arc<Router<Fake>> {
        Arc::new(Router {
            network,
            fingerprint: [0; 32],
            block_count: 6,
            dim: 1,
            discovery_timeout: Duration::from_secs(5),
            bans: Arc::default(),
            verify,
        })
    }

    #[tokio::test]
    async fn a_corrupt_primary_is_caught_banned_and_the_session_rolls_back() {
        let (liar, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = verifying(
            Fake {
                corrupt: vec![liar],
                ..Fake::new(vec![
                    server(liar, 0..6, 1.0),
                    server(a, 0..6, 10.0),
                    server(b, 0..6, 10.0),
                ])
            },
            2,
        );
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, liar.to_string());
        // The liar's answers come back, unsettled: their check runs beside the session.
        let y = session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        assert_eq!(y.data, [1006.0 + 1.0]);
        assert_eq!(session.settled(), 0);
        let caught = match session.run_blocks(hidden(&[2.0]), 1).await {
            Ok(_) => session.settle().await.unwrap_err(),
            Err(e) => e,
        };
        assert!(matches!(caught, RouteError::Rewound { to: 0 }), "{caught}");
        assert_eq!(session.caught(), [liar]);
        assert!(router.bans.lock().unwrap().snapshot().contains_key(&liar));
        assert_ne!(session.route()[0].peer, liar.to_string());
        // Run again from there: honest answers, checked.
        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        session.settle().await.unwrap();
        assert_eq!(session.settled(), 2);
    }

    /// A generation of `tokens` positions after a 4-token prompt, one position per step,
    /// stopping at the first rollback. Returns where the session was rolled back, if it was.
    async fn run_until_caught(session: &mut InferenceSession<Fake>, tokens: u32) -> Option<u32> {
        let prompt = session.run_blocks(hidden(&[1.0, 2.0, 3.0, 4.0]), 0).await;
        if let Err(RouteError::Rewound { .. }) = prompt {
            return Some(0);
        }
        prompt.unwrap();
        for pos in 4..4 + tokens {
            match session.run_blocks(hidden(&[5.0]), pos).await {
                Ok(_) => {}
                Err(RouteError::Rewound { .. }) => return Some(pos),
                Err(e) => panic!("{e}"),
            }
        }
        match session.settle().await {
            Ok(()) => None,
            Err(RouteError::Rewound { .. }) => Some(4 + tokens),
            Err(e) => panic!("{e}"),
        }
    }

    /// Auditing no span past its first check still catches a peer that corrupts every step,
    /// within the first check's window, though that check covers one row of the prompt only.
    #[tokio::test]
    async fn without_audits_a_peer_corrupting_every_step_is_caught_by_the_first_check() {
        let (liar, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let first = 6;
        let router = verifying_with(
            Fake {
                corrupt: vec![liar],
                ..Fake::new(vec![
                    server(liar, 0..6, 1.0),
                    server(a, 0..6, 10.0),
                    server(b, 0..6, 10.0),
                ])
            },
            VerifyPolicy::every(32)
                .first_within(first)
                .audit_share(0.0)
                .first_check_rows(1),
        );
        let mut session = InferenceSession::open(router.clone(), 64).await.unwrap();
        let caught = run_until_caught(&mut session, 20).await;
        let caught = caught.expect("the liar was never caught");
        assert!(caught as usize <= 4 + 1 + first, "caught at {caught}");
        assert_eq!(session.caught(), [liar]);
    }

    /// A span not drawn for auditing checks only its prompt's first rows, stops using its
    /// verifier after that and takes every later output as final at once; one that is drawn
    /// keeps checking, and so catches a peer that turns bad only after the first check. This
    /// is the price of sampling.
    #[tokio::test]
    async fn an_unaudited_span_stops_checking_after_its_first_check() {
        let (liar, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let fake = || Fake {
            corrupt: vec![liar],
            corrupt_from: 16,
            ..Fake::new(vec![
                server(liar, 0..6, 1.0),
                server(a, 0..6, 10.0),
                server(b, 0..6, 10.0),
            ])
        };
        let policy = VerifyPolicy::every(4).first_within(2).first_check_rows(2);

        let router = verifying_with(fake(), policy.audit_share(0.0));
        let mut session = InferenceSession::open(router.clone(), 64).await.unwrap();
        assert_eq!(session.route()[0].peer, liar.to_string());
        assert_eq!(run_until_caught(&mut session, 24).await, None);
        assert_eq!(session.settled(), 28);
        let verifier_steps: Vec<(u32, usize)> = router
            .network
            .steps
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| *p != liar)
            .map(|&(_, pos, n)| (pos, n))
            .collect();
        // One check: the prompt's first two positions, in one step.
        assert_eq!(verifier_steps, [(0, 2)]);

        let router = verifying_with(fake(), policy.audit_share(1.0));
        let mut session = InferenceSession::open(router.clone(), 64).await.unwrap();
        assert!(run_until_caught(&mut session, 24).await.is_some());
        assert_eq!(session.caught(), [liar]);
    }

    /// The primary answers at once, the honest peers slowly: the first check comes back late,
    /// and the session must wait for it rather than run on past `first` positions.
    #[tokio::test]
    async fn the_first_check_lands_within_first_positions_even_when_the_verifier_is_slow() {
        let (liar, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let first = 3;
        let router = verifying_with(
            Fake {
                corrupt: vec![liar],
                slow: vec![a, b],
                ..Fake::new(vec![
                    server(liar, 0..6, 1.0),
                    server(a, 0..6, 10.0),
                    server(b, 0..6, 10.0),
                ])
            },
            VerifyPolicy::every(32).first_within(first),
        );
        let mut session = InferenceSession::open(router.clone(), 64).await.unwrap();
        let prompt = 4;
        session
            .run_blocks(hidden(&[1.0, 2.0, 3.0, 4.0]), 0)
            .await
            .unwrap();
        let mut caught_at = None;
        for pos in prompt..prompt + 20 {
            match session.run_blocks(hidden(&[5.0]), pos as u32).await {
                Ok(_) => {}
                Err(e) => {
                    assert!(matches!(e, RouteError::Rewound { to: 0 }), "{e}");
                    caught_at = Some(pos);
                    break;
                }
            }
        }
        // The first check covers the prompt and position `prompt`; the step at
        // `prompt + 1 + first` may not start before it is read.
        let caught_at = caught_at.expect("the liar was never caught");
        assert!(caught_at <= prompt + 1 + first, "caught at {caught_at}");
        assert_eq!(session.caught(), [liar]);
    }

    /// A liar that dies before its outputs are checked: the replacement replays the history,
    /// and its answers (not the dead liar's, which the session used) decide.
    #[tokio::test]
    async fn positions_a_replacement_replays_are_not_taken_as_checked() {
        let (liar, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let router = verifying_with(
            Fake {
                corrupt: vec![liar],
                dead: liar,
                dies_at: 2,
                ..Fake::new(vec![
                    server(liar, 0..6, 1.0),
                    server(a, 0..6, 10.0),
                    server(b, 0..6, 10.0),
                ])
            },
            VerifyPolicy::every(32).first_within(32),
        );
        let mut session = InferenceSession::open(router.clone(), 64).await.unwrap();
        session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        // The liar dies at its second step, before any check started: only the replacement's
        // replay can show that its two answers were wrong.
        let e = session.run_blocks(hidden(&[3.0]), 2).await.unwrap_err();
        assert!(matches!(e, RouteError::Rewound { to: 0 }), "{e}");
        assert_ne!(session.route()[0].peer, liar.to_string());
        assert_eq!(session.settled(), 0);
        assert!(
            session.caught().is_empty(),
            "nobody was caught lying by a check"
        );
        let y = session
            .run_blocks(hidden(&[1.0, 2.0, 3.0]), 0)
            .await
            .unwrap();
        assert_eq!(y.data, [7.0, 8.0, 9.0]);
        session.settle().await.unwrap();
        assert_eq!(session.settled(), 3);
    }

    /// Three peers of the whole span, three different answers: no majority, so none of them is
    /// kept (the tie-break peer does not become the primary, as it once did). Two honest peers
    /// of half the span each cannot check it, but can take it over.
    #[tokio::test]
    async fn three_different_answers_trust_none_of_them() {
        let [x, y, z, h1, h2] = [(); 5].map(|_| PeerId::random());
        let router = verifying(
            Fake {
                corrupt: vec![x, y, z],
                ..Fake::new(vec![
                    server(x, 0..6, 1.0),
                    server(y, 0..6, 10.0),
                    server(z, 0..6, 10.0),
                    server(h1, 0..3, 20.0),
                    server(h2, 3..6, 20.0),
                ])
            },
            8,
        );
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        assert_eq!(session.route()[0].peer, x.to_string());
        session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        let e = session.settle().await.unwrap_err();
        assert!(matches!(e, RouteError::Rewound { to: 0 }), "{e}");
        assert!(session.caught().is_empty(), "{:?}", session.caught());
        let route: Vec<_> = session.route().into_iter().map(|h| h.peer).collect();
        assert_eq!(route, [h1.to_string(), h2.to_string()]);
        let bans = router.bans.lock().unwrap().snapshot();
        assert!([x, y, z].iter().all(|p| bans.contains_key(p)), "{bans:?}");
        let out = session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        assert_eq!(out.data, [7.0]);
        session.settle().await.unwrap();
    }

    #[tokio::test]
    async fn without_a_second_peer_outputs_are_not_checked_and_not_held_back() {
        let only = PeerId::random();
        let router = verifying(Fake::new(vec![server(only, 0..6, 1.0)]), 1);
        let mut session = InferenceSession::open(router, 16).await.unwrap();
        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        session.settle().await.unwrap();
        assert_eq!(session.settled(), 2);
        assert!(session.caught().is_empty());
    }

    fn three_spans(push: Option<usize>) -> (Fake, [PeerId; 4]) {
        let [a, b, c, spare] = [(); 4].map(|_| PeerId::random());
        let fake = Fake {
            push: Some(push),
            ..Fake::new(vec![
                server(a, 0..2, 1.0),
                server(b, 2..4, 1.0),
                server(c, 4..6, 1.0),
                server(spare, 2..4, 10.0),
            ])
        };
        (fake, [a, b, c, spare])
    }

    #[tokio::test]
    async fn a_pushed_step_gives_the_relayed_answer_and_keeps_every_spans_inputs() {
        let (fake, [_, b, _, spare]) = three_spans(None);
        let router = router_of(Fake {
            dead: b,
            dies_at: 3,
            ..fake
        });
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        assert_eq!(*router.network.pushed.lock().unwrap(), 3);
        let y = session.run_blocks(hidden(&[3.0]), 2).await.unwrap();
        assert_eq!(y.data, [9.0]);
        // b dies inside the push at position 3: the spare replays b's inputs as the client
        // got them from a's answers, then the rest of the step is relayed.
        let y = session.run_blocks(hidden(&[4.0]), 3).await.unwrap();
        assert_eq!(y.data, [10.0]);
        assert_eq!(session.reroutes(), 1);
        assert_eq!(session.route()[1].peer, spare.to_string());
        let steps = router.network.steps.lock().unwrap().clone();
        let on_spare: Vec<_> = steps.iter().filter(|s| s.0 == spare).collect();
        assert_eq!(on_spare, [&(spare, 0, 3), &(spare, 3, 1)]);
    }

    #[tokio::test]
    async fn a_push_that_cannot_be_forwarded_is_relayed_from_where_it_stopped() {
        let (fake, [a, b, c, _]) = three_spans(Some(0));
        let router = router_of(fake);
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        let y = session.run_blocks(hidden(&[1.0, 2.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0, 8.0]);
        assert_eq!(session.reroutes(), 0, "a failed forward bans nobody");
        assert_eq!(*router.network.pushed.lock().unwrap(), 1);
        let steps = router.network.steps.lock().unwrap().clone();
        assert_eq!(steps, [(a, 0, 2), (b, 0, 2), (c, 0, 2)]);
    }

    #[tokio::test]
    async fn with_verification_on_steps_are_relayed_not_pushed() {
        let (fake, _) = three_spans(None);
        let router = verifying(fake, 4);
        let mut session = InferenceSession::open(router.clone(), 16).await.unwrap();
        let y = session.run_blocks(hidden(&[1.0]), 0).await.unwrap();
        assert_eq!(y.data, [7.0]);
        assert_eq!(*router.network.pushed.lock().unwrap(), 0);
    }
}
