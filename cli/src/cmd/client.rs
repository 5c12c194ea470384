//! What the client commands (`generate`, `chat`) share: where the blocks run (this process or a
//! swarm) and the flags that bound it, the client's part of the model, and streamed text.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use coordinator::session::{RouteHop, Timeouts, VerifyPolicy};
use coordinator::{ClientConfig, ClientModel};

use super::MAX_SECS;

#[derive(Args, Debug, Clone)]
pub struct RouteArgs {
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// Seconds the whole generation (in `chat`: each reply) may take (default: no limit beyond
    /// the per-step ones; at most a day).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub timeout: Option<u64>,
}

/// How a client finds the swarm and how long it waits on it.
#[derive(Args, Debug, Clone)]
pub struct SwarmArgs {
    /// A peer of the swarm (repeatable); `/p2p/<peer id>` may be left out.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Find peers on the local network with mDNS (instead of, or besides, --bootstrap).
    #[arg(long)]
    pub mdns: bool,
    /// Seconds to wait for peers and for a complete route before giving up (at most a day).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub discovery_timeout: u64,
    /// Seconds one step through one peer may take before that peer counts as failed (at most
    /// a day).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub step_timeout: u64,
    /// Seconds to connect to a peer and open a session there (at most a day).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub connect_timeout: u64,
    /// Key file of a private swarm: the one its nodes were started with.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Check every peer's outputs on a second peer serving the same blocks, in batches of N
    /// positions (0 = off, the default). The checks run beside generation; a peer that
    /// disagrees with the majority is banned and the text generated again from where it went
    /// wrong. Text is shown once checked, so up to about 2N tokens late. Costs a spare peer
    /// per span and a second, batched copy of the work (see BENCHMARKS.md); 32 or 64 suit a
    /// long generation.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_VERIFY_EVERY))]
    pub verify_every: u64,
    /// With --verify-every: the first check (prompt and first generated token) must come back
    /// before the peers run N more positions, else the client waits for it; a peer that
    /// corrupts every step is caught before N + 2 tokens are sampled. Default: 6, or
    /// --verify-every if smaller.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_VERIFY_EVERY))]
    pub verify_first: Option<u64>,
    /// With --verify-every: the share of spans (0 to 1), drawn at random, that are checked to
    /// the end. The others get a first check of their prompt's first 4 positions only (which
    /// catches a peer that corrupts every step, at the cost of 4 batched rows), then release
    /// text at once and free their spare. The default, 0.05, keeps the spare's compute under
    /// 10% of the primary's (BENCHMARKS.md, "Sampled audits") and catches a peer that is wrong
    /// only past those first positions in one session in twenty; 1 checks every position.
    #[arg(long, value_name = "SHARE", default_value_t = DEFAULT_VERIFY_SAMPLE, value_parser = parse_share)]
    pub verify_sample: f64,
    /// Relay hidden states through this client after every span, instead of node to node.
    /// By default each node forwards its output to the next span's node and the client waits
    /// only for the last: N + 1 one-way trips per token through N nodes instead of 2N. Nodes
    /// still answer the client with every output, so a failure is rerouted and replayed alike.
    #[arg(long)]
    pub no_push: bool,
    /// Element type of hidden states on the wire: f32 (bit-exact, the default), f16 or bf16
    /// (half the bytes), q8 (int8 with a scale per row, about a quarter). Each node sends its
    /// output in it, to this client and to the next node alike. `auto` chooses per step and
    /// link, from the link's round trip and the rate measured on its earlier large frames: q8
    /// for a large step (a prompt) where that saves 100 ms of wire time on a slow link, f16
    /// where f16 saves 50 ms or the round trip is 20 ms or more, f32 otherwise (decode steps,
    /// fast links), so text may differ from local only on slow links. See BENCHMARKS.md for
    /// what each costs in agreement with f32 and in time.
    #[arg(long, value_enum, default_value_t = WireDtype::F32)]
    pub wire_dtype: WireDtype,
    /// How routes are chosen: `planner`, the cheapest route for a client alone (reproducible:
    /// the same swarm gives the same route), or `load-aware`, priced at the load each node
    /// announces with near-equal routes chosen at random, so that many clients spread out.
    #[arg(long, value_enum, default_value_t = RoutingArg::Planner)]
    pub routing: RoutingArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingArg {
    Planner,
    LoadAware,
}

impl RoutingArg {
    pub fn routing(self) -> coordinator::route::Routing {
        match self {
            RoutingArg::Planner => coordinator::route::Routing::Planner,
            RoutingArg::LoadAware => coordinator::route::Routing::LoadAware,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireDtype {
    F32,
    F16,
    Bf16,
    Q8,
    Auto,
}

impl WireDtype {
    pub fn wire(self) -> proto::Wire {
        use proto::v1::Dtype;
        use proto::Wire;
        match self {
            WireDtype::F32 => Wire::Fixed(Dtype::F32),
            WireDtype::F16 => Wire::Fixed(Dtype::F16),
            WireDtype::Bf16 => Wire::Fixed(Dtype::Bf16),
            WireDtype::Q8 => Wire::Fixed(Dtype::Q8Row),
            WireDtype::Auto => Wire::Auto,
        }
    }
}

/// `--verify-sample` unless given: see its help.
pub const DEFAULT_VERIFY_SAMPLE: f64 = 0.05;

/// A share from 0 to 1, as `--verify-sample` takes it.
pub fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share from 0 to 1")),
    }
}

/// Largest `--verify-every`: past the longest context we serve, a check would never come.
const MAX_VERIFY_EVERY: u64 = 1 << 16;

impl SwarmArgs {
    pub fn is_set(&self) -> bool {
        !self.bootstrap.is_empty() || self.mdns
    }

    /// The client settings, with the swarm key read from its file.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig {
            bootstrap: self.bootstrap.clone(),
            mdns: self.mdns,
            discovery_timeout: Duration::from_secs(self.discovery_timeout),
            timeouts: Timeouts {
                step: Duration::from_secs(self.step_timeout),
                connect: Duration::from_secs(self.connect_timeout),
            },
            swarm_key: self
                .swarm_key
                .as_deref()
                .map(swarm::swarm_key::load)
                .transpose()?,
            verify: match self.verify_first {
                Some(first) => {
                    VerifyPolicy::every(self.verify_every as usize).first_within(first as usize)
                }
                None => VerifyPolicy::every(self.verify_every as usize),
            }
            .audit_share(self.verify_sample),
            push: !self.no_push,
            wire: self.wire_dtype.wire(),
            routing: self.routing.routing(),
        })
    }
}

impl RouteArgs {
    /// Fails unless the flags say where the blocks run.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.local && !self.swarm.is_set() {
            bail!(
                "say where the blocks run: --local, or --bootstrap MULTIADDR (or --mdns) for a swarm"
            );
        }
        Ok(())
    }

    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        self.swarm.client_config()
    }

    /// Runs `run` within `--timeout` when one is set.
    pub async fn bounded<T, E>(&self, run: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
    where
        E: Into<anyhow::Error>,
    {
        match self.timeout {
            Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), run).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(anyhow::anyhow!("generation did not finish within {secs} s")),
            },
            None => run.await.map_err(Into::into),
        }
    }
}

/// Opens the client's part of the model (embeddings, head, tokenizer) with a progress bar.
pub fn open_client_model(path: &Path) -> anyhow::Result<ClientModel> {
    let (bar, mut progress) = node::progress::loading_bar("embeddings and head");
    let model = tokio::task::block_in_place(|| ClientModel::open(path, &mut progress));
    bar.finish_and_clear();
    Ok(model?)
}

/// `peer [0..10] -> peer [10..30]`
pub fn route_text(route: &[RouteHop]) -> String {
    let hops: Vec<String> = route
        .iter()
        .map(|h| format!("{} [{}]", h.peer, h.blocks))
        .collect();
    hops.join(" -> ")
}

pub fn log_route(what: &str, route: &[RouteHop]) {
    tracing::info!("{what}: {}", route_text(route));
}

/// Writes a piece of generated text to stdout at once.
pub fn print_text(piece: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(piece.as_bytes());
    let _ = out.flush();
}
