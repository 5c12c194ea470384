//! The [`Network`] through which the real client code talks to a simulated swarm: lookups of
//! the DHT's view, modelled links, sessions that take a peer's room, and steps priced by the
//! peer's batching (see [`crate::compute`]). Also the route policies the planner is compared
//! with.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use coordinator::route::{plan_load_aware, plan_route, PlanError, PlanRequest, ServerInfo, Span};
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
    link: LinkProfile,
    /// Index of `link` among the world's profiles.
    link_index: usize,
    policy: RoutePolicy,
    rng: Mutex<StdRng>,
}

/// How the simulated call ends, and after how long.
type Outcome<T> = (f64, Result<T, SessionError>);

impl SimNetwork {
    /// A client behind link profile number `link` of `links`.
    pub fn new(
        world: Arc<Mutex<World>>,
        links: &[LinkProfile],
        link: usize,
        policy: RoutePolicy,
        seed: u64,
    ) -> Self {
        Self {
            world,
            link: links[link].clone(),
            link_index: link,
            policy,
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
        let mut rng = self.rng();
        let base = self.link.delay_ms + peer.delay_ms;
        let jitter = (self.link.jitter_ms + peer.jitter_ms) * rng.random_range(-1.0..1.0);
        let rate_bits_per_ms = self.link.rate_mbit.min(peer.rate_mbit) * 1e3;
        let transfer = bytes * 8.0 / rate_bits_per_ms;
        let delivered = (1.0 - self.link.loss_pct / 100.0) * (1.0 - peer.loss_pct / 100.0);
        let lost = rng.random::<f64>() >= delivered;
        let retransmit = if lost { RTO_MS + 2.0 * base } else { 0.0 };
        (base + jitter).max(0.0) + transfer + retransmit
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
        let computed =
            w.peers[i]
                .batch
                .step(now + up, compute, device.batch_slope, device.max_sessions);
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
            RoutePolicy::FewestHops => walk(servers, req, |c| {
                let end = req.blocks.end;
                c.iter()
                    .copied()
                    .max_by_key(|s| (s.blocks.end.min(end), std::cmp::Reverse(s.peer)))
            }),
            RoutePolicy::Random => {
                let mut rng = self.rng();
                walk(servers, req, |c| {
                    (!c.is_empty()).then(|| c[rng.random_range(0..c.len())])
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
}

/// A baseline route: from the first block on, take the peer `choose` picks among the usable
/// servers of the next block, as far as it goes.
fn walk<'a>(
    servers: &'a [ServerInfo<PeerId>],
    req: &PlanRequest<'_, PeerId>,
    mut choose: impl FnMut(&[&'a ServerInfo<PeerId>]) -> Option<&'a ServerInfo<PeerId>>,
) -> Result<Vec<Span<PeerId>>, PlanError> {
    if req.blocks.is_empty() {
        return Err(PlanError::EmptyRequest);
    }
    let usable: Vec<&ServerInfo<PeerId>> = servers.iter().filter(|s| s.is_usable(req)).collect();
    let mut at = req.blocks.start;
    let mut route = Vec::new();
    while at < req.blocks.end {
        let here: Vec<&ServerInfo<PeerId>> = usable
            .iter()
            .copied()
            .filter(|s| s.blocks.contains(&at))
            .collect();
        let Some(s) = choose(&here) else {
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

    use super::*;

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
        let end = req.blocks.end;
        let route = walk(&servers, &req, |c| {
            c.iter()
                .copied()
                .max_by_key(|s| (s.blocks.end.min(end), std::cmp::Reverse(s.peer)))
        })
        .unwrap();
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
            walk(&servers, &uncovered, |c| c.first().copied()),
            Err(PlanError::Uncovered { missing }) if missing == (12..13)
        ));
    }
}
