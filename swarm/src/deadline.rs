//! Deadlines from durations that came from elsewhere (a flag, a config, a library caller).
//!
//! `Instant + Duration` panics when the sum passes what the clock can represent, and
//! `Duration + Duration` when it passes `u64::MAX` seconds, so a timeout of
//! `Duration::MAX` ("no limit", or a typo) would take a node down where it is first added to
//! the clock. Flags are bounded where they are parsed; these helpers keep the arithmetic safe
//! for every other caller, by treating anything past [`LONGEST`] as [`LONGEST`].

use std::time::Duration;

/// The longest wait a deadline is set for: thirty years, which is "never" for a process and
/// still far inside what any platform's monotonic clock adds without overflow.
pub const LONGEST: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `d`, or [`LONGEST`] if it is longer: safe to add to any `Instant` taken now.
pub fn bounded(d: Duration) -> Duration {
    d.min(LONGEST)
}

/// The moment `d` from now (at most [`LONGEST`] from now), on tokio's clock.
pub fn after(d: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + bounded(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_duration_makes_a_deadline_without_overflow() {
        for d in [Duration::ZERO, Duration::from_secs(5), Duration::MAX] {
            let before = tokio::time::Instant::now();
            assert!(after(d) >= before + d.min(LONGEST));
        }
        assert_eq!(bounded(Duration::MAX), LONGEST);
        assert_eq!(bounded(Duration::from_secs(5)), Duration::from_secs(5));
        let _ = std::time::Instant::now() + bounded(Duration::MAX);
    }
}
