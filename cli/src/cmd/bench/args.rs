//! The flags of `edge-node bench`, shared by the local and the swarm benchmarks.

use std::ops::Range;
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Benchmark this process alone.
    #[arg(long, conflicts_with = "swarm")]
    pub local: bool,
    /// Benchmark a swarm of real processes on 127.0.0.1 against the local run, in one run.
    #[arg(long)]
    pub swarm: bool,
    /// Benchmark a swarm already running (reached through this bootstrap peer; repeatable):
    /// time to first token and per-token decode latency through it, nothing started here.
    #[arg(long, value_name = "MULTIADDR", conflicts_with_all = ["local", "swarm"])]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Nodes of the benchmark swarm; the blocks are split evenly between them.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// With --swarm: measure recovery instead, killing a node after this many positions of
    /// history (e.g. 100).
    #[arg(long)]
    pub recovery: Option<usize>,
    /// With --swarm: measure the OpenAI-compatible gateway (`serve-api`) against the client
    /// library on the same swarm, and CLIENTS concurrent streams against one.
    #[arg(long, value_name = "CLIENTS", conflicts_with = "recovery")]
    pub api: Option<usize>,
    /// With --swarm: one client's per-token latency alone and while another client's prompt
    /// of TOKENS tokens runs through the same nodes.
    #[arg(long, value_name = "TOKENS", conflicts_with_all = ["recovery", "api"])]
    pub fairness: Option<usize>,
    /// With --swarm: what checking peers' outputs costs, N positions per check: the same
    /// generation through two nodes with verification off and on (tokens/s of both).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096),
          conflicts_with_all = ["recovery", "api", "fairness"])]
    pub verify_every: Option<u64>,
    /// With --verify-every: positions the primary may run past a span's first check before
    /// the client waits for it (the client's `--verify-first`).
    #[arg(long, value_name = "N", requires = "verify_every")]
    pub verify_first: Option<u64>,
    /// With --verify-every: the share of spans audited past their first check (the client's
    /// `--verify-sample`).
    #[arg(long, value_name = "SHARE", requires = "verify_every",
          default_value_t = crate::cmd::client::DEFAULT_VERIFY_SAMPLE,
          value_parser = crate::cmd::client::parse_share)]
    pub verify_sample: f64,
    /// With --local: what each wire dtype of hidden states (f16, bf16, q8) costs in agreement
    /// with f32, the model split into --nodes spans, over --gen-tokens tokens of a few prompts.
    #[arg(long, requires = "local")]
    pub wire_agreement: bool,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// The median of this many runs is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Load only these blocks (e.g. 0..10) and time them alone: what one peer holds and costs.
    #[arg(long, value_parser = parse_block_range)]
    pub blocks: Option<Range<usize>>,
    #[arg(long)]
    pub json: bool,
}

pub fn parse_block_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a block range like 0..10"))?;
    let start = a
        .trim()
        .parse()
        .map_err(|_| format!("bad range start in `{s}`"))?;
    let end = b
        .trim()
        .parse()
        .map_err(|_| format!("bad range end in `{s}`"))?;
    if start >= end {
        return Err(format!("block range `{s}` is empty"));
    }
    Ok(start..end)
}
