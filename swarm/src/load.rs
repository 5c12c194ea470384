//! The load a server announces with its record: how busy it says it is.
//!
//! Clients fold it into the route cost so that they spread over the swarm instead of all
//! planning the same route onto the fastest peers. It is a claim like everything else in a
//! record: signed by its owner (so nobody can make another peer look busy or idle), bounded
//! here (so no number can overflow a cost), and used only to ADD cost to the server that
//! announced it. The worst a lying server can do is look idle, which makes it no better than
//! its announced speed already says; looking busy only drives clients away from itself.

use proto::v1::ServerRecord;

/// Sessions a record may claim to accept. Far above what a home device holds; the bound only
/// keeps the arithmetic of readers in range.
pub const MAX_ANNOUNCED_SESSIONS: u32 = 4096;

/// What a server says about its load, bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Sessions open, at most `max_sessions` (when that is known).
    pub sessions: u32,
    /// Sessions it accepts; 0 when the server did not say (an older node).
    pub max_sessions: u32,
    /// Steps waiting for or in its compute thread, at most twice `max_sessions` (its queue
    /// bound) when that is known.
    pub waiting_steps: u32,
}

impl Load {
    /// The load fields of an entry from the network, clamped to what a server can hold.
    pub fn from_record(r: &ServerRecord) -> Self {
        let max_sessions = r.max_sessions.min(MAX_ANNOUNCED_SESSIONS);
        let cap = if max_sessions == 0 {
            MAX_ANNOUNCED_SESSIONS
        } else {
            max_sessions
        };
        Self {
            sessions: r.sessions.min(cap),
            max_sessions,
            waiting_steps: r.waiting_steps.min(cap.saturating_mul(2)),
        }
    }

    /// Whether the server said it takes no more sessions.
    pub fn full(&self) -> bool {
        self.max_sessions > 0 && self.sessions >= self.max_sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_clamped_to_what_a_server_holds() {
        let r = ServerRecord {
            sessions: u32::MAX,
            max_sessions: 8,
            waiting_steps: u32::MAX,
            ..Default::default()
        };
        let l = Load::from_record(&r);
        assert_eq!((l.sessions, l.max_sessions, l.waiting_steps), (8, 8, 16));
        assert!(l.full());

        let r = ServerRecord {
            sessions: u32::MAX,
            max_sessions: u32::MAX,
            waiting_steps: u32::MAX,
            ..Default::default()
        };
        let l = Load::from_record(&r);
        assert_eq!(l.max_sessions, MAX_ANNOUNCED_SESSIONS);
        assert_eq!(l.sessions, MAX_ANNOUNCED_SESSIONS);
        assert_eq!(l.waiting_steps, 2 * MAX_ANNOUNCED_SESSIONS);

        // An older node says nothing: no load, never full.
        let l = Load::from_record(&ServerRecord::default());
        assert_eq!(l, Load::default());
        assert!(!l.full());
    }
}
