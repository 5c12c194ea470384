//! A peer's compute as the node's batching scheduler runs it, reduced to arithmetic.
//!
//! The scheduler runs iterations: each one computes, in one batched product per block, the
//! ready step of every session that has one. A step that arrives while an iteration runs
//! waits for the next one, which starts when the running one ends and takes every step that
//! arrived in between. An iteration of `b` rows costs a lone step's time times
//! `1 + slope·(b − 1)`: on the measured curve (`cargo bench -p model --bench batch`, 8 decode
//! rows at 1.9x the tokens/s of one) a CPU's slope is about 0.46.
//!
//! Steps are priced when they are sent (the simulator knows their arrival time then), so each
//! row joining the next iteration finishes when the rows before it and itself are done; rows
//! joining later do not delay it. Rows beyond `max_rows` (more steps than sessions a node
//! takes, which only steps of sessions opened before a move can cause) cost a full step each.
//!
//! A step pushed node to node is priced at every span when the client sends it, so a peer is
//! asked about arrivals up to a whole chain ahead, and a step priced later may arrive earlier
//! than one priced before it. So the peer keeps every iteration that has not ended yet (a
//! handful: the chain's time ahead over an iteration's length), and a step joins the one it
//! would have joined had the steps been priced in the order they arrive: the iteration after
//! the one running when it arrives, or one of its own if the peer is idle then. Iterations
//! after it move back as far as it makes them overlap; the rows already priced in them keep
//! their times, like rows that join an iteration after them.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug)]
struct Iteration {
    start: f64,
    end: f64,
    rows: u32,
}

/// The iterations not ended yet, in time order: back to back while the peer is busy, with
/// gaps where it is idle.
#[derive(Clone, Debug, Default)]
pub struct Batcher {
    iterations: VecDeque<Iteration>,
}

impl Batcher {
    /// When a step arriving at `arrive` (ms, not before `now`) is done, if it costs `cost` ms
    /// alone.
    pub fn step(&mut self, now: f64, arrive: f64, cost: f64, slope: f64, max_rows: u32) -> f64 {
        self.forget(now);
        let its = &mut self.iterations;
        // The last iteration started by `arrive`: the one running then, if it has not ended.
        let k = its.iter().rposition(|it| it.start <= arrive);
        let at = match k {
            Some(k) if arrive < its[k].end => {
                let running_end = its[k].end;
                match its.get_mut(k + 1) {
                    // The next iteration already formed behind the running one: one more row.
                    Some(next) if next.start == running_end => {
                        next.end += if next.rows < max_rows {
                            slope * cost
                        } else {
                            cost
                        };
                        next.rows += 1;
                    }
                    _ => its.insert(
                        k + 1,
                        Iteration {
                            start: running_end,
                            end: running_end + cost,
                            rows: 1,
                        },
                    ),
                }
                k + 1
            }
            // Idle: the step starts an iteration of its own.
            _ => {
                let at = k.map_or(0, |k| k + 1);
                its.insert(
                    at,
                    Iteration {
                        start: arrive,
                        end: arrive + cost,
                        rows: 1,
                    },
                );
                at
            }
        };
        let done = its[at].end;
        let mut end = done;
        for it in its.range_mut(at + 1..) {
            if it.start >= end {
                break;
            }
            let late = end - it.start;
            it.start += late;
            it.end += late;
            end = it.end;
        }
        done
    }

    /// Steps received and not answered at `now`: what the node announces as waiting.
    pub fn waiting(&mut self, now: f64) -> u32 {
        self.forget(now);
        let mut its = self.iterations.iter();
        match its.next() {
            Some(running) if running.start <= now => {
                let next = its.next().filter(|n| n.start == running.end);
                1 + next.map_or(0, |n| n.rows)
            }
            _ => 0,
        }
    }

    /// Iterations ended by `now` matter no more: no step arrives before `now`.
    fn forget(&mut self, now: f64) {
        while self.iterations.front().is_some_and(|it| it.end <= now) {
            self.iterations.pop_front();
        }
    }

    /// A move drops every session: nothing waits any more after the iteration running `now`.
    pub fn reset(&mut self, now: f64) {
        self.forget(now);
        let running = usize::from(self.iterations.front().is_some_and(|it| it.start <= now));
        self.iterations.truncate(running);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_arriving_together_share_one_iteration_at_the_batch_price() {
        let mut b = Batcher::default();
        // Idle: alone, at full price.
        assert_eq!(b.step(0.0, 0.0, 10.0, 0.5, 8), 10.0);
        // Three arrive during it: the next iteration runs 10..(10 + 10 + 2·5).
        assert_eq!(b.step(1.0, 1.0, 10.0, 0.5, 8), 20.0);
        assert_eq!(b.step(2.0, 2.0, 10.0, 0.5, 8), 25.0);
        assert_eq!(b.step(3.0, 3.0, 10.0, 0.5, 8), 30.0);
        assert_eq!(b.waiting(3.0), 4);
        // One arriving during the second iteration waits for the third.
        assert_eq!(b.step(12.0, 12.0, 10.0, 0.5, 8), 40.0);
        assert_eq!(b.waiting(12.0), 2);
        // After everything is done the peer is idle again.
        assert_eq!(b.waiting(50.0), 0);
        assert_eq!(b.step(50.0, 50.0, 4.0, 0.5, 8), 54.0);
    }

    #[test]
    fn a_step_priced_after_a_later_one_is_not_put_behind_it() {
        let mut b = Batcher::default();
        // At 0, a pushed step priced a whole chain ahead: the peer computes it over 100..110.
        assert_eq!(b.step(0.0, 100.0, 10.0, 0.5, 8), 110.0);
        // Nothing has arrived yet.
        assert_eq!(b.waiting(0.0), 0);
        // Arriving at 20 the peer is idle, and done well before 100.
        assert_eq!(b.step(0.0, 20.0, 10.0, 0.5, 8), 30.0);
        // Arriving at 95 it is idle too and starts at once; the step arriving at 100 then
        // waits for it, and its iteration moves to 105..115.
        assert_eq!(b.step(0.0, 95.0, 10.0, 0.5, 8), 105.0);
        assert_eq!(b.step(0.0, 105.0, 10.0, 0.5, 8), 125.0);
        assert_eq!(b.step(0.0, 120.0, 10.0, 0.5, 8), 135.0);
        // One arriving at 112, while 105..115 runs, joins the next iteration (115..125) as a
        // second row, and the one behind that moves back as much.
        assert_eq!(b.step(0.0, 112.0, 10.0, 0.5, 8), 130.0);
        assert_eq!(b.step(0.0, 116.0, 10.0, 0.5, 8), 145.0);
        assert_eq!(b.waiting(116.0), 1 + 2);
        // A move drops what waits behind the running iteration.
        b.reset(116.0);
        assert_eq!(b.waiting(116.0), 1);
        assert_eq!(b.step(116.0, 117.0, 10.0, 0.5, 8), 140.0);
    }

    #[test]
    fn rows_beyond_the_batch_cost_a_full_step() {
        let mut b = Batcher::default();
        b.step(0.0, 0.0, 10.0, 0.5, 2);
        assert_eq!(b.step(1.0, 1.0, 10.0, 0.5, 2), 20.0);
        assert_eq!(b.step(1.0, 1.0, 10.0, 0.5, 2), 25.0);
        assert_eq!(b.step(1.0, 1.0, 10.0, 0.5, 2), 35.0);
    }
}
