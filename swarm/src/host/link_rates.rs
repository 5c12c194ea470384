//! The measured rates of this peer's links, per remote peer and direction, so that a sender
//! under `--wire-dtype auto` can tell a slow link from a fast one ([`proto::auto_dtype`]).
//!
//! Nothing extra is sent to learn them: a large frame is timed as it arrives
//! ([`proto::arrival`]). What we receive we measure ourselves; what we send, the receiver
//! measures and reports back (a node in its step answers and push acknowledgements, a client
//! in its steps). Each entry is keyed by the authenticated peer of the connection it came over,
//! so a peer can only ever say something about its own link. The latest measure wins: a link's
//! rate changes with its load, and the last large frame is the best guess for the next.

use std::collections::HashMap;
use std::sync::Mutex;

use libp2p::PeerId;

/// Peers remembered at most; the least recently measured is forgotten first.
const MAX_PEERS: usize = 4096;

#[derive(Default)]
pub(crate) struct LinkRates {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    peers: HashMap<PeerId, Rates>,
    /// Counts measurements, to know which entry is the oldest.
    clock: u64,
}

#[derive(Default, Clone, Copy)]
struct Rates {
    /// Bytes/s of our frames arriving at the peer, as it reported.
    to: Option<u64>,
    /// Bytes/s of the peer's frames arriving here.
    from: Option<u64>,
    updated: u64,
}

/// Which way a rate was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From us to the peer.
    To,
    /// From the peer to us.
    From,
}

impl LinkRates {
    pub(crate) fn get(&self, peer: PeerId, dir: Direction) -> Option<u64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let r = inner.peers.get(&peer)?;
        match dir {
            Direction::To => r.to,
            Direction::From => r.from,
        }
    }

    /// Keeps `rate` (bytes/s) as the latest measure of the link to or from `peer`; zero is
    /// "not measured" on the wire and changes nothing.
    pub(crate) fn set(&self, peer: PeerId, dir: Direction, rate: u64) {
        if rate == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let clock = inner.clock;
        if inner.peers.len() >= MAX_PEERS && !inner.peers.contains_key(&peer) {
            let oldest = inner.peers.iter().min_by_key(|(_, r)| r.updated);
            if let Some(oldest) = oldest.map(|(p, _)| *p) {
                inner.peers.remove(&oldest);
            }
        }
        let r = inner.peers.entry(peer).or_default();
        match dir {
            Direction::To => r.to = Some(rate),
            Direction::From => r.from = Some(rate),
        }
        r.updated = clock;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_direction_keeps_its_latest_measure_and_zero_is_ignored() {
        let rates = LinkRates::default();
        let p = PeerId::random();
        assert_eq!(rates.get(p, Direction::To), None);
        rates.set(p, Direction::To, 1_000);
        rates.set(p, Direction::To, 2_000);
        rates.set(p, Direction::To, 0);
        rates.set(p, Direction::From, 5);
        assert_eq!(rates.get(p, Direction::To), Some(2_000));
        assert_eq!(rates.get(p, Direction::From), Some(5));
        assert_eq!(rates.get(PeerId::random(), Direction::From), None);
    }

    #[test]
    fn many_peers_forget_the_least_recently_measured_first() {
        let rates = LinkRates::default();
        let first = PeerId::random();
        let kept = PeerId::random();
        rates.set(first, Direction::To, 1);
        rates.set(kept, Direction::To, 2);
        for _ in 0..MAX_PEERS - 2 {
            rates.set(PeerId::random(), Direction::From, 3);
        }
        // Full: measuring `kept` again makes `first` the oldest, and the next peer evicts it.
        rates.set(kept, Direction::From, 4);
        rates.set(PeerId::random(), Direction::To, 5);
        assert_eq!(rates.get(first, Direction::To), None);
        assert_eq!(rates.get(kept, Direction::To), Some(2));
        assert_eq!(rates.inner.lock().unwrap().peers.len(), MAX_PEERS);
    }
}
