//! Which element type hidden states take on a link: one dtype for every step, or, with `auto`,
//! chosen per step and per link by whoever sends them.
//!
//! Why this rule (measured in the namespace bench, BENCHMARKS.md "Homes behind NAT"): on an
//! LTE-class link a prompt's hidden states cost round trips, not bandwidth. A transfer on a
//! connection that was idle starts in TCP or QUIC slow start, about 14 KB in the first round
//! trip and twice as much in each after, so halving the bytes of a large step saves one round
//! trip per link it crosses (at 70 ms between two LTE homes, 140 ms of each of the four links a
//! pushed prompt crosses), while a one-row decode step (2.3 KB at width 576) fits in the first
//! round trip whatever its type. So decode steps, small steps and fast links stay f32 and
//! bit-exact; large steps on links with a long round trip go as f16, which agreed with f32 on
//! 98.9% of greedy tokens (bf16 has the same size and agrees less). On a slow link (a few
//! Mbit/s) the bytes themselves dominate: there q8, which changes one greedy pick in twenty,
//! pays for itself when it saves at least [`AUTO_Q8_MIN_SAVING`] of wire time on the link; and
//! f16 is also right on a link with a short round trip but a low rate, once it saves
//! [`AUTO_F16_MIN_SAVING`]. The rate is the link's, as the receiver measured it on earlier
//! large frames ([`crate::arrival`]); a link not measured yet is judged by its round trip alone.

use std::time::Duration;

use crate::v1::Dtype;

/// Steps whose f32 hidden states are smaller than this fit in the first two round trips of
/// slow start: halving them saves nothing.
pub const AUTO_MIN_BYTES: usize = 32 * 1024;
/// Links with a shorter round trip than this stay exact unless their rate is low: a round trip
/// saved is worth less than the changed picks.
pub const AUTO_MIN_RTT: Duration = Duration::from_millis(20);
/// f16 instead of f32 on a link whose measured rate makes the difference at least this much.
pub const AUTO_F16_MIN_SAVING: Duration = Duration::from_millis(50);
/// q8 instead of f16 on a link whose measured rate makes the difference at least this much:
/// twice f16's bar, for three times the changed picks.
pub const AUTO_Q8_MIN_SAVING: Duration = Duration::from_millis(100);

/// How hidden states are typed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Every step in this dtype (f32 is bit-exact).
    Fixed(Dtype),
    /// Each sender picks per step from the step's size and what it measured of its link to
    /// the receiver ([`auto_dtype`]).
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

/// What a sender knows of its link to a receiver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Round trip (ping, or the session open's), if measured.
    pub rtt: Option<Duration>,
    /// Bytes per second the receiver saw arrive on earlier large frames, if any.
    pub rate: Option<u64>,
}

impl Link {
    /// The measured rate in kbit/s, for logs; saturating, since a peer reports the rate of a
    /// link to it and may send any number.
    pub fn rate_kbit_s(&self) -> Option<u64> {
        self.rate.map(|r| r.saturating_mul(8) / 1000)
    }
}

/// The dtype for sending `rows` hidden states of width `dim` over `link`. An unmeasured link
/// stays exact.
pub fn auto_dtype(rows: usize, dim: usize, link: Link) -> Dtype {
    let bytes = rows.saturating_mul(dim).saturating_mul(4);
    if rows <= 1 || bytes < AUTO_MIN_BYTES {
        return Dtype::F32;
    }
    // Wire time saved by sending `saved` fewer bytes at the measured rate.
    let saves = |saved: usize, bar: Duration| match link.rate {
        Some(rate) if rate > 0 => saved as f64 / rate as f64 >= bar.as_secs_f64(),
        _ => false,
    };
    // f16 halves f32's bytes; q8 (one byte a value and a 4-byte scale a row) halves f16's.
    let f16_bytes = bytes / 2;
    let q8_bytes = rows.saturating_mul(dim.saturating_add(4));
    if saves(f16_bytes.saturating_sub(q8_bytes), AUTO_Q8_MIN_SAVING) {
        Dtype::Q8Row
    } else if saves(bytes - f16_bytes, AUTO_F16_MIN_SAVING)
        || link.rtt.is_some_and(|rtt| rtt >= AUTO_MIN_RTT)
    {
        Dtype::F16
    } else {
        Dtype::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtt(ms: u64) -> Link {
        Link {
            rtt: Some(Duration::from_millis(ms)),
            rate: None,
        }
    }

    fn mbit(m: f64, rtt_ms: u64) -> Link {
        Link {
            rtt: Some(Duration::from_millis(rtt_ms)),
            rate: Some((m * 1e6 / 8.0) as u64),
        }
    }

    #[test]
    fn decode_steps_small_steps_fast_and_unmeasured_links_stay_exact() {
        assert_eq!(auto_dtype(1, 4096, rtt(500)), Dtype::F32);
        assert_eq!(auto_dtype(1, 4096, mbit(0.1, 500)), Dtype::F32);
        assert_eq!(auto_dtype(8, 576, rtt(500)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, rtt(5)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, mbit(1000.0, 1)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, Link::default()), Dtype::F32);
        assert_eq!(Wire::Auto.session_dtype(), Dtype::F32);
    }

    #[test]
    fn a_prompt_goes_f16_over_lte_and_q8_over_a_few_mbit() {
        // 128 rows of SmolLM2's width: 295 kB in f32.
        assert_eq!(auto_dtype(128, 576, rtt(70)), Dtype::F16);
        assert_eq!(auto_dtype(128, 576, mbit(30.0, 70)), Dtype::F16);
        assert_eq!(auto_dtype(128, 576, mbit(3.0, 70)), Dtype::Q8Row);
        // A slow link with a short round trip: f16 once it saves 50 ms, q8 once 100 ms.
        assert_eq!(auto_dtype(128, 576, mbit(20.0, 2)), Dtype::F16);
        assert_eq!(auto_dtype(128, 576, mbit(3.0, 2)), Dtype::Q8Row);
        // A long prompt makes q8 pay on a faster link.
        assert_eq!(auto_dtype(1024, 576, mbit(30.0, 70)), Dtype::Q8Row);
    }

    #[test]
    fn a_forged_rate_picks_a_dtype_and_logs_without_overflow() {
        let forged = |rate| Link {
            rtt: Some(Duration::from_millis(1)),
            rate: Some(rate),
        };
        assert_eq!(auto_dtype(128, 576, forged(u64::MAX)), Dtype::F32);
        assert_eq!(auto_dtype(128, 576, forged(1)), Dtype::Q8Row);
        assert_eq!(forged(u64::MAX).rate_kbit_s(), Some(u64::MAX / 1000));
        assert_eq!(forged(3_000_000 / 8).rate_kbit_s(), Some(3_000));
    }

    proptest::proptest! {
        /// A longer round trip, a lower rate or a larger step never makes the choice more
        /// exact, and the choice is only ever f32, f16 or q8.
        #[test]
        fn the_choice_is_monotone(
            rows in 0usize..4096,
            dim in 1usize..8192,
            rtt_ms in 0u64..1000,
            rate in proptest::option::of(1u64..1_000_000_000),
        ) {
            let rank = |d: Dtype| match d {
                Dtype::F32 => 0,
                Dtype::F16 => 1,
                Dtype::Q8Row => 2,
                other => panic!("{other:?} is never chosen"),
            };
            let link = Link { rtt: Some(Duration::from_millis(rtt_ms)), rate };
            let d = rank(auto_dtype(rows, dim, link));
            let longer = Link { rtt: Some(Duration::from_millis(rtt_ms + 10)), ..link };
            let slower = Link { rate: rate.map(|r| r / 2 + 1), ..link };
            proptest::prop_assert!(rank(auto_dtype(rows, dim, longer)) >= d);
            proptest::prop_assert!(rank(auto_dtype(rows, dim, slower)) >= d);
            proptest::prop_assert!(rank(auto_dtype(rows + 1, dim, link)) >= d);
        }
    }
}
