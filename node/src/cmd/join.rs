use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use edge_node::join::{run_bootstrap, run_join, JoinConfig};

use super::bench::parse_block_range;
use super::net_args::NetArgs;

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Path to the GGUF model file (every peer of a swarm must use the same file).
    #[arg(long)]
    pub model: PathBuf,
    /// Blocks to serve, e.g. 0..10.
    #[arg(long, value_parser = parse_block_range)]
    pub blocks: Range<usize>,
    #[command(flatten)]
    pub net: NetArgs,
    /// Most inference sessions served at once.
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,
    /// KV-cache positions for all sessions together (each on every block it uses).
    #[arg(long, default_value_t = 16384)]
    pub cache_tokens: usize,
    /// Seconds between DHT announcements (records expire after three missed ones).
    #[arg(long, default_value_t = 10)]
    pub announce_interval: u64,
    /// Seconds a session may stay silent before its cache is freed.
    #[arg(long, default_value_t = 120)]
    pub idle_timeout: u64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub net: NetArgs,
}

pub fn run_join_cmd(args: JoinArgs) -> anyhow::Result<()> {
    super::init_threads(args.threads)?;
    let config = JoinConfig {
        model: args.model,
        blocks: args.blocks,
        net: args.net.options(),
        max_sessions: args.max_sessions.max(1),
        cache_tokens: args.cache_tokens,
        announce_interval: Duration::from_secs(args.announce_interval.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
    };
    super::runtime()?.block_on(async {
        let shutdown = super::shutdown_on_signal();
        run_join(config, shutdown).await
    })?;
    Ok(())
}

pub fn run_bootstrap_cmd(args: BootstrapArgs) -> anyhow::Result<()> {
    let opts = args.net.options();
    super::runtime()?.block_on(async {
        let shutdown = super::shutdown_on_signal();
        run_bootstrap(opts, shutdown).await
    })?;
    Ok(())
}
