//! What is simulated: the swarm's hardware, its churn schedule and its clients, all drawn from
//! the seed before any policy runs, so every policy faces exactly the same events.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::profiles::{find, LinkProfile, ProfileError};

/// Knobs of one simulated scenario. Defaults follow the node's own defaults where there is
/// one (announce interval, rebalance gain), and are sized elsewhere so that a 10,000-peer hour
/// runs in minutes.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub seed: u64,
    pub peers: usize,
    pub blocks: u32,
    pub hours: f64,
    /// Clients generating at once, in every policy's swarm.
    pub clients: usize,
    /// Mean time a peer stays; arrivals keep the population steady.
    pub mean_lifetime_min: f64,
    pub prompt_tokens: u32,
    pub new_tokens: u32,
    /// Mean pause between a client's generations.
    pub think_s: f64,
    /// Mean time between one peer's rebalancing checks. The node checks every 30 s; checking
    /// every peer that often would dominate the run time, and churn at this scale moves the
    /// weakest block far more slowly than that.
    pub rebalance_check_min: f64,
    /// `should_move`'s threshold; the node's default is 0.2.
    pub rebalance_min_gain: f64,
    /// Time to load a new set of blocks (at join and after a move), spent announced as joining.
    pub load_s: f64,
    /// A record outlives a peer that vanished without a goodbye by up to this long (three
    /// missed announcements of 10 s, as in the node).
    pub record_ttl_s: f64,
    pub step_timeout_s: f64,
    pub connect_timeout_s: f64,
    pub discovery_timeout_s: f64,
    /// Period of the block-throughput samples.
    pub sample_s: f64,
    /// Bytes of one token's hidden state on the wire (4096 f16 values).
    pub hidden_bytes_per_token: u32,
    /// Compute of one prefill position relative to one decode step.
    pub prefill_cost: f64,
    /// Peers re-announce (and so publish their load) this often, as the node does.
    pub announce_s: f64,
    /// Clients arrive over this long at the start (a steady swarm's clients do not all start
    /// in the same second).
    pub ramp_s: f64,
    pub scenario: Scenario,
    /// Clients push steps node to node, as the real client does unless told `--no-push`;
    /// off, they relay every span themselves.
    pub push: bool,
    /// A client that gets no connection or no answer from a peer claims it offline in the DHT,
    /// as the real client does (`swarm::offline`), and every client's later lookups price the
    /// peer like one without cache room until it announces again.
    pub offline_claims: bool,
}

/// What happens to the swarm besides the steady churn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Churn only; clients arrive over the ramp and stay.
    #[default]
    Steady,
    /// A quarter of the clients steady; the rest arrive within one minute a third of the way
    /// in and leave two thirds of the way in.
    FlashCrowd,
    /// Every peer behind the `wan-100ms` link (a far region) crashes at once half way through.
    RegionOutage,
    /// [`SKEWED_SHARE`] of the peers present at the start took the first blocks (say, all
    /// configured by hand with the same range) instead of choosing.
    SkewedJoin,
}

/// Share of the initial peers that take the first blocks in [`Scenario::SkewedJoin`].
pub const SKEWED_SHARE: f64 = 0.8;

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Self::Steady,
        Self::FlashCrowd,
        Self::RegionOutage,
        Self::SkewedJoin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::FlashCrowd => "flash-crowd",
            Self::RegionOutage => "region-outage",
            Self::SkewedJoin => "skewed-join",
        }
    }
}

impl Config {
    pub fn new(peers: usize, blocks: u32, hours: f64, seed: u64) -> Self {
        Self {
            seed,
            peers,
            blocks,
            hours,
            clients: 24,
            mean_lifetime_min: 120.0,
            prompt_tokens: 64,
            new_tokens: 128,
            think_s: 10.0,
            rebalance_check_min: 5.0,
            rebalance_min_gain: 0.2,
            load_s: 20.0,
            record_ttl_s: 30.0,
            step_timeout_s: 10.0,
            connect_timeout_s: 5.0,
            discovery_timeout_s: 30.0,
            sample_s: 60.0,
            hidden_bytes_per_token: 8192,
            prefill_cost: 0.1,
            announce_s: 10.0,
            ramp_s: 300.0,
            scenario: Scenario::Steady,
            push: true,
            offline_claims: true,
        }
    }

    pub fn duration_ms(&self) -> u64 {
        (self.hours * 3_600_000.0).round() as u64
    }
}

/// A kind of home device: how fast it runs one block, how many blocks its memory holds, and
/// how it batches.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Device {
    pub name: &'static str,
    pub decode_ms_per_block: f32,
    pub max_blocks: u32,
    /// Fraction of peers of this kind.
    pub share: f64,
    /// Cost of each extra row of a batched iteration, relative to a lone step (see
    /// [`crate::compute`]). CPUs: 0.46, measured. GPUs: assumed 0.1, as decode there is bound
    /// by reading the weights, which a batch reads once.
    pub batch_slope: f64,
    /// Sessions it accepts at once (the node's `max_sessions`).
    pub max_sessions: u32,
    /// KV-cache positions it holds for all sessions together.
    pub cache_tokens: u64,
}

pub static DEVICES: [Device; 4] = [
    Device {
        name: "gpu-desktop",
        decode_ms_per_block: 1.5,
        max_blocks: 20,
        share: 0.10,
        batch_slope: 0.1,
        max_sessions: 64,
        cache_tokens: 16_384,
    },
    Device {
        name: "laptop",
        decode_ms_per_block: 4.0,
        max_blocks: 10,
        share: 0.30,
        batch_slope: 0.46,
        max_sessions: 16,
        cache_tokens: 2_048,
    },
    Device {
        name: "mini-pc",
        decode_ms_per_block: 12.0,
        max_blocks: 4,
        share: 0.40,
        batch_slope: 0.46,
        max_sessions: 8,
        cache_tokens: 1_536,
    },
    Device {
        name: "phone",
        decode_ms_per_block: 30.0,
        max_blocks: 2,
        share: 0.20,
        batch_slope: 0.46,
        max_sessions: 4,
        cache_tokens: 768,
    },
];

/// Which links peers and clients sit behind, by profile name, with their shares.
pub const PEER_LINKS: [(&str, f64); 4] = [
    ("lan", 0.15),
    ("wifi", 0.45),
    ("lte", 0.15),
    ("wan-100ms", 0.25),
];
pub const CLIENT_LINKS: [(&str, f64); 3] = [("wifi", 0.7), ("lan", 0.2), ("lte", 0.1)];

/// How a peer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Leave {
    /// Withdraws its record and closes its sessions: clients notice at once.
    Graceful,
    /// The process dies: connections reset at once, the record lingers until it expires.
    Crash,
    /// The machine freezes or drops off the network: steps time out, the record lingers.
    Freeze,
}

/// `repr(C)` so that what every simulated step reads (link, leave, device) comes first, in one
/// cache line, and the id (80 of its bytes, read only for errors and lookups) last: with
/// 10,000 peers the entries are rarely cached, and these loads were a visible share of a
/// push's time.
#[derive(Clone, Debug)]
#[repr(C)]
pub struct PeerSpec {
    pub link: usize,
    pub leave: Option<(u64, Leave)>,
    pub device: usize,
    pub join_ms: u64,
    /// How long the record outlives a crash or freeze.
    pub linger_ms: u64,
    /// Offset of this peer's first rebalancing check.
    pub check_phase_ms: u64,
    /// Offset of this peer's announcements within the announce period.
    pub announce_phase_ms: u64,
    /// Takes the first blocks at join instead of choosing ([`Scenario::SkewedJoin`]).
    pub skewed: bool,
    pub id: PeerId,
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub link: usize,
    pub start_ms: u64,
    /// Starts no generation after this.
    pub stop_ms: u64,
    pub seed: u64,
}

/// Everything drawn from the seed up front.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Peers present at the start (join time 0) first, then arrivals in join order.
    pub peers: Vec<PeerSpec>,
    pub clients: Vec<ClientSpec>,
}

fn pick<T>(rng: &mut StdRng, items: &[T], share: impl Fn(&T) -> f64) -> usize {
    let total: f64 = items.iter().map(&share).sum();
    let mut x = rng.random::<f64>() * total;
    for (i, item) in items.iter().enumerate() {
        x -= share(item);
        if x < 0.0 {
            return i;
        }
    }
    items.len() - 1
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// A stable, seed-independent identity for peer number `n`.
pub(crate) fn peer_id(n: usize) -> PeerId {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    secret[8] = 0xed;
    match Keypair::ed25519_from_bytes(secret) {
        Ok(k) => k.public().to_peer_id(),
        // Every non-zero 32-byte string is a valid ed25519 secret, so this is unreachable;
        // a random id would only cost determinism, not correctness.
        Err(_) => PeerId::random(),
    }
}

impl Schedule {
    pub fn draw(cfg: &Config, links: &[LinkProfile]) -> Result<Self, ProfileError> {
        let peer_links: Vec<(usize, f64)> = PEER_LINKS
            .iter()
            .map(|(n, s)| Ok((find(links, n)?, *s)))
            .collect::<Result<_, ProfileError>>()?;
        let client_links: Vec<(usize, f64)> = CLIENT_LINKS
            .iter()
            .map(|(n, s)| Ok((find(links, n)?, *s)))
            .collect::<Result<_, ProfileError>>()?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let end = cfg.duration_ms() as f64;
        let life_ms = cfg.mean_lifetime_min * 60_000.0;
        let check_ms = cfg.rebalance_check_min * 60_000.0;

        let mut joins = vec![0.0; cfg.peers];
        // Arrivals replace departures on average: rate peers / lifetime.
        let mut t = exponential(&mut rng, life_ms / cfg.peers.max(1) as f64);
        while t < end {
            joins.push(t);
            t += exponential(&mut rng, life_ms / cfg.peers.max(1) as f64);
        }
        let far = find(links, "wan-100ms")?;
        let outage = end / 2.0;
        let announce_ms = cfg.announce_s * 1000.0;
        let peers = joins
            .into_iter()
            .enumerate()
            .map(|(n, join)| {
                let device = pick(&mut rng, &DEVICES, |d| d.share);
                let link = peer_links[pick(&mut rng, &peer_links, |l| l.1)].0;
                let stay = exponential(&mut rng, life_ms);
                let kind = match rng.random::<f64>() {
                    x if x < 0.5 => Leave::Graceful,
                    x if x < 0.8 => Leave::Crash,
                    _ => Leave::Freeze,
                };
                let mut leave = (join + stay < end).then_some(((join + stay) as u64, kind));
                let skew_draw = rng.random::<f64>();
                if cfg.scenario == Scenario::RegionOutage
                    && link == far
                    && join < outage
                    && leave.is_none_or(|(at, _)| at as f64 > outage)
                {
                    leave = Some((outage as u64, Leave::Crash));
                }
                PeerSpec {
                    id: peer_id(n),
                    device,
                    link,
                    join_ms: join as u64,
                    leave,
                    linger_ms: (cfg.record_ttl_s * 1000.0 * rng.random_range(0.34..1.0)) as u64,
                    check_phase_ms: (check_ms * rng.random::<f64>()) as u64,
                    announce_phase_ms: (announce_ms * rng.random::<f64>()) as u64,
                    skewed: cfg.scenario == Scenario::SkewedJoin
                        && join == 0.0
                        && skew_draw < SKEWED_SHARE,
                }
            })
            .collect();
        let ramp_ms = (cfg.ramp_s * 1000.0).max(1.0) as u64;
        let clients = (0..cfg.clients)
            .map(|k| {
                let link = client_links[pick(&mut rng, &client_links, |l| l.1)].0;
                let (start_ms, stop_ms) = match cfg.scenario {
                    Scenario::FlashCrowd if k % 4 != 0 => {
                        let at = end / 3.0 + rng.random_range(0.0..60_000.0);
                        (at as u64, (2.0 * end / 3.0) as u64)
                    }
                    _ => (rng.random_range(0..ramp_ms), end as u64),
                };
                ClientSpec {
                    link,
                    start_ms,
                    stop_ms,
                    seed: rng.random(),
                }
            })
            .collect();
        Ok(Self { peers, clients })
    }
}
