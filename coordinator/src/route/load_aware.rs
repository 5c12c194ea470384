//! Load-aware route choice: the planner's cheapest route, with every server priced at the load
//! it announced and tilted at random, so that clients seeing the same swarm do not all plan the
//! same route onto the same fastest peers.
//!
//! # Cost
//!
//! A node batches the ready steps of all its sessions into one product per block; on the
//! measured curve (`cargo bench -p model --bench batch`: 8 decode rows batched run 1.9x the
//! tokens/s of one) each extra row in a batch costs about 0.46 of a lone step. A session
//! open on a server has a step there for about a quarter of its time (routes have a few
//! spans), so each open session adds [`SESSION_SLOWDOWN`] ≈ 0.46 / 4 of a step to the next
//! one, and each step already waiting adds [`WAITING_STEP_SLOWDOWN`]. A server that says it
//! takes no more sessions is priced like one without cache room: used only where nobody else
//! serves the blocks.
//!
//! # Trust
//!
//! Load is announced in the server's own signed record and bounded on decoding
//! ([`swarm::load`]). Here it only ever multiplies the server's own per-block time by a factor
//! of at least one: a server claiming to be idle is priced at its announced speed, exactly as
//! the plain planner prices it, and cannot push any other server out of a route.
//!
//! # Herding
//!
//! Announcements are seconds old, so every client sees the same loads until the next one; with
//! exact costs they would all choose the same "least loaded" peer in between. Each client
//! therefore multiplies each server's per-block time by its own random factor in
//! `[1, 1 + JITTER)`: routes within about that margin of the best are chosen at random, routes
//! far worse never are.

use std::fmt::Debug;
use std::hash::Hash;

use rand::Rng;

use super::planner::{plan_route_priced, PlanError, PlanRequest, Price, ServerInfo, Span};

/// Extra share of a step per session open on the server (see the module docs).
pub const SESSION_SLOWDOWN: f32 = 0.12;
/// Extra share of a step per step waiting on the server.
pub const WAITING_STEP_SLOWDOWN: f32 = 0.46;
/// Routes within this fraction of the best one's compute are treated as equal.
pub const JITTER: f32 = 0.3;

/// The per-block time a client expects from `server` under the load it announced: never less
/// than its announced (idle) time.
pub fn loaded_decode_ms<P>(server: &ServerInfo<P>) -> f32 {
    let load = server.load;
    let factor = 1.0
        + SESSION_SLOWDOWN * load.sessions as f32
        + WAITING_STEP_SLOWDOWN * load.waiting_steps as f32;
    server.decode_ms_per_block * factor
}

/// Plans like [`plan_route`](super::planner::plan_route) on the servers priced at their load and tilted by `rng`.
///
/// # Errors
///
/// As [`plan_route`](super::planner::plan_route): load never makes a server unusable, so the same requests fail.
pub fn plan_load_aware<P, R>(
    servers: &[ServerInfo<P>],
    req: &PlanRequest<'_, P>,
    rng: &mut R,
) -> Result<Vec<Span<P>>, PlanError>
where
    P: Clone + Eq + Hash + Ord + Debug,
    R: Rng,
{
    // One tilt per listed server, drawn in listing order whether or not the plan can use it:
    // a client's random stream then depends only on what lookups returned.
    let tilts: Vec<f32> = servers
        .iter()
        .map(|_| 1.0 + JITTER * rng.random::<f32>())
        .collect();
    plan_route_priced(servers, req, |i, s| loaded_price(s, tilts[i]))
}

/// `server` as [`plan_load_aware`] prices it: at its announced load, times `tilt`; no cache
/// room while it says it takes no more sessions.
pub fn loaded_price<P>(server: &ServerInfo<P>, tilt: f32) -> Price {
    Price {
        decode_ms_per_block: loaded_decode_ms(server) * tilt,
        free_cache_tokens: if server.load.full() {
            0
        } else {
            server.free_cache_tokens
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::ops::Range;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use swarm::load::Load;

    use super::super::planner::plan_route;
    use super::*;

    fn server(peer: u32, blocks: Range<u32>, ms: f32, load: Load) -> ServerInfo<u32> {
        ServerInfo {
            peer,
            blocks,
            online: true,
            decode_ms_per_block: ms,
            rtt_ms: Some(10.0),
            free_cache_tokens: 10_000,
            load,
        }
    }

    fn busy(sessions: u32) -> Load {
        Load {
            sessions,
            max_sessions: 64,
            waiting_steps: 0,
        }
    }

    fn req(banned: &HashMap<u32, u64>) -> PlanRequest<'_, u32> {
        PlanRequest {
            blocks: 0..8,
            cache_tokens: 100,
            now_ms: 0,
            banned_until_ms: banned,
            default_rtt_ms: 50.0,
        }
    }

    #[test]
    fn a_busy_fast_peer_loses_to_an_idle_slower_one() {
        let banned = HashMap::new();
        let servers = [
            server(1, 0..8, 2.0, busy(40)),
            server(2, 0..8, 4.0, Load::default()),
        ];
        let mut rng = StdRng::seed_from_u64(1);
        // The plain planner goes by speed alone.
        assert_eq!(plan_route(&servers, &req(&banned)).unwrap()[0].peer, 1);
        for _ in 0..20 {
            let route = plan_load_aware(&servers, &req(&banned), &mut rng).unwrap();
            assert_eq!(route[0].peer, 2);
        }
    }

    #[test]
    fn near_equal_routes_are_shared_and_far_worse_ones_never_taken() {
        let banned = HashMap::new();
        let servers = [
            server(1, 0..8, 4.0, Load::default()),
            server(2, 0..8, 4.1, Load::default()),
            server(3, 0..8, 4.0, busy(1)),
            server(4, 0..8, 40.0, Load::default()),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        let chosen: HashSet<u32> = (0..200)
            .map(|_| plan_load_aware(&servers, &req(&banned), &mut rng).unwrap()[0].peer)
            .collect();
        assert_eq!(chosen, HashSet::from([1, 2, 3]));
    }

    #[test]
    fn claiming_idleness_is_no_better_than_the_announced_speed() {
        let idle = server(1, 0..8, 3.0, Load::default());
        assert_eq!(loaded_decode_ms(&idle), 3.0);
        let lying = server(1, 0..8, 3.0, busy(0));
        assert_eq!(loaded_decode_ms(&lying), 3.0);
        assert!(loaded_decode_ms(&server(1, 0..8, 3.0, busy(5))) > 3.0);
    }

    #[test]
    fn a_full_peer_serves_only_what_nobody_else_can() {
        let banned = HashMap::new();
        let full = Load {
            sessions: 8,
            max_sessions: 8,
            waiting_steps: 0,
        };
        let servers = [
            server(1, 0..8, 1.0, full),
            server(2, 0..4, 50.0, Load::default()),
        ];
        let mut rng = StdRng::seed_from_u64(3);
        let route = plan_load_aware(&servers, &req(&banned), &mut rng).unwrap();
        assert_eq!(
            route
                .iter()
                .map(|s| (s.peer, s.blocks.clone()))
                .collect::<Vec<_>>(),
            vec![(2, 0..4), (1, 4..8)]
        );
    }
}
