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

impl Bans {
    /// Bans `peer` from `now_ms`; returns the end of the ban.
    pub fn ban(&mut self, peer: PeerId, now_ms: u64) -> u64 {
        let entry = self.entries.entry(peer).or_insert((0, 0));
        entry.1 = entry.1.saturating_add(1);
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
}
