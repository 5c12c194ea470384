//! Serve: the compute thread and the inference protocol up for one range, then the steady
//! state of a serving node: refreshing its announcement, touching the health file, and now and
//! then asking whether it should move.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use model::BlockStack;
use proto::v1::ServerState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{enter, measure, rebalance, ModelFile, Outcome, Phase};
use crate::announce::{Announcer, Speed};
use crate::compute::{fair_share, ComputeHandle, ComputeLimits};
use crate::config::JoinConfig;
use crate::error::JoinError;
use crate::metrics::NodeMetrics;
use crate::server::{accept_loop, accept_push_loop, Inboxes, ServeContext};

/// What one peer may hold of `total`: as configured (never more than the whole), or else its
/// fair share.
fn per_peer(configured: Option<usize>, total: usize) -> usize {
    configured.map_or_else(|| fair_share(total), |n| n.clamp(1, total.max(1)))
}

/// A range being served: what its sessions share, and the tasks that serve them (the accept
/// loop and one per session), all ended by `stop`.
pub struct Serving {
    pub range: Range<usize>,
    pub speed: Speed,
    pub ctx: Arc<ServeContext>,
    pub compute: ComputeHandle,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

impl Serving {
    pub fn start(
        config: &JoinConfig,
        model: &ModelFile,
        announcer: &Announcer,
        range: &Range<usize>,
        stack: BlockStack,
        speed: Speed,
        metrics: &Arc<NodeMetrics>,
    ) -> Result<Self, JoinError> {
        #[cfg(feature = "fault-injection")]
        let speed = match config.fault {
            crate::Fault::None => speed,
            _ => Speed {
                decode_ms_per_block: speed.decode_ms_per_block / 10.0,
                ..speed
            },
        };
        let prefill_chunk = config.prefill_chunk.unwrap_or_else(|| {
            ComputeLimits::prefill_chunk_for(measure::prefill_ms_per_row(&speed, range.len()))
        });
        tracing::info!(prefill_chunk, "prompt rows per batch");
        let compute = ComputeHandle::spawn(
            stack,
            ComputeLimits {
                max_sessions: config.max_sessions,
                cache_tokens: config.cache_tokens,
                max_sessions_per_peer: per_peer(config.max_sessions_per_peer, config.max_sessions),
                cache_tokens_per_peer: per_peer(config.cache_tokens_per_peer, config.cache_tokens),
                prefill_chunk,
                adaptive_chunk: config.prefill_chunk.is_none(),
            },
            metrics.clone(),
        )?;
        metrics.block_end.set(range.end as i64);
        let ctx = Arc::new(ServeContext {
            fingerprint: model.fingerprint,
            blocks: range.clone(),
            block_count: u32::try_from(model.spec.block_count).unwrap_or(u32::MAX),
            dim: model.spec.embedding_length,
            context_length: model.spec.context_length,
            compute: compute.clone(),
            idle_timeout: config.idle_timeout,
            max_step_tokens: config.max_step_tokens,
            fault: config.fault,
            leaving: AtomicBool::new(false),
            net: announcer.net.clone(),
            inboxes: Inboxes::default(),
        });
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        tasks.spawn(accept_loop(
            announcer.net.stream_control(),
            ctx.clone(),
            tasks.clone(),
            stop.clone(),
        ));
        tasks.spawn(accept_push_loop(
            announcer.net.stream_control(),
            ctx.clone(),
            tasks.clone(),
            stop.clone(),
        ));
        Ok(Self {
            range: range.clone(),
            speed,
            ctx,
            compute,
            tasks,
            stop,
        })
    }

    /// Announces ONLINE, and says so on stdout (scripts wait for the line).
    pub async fn announce_online(&self, announcer: &Announcer) {
        let range = &self.range;
        announcer
            .announce(
                range,
                ServerState::Online,
                self.speed,
                self.compute.free_cache_tokens(),
                self.compute.load(),
            )
            .await;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "serving blocks {}..{}", range.start, range.end);
            let _ = out.flush();
        }
        tracing::info!("serving blocks {}..{}", range.start, range.end);
    }

    /// Keeps the range announced until `shutdown`, or until a rebalance check says moving
    /// would strengthen the swarm.
    pub async fn run(
        &self,
        config: &JoinConfig,
        model: &ModelFile,
        announcer: &Announcer,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let mut refresh = tokio::time::interval(config.announce_interval);
        refresh.tick().await;
        let far = Duration::from_secs(365 * 24 * 3600);
        let every = config.rebalance_interval.unwrap_or(far);
        let mut check_at = rebalance::next_check(every);
        let mut probes = crate::probe::Probes::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Outcome::Shutdown,
                _ = refresh.tick() => {
                    announcer
                        .announce(&self.range, ServerState::Online, self.speed, self.compute.free_cache_tokens(), self.compute.load())
                        .await;
                    crate::health::touch(config.health_file.as_deref());
                }
                _ = tokio::time::sleep_until(check_at), if config.rebalance_interval.is_some() => {
                    check_at = rebalance::next_check(every);
                    enter(Phase::Rebalance, &self.range);
                    if let Some(to) = rebalance::better_range(config, model, announcer, &mut probes).await {
                        return Outcome::Move(to);
                    }
                }
            }
        }
    }
}
