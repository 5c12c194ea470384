//! Model compute on a dedicated OS thread, behind an async handle.
//!
//! The thread owns the blocks and every session's KV cache, so no lock guards the math and a
//! session's cache is touched by one thread only. Requests arrive over a channel and are
//! answered through one-shot replies; the session budget (count and KV positions) is enforced
//! there, where the memory is actually allocated. How the thread turns many sessions' steps into
//! batched products is the [`scheduler`]'s job.
//!
//! The request queue is bounded: a node flooded with requests answers the ones it has no room
//! for at once with [`ComputeError::Busy`] (BUSY on the wire, which clients retry elsewhere)
//! instead of queueing work, and memory, without limit. Closes do not go through that queue:
//! freeing a session's cache must never be refused, so they have a channel of their own.

mod scheduler;
mod speed;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use model::{BlockStack, Hidden, ModelError};
use tokio::sync::oneshot;

pub use speed::measure_speed;

use crate::metrics::NodeMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("no room for {wanted} more cached positions ({free} free of {total})")]
    CacheFull {
        wanted: usize,
        free: usize,
        total: usize,
    },
    #[error("already serving {0} sessions, the most this node takes")]
    TooManySessions(usize),
    /// One remote peer holds its share of the session slots; others' opens still fit.
    #[error("this peer already holds {held} sessions here, the most one peer may")]
    PeerSessions { held: usize },
    /// One remote peer's sessions hold its share of the KV cache.
    #[error("no room for {wanted} more cached positions for this peer ({held} held of the {limit} one peer may hold)")]
    PeerCacheFull {
        wanted: usize,
        held: usize,
        limit: usize,
    },
    #[error("the compute queue is full ({queued} requests waiting); try again")]
    Busy { queued: usize },
    #[error("unknown session")]
    UnknownSession,
    #[error("position {got} does not continue the session, which holds {len} tokens")]
    BadPosition { got: usize, len: usize },
    #[error("a step of this session is still running; send the next one after its answer")]
    StepInFlight,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the batched step failed: {0}")]
    BatchFailed(String),
    #[error("the compute thread has stopped")]
    Stopped,
}

pub type SessionId = u64;

#[derive(Clone, Copy, Debug)]
pub struct ComputeLimits {
    pub max_sessions: usize,
    /// KV-cache positions this node holds for all sessions together (each on every block of
    /// its span), counted in the pages actually allocated.
    pub cache_tokens: usize,
    /// Sessions one remote peer may hold at once. Below `max_sessions`, so that one peer
    /// opening sessions in a loop cannot lock every other peer out; not much below it, because
    /// a gateway reaches this node as one peer for all of its users (see [`fair_share`]).
    pub max_sessions_per_peer: usize,
    /// KV-cache positions one remote peer's sessions may hold together, for the same reason.
    pub cache_tokens_per_peer: usize,
    /// Most prompt rows one scheduler iteration runs: a longer step is computed in chunks of
    /// this size with other sessions' decode steps between them.
    pub prefill_chunk: usize,
    /// Keep chunks at about [`PREFILL_CHUNK_MS`] of measured compute by resizing them after
    /// each full chunk (`prefill_chunk` is then only the first size). A chunk's cost grows with
    /// its position (attention reads the whole history), so a size that takes 20 ms at the
    /// start of a prompt takes several times that thousands of positions in.
    pub adaptive_chunk: bool,
}

impl ComputeLimits {
    /// Requests that may wait for the compute thread. A session has at most one step in
    /// flight (its stream is request-answer), so twice the session count leaves room for as
    /// many opens racing in; beyond that, the node is overloaded and says so.
    pub fn queue_depth(&self) -> usize {
        self.max_sessions.max(1).saturating_mul(2)
    }

    /// The prefill chunk for blocks that run a prompt row in `ms_per_row` (all of this node's
    /// blocks together): about [`PREFILL_CHUNK_MS`] of work, so that a long prompt delays the
    /// decode steps batched with it by about that much per chunk. Bounded below because very
    /// small chunks waste the batched product, and above because a chunk's activations are
    /// allocated at once.
    pub fn prefill_chunk_for(ms_per_row: f64) -> usize {
        if !ms_per_row.is_finite() || ms_per_row <= 0.0 {
            return MAX_PREFILL_CHUNK;
        }
        ((PREFILL_CHUNK_MS / ms_per_row) as usize).clamp(MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK)
    }
}

/// What one peer may hold of `total` (sessions or cache positions) unless told otherwise:
/// three quarters, rounded down, and at least one. A lone gateway, which reaches a node as one
/// peer for all of its users, still gets most of the node; one peer that takes all it can
/// leaves a quarter for everybody else. Sharing out exactly among the peers present would need
/// taking sessions back from a peer when another arrives, which a node cannot do without
/// breaking generations; a fixed reserve needs nothing of the kind.
pub fn fair_share(total: usize) -> usize {
    (total - total.div_ceil(4)).max(1)
}

/// Target compute time of one prefill chunk: what a decode step batched with a chunk waits for
/// at most at this node. Smaller favours the other users' latency, larger the long prompt's.
pub const PREFILL_CHUNK_MS: f64 = 20.0;
pub const MIN_PREFILL_CHUNK: usize = 8;
pub const MAX_PREFILL_CHUNK: usize = 512;

enum Job {
    Open {
        span: Range<usize>,
        max_length: usize,
        peer: PeerId,
        reply: oneshot::Sender<Result<SessionId, ComputeError>>,
    },
    Step {
        id: SessionId,
        pos: usize,
        hidden: Hidden,
        reply: oneshot::Sender<StepResult>,
    },
    /// Wakes the thread to free the sessions waiting on the close channel.
    Closed,
}

/// A step's output and the compute time of the iterations it took part in.
type StepResult = Result<(Hidden, Duration), ComputeError>;

/// Counters other tasks read without asking the thread (announcements, status).
#[derive(Default)]
pub struct ComputeStats {
    pub used_cache_tokens: AtomicU64,
    pub sessions: AtomicU64,
    pub steps: AtomicU64,
    /// Sessions with a step received and not answered yet, after the last iteration.
    pub waiting_steps: AtomicU64,
}

#[derive(Clone)]
pub struct ComputeHandle {
    tx: SyncSender<Job>,
    closes: Sender<SessionId>,
    pub stats: Arc<ComputeStats>,
    pub limits: ComputeLimits,
}

impl ComputeHandle {
    /// Starts the compute thread; it ends when every handle is dropped.
    pub fn spawn(
        stack: BlockStack,
        limits: ComputeLimits,
        metrics: Arc<NodeMetrics>,
    ) -> std::io::Result<Self> {
        let (handle, queue) = Self::queue(limits);
        let stats = handle.stats.clone();
        metrics
            .kv_cache_capacity_tokens
            .set(limits.cache_tokens as i64);
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || scheduler::Scheduler::new(stack, limits, stats, metrics).run(queue))?;
        Ok(handle)
    }

    /// A handle and the queue it feeds, for the thread to serve.
    fn queue(limits: ComputeLimits) -> (Self, Queue) {
        let (tx, jobs) = std::sync::mpsc::sync_channel(limits.queue_depth());
        let (closes, closed) = std::sync::mpsc::channel();
        let handle = Self {
            tx,
            closes,
            stats: Arc::new(ComputeStats::default()),
            limits,
        };
        (handle, Queue { jobs, closed })
    }

    /// Queues `job` if there is room; never waits for the thread.
    fn submit(&self, job: Job) -> Result<(), ComputeError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => ComputeError::Busy {
                queued: self.limits.queue_depth(),
            },
            TrySendError::Disconnected(_) => ComputeError::Stopped,
        })
    }

    /// Opens a session of blocks `span` for `peer`, who is served its fair share of prefill
    /// time against other peers.
    pub async fn open(
        &self,
        span: Range<usize>,
        max_length: usize,
        peer: PeerId,
    ) -> Result<SessionId, ComputeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Open {
            span,
            max_length,
            peer,
            reply,
        })?;
        rx.await.map_err(|_| ComputeError::Stopped)?
    }

    /// Runs `hidden` at `pos` through the session's blocks; returns the output and compute
    /// time. Dropping the future withdraws the step: the thread skips work nobody waits for.
    pub async fn step(
        &self,
        id: SessionId,
        pos: usize,
        hidden: Hidden,
    ) -> Result<(Hidden, Duration), ComputeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Step {
            id,
            pos,
            hidden,
            reply,
        })?;
        rx.await.map_err(|_| ComputeError::Stopped)?
    }

    /// Frees the session and drops its queued work. Never refused: when the queue is full the
    /// thread is busy and takes the close before its next iteration anyway, so the wake-up may
    /// be dropped.
    pub fn close(&self, id: SessionId) {
        if self.closes.send(id).is_ok() {
            let _ = self.tx.try_send(Job::Closed);
        }
    }

    /// What this node announces about its load (see `swarm::load`).
    pub fn load(&self) -> swarm::load::Load {
        let count = |a: &AtomicU64| u32::try_from(a.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        swarm::load::Load {
            sessions: count(&self.stats.sessions),
            max_sessions: u32::try_from(self.limits.max_sessions).unwrap_or(u32::MAX),
            waiting_steps: count(&self.stats.waiting_steps),
        }
    }

    pub fn free_cache_tokens(&self) -> u64 {
        (self.limits.cache_tokens as u64)
            .saturating_sub(self.stats.used_cache_tokens.load(Ordering::Relaxed))
    }
}

/// The compute thread's side of a [`ComputeHandle`].
struct Queue {
    jobs: Receiver<Job>,
    closed: Receiver<SessionId>,
}

#[cfg(test)]
mod tests;
