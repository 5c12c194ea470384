//! Model compute on a dedicated OS thread, behind an async handle.
//!
//! The thread owns the blocks and every session's KV cache, so no lock guards the math and a
//! session's cache is touched by one thread only. Requests arrive over a channel and are
//! answered through one-shot replies; the session budget (count and KV tokens) is enforced here,
//! where the memory is actually allocated.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    Close {
        id: SessionId,
    },
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
    tx: std::sync::mpsc::Sender<Job>,
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
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let stats = Arc::new(ComputeStats::default());
        let st = stats.clone();
        metrics
            .kv_cache_capacity_tokens
            .set(limits.cache_tokens as i64);
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || serve(stack, limits, rx, st, metrics))?;
        Ok(Self { tx, stats, limits })
    }

    pub async fn open(
        &self,
        span: Range<usize>,
        max_length: usize,
    ) -> Result<SessionId, ComputeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Open {
                span,
                max_length,
                reply,
            })
            .map_err(|_| ComputeError::Stopped)?;
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
        self.tx
            .send(Job::Step {
                id,
                pos,
                hidden,
                reply,
            })
            .map_err(|_| ComputeError::Stopped)?;
        rx.await.map_err(|_| ComputeError::Stopped)?
    }

    pub fn close(&self, id: SessionId) {
        let _ = self.tx.send(Job::Close { id });
    }

    pub fn free_cache_tokens(&self) -> u64 {
        (self.limits.cache_tokens as u64)
            .saturating_sub(self.stats.used_cache_tokens.load(Ordering::Relaxed))
    }
}

fn serve(
    stack: BlockStack,
    limits: ComputeLimits,
    rx: std::sync::mpsc::Receiver<Job>,
    stats: Arc<ComputeStats>,
    metrics: Arc<NodeMetrics>,
) {
    let mut sessions: HashMap<SessionId, Session> = HashMap::new();
    let mut next_id: SessionId = 1;
    let mut used = 0usize;
    let mut kv_bytes = 0usize;
    while let Ok(job) = rx.recv() {
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
            Job::Close { id } => {
                if let Some(s) = sessions.remove(&id) {
                    used -= s.max_length;
                    kv_bytes -= s.kv.bytes();
                }
            }
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
