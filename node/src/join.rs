//! `edge-node join` and `edge-node bootstrap` as library functions: `run(config, shutdown)`.
//!
//! Order of life: identity, model file checks and fingerprint, network up (listening addresses
//! printed), announce JOINING, load the slice, measure its speed, serve, announce ONLINE and keep
//! refreshing. On shutdown: refuse new sessions, announce OFFLINE, stop the network.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator::discovery::{self, now_ms};
use coordinator::net::{self, identity, NetConfig, NetHandle};
use coordinator::route::{
    block_throughput, blocks_for_memory, choose_blocks, should_move, span_throughput, Served,
};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use model::fingerprint::{fingerprint, short_hex, Fingerprint};
use model::{load, GgufFile, LoadOptions, ModelSpec};
use proto::v1::{ServerRecord, ServerState};
use tokio_util::sync::CancellationToken;

use coordinator::status::ModelInfo;

use crate::compute::{measure_speed, ComputeHandle, ComputeLimits};
use crate::http::NodeStatus;
use crate::metrics::NodeMetrics;
use crate::server::{accept_loop, ServeContext};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Net(#[from] coordinator::net::NetError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("starting the compute thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("not even one block fits in --max-memory {} MiB", max_memory_bytes >> 20)]
    NoRoom { max_memory_bytes: u64 },
    #[error("cannot serve the status page on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub struct NetOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub identity: Option<PathBuf>,
    pub mdns: bool,
    /// Addresses others should dial instead of the ones we listen on (a port forward, a
    /// proxy); announced in place of the listening addresses when given.
    pub external: Vec<Multiaddr>,
}

/// Which blocks a node serves: a fixed range, a count placed where the swarm is weakest, or as
/// many as fit in a memory budget, placed the same way.
#[derive(Clone, Debug)]
pub enum BlockChoice {
    Fixed(Range<usize>),
    Count(usize),
    Auto { max_memory_bytes: u64 },
}

pub struct JoinConfig {
    pub model: PathBuf,
    pub blocks: BlockChoice,
    pub net: NetOptions,
    pub max_sessions: usize,
    pub cache_tokens: usize,
    pub announce_interval: Duration,
    pub idle_timeout: Duration,
    /// How often to check whether moving would help the swarm; `None` never moves.
    pub rebalance_interval: Option<Duration>,
    /// Move only if the swarm's weakest block gets this much faster (0.2 = 20%).
    pub rebalance_min_gain: f64,
    /// How long a leaving node waits for its sessions to move elsewhere.
    pub drain_timeout: Duration,
    /// Touched on every announcement while serving, for container health checks.
    pub health_file: Option<PathBuf>,
    /// Where to serve this node's status page and `/metrics` (none when `None`).
    pub http_listen: Option<std::net::SocketAddr>,
}

fn keypair(path: &Option<PathBuf>) -> Result<Keypair, JoinError> {
    Ok(match path {
        Some(p) => identity::load_or_create(p)?,
        None => Keypair::generate_ed25519(),
    })
}

/// Prints each listening address on stdout the moment it is known (scripts wait for these).
/// The addresses this node listens on, as reported so far (what it announces).
type ListenAddrs = Arc<Mutex<Vec<Multiaddr>>>;

fn print_listen() -> (ListenAddrs, net::OnListen) {
    let addrs = Arc::new(Mutex::new(Vec::new()));
    let a = addrs.clone();
    let cb = Box::new(move |addr: &Multiaddr| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
        if let Ok(mut v) = a.lock() {
            v.push(addr.clone());
        }
    });
    (addrs, cb)
}

fn start_network(
    opts: &NetOptions,
    shutdown: &CancellationToken,
) -> Result<(NetHandle, ListenAddrs), JoinError> {
    let (addrs, on_listen) = print_listen();
    let announced = if opts.external.is_empty() {
        addrs
    } else {
        Arc::new(Mutex::new(opts.external.clone()))
    };
    let network = net::start(
        NetConfig {
            keypair: keypair(&opts.identity)?,
            listen: opts.listen.clone(),
            bootstrap: opts.bootstrap.clone(),
            mdns: opts.mdns,
            dht_server: true,
            on_listen: Some(on_listen),
        },
        shutdown.clone(),
    )?;
    tracing::info!(peer = %network.handle.peer_id(), "network started");
    Ok((network.handle, announced))
}

/// A peer that hosts no blocks: the swarm's meeting point.
pub async fn run_bootstrap(opts: NetOptions, shutdown: CancellationToken) -> Result<(), JoinError> {
    let net_shutdown = CancellationToken::new();
    let (_net, _addrs) = start_network(&opts, &net_shutdown)?;
    shutdown.cancelled().await;
    net_shutdown.cancel();
    Ok(())
}

struct Announcer {
    net: NetHandle,
    fp: Fingerprint,
    addrs: ListenAddrs,
    interval: Duration,
}

impl Announcer {
    async fn announce(
        &self,
        blocks: &Range<usize>,
        state: ServerState,
        speed: (f64, f64),
        free_cache_tokens: u64,
    ) {
        let now = now_ms();
        let mut addrs = self.addrs.lock().map(|v| v.clone()).unwrap_or_default();
        // Another host dialing our loopback address would reach itself; announce loopback only
        // when there is nothing else (a swarm on one machine).
        let routable = |a: &Multiaddr| {
            !a.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
                libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        };
        if addrs.iter().any(routable) {
            addrs.retain(routable);
        }
        let record = ServerRecord {
            peer_id: self.net.peer_id().to_bytes(),
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            fingerprint: self.fp.to_vec(),
            start_block: blocks.start as u32,
            end_block: blocks.end as u32,
            state: state as i32,
            decode_ms_per_block: speed.0 as f32,
            prefill_ms_per_block: speed.1 as f32,
            free_cache_tokens,
            version: env!("CARGO_PKG_VERSION").into(),
            announced_at_ms: now,
            // Three missed refreshes and readers forget this node.
            expires_at_ms: now + 3 * self.interval.as_millis() as u64,
        };
        let failed = discovery::announce(&self.net, &self.fp, &record).await;
        tracing::debug!(?state, failed, "announced");
    }
}

/// A joining server's decode time is not measured yet; count it as typical so that nodes
/// starting together still see each other's choices.
const JOINING_DECODE_MS: f32 = 1.0;

/// The swarm's servers of this model as the balancing logic sees them.
async fn served(
    net: &NetHandle,
    fp: &Fingerprint,
    block_count: u32,
) -> Vec<Served<libp2p::PeerId>> {
    let servers = discovery::lookup(net, fp, block_count)
        .await
        .unwrap_or_default();
    servers
        .into_iter()
        .filter(|s| matches!(s.state, ServerState::Online | ServerState::Joining))
        .map(|s| {
            let ms = if s.decode_ms_per_block > 0.0 {
                s.decode_ms_per_block
            } else {
                JOINING_DECODE_MS
            };
            Served {
                throughput: span_throughput(ms, s.blocks.len() as u32),
                peer: s.peer,
                blocks: s.blocks,
            }
        })
        .collect()
}

/// Why a node stopped serving its current range.
enum Outcome {
    Shutdown,
    Move(Range<usize>),
}

/// Serves blocks of the model, chosen by `config.blocks`, until `shutdown`.
pub async fn run_join(config: JoinConfig, shutdown: CancellationToken) -> Result<(), JoinError> {
    let file = GgufFile::open(&config.model)?;
    let spec = ModelSpec::from_file(&file)?;
    let block_count = spec.block_count;
    let bad_range = |start, end| model::ModelError::BadBlockRange {
        start,
        end,
        count: block_count,
    };
    let count = match &config.blocks {
        BlockChoice::Fixed(r) if r.is_empty() || r.end > block_count => {
            return Err(bad_range(r.start, r.end).into())
        }
        BlockChoice::Fixed(r) => r.len(),
        BlockChoice::Count(n) if *n == 0 || *n > block_count => return Err(bad_range(0, *n).into()),
        BlockChoice::Count(n) => *n,
        BlockChoice::Auto { max_memory_bytes } => {
            let block_bytes = crate::compute::block_weight_bytes(&file, 0)?;
            blocks_for_memory(
                *max_memory_bytes,
                MEMORY_OVERHEAD_BYTES,
                block_bytes,
                spec.kv_bytes_per_token_per_block() as u64,
                config.cache_tokens as u64,
                block_count as u32,
            )
            .ok_or(JoinError::NoRoom {
                max_memory_bytes: *max_memory_bytes,
            })? as usize
        }
    };
    let fp = fingerprint(&file)?;
    tracing::info!(model = %short_hex(&fp), "joining with {count} block(s)");

    let net_shutdown = CancellationToken::new();
    let (net, addrs) = start_network(&config.net, &net_shutdown)?;
    let metrics = Arc::new(NodeMetrics::default());
    if let Some(addr) = config.http_listen {
        let info = ModelInfo::new(ModelInfo::id_of(&config.model), &fp, &spec);
        start_http(addr, &net, fp, info, metrics.clone(), &net_shutdown).await?;
    }
    let announcer = Announcer {
        net: net.clone(),
        fp,
        addrs,
        interval: config.announce_interval,
    };
    // Let the first listen addresses and bootstrap connections settle before announcing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut range = match &config.blocks {
        BlockChoice::Fixed(r) => r.clone(),
        _ => {
            // Nodes started together would all see the same swarm and pick the same run;
            // a random pause lets each see the choices of those before it.
            let jitter =
                rand::random_range(0..=config.announce_interval.as_millis().min(3000) as u64);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            let swarm = served(&net, &fp, block_count as u32).await;
            let throughput = block_throughput(&swarm, block_count as u32);
            let r = choose_blocks(&throughput, count as u32).ok_or(bad_range(0, count))?;
            tracing::info!(
                "chose blocks {}..{}, the weakest part of the swarm",
                r.start,
                r.end
            );
            r.start as usize..r.end as usize
        }
    };

    loop {
        let served = serve_range(
            &config, &file, &spec, &announcer, &range, &metrics, &shutdown,
        );
        match served.await? {
            Outcome::Shutdown => break,
            Outcome::Move(to) => {
                tracing::info!(
                    "moving from blocks {}..{} to {}..{}",
                    range.start,
                    range.end,
                    to.start,
                    to.end
                );
                range = to;
            }
        }
    }
    net_shutdown.cancel();
    Ok(())
}

/// Serves the status page and `/metrics`, and says where on stdout (scripts wait for it).
async fn start_http(
    addr: std::net::SocketAddr,
    net: &NetHandle,
    fp: Fingerprint,
    info: ModelInfo,
    metrics: Arc<NodeMetrics>,
    shutdown: &CancellationToken,
) -> Result<(), JoinError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| JoinError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| JoinError::Http { addr, source })?;
    let status = Arc::new(NodeStatus {
        swarm: gateway::page::watch_swarm(
            net.clone(),
            fp,
            info.clone(),
            Duration::from_secs(3),
            shutdown.clone(),
        ),
        info,
        peer_id: net.peer_id().to_string(),
        metrics,
    });
    let router = gateway::page::router(status);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = gateway::page::serve(listener, router, stop).await {
            tracing::warn!("status page stopped: {e}");
        }
    });
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "status page on http://{bound}");
        let _ = out.flush();
    }
    tracing::info!("status page on http://{bound}/, metrics on http://{bound}/metrics");
    Ok(())
}

fn touch(path: &Option<PathBuf>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::write(p, now_ms().to_string()) {
            tracing::warn!("cannot write health file {}: {e}", p.display());
        }
    }
}

/// A node's fixed costs besides block weights and KV cache (runtime, GGUF header, buffers).
const MEMORY_OVERHEAD_BYTES: u64 = 64 << 20;

/// Loads `range`, serves it and keeps it announced until shutdown or until moving would
/// strengthen the swarm; then leaves that range gracefully.
async fn serve_range(
    config: &JoinConfig,
    file: &GgufFile,
    spec: &ModelSpec,
    announcer: &Announcer,
    range: &Range<usize>,
    metrics: &Arc<NodeMetrics>,
    shutdown: &CancellationToken,
) -> Result<Outcome, JoinError> {
    metrics.block_start.set(range.start as i64);
    metrics.block_end.set(0);
    announcer
        .announce(range, ServerState::Joining, (0.0, 0.0), 0)
        .await;
    let (bar, mut progress) =
        crate::progress::loading_bar(&format!("blocks {}..{}", range.start, range.end));
    let slice = tokio::task::block_in_place(|| {
        load(file, &LoadOptions::blocks(range.clone()), &mut progress)
    });
    bar.finish_and_clear();
    let stack = slice?.stack.ok_or(model::ModelError::NotLoaded {
        what: "transformer blocks",
    })?;
    let speed = tokio::task::block_in_place(|| measure_speed(&stack, 32, 8))?;
    tracing::info!(
        decode_ms_per_block = format!("{:.3}", speed.0),
        prefill_ms_per_block = format!("{:.2}", speed.1),
        weights_mib = format!("{:.1}", stack.weight_bytes() as f64 / (1 << 20) as f64),
        "blocks loaded and measured"
    );
    let compute = ComputeHandle::spawn(
        stack,
        ComputeLimits {
            max_sessions: config.max_sessions,
            cache_tokens: config.cache_tokens,
        },
        metrics.clone(),
    )?;
    metrics.block_end.set(range.end as i64);
    let ctx = Arc::new(ServeContext {
        fingerprint: announcer.fp,
        blocks: range.clone(),
        dim: spec.embedding_length,
        context_length: spec.context_length,
        compute: compute.clone(),
        idle_timeout: config.idle_timeout,
        leaving: AtomicBool::new(false),
    });
    let serve_shutdown = CancellationToken::new();
    let server = tokio::spawn(accept_loop(
        announcer.net.stream_control(),
        ctx.clone(),
        serve_shutdown.clone(),
    ));
    announcer
        .announce(
            range,
            ServerState::Online,
            speed,
            compute.free_cache_tokens(),
        )
        .await;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "serving blocks {}..{}", range.start, range.end);
        let _ = out.flush();
    }
    tracing::info!("serving blocks {}..{}", range.start, range.end);

    let mut refresh = tokio::time::interval(config.announce_interval);
    refresh.tick().await;
    let next_check = |every: Duration| {
        // Checks are staggered so servers of the same range do not all move at once.
        let jitter = rand::random_range(0..=every.as_millis() as u64 / 2);
        tokio::time::Instant::now() + every + Duration::from_millis(jitter)
    };
    let far = Duration::from_secs(365 * 24 * 3600);
    let mut check_at = next_check(config.rebalance_interval.unwrap_or(far));
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Outcome::Shutdown,
            _ = refresh.tick() => {
                announcer.announce(range, ServerState::Online, speed, compute.free_cache_tokens()).await;
                touch(&config.health_file);
            }
            _ = tokio::time::sleep_until(check_at), if config.rebalance_interval.is_some() => {
                check_at = next_check(config.rebalance_interval.unwrap_or(far));
                let swarm = served(&announcer.net, &announcer.fp, spec.block_count as u32).await;
                let me = announcer.net.peer_id();
                if let Some(m) = should_move(&swarm, &me, spec.block_count as u32, config.rebalance_min_gain) {
                    tracing::info!(
                        "the weakest block would go from {:.1} to {:.1} tokens/s",
                        m.min_before,
                        m.min_after
                    );
                    break Outcome::Move(m.to.start as usize..m.to.end as usize);
                }
            }
        }
    };

    // Leave this range: refuse new sessions and further steps (clients reroute on the code),
    // say so in the DHT, give sessions a moment to move, then stop.
    tracing::info!(
        "leaving blocks {}..{}: announcing offline",
        range.start,
        range.end
    );
    ctx.leaving.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        announcer.announce(range, ServerState::Offline, speed, 0),
    )
    .await;
    let drained = tokio::time::Instant::now() + config.drain_timeout;
    while compute.stats.sessions.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < drained
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve_shutdown.cancel();
    let _ = server.await;
    Ok(outcome)
}
