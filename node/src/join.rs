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
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use model::fingerprint::{fingerprint, short_hex, Fingerprint};
use model::{load, GgufFile, LoadOptions, ModelSpec};
use proto::v1::{ServerRecord, ServerState};
use tokio_util::sync::CancellationToken;

use crate::compute::{measure_speed, ComputeHandle, ComputeLimits};
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
}

pub struct NetOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub identity: Option<PathBuf>,
    pub mdns: bool,
}

pub struct JoinConfig {
    pub model: PathBuf,
    pub blocks: Range<usize>,
    pub net: NetOptions,
    pub max_sessions: usize,
    pub cache_tokens: usize,
    pub announce_interval: Duration,
    pub idle_timeout: Duration,
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
    Ok((network.handle, addrs))
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
    blocks: Range<usize>,
    addrs: ListenAddrs,
    interval: Duration,
}

impl Announcer {
    async fn announce(&self, state: ServerState, speed: (f64, f64), free_cache_tokens: u64) {
        let now = now_ms();
        let addrs = self.addrs.lock().map(|v| v.clone()).unwrap_or_default();
        let record = ServerRecord {
            peer_id: self.net.peer_id().to_bytes(),
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            fingerprint: self.fp.to_vec(),
            start_block: self.blocks.start as u32,
            end_block: self.blocks.end as u32,
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

/// Serves blocks `config.blocks` of the model until `shutdown`.
pub async fn run_join(config: JoinConfig, shutdown: CancellationToken) -> Result<(), JoinError> {
    let file = GgufFile::open(&config.model)?;
    let spec = ModelSpec::from_file(&file)?;
    if config.blocks.end > spec.block_count || config.blocks.is_empty() {
        return Err(model::ModelError::BadBlockRange {
            start: config.blocks.start,
            end: config.blocks.end,
            count: spec.block_count,
        }
        .into());
    }
    let fp = fingerprint(&file)?;
    tracing::info!(model = %short_hex(&fp), blocks = ?config.blocks, "joining");

    let net_shutdown = CancellationToken::new();
    let (net, addrs) = start_network(&config.net, &net_shutdown)?;
    let announcer = Arc::new(Announcer {
        net: net.clone(),
        fp,
        blocks: config.blocks.clone(),
        addrs,
        interval: config.announce_interval,
    });
    // Let the first listen addresses and bootstrap connections settle before announcing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    announcer
        .announce(ServerState::Joining, (0.0, 0.0), 0)
        .await;

    let (bar, mut progress) = crate::progress::loading_bar(&format!(
        "blocks {}..{}",
        config.blocks.start, config.blocks.end
    ));
    let slice = tokio::task::block_in_place(|| {
        load(
            &file,
            &LoadOptions::blocks(config.blocks.clone()),
            &mut progress,
        )
    });
    bar.finish_and_clear();
    let slice = slice?;
    let stack = slice.stack.ok_or(model::ModelError::NotLoaded {
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
    )?;
    let ctx = Arc::new(ServeContext {
        fingerprint: fp,
        blocks: config.blocks.clone(),
        dim: spec.embedding_length,
        context_length: spec.context_length,
        compute: compute.clone(),
        idle_timeout: config.idle_timeout,
        leaving: AtomicBool::new(false),
    });
    let serve_shutdown = CancellationToken::new();
    let server = tokio::spawn(accept_loop(
        net.stream_control(),
        ctx.clone(),
        serve_shutdown.clone(),
    ));

    announcer
        .announce(ServerState::Online, speed, compute.free_cache_tokens())
        .await;
    tracing::info!(
        "serving blocks {}..{}",
        config.blocks.start,
        config.blocks.end
    );
    let mut refresh = tokio::time::interval(config.announce_interval);
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = refresh.tick() => {
                announcer.announce(ServerState::Online, speed, compute.free_cache_tokens()).await;
            }
        }
    }

    tracing::info!("leaving: refusing new sessions and announcing offline");
    ctx.leaving.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        announcer.announce(ServerState::Offline, speed, 0),
    )
    .await;
    serve_shutdown.cancel();
    let _ = server.await;
    net_shutdown.cancel();
    Ok(())
}
