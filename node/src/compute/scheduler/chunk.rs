//! How much of the waiting prompts one iteration runs: whole rows while nobody else is
//! decoding, row-blocks (possibly one row through part of the span) while others are, and how
//! either size follows the measured iteration time.

use std::ops::Range;

use super::{Pending, Rows};

/// How much prompt work an iteration may take.
#[derive(Clone, Copy)]
pub(super) enum Budget {
    /// Whole rows through the whole span (nobody else is decoding).
    Rows(usize),
    /// Row-blocks, possibly one row through part of the span (others are decoding).
    RowBlocks(usize),
}

impl Budget {
    pub(super) fn spent(&self) -> bool {
        matches!(self, Budget::Rows(0) | Budget::RowBlocks(0))
    }

    pub(super) fn take(&mut self, work: usize) {
        match self {
            Budget::Rows(n) | Budget::RowBlocks(n) => *n = n.saturating_sub(work),
        }
    }

    /// What of `p`'s prompt (over blocks `span`) runs in this iteration, the work it takes in
    /// the budget's units, and whether the budget (not the prompt's end) cut it.
    pub(super) fn cut(&self, p: &Pending, span: &Range<usize>) -> (Rows, usize, bool) {
        let rows = |count, blocks| Rows {
            id: 0,
            count,
            blocks,
        };
        match (*self, &p.carry) {
            // Nobody else is decoding: rows part of the way through go the rest of it.
            (Budget::Rows(_), Some(c)) => {
                let n = c.hidden.tokens;
                (rows(n, c.next_block..span.end), n, false)
            }
            (Budget::Rows(n), None) => {
                let count = p.remaining().min(n);
                (rows(count, span.clone()), count, count == n)
            }
            (Budget::RowBlocks(w), Some(c)) => {
                let n = c.hidden.tokens;
                let blocks = (w / n).clamp(1, span.end - c.next_block);
                let end = c.next_block + blocks;
                (rows(n, c.next_block..end), n * blocks, n * blocks >= w)
            }
            (Budget::RowBlocks(w), None) if w >= span.len() => {
                let whole = w / span.len();
                let count = p.remaining().min(whole);
                (
                    rows(count, span.clone()),
                    count * span.len(),
                    count == whole,
                )
            }
            (Budget::RowBlocks(w), None) => {
                let end = span.start + w.max(1);
                (rows(1, span.start..end), w.max(1), true)
            }
        }
    }
}

/// `chunk` moved halfway towards the size that would have taken `target_ms` in an iteration
/// that took `ms` with it (bounded by `min` and `max`), rounded towards the ideal so that the
/// bounds are reached rather than approached.
pub(super) fn resized(chunk: usize, ms: f64, target_ms: f64, min: usize, max: usize) -> usize {
    if ms <= 0.0 || !ms.is_finite() {
        return chunk;
    }
    let ideal = (chunk as f64 * target_ms / ms).clamp(min as f64, max as f64);
    let half = (chunk as f64 + ideal) / 2.0;
    if ideal < chunk as f64 {
        half.floor()
    } else {
        half.ceil()
    }
    .max(min as f64) as usize
}
