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

/// The iteration running and the one forming behind it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Batcher {
    /// End of the iteration computing now (rows fixed).
    running_end: f64,
    /// End of the next iteration so far, and its rows.
    next_end: f64,
    next_rows: u32,
}

impl Batcher {
    /// When a step arriving at `arrive` (ms) is done, if it costs `cost` ms alone.
    pub fn step(&mut self, arrive: f64, cost: f64, slope: f64, max_rows: u32) -> f64 {
        self.advance(arrive);
        if arrive >= self.running_end {
            // Idle: the step starts an iteration of its own.
            self.running_end = arrive + cost;
            return self.running_end;
        }
        if self.next_rows == 0 {
            self.next_end = self.running_end + cost;
        } else if self.next_rows < max_rows {
            self.next_end += slope * cost;
        } else {
            self.next_end += cost;
        }
        self.next_rows += 1;
        self.next_end
    }

    /// Steps received and not answered at `now`: what the node announces as waiting.
    pub fn waiting(&mut self, now: f64) -> u32 {
        self.advance(now);
        let running = u32::from(now < self.running_end);
        running + self.next_rows
    }

    /// The next iteration starts when the running one ends.
    fn advance(&mut self, now: f64) {
        if now >= self.running_end && self.next_rows > 0 {
            self.running_end = self.next_end;
            self.next_rows = 0;
        }
    }

    /// A move drops every session: nothing waits any more after the current iteration.
    pub fn reset(&mut self) {
        self.next_rows = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_arriving_together_share_one_iteration_at_the_batch_price() {
        let mut b = Batcher::default();
        // Idle: alone, at full price.
        assert_eq!(b.step(0.0, 10.0, 0.5, 8), 10.0);
        // Three arrive during it: the next iteration runs 10..(10 + 10 + 2·5).
        assert_eq!(b.step(1.0, 10.0, 0.5, 8), 20.0);
        assert_eq!(b.step(2.0, 10.0, 0.5, 8), 25.0);
        assert_eq!(b.step(3.0, 10.0, 0.5, 8), 30.0);
        assert_eq!(b.waiting(3.0), 4);
        // One arriving during the second iteration waits for the third.
        assert_eq!(b.step(12.0, 10.0, 0.5, 8), 40.0);
        assert_eq!(b.waiting(12.0), 2);
        // After everything is done the peer is idle again.
        assert_eq!(b.waiting(50.0), 0);
        assert_eq!(b.step(50.0, 4.0, 0.5, 8), 54.0);
    }

    #[test]
    fn rows_beyond_the_batch_cost_a_full_step() {
        let mut b = Batcher::default();
        b.step(0.0, 10.0, 0.5, 2);
        assert_eq!(b.step(1.0, 10.0, 0.5, 2), 20.0);
        assert_eq!(b.step(1.0, 10.0, 0.5, 2), 25.0);
        assert_eq!(b.step(1.0, 10.0, 0.5, 2), 35.0);
    }
}
