//! One policy's simulated swarm: peers with their blocks, sessions and batches, and the DHT's
//! (stale) view of them. Clients reach it through [`crate::network::SimNetwork`].
//!
//! Only compute and links are modelled. Which blocks a peer takes, whether it moves, which route
//! a client plans and how it recovers are decided by the project's own code.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use coordinator::session::{server_infos, Candidates};
use libp2p::PeerId;
use proto::v1::{ErrorCode, ServerState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm::discovery::Server;
use swarm::load::Load;
use swarm::offline;
use swarm::placement::{
    block_throughput, choose_blocks, should_move_without, span_throughput, Served,
};
use swarm::record::MAX_SERVERS_PER_BLOCK;
use tokio::time::Instant;

use crate::compute::Batcher;
use crate::profiles::LinkProfile;
use crate::scenario::{Config, Device, Leave, Schedule, DEVICES};

/// Added to simulated time for `Network::now_ms`, so ban times look like wall-clock times.
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// How stale the DHT view a lookup returns may be, at most. Lookups are the simulator's
/// hottest path (every client plans over every peer), and a real lookup's answer is itself
/// collected over a second or more; loads in it are as old as each peer's last announcement
/// anyway. Joins and moves show at the next refresh like everything else (they once forced
/// one, which rebuilt the view twice as often at 10,000 peers for no difference a client
/// could use: a joining or moving peer announces itself as joining for `load_s`).
const VIEW_REFRESH_MS: f64 = 1_000.0;

/// What a peer is doing at some moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum State {
    Absent,
    Loading,
    Online,
    Gone(Leave, u64),
}

/// `repr(C)` so that what every simulated step reads (state, generation, batch) shares the
/// first cache line: see [`crate::scenario::PeerSpec`].
#[repr(C)]
pub struct Peer {
    /// End of loading the current blocks.
    pub online_at_ms: u64,
    pub batch: Batcher,
    /// Bumped by each move, so sessions opened on the old blocks fail.
    pub generation: u32,
    joined: bool,
    pub blocks: Range<u32>,
    /// Sessions open on the current blocks and the cache they reserved.
    pub sessions: u32,
    pub cache_used: u64,
    next_check_ms: u64,
    /// The load in the peer's last announcement, when that was, and when it announces next.
    announced: Load,
    announced_free_cache: u64,
    last_announce_ms: f64,
    next_announce_ms: f64,
    /// The newest offline claim about the peer: when the client saw it fail, and when its
    /// put reached the DHT (`None`: never claimed).
    claimed: Option<(f64, f64)>,
}

/// Hashes peer ids by their last eight bytes, which are key material: a plan looks up every
/// server of the swarm, and SipHash over the whole id was a visible share of the run time.
#[derive(Default)]
pub struct TailHasher(u64);

impl Hasher for TailHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

pub type PeerIndex = HashMap<PeerId, u32, BuildHasherDefault<TailHasher>>;

pub struct World {
    pub cfg: Config,
    links: Vec<LinkProfile>,
    pub schedule: Arc<Schedule>,
    pub peers: Vec<Peer>,
    pub index: PeerIndex,
    /// Peer numbers in the order of their ids: the order lookups list servers in, which is
    /// the planner's canonical order, so its sort finds them sorted.
    by_id: Vec<u32>,
    view: Arc<Vec<Server>>,
    /// Peer number of each server of `view`.
    view_peers: Vec<u32>,
    /// Bumped each time `view` is rebuilt.
    view_version: u64,
    /// Per client link profile: the planner's picture of `view` (round trips from a client
    /// behind that link), and the view version it was built from. Every client behind the
    /// same link would build the same one.
    candidates: Vec<Option<(u64, Candidates)>>,
    view_at_ms: f64,
    /// Peers `0..joined` have joined (peers join in index order).
    joined: usize,
    /// Per block, the entries of its record while a view is built (kept to save allocations).
    records: Vec<Vec<(u64, u32)>>,
    /// What balancing sees in the DHT, while a join or a rebalancing round reads it (kept: a
    /// fresh one of every peer per join was a visible share of a large run).
    served: Vec<Served<u32>>,
    t0: Instant,
    rng: StdRng,
    pub moves: u64,
}

impl World {
    /// The swarm at time 0: every initial peer joined, one after another, with the real
    /// `choose_blocks` on the throughput the earlier ones announced (or, for a skewed peer,
    /// on the first blocks).
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
                    blocks = if spec.skewed {
                        0..n
                    } else {
                        choose_blocks(&throughput, n).unwrap_or(0..n)
                    };
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
                    batch: Batcher::default(),
                    sessions: 0,
                    cache_used: 0,
                    next_check_ms: spec.check_phase_ms,
                    announced: Load::default(),
                    announced_free_cache: DEVICES[spec.device].cache_tokens,
                    last_announce_ms: 0.0,
                    claimed: None,
                    next_announce_ms: spec.announce_phase_ms as f64,
                }
            })
            .collect();
        let index = schedule
            .peers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i as u32))
            .collect();
        let joined = schedule.peers.iter().take_while(|s| s.join_ms == 0).count();
        let mut by_id: Vec<u32> = (0..schedule.peers.len() as u32).collect();
        by_id.sort_by_key(|&i| schedule.peers[i as usize].id);
        Self {
            cfg: cfg.clone(),
            links: links.to_vec(),
            schedule,
            peers,
            index,
            by_id,
            view: Arc::default(),
            view_peers: Vec::new(),
            view_version: 0,
            candidates: vec![None; links.len()],
            view_at_ms: f64::NEG_INFINITY,
            joined,
            records: vec![Vec::new(); cfg.blocks as usize],
            served: Vec::new(),
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

    pub fn state(&self, i: usize, now: f64) -> State {
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

    pub fn device(&self, i: usize) -> &'static Device {
        &DEVICES[self.schedule.peers[i].device]
    }

    pub fn decode_ms(&self, i: usize) -> f32 {
        self.device(i).decode_ms_per_block
    }

    /// What balancing sees in the DHT: listed peers, joining ones included (as the balance
    /// module asks), in peer order. In the buffer [`Self::served`]; give it back after use.
    fn dht_view(&mut self, now: f64) -> Vec<Served<u32>> {
        let mut view = std::mem::take(&mut self.served);
        view.clear();
        view.extend(
            (0..self.peers.len())
                .filter(|&i| self.listed(i, now))
                .map(|i| {
                    let p = &self.peers[i];
                    Served {
                        peer: i as u32,
                        blocks: p.blocks.clone(),
                        throughput: span_throughput(self.decode_ms(i), p.blocks.len() as u32),
                    }
                }),
        );
        view
    }

    /// Peer `i` arrives: picks its blocks with `choose_blocks` on the DHT's view and loads them.
    pub fn join(&mut self, i: usize) {
        let now = self.now_ms();
        let view = self.dht_view(now);
        let throughput = block_throughput(&view, self.cfg.blocks);
        self.served = view;
        let n = self.device(i).max_blocks.min(self.cfg.blocks);
        let p = &mut self.peers[i];
        p.joined = true;
        p.blocks = choose_blocks(&throughput, n).unwrap_or(0..n);
        p.online_at_ms = now as u64 + (self.cfg.load_s * 1000.0) as u64;
        p.next_check_ms += now as u64;
        p.next_announce_ms += now;
        p.last_announce_ms = now;
        self.joined = self.joined.max(i + 1);
    }

    /// Every online peer whose check is due asks `should_move`, one after another, each seeing
    /// the moves before it (as staggered checks do through the DHT). The swarm's per-block
    /// totals are kept up to date across the round rather than summed again for each peer.
    pub fn rebalance_round(&mut self) {
        let now = self.now_ms();
        let blocks = self.cfg.blocks as usize;
        let mut totals = vec![0.0; blocks];
        let mut servers = vec![0u32; blocks];
        let view = self.dht_view(now);
        for s in &view {
            let end = (s.blocks.end as usize).min(blocks);
            for b in (s.blocks.start as usize).min(end)..end {
                totals[b] += s.throughput;
                servers[b] += 1;
            }
        }
        self.served = view;
        let period = self.cfg.rebalance_check_min * 60_000.0;
        let mut without_me = vec![0.0; blocks];
        for i in 0..self.peers.len() {
            if self.peers[i].next_check_ms as f64 > now || self.state(i, now) != State::Online {
                continue;
            }
            let jitter = self.rng.random_range(0.5..1.5);
            self.peers[i].next_check_ms = (now + period * jitter) as u64;
            let from = self.peers[i].blocks.clone();
            let rate = span_throughput(self.decode_ms(i), from.len() as u32);
            without_me.copy_from_slice(&totals);
            for b in from.start as usize..(from.end as usize).min(blocks) {
                // Exactly nothing where this peer is alone, whatever the rounding.
                without_me[b] = if servers[b] <= 1 {
                    0.0
                } else {
                    totals[b] - rate
                };
            }
            let Some(m) =
                should_move_without(&without_me, &from, rate, self.cfg.rebalance_min_gain)
            else {
                continue;
            };
            let mine = from.start as usize..(from.end as usize).min(blocks);
            totals[mine.clone()].copy_from_slice(&without_me[mine.clone()]);
            for n in &mut servers[mine] {
                *n -= 1;
            }
            for b in m.to.start as usize..(m.to.end as usize).min(blocks) {
                totals[b] += rate;
                servers[b] += 1;
            }
            let p = &mut self.peers[i];
            p.blocks = m.to;
            p.generation += 1;
            p.sessions = 0;
            p.cache_used = 0;
            p.batch.reset(now);
            p.online_at_ms = now as u64 + (self.cfg.load_s * 1000.0) as u64;
            p.last_announce_ms = now;
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

    /// Every server the DHT lists now, as a lookup returns them: at most
    /// [`VIEW_REFRESH_MS`] old, each peer's load as of its last announcement.
    pub fn servers(&mut self) -> Arc<Vec<Server>> {
        let now = self.now_ms();
        if now - self.view_at_ms >= VIEW_REFRESH_MS {
            self.view = Arc::new(self.build_view(now));
            self.view_version += 1;
            self.view_at_ms = now;
        }
        self.view.clone()
    }

    /// What a lookup by a client behind link profile `client_link` returns, with the round
    /// trips it measures: the same for every client behind that link, so built once per view.
    pub fn candidates(&mut self, client_link: usize) -> Candidates {
        let servers = self.servers();
        if let Some((version, c)) = &self.candidates[client_link] {
            if *version == self.view_version {
                return c.clone();
            }
        }
        let client = &self.links[client_link];
        let rtts = self
            .view_peers
            .iter()
            .map(|&i| {
                let ms = base_rtt_ms(client, self.link(i as usize));
                Some(Duration::from_secs_f64(ms / 1e3))
            })
            .collect();
        let infos = server_infos(&servers, rtts);
        let c = Candidates {
            servers,
            infos: Arc::new(infos),
        };
        self.candidates[client_link] = Some((self.view_version, c.clone()));
        c
    }

    /// Live peers announce when their period comes round; then each block's record keeps
    /// its [`MAX_SERVERS_PER_BLOCK`] freshest entries, as the DHT's merge does, and a lookup
    /// returns every peer some record still holds, in id order. A dead peer stops announcing,
    /// so its entry is the first to be pushed out of a full record.
    fn build_view(&mut self, now: f64) -> Vec<Server> {
        let period = self.cfg.announce_s * 1000.0;
        let mut records = std::mem::take(&mut self.records);
        for record in &mut records {
            record.clear();
        }
        for i in 0..self.joined {
            if !self.listed(i, now) {
                continue;
            }
            let alive = !matches!(self.state(i, now), State::Gone(..));
            let device = self.device(i);
            let p = &mut self.peers[i];
            if alive && now >= p.next_announce_ms {
                p.announced = Load {
                    sessions: p.sessions,
                    max_sessions: device.max_sessions,
                    waiting_steps: p.batch.waiting(now),
                };
                p.announced_free_cache = device.cache_tokens.saturating_sub(p.cache_used);
                let missed = ((now - p.next_announce_ms) / period).floor();
                p.last_announce_ms = p.next_announce_ms + missed * period;
                p.next_announce_ms = p.last_announce_ms + period;
            }
            let end = p.blocks.end.min(self.cfg.blocks);
            for b in p.blocks.start.min(end)..end {
                records[b as usize].push((p.last_announce_ms as u64, i as u32));
            }
        }
        let mut kept = vec![false; self.peers.len()];
        for record in &mut records {
            if record.len() > MAX_SERVERS_PER_BLOCK {
                // Freshest first; among equally fresh entries the lower peer number.
                record.select_nth_unstable_by(MAX_SERVERS_PER_BLOCK - 1, |a, b| {
                    b.0.cmp(&a.0).then(a.1.cmp(&b.1))
                });
                record.truncate(MAX_SERVERS_PER_BLOCK);
            }
            for &(_, i) in record.iter() {
                kept[i as usize] = true;
            }
        }
        self.records = records;
        // Sized once: grown by doubling, each new view (~140 KB, one per simulated second and
        // policy) was copied and faulted in several times over.
        let listed = kept.iter().filter(|&&k| k).count();
        let mut out = Vec::with_capacity(listed);
        self.view_peers.clear();
        for &i in &self.by_id {
            let i = i as usize;
            if !kept[i] {
                continue;
            }
            self.view_peers.push(i as u32);
            let device = self.device(i);
            let p = &self.peers[i];
            let decode = device.decode_ms_per_block;
            out.push(Server {
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
                free_cache_tokens: p.announced_free_cache,
                version: String::new(),
                announced_at_ms: EPOCH_MS + p.last_announce_ms as u64,
                load: p.announced,
                reported_offline: p.claimed.is_some_and(|(seen, landed)| {
                    landed <= now
                        && seen > p.last_announce_ms
                        && now - seen <= offline::CLAIM_TTL_MS as f64
                }),
            });
        }
        out
    }

    /// A client that saw `peer` fail at `seen_ms` claims it offline; the claim is in the DHT
    /// from `landed_ms` (a lookup's round trips later). Readers keep the newest claim.
    pub fn claim_offline(&mut self, peer: PeerId, seen_ms: f64, landed_ms: f64) {
        if !self.cfg.offline_claims {
            return;
        }
        if let Some(&i) = self.index.get(&peer) {
            let p = &mut self.peers[i as usize];
            if p.claimed.is_none_or(|(seen, _)| seen < seen_ms) {
                p.claimed = Some((seen_ms, landed_ms));
            }
        }
    }

    /// Peer `i` takes a session of `tokens` cache positions, or says why not (as the node's
    /// scheduler does: the session count first, then the cache).
    pub fn admit(&mut self, i: usize, tokens: u64) -> Result<(), ErrorCode> {
        let device = self.device(i);
        let p = &mut self.peers[i];
        if p.sessions >= device.max_sessions {
            return Err(ErrorCode::TooManySessions);
        }
        if p.cache_used + tokens > device.cache_tokens {
            return Err(ErrorCode::CacheFull);
        }
        p.sessions += 1;
        p.cache_used += tokens;
        Ok(())
    }

    /// A session of `tokens` positions opened on generation `generation` of peer `i` ends.
    pub fn release(&mut self, i: usize, generation: u32, tokens: u64) {
        let p = &mut self.peers[i];
        if p.generation == generation {
            p.sessions = p.sessions.saturating_sub(1);
            p.cache_used = p.cache_used.saturating_sub(tokens);
        }
    }

    pub fn link(&self, i: usize) -> &LinkProfile {
        &self.links[self.schedule.peers[i].link]
    }
}

/// Round trip between a client behind `client` and a peer behind `peer`, without jitter or
/// loss: what the client's ping measures.
pub fn base_rtt_ms(client: &LinkProfile, peer: &LinkProfile) -> f64 {
    2.0 * (client.delay_ms + peer.delay_ms)
}
