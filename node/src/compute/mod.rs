//! Model compute on a dedicated OS thread, behind an async handle.
//!
//! The thread owns the blocks and every session's KV cache, so no lock guards the math and a
//! session's cache is touched by one thread only. Requests arrive over a channel and are
//! answered through one-shot replies; the session budget (count and KV tokens) is enforced here,
//! where the memory is actually allocated.
//!
//! The request queue is bounded: a node flooded with requests answers the ones it has no room
//! for at once with [`ComputeError::Busy`] (BUSY on the wire, which clients retry elsewhere)
//! instead of queueing work, and memory, without limit. Closes do not go through that queue:
//! freeing a session's cache must never be refused, so they have a channel of their own.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};

use model::{BlockStack, Hidden, ModelError, SessionKv};
use tokio::sync::oneshot;

use crate::metrics::NodeMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("no room for {wanted} more cached tokens ({free} free of {total})")]
    CacheFull {
        wanted: usize,
        free: usize,
        total: usize,
    },
    #[error("already serving {0} sessions, the most this node takes")]
    TooManySessions(usize),
    #[error("the compute queue is full ({queued} requests waiting); try again")]
    Busy { queued: usize },
    #[error("unknown session")]
    UnknownSession,
    #[error("position {got} does not continue the session, which holds {len} tokens")]
    BadPosition { got: usize, len: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the compute thread has stopped")]
    Stopped,
}

pub type SessionId = u64;

#[derive(Clone, Copy, Debug)]
pub struct ComputeLimits {
    pub max_sessions: usize,
    /// KV-cache positions this node holds for all sessions together (each on every block of
    /// its span).
    pub cache_tokens: usize,
}

impl ComputeLimits {
    /// Requests that may wait for the compute thread. A session has at most one step in
    /// flight (its stream is request-answer), so twice the session count leaves room for as
    /// many opens racing in; beyond that, the node is overloaded and says so.
    pub fn queue_depth(&self) -> usize {
        self.max_sessions.max(1).saturating_mul(2)
    }
}

enum Job {
    Open {
        span: Range<usize>,
        max_length: usize,
        reply: oneshot::Sender<Result<SessionId, ComputeError>>,
    },
    Step {
        id: SessionId,
        pos: usize,
        hidden: Hidden,
        reply: oneshot::Sender<Result<(Hidden, Duration), ComputeError>>,
    },
    /// Wakes the thread to free the sessions waiting on the close channel.
    Closed,
}

/// Counters other tasks read without asking the thread (announcements, status).
#[derive(Default)]
pub struct ComputeStats {
    pub used_cache_tokens: AtomicU64,
    pub sessions: AtomicU64,
    pub steps: AtomicU64,
}

#[derive(Clone)]
pub struct ComputeHandle {
    tx: SyncSender<Job>,
    closes: Sender<SessionId>,
    pub stats: Arc<ComputeStats>,
    pub limits: ComputeLimits,
}

struct Session {
    span: Range<usize>,
    kv: SessionKv,
    max_length: usize,
}

impl ComputeHandle {
    /// Starts the compute thread; it ends when every handle is dropped.
    pub fn spawn(
        stack: BlockStack,
        limits: ComputeLimits,
        metrics: Arc<NodeMetrics>,
    ) -> std::io::Result<Self> {
        let (handle, queue) = Self::queue(limits);
        let st = handle.stats.clone();
        metrics
            .kv_cache_capacity_tokens
            .set(limits.cache_tokens as i64);
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || serve(stack, limits, queue, st, metrics))?;
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

    pub async fn open(
        &self,
        span: Range<usize>,
        max_length: usize,
    ) -> Result<SessionId, ComputeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Open {
            span,
            max_length,
            reply,
        })?;
        rx.await.map_err(|_| ComputeError::Stopped)?
    }

    /// Runs `hidden` at `pos` through the session's blocks; returns the output and compute time.
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

    /// Frees the session. Never refused: when the queue is full the thread is busy and takes
    /// the close before its next job anyway, so the wake-up may be dropped.
    pub fn close(&self, id: SessionId) {
        if self.closes.send(id).is_ok() {
            let _ = self.tx.try_send(Job::Closed);
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

fn serve(
    stack: BlockStack,
    limits: ComputeLimits,
    queue: Queue,
    stats: Arc<ComputeStats>,
    metrics: Arc<NodeMetrics>,
) {
    let mut sessions: HashMap<SessionId, Session> = HashMap::new();
    let mut next_id: SessionId = 1;
    let mut used = 0usize;
    let mut kv_bytes = 0usize;
    while let Ok(job) = queue.jobs.recv() {
        // Closes first: a cache freed now may be what the next open needs.
        while let Ok(id) = queue.closed.try_recv() {
            if let Some(s) = sessions.remove(&id) {
                used -= s.max_length;
                kv_bytes -= s.kv.bytes();
            }
        }
        match job {
            Job::Open {
                span,
                max_length,
                reply,
            } => {
                let res = if sessions.len() >= limits.max_sessions {
                    Err(ComputeError::TooManySessions(limits.max_sessions))
                } else if used + max_length > limits.cache_tokens {
                    Err(ComputeError::CacheFull {
                        wanted: max_length,
                        free: limits.cache_tokens - used,
                        total: limits.cache_tokens,
                    })
                } else {
                    let id = next_id;
                    next_id += 1;
                    used += max_length;
                    let kv = stack.new_cache(span.clone(), max_length);
                    kv_bytes += kv.bytes();
                    metrics.sessions_opened.inc();
                    sessions.insert(
                        id,
                        Session {
                            span,
                            kv,
                            max_length,
                        },
                    );
                    Ok(id)
                };
                if let Err(e) = &res {
                    let reason = match e {
                        ComputeError::TooManySessions(_) => "sessions_full",
                        ComputeError::CacheFull { .. } => "cache_full",
                        _ => "other",
                    };
                    metrics
                        .sessions_refused
                        .get_or_create(&vec![("reason", reason)])
                        .inc();
                }
                let _ = reply.send(res);
            }
            Job::Step {
                id,
                pos,
                mut hidden,
                reply,
            } => {
                let res = match sessions.get_mut(&id) {
                    None => Err(ComputeError::UnknownSession),
                    Some(s) if pos > s.kv.len() => Err(ComputeError::BadPosition {
                        got: pos,
                        len: s.kv.len(),
                    }),
                    Some(s) => {
                        // A position inside the cache rolls it back: the client is replaying.
                        s.kv.truncate(pos);
                        let t = Instant::now();
                        stack
                            .forward_span(s.span.clone(), &mut hidden, &mut s.kv, pos)
                            .map(|()| (hidden, t.elapsed()))
                            .map_err(ComputeError::from)
                    }
                };
                stats.steps.fetch_add(1, Ordering::Relaxed);
                match &res {
                    Ok((out, took)) => {
                        metrics.steps.inc();
                        metrics.tokens.inc_by(out.tokens as u64);
                        metrics.step_seconds.observe(took.as_secs_f64());
                        metrics.rate.add(out.tokens as u64);
                    }
                    Err(_) => {
                        metrics.step_errors.inc();
                    }
                }
                let _ = reply.send(res);
            }
            Job::Closed => {}
        }
        stats
            .used_cache_tokens
            .store(used as u64, Ordering::Relaxed);
        stats
            .sessions
            .store(sessions.len() as u64, Ordering::Relaxed);
        metrics.sessions.set(sessions.len() as i64);
        metrics.kv_cache_bytes.set(kv_bytes as i64);
        metrics.kv_cache_reserved_tokens.set(used as i64);
    }
    // The thread ends with its sessions: their caches are gone.
    metrics.sessions.set(0);
    metrics.kv_cache_bytes.set(0);
    metrics.kv_cache_reserved_tokens.set(0);
}

/// Times the stack on synthetic model-scale inputs: a `prefill_tokens` prefill and
/// `decode_steps` one-token steps. Returns milliseconds per block for one decode step and for
/// the prefill. Used by `bench` and by `join`, which announces the result.
pub fn measure_speed(
    stack: &BlockStack,
    prefill_tokens: usize,
    decode_steps: usize,
) -> Result<(f64, f64), ModelError> {
    let d = stack.spec().embedding_length;
    let range = stack.range();
    let synth = |n: usize, seed: usize| -> Hidden {
        let data = (0..n * d)
            .map(|i| ((i.wrapping_add(seed).wrapping_mul(2654435761)) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        Hidden {
            tokens: n,
            dim: d,
            data,
        }
    };
    let mut kv = stack.new_cache(range.clone(), prefill_tokens + decode_steps);
    let mut x = synth(prefill_tokens, 0);
    let t0 = Instant::now();
    stack.forward(&mut x, &mut kv, 0)?;
    let prefill = t0.elapsed();
    let mut steps = Duration::ZERO;
    for i in 0..decode_steps {
        let mut x = synth(1, i + 1);
        let t = Instant::now();
        stack.forward(&mut x, &mut kv, prefill_tokens + i)?;
        steps += t.elapsed();
    }
    let blocks = range.len().max(1) as f64;
    let decode_ms = steps.as_secs_f64() * 1e3 / decode_steps.max(1) as f64 / blocks;
    Ok((decode_ms, prefill.as_secs_f64() * 1e3 / blocks))
}

/// Bytes of the tensors of block `index` in the file (what serving one block costs in weights).
pub fn block_weight_bytes(file: &model::GgufFile, index: usize) -> Result<u64, ModelError> {
    let prefix = format!("blk.{index}.");
    Ok(file
        .tensors()?
        .iter()
        .filter(|v| v.name.starts_with(&prefix))
        .map(|v| v.len_bytes() as u64)
        .sum())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn limits(max_sessions: usize) -> ComputeLimits {
        ComputeLimits {
            max_sessions,
            cache_tokens: 1024,
        }
    }

    #[test]
    fn a_full_queue_answers_busy_at_once() {
        // No thread serves this queue, so every request stays queued.
        let (handle, queue) = ComputeHandle::queue(limits(2));
        let depth = handle.limits.queue_depth();
        assert_eq!(depth, 4);
        for _ in 0..depth {
            // Polled once: the request is queued, and then waits for an answer that never comes.
            assert!(handle.open(0..1, 8).now_or_never().is_none());
        }
        let refused = handle.open(0..1, 8).now_or_never();
        assert!(
            matches!(refused, Some(Err(ComputeError::Busy { queued: 4 }))),
            "{refused:?}"
        );
        let step = handle.step(1, 0, Hidden::new(1, 1, vec![0.0]).unwrap());
        assert!(matches!(
            step.now_or_never(),
            Some(Err(ComputeError::Busy { .. }))
        ));
        // Closes still get through, to be taken before the next job.
        handle.close(7);
        assert_eq!(queue.closed.try_recv().ok(), Some(7));
        drop(queue);
        assert!(matches!(
            handle.open(0..1, 8).now_or_never(),
            Some(Err(ComputeError::Stopped))
        ));
    }
}
