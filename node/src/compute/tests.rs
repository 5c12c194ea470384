use futures::FutureExt;

use super::*;

fn limits(max_sessions: usize) -> ComputeLimits {
    ComputeLimits {
        max_sessions,
        cache_tokens: 1024,
        max_sessions_per_peer: max_sessions,
        cache_tokens_per_peer: 1024,
        prefill_chunk: 64,
        adaptive_chunk: false,
    }
}

#[test]
fn a_full_queue_answers_busy_at_once() {
    // No thread serves this queue, so every request stays queued.
    let (handle, queue) = ComputeHandle::queue(limits(2));
    let depth = handle.limits.queue_depth();
    assert_eq!(depth, 4);
    let peer = PeerId::random();
    for _ in 0..depth {
        // Polled once: the request is queued, and then waits for an answer that never comes.
        assert!(handle.open(0..1, 8, peer).now_or_never().is_none());
    }
    let refused = handle.open(0..1, 8, peer).now_or_never();
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
        handle.open(0..1, 8, peer).now_or_never(),
        Some(Err(ComputeError::Stopped))
    ));
}

#[test]
fn the_prefill_chunk_follows_the_measured_speed() {
    assert_eq!(ComputeLimits::prefill_chunk_for(0.5), 40);
    assert_eq!(ComputeLimits::prefill_chunk_for(100.0), MIN_PREFILL_CHUNK);
    assert_eq!(ComputeLimits::prefill_chunk_for(0.001), MAX_PREFILL_CHUNK);
    assert_eq!(ComputeLimits::prefill_chunk_for(0.0), MAX_PREFILL_CHUNK);
    assert_eq!(
        ComputeLimits::prefill_chunk_for(f64::NAN),
        MAX_PREFILL_CHUNK
    );
}
