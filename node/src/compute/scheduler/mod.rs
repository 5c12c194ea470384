//! The compute thread's loop: continuous batching of every session's ready step.
//!
//! Each iteration runs, per block, one batched product over the rows of many sessions: the
//! whole of every small step (decode steps are one row) plus one chunk of at most
//! [`ComputeLimits::prefill_chunk`] rows of a long prompt. Sessions join the batch when their
//! step arrives and leave when it is answered, between iterations. A long prompt is therefore
//! run in chunks with everybody's decode steps flowing between them, and chunks go to the
//! peers with prompts waiting in turn, so one peer's prompts cannot starve another's.
//!
//! With adaptive chunks, a decode step must not wait long behind a prompt: while other
//! sessions are decoding (one answered a small step within [`DECODING_WINDOW`]), chunks are
//! sized so that a chunk's iteration costs about what a decode-only iteration costs (measured
//! as they run, contention included), and a decode step that arrives during a chunk runs alone
//! in the next iteration before the next chunk. The decode step then waits for at most one
//! short chunk, and the prompt gets every other iteration however many decode steps come.
//!
//! That chunk is measured in row-blocks (rows times the blocks they go through), not rows: late
//! in a long prompt one row's attention over the history costs several decode steps, so a
//! chunk smaller than a row runs one row through only some of the span's blocks, and the next
//! chunk carries it on from the block where it stopped. The layers it went through hold one
//! more position than the rest until it reaches the end of the span; nothing reads the cache
//! of a session whose step is still running, and a rollback truncates every layer alike.
//!
//! A session's numbers do not depend on what it is batched with, or on how its prompt is cut
//! into chunks: every kernel computes each row on its own, and attention of a row reads only
//! its own session's cache (`model`'s batch and chunking tests hold it to that, bit for bit).
//!
//! KV memory is taken in pages as sessions grow and charged against `cache_tokens` before the
//! rows that need it run; a step that would overdraw it fails alone with CACHE_FULL (clients
//! reroute that span), and closing or withdrawing frees or rolls back at once.
//!
//! Each remote peer is also held to its own share of the session slots and of the cache
//! ([`ComputeLimits::max_sessions_per_peer`], [`ComputeLimits::cache_tokens_per_peer`]):
//! whatever one peer opens or grows, the rest stays for the others. Its refusals carry the same
//! codes as a full node's, so the refused client reroutes.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use model::{BatchEntry, BlockStack, Hidden, SessionKv};
use tokio::sync::oneshot;

use self::chunk::{resized, Budget};
use super::{
    ComputeError, ComputeLimits, ComputeStats, Job, Queue, SessionId, StepResult,
    MAX_PREFILL_CHUNK, MIN_PREFILL_CHUNK, PREFILL_CHUNK_MS,
};
use crate::metrics::NodeMetrics;

/// Steps of at most this many rows ride whole in every iteration: decode steps and short
/// follow-ups cost little and are what other users wait on. Longer steps share the chunk.
const SMALL_STEP: usize = 4;

pub(super) struct Scheduler {
    stack: BlockStack,
    limits: ComputeLimits,
    stats: Arc<ComputeStats>,
    metrics: Arc<NodeMetrics>,
    sessions: HashMap<SessionId, Session>,
    next_id: SessionId,
    /// KV positions allocated to all sessions: what `cache_tokens` bounds.
    used: usize,
    /// What each remote peer with an open session holds: what the per-peer limits bound.
    held: HashMap<PeerId, Held>,
    /// The peer whose prompt got the last chunk; the next chunk goes to the next peer.
    last_prefill_peer: Option<PeerId>,
    /// Prompt rows per iteration while nobody else is decoding (resized as measured when the
    /// limits say so).
    chunk: usize,
    /// Prompt row-blocks (rows times blocks) per iteration while other sessions are decoding:
    /// resized towards [`SHARED_CHUNK_DECODES`] decode-only iterations of work (see
    /// [`Scheduler::sharing`]); below a span's length, one row goes through that many blocks.
    shared_chunk: usize,
    /// The most `shared_chunk` may grow to: the solo chunk's bound over every block held.
    max_shared_chunk: usize,
    /// Wall time of a decode-only iteration (small steps, no prompt rows), as last measured and
    /// smoothed; what a decode step costs here now, contention included.
    decode_ms: Option<f64>,
    /// Whether the last iteration ran prompt rows: with others decoding, a decode-only
    /// iteration goes between two chunks.
    ran_prompt: bool,
}

/// What one iteration ran, for learning its cost.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ran {
    small_rows: usize,
    /// Prompt rows, whole or only through some blocks.
    prompt_rows: usize,
    /// The prompt's work: row-blocks when shared, rows otherwise (the units of the chunk that
    /// applied).
    prompt_work: usize,
    /// Whether the chunk was cut by its budget (not by the end of a prompt): only then does
    /// its time say what a chunk costs.
    full: bool,
    /// Whether other sessions were decoding (the shared chunk applied).
    shared: bool,
}

/// A session that answered a small step this recently, and has no prompt running, is taken to
/// be decoding: prompt chunks are kept small for it until it has been quiet this long.
const DECODING_WINDOW: Duration = Duration::from_secs(1);

/// While others decode, a prompt chunk's iteration aims at this many decode-only iterations'
/// time.
const SHARED_CHUNK_DECODES: f64 = 1.0;

/// Chunk target while others decode before any decode-only iteration has been measured.
const SHARED_CHUNK_MS: f64 = 5.0;

struct Session {
    span: Range<usize>,
    kv: SessionKv,
    peer: PeerId,
    step: Option<Pending>,
    /// When this session's last small step (a decode step) was answered.
    decoded: Option<Instant>,
}

/// One remote peer's sessions and the KV positions allocated to them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Held {
    sessions: usize,
    cache: usize,
}

/// A step being computed, possibly over several iterations.
struct Pending {
    pos: usize,
    input: Hidden,
    /// Rows computed so far; their outputs are in `output`.
    done: usize,
    /// The rows after `done` that went through only the first blocks of the span.
    carry: Option<Carry>,
    output: Vec<f32>,
    compute: Duration,
    queued: Instant,
    reply: oneshot::Sender<StepResult>,
}

impl Pending {
    fn remaining(&self) -> usize {
        self.input.tokens - self.done
    }

    /// Whether the step rides whole in every iteration (a decode step or a short follow-up).
    /// A prompt's last rows stay prompt rows: riding whole, they would hold a decode step for
    /// several rows late in a long prompt.
    fn is_small(&self) -> bool {
        self.input.tokens <= SMALL_STEP
    }
}

/// Prompt rows part of the way through the span: their hidden state after the blocks before
/// `next_block`.
struct Carry {
    hidden: Hidden,
    next_block: usize,
}

/// Rows of one session in one iteration, and the blocks they go through.
#[derive(Clone)]
struct Rows {
    id: SessionId,
    count: usize,
    blocks: Range<usize>,
}

impl Scheduler {
    pub(super) fn new(
        stack: BlockStack,
        limits: ComputeLimits,
        stats: Arc<ComputeStats>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        let blocks = stack.range().len().max(1);
        Self {
            shared_chunk: (limits.prefill_chunk / 4).max(1) * blocks,
            max_shared_chunk: MAX_PREFILL_CHUNK * blocks,
            stack,
            limits,
            stats,
            metrics,
            sessions: HashMap::new(),
            next_id: 1,
            used: 0,
            held: HashMap::new(),
            last_prefill_peer: None,
            chunk: limits.prefill_chunk.max(1),
            decode_ms: None,
            ran_prompt: false,
        }
    }

    /// Serves until every handle is gone. The thread ends with its sessions: their caches are
    /// freed with it.
    pub(super) fn run(mut self, queue: Queue) {
        loop {
            if !self.has_work() {
                match queue.jobs.recv() {
                    Ok(job) => self.take(job, &queue),
                    Err(_) => break,
                }
            }
            let mut disconnected = false;
            loop {
                match queue.jobs.try_recv() {
                    Ok(job) => self.take(job, &queue),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.take_closes(&queue);
            if disconnected {
                break;
            }
            self.iterate();
            self.publish();
        }
        self.metrics.sessions.set(0);
        self.metrics.kv_cache_bytes.set(0);
        self.metrics.kv_cache_reserved_tokens.set(0);
    }

    /// Frees closed sessions. Done before every job, so that an open sent after a close finds
    /// the room that close made (a gateway reuses its slot at once), and a step of a session
    /// already closed is answered as unknown instead of computed for nobody.
    fn take_closes(&mut self, queue: &Queue) {
        while let Ok(id) = queue.closed.try_recv() {
            self.close(id);
        }
    }

    fn has_work(&self) -> bool {
        self.sessions.values().any(|s| s.step.is_some())
    }

    fn take(&mut self, job: Job, queue: &Queue) {
        self.take_closes(queue);
        self.apply(job);
    }

    fn apply(&mut self, job: Job) {
        match job {
            Job::Open {
                span,
                max_length,
                peer,
                reply,
            } => {
                let res = self.open(span, max_length, peer);
                if let Err(e) = &res {
                    let reason = match e {
                        ComputeError::TooManySessions(_) => "sessions_full",
                        ComputeError::CacheFull { .. } => "cache_full",
                        ComputeError::PeerSessions { .. } => "peer_sessions",
                        ComputeError::PeerCacheFull { .. } => "peer_cache",
                        _ => "other",
                    };
                    self.metrics
                        .sessions_refused
                        .get_or_create(&vec![("reason", reason)])
                        .inc();
                }
                let _ = reply.send(res);
            }
            Job::Step {
                id,
                pos,
                hidden,
                reply,
            } => {
                if let Err(e) = self.admit(id, pos, hidden, reply) {
                    self.metrics.step_errors.inc();
                    let _ = e.send();
                }
            }
            Job::Closed => {}
        }
    }

    fn open(
        &mut self,
        span: Range<usize>,
        max_length: usize,
        peer: PeerId,
    ) -> Result<SessionId, ComputeError> {
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(ComputeError::TooManySessions(self.limits.max_sessions));
        }
        let held = self.held.get(&peer).copied().unwrap_or_default();
        if held.sessions >= self.limits.max_sessions_per_peer {
            return Err(ComputeError::PeerSessions {
                held: held.sessions,
            });
        }
        // Checked before anything is allocated: a session whose first page does not fit is
        // refused here, and one that can never fit is refused even on an empty node.
        let first = self.stack.cache_allocation(span.clone(), max_length, 1);
        let total = self.limits.cache_tokens;
        if self.used + first > total || max_length > total {
            return Err(ComputeError::CacheFull {
                wanted: first.max(max_length.min(total + 1)),
                free: total - self.used,
                total,
            });
        }
        // Only what is allocated counts against a peer's share, not the declared maximum: a
        // gateway declares long sessions for all of its users, which rarely grow that far.
        let limit = self.limits.cache_tokens_per_peer;
        if held.cache + first > limit {
            return Err(ComputeError::PeerCacheFull {
                wanted: first,
                held: held.cache,
                limit,
            });
        }
        let kv = self.stack.new_cache(span.clone(), max_length);
        self.used += kv.allocated();
        let h = self.held.entry(peer).or_default();
        h.sessions += 1;
        h.cache += kv.allocated();
        let id = self.next_id;
        self.next_id += 1;
        self.metrics.sessions_opened.inc();
        self.sessions.insert(
            id,
            Session {
                span,
                kv,
                peer,
                step: None,
                decoded: None,
            },
        );
        Ok(id)
    }

    fn admit(
        &mut self,
        id: SessionId,
        pos: usize,
        input: Hidden,
        reply: oneshot::Sender<StepResult>,
    ) -> Result<(), Refusal> {
        let s = match self.sessions.get_mut(&id) {
            None => {
                let error = ComputeError::UnknownSession;
                return Err(Refusal { reply, error });
            }
            Some(s) if s.step.is_some() => {
                let error = ComputeError::StepInFlight;
                return Err(Refusal { reply, error });
            }
            Some(s) if pos > s.kv.len() => {
                let len = s.kv.len();
                let error = ComputeError::BadPosition { got: pos, len };
                return Err(Refusal { reply, error });
            }
            Some(s) => s,
        };
        // A position inside the cache rolls it back: the client is replaying.
        s.kv.truncate(pos);
        s.step = Some(Pending {
            pos,
            output: Vec::with_capacity(input.data.len()),
            input,
            done: 0,
            carry: None,
            compute: Duration::ZERO,
            queued: Instant::now(),
            reply,
        });
        Ok(())
    }

    fn close(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(&id) {
            self.used -= s.kv.allocated();
            if let Some(h) = self.held.get_mut(&s.peer) {
                h.sessions -= 1;
                h.cache -= s.kv.allocated();
                if h.sessions == 0 {
                    self.held.remove(&s.peer);
                }
            }
            if s.step.is_some() {
                self.metrics.steps_withdrawn.inc();
            }
        }
    }

    /// One batched pass over this iteration's rows; with adaptive chunks, its measured time
    /// resizes them.
    fn iterate(&mut self) {
        let started = Instant::now();
        if let Some(ran) = self.run_iteration(started) {
            self.learn(ran, started.elapsed());
        }
    }

    /// Runs one iteration's rows as of `now`; what it ran, if anything.
    fn run_iteration(&mut self, now: Instant) -> Option<Ran> {
        self.drop_withdrawn();
        let (rows, ran) = self.select(now);
        if rows.is_empty() {
            return None;
        }
        let rows = self.reserve(rows);
        let mut groups: BTreeMap<(usize, usize), Vec<Rows>> = BTreeMap::new();
        for r in rows {
            groups
                .entry((r.blocks.start, r.blocks.end))
                .or_default()
                .push(r);
        }
        for ((start, end), rows) in groups {
            self.run_group(start..end, &rows, now);
        }
        Some(ran)
    }

    /// Learns from an iteration that took `took`: a decode-only one measures what a decode
    /// step costs, a full chunk resizes the chunk of its kind towards its target.
    fn learn(&mut self, ran: Ran, took: Duration) {
        if !self.limits.adaptive_chunk {
            return;
        }
        let ms = took.as_secs_f64() * 1e3;
        if ran.prompt_rows == 0 {
            if ran.small_rows > 0 && ms > 0.0 {
                self.decode_ms = Some(self.decode_ms.map_or(ms, |d| (d + ms) / 2.0));
            }
        } else if ran.full {
            if ran.shared {
                let target = self.shared_target();
                let max = self.max_shared_chunk;
                self.shared_chunk = resized(ran.prompt_work, ms, target, 1, max);
            } else {
                self.chunk = resized(
                    ran.prompt_work,
                    ms,
                    PREFILL_CHUNK_MS,
                    MIN_PREFILL_CHUNK,
                    MAX_PREFILL_CHUNK,
                );
            }
        }
    }

    /// What an iteration with a prompt chunk should cost while others decode.
    fn shared_target(&self) -> f64 {
        self.decode_ms
            .map_or(SHARED_CHUNK_MS, |d| d * SHARED_CHUNK_DECODES)
    }

    /// Moves the solo chunk halfway towards the size that would have taken
    /// [`PREFILL_CHUNK_MS`] in the iteration just measured (a full chunk, so the time is the
    /// chunk's).
    #[cfg(test)]
    fn resize_chunk(&mut self, took: Duration) {
        self.chunk = resized(
            self.chunk,
            took.as_secs_f64() * 1e3,
            PREFILL_CHUNK_MS,
            MIN_PREFILL_CHUNK,
            MAX_PREFILL_CHUNK,
        );
    }

    /// Whether sessions other than those running prompts are decoding as of `now`: one has a
    /// small step waiting, or answered one within [`DECODING_WINDOW`] and has no prompt
    /// running. Their next steps will wait for whatever chunk is running when they arrive, so
    /// chunks are kept short while they do.
    fn sharing(&self, now: Instant) -> bool {
        self.sessions.values().any(|s| match &s.step {
            Some(p) => p.is_small(),
            None => s
                .decoded
                .is_some_and(|t| now.saturating_duration_since(t) < DECODING_WINDOW),
        })
    }

    /// Steps whose caller stopped waiting (its stream closed, or the node is draining) are
    /// dropped before any more work is done for them, and their cache is rolled back to where
    /// the step began.
    fn drop_withdrawn(&mut self) {
        for s in self.sessions.values_mut() {
            if s.step.as_ref().is_some_and(|p| p.reply.is_closed()) {
                let p = s.step.take().expect("checked just above");
                s.kv.truncate(p.pos);
                self.metrics.steps_withdrawn.inc();
            }
        }
    }

    /// Every small step whole, then prompt chunks in turn by peer until the chunk budget is
    /// spent. Sorted by session id, so the same work is batched the same way each time.
    ///
    /// With adaptive chunks, the budget depends on who else is waiting: while other sessions
    /// decode ([`Scheduler::sharing`]), it is the shared chunk (about a decode-only
    /// iteration's time, in row-blocks), and a decode step waiting right after a chunk runs
    /// alone first, so that it waits for at most one short chunk; the next iteration is a chunk
    /// again, so prompts keep moving however many decode steps come.
    fn select(&mut self, now: Instant) -> (Vec<Rows>, Ran) {
        let mut rows = Vec::new();
        let mut waiting: BTreeMap<PeerId, (Instant, SessionId)> = BTreeMap::new();
        for (&id, s) in &self.sessions {
            let Some(p) = &s.step else { continue };
            if p.is_small() {
                rows.push(Rows {
                    id,
                    count: p.remaining(),
                    blocks: s.span.clone(),
                });
            } else {
                // A peer's oldest prompt first.
                let e = waiting.entry(s.peer).or_insert((p.queued, id));
                if (p.queued, id) < *e {
                    *e = (p.queued, id);
                }
            }
        }
        let small_rows: usize = rows.iter().map(|r| r.count).sum();
        let shared = self.limits.adaptive_chunk && !waiting.is_empty() && self.sharing(now);
        let mut budget = if shared {
            Budget::RowBlocks(self.shared_chunk)
        } else {
            Budget::Rows(self.chunk)
        };
        if shared && small_rows > 0 && self.ran_prompt {
            budget = Budget::RowBlocks(0);
        }
        // The peers with prompts, starting after the one served last.
        let peers: Vec<PeerId> = match self.last_prefill_peer {
            Some(last) => waiting
                .range(last..)
                .filter(|(p, _)| **p != last)
                .chain(waiting.range(..=last))
                .map(|(p, _)| *p)
                .collect(),
            None => waiting.keys().copied().collect(),
        };
        let (mut prompt_rows, mut prompt_work, mut full) = (0, 0, false);
        for peer in peers {
            if budget.spent() {
                break;
            }
            let id = waiting[&peer].1;
            let s = &self.sessions[&id];
            let p = s.step.as_ref().expect("waiting sessions have a step");
            let (cut, work, bound) = budget.cut(p, &s.span);
            budget.take(work);
            prompt_rows += cut.count;
            prompt_work += work;
            full |= bound;
            rows.push(Rows { id, ..cut });
            self.last_prefill_peer = Some(peer);
            self.metrics.prefill_chunks.inc();
        }
        rows.sort_by_key(|r| r.id);
        self.ran_prompt = prompt_rows > 0;
        let ran = Ran {
            small_rows,
            prompt_rows,
            prompt_work,
            full,
            shared,
        };
        (rows, ran)
    }

    /// Takes the KV pages the selected rows need from the budget and from their peer's share,
    /// failing the steps that either cannot hold; returns the rows that may run.
    fn reserve(&mut self, rows: Vec<Rows>) -> Vec<Rows> {
        let total = self.limits.cache_tokens;
        let limit = self.limits.cache_tokens_per_peer;
        let mut ok = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(s) = self.sessions.get_mut(&r.id) else {
                continue;
            };
            let Some(p) = &s.step else { continue };
            // Rows carried on from earlier blocks were charged when they started.
            let end = p.pos + p.done + r.count;
            let before = s.kv.allocated();
            let wanted = s.kv.allocated_for(end) - before;
            let held = self.held.entry(s.peer).or_default();
            let refused = if self.used + wanted > total {
                Some(ComputeError::CacheFull {
                    wanted,
                    free: total - self.used,
                    total,
                })
            } else if held.cache + wanted > limit {
                Some(ComputeError::PeerCacheFull {
                    wanted,
                    held: held.cache,
                    limit,
                })
            } else {
                None
            };
            if let Some(error) = refused {
                fail(s, &self.metrics, error);
                continue;
            }
            s.kv.grow_to(end);
            let grown = s.kv.allocated() - before;
            self.used += grown;
            held.cache += grown;
            ok.push(r);
        }
        ok
    }

    /// Runs one batched product over blocks `blocks` for sessions whose rows go through just
    /// those blocks now, and hands out the rows: to the step's output at the end of a
    /// session's span, to its carry before it.
    fn run_group(&mut self, blocks: Range<usize>, rows: &[Rows], now: Instant) {
        let mut taken: Vec<Taken> = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(mut s) = self.sessions.remove(&r.id) else {
                continue;
            };
            let p = s.step.as_ref().expect("selected sessions have a step");
            let pos = p.pos + p.done;
            // Only the caches of these blocks go into the product; the rest stay put.
            let layers = blocks.start - s.span.start..blocks.end - s.span.start;
            let part = (blocks != s.span).then(|| {
                let capacity = s.kv.capacity();
                SessionKv::from_layers(s.kv.layers.drain(layers.clone()).collect(), capacity)
            });
            let kv = part.as_ref().unwrap_or(&s.kv);
            if let Err(e) = self.stack.check_step(&blocks, r.count, kv, pos) {
                if let Some(part) = part {
                    s.kv.layers.splice(layers.start..layers.start, part.layers);
                }
                fail(&mut s, &self.metrics, e.into());
                self.sessions.insert(r.id, s);
                continue;
            }
            taken.push(Taken {
                rows: r.clone(),
                session: s,
                part,
                layers,
            });
        }
        if taken.is_empty() {
            return;
        }
        let dim = self.stack.spec().embedding_length;
        let total: usize = taken.iter().map(|t| t.rows.count).sum();
        let mut data = Vec::with_capacity(total * dim);
        for t in &mut taken {
            let p = t
                .session
                .step
                .as_mut()
                .expect("selected sessions have a step");
            match p.carry.take() {
                Some(c) => data.extend_from_slice(&c.hidden.data),
                None => {
                    let rows = p.done * dim..(p.done + t.rows.count) * dim;
                    data.extend_from_slice(&p.input.data[rows]);
                    if p.done == 0 {
                        self.metrics
                            .queue_wait_seconds
                            .observe(p.queued.elapsed().as_secs_f64());
                    }
                }
            }
        }
        let mut x = Hidden {
            tokens: total,
            dim,
            data,
        };
        let t = Instant::now();
        let result = {
            let mut entries: Vec<BatchEntry> = taken
                .iter_mut()
                .map(|t| {
                    let p = t
                        .session
                        .step
                        .as_ref()
                        .expect("selected sessions have a step");
                    BatchEntry {
                        tokens: t.rows.count,
                        pos: p.pos + p.done,
                        kv: t.part.as_mut().unwrap_or(&mut t.session.kv),
                    }
                })
                .collect();
            self.stack
                .forward_batch(blocks.clone(), &mut x, &mut entries)
        };
        let took = t.elapsed();
        self.metrics.batch_rows.observe(total as f64);
        self.metrics.batch_sessions.observe(taken.len() as f64);
        self.metrics.batches_recent.add(1);
        self.metrics.batch_sessions_recent.add(taken.len() as u64);
        let mut offset = 0;
        for t in taken {
            let Taken {
                rows: r,
                session: mut s,
                part,
                layers,
            } = t;
            if let Some(part) = part {
                s.kv.layers.splice(layers.start..layers.start, part.layers);
            }
            let out = offset * dim..(offset + r.count) * dim;
            offset += r.count;
            if let Err(e) = &result {
                // The checks above make this a bug in the model code, not bad input; the batch
                // fails whole rather than answer with numbers that may be wrong.
                let error = ComputeError::BatchFailed(e.to_string());
                fail(&mut s, &self.metrics, error);
                self.sessions.insert(r.id, s);
                continue;
            }
            let p = s.step.as_mut().expect("selected sessions have a step");
            p.compute += took;
            if blocks.end < s.span.end {
                p.carry = Some(Carry {
                    hidden: Hidden {
                        tokens: r.count,
                        dim,
                        data: x.data[out].to_vec(),
                    },
                    next_block: blocks.end,
                });
            } else {
                p.output.extend_from_slice(&x.data[out]);
                p.done += r.count;
                if p.remaining() == 0 {
                    let p = s.step.take().expect("just used");
                    if p.input.tokens <= SMALL_STEP {
                        s.decoded = Some(now);
                    }
                    self.answer(p, dim);
                }
            }
            self.sessions.insert(r.id, s);
        }
    }

    fn answer(&self, p: Pending, dim: usize) {
        let tokens = p.input.tokens;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.metrics.steps.inc();
        self.metrics.tokens.inc_by(tokens as u64);
        self.metrics.step_seconds.observe(p.compute.as_secs_f64());
        self.metrics.rate.add(tokens as u64);
        let out = Hidden {
            tokens,
            dim,
            data: p.output,
        };
        let _ = p.reply.send(Ok((out, p.compute)));
    }

    /// Counters for announcements and metrics, after each iteration.
    fn publish(&self) {
        let sessions = self.sessions.len();
        let bytes: usize = self.sessions.values().map(|s| s.kv.bytes()).sum();
        self.stats
            .used_cache_tokens
            .store(self.used as u64, Ordering::Relaxed);
        self.stats
            .sessions
            .store(sessions as u64, Ordering::Relaxed);
        let waiting = self.sessions.values().filter(|s| s.step.is_some()).count();
        self.stats
            .waiting_steps
            .store(waiting as u64, Ordering::Relaxed);
        self.metrics.sessions.set(sessions as i64);
        self.metrics.kv_cache_bytes.set(bytes as i64);
        self.metrics.kv_cache_reserved_tokens.set(self.used as i64);
    }
}

/// A session taken out of the map for one batched product: its rows, and the caches of the
/// blocks they go through when that is not the whole span (put back after).
struct Taken {
    rows: Rows,
    session: Session,
    part: Option<SessionKv>,
    layers: Range<usize>,
}

/// A step refused before it was queued, with the reply it is owed.
struct Refusal {
    reply: oneshot::Sender<StepResult>,
    error: ComputeError,
}

impl Refusal {
    fn send(self) -> Result<(), StepResult> {
        self.reply.send(Err(self.error))
    }
}

/// Ends a session's step with `error`, rolling its cache back to where the step began.
fn fail(s: &mut Session, metrics: &NodeMetrics, error: ComputeError) {
    if let Some(p) = s.step.take() {
        s.kv.truncate(p.pos);
        metrics.step_errors.inc();
        let _ = p.reply.send(Err(error));
    }
}

mod chunk;
#[cfg(test)]
mod tests;
