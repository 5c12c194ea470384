//! The [`Network`] through which the real client code talks to a simulated swarm: lookups of
//! the DHT's view, modelled links, sessions that take a peer's room, and steps priced by the
//! peer's batching (see [`crate::compute`]). Also the route policies the planner is compared
//! with.
//!
//! Steps go node to node by default, as the real client sends them ([`Network::push`]): a
//! token's whole chain of spans is priced in one simulated call and one timer, instead of one
//! of each per span, which is most of what a large run costs. Its failures come back as the
//! real push reports them, so the session's own relay, reroute and replay code runs after
//! them. With push off every span is relayed by the client, one call each, as the real client
//! does under `--no-push`.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use coordinator::route::{plan_load_aware, plan_route, PlanError, PlanRequest, ServerInfo, Span};
use coordinator::session::push::{PushStop, Pushed};
use coordinator::session::{Candidates, Network, SessionError};
use libp2p::PeerId;
use model::Hidden;
use proto::v1::ErrorCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use swarm::discovery::Server;

use crate::profiles::LinkProfile;
use crate::scenario::Leave;
use crate::world::{base_rtt_ms, State, World, EPOCH_MS};

/// A lost packet costs a retransmission timeout on top of the round trip.
const RTO_MS: f64 = 200.0;

/// Up to this many peers banned at once are looked for by comparison, not by hashing.
const FEW_BANS: usize = 16;

/// How clients choose routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutePolicy {
    /// The project's planner, `plan_route`: the cheapest route for a client alone.
    Planner,
    /// The client's load-aware choice, `plan_load_aware`.
    LoadAware,
    /// Fewest spans, whatever their latency: the naive choice.
    FewestHops,
    /// Any peer that serves the next block, chosen at random.
    Random,
}

impl RoutePolicy {
    pub const ALL: [RoutePolicy; 4] = [
        Self::Planner,
        Self::LoadAware,
        Self::FewestHops,
        Self::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Planner => "planner",
            Self::LoadAware => "load-aware",
            Self::FewestHops => "fewest-hops",
            Self::Random => "random",
        }
    }
}

/// An open session on a simulated peer. Dropping it frees its room on the peer, as the node
/// frees a session whose stream went away.
pub struct SimSpan {
    world: Arc<Mutex<World>>,
    peer: u32,
    generation: u32,
    blocks: u32,
    tokens: u64,
}

impl Drop for SimSpan {
    fn drop(&mut self) {
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        w.release(self.peer as usize, self.generation, self.tokens);
    }
}

/// One client's view of a simulated swarm.
pub struct SimNetwork {
    world: Arc<Mutex<World>>,
    /// The world's link profiles, which its peers' `link` numbers index: a copy of its own,
    /// so that a push can price hops while it holds the world mutably for the peers' batches.
    links: Vec<LinkProfile>,
    link: LinkProfile,
    /// Index of `link` among the world's profiles.
    link_index: usize,
    policy: RoutePolicy,
    /// Whether steps go node to node, as the real client's `ClientConfig::push` (on by
    /// default) has them.
    push: bool,
    rng: Mutex<StdRng>,
}

/// How the simulated call ends, and after how long.
type Outcome<T> = (f64, Result<T, SessionError>);

impl SimNetwork {
    /// A client behind link profile number `link` of `links`, pushing steps node to node when
    /// `push` is on.
    pub fn new(
        world: Arc<Mutex<World>>,
        links: &[LinkProfile],
        link: usize,
        policy: RoutePolicy,
        push: bool,
        seed: u64,
    ) -> Self {
        Self {
            world,
            links: links.to_vec(),
            link: links[link].clone(),
            link_index: link,
            policy,
            push,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A panic elsewhere already fails the run; the data itself stays usable.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rng(&self) -> MutexGuard<'_, StdRng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_rtt_ms(&self, peer: &LinkProfile) -> f64 {
        base_rtt_ms(&self.link, peer)
    }

    /// A Kademlia lookup: a few round trips to DHT peers somewhere on the internet.
    fn lookup_ms(&self) -> f64 {
        3.0 * 2.0 * (self.link.delay_ms + 20.0)
    }

    /// One direction between this client and `peer`, carrying `bytes`.
    fn one_way_ms(&self, peer: &LinkProfile, bytes: f64) -> f64 {
        one_way_ms(&mut self.rng(), &self.link, peer, bytes)
    }

    fn step_now(&self, span: &SimSpan, hidden: &Hidden) -> Outcome<Hidden> {
        let mut w = self.world();
        let now = w.now_ms();
        let i = span.peer as usize;
        let id = w.schedule.peers[i].id;
        // Borrowed, not cloned: this runs once per span and token, and a profile's clone
        // allocates its name.
        let link = w.link(i);
        let timeout = w.cfg.step_timeout_s * 1000.0;
        let timed_out = || SessionError::Timeout {
            peer: id,
            what: "step",
            secs: timeout / 1000.0,
        };
        match w.state(i, now) {
            State::Gone(Leave::Freeze, _) => return (timeout, Err(timed_out())),
            State::Gone(_, _) | State::Absent => {
                return (
                    self.one_way_ms(link, 0.0),
                    Err(SessionError::Closed { peer: id }),
                )
            }
            _ if w.peers[i].generation != span.generation => {
                let rtt = self.base_rtt_ms(link);
                return (
                    rtt,
                    Err(SessionError::Remote {
                        peer: id,
                        code: ErrorCode::BlocksNotServed,
                        message: "moved to other blocks".into(),
                    }),
                );
            }
            _ => {}
        }
        let bytes = hidden.tokens as f64 * f64::from(w.cfg.hidden_bytes_per_token);
        let up = self.one_way_ms(link, bytes);
        let down = self.one_way_ms(link, bytes);
        let positions = 1.0 + (hidden.tokens as f64 - 1.0) * w.cfg.prefill_cost;
        let compute = f64::from(w.decode_ms(i)) * f64::from(span.blocks) * positions;
        let device = w.device(i);
        let computed = w.peers[i].batch.step(
            now,
            now + up,
            compute,
            device.batch_slope,
            device.max_sessions,
        );
        let done = computed + down;
        match w.schedule.peers[i].leave {
            Some((at, Leave::Freeze)) if (at as f64) < done => (timeout, Err(timed_out())),
            Some((at, _)) if (at as f64) < done => (
                (at as f64 - now).max(0.0) + down,
                Err(SessionError::Closed { peer: id }),
            ),
            _ if done - now > timeout => (timeout, Err(timed_out())),
            _ => (done - now, Ok(hidden.clone())),
        }
    }

    /// Prices a step pushed through `spans` node to node, as `push_through` runs it: the client
    /// sends it to the first span's peer; each peer computes it when its batch lets it (see
    /// [`crate::compute`]), forwards its output to the next span's peer and answers the client
    /// with it too; the client reads the answers in route order, each within the step timeout
    /// from when it starts waiting for it. Returns when the client has read the last answer it
    /// gets, and what it got, stopped where the real push stops:
    /// - the first span's peer gone or moved, or any span's peer frozen or dying before its
    ///   answer: that span failed ([`PushStop::Failed`]), with the error a relayed step gets;
    /// - a later span's peer gone or moved before the step reaches it: the previous peer could
    ///   not forward ([`PushStop::NotForwarded`]), which it learns in a round trip to that peer
    ///   and reports after its answer; the client then relays that span itself and meets the
    ///   failure there.
    ///
    /// Every span's compute is priced now, at the time the step will reach its peer; a peer's
    /// batch takes arrivals priced out of order (see [`crate::compute`]).
    fn push_now(&self, spans: &[&mut SimSpan], hidden: &Hidden) -> (f64, Pushed) {
        let mut w = self.world();
        let mut rng = self.rng();
        let now = w.now_ms();
        let timeout = w.cfg.step_timeout_s * 1000.0;
        let bytes = hidden.tokens as f64 * f64::from(w.cfg.hidden_bytes_per_token);
        let positions = 1.0 + (hidden.tokens as f64 - 1.0) * w.cfg.prefill_cost;
        let mut pushed = Pushed {
            outputs: Vec::with_capacity(spans.len()),
            stop: None,
        };
        // When the client has read every answer so far and starts waiting for the next.
        let mut read = now;
        // The span before: its peer, when it computed the step, and its answer's way back.
        let mut prev: Option<(usize, f64, f64)> = None;
        for span in spans {
            let i = span.peer as usize;
            let spec = &w.schedule.peers[i];
            let link = &self.links[spec.link];
            let leave = match w.state(i, now) {
                State::Absent => Some((now, Leave::Crash)),
                _ => spec.leave.map(|(at, kind)| (at as f64, kind)),
            };
            let moved = w.peers[i].generation != span.generation;
            let (from, sent) = match prev {
                None => (&self.link, now),
                Some((p, computed, _)) => (&self.links[w.schedule.peers[p].link], computed),
            };
            let arrive = sent + one_way_ms(&mut rng, from, link, bytes);
            // The peer's id only on the way out: it is most of a schedule entry, and the chain
            // of a step that goes through is priced without it.
            let id = |w: &World| w.schedule.peers[i].id;
            let timed_out = |peer| SessionError::Timeout {
                peer,
                what: "pushed step",
                secs: timeout / 1000.0,
            };
            let fail = |pushed: &mut Pushed, e| pushed.stop = Some(PushStop::Failed(e));
            let gone_on_arrival = leave.filter(|&(at, _)| at <= arrive);
            match (prev, gone_on_arrival) {
                (_, Some((_, Leave::Freeze))) => {
                    fail(&mut pushed, timed_out(id(&w)));
                    return (read + timeout - now, pushed);
                }
                (Some((p, computed, down)), _) if moved || gone_on_arrival.is_some() => {
                    let reason = if moved {
                        "no session here has this push token"
                    } else {
                        "connection refused"
                    };
                    let from_id = w.schedule.peers[p].id;
                    let reported = computed + base_rtt_ms(from, link) + down;
                    pushed.stop = Some(PushStop::NotForwarded(format!(
                        "{from_id}: forwarding to {}: {reason}",
                        id(&w)
                    )));
                    return (read.max(reported) - now, pushed);
                }
                (None, Some((at, _))) => {
                    let closed = at.max(now) + one_way_ms(&mut rng, &self.link, link, 0.0);
                    fail(&mut pushed, SessionError::Closed { peer: id(&w) });
                    return (read.max(closed) - now, pushed);
                }
                (None, None) if moved => {
                    let refused = now + base_rtt_ms(&self.link, link);
                    let e = SessionError::Remote {
                        peer: id(&w),
                        code: ErrorCode::BlocksNotServed,
                        message: "moved to other blocks".into(),
                    };
                    fail(&mut pushed, e);
                    return (read.max(refused) - now, pushed);
                }
                _ => {}
            }
            let compute = f64::from(w.decode_ms(i)) * f64::from(span.blocks) * positions;
            let device = w.device(i);
            let computed = w.peers[i].batch.step(
                now,
                arrive,
                compute,
                device.batch_slope,
                device.max_sessions,
            );
            let down = one_way_ms(&mut rng, link, &self.link, bytes);
            let answer = computed + down;
            match leave {
                Some((at, Leave::Freeze)) if at < computed => {
                    fail(&mut pushed, timed_out(id(&w)));
                    return (read + timeout - now, pushed);
                }
                Some((at, _)) if at < computed => {
                    fail(&mut pushed, SessionError::Closed { peer: id(&w) });
                    return (read.max(at + down) - now, pushed);
                }
                _ if answer - read > timeout => {
                    fail(&mut pushed, timed_out(id(&w)));
                    return (read + timeout - now, pushed);
                }
                _ => {}
            }
            pushed.outputs.push(hidden.clone());
            read = read.max(answer);
            prev = Some((i, computed, down));
        }
        (read - now, pushed)
    }

    fn open_now(&self, server: &Server, blocks: &Range<u32>, tokens: u64) -> Outcome<SimSpan> {
        let mut w = self.world();
        let now = w.now_ms();
        let peer = server.peer;
        let Some(&i) = w.index.get(&peer) else {
            let e = SessionError::Stream {
                peer,
                reason: "unknown peer".into(),
            };
            return (0.0, Err(e));
        };
        let link = w.link(i as usize).clone();
        let rtt = self.base_rtt_ms(&link);
        let p = &w.peers[i as usize];
        let generation = p.generation;
        let serves = p.blocks.start <= blocks.start && blocks.end <= p.blocks.end;
        match w.state(i as usize, now) {
            State::Gone(Leave::Freeze, _) => {
                let secs = w.cfg.connect_timeout_s;
                let e = SessionError::Timeout {
                    peer,
                    what: "stream open",
                    secs,
                };
                (secs * 1000.0, Err(e))
            }
            State::Gone(_, _) | State::Absent => {
                let e = SessionError::Stream {
                    peer,
                    reason: "connection refused".into(),
                };
                (rtt, Err(e))
            }
            State::Loading => (rtt * 2.0, Err(refused(peer, ErrorCode::BlocksNotServed))),
            State::Online if !serves => (rtt * 2.0, Err(refused(peer, ErrorCode::BlocksNotServed))),
            State::Online => match w.admit(i as usize, tokens) {
                Err(code) => (rtt * 2.0, Err(refused(peer, code))),
                Ok(()) => {
                    drop(w);
                    // Dial plus the open exchange: two round trips.
                    let span = SimSpan {
                        world: self.world.clone(),
                        peer: i,
                        generation,
                        blocks: blocks.len() as u32,
                        tokens,
                    };
                    (self.one_way_ms(&link, 0.0) * 4.0, Ok(span))
                }
            },
        }
    }
}

/// One direction between two access links, carrying `bytes`: both links' delays, jitter drawn
/// from `rng`, the slower link's rate, and a retransmission when either link loses the data.
fn one_way_ms(rng: &mut StdRng, from: &LinkProfile, to: &LinkProfile, bytes: f64) -> f64 {
    let base = from.delay_ms + to.delay_ms;
    let jitter = (from.jitter_ms + to.jitter_ms) * rng.random_range(-1.0..1.0);
    let rate_bits_per_ms = from.rate_mbit.min(to.rate_mbit) * 1e3;
    let transfer = bytes * 8.0 / rate_bits_per_ms;
    let delivered = (1.0 - from.loss_pct / 100.0) * (1.0 - to.loss_pct / 100.0);
    let lost = rng.random::<f64>() >= delivered;
    let retransmit = if lost { RTO_MS + 2.0 * base } else { 0.0 };
    (base + jitter).max(0.0) + transfer + retransmit
}

fn refused(peer: PeerId, code: ErrorCode) -> SessionError {
    let message = match code {
        ErrorCode::BlocksNotServed => "not serving those blocks",
        _ => "no room for another session",
    };
    SessionError::Remote {
        peer,
        code,
        message: message.into(),
    }
}

async fn after<T>(ms: f64, r: T) -> T {
    tokio::time::sleep(Duration::from_micros((ms.max(0.0) * 1e3) as u64)).await;
    r
}

impl Network for SimNetwork {
    type Span = SimSpan;

    fn now_ms(&self) -> u64 {
        EPOCH_MS + self.world().now_ms() as u64
    }

    async fn lookup(&self) -> Result<Vec<Server>, SessionError> {
        let ms = self.lookup_ms();
        tokio::time::sleep(Duration::from_micros((ms * 1e3) as u64)).await;
        let view = self.world().servers();
        Ok(view.as_ref().clone())
    }

    /// As the default (a lookup, then the round trips), without copying the view: every
    /// client behind the same link shares the world's picture of it.
    async fn candidates(&self) -> Result<Candidates, SessionError> {
        let ms = self.lookup_ms();
        tokio::time::sleep(Duration::from_micros((ms * 1e3) as u64)).await;
        Ok(self.world().candidates(self.link_index))
    }

    fn report_unreachable(&self, peer: PeerId, _block: u32) {
        // A get and a put of one block record: a lookup's round trips.
        let landed = self.lookup_ms();
        let mut w = self.world();
        let now = w.now_ms();
        w.claim_offline(peer, now, now + landed);
    }

    async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        let w = self.world();
        let i = *w.index.get(&peer)?;
        let ms = self.base_rtt_ms(w.link(i as usize));
        Some(Duration::from_secs_f64(ms / 1e3))
    }

    async fn rtts(&self, peers: &[PeerId]) -> Vec<Option<Duration>> {
        let w = self.world();
        peers
            .iter()
            .map(|p| {
                let i = *w.index.get(p)?;
                let ms = self.base_rtt_ms(w.link(i as usize));
                Some(Duration::from_secs_f64(ms / 1e3))
            })
            .collect()
    }

    fn plan(
        &self,
        servers: &[ServerInfo<PeerId>],
        req: &PlanRequest<'_, PeerId>,
    ) -> Result<Vec<Span<PeerId>>, PlanError> {
        match self.policy {
            RoutePolicy::Planner => plan_route(servers, req),
            RoutePolicy::LoadAware => plan_load_aware(servers, req, &mut *self.rng()),
            RoutePolicy::FewestHops => walk(servers, req, longest_reach),
            RoutePolicy::Random => {
                let mut rng = self.rng();
                walk(servers, req, |here| match here.iter().count() {
                    0 => None,
                    n => here.iter().nth(rng.random_range(0..n)),
                })
            }
        }
    }

    async fn open(
        &self,
        server: &Server,
        blocks: Range<u32>,
        max_length: u32,
    ) -> Result<SimSpan, SessionError> {
        let (ms, r) = self.open_now(server, &blocks, u64::from(max_length));
        after(ms, r).await
    }

    async fn step(
        &self,
        span: &mut SimSpan,
        _pos: u32,
        hidden: &Hidden,
    ) -> Result<Hidden, SessionError> {
        let (ms, r) = self.step_now(span, hidden);
        after(ms, r).await
    }

    async fn close(&self, _span: SimSpan) {}

    async fn push(&self, spans: Vec<&mut SimSpan>, _pos: u32, hidden: &Hidden) -> Pushed {
        // As the real client: one span has nothing to forward to, so it is stepped as usual.
        if !self.push || spans.len() < 2 {
            return Pushed::default();
        }
        let (ms, pushed) = self.push_now(&spans, hidden);
        after(ms, pushed).await
    }
}

/// The usable servers of one block, in listing order. Walked again rather than collected: a
/// walk asks for them once per hop, over the hundreds of servers a lookup lists.
#[derive(Clone, Copy)]
struct Covering<'s, 'a> {
    usable: &'s [&'a ServerInfo<PeerId>],
    at: u32,
    end: u32,
}

impl<'a> Covering<'_, 'a> {
    fn iter(&self) -> impl Iterator<Item = &'a ServerInfo<PeerId>> + '_ {
        let at = self.at;
        self.usable
            .iter()
            .copied()
            .filter(move |s| s.blocks.contains(&at))
    }
}

/// Fewest hops: the server reaching furthest towards the request's end, the smaller peer on a
/// tie.
fn longest_reach<'a>(here: Covering<'_, 'a>) -> Option<&'a ServerInfo<PeerId>> {
    let reach = |s: &ServerInfo<PeerId>| s.blocks.end.min(here.end);
    // `max_by`, not `max_by_key`: a key would copy each server's 80-byte id to compare it.
    here.iter()
        .max_by(|a, b| reach(a).cmp(&reach(b)).then_with(|| b.peer.cmp(&a.peer)))
}

/// A baseline route: from the first block on, take the peer `choose` picks among the usable
/// servers of the next block, as far as it goes.
fn walk<'a>(
    servers: &'a [ServerInfo<PeerId>],
    req: &PlanRequest<'_, PeerId>,
    mut choose: impl FnMut(Covering<'_, 'a>) -> Option<&'a ServerInfo<PeerId>>,
) -> Result<Vec<Span<PeerId>>, PlanError> {
    if req.blocks.is_empty() {
        return Err(PlanError::EmptyRequest);
    }
    // What `is_usable` decides, without hashing each of the thousands of servers into the
    // ban table while only a few peers are banned now (as the planner does): SipHash over
    // every listed id was a visible share of these policies' run time.
    let banned: Vec<&PeerId> = req
        .banned_until_ms
        .iter()
        .filter(|&(_, &until)| req.now_ms < until)
        .map(|(peer, _)| peer)
        .collect();
    let usable: Vec<&ServerInfo<PeerId>> = servers
        .iter()
        .filter(|s| {
            if banned.len() <= FEW_BANS {
                s.online && !banned.contains(&&s.peer)
            } else {
                s.is_usable(req)
            }
        })
        .collect();
    let mut at = req.blocks.start;
    let mut route = Vec::new();
    while at < req.blocks.end {
        let here = Covering {
            usable: &usable,
            at,
            end: req.blocks.end,
        };
        let Some(s) = choose(here) else {
            return Err(PlanError::Uncovered {
                missing: at..at + 1,
            });
        };
        let end = s.blocks.end.min(req.blocks.end);
        route.push(Span {
            peer: s.peer,
            blocks: at..end,
        });
        at = end;
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use coordinator::session::{InferenceSession, Router, VerifyPolicy};

    use super::*;
    use crate::scenario::{peer_id, Config, PeerSpec, Schedule};

    /// A link without jitter or loss, so that prices are exact.
    fn link(name: &str, delay_ms: f64) -> LinkProfile {
        LinkProfile {
            name: name.into(),
            delay_ms,
            jitter_ms: 0.0,
            loss_pct: 0.0,
            rate_mbit: 1000.0,
        }
    }

    /// A peer: its device and link numbers, its blocks, and when and how it leaves.
    type PeerAt = (usize, usize, Range<u32>, Option<(u64, Leave)>);

    /// A world of `peers`, every one there from the start with the blocks given.
    fn world(links: &[LinkProfile], blocks: u32, peers: &[PeerAt]) -> Arc<Mutex<World>> {
        let mut cfg = Config::new(peers.len(), blocks, 1.0, 1);
        cfg.clients = 0;
        let schedule = Schedule {
            peers: peers
                .iter()
                .enumerate()
                .map(|(n, (device, link, _, leave))| PeerSpec {
                    id: peer_id(n),
                    device: *device,
                    link: *link,
                    join_ms: 0,
                    leave: *leave,
                    linger_ms: 30_000,
                    check_phase_ms: 0,
                    announce_phase_ms: 0,
                    skewed: false,
                })
                .collect(),
            clients: Vec::new(),
        };
        let mut w = World::new(&cfg, links, Arc::new(schedule));
        for (p, (_, _, b, _)) in w.peers.iter_mut().zip(peers) {
            p.blocks = b.clone();
        }
        Arc::new(Mutex::new(w))
    }

    /// One span on each peer of `w`, in peer order, as opened on its current blocks.
    fn spans(w: &Arc<Mutex<World>>) -> Vec<SimSpan> {
        let peers = w.lock().unwrap().peers.len() as u32;
        (0..peers)
            .map(|peer| SimSpan {
                world: w.clone(),
                peer,
                generation: 0,
                blocks: 2,
                tokens: 16,
            })
            .collect()
    }

    fn token() -> Hidden {
        Hidden {
            tokens: 1,
            dim: 1,
            data: vec![0.0],
        }
    }

    /// Bytes of one token's hidden state over a 1000 Mbit/s link, in ms.
    const TRANSFER_MS: f64 = 8192.0 * 8.0 / 1e6;
    /// Two blocks on the GPU desktop (`DEVICES[0]`).
    const COMPUTE_MS: f64 = 1.5 * 2.0;

    #[tokio::test(start_paused = true)]
    async fn a_pushed_chain_costs_its_hops_and_computes_in_one_timer() {
        let links = [link("a", 2.0), link("b", 5.0), link("c", 10.0)];
        let peers = [(0, 0, 0..2, None), (0, 1, 2..4, None), (0, 2, 4..6, None)];
        let w = world(&links, 6, &peers);
        let net = SimNetwork::new(w.clone(), &links, 0, RoutePolicy::Planner, true, 1);
        let mut chain = spans(&w);
        let refs: Vec<&mut SimSpan> = chain.iter_mut().collect();
        let (ms, pushed) = net.push_now(&refs, &token());
        assert_eq!(pushed.outputs.len(), 3);
        assert!(pushed.stop.is_none());
        // Client to a, a to b, b to c, c back to the client; each peer computing once.
        let hops = [2.0 + 2.0, 2.0 + 5.0, 5.0 + 10.0, 10.0 + 2.0];
        let expected = hops.iter().map(|h| h + TRANSFER_MS).sum::<f64>() + 3.0 * COMPUTE_MS;
        assert!((ms - expected).abs() < 1e-9, "{ms} ms, expected {expected}");

        // Through the seam, on idle peers again: one timer, which tokio's wheel rounds up to
        // the millisecond.
        let w = world(&links, 6, &peers);
        let net = SimNetwork::new(w.clone(), &links, 0, RoutePolicy::Planner, true, 1);
        let started = tokio::time::Instant::now();
        let pushed = net.push(spans(&w).iter_mut().collect(), 0, &token()).await;
        let waited = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(pushed.outputs.len(), 3);
        assert!(expected <= waited && waited < expected + 1.0, "{waited} ms");

        // Relayed, each span is a round trip from the client.
        let w = world(&links, 6, &peers);
        let net = SimNetwork::new(w.clone(), &links, 0, RoutePolicy::Planner, false, 1);
        let mut relayed = 0.0;
        for span in &spans(&w) {
            let (ms, r) = net.step_now(span, &token());
            assert!(r.is_ok());
            relayed += ms;
        }
        let expected = [2.0 + 2.0, 2.0 + 5.0, 2.0 + 10.0]
            .iter()
            .map(|h| 2.0 * (h + TRANSFER_MS) + COMPUTE_MS)
            .sum::<f64>();
        assert!((relayed - expected).abs() < 1e-9, "{relayed} vs {expected}");
        assert!(ms < relayed);
        // Push off: nothing pushed, the session relays.
        let pushed = net.push(spans(&w).iter_mut().collect(), 0, &token()).await;
        assert!(pushed.outputs.is_empty() && pushed.stop.is_none());
    }

    /// Pushes one token through three spans on `links[0]` peers, the middle one leaving as
    /// `leave` says (and moved to other blocks if `moved`).
    fn push_past(leave: Option<(u64, Leave)>, moved: bool) -> (f64, Pushed) {
        let links = [link("a", 2.0)];
        let peers = [(0, 0, 0..2, None), (0, 0, 2..4, leave), (0, 0, 4..6, None)];
        let w = world(&links, 6, &peers);
        if moved {
            w.lock().unwrap().peers[1].generation += 1;
        }
        let net = SimNetwork::new(w.clone(), &links, 0, RoutePolicy::Planner, true, 1);
        let mut chain = spans(&w);
        let refs: Vec<&mut SimSpan> = chain.iter_mut().collect();
        net.push_now(&refs, &token())
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_stops_at_a_failed_peer_mid_chain_as_the_real_push_does() {
        let hop = 4.0 + TRANSFER_MS;
        // The first answer: up to the first peer, its compute, and back.
        let first = 2.0 * hop + COMPUTE_MS;
        let second_arrives = hop + COMPUTE_MS + hop;

        // Gone before the step reaches it: the first peer cannot forward, and says so after
        // its answer, a round trip to the dead peer later.
        for (leave, moved) in [(Some((0, Leave::Crash)), false), (None, true)] {
            let (ms, pushed) = push_past(leave, moved);
            assert_eq!(pushed.outputs.len(), 1);
            assert!(
                matches!(&pushed.stop, Some(PushStop::NotForwarded(r)) if r.contains("forwarding")),
                "{leave:?} {moved}"
            );
            assert!((ms - (first + 8.0)).abs() < 1e-9, "{ms}");
        }

        // Dies while computing: its session closes, the client hears it after the first answer.
        let dies = second_arrives + 1.0;
        let (ms, pushed) = push_past(Some((dies as u64, Leave::Crash)), false);
        assert_eq!(pushed.outputs.len(), 1);
        assert!(matches!(
            pushed.stop,
            Some(PushStop::Failed(SessionError::Closed { .. }))
        ));
        assert!((ms - (dies.floor() + hop)).abs() < 1e-9, "{ms}");

        // Freezes: the client waits the step timeout for its answer.
        let (ms, pushed) = push_past(Some((dies as u64, Leave::Freeze)), false);
        assert_eq!(pushed.outputs.len(), 1);
        assert!(matches!(
            pushed.stop,
            Some(PushStop::Failed(SessionError::Timeout { .. }))
        ));
        assert!((ms - (first + 10_000.0)).abs() < 1e-9, "{ms}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_dying_mid_chain_is_rerouted_and_the_generation_completes() {
        for push in [true, false] {
            let links = [link("a", 2.0)];
            // The planner takes the GPU for blocks 2..4; it crashes two seconds in, and the
            // laptop serving the same blocks takes over.
            let peers = [
                (0, 0, 0..2, None),
                (0, 0, 2..4, Some((2_000, Leave::Crash))),
                (1, 0, 2..4, None),
            ];
            let w = world(&links, 4, &peers);
            let ids: Vec<PeerId> = (0..3).map(peer_id).collect();
            let router = Arc::new(Router {
                network: SimNetwork::new(w.clone(), &links, 0, RoutePolicy::Planner, push, 1),
                fingerprint: [0; 32],
                block_count: 4,
                dim: 1,
                discovery_timeout: Duration::from_secs(30),
                bans: Arc::default(),
                verify: VerifyPolicy::OFF,
            });
            let started = tokio::time::Instant::now();
            let mut session = InferenceSession::open(router, 8 + 400).await.unwrap();
            let route: Vec<String> = session.route().into_iter().map(|h| h.peer).collect();
            assert_eq!(route, [ids[0].to_string(), ids[1].to_string()]);
            let prompt = Hidden {
                tokens: 8,
                dim: 1,
                data: vec![0.0; 8],
            };
            session.run_blocks(prompt, 0).await.unwrap();
            for pos in 8..408 {
                session.run_blocks(token(), pos).await.unwrap();
            }
            assert!(started.elapsed() > Duration::from_secs(2), "push {push}");
            assert_eq!(session.reroutes(), 1, "push {push}");
            let route: Vec<String> = session.route().into_iter().map(|h| h.peer).collect();
            assert_eq!(route, [ids[0].to_string(), ids[2].to_string()]);
            let (pushed, relayed) = session.hops();
            if push {
                // Every token's two spans pushed, but for the relay after the failure.
                assert!(pushed >= 2 * 400 && relayed <= 2, "{pushed} {relayed}");
            } else {
                assert_eq!(pushed, 0);
                assert!(relayed >= 2 * 401, "{relayed}");
            }
        }
    }

    fn server(n: u8, blocks: Range<u32>, ms: f32) -> ServerInfo<PeerId> {
        let mut secret = [n; 32];
        secret[31] = 1;
        let id = libp2p::identity::Keypair::ed25519_from_bytes(secret)
            .unwrap()
            .public()
            .to_peer_id();
        ServerInfo {
            peer: id,
            blocks,
            online: true,
            decode_ms_per_block: ms,
            rtt_ms: Some(10.0),
            free_cache_tokens: 1 << 20,
            load: Default::default(),
        }
    }

    #[test]
    fn fewest_hops_takes_the_longest_reach_and_chains_the_blocks() {
        let servers = vec![
            server(1, 0..4, 1.0),
            server(2, 0..8, 50.0),
            server(3, 4..12, 1.0),
            server(4, 8..12, 50.0),
        ];
        let banned = HashMap::new();
        let req = PlanRequest {
            blocks: 0..12,
            cache_tokens: 10,
            now_ms: 0,
            banned_until_ms: &banned,
            default_rtt_ms: 20.0,
        };
        let route = walk(&servers, &req, longest_reach).unwrap();
        assert_eq!(route.len(), 2);
        assert_eq!(route[0].peer, servers[1].peer);
        assert_eq!(route[0].blocks, 0..8);
        assert_eq!(route[1].blocks, 8..12);
        // The planner prefers the fast peers despite the extra hop.
        let planned = plan_route(&servers, &req).unwrap();
        assert_eq!(planned.len(), 2);
        assert_eq!(planned[0].peer, servers[0].peer);

        let uncovered = PlanRequest {
            blocks: 0..13,
            ..req.clone()
        };
        assert!(matches!(
            walk(&servers, &uncovered, |c| c.iter().next()),
            Err(PlanError::Uncovered { missing }) if missing == (12..13)
        ));
    }
}
