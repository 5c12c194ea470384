//! `edge-node serve-api`: the OpenAI-compatible HTTP API, the gRPC service, the status page and
//! `/metrics`, on one port, backed by the swarm or (`--local`) by every block in this process on
//! a node's batching compute thread.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use coordinator::{ClientModel, SwarmClient};
use gateway::{ApiKeys, Blocks, Gateway, GatewayConfig, LocalBlocks};
use model::{load, GgufFile, LoadOptions};
use node::compute::{measure_speed, ComputeHandle};
use node::metrics::NodeMetrics;
use swarm::status::ModelInfo;

use super::client::{open_client_model, SwarmArgs};
use super::compute_args::ComputeArgs;

#[derive(Args, Debug)]
pub struct ServeApiArgs {
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// Path to the GGUF model file (the same file the swarm's nodes serve).
    #[arg(long)]
    pub model: PathBuf,
    /// Address for HTTP (OpenAI API, status page, /metrics) and gRPC alike.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name clients use for the model (default: the file name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Run every block in this process instead of through a swarm (one device, no peers).
    #[arg(long, conflicts_with_all = ["bootstrap", "mdns"])]
    pub local: bool,
    /// Generations running at once; further requests wait. Default: what the blocks batch
    /// (--max-sessions with --local; 16, a node's default session limit, in a swarm).
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// With --local: the compute thread's limits.
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// With --local: compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests allowed to wait for a slot; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// Seconds a request may wait for a slot before it is refused with 429.
    #[arg(long, default_value_t = 60)]
    pub queue_timeout: u64,
    /// Seconds one generation may take before it fails with 504.
    #[arg(long, default_value_t = 600)]
    pub generation_timeout: u64,
    /// `max_tokens` of chat requests that do not say (completions default to 16, as OpenAI).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Require `Authorization: Bearer <key>` on every OpenAI and gRPC request, with one of the
    /// keys in this file (one per line; blank lines and `#` comments skipped). The status page,
    /// /metrics and gRPC health stay open.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Connections one client address may hold at once (a reverse proxy on this machine counts
    /// as one address: raise this behind one).
    #[arg(long, default_value_t = swarm::page::MAX_CONNECTIONS_PER_IP as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_ip: u64,
    /// Generations one client address runs at once (IPv6 by /64); its further requests wait
    /// in the queue for one of its own. Default: three quarters of --max-concurrent (at least
    /// one), so one client cannot take every slot, even over one HTTP/2 connection.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_generations_per_ip: Option<u64>,
}

pub fn run(args: ServeApiArgs) -> anyhow::Result<()> {
    if !args.local && !args.swarm.is_set() {
        bail!("say where the swarm is: --bootstrap MULTIADDR (or --mdns), or run every block here with --local");
    }
    if args.local {
        super::init_threads(args.threads)?;
    }
    // Read before anything starts, so a bad file is a one-line error and no half-open port.
    let api_keys = args
        .api_key_file
        .as_deref()
        .map(ApiKeys::load)
        .transpose()?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let shutdown = super::shutdown_on_signal();
        let model = open_client_model(&args.model)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let (blocks, batch) = if args.local {
            let local = tokio::task::block_in_place(|| local_blocks(&args, &model))?;
            (Blocks::Local(local), args.compute.max_sessions())
        } else {
            let client = SwarmClient::connect(args.swarm.client_config()?).await?;
            (Blocks::Swarm(Box::new(client)), SWARM_BATCH)
        };
        let config = GatewayConfig {
            default_max_tokens: args.default_max_tokens.max(1),
            max_concurrent: args.max_concurrent.unwrap_or(batch).max(1),
            max_waiting: args.max_waiting,
            queue_timeout: Duration::from_secs(args.queue_timeout),
            generation_timeout: Duration::from_secs(args.generation_timeout.max(1)),
            api_keys,
            max_per_client: args
                .max_generations_per_ip
                .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            ..GatewayConfig::default()
        };
        let id = args
            .model_id
            .clone()
            .unwrap_or_else(|| ModelInfo::id_of(&args.model));
        tracing::info!(
            max_concurrent = config.max_concurrent,
            "{}",
            if args.local { "every block in this process" } else { "blocks through the swarm" }
        );
        let gw = Gateway::start(blocks, model, id.clone(), config, shutdown.clone());
        let addr = listener.local_addr()?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "serving the API on http://{addr}")?;
            out.flush()?;
        }
        tracing::info!(
            "model `{id}`: OpenAI API at http://{addr}/v1, gRPC at {addr}, status page at http://{addr}/"
        );
        let limits = swarm::page::ConnLimits {
            per_ip: usize::try_from(args.max_connections_per_ip).unwrap_or(usize::MAX),
            ..Default::default()
        };
        swarm::page::serve_with(listener, gw.router(shutdown.clone()), limits, shutdown).await?;
        anyhow::Ok(())
    })
}

/// Generations a swarm gateway runs at once by default: what one node batches by default
/// (`join --max-sessions`), since every generation holds a session on each node of its route.
const SWARM_BATCH: usize = 16;

/// Every block of the file on a compute thread of its own, timed for the prefill chunk.
fn local_blocks(args: &ServeApiArgs, model: &ClientModel) -> anyhow::Result<LocalBlocks> {
    let blocks = 0..model.spec.block_count;
    let file = GgufFile::open(&args.model)?;
    let mut slice = load(&file, &LoadOptions::blocks(blocks.clone()), &mut |_, _| {})?;
    let stack = slice
        .stack
        .take()
        .context("the file has no transformer blocks")?;
    let (decode_ms, prefill_ms) = measure_speed(&stack, MEASURE_PREFILL, MEASURE_DECODE)?;
    let limits = args
        .compute
        .limits(prefill_ms * blocks.len() as f64 / MEASURE_PREFILL as f64);
    tracing::info!(
        decode_ms_per_block = format!("{decode_ms:.3}"),
        prefill_chunk = limits.prefill_chunk,
        "blocks {}..{} loaded and measured",
        blocks.start,
        blocks.end
    );
    let metrics = Arc::new(NodeMetrics::default());
    let compute = ComputeHandle::spawn(stack, limits, metrics.clone())?;
    metrics.block_end.set(blocks.end as i64);
    Ok(LocalBlocks {
        compute,
        metrics,
        decode_ms_per_block: decode_ms,
    })
}

/// What the local blocks are timed on (as a joining node does).
const MEASURE_PREFILL: usize = 32;
const MEASURE_DECODE: usize = 8;
