//! Server-to-server push: the bounds of the hops a client asks a node to forward along, and the
//! check a node runs on them before it forwards anything. Both sides take the numbers from here,
//! so a well-formed route always passes and the frames stay inside [`crate::max_step_frame`]'s
//! headroom (32 hops x 4 addresses x 128 bytes is 16 KiB).

use crate::v1::{Hop, Step};

/// libp2p stream protocol on which a node forwards its output to the next span's node.
pub const PUSH_PROTOCOL: &str = "/edge-swarm/push/1";

/// Most hops a step may name after the node it is sent to.
pub const MAX_HOPS: usize = 32;
/// Most addresses of one hop, and most bytes of each.
pub const MAX_HOP_ADDRS: usize = 4;
pub const MAX_HOP_ADDR_BYTES: usize = 128;
/// Length of a session's push token: random, so only the client that opened the session (and
/// the nodes it hands the token to) can feed it.
pub const PUSH_TOKEN_LEN: usize = 16;

/// Checks the hops of `step`, sent to a node whose span ends at `end_block`: each hop must
/// continue the previous span exactly, carry a token of the right length and keep to the
/// bounds. `Err` is a one-line reason for a BAD_REQUEST.
pub fn check_hops(step: &Step, end_block: u32) -> Result<(), String> {
    if step.next.len() > MAX_HOPS {
        return Err(format!(
            "{} hops to forward along, above the limit of {MAX_HOPS}",
            step.next.len()
        ));
    }
    let mut at = end_block;
    for (i, hop) in step.next.iter().enumerate() {
        check_hop(hop, at).map_err(|e| format!("hop {i}: {e}"))?;
        at = hop.end_block;
    }
    Ok(())
}

fn check_hop(hop: &Hop, start: u32) -> Result<(), String> {
    if hop.start_block != start || hop.end_block <= hop.start_block {
        return Err(format!(
            "blocks {}..{} do not continue the route at block {start}",
            hop.start_block, hop.end_block
        ));
    }
    if hop.push_token.len() != PUSH_TOKEN_LEN {
        return Err(format!(
            "push token of {} bytes, not {PUSH_TOKEN_LEN}",
            hop.push_token.len()
        ));
    }
    if hop.peer_id.is_empty() || hop.peer_id.len() > MAX_HOP_ADDR_BYTES {
        return Err(format!("peer id of {} bytes", hop.peer_id.len()));
    }
    if hop.addrs.len() > MAX_HOP_ADDRS || hop.addrs.iter().any(|a| a.len() > MAX_HOP_ADDR_BYTES) {
        return Err(format!(
            "more than {MAX_HOP_ADDRS} addresses or one over {MAX_HOP_ADDR_BYTES} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(start: u32, end: u32) -> Hop {
        Hop {
            peer_id: vec![1; 38],
            addrs: vec![vec![4; 20]],
            push_token: vec![7; PUSH_TOKEN_LEN],
            start_block: start,
            end_block: end,
            answer_rate: 0,
        }
    }

    fn step(next: Vec<Hop>) -> Step {
        Step {
            next,
            ..Step::default()
        }
    }

    #[test]
    fn a_route_that_continues_span_by_span_passes() {
        assert!(check_hops(&step(vec![hop(10, 20), hop(20, 30)]), 10).is_ok());
        assert!(check_hops(&step(Vec::new()), 10).is_ok());
    }

    #[test]
    fn hops_that_skip_or_overlap_blocks_are_refused() {
        let e = check_hops(&step(vec![hop(11, 20)]), 10).unwrap_err();
        assert!(e.contains("hop 0") && e.contains("11..20"), "{e}");
        let e = check_hops(&step(vec![hop(10, 20), hop(15, 30)]), 10).unwrap_err();
        assert!(e.contains("hop 1"), "{e}");
        assert!(check_hops(&step(vec![hop(10, 10)]), 10).is_err());
    }

    #[test]
    fn bad_tokens_addresses_and_too_many_hops_are_refused() {
        let mut h = hop(10, 20);
        h.push_token.pop();
        assert!(check_hops(&step(vec![h]), 10)
            .unwrap_err()
            .contains("token"));
        let mut h = hop(10, 20);
        h.addrs = vec![vec![0; 8]; MAX_HOP_ADDRS + 1];
        assert!(check_hops(&step(vec![h]), 10).is_err());
        let mut h = hop(10, 20);
        h.addrs = vec![vec![0; MAX_HOP_ADDR_BYTES + 1]];
        assert!(check_hops(&step(vec![h]), 10).is_err());
        let mut h = hop(10, 20);
        h.peer_id.clear();
        assert!(check_hops(&step(vec![h]), 10).is_err());
        let many: Vec<Hop> = (0..=MAX_HOPS as u32).map(|i| hop(i + 1, i + 2)).collect();
        assert!(check_hops(&step(many), 1).unwrap_err().contains("limit"));
    }
}
