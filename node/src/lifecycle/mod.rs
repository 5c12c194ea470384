//! A node's life, in named phases, one module each:
//!
//! ```text
//! (open the model file, start the host, place)      once
//! ┌▶ Load ─▶ Measure ─▶ Serve ─▶ Announce ─▶ (refresh, Rebalance checks) ─▶ Drain ─┐
//! └──────────────────────────── move to better blocks ◀──────────────────────────────┤
//!                                                              shutdown ─▶ Leave ◀───┘
//! ```
//!
//! A node says JOINING before it loads, so nodes starting together see each other's choices;
//! says ONLINE only once it serves; and on the way out refuses new work, says OFFLINE, gives
//! its sessions time to move, and stops its tasks in the reverse order of their start (the
//! sessions, then the status page, then the network, whose task is awaited).

mod drain;
mod leave;
mod load;
mod measure;
mod place;
mod rebalance;
mod serve;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use model::fingerprint::short_hex;
use proto::v1::ServerState;
use swarm::load::Load;
use swarm::status::ModelInfo;
use tokio_util::sync::CancellationToken;

use crate::announce::{Announcer, Speed};
use crate::config::JoinConfig;
use crate::error::JoinError;
use crate::metrics::NodeMetrics;

pub use load::ModelFile;

/// The phases of a node's life, as its logs name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the weights of the chosen blocks.
    Load,
    /// Timing them, for the speed it announces.
    Measure,
    /// Taking sessions: compute thread and inference protocol up.
    Serve,
    /// Telling the DHT what it serves (JOINING, ONLINE, refreshes).
    Announce,
    /// Checking whether other blocks would make the swarm faster.
    Rebalance,
    /// Refusing new work, OFFLINE, waiting for its sessions to move.
    Drain,
    /// Stopping the status page and the network, in that order.
    Leave,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Measure => "measure",
            Phase::Serve => "serve",
            Phase::Announce => "announce",
            Phase::Rebalance => "rebalance",
            Phase::Drain => "drain",
            Phase::Leave => "leave",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn enter(phase: Phase, blocks: &Range<usize>) {
    tracing::debug!(%phase, "blocks {}..{}", blocks.start, blocks.end);
}

/// Why a node stopped serving its current range.
enum Outcome {
    Shutdown,
    Move(Range<usize>),
}

/// Serves blocks of the model, chosen by `config.blocks`, until `shutdown`.
pub async fn run_join(config: JoinConfig, shutdown: CancellationToken) -> Result<(), JoinError> {
    let model = ModelFile::open(&config)?;
    tracing::info!(
        model = %short_hex(&model.fingerprint),
        "joining with {} block(s)",
        model.count
    );
    let metrics = Arc::new(NodeMetrics::default());
    let info = ModelInfo::new(
        ModelInfo::id_of(&config.model),
        &model.fingerprint,
        &model.spec,
    );
    let (background, addrs) = leave::Background::start(&config, &model, info, &metrics).await?;
    let announcer = Announcer {
        net: background.net().clone(),
        fp: model.fingerprint,
        addrs,
        interval: config.announce_interval,
    };
    let served = serve_ranges(&config, &model, &announcer, &metrics, &shutdown).await;
    background.leave().await;
    served
}

/// Places the node, then serves one range after another until shutdown.
async fn serve_ranges(
    config: &JoinConfig,
    model: &ModelFile,
    announcer: &Announcer,
    metrics: &Arc<NodeMetrics>,
    shutdown: &CancellationToken,
) -> Result<(), JoinError> {
    // Let the first listen addresses and bootstrap connections settle before announcing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut range = place::initial(config, model, &announcer.net).await?;
    loop {
        match serve_range(config, model, announcer, &range, metrics, shutdown).await? {
            Outcome::Shutdown => return Ok(()),
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
}

/// One range's life: load, measure, serve, announce and keep serving until shutdown or until
/// moving would strengthen the swarm; then drain it.
async fn serve_range(
    config: &JoinConfig,
    model: &ModelFile,
    announcer: &Announcer,
    range: &Range<usize>,
    metrics: &Arc<NodeMetrics>,
    shutdown: &CancellationToken,
) -> Result<Outcome, JoinError> {
    metrics.block_start.set(range.start as i64);
    metrics.block_end.set(0);
    enter(Phase::Announce, range);
    announcer
        .announce(
            range,
            ServerState::Joining,
            Speed::default(),
            0,
            Load::default(),
        )
        .await;
    enter(Phase::Load, range);
    let stack = load::blocks(model, range)?;
    enter(Phase::Measure, range);
    let speed = measure::speed(&stack)?;
    enter(Phase::Serve, range);
    let serving = serve::Serving::start(config, model, announcer, range, stack, speed, metrics)?;
    enter(Phase::Announce, range);
    serving.announce_online(announcer).await;
    // Healthy from the first announcement as serving, not only from the first refresh (a
    // whole announce interval later).
    crate::health::touch(config.health_file.as_deref());
    let outcome = serving.run(config, model, announcer, shutdown).await;
    enter(Phase::Drain, range);
    drain::drain(serving, config, announcer).await;
    Ok(outcome)
}
