//! Which element type hidden states take on a link: one dtype for every step, or, with `auto`,
//! chosen per step and per link by whoever sends them.
//!
//! Why this rule (measured in the namespace bench, BENCHMARKS.md "Homes behind NAT"): on a
//! slow link a prompt's hidden states cost round trips, not bandwidth. A transfer on a
//! connection that was idle starts in TCP or QUIC slow start, about 14 KB in the first round
//! trip and twice as much in each after, so halving the bytes of a large step saves one round
//! trip per link it crosses (at 70 ms between two LTE homes, 140 ms of each of the four links a
//! pushed prompt crosses), while a one-row decode step (2.3 KB at width 576) fits in the first
//! round trip whatever its type. So decode steps, small steps and fast links stay f32 and
//! bit-exact; large steps on links with a long round trip go as f16, which agreed with f32 on
//! 98.9% of greedy tokens (bf16 has the same size and agrees less; q8 saves one more round
//! trip only on much larger steps and changed the first token of the bench's prompt).

use std::time::Duration;

use crate::v1::Dtype;

/// Steps whose f32 hidden states are smaller than this fit in the first two round trips of
/// slow start: halving them saves nothing.
pub const AUTO_MIN_BYTES: usize = 32 * 1024;
/// Links with a shorter round trip than this stay exact: a round trip saved is worth less than
/// the changed picks.
pub const AUTO_MIN_RTT: Duration = Duration::from_millis(20);

/// How hidden states are typed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Every step in this dtype (f32 is bit-exact).
    Fixed(Dtype),
    /// Each sender picks per step from the step's size and its measured round trip to the
    /// receiver ([`auto_dtype`]).
    Auto,
}

impl Wire {
    /// The dtype a session opens with: the fixed one, or f32 under `Auto` (which then only
    /// ever trades exactness for time where [`auto_dtype`] says it pays).
    pub fn session_dtype(self) -> Dtype {
        match self {
            Wire::Fixed(d) => d,
            Wire::Auto => Dtype::F32,
        }
    }
}

/// The dtype for sending `rows` hidden states of width `dim` over a link whose round trip is
/// `rtt` (`None`: not measured yet, which stays exact).
pub fn auto_dtype(rows: usize, dim: usize, rtt: Option<Duration>) -> Dtype {
    let bytes = rows.saturating_mul(dim).saturating_mul(4);
    match rtt {
        Some(rtt) if rows > 1 && bytes >= AUTO_MIN_BYTES && rtt >= AUTO_MIN_RTT => Dtype::F16,
        _ => Dtype::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn decode_steps_small_steps_fast_and_unmeasured_links_stay_exact() {
        assert_eq!(auto_dtype(1, 4096, ms(500)), Dtype::F32);
        assert_eq!(auto_dtype(8, 576, ms(500)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, ms(5)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, None), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, ms(70)), Dtype::F16);
        assert_eq!(Wire::Auto.session_dtype(), Dtype::F32);
    }

    proptest::proptest! {
        /// A longer round trip or a larger step never makes the choice more exact, and the
        /// choice is only ever f32 or f16.
        #[test]
        fn the_choice_is_monotone(rows in 0usize..4096, dim in 1usize..8192, rtt in 0u64..1000) {
            let d = auto_dtype(rows, dim, ms(rtt));
            proptest::prop_assert!(d == Dtype::F32 || d == Dtype::F16);
            if d == Dtype::F16 {
                proptest::prop_assert_eq!(auto_dtype(rows, dim, ms(rtt + 10)), Dtype::F16);
                proptest::prop_assert_eq!(auto_dtype(rows + 1, dim, ms(rtt)), Dtype::F16);
            }
        }
    }
}
