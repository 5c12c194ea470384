//! Runs one policy's swarm on a paused tokio clock: churn, rebalancing, sampling and clients
//! that generate through the real `InferenceSession`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use coordinator::session::{InferenceSession, Router};
use model::Hidden;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::{sleep, sleep_until, Instant};

use crate::network::{RoutePolicy, SimNetwork};
use crate::profiles::LinkProfile;
use crate::scenario::{ClientSpec, Config, Schedule};
use crate::world::World;

/// How often peers' rebalancing checks are looked at; each peer's own period is longer
/// (`Config::rebalance_check_min`) and jittered.
const REBALANCE_ROUND: Duration = Duration::from_secs(30);

/// One combination of the policies being compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub route: RoutePolicy,
    /// Peers check `should_move` periodically; otherwise they keep the blocks `choose_blocks`
    /// gave them at join.
    pub rebalance: bool,
}

impl Policy {
    /// Every route policy with and without rebalancing.
    pub fn all() -> Vec<Policy> {
        RoutePolicy::ALL
            .iter()
            .flat_map(|&route| [true, false].map(|rebalance| Policy { route, rebalance }))
            .collect()
    }

    pub fn name(&self) -> String {
        let placement = if self.rebalance {
            "rebalance"
        } else {
            "static"
        };
        format!("{}+{placement}", self.route.name())
    }
}

/// One sample of the blocks' throughput.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub minute: f64,
    /// Tokens/s of the weakest block: the most the swarm can generate in total.
    pub weakest: f64,
    pub mean: f64,
}

/// Everything measured in one policy's run.
#[derive(Debug, Default)]
pub struct Raw {
    pub token_latency_ms: Vec<f64>,
    pub client_tokens: Vec<u64>,
    pub client_busy_ms: Vec<f64>,
    pub recovery_ms: Vec<f64>,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    /// Generations that lost at least one peer, and those of them that still completed.
    pub hit: u64,
    pub hit_completed: u64,
    pub samples: Vec<Sample>,
    pub moves: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `policy` over the whole scenario on its own paused, single-threaded runtime.
pub fn run_policy(
    cfg: &Config,
    links: &[LinkProfile],
    schedule: Arc<Schedule>,
    policy: Policy,
) -> std::io::Result<Raw> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    Ok(rt.block_on(simulate(cfg, links, schedule, policy)))
}

async fn simulate(
    cfg: &Config,
    links: &[LinkProfile],
    schedule: Arc<Schedule>,
    policy: Policy,
) -> Raw {
    let world = Arc::new(Mutex::new(World::new(cfg, links, schedule.clone())));
    let raw = Arc::new(Mutex::new(Raw {
        client_tokens: vec![0; schedule.clients.len()],
        client_busy_ms: vec![0.0; schedule.clients.len()],
        ..Raw::default()
    }));
    let (t0, end) = {
        let w = lock(&world);
        (w.at(0), w.at(cfg.duration_ms()))
    };

    tokio::spawn(churn(world.clone(), schedule.clone()));
    if policy.rebalance {
        let world = world.clone();
        tokio::spawn(async move {
            loop {
                sleep(REBALANCE_ROUND).await;
                lock(&world).rebalance_round();
            }
        });
    }
    tokio::spawn(sample(world.clone(), raw.clone(), cfg.sample_s, end));
    for (k, spec) in schedule.clients.iter().enumerate() {
        let network = SimNetwork::new(
            world.clone(),
            links,
            spec.link,
            policy.route,
            cfg.push,
            spec.seed,
        );
        let router = Arc::new(Router {
            network,
            fingerprint: [0; 32],
            block_count: cfg.blocks,
            dim: 1,
            discovery_timeout: Duration::from_secs_f64(cfg.discovery_timeout_s),
            bans: Arc::default(),
            verify: coordinator::session::VerifyPolicy::OFF,
        });
        let client = Client {
            k,
            router,
            raw: raw.clone(),
            cfg: cfg.clone(),
        };
        tokio::spawn(client.run(spec.clone(), t0, end));
    }
    sleep_until(end).await;
    // A last sample at the end, so the series spans the whole run.
    let last = lock(&world).live_throughput();
    let mut out = std::mem::take(&mut *lock(&raw));
    out.samples
        .push(summarise(cfg.duration_ms() as f64 / 60_000.0, &last));
    out.moves = lock(&world).moves;
    out
}

async fn churn(world: Arc<Mutex<World>>, schedule: Arc<Schedule>) {
    for (i, spec) in schedule.peers.iter().enumerate() {
        if spec.join_ms == 0 {
            continue;
        }
        let at = lock(&world).at(spec.join_ms);
        sleep_until(at).await;
        lock(&world).join(i);
    }
}

fn summarise(minute: f64, throughput: &[f64]) -> Sample {
    let weakest = throughput.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = throughput.iter().sum::<f64>() / throughput.len().max(1) as f64;
    Sample {
        minute,
        weakest: if weakest.is_finite() { weakest } else { 0.0 },
        mean,
    }
}

/// Samples the blocks' throughput every `every_s` until just before `end`.
async fn sample(world: Arc<Mutex<World>>, raw: Arc<Mutex<Raw>>, every_s: f64, end: Instant) {
    let start = Instant::now();
    let mut k = 0u32;
    loop {
        let at = start + Duration::from_secs_f64(every_s) * k;
        if at >= end {
            return;
        }
        sleep_until(at).await;
        let throughput = lock(&world).live_throughput();
        let minute = every_s * f64::from(k) / 60.0;
        lock(&raw).samples.push(summarise(minute, &throughput));
        k += 1;
    }
}

struct Client {
    k: usize,
    router: Arc<Router<SimNetwork>>,
    raw: Arc<Mutex<Raw>>,
    cfg: Config,
}

enum Ending {
    Completed,
    Failed,
}

impl Client {
    async fn run(self, spec: ClientSpec, t0: Instant, end: Instant) {
        let mut rng = StdRng::seed_from_u64(spec.seed.rotate_left(17));
        sleep_until(t0 + Duration::from_millis(spec.start_ms)).await;
        let stop = end.min(t0 + Duration::from_millis(spec.stop_ms));
        while Instant::now() < stop {
            lock(&self.raw).started += 1;
            // Generation lengths vary: exponential around the configured mean, bounded.
            let mean = f64::from(self.cfg.new_tokens);
            let tokens = (-mean * (1.0 - rng.random::<f64>()).ln()).clamp(8.0, 4.0 * mean) as u32;
            let (ending, rerouted) = self.generate(tokens).await;
            {
                let mut raw = lock(&self.raw);
                match ending {
                    Ending::Completed => raw.completed += 1,
                    Ending::Failed => raw.failed += 1,
                }
                if rerouted {
                    raw.hit += 1;
                    raw.hit_completed += u64::from(matches!(ending, Ending::Completed));
                }
            }
            let think = -self.cfg.think_s * (1.0 - rng.random::<f64>()).ln();
            sleep(Duration::from_secs_f64(think)).await;
        }
    }

    fn busy(&self, since: Instant) {
        lock(&self.raw).client_busy_ms[self.k] += since.elapsed().as_secs_f64() * 1e3;
    }

    /// One generation: open, prefill the prompt, decode token by token. Returns how it ended
    /// and whether a peer had to be replaced on the way.
    async fn generate(&self, new_tokens: u32) -> (Ending, bool) {
        let prompt = self.cfg.prompt_tokens;
        let t = Instant::now();
        let opened = InferenceSession::open(self.router.clone(), prompt + new_tokens).await;
        let Ok(mut session) = opened else {
            self.busy(t);
            return (Ending::Failed, false);
        };
        let x = Hidden {
            tokens: prompt as usize,
            dim: 1,
            data: vec![0.0; prompt as usize],
        };
        let mut ok = session.run_blocks(x, 0).await.is_ok();
        self.busy(t);
        let mut seen = self.recoveries(&session, 0);
        for i in 0..new_tokens {
            if !ok {
                break;
            }
            let t = Instant::now();
            let x = Hidden {
                tokens: 1,
                dim: 1,
                data: vec![0.0],
            };
            ok = session.run_blocks(x, prompt + i).await.is_ok();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            {
                let mut raw = lock(&self.raw);
                raw.client_busy_ms[self.k] += ms;
                if ok {
                    raw.token_latency_ms.push(ms);
                    raw.client_tokens[self.k] += 1;
                }
            }
            seen = self.recoveries(&session, seen);
        }
        let rerouted = session.reroutes() > 0;
        session.close().await;
        (
            if ok {
                Ending::Completed
            } else {
                Ending::Failed
            },
            rerouted,
        )
    }

    /// Records the session's recoveries after the first `seen`; returns how many it has.
    fn recoveries(&self, session: &InferenceSession<SimNetwork>, seen: usize) -> usize {
        let all = session.recoveries();
        lock(&self.raw)
            .recovery_ms
            .extend(all[seen..].iter().map(|d| d.as_secs_f64() * 1e3));
        all.len()
    }
}
