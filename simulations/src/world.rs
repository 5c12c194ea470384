//! One policy's simulated swarm: peers with their blocks and queues, the DHT's (stale) view of
//! them, and the [`Network`] through which the real client code talks to them.
//!
//! Only compute and links are modelled. Which blocks a peer takes, whether it moves, which route
//! a client plans and how it recovers are decided by the project's own code.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use coordinator::route::{plan_route, PlanError, PlanRequest, ServerInfo, Span};
use coordinator::session::{Network, SessionError};
use libp2p::PeerId;
use model::Hidden;
use proto::v1::{ErrorCode, ServerState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use swarm::discovery::Server;
use swarm::placement::{block_throughput, choose_blocks, should_move, span_throughput, Served};
use tokio::time::Instant;

use crate::profiles::LinkProfile;
use crate::scenario::{Config, Leave, Schedule, DEVICES};

/// Added to simulated time for `Network::now_ms`, so ban times look like wall-clock times.
const EPOCH_MS: u64 = 1_700_000_000_000;
/// A lost packet costs a retransmission timeout on top of the round trip.
const RTO_MS: f64 = 200.0;

/// How clients choose routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutePolicy {
    /// The project's planner, `plan_route`.
    Planner,
    /// Fewest spans, whatever their latency: the naive choice.
    FewestHops,
    /// Any peer that serves the next block, chosen at random.
    Random,
}

impl RoutePolicy {
    pub const ALL: [RoutePolicy; 3] = [Self::Planner, Self::FewestHops, Self::Random];

    pub fn name(self) -> &'static str {
        match self {
            Self::Planner => "planner",
            Self::FewestHops => "fewest-hops",
            Self::Random => "random",
        }
    }
}

/// What a peer is doing at some moment.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Absent,
    Loading,
    Online,
    Gone(Leave, u64),
}

struct Peer {
    joined: bool,
    blocks: Range<u32>,
    /// End of loading the current blocks.
    online_at_ms: u64,
    /// Bumped by each move, so sessions opened on the old blocks fail.
    generation: u32,
    /// The peer computes one request at a time, in arrival order.
    busy_until_ms: f64,
    next_check_ms: u64,
}

pub struct World {
    cfg: Config,
    links: Vec<LinkProfile>,
    schedule: Arc<Schedule>,
    peers: Vec<Peer>,
    index: HashMap<PeerId, u32>,
    t0: Instant,
    rng: StdRng,
    pub moves: u64,
}

impl World {
    /// The swarm at time 0: every initial peer joined, one after another, with the real
    /// `choose_blocks` on the throughput the earlier ones announced.
    pub fn new(cfg: &Config, links: &[LinkProfile], schedule: Arc<Schedule>) -> Self {
        let mut throughput = vec![0.0; cfg.blocks as usize];
        let peers = schedule
            .peers
            .iter()
            .map(|spec| {
                let joined = spec.join_ms == 0;
                let mut blocks = 0..0;
                if joined {
                    let device = &DEVICES[spec.device];
                    let n = device.max_blocks.min(cfg.blocks);
                    blocks = choose_blocks(&throughput, n).unwrap_or(0..n);
                    let rate = span_throughput(device.decode_ms_per_block, n);
                    for t in &mut throughput[blocks.start as usize..blocks.end as usize] {
                        *t += rate;
                    }
                }
                Peer {
                    joined,
                    blocks,
                    online_at_ms: 0,
                    generation: 0,
                    busy_until_ms: 0.0,
                    next_check_ms: spec.check_phase_ms,
                }
            })
            .collect();
        let index = schedule
            .peers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i as u32))
            .collect();
        Self {
            cfg: cfg.clone(),
            links: links.to_vec(),
            schedule,
            peers,
            index,
            t0: Instant::now(),
            rng: StdRng::seed_from_u64(cfg.seed ^ 0x05ee_d0f3_011d),
            moves: 0,
        }
    }

    pub fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    pub fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn state(&self, i: usize, now: f64) -> State {
        let p = &self.peers[i];
        if !p.joined {
            return State::Absent;
        }
        match self.schedule.peers[i].leave {
            Some((at, kind)) if at as f64 <= now => State::Gone(kind, at),
            _ if now < p.online_at_ms as f64 => State::Loading,
            _ => State::Online,
        }
    }

    /// Whether the DHT still lists peer `i`: a graceful leave withdraws the record, anything
    /// else leaves it until it expires.
    fn listed(&self, i: usize, now: f64) -> bool {
        let spec = &self.schedule.peers[i];
        self.peers[i].joined
            && match spec.leave {
                Some((at, Leave::Graceful)) => now < at as f64,
                Some((at, _)) => now < (at + spec.linger_ms) as f64,
                None => true,
            }
    }

    fn decode_ms(&self, i: usize) -> f32 {
        DEVICES[self.schedule.peers[i].device].decode_ms_per_block
    }

    /// What balancing sees in the DHT: listed peers, joining ones included (as the balance
    /// module asks), in peer order.
    fn dht_view(&self, now: f64) -> Vec<Served<u32>> {
        (0..self.peers.len())
            .filter(|&i| self.listed(i, now))
            .map(|i| {
                let p = &self.peers[i];
                Served {
                    peer: i as u32,
                    blocks: p.blocks.clone(),
                    throughput: span_throughput(self.decode_ms(i), p.blocks.len() as u32),
                }
            })
            .collect()
    }

    /// Peer `i` arrives: picks its blocks with `choose_blocks` on the DHT's view and loads them.
    pub fn join(&mut self, i: usize) {
        let now = self.now_ms();
        let throughput = block_throughput(&self.dht_view(now), self.cfg.blocks);
        let n = DEVICES[self.schedule.peers[i].device]
            .max_blocks
            .min(self.cfg.blocks);
        let p = &mut self.peers[i];
        p.joined = true;
        p.blocks = choose_blocks(&throughput, n).unwrap_or(0..n);
        p.online_at_ms = now as u64 + (self.cfg.load_s * 1000.0) as u64;
        p.next_check_ms += now as u64;
    }

    /// Every online peer whose check is due asks `should_move`, one after another, each seeing
    /// the moves before it (as staggered checks do through the DHT).
    pub fn rebalance_round(&mut self) {
        let now = self.now_ms();
        let mut view = self.dht_view(now);
        let period = self.cfg.rebalance_check_min * 60_000.0;
        for i in 0..self.peers.len() {
            if self.peers[i].next_check_ms as f64 > now || self.state(i, now) != State::Online {
                continue;
            }
            let jitter = self.rng.random_range(0.5..1.5);
            self.peers[i].next_check_ms = (now + period * jitter) as u64;
            let Some(m) = should_move(
                &view,
                &(i as u32),
                self.cfg.blocks,
                self.cfg.rebalance_min_gain,
            ) else {
                continue;
            };
            if let Ok(k) = view.binary_search_by_key(&(i as u32), |s| s.peer) {
                view[k].blocks = m.to.clone();
            }
            let p = &mut self.peers[i];
            p.blocks = m.to;
            p.generation += 1;
            p.online_at_ms = now as u64 + (self.cfg.load_s * 1000.0) as u64;
            self.moves += 1;
        }
    }

    /// Per-block throughput the swarm really offers now: online peers only, whatever the DHT
    /// says.
    pub fn live_throughput(&self) -> Vec<f64> {
        let now = self.now_ms();
        let live: Vec<Served<u32>> = (0..self.peers.len())
            .filter(|&i| self.state(i, now) == State::Online)
            .map(|i| Served {
                peer: i as u32,
                blocks: self.peers[i].blocks.clone(),
                throughput: span_throughput(self.decode_ms(i), self.peers[i].blocks.len() as u32),
            })
            .collect();
        block_throughput(&live, self.cfg.blocks)
    }

    fn servers(&self) -> Vec<Server> {
        let now = self.now_ms();
        (0..self.peers.len())
            .filter(|&i| self.listed(i, now))
            .map(|i| {
                let p = &self.peers[i];
                let decode = self.decode_ms(i);
                Server {
                    peer: self.schedule.peers[i].id,
                    addrs: Vec::new(),
                    blocks: p.blocks.clone(),
                    state: if now < p.online_at_ms as f64 {
                        ServerState::Joining
                    } else {
                        ServerState::Online
                    },
                    decode_ms_per_block: decode,
                    prefill_ms_per_block: decode * self.cfg.prefill_cost as f32,
                    free_cache_tokens: 1 << 20,
                    version: String::new(),
                    announced_at_ms: EPOCH_MS,
                }
            })
            .collect()
    }

    fn link(&self, i: usize) -> &LinkProfile {
        &self.links[self.schedule.peers[i].link]
    }
}

/// An open session on a simulated peer.
pub struct SimSpan {
    peer: u32,
    generation: u32,
    blocks: u32,
}

/// One client's view of a simulated swarm.
pub struct SimNetwork {
    world: Arc<Mutex<World>>,
    link: LinkProfile,
    policy: RoutePolicy,
    rng: Mutex<StdRng>,
}

/// How the simulated call ends, and after how long.
type Outcome<T> = (f64, Result<T, SessionError>);

impl SimNetwork {
    pub fn new(
        world: Arc<Mutex<World>>,
        link: LinkProfile,
        policy: RoutePolicy,
        seed: u64,
    ) -> Self {
        Self {
            world,
            link,
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
        2.0 * (self.link.delay_ms + peer.delay_ms)
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
        let link = w.link(i).clone();
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
                    self.one_way_ms(&link, 0.0),
                    Err(SessionError::Closed { peer: id }),
                )
            }
            _ if w.peers[i].generation != span.generation => {
                let rtt = self.base_rtt_ms(&link);
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
        let up = self.one_way_ms(&link, bytes);
        let down = self.one_way_ms(&link, bytes);
        let positions = 1.0 + (hidden.tokens as f64 - 1.0) * w.cfg.prefill_cost;
        let compute = f64::from(w.decode_ms(i)) * f64::from(span.blocks) * positions;
        let peer = &mut w.peers[i];
        let start = (now + up).max(peer.busy_until_ms);
        peer.busy_until_ms = start + compute;
        let done = start + compute + down;
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

    fn open_now(&self, server: &Server, blocks: &Range<u32>) -> Outcome<SimSpan> {
        let w = self.world();
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
            State::Online if p.blocks.start > blocks.start || blocks.end > p.blocks.end => {
                (rtt * 2.0, Err(refused(peer, ErrorCode::BlocksNotServed)))
            }
            State::Online => {
                // Dial plus the open exchange: two round trips.
                let span = SimSpan {
                    peer: i,
                    generation: p.generation,
                    blocks: blocks.len() as u32,
                };
                (self.one_way_ms(&link, 0.0) * 4.0, Ok(span))
            }
        }
    }
}

fn refused(peer: PeerId, code: ErrorCode) -> SessionError {
    SessionError::Remote {
        peer,
        code,
        message: "not serving those blocks".into(),
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
        // A Kademlia lookup: a few round trips to DHT peers somewhere on the internet.
        let ms = 3.0 * 2.0 * (self.link.delay_ms + 20.0);
        tokio::time::sleep(Duration::from_micros((ms * 1e3) as u64)).await;
        Ok(self.world().servers())
    }

    async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        let w = self.world();
        let i = *w.index.get(&peer)?;
        let ms = self.base_rtt_ms(w.link(i as usize));
        Some(Duration::from_secs_f64(ms / 1e3))
    }

    fn plan(
        &self,
        servers: &[ServerInfo<PeerId>],
        req: &PlanRequest<'_, PeerId>,
    ) -> Result<Vec<Span<PeerId>>, PlanError> {
        match self.policy {
            RoutePolicy::Planner => plan_route(servers, req),
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
        _max_length: u32,
    ) -> Result<SimSpan, SessionError> {
        let (ms, r) = self.open_now(server, &blocks);
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
