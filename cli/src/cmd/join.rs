use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use node::{run_bootstrap, run_join, BlockChoice, JoinConfig};

use super::bench::parse_block_range;
use super::compute_args::ComputeArgs;
use super::net_args::NetArgs;
use super::MAX_SECS;

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Read flags from this TOML file (`num-blocks = 10`, `bootstrap = ["/ip4/..."]`, ...;
    /// see deploy/edge-node.toml). Flags given on the command line win over the file; relative
    /// `model`, `identity` and `health-file` paths in it are taken from the file's directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Path to the GGUF model file (every peer of a swarm must use the same file).
    #[arg(long)]
    pub model: PathBuf,
    /// Blocks to serve: a range such as 0..10, or `auto` to serve as many as fit in
    /// --max-memory, placed where the swarm is weakest.
    #[arg(long, value_parser = parse_blocks, conflicts_with = "num_blocks")]
    pub blocks: Option<Blocks>,
    /// Serve this many blocks, placed where the swarm is weakest.
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Memory budget: weights plus KV cache of --cache-tokens positions plus 64 MiB for the
    /// process (e.g. 512M, 2G). Sizes `--blocks auto`; with a range or --num-blocks, a count
    /// that does not fit is refused before loading.
    #[arg(long, value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Seconds between checks whether moving to other blocks would strengthen the swarm (at
    /// most a day).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub rebalance_interval: u64,
    /// Never move to other blocks.
    #[arg(long)]
    pub no_rebalance: bool,
    /// Move only if the swarm's weakest block gets at least this much faster (0.2 = 20%), or
    /// if the move gives this share of the node's throughput to blocks below the mean.
    #[arg(long, default_value_t = 0.2)]
    pub rebalance_min_gain: f64,
    /// Seconds a leaving node waits for its sessions to move elsewhere (0 = leave at once; at
    /// most a day).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub drain_timeout: u64,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Sessions one remote peer may hold at once (default: three quarters of --max-sessions,
    /// so one peer opening sessions in a loop leaves the rest to others). A gateway reaches a
    /// node as ONE peer for all of its users: on a node that serves mostly one gateway, raise
    /// this up to --max-sessions.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions_per_peer: Option<u64>,
    /// KV-cache positions one remote peer's sessions may hold together (default: three
    /// quarters of --cache-tokens; the same gateway caveat applies).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_tokens_per_peer: Option<u64>,
    /// Seconds between DHT announcements (records expire after three missed ones; readers
    /// refuse entries that claim to live over an hour, hence at most 1200).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1200))]
    pub announce_interval: u64,
    /// Seconds a session may stay silent, or leave its answer unread, before its cache is freed
    /// (at most a day).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub idle_timeout: u64,
    /// Most rows (tokens) one inference step may carry; clients are told when a session opens
    /// and send longer prompts in steps of at most this many. A larger step is refused with
    /// STEP_TOO_LARGE, which no client bans a node for.
    #[arg(long, default_value_t = proto::DEFAULT_MAX_STEP_TOKENS as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_TOKENS))]
    pub max_step_tokens: u64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// File touched on every announcement while serving (for `edge-node health`).
    #[arg(long, value_name = "FILE")]
    pub health_file: Option<PathBuf>,
    /// Serve a status page and Prometheus `/metrics` on this address (e.g. 127.0.0.1:9100;
    /// port 0 picks a free one, printed as `status page on http://...`).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The node's --health-file.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Healthy when the file was written at most this many seconds ago.
    #[arg(long, default_value_t = 30)]
    pub max_age: u64,
}

/// Exit 0 when the node behind `--file` announced itself recently (container health checks;
/// works in an image that has no shell).
pub fn run_health_cmd(args: HealthArgs) -> anyhow::Result<()> {
    let age = std::fs::metadata(&args.file)
        .and_then(|m| m.modified())
        .map_err(|e| anyhow::anyhow!("node not serving yet ({}: {e})", args.file.display()))?
        .elapsed()
        .unwrap_or_default();
    if age > Duration::from_secs(args.max_age) {
        anyhow::bail!("node silent for {:.0} s", age.as_secs_f64());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Clone, Debug)]
pub enum Blocks {
    Range(Range<usize>),
    Auto,
}

fn parse_blocks(s: &str) -> Result<Blocks, String> {
    if s == "auto" {
        Ok(Blocks::Auto)
    } else {
        parse_block_range(s).map(Blocks::Range)
    }
}

/// `512M`, `2G`, `1048576`: a size in bytes with an optional binary suffix.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512M or 2G"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok((n * mult as f64) as u64)
}

pub fn run_join_cmd(args: JoinArgs) -> anyhow::Result<()> {
    let blocks = match (&args.blocks, args.num_blocks, args.max_memory) {
        (Some(Blocks::Range(r)), None, _) => BlockChoice::Fixed(r.clone()),
        (Some(Blocks::Auto), None, Some(_)) => BlockChoice::Auto,
        (Some(Blocks::Auto), None, None) => anyhow::bail!("--blocks auto needs --max-memory (e.g. 512M)"),
        (None, Some(n), _) => BlockChoice::Count(n),
        _ => anyhow::bail!("say which blocks to serve: --blocks START..END, --num-blocks N, or --blocks auto --max-memory SIZE"),
    };
    super::init_threads(args.threads)?;
    let config = JoinConfig {
        model: args.model,
        blocks,
        max_memory_bytes: args.max_memory,
        rebalance_interval: (!args.no_rebalance)
            .then(|| Duration::from_secs(args.rebalance_interval)),
        rebalance_min_gain: args.rebalance_min_gain,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        health_file: args.health_file,
        http_listen: args.http_listen,
        net: args.net.options(),
        max_sessions: args.compute.max_sessions(),
        cache_tokens: args.compute.cache_tokens,
        max_sessions_per_peer: args.max_sessions_per_peer.map(saturating_usize),
        cache_tokens_per_peer: args.cache_tokens_per_peer.map(saturating_usize),
        prefill_chunk: args.compute.prefill_chunk(),
        max_step_tokens: saturating_usize(args.max_step_tokens),
        announce_interval: Duration::from_secs(args.announce_interval.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        fault: node::Fault::None,
    };
    super::runtime()?.block_on(async {
        let shutdown = super::shutdown_on_signal();
        run_join(config, shutdown).await
    })?;
    Ok(())
}

/// Largest `--max-step-tokens`: beyond the context of any model we load, so it never limits a
/// real step, yet small enough that a typo cannot read as "unbounded".
const MAX_STEP_TOKENS: u64 = 1 << 20;

/// A count from a flag; past what this machine can address is as good as no limit.
fn saturating_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

pub fn run_bootstrap_cmd(args: BootstrapArgs) -> anyhow::Result<()> {
    let mut opts = args.net.options();
    // A bootstrap peer is dialled by everyone, so it is reachable: it relays for peers behind
    // NAT unless told not to, and needs no relayed address itself.
    opts.relay = args.net.relay.unwrap_or(swarm::host::RelayServer::On);
    opts.relay_listen = false;
    super::runtime()?.block_on(async {
        let shutdown = super::shutdown_on_signal();
        run_bootstrap(opts, shutdown).await
    })?;
    Ok(())
}
