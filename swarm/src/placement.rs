//! Block selection and rebalancing: which blocks a server should hold so that the swarm, taken
//! as a pipeline, is as fast as possible.
//!
//! In the style of PETALS' `block_selection.py`. A client's tokens pass through every block, so
//! the swarm generates no faster than its weakest block. A joining server therefore takes the
//! run of blocks with the least throughput ([`choose_blocks`]), and a running server moves only
//! when moving strengthens the weakest blocks by a worthwhile margin ([`should_move`]).
//!
//! # Throughput convention
//!
//! A [`Served::throughput`] is in tokens per second, and a server adds it to EACH block it
//! serves: a server that needs `d` ms per block per decode step pushes a token through its whole
//! span of `k` blocks in `d·k` ms, so it adds `1000 / (d·k)` tokens/s to each of them (see
//! [`span_throughput`]). Spreading the same hardware over more blocks thus adds less to each.
//! Throughputs that are negative, NaN or infinite count as 0: a broken announcement must not
//! make blocks look well served and keep other servers away from them.
//!
//! Everything here is a pure function of its arguments, so the server, the simulations and the
//! tests make the same decisions on the same data.

use std::ops::Range;

/// One server as the DHT reports it, for balancing purposes. Servers that are still joining
/// should be included by the caller with an estimated throughput, so that several servers
/// starting at once do not all pick the same blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Served<P> {
    pub peer: P,
    /// Blocks it serves. Parts beyond the model's last block are ignored.
    pub blocks: Range<u32>,
    /// Tokens/s it adds to each block in `blocks`; see the module docs.
    pub throughput: f64,
}

/// A move [`should_move`] recommends: serve `to` instead of `from`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rebalance {
    pub from: Range<u32>,
    pub to: Range<u32>,
    /// The swarm's weakest block throughput (tokens/s) now.
    pub min_before: f64,
    /// The swarm's weakest block throughput once the move is done and nothing else changed.
    pub min_after: f64,
    /// How far blocks fall short of the mean block throughput, summed, now and after the move.
    pub shortfall_before: f64,
    pub shortfall_after: f64,
}

/// The throughput a server adds to each of its `blocks` blocks when one decode step costs it
/// `decode_ms_per_block` per block: `1000 / (decode_ms_per_block · blocks)` tokens/s. Returns 0
/// for no blocks or a time that is not positive and finite, which no real server announces.
pub fn span_throughput(decode_ms_per_block: f32, blocks: u32) -> f64 {
    let step_ms = f64::from(decode_ms_per_block) * f64::from(blocks);
    if step_ms.is_finite() && step_ms > 0.0 {
        1000.0 / step_ms
    } else {
        0.0
    }
}

/// Per-block total throughput of the swarm, `block_count` entries long.
pub fn block_throughput<P>(servers: &[Served<P>], block_count: u32) -> Vec<f64> {
    let mut total = vec![0.0; block_count as usize];
    for server in servers {
        add_span(&mut total, &server.blocks, server.throughput);
    }
    total
}

/// The run of `n` consecutive blocks with the least total throughput: where a joining server of
/// `n` blocks helps most. Ties go to the lowest start, so servers deciding on the same data
/// agree. NaN entries count as 0.
///
/// `None` unless `1 ≤ n ≤ throughput.len()`.
pub fn choose_blocks(throughput: &[f64], n: u32) -> Option<Range<u32>> {
    let len = usize::try_from(n).ok()?;
    if len == 0 || len > throughput.len() {
        return None;
    }
    // `min_by` keeps the first of equal minima, i.e. the lowest start.
    let start = (0..=throughput.len() - len)
        .map(|start| (start, window_sum(throughput, start, len)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?
        .0;
    let start = u32::try_from(start).ok()?;
    Some(start..start.checked_add(n)?)
}

/// Whether server `me` should move, and where.
///
/// The candidate runs are those of `me`'s length (capped at `block_count`) other than the one it
/// serves now. A run is worth moving to when either:
/// - it raises the swarm's weakest block throughput by more than `min_gain` relative to now
///   (0.2 = 20%; negative or NaN counts as 0; an uncovered block is the weakest possible, so
///   any move that covers every block counts as an improvement over it); or
/// - it keeps the weakest block at least as strong and delivers more than `min_gain` of what
///   `me` brings (its throughput times its blocks) to blocks below the swarm's mean block
///   throughput: the swarm's *shortfall*, the sum over blocks of how far each is below the
///   mean, drops by more than that. Such a move never uncovers a block.
///
/// The first rule alone never fires in a swarm of hundreds of peers: one server rarely lifts
/// the minimum by 20%, and when many blocks are about equally weak no single move lifts it at
/// all. The second is relative to the mover's own share, so it means the same thing at every
/// swarm size, and it also rewards moves that strengthen some of the weakest blocks.
///
/// Among runs that qualify, the one with the highest weakest block wins, then the largest drop
/// in shortfall, then the one with the least throughput without `me` (it leaves the weakest
/// part of the swarm stronger for later), then the lowest start.
///
/// Hysteresis comes from the threshold: a move has to deliver a fixed share of the mover's
/// throughput, so a move back (which would have to deliver as much again) is not worth it
/// unless the swarm changed in between. Every move either raises the minimum or keeps it and
/// lowers the shortfall (the mean does not depend on where servers sit), so servers that take
/// turns, each seeing the others' moves, cannot cycle. Servers that decide at the same moment
/// on the same data may all move, though (two duplicates of the same blocks both see the same
/// gap), so callers should stagger their checks and recheck once earlier moves show up in the
/// DHT.
///
/// If `me` is listed more than once, its first entry is the one considered for moving and the
/// others count as other servers. `None` if `me` is not listed or its range is empty.
///
/// Runs in O(S + L²) for S servers and L blocks.
pub fn should_move<P: PartialEq>(
    servers: &[Served<P>],
    me: &P,
    block_count: u32,
    min_gain: f64,
) -> Option<Rebalance> {
    let mine = servers.iter().position(|server| &server.peer == me)?;
    let current = &servers[mine];
    let n = current
        .blocks
        .end
        .saturating_sub(current.blocks.start)
        .min(block_count);
    if n == 0 {
        return None;
    }

    let mut without_me = vec![0.0; block_count as usize];
    for (i, server) in servers.iter().enumerate() {
        if i != mine {
            add_span(&mut without_me, &server.blocks, server.throughput);
        }
    }
    should_move_without(&without_me, &current.blocks, current.throughput, min_gain)
}

/// [`should_move`] for a server of `throughput` on `current_blocks`, given what every other
/// server adds to each block (`without_me`, one entry per block of the model). For callers
/// that judge many servers of one swarm: they can keep per-block totals up to date instead of
/// summing the whole swarm again for each server.
pub fn should_move_without(
    without_me: &[f64],
    current_blocks: &Range<u32>,
    throughput: f64,
    min_gain: f64,
) -> Option<Rebalance> {
    let block_count = u32::try_from(without_me.len()).ok()?;
    let n = current_blocks
        .end
        .saturating_sub(current_blocks.start)
        .min(block_count);
    if n == 0 {
        return None;
    }
    let rate = sane(throughput);
    let with_me_on = |run: &Range<u32>, block: u32, t: f64| -> f64 {
        if run.contains(&block) {
            t + rate
        } else {
            t
        }
    };
    let min_with_me_on = |run: &Range<u32>| -> f64 {
        (0..block_count)
            .zip(without_me)
            .map(|(block, &t)| with_me_on(run, block, t))
            .fold(f64::INFINITY, f64::min)
    };
    // Wherever `me` sits, the total is the same, and so is the mean.
    let mean = (without_me.iter().sum::<f64>() + rate * f64::from(n)) / f64::from(block_count);
    let shortfall_with_me_on = |run: &Range<u32>| -> f64 {
        (0..block_count)
            .zip(without_me)
            .map(|(block, &t)| (mean - with_me_on(run, block, t)).max(0.0))
            .sum()
    };
    let uncovers = |run: &Range<u32>| -> bool {
        (0..block_count)
            .zip(without_me)
            .any(|(block, &t)| t <= 0.0 && current_blocks.contains(&block) && !run.contains(&block))
    };
    let min_before = min_with_me_on(current_blocks);
    let shortfall_before = shortfall_with_me_on(current_blocks);

    let gain = if min_gain.is_nan() {
        0.0
    } else {
        min_gain.max(0.0)
    };
    // A floor on the share, so that rounding in the sums cannot pass for a gain.
    let share = gain.max(1e-9) * rate * f64::from(n);
    let raises_min = |min_after: f64| {
        if min_before > 0.0 {
            min_after > min_before * (1.0 + gain)
        } else {
            min_after > 0.0
        }
    };

    let (to, min_after, shortfall_after, _) = (0..=block_count - n)
        .map(|start| start..start + n)
        .filter(|run| run != current_blocks)
        .map(|run| {
            let min_after = min_with_me_on(&run);
            let shortfall_after = shortfall_with_me_on(&run);
            let load = window_sum(without_me, run.start as usize, n as usize);
            (run, min_after, shortfall_after, load)
        })
        .filter(|(run, min_after, shortfall_after, _)| {
            raises_min(*min_after)
                || (*min_after >= min_before
                    && shortfall_before - shortfall_after > share
                    && !uncovers(run))
        })
        // Better = higher minimum, then less shortfall, then less load; `min_by` keeps the
        // earliest of equals.
        .min_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then(a.2.total_cmp(&b.2))
                .then(a.3.total_cmp(&b.3))
        })?;
    Some(Rebalance {
        from: current_blocks.clone(),
        to,
        min_before,
        min_after,
        shortfall_before,
        shortfall_after,
    })
}

/// How many blocks a server can hold: what is left of `max_memory_bytes` after
/// `overhead_bytes` (runtime, activations, buffers), divided by the cost of one block, its
/// weights plus a KV cache of `cache_tokens` tokens. Capped at `block_count`.
///
/// `None` when not even one block fits (or the model has no blocks): such a server cannot
/// serve, and [`choose_blocks`] has no valid size to look for. Blocks that cost nothing all fit.
pub fn blocks_for_memory(
    max_memory_bytes: u64,
    overhead_bytes: u64,
    block_weight_bytes: u64,
    kv_bytes_per_token_per_block: u64,
    cache_tokens: u64,
    block_count: u32,
) -> Option<u32> {
    let available = max_memory_bytes.checked_sub(overhead_bytes)?;
    // An overflowing cost is more than any memory holds.
    let per_block = cache_tokens
        .checked_mul(kv_bytes_per_token_per_block)?
        .checked_add(block_weight_bytes)?;
    let fit = available.checked_div(per_block).map_or(block_count, |fit| {
        u32::try_from(fit).unwrap_or(u32::MAX).min(block_count)
    });
    (fit > 0).then_some(fit)
}

/// Adds `throughput` (sanitised) to the blocks of `blocks` that `total` has.
fn add_span(total: &mut [f64], blocks: &Range<u32>, throughput: f64) {
    let rate = sane(throughput);
    let end = (blocks.end as usize).min(total.len());
    let start = (blocks.start as usize).min(end);
    for t in &mut total[start..end] {
        *t += rate;
    }
}

/// Throughput as balancing counts it: broken values count as nothing.
fn sane(throughput: f64) -> f64 {
    if throughput.is_finite() && throughput > 0.0 {
        throughput
    } else {
        0.0
    }
}

/// Sum of `len` entries from `start`, NaN as 0. Summed afresh for every window rather than
/// slid along, so equal windows give bit-identical sums and ties are real ties.
fn window_sum(throughput: &[f64], start: usize, len: usize) -> f64 {
    throughput[start..start + len]
        .iter()
        .filter(|t| !t.is_nan())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn served(peer: char, blocks: Range<u32>, throughput: f64) -> Served<char> {
        Served {
            peer,
            blocks,
            throughput,
        }
    }

    /// Which of `0..block_count` some server lists, whatever its throughput.
    fn covered<P>(servers: &[Served<P>], block_count: u32) -> Vec<bool> {
        (0..block_count)
            .map(|b| servers.iter().any(|s| s.blocks.contains(&b)))
            .collect()
    }

    fn swarm_min<P>(servers: &[Served<P>], block_count: u32) -> f64 {
        block_throughput(servers, block_count)
            .into_iter()
            .fold(f64::INFINITY, f64::min)
    }

    fn moved<P: Clone + PartialEq>(
        servers: &[Served<P>],
        me: &P,
        to: Range<u32>,
    ) -> Vec<Served<P>> {
        let mut out = servers.to_vec();
        if let Some(s) = out.iter_mut().find(|s| &s.peer == me) {
            s.blocks = to;
        }
        out
    }

    #[test]
    fn span_throughput_follows_the_convention() {
        assert_eq!(span_throughput(10.0, 10), 10.0);
        assert_eq!(span_throughput(10.0, 0), 0.0);
        assert_eq!(span_throughput(0.0, 4), 0.0);
        assert_eq!(span_throughput(f32::NAN, 4), 0.0);
        assert_eq!(span_throughput(-1.0, 4), 0.0);
    }

    #[test]
    fn block_throughput_sums_overlaps_and_ignores_junk() {
        let servers = [
            served('a', 0..3, 1.0),
            served('b', 2..6, 2.0),
            served('c', 1..2, f64::NAN),
            served('d', 1..2, -5.0),
            served('e', Range { start: 3, end: 1 }, 7.0),
            served('f', 0..1, f64::INFINITY),
        ];
        assert_eq!(block_throughput(&servers, 4), [1.0, 1.0, 3.0, 2.0]);
        assert!(block_throughput(&servers, 0).is_empty());
    }

    #[test]
    fn an_empty_swarm_fills_from_the_start() {
        let empty = block_throughput::<char>(&[], 30);
        assert_eq!(empty, vec![0.0; 30]);
        assert_eq!(choose_blocks(&empty, 10), Some(0..10));
        assert_eq!(choose_blocks(&empty, 30), Some(0..30));
    }

    #[test]
    fn choose_blocks_rejects_impossible_sizes() {
        assert_eq!(choose_blocks(&[1.0, 2.0], 0), None);
        assert_eq!(choose_blocks(&[1.0, 2.0], 3), None);
        assert_eq!(choose_blocks(&[], 1), None);
    }

    #[test]
    fn choose_blocks_finds_the_weakest_run() {
        assert_eq!(choose_blocks(&[3.0, 1.0, 0.0, 2.0, 5.0], 2), Some(1..3));
        assert_eq!(choose_blocks(&[3.0, f64::NAN, 2.0], 1), Some(1..2));
    }

    #[test]
    fn three_joining_nodes_cover_the_model() {
        let mut swarm = Vec::new();
        for peer in ['a', 'b', 'c'] {
            let throughput = block_throughput(&swarm, 30);
            let blocks = choose_blocks(&throughput, 10).expect("10 of 30 blocks fit");
            swarm.push(served(peer, blocks, 1.0));
        }
        assert_eq!(covered(&swarm, 30), vec![true; 30]);
        let ranges: Vec<_> = swarm.iter().map(|s| s.blocks.clone()).collect();
        assert_eq!(ranges, [0..10, 10..20, 20..30]);
    }

    #[test]
    fn a_duplicate_moves_to_the_uncovered_blocks() {
        let swarm = [
            served('a', 0..10, 1.0),
            served('b', 10..20, 1.0),
            served('c', 0..10, 1.0),
        ];
        for me in ['a', 'c'] {
            let mv = should_move(&swarm, &me, 30, 0.2).expect("a gap to cover");
            assert_eq!(
                (mv.from, mv.to, mv.min_before, mv.min_after),
                (0..10, 20..30, 0.0, 1.0),
                "{me}"
            );
        }
        assert_eq!(should_move(&swarm, &'b', 30, 0.2), None);
    }

    #[test]
    fn sole_servers_stay_even_next_to_a_gap() {
        let swarm = [served('a', 0..10, 1.0), served('b', 10..20, 1.0)];
        for me in ['a', 'b'] {
            assert_eq!(should_move(&swarm, &me, 30, 0.0), None, "{me}");
        }
    }

    #[test]
    fn a_balanced_swarm_stays() {
        let thirds = [
            served('a', 0..10, 1.0),
            served('b', 10..20, 1.0),
            served('c', 20..30, 1.0),
        ];
        let doubled = [
            served('a', 0..10, 1.0),
            served('b', 10..20, 1.0),
            served('c', 20..30, 1.0),
            served('d', 0..10, 1.0),
            served('e', 10..20, 1.0),
            served('f', 20..30, 1.0),
        ];
        for swarm in [&thirds[..], &doubled[..]] {
            for s in swarm {
                assert_eq!(should_move(swarm, &s.peer, 30, 0.0), None, "{}", s.peer);
            }
        }
    }

    #[test]
    fn small_gains_are_not_worth_moving_for() {
        // Blocks 20..30 run at 1 token/s; `d` moving there raises them to 2 and leaves 0..10 at 3.
        let swarm = [
            served('a', 0..10, 3.0),
            served('b', 10..20, 3.0),
            served('c', 20..30, 1.0),
            served('d', 0..10, 1.0),
        ];
        let to = |g: f64| should_move(&swarm, &'d', 30, g).map(|m| (m.to, m.min_after));
        assert_eq!(to(0.5), Some((20..30, 2.0)));
        assert_eq!(to(f64::NAN), Some((20..30, 2.0)));
        // The minimum doubles, but not by more than 100%; all of `d`'s throughput goes to
        // blocks below the mean (2.67 tokens/s), though, which is more than 90% of it.
        assert_eq!(to(0.9), Some((20..30, 2.0)));
        assert_eq!(to(1.5), None);
        assert_eq!(to(f64::INFINITY), None);
    }

    #[test]
    fn a_peer_leaves_crowded_blocks_even_when_the_minimum_cannot_rise() {
        // Ten servers crowd blocks 0..2; one each holds 2..4, 4..6 and 6..8. No single move
        // lifts the weakest block (three runs are equally weak), but moving one of the ten
        // gives all its throughput to blocks below the mean (3.25).
        let mut swarm: Vec<Served<u32>> = (0..10).map(|p| served_n(p, 0..2)).collect();
        for (p, start) in [(10, 2), (11, 4), (12, 6)] {
            swarm.push(served_n(p, start..start + 2));
        }
        let mv = should_move(&swarm, &0, 8, 0.2).expect("worth moving");
        assert_eq!((mv.from, mv.to.clone()), (0..2, 2..4));
        assert_eq!((mv.min_before, mv.min_after), (1.0, 1.0));
        assert_eq!(mv.shortfall_before - mv.shortfall_after, 2.0);
        // All of the mover's 2 tokens/s·blocks go below the mean: a threshold above 100% is
        // not met.
        assert_eq!(should_move(&swarm, &0, 8, 1.5), None);
        // The single servers stay: leaving would uncover their blocks.
        for p in 10..13 {
            assert_eq!(should_move(&swarm, &p, 8, 0.2), None, "{p}");
        }
        // After the move, the next crowded server goes to the next weak run, not back.
        let after = moved(&swarm, &0, mv.to);
        let next = should_move(&after, &1, 8, 0.2).expect("still worth moving");
        assert_eq!(next.to, 4..6);
        assert_eq!(should_move(&after, &0, 8, 0.2), None);
    }

    fn served_n(peer: u32, blocks: Range<u32>) -> Served<u32> {
        Served {
            peer,
            blocks,
            throughput: 1.0,
        }
    }

    #[test]
    fn a_gap_next_to_a_busy_block_still_gets_covered() {
        // Without `m`: [0, 10, 3, 3]. The least-loaded pair is 2..4, where `m` already is;
        // only 0..2 covers block 0.
        let swarm = [
            served('p', 1..2, 7.0),
            served('q', 1..4, 3.0),
            served('m', 2..4, 1.0),
        ];
        assert_eq!(
            choose_blocks(&block_throughput(&swarm[..2], 4), 2),
            Some(2..4)
        );
        let mv = should_move(&swarm, &'m', 4, 0.2).expect("covering block 0 helps");
        assert_eq!(
            (mv.from, mv.to, mv.min_before, mv.min_after),
            (2..4, 0..2, 0.0, 1.0)
        );
    }

    #[test]
    fn should_move_needs_me_and_blocks() {
        let swarm = [served('a', 0..10, 1.0), served('b', 5..5, 1.0)];
        assert_eq!(should_move(&swarm, &'z', 30, 0.0), None);
        assert_eq!(should_move(&swarm, &'b', 30, 0.0), None);
        assert_eq!(should_move(&swarm, &'a', 0, 0.0), None);
        assert_eq!(should_move::<char>(&[], &'a', 30, 0.0), None);
    }

    #[test]
    fn an_oversized_range_keeps_its_length_up_to_the_model() {
        let swarm = [served('a', 0..40, 1.0), served('b', 0..40, 1.0)];
        // Every position is the whole model, which `a` serves already.
        assert_eq!(should_move(&swarm, &'a', 30, 0.0), None);
        // `b` holds 10 blocks but only 5 of them exist; moved inside the model, all 10 count.
        let swarm = [served('a', 0..20, 1.0), served('b', 25..35, 1.0)];
        let mv = should_move(&swarm, &'b', 30, 0.0).expect("20..30 covers the gap");
        assert_eq!((mv.from, mv.to), (25..35, 20..30));
    }

    #[test]
    fn blocks_for_memory_edge_cases() {
        // 1000 bytes, 100 overhead, 100 weights + 10 tokens × 5 bytes = 150 per block: 6 fit.
        assert_eq!(blocks_for_memory(1000, 100, 100, 5, 10, 30), Some(6));
        // Exactly one block.
        assert_eq!(blocks_for_memory(250, 100, 100, 5, 10, 30), Some(1));
        // One byte short of one block.
        assert_eq!(blocks_for_memory(249, 100, 100, 5, 10, 30), None);
        // Overhead alone exceeds memory, or uses it all.
        assert_eq!(blocks_for_memory(50, 100, 1, 0, 0, 30), None);
        assert_eq!(blocks_for_memory(100, 100, 1, 0, 0, 30), None);
        // Capped at the model's size.
        assert_eq!(blocks_for_memory(u64::MAX, 0, 1, 0, 0, 30), Some(30));
        assert_eq!(
            blocks_for_memory(u64::MAX, 0, 1, 0, 0, u32::MAX),
            Some(u32::MAX)
        );
        // Free blocks all fit, even with no memory left.
        assert_eq!(blocks_for_memory(100, 100, 0, 0, 0, 30), Some(30));
        assert_eq!(blocks_for_memory(100, 100, 0, 5, 0, 30), Some(30));
        // A KV cache too large to count fits nowhere.
        assert_eq!(blocks_for_memory(u64::MAX, 0, 1, u64::MAX, 2, 30), None);
        assert_eq!(blocks_for_memory(u64::MAX, 0, u64::MAX, 1, 1, 30), None);
        // No model, nothing to serve.
        assert_eq!(blocks_for_memory(1000, 0, 1, 0, 0, 0), None);
    }

    /// Small random swarms: ranges within `0..block_count + 2` (so some overhang the model),
    /// whole-number throughputs including 0 so that ties and exact comparisons are common.
    fn swarm(max_blocks: u32, max_servers: usize) -> impl Strategy<Value = (u32, Vec<Served<u8>>)> {
        (1..=max_blocks).prop_flat_map(move |block_count| {
            let server = (0..block_count + 2, 1..=block_count, 0u8..4)
                .prop_map(|(start, len, t)| (start..start + len, f64::from(t)));
            (
                Just(block_count),
                prop::collection::vec(server, 1..=max_servers).prop_map(|servers| {
                    servers
                        .into_iter()
                        .zip(0u8..)
                        .map(|((blocks, throughput), peer)| Served {
                            peer,
                            blocks,
                            throughput,
                        })
                        .collect()
                }),
            )
        })
    }

    proptest! {
        #[test]
        fn choose_blocks_matches_brute_force(
            throughput in prop::collection::vec(0u8..5, 1..40),
            n in 1u32..45,
        ) {
            let throughput: Vec<f64> = throughput.into_iter().map(f64::from).collect();
            let len = throughput.len() as u32;
            let chosen = choose_blocks(&throughput, n);
            if n > len {
                prop_assert_eq!(chosen, None);
                return Ok(());
            }
            let run = chosen.expect("n fits");
            prop_assert_eq!(run.end - run.start, n);
            prop_assert!(run.end <= len);
            let sum = |start: u32| -> f64 {
                throughput[start as usize..(start + n) as usize].iter().sum()
            };
            let best = (0..=len - n).map(sum).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(sum(run.start), best);
            prop_assert!((0..run.start).all(|start| sum(start) > best), "not the lowest start");
        }

        #[test]
        fn moves_never_lower_the_minimum_and_keep_coverage(
            (block_count, servers) in swarm(24, 8),
            me in 0u8..8,
            min_gain in 0.0f64..1.0,
        ) {
            let Some(mv) = should_move(&servers, &me, block_count, min_gain) else {
                return Ok(());
            };
            let mine = servers.iter().find(|s| s.peer == me).expect("me is listed");
            prop_assert_eq!(&mv.from, &mine.blocks);
            prop_assert_ne!(&mv.to, &mv.from);
            prop_assert!(mv.to.end <= block_count);
            prop_assert_eq!(
                mv.to.end - mv.to.start,
                (mv.from.end - mv.from.start).min(block_count)
            );

            let after = moved(&servers, &me, mv.to.clone());
            prop_assert_eq!(mv.min_before, swarm_min(&servers, block_count));
            prop_assert_eq!(mv.min_after, swarm_min(&after, block_count));
            prop_assert!(mv.min_after >= mv.min_before);
            let n = f64::from(mv.to.end - mv.to.start);
            prop_assert!(
                mv.min_after > mv.min_before * (1.0 + min_gain)
                    || mv.shortfall_before - mv.shortfall_after
                        > min_gain.max(1e-9) * mine.throughput.max(0.0) * n,
                "{:?}", mv
            );

            let before = covered(&servers, block_count);
            let now = covered(&after, block_count);
            for (block, (was, is)) in before.iter().zip(&now).enumerate() {
                prop_assert!(!was || *is, "block {} uncovered by {:?}", block, mv);
            }
        }

        #[test]
        fn no_move_means_no_better_position(
            (block_count, servers) in swarm(16, 6),
            me in 0u8..6,
        ) {
            prop_assume!(should_move(&servers, &me, block_count, 0.0).is_none());
            let Some(mine) = servers.iter().find(|s| s.peer == me) else {
                return Ok(());
            };
            let n = (mine.blocks.end - mine.blocks.start).min(block_count);
            let now = swarm_min(&servers, block_count);
            for start in 0..=block_count - n {
                let after = moved(&servers, &me, start..start + n);
                let min = swarm_min(&after, block_count);
                prop_assert!(
                    min <= now,
                    "moving {} to {:?} raises the minimum from {} to {}",
                    me, start..start + n, now, min
                );
            }
        }

        #[test]
        fn servers_taking_turns_settle(
            (block_count, servers) in swarm(16, 6),
        ) {
            // Each move raises the swarm minimum, or keeps it and lowers the shortfall, so
            // there is no cycle; bound the rounds generously to catch one anyway.
            let mut servers = servers;
            let mut settled = false;
            for _ in 0..1000 {
                let mut moved_any = false;
                for i in 0..servers.len() {
                    let me = servers[i].peer;
                    if let Some(mv) = should_move(&servers, &me, block_count, 0.0) {
                        servers = moved(&servers, &me, mv.to);
                        moved_any = true;
                    }
                }
                if !moved_any {
                    settled = true;
                    break;
                }
            }
            prop_assert!(settled);
        }
    }
}
