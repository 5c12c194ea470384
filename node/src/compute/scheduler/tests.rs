//! The scheduler driven one iteration at a time (what is batched with what, in which order,
//! what the budget refuses), and through its thread with many concurrent sessions; every
//! output is compared bit for bit with the same session run alone.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use libp2p::PeerId;
use model::kv_cache::KV_PAGE;
use model::synthetic::SyntheticModel;
use model::{load, BlockStack, GgufFile, Hidden, LoadOptions};
use tokio::sync::oneshot;

use super::Scheduler;
use crate::compute::{ComputeError, ComputeHandle, ComputeLimits, ComputeStats, Job, StepResult};
use crate::metrics::NodeMetrics;

/// Two independent loads of one synthetic model: one for the scheduler, one to compute each
/// session alone.
fn stacks(m: &SyntheticModel) -> (BlockStack, BlockStack) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "edge-node-scheduler-{}-{}.gguf",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    m.write(&path).expect("write synthetic gguf");
    let file = GgufFile::open(&path).unwrap();
    let range = 0..m.blocks;
    let mut a = load(&file, &LoadOptions::blocks(range.clone()), &mut |_, _| {}).unwrap();
    let mut b = load(&file, &LoadOptions::blocks(range), &mut |_, _| {}).unwrap();
    let _ = std::fs::remove_file(&path);
    (a.stack.take().unwrap(), b.stack.take().unwrap())
}

fn model() -> SyntheticModel {
    SyntheticModel {
        context: 1024,
        ..Default::default()
    }
}

fn scheduler(stack: BlockStack, cache_tokens: usize, prefill_chunk: usize) -> Scheduler {
    scheduler_with(
        stack,
        ComputeLimits {
            max_sessions: 8,
            cache_tokens,
            max_sessions_per_peer: 8,
            cache_tokens_per_peer: cache_tokens,
            prefill_chunk,
            adaptive_chunk: false,
        },
    )
}

fn scheduler_with(stack: BlockStack, limits: ComputeLimits) -> Scheduler {
    Scheduler::new(
        stack,
        limits,
        Arc::new(ComputeStats::default()),
        Arc::new(NodeMetrics::default()),
    )
}

/// Asks for a session; the scheduler's answer.
fn try_open(s: &mut Scheduler, max_length: usize, peer: PeerId) -> Result<u64, ComputeError> {
    let (reply, mut rx) = oneshot::channel();
    s.apply(Job::Open {
        span: 0..4,
        max_length,
        peer,
        reply,
    });
    rx.try_recv().expect("an open is answered at once")
}

fn refused(s: &Scheduler, reason: &'static str) -> u64 {
    s.metrics
        .sessions_refused
        .get_or_create(&vec![("reason", reason)])
        .get()
}

/// Deterministic hidden states: `tokens` rows that differ by `seed`.
fn rows(dim: usize, tokens: usize, seed: usize) -> Hidden {
    let data = (0..tokens * dim)
        .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 997.0 - 0.5)
        .collect();
    Hidden::new(tokens, dim, data).unwrap()
}

fn open(s: &mut Scheduler, span: Range<usize>, max_length: usize, peer: PeerId) -> u64 {
    let (reply, mut rx) = oneshot::channel();
    s.apply(Job::Open {
        span,
        max_length,
        peer,
        reply,
    });
    rx.try_recv().unwrap().unwrap()
}

fn step(s: &mut Scheduler, id: u64, pos: usize, hidden: Hidden) -> oneshot::Receiver<StepResult> {
    let (reply, rx) = oneshot::channel();
    s.apply(Job::Step {
        id,
        pos,
        hidden,
        reply,
    });
    rx
}

fn answered(rx: &mut oneshot::Receiver<StepResult>) -> Option<Hidden> {
    match rx.try_recv() {
        Ok(Ok((h, _))) => Some(h),
        Ok(Err(e)) => panic!("step failed: {e}"),
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(e) => panic!("reply dropped: {e}"),
    }
}

/// A session run alone on the reference stack, step by step.
struct Alone<'a> {
    stack: &'a BlockStack,
    span: Range<usize>,
    kv: model::SessionKv,
}

impl<'a> Alone<'a> {
    fn new(stack: &'a BlockStack, span: Range<usize>, max_length: usize) -> Self {
        Self {
            kv: stack.new_cache(span.clone(), max_length),
            stack,
            span,
        }
    }

    fn step(&mut self, pos: usize, mut h: Hidden) -> Hidden {
        self.kv.truncate(pos);
        self.stack
            .forward_span(self.span.clone(), &mut h, &mut self.kv, pos)
            .unwrap();
        h
    }
}

/// A session of blocks 0..4 (512 positions) opened by a peer of its own, and the same session
/// run alone on the reference stack.
fn peer_session<'a>(s: &mut Scheduler, reference: &'a BlockStack) -> (u64, Alone<'a>) {
    (
        open(s, 0..4, 512, PeerId::random()),
        Alone::new(reference, 0..4, 512),
    )
}

#[test]
fn decode_steps_flow_while_a_long_prompt_runs_in_chunks() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler(stack, 4096, 32);
    let ((a, mut alone_a), (b, mut alone_b)) = (
        peer_session(&mut s, &reference),
        peer_session(&mut s, &reference),
    );
    let mut rb = step(&mut s, b, 0, rows(dim, 3, 1));
    s.iterate();
    assert_eq!(answered(&mut rb).unwrap(), alone_b.step(0, rows(dim, 3, 1)));

    // A 100-row prompt takes four iterations (32 + 32 + 32 + 4 rows); b decodes in every one.
    let mut ra = step(&mut s, a, 0, rows(dim, 100, 2));
    let mut prompt_out = None;
    for i in 0..4 {
        let mut rb = step(&mut s, b, 3 + i, rows(dim, 1, 10 + i));
        s.iterate();
        let got = answered(&mut rb).expect("the decode step is answered in its iteration");
        assert_eq!(got, alone_b.step(3 + i, rows(dim, 1, 10 + i)));
        prompt_out = answered(&mut ra);
        assert_eq!(prompt_out.is_some(), i == 3, "iteration {i}");
    }
    assert_eq!(prompt_out.unwrap(), alone_a.step(0, rows(dim, 100, 2)));
    let mut ra = step(&mut s, a, 100, rows(dim, 1, 3));
    s.iterate();
    assert_eq!(
        answered(&mut ra).unwrap(),
        alone_a.step(100, rows(dim, 1, 3))
    );
    // Four chunks: 32, 32, 32 and the prompt's last 4 rows, which stay prompt rows.
    assert_eq!(s.metrics.prefill_chunks.get(), 4);
}

#[test]
fn a_chunked_prompt_is_bit_identical_to_the_whole_prompt_alone() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler(stack, 4096, 48);
    let id = open(&mut s, 1..4, 600, PeerId::random());
    // Longer than a KV page, so the cache also grows mid-prompt.
    let n = KV_PAGE + 77;
    let mut rx = step(&mut s, id, 0, rows(dim, n, 5));
    let mut iterations = 0;
    let got = loop {
        s.iterate();
        iterations += 1;
        if let Some(h) = answered(&mut rx) {
            break h;
        }
    };
    assert_eq!(iterations, n.div_ceil(48));
    let mut alone = Alone::new(&reference, 1..4, 600);
    assert_eq!(got, alone.step(0, rows(dim, n, 5)));
}

#[test]
fn prompt_chunks_go_to_peers_in_turn() {
    let (stack, _) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler(stack, 8192, 32);
    let (x, y) = (PeerId::random(), PeerId::random());
    // Peer x queues two 64-row prompts before peer y queues one.
    let x1 = open(&mut s, 0..4, 256, x);
    let x2 = open(&mut s, 0..4, 256, x);
    let y1 = open(&mut s, 0..4, 256, y);
    let mut rx1 = step(&mut s, x1, 0, rows(dim, 64, 1));
    let mut rx2 = step(&mut s, x2, 0, rows(dim, 64, 2));
    let mut ry1 = step(&mut s, y1, 0, rows(dim, 64, 3));
    let done = |s: &Scheduler, id| s.sessions[&id].step.as_ref().map_or(64, |p| p.done);
    let mut order = Vec::new();
    for _ in 0..6 {
        let before = [done(&s, x1), done(&s, x2), done(&s, y1)];
        s.iterate();
        let after = [done(&s, x1), done(&s, x2), done(&s, y1)];
        let moved: Vec<usize> = (0..3).filter(|&i| after[i] != before[i]).collect();
        assert_eq!(
            moved.len(),
            1,
            "one chunk per iteration: {before:?} -> {after:?}"
        );
        order.push(moved[0]);
    }
    // x's turns go to its oldest prompt first; y is served every other iteration, so its one
    // prompt does not wait behind both of x's.
    let y_turns: Vec<usize> = (0..6).filter(|&i| order[i] == 2).collect();
    assert!(
        y_turns == [0, 2] || y_turns == [1, 3],
        "chunk order {order:?}"
    );
    let x_order: Vec<usize> = order.iter().copied().filter(|&i| i != 2).collect();
    assert_eq!(x_order, [0, 0, 1, 1], "chunk order {order:?}");
    for rx in [&mut rx1, &mut rx2, &mut ry1] {
        assert!(answered(rx).is_some());
    }
}

#[test]
fn the_cache_budget_is_charged_in_pages_and_a_step_that_overdraws_it_fails_alone() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler(stack, 2 * KV_PAGE, 512);
    let (a, b) = (
        open(&mut s, 0..4, 2 * KV_PAGE, PeerId::random()),
        open(&mut s, 0..4, 2 * KV_PAGE, PeerId::random()),
    );
    assert_eq!(s.used, 2 * KV_PAGE);
    // A third session's first page does not fit: refused before anything is allocated.
    let (reply, mut rx) = oneshot::channel();
    s.apply(Job::Open {
        span: 0..4,
        max_length: 10,
        peer: PeerId::random(),
        reply,
    });
    assert!(matches!(
        rx.try_recv().unwrap(),
        Err(ComputeError::CacheFull { free: 0, .. })
    ));
    // a needs a second page, which is not there; b's step in the same iteration is unaffected.
    let mut ra = step(&mut s, a, 0, rows(dim, KV_PAGE + 1, 1));
    let mut rb = step(&mut s, b, 0, rows(dim, 2, 2));
    s.iterate();
    assert!(matches!(
        ra.try_recv().unwrap(),
        Err(ComputeError::CacheFull { wanted, free: 0, .. }) if wanted == KV_PAGE
    ));
    let mut alone_b = Alone::new(&reference, 0..4, 2 * KV_PAGE);
    assert_eq!(answered(&mut rb).unwrap(), alone_b.step(0, rows(dim, 2, 2)));
    assert_eq!(s.sessions[&a].kv.len(), 0);
    // Closing b frees its page, and a's step fits.
    s.close(b);
    assert_eq!(s.used, KV_PAGE);
    let mut ra = step(&mut s, a, 0, rows(dim, KV_PAGE + 1, 1));
    s.iterate();
    let mut alone_a = Alone::new(&reference, 0..4, 2 * KV_PAGE);
    assert_eq!(
        answered(&mut ra).unwrap(),
        alone_a.step(0, rows(dim, KV_PAGE + 1, 1))
    );
    assert_eq!(s.used, 2 * KV_PAGE);
    // A session longer than the whole budget is refused even on an empty node.
    s.close(a);
    let (reply, mut rx) = oneshot::channel();
    s.apply(Job::Open {
        span: 0..4,
        max_length: 2 * KV_PAGE + 1,
        peer: PeerId::random(),
        reply,
    });
    assert!(matches!(
        rx.try_recv().unwrap(),
        Err(ComputeError::CacheFull { .. })
    ));
    assert_eq!(s.used, 0);
}

#[test]
fn a_withdrawn_step_stops_at_once_and_its_rows_are_rolled_back() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler(stack, 4096, 16);
    let a = open(&mut s, 0..4, 256, PeerId::random());
    let rx = step(&mut s, a, 0, rows(dim, 64, 1));
    s.iterate();
    assert_eq!(s.sessions[&a].kv.len(), 16);
    drop(rx);
    s.iterate();
    assert!(s.sessions[&a].step.is_none());
    assert_eq!(s.sessions[&a].kv.len(), 0);
    assert_eq!(s.metrics.steps_withdrawn.get(), 1);
    assert_eq!(s.metrics.prefill_chunks.get(), 1);
    // The session goes on from where the withdrawn step began.
    let mut rx = step(&mut s, a, 0, rows(dim, 5, 2));
    s.iterate();
    let mut alone = Alone::new(&reference, 0..4, 256);
    assert_eq!(answered(&mut rx).unwrap(), alone.step(0, rows(dim, 5, 2)));
    // A second step while one runs is refused; closing drops the queued work.
    let _running = step(&mut s, a, 5, rows(dim, 40, 3));
    let mut second = step(&mut s, a, 5, rows(dim, 1, 4));
    assert!(matches!(
        second.try_recv().unwrap(),
        Err(ComputeError::StepInFlight)
    ));
    s.close(a);
    assert!(s.sessions.is_empty());
    assert_eq!(s.used, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_through_the_thread_are_each_bit_identical_to_running_alone() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let compute = ComputeHandle::spawn(
        stack,
        ComputeLimits {
            max_sessions: 8,
            cache_tokens: 8192,
            max_sessions_per_peer: 8,
            cache_tokens_per_peer: 8192,
            prefill_chunk: 24,
            adaptive_chunk: false,
        },
        Arc::new(NodeMetrics::default()),
    )
    .unwrap();
    // Different spans, prompt lengths (some longer than a chunk) and peers, all at once.
    let plans: Vec<(Range<usize>, usize)> = vec![
        (0..4, 3),
        (0..4, 70),
        (1..3, 1),
        (0..2, 40),
        (2..4, 9),
        (0..4, 150),
    ];
    let peers = [PeerId::random(), PeerId::random()];
    let tasks = plans.iter().enumerate().map(|(i, (span, prompt))| {
        let compute = compute.clone();
        let (span, prompt) = (span.clone(), *prompt);
        let peer = peers[i % 2];
        async move {
            let id = compute.open(span, 256, peer).await.unwrap();
            let mut outs = Vec::new();
            let (out, _) = compute.step(id, 0, rows(dim, prompt, i)).await.unwrap();
            outs.push(out);
            for t in 0..6 {
                let (out, _) = compute
                    .step(id, prompt + t, rows(dim, 1, 100 + 10 * i + t))
                    .await
                    .unwrap();
                outs.push(out);
            }
            compute.close(id);
            outs
        }
    });
    let results = futures::future::join_all(tasks).await;
    for (i, ((span, prompt), outs)) in plans.iter().zip(results).enumerate() {
        let mut alone = Alone::new(&reference, span.clone(), 256);
        assert_eq!(
            outs[0],
            alone.step(0, rows(dim, *prompt, i)),
            "session {i} prompt"
        );
        for t in 0..6 {
            let want = alone.step(prompt + t, rows(dim, 1, 100 + 10 * i + t));
            assert_eq!(outs[1 + t], want, "session {i} decode step {t}");
        }
    }
}

#[test]
fn an_adaptive_chunk_moves_towards_the_target_time() {
    use std::time::Duration;
    let (stack, _) = stacks(&model());
    let mut s = scheduler(stack, 4096, 64);
    // 64 rows took 80 ms, four times the 20 ms target: halfway to 16 rows.
    s.resize_chunk(Duration::from_millis(80));
    assert_eq!(s.chunk, 40);
    // Far too slow or too fast: bounded.
    for _ in 0..20 {
        s.resize_chunk(Duration::from_secs(10));
    }
    assert_eq!(s.chunk, crate::compute::MIN_PREFILL_CHUNK);
    for _ in 0..20 {
        s.resize_chunk(Duration::from_micros(1));
    }
    assert_eq!(s.chunk, crate::compute::MAX_PREFILL_CHUNK);
}

#[test]
fn one_peer_gets_its_share_of_the_sessions_and_the_rest_stays_for_others() {
    let (stack, _) = stacks(&model());
    let mut s = scheduler_with(
        stack,
        ComputeLimits {
            max_sessions: 4,
            cache_tokens: 4096,
            max_sessions_per_peer: crate::compute::fair_share(4),
            cache_tokens_per_peer: 4096,
            prefill_chunk: 64,
            adaptive_chunk: false,
        },
    );
    let (greedy, other, third) = (PeerId::random(), PeerId::random(), PeerId::random());
    // Three of four, however often it asks.
    let mine: Vec<u64> = (0..3)
        .map(|_| try_open(&mut s, 16, greedy).unwrap())
        .collect();
    for _ in 0..100 {
        assert!(matches!(
            try_open(&mut s, 16, greedy),
            Err(ComputeError::PeerSessions { held: 3 })
        ));
    }
    // Another peer still gets in; once the node is full, everybody is refused.
    try_open(&mut s, 16, other).unwrap();
    assert!(matches!(
        try_open(&mut s, 16, third),
        Err(ComputeError::TooManySessions(4))
    ));
    assert_eq!(refused(&s, "peer_sessions"), 100);
    assert_eq!(refused(&s, "sessions_full"), 1);
    // Closing one of its sessions gives the peer its slot back.
    s.close(mine[0]);
    try_open(&mut s, 16, greedy).unwrap();
    assert_eq!(s.held[&greedy].sessions, 3);
}

#[test]
fn one_peer_gets_its_share_of_the_cache_and_a_step_past_it_fails_alone() {
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = scheduler_with(
        stack,
        ComputeLimits {
            max_sessions: 8,
            cache_tokens: 4 * KV_PAGE,
            max_sessions_per_peer: 8,
            cache_tokens_per_peer: 2 * KV_PAGE,
            prefill_chunk: 512,
            adaptive_chunk: false,
        },
    );
    let (greedy, other) = (PeerId::random(), PeerId::random());
    // What counts is what is allocated, not the declared length (which may exceed the share).
    let a = try_open(&mut s, 2 * KV_PAGE + 1, greedy).unwrap();
    let b = try_open(&mut s, 2 * KV_PAGE, greedy).unwrap();
    // Two pages held: a third session's first page is past the peer's share, not the node's.
    assert!(matches!(
        try_open(&mut s, 2 * KV_PAGE, greedy),
        Err(ComputeError::PeerCacheFull { wanted, held, limit })
            if wanted == KV_PAGE && held == 2 * KV_PAGE && limit == 2 * KV_PAGE
    ));
    assert_eq!(refused(&s, "peer_cache"), 1);
    let c = try_open(&mut s, 2 * KV_PAGE, other).unwrap();
    // a needs a second page, past its peer's share; the other peer's step runs beside it.
    let mut ra = step(&mut s, a, 0, rows(dim, KV_PAGE + 1, 1));
    let mut rc = step(&mut s, c, 0, rows(dim, KV_PAGE + 1, 2));
    s.iterate();
    assert!(matches!(
        ra.try_recv().unwrap(),
        Err(ComputeError::PeerCacheFull { wanted, .. }) if wanted == KV_PAGE
    ));
    let mut alone_c = Alone::new(&reference, 0..4, 2 * KV_PAGE);
    assert_eq!(
        answered(&mut rc).unwrap(),
        alone_c.step(0, rows(dim, KV_PAGE + 1, 2))
    );
    assert_eq!(s.used, 4 * KV_PAGE);
    assert_eq!(s.held[&greedy].cache, 2 * KV_PAGE);
    assert_eq!(s.held[&other].cache, 2 * KV_PAGE);
    // Closing b frees the peer's page, and a's step fits.
    s.close(b);
    let mut ra = step(&mut s, a, 0, rows(dim, KV_PAGE + 1, 1));
    s.iterate();
    let mut alone_a = Alone::new(&reference, 0..4, 2 * KV_PAGE + 1);
    assert_eq!(
        answered(&mut ra).unwrap(),
        alone_a.step(0, rows(dim, KV_PAGE + 1, 1))
    );
    s.close(a);
    s.close(c);
    assert_eq!(s.used, 0);
    assert!(s.held.is_empty());
}

#[test]
fn the_default_share_leaves_room_for_other_peers() {
    use crate::compute::fair_share;
    assert_eq!(fair_share(16), 12);
    assert_eq!(fair_share(16384), 12288);
    assert_eq!(fair_share(4), 3);
    assert_eq!(fair_share(2), 1);
    // A node of one slot cannot share it.
    assert_eq!(fair_share(1), 1);
    for total in 2..1000 {
        let share = fair_share(total);
        assert!(share >= 1 && share < total, "{total}: {share}");
    }
}

fn adaptive(stack: BlockStack, prefill_chunk: usize) -> Scheduler {
    scheduler_with(
        stack,
        ComputeLimits {
            max_sessions: 8,
            cache_tokens: 8192,
            max_sessions_per_peer: 8,
            cache_tokens_per_peer: 8192,
            prefill_chunk,
            adaptive_chunk: true,
        },
    )
}

/// Prompt rows `id` has computed of its running step (its whole step once answered).
fn done_rows(s: &Scheduler, id: u64, whole: usize) -> usize {
    s.sessions[&id].step.as_ref().map_or(whole, |p| p.done)
}

#[test]
fn while_another_session_decodes_a_prompt_runs_in_short_chunks_with_its_steps_alone_between() {
    use std::time::{Duration, Instant};
    let ms = Duration::from_millis;
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = adaptive(stack, 64);
    // The shared chunk is in row-blocks: 16 rows of the 4-block span.
    assert_eq!((s.chunk, s.shared_chunk), (64, 16 * 4));
    let ((a, mut alone_a), (b, mut alone_b)) = (
        peer_session(&mut s, &reference),
        peer_session(&mut s, &reference),
    );
    let t0 = Instant::now();
    // b decodes alone: a decode-only iteration of 4 ms is what a decode step costs here.
    let mut rb = step(&mut s, b, 0, rows(dim, 1, 1));
    let ran = s.run_iteration(t0).unwrap();
    s.learn(ran, ms(4));
    assert_eq!(s.decode_ms, Some(4.0));
    assert_eq!(answered(&mut rb).unwrap(), alone_b.step(0, rows(dim, 1, 1)));

    // a's prompt arrives while b is between steps: b decoded just now, so the chunk is the
    // shared one, and 16 rows taking 16 ms (four decode steps) shrink it towards 4 rows.
    let n = 200;
    let mut ra = step(&mut s, a, 0, rows(dim, n, 2));
    let ran = s.run_iteration(t0 + ms(5)).unwrap();
    assert_eq!((ran.small_rows, ran.prompt_rows, ran.shared), (0, 16, true));
    s.learn(ran, ms(16));
    assert_eq!(s.shared_chunk, 10 * 4);
    assert_eq!(s.chunk, 64, "the solo chunk is left as it was");

    // b's next step came in during that chunk: it runs alone, a waits one iteration.
    let mut rb = step(&mut s, b, 1, rows(dim, 1, 3));
    let ran = s.run_iteration(t0 + ms(21)).unwrap();
    assert_eq!((ran.small_rows, ran.prompt_rows), (1, 0));
    s.learn(ran, ms(4));
    assert_eq!(answered(&mut rb).unwrap(), alone_b.step(1, rows(dim, 1, 3)));
    assert_eq!(done_rows(&s, a, n), 16);

    // A step that arrives after a decode-only iteration rides with the next chunk, so
    // however many steps come, every other iteration moves the prompt.
    let mut at = t0 + ms(25);
    let mut moved = Vec::new();
    for i in 0..6 {
        let b_pos = 2 + i;
        let mut rb = step(&mut s, b, b_pos, rows(dim, 1, 10 + i));
        let before = done_rows(&s, a, n);
        let ran = s.run_iteration(at).unwrap();
        s.learn(ran, ms(4 + 2 * ran.prompt_rows as u64));
        assert_eq!(
            answered(&mut rb).unwrap(),
            alone_b.step(b_pos, rows(dim, 1, 10 + i)),
            "b's step {i} is answered in its iteration"
        );
        moved.push(done_rows(&s, a, n) - before);
        at += ms(10);
    }
    // 2 ms a row on top of a 4 ms decode step: each full chunk moves the size halfway
    // towards the rows that fit in one decode step's time.
    assert_eq!(moved, [10, 0, 5, 0, 3, 0]);

    // b stops decoding: after the window, a's prompt goes back to the solo chunk.
    let before = done_rows(&s, a, n);
    let ran = s.run_iteration(at + ms(1500)).unwrap();
    assert_eq!((ran.prompt_rows, ran.shared), (64, false));
    assert_eq!(done_rows(&s, a, n) - before, 64);
    let got = loop {
        if let Some(h) = answered(&mut ra) {
            break h;
        }
        s.run_iteration(at + ms(1500)).unwrap();
    };
    // However it was cut, a's prompt is bit-identical to running it whole and alone.
    assert_eq!(got, alone_a.step(0, rows(dim, n, 2)));
}

#[test]
fn a_sessions_own_prompt_after_decoding_is_not_held_to_the_shared_chunk() {
    use std::time::{Duration, Instant};
    let (stack, _) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = adaptive(stack, 64);
    let b = open(&mut s, 0..4, 512, PeerId::random());
    let t0 = Instant::now();
    let mut rb = step(&mut s, b, 0, rows(dim, 1, 1));
    s.run_iteration(t0).unwrap();
    assert!(answered(&mut rb).is_some());
    // b's next turn is a long prompt of its own: nobody else is decoding.
    let _rb = step(&mut s, b, 1, rows(dim, 100, 2));
    let ran = s.run_iteration(t0 + Duration::from_millis(1)).unwrap();
    assert_eq!((ran.prompt_rows, ran.shared), (64, false));
}

#[test]
fn the_shared_chunk_follows_the_measured_decode_step_and_keeps_a_row_block() {
    use std::time::Duration;
    let (stack, _) = stacks(&model());
    let mut s = adaptive(stack, 64);
    let shared = |work| super::Ran {
        small_rows: 0,
        prompt_rows: 1,
        prompt_work: work,
        full: true,
        shared: true,
    };
    // Before any decode-only iteration, the target is SHARED_CHUNK_MS (5 ms).
    s.learn(shared(64), Duration::from_millis(20));
    assert_eq!(s.shared_chunk, 40);
    // A decode-only iteration of 3 ms, then the average with the next one (5 ms).
    for took in [3, 5] {
        let decode = super::Ran {
            small_rows: 1,
            prompt_rows: 0,
            prompt_work: 0,
            full: false,
            shared: true,
        };
        s.learn(decode, Duration::from_millis(took));
    }
    assert_eq!(s.decode_ms, Some(4.0));
    // Rows far dearer than a decode step (late in a long prompt): below one row of the span,
    // down to one row through one block, never zero.
    for _ in 0..20 {
        let c = s.shared_chunk;
        s.learn(shared(c), Duration::from_millis(200));
    }
    assert_eq!(s.shared_chunk, 1);
    // Cheap work grows it again; a chunk cut by the prompt's end teaches nothing.
    s.learn(shared(1), Duration::from_millis(1));
    assert_eq!(s.shared_chunk, 3);
    let partial = super::Ran {
        full: false,
        ..shared(3)
    };
    s.learn(partial, Duration::from_millis(1));
    assert_eq!(s.shared_chunk, 3);
}

#[test]
fn a_row_dearer_than_a_decode_step_goes_through_the_span_a_few_blocks_at_a_time() {
    use std::time::{Duration, Instant};
    let ms = Duration::from_millis;
    let (stack, reference) = stacks(&model());
    let dim = stack.spec().embedding_length;
    let mut s = adaptive(stack, 64);
    let ((a, mut alone_a), (b, mut alone_b)) = (
        peer_session(&mut s, &reference),
        peer_session(&mut s, &reference),
    );
    let t0 = Instant::now();
    let mut rb = step(&mut s, b, 0, rows(dim, 1, 1));
    s.run_iteration(t0).unwrap();
    assert_eq!(answered(&mut rb).unwrap(), alone_b.step(0, rows(dim, 1, 1)));
    // Late in a long prompt one row costs more than b's decode step: the shared chunk has
    // shrunk below the span's 4 blocks, to 3 row-blocks.
    s.shared_chunk = 3;
    let n = 8;
    let mut ra = step(&mut s, a, 0, rows(dim, n, 2));
    let progress = |s: &Scheduler| {
        let p = s.sessions[&a].step.as_ref().unwrap();
        (p.done, p.carry.as_ref().map(|c| c.next_block))
    };
    // b steps every iteration: each chunk iteration takes b's step along, then b's next step
    // runs alone. A row goes through blocks 0..3 in one chunk and 3..4 in the next.
    let mut at = t0 + ms(5);
    let mut seen = Vec::new();
    for i in 0..14 {
        let b_pos = 1 + i;
        let mut rb = step(&mut s, b, b_pos, rows(dim, 1, 10 + i));
        let ran = s.run_iteration(at).unwrap();
        assert_eq!(ran.small_rows, 1);
        assert_eq!(
            answered(&mut rb).unwrap(),
            alone_b.step(b_pos, rows(dim, 1, 10 + i)),
            "b's step {i} is answered in its iteration"
        );
        if ran.prompt_rows > 0 {
            // Blocks 0..3 fill the budget; 3..4, the rest of the span, do not.
            let (_, carried) = progress(&s);
            assert!(ran.shared);
            assert_eq!(ran.full, carried.is_some());
            seen.push(progress(&s));
        }
        at += ms(10);
    }
    let pieces = [
        (0, Some(3)),
        (1, None),
        (1, Some(3)),
        (2, None),
        (2, Some(3)),
        (3, None),
        (3, Some(3)),
    ];
    assert_eq!(seen, pieces);
    // b stops decoding: once the window has passed, the carried row goes the rest of the way
    // alone, then the rest of the prompt in one solo chunk.
    let ran = s.run_iteration(at + ms(1500)).unwrap();
    assert_eq!((ran.prompt_rows, ran.shared, ran.full), (1, false, false));
    assert_eq!(progress(&s), (4, None));
    let ran = s.run_iteration(at + ms(1500)).unwrap();
    assert_eq!(ran.prompt_rows, 4);
    // Cut into rows and pieces of the span as it was, a's prompt is bit-identical to running it
    // whole and alone.
    assert_eq!(answered(&mut ra).unwrap(), alone_a.step(0, rows(dim, n, 2)));
}
