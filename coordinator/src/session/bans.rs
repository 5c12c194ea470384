//! Peers that failed recently, kept out of routes for a while that grows with each failure.

use std::collections::HashMap;

use libp2p::PeerId;

#[derive(Debug, Default)]
pub struct Bans {
    entries: HashMap<PeerId, (u64, u32)>,
}

/// First ban length; doubled for each further failure of the same peer, up to `MAX_BAN_MS`.
const BASE_BAN_MS: u64 = 2_000;
const MAX_BAN_MS: u64 = 120_000;
/// For every this long a peer goes without failing after its ban ended, one of its failures
/// is forgiven: a peer that failed once in a while (or was banned for a passing problem) comes
/// back to short bans instead of carrying the maximum forever.
pub const FORGIVE_AFTER_MS: u64 = 60_000;

impl Bans {
    /// Bans `peer` from `now_ms`; returns the end of the ban.
    pub fn ban(&mut self, peer: PeerId, now_ms: u64) -> u64 {
        // Peers whose every failure is forgiven need no entry (and the table stays bounded by
        // the peers that failed recently).
        self.entries.retain(|_, &mut (until, failures)| {
            now_ms < until || forgiven(until, failures, now_ms) > 0
        });
        let entry = self.entries.entry(peer).or_insert((0, 0));
        entry.1 = forgiven(entry.0, entry.1, now_ms).saturating_add(1);
        let len = BASE_BAN_MS
            .saturating_mul(1u64 << (entry.1 - 1).min(16))
            .min(MAX_BAN_MS);
        entry.0 = now_ms + len;
        entry.0
    }

    /// Peer → end of ban, for the planner.
    pub fn snapshot(&self) -> HashMap<PeerId, u64> {
        self.entries
            .iter()
            .map(|(p, (until, _))| (*p, *until))
            .collect()
    }
}

/// `failures` less one for each [`FORGIVE_AFTER_MS`] that passed since the ban ended at `until`.
fn forgiven(until: u64, failures: u32, now_ms: u64) -> u32 {
    let quiet = now_ms.saturating_sub(until) / FORGIVE_AFTER_MS;
    failures.saturating_sub(u32::try_from(quiet).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_back_off_up_to_a_cap() {
        let mut b = Bans::default();
        let p = PeerId::random();
        assert_eq!(b.ban(p, 0), 2_000);
        assert_eq!(b.ban(p, 0), 4_000);
        assert_eq!(b.ban(p, 0), 8_000);
        for _ in 0..20 {
            b.ban(p, 0);
        }
        assert_eq!(b.ban(p, 1_000), 1_000 + MAX_BAN_MS);
        assert_eq!(b.snapshot()[&p], 1_000 + MAX_BAN_MS);
    }

    #[test]
    fn failures_are_forgiven_after_quiet_periods() {
        let mut b = Bans::default();
        let p = PeerId::random();
        for _ in 0..20 {
            b.ban(p, 0);
        }
        assert_eq!(b.ban(p, 0), MAX_BAN_MS);
        // Failing again right after the ban keeps the maximum.
        assert_eq!(b.ban(p, MAX_BAN_MS), 2 * MAX_BAN_MS);
        // A long quiet spell forgives every failure: the next ban is the first one's length.
        let later = 2 * MAX_BAN_MS + 100 * FORGIVE_AFTER_MS;
        assert_eq!(b.ban(p, later), later + BASE_BAN_MS);
        // Two quiet periods after a third failure's ban leave one failure: the next is the second.
        let q = PeerId::random();
        for _ in 0..3 {
            b.ban(q, 0);
        }
        let at = 8_000 + 2 * FORGIVE_AFTER_MS;
        assert_eq!(b.ban(q, at), at + 2 * BASE_BAN_MS);
    }

    #[test]
    fn forgiven_peers_leave_the_table() {
        let mut b = Bans::default();
        let (p, q) = (PeerId::random(), PeerId::random());
        b.ban(p, 0);
        b.ban(q, 10 * FORGIVE_AFTER_MS);
        assert_eq!(b.snapshot().len(), 1);
        assert!(b.snapshot().contains_key(&q));
    }
}
