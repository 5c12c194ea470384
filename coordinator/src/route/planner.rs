//! The route planner: the cheapest chain of peers that runs the requested blocks once each, in
//! order.
//!
//! # Model
//!
//! Nodes are block boundaries. A usable peer serving `a..b` offers an edge `i → j` for every
//! `a ≤ i < j ≤ b`, meaning "run blocks `i..j` there"; the edge costs one round trip to the
//! peer, its compute time for `j − i` blocks and [`HOP_OVERHEAD_MS`]. A plan is the cheapest
//! path from the first requested boundary to the last. Paths are compared as [`RouteCost`]s:
//! first by how many blocks land on peers whose KV cache cannot hold the session, then by
//! latency, then by hop count.
//!
//! # Complexity
//!
//! Edges only go forward, so one left-to-right sweep over boundaries finds every shortest path.
//! Relaxing each edge would cost O(L²·S) for L blocks and S servers, too slow for simulated
//! swarms of tens of thousands of peers. An edge's cost is affine in its length, though, so for
//! each server the best boundary to board it at, for any later exit, is a running minimum
//! updated once per boundary (see `BoardingKey`). The sweep then visits each server once per
//! requested block it serves: O(S log S + L + Σ|server range ∩ request|), at most
//! O(S log S + L·S). The sort puts the servers in the canonical order used to break ties.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::iter::Sum;
use std::ops::{Add, Range};

use swarm::load::Load;

/// Charged per span on top of its round trip. Every extra span is another session to open and
/// another peer that can fail mid-generation, which latency estimates do not capture; the
/// charge makes near-ties go to the route with fewer spans.
pub const HOP_OVERHEAD_MS: f32 = 1.0;

/// Estimates are clamped to this many milliseconds (about 17 minutes). Anything slower is
/// unusable anyway, and the bound keeps the microsecond cost of any route inside a `u64`: each
/// block adds at most 2·10⁹ µs (its compute plus, at worst, a round trip of its own), and
/// 2·10⁹ × 2³² blocks < 2⁶⁴.
const MAX_ESTIMATE_MS: f64 = 1e6;

/// One candidate peer, as discovery reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerInfo<P> {
    pub peer: P,
    /// The blocks it serves; the planner may use any contiguous part of them.
    pub blocks: Range<u32>,
    /// Its announced state is ONLINE (not joining, not draining).
    pub online: bool,
    /// Announced compute time per block for one decode step.
    pub decode_ms_per_block: f32,
    /// Measured round-trip time; `None` until the client has measured it, then
    /// [`PlanRequest::default_rtt_ms`] stands in.
    pub rtt_ms: Option<f32>,
    /// Announced free KV-cache capacity, in tokens.
    pub free_cache_tokens: u64,
    /// Announced load, bounded. [`plan_route`] ignores it (it prices servers as if each
    /// client were alone); [`plan_load_aware`](super::load_aware::plan_load_aware) does not.
    pub load: Load,
}

impl<P: Eq + Hash> ServerInfo<P> {
    /// Whether a plan for `req` may use this server: online and not banned at `req.now_ms`.
    pub fn is_usable(&self, req: &PlanRequest<'_, P>) -> bool {
        self.online
            && req
                .banned_until_ms
                .get(&self.peer)
                .is_none_or(|&until| req.now_ms >= until)
    }
}

/// What to plan for, and the client-side state the plan depends on. Time is passed in rather
/// than read so that planning stays a pure function that simulations can drive.
#[derive(Clone, Debug)]
pub struct PlanRequest<'a, P> {
    /// Blocks to cover: `0..L` for a new session, a sub-range to reroute around a failed span.
    pub blocks: Range<u32>,
    /// KV positions the session will need on each peer.
    pub cache_tokens: u64,
    pub now_ms: u64,
    /// A peer is banned while `now_ms < banned_until_ms[peer]`.
    pub banned_until_ms: &'a HashMap<P, u64>,
    /// Round trip assumed for peers not measured yet.
    pub default_rtt_ms: f32,
}

/// One step of a route: `peer` runs `blocks`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Span<P> {
    pub peer: P,
    pub blocks: Range<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Usable servers leave these blocks uncovered. It is the first maximal gap; there may be
    /// more after it.
    #[error("no peer serves blocks {missing:?}")]
    Uncovered { missing: Range<u32> },
    #[error("the request covers no blocks")]
    EmptyRequest,
}

/// The cost of a route or span. Fields are compared in declaration order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteCost {
    /// Blocks placed on peers whose free KV cache is smaller than the session needs. Compared
    /// first, so it acts as a penalty larger than any latency: a full peer is not excluded, but
    /// gets only blocks no peer with room can serve.
    pub full_cache_blocks: u32,
    /// Estimated time of one decode step through the route, in microseconds. Integer so that
    /// sums are exact: equally good routes tie exactly, whatever order their spans were added
    /// in, and the tie-breaking that makes plans deterministic sees real ties only.
    pub latency_us: u64,
    /// Number of spans.
    pub hops: u32,
}

impl Add for RouteCost {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            full_cache_blocks: self
                .full_cache_blocks
                .saturating_add(other.full_cache_blocks),
            latency_us: self.latency_us.saturating_add(other.latency_us),
            hops: self.hops.saturating_add(other.hops),
        }
    }
}

impl Sum for RouteCost {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}

/// The cost of running `blocks` on `server`: the edge weight the planner uses. Blocks outside
/// the server's range are not checked.
pub fn span_cost<P>(
    server: &ServerInfo<P>,
    blocks: Range<u32>,
    req: &PlanRequest<'_, P>,
) -> RouteCost {
    Pricing::new(server, Price::announced(server), req)
        .cost(blocks.end.saturating_sub(blocks.start))
}

/// Prices an existing route, e.g. to judge whether replanning would pay off or to check a plan.
/// Each span is priced on the cheapest usable announcement of its peer that covers it; `None`
/// if some span has none. Whether the spans chain up is not checked.
pub fn route_cost<P: Eq + Hash>(
    servers: &[ServerInfo<P>],
    req: &PlanRequest<'_, P>,
    route: &[Span<P>],
) -> Option<RouteCost> {
    route
        .iter()
        .map(|span| {
            servers
                .iter()
                .filter(|s| {
                    s.peer == span.peer
                        && s.blocks.start <= span.blocks.start
                        && span.blocks.end <= s.blocks.end
                        && s.is_usable(req)
                })
                .map(|s| span_cost(s, span.blocks.clone(), req))
                .min()
        })
        .sum()
}

/// Plans the cheapest route through `servers` covering `req.blocks` exactly once, in order.
///
/// Servers may overlap; each span uses only the blocks the route needs from its server. The
/// plan depends only on the set of servers, not on the order discovery listed them in. Among
/// equally cheap routes (same [`RouteCost`], hops included) the planner hands over to the next
/// peer as late as possible, then prefers the smaller peer (by `Ord`) for the later span.
///
/// # Errors
///
/// [`PlanError::EmptyRequest`] if `req.blocks` is empty; [`PlanError::Uncovered`] with the first
/// gap if the usable servers do not cover `req.blocks`.
pub fn plan_route<P>(
    servers: &[ServerInfo<P>],
    req: &PlanRequest<'_, P>,
) -> Result<Vec<Span<P>>, PlanError>
where
    P: Clone + Eq + Hash + Ord + Debug,
{
    plan_route_priced(servers, req, |_, s| Price::announced(s))
}

/// What a route choice may change about a server when it prices it: its compute time per
/// block and its free cache. Everything else (range, usability, round trip) is as announced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub decode_ms_per_block: f32,
    pub free_cache_tokens: u64,
}

impl Price {
    /// The server's own announcement, as [`plan_route`] prices it.
    pub fn announced<P>(server: &ServerInfo<P>) -> Self {
        Self {
            decode_ms_per_block: server.decode_ms_per_block,
            free_cache_tokens: server.free_cache_tokens,
        }
    }
}

/// [`plan_route`] with each server priced by `price(index, server)` instead of its
/// announcement: the same search, ties and errors. `price` is called only for servers a plan
/// could use (usable, overlapping the request), in listing order. Choosers that reprice servers
/// (load, random tilts) go through this rather than copying the list: plans run over the
/// thousands of servers a lookup returns.
///
/// # Errors
///
/// As [`plan_route`].
pub fn plan_route_priced<P, F>(
    servers: &[ServerInfo<P>],
    req: &PlanRequest<'_, P>,
    price: F,
) -> Result<Vec<Span<P>>, PlanError>
where
    P: Clone + Eq + Hash + Ord + Debug,
    F: FnMut(usize, &ServerInfo<P>) -> Price,
{
    plan_candidates(servers, req, price, Prune::Dominated)
}

/// Whether [`plan_candidates`] leaves out dominated candidates before its sweep. Always, but
/// for the tests that check it changes no plan.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prune {
    Dominated,
    #[cfg(test)]
    Nothing,
}

fn plan_candidates<P, F>(
    servers: &[ServerInfo<P>],
    req: &PlanRequest<'_, P>,
    mut price: F,
    prune: Prune,
) -> Result<Vec<Span<P>>, PlanError>
where
    P: Clone + Eq + Hash + Ord + Debug,
    F: FnMut(usize, &ServerInfo<P>) -> Price,
{
    let wanted = req.blocks.clone();
    if wanted.is_empty() {
        return Err(PlanError::EmptyRequest);
    }
    let n = (wanted.end - wanted.start) as usize;
    let to_block = |boundary: usize| wanted.start + boundary as u32;

    // Peers banned now: usually a handful, compared directly rather than hashing each of the
    // thousands of servers (what `is_usable` does).
    let banned: Vec<&P> = req
        .banned_until_ms
        .iter()
        .filter(|&(_, &until)| req.now_ms < until)
        .map(|(peer, _)| peer)
        .collect();
    let usable = |info: &ServerInfo<P>| {
        if banned.len() <= FEW_BANS {
            info.online && !banned.contains(&&info.peer)
        } else {
            info.is_usable(req)
        }
    };
    let mut candidates: Vec<Candidate> = servers
        .iter()
        .enumerate()
        .filter_map(|(server, info)| {
            let from = info.blocks.start.max(wanted.start);
            let to = info.blocks.end.min(wanted.end);
            (from < to && usable(info)).then(|| Candidate {
                server,
                from: (from - wanted.start) as usize,
                to: (to - wanted.start) as usize,
                pricing: Pricing::new(info, price(server, info), req),
            })
        })
        .collect();
    // Canonical order, so that ties break the same way whatever order discovery used.
    let key = |c: &Candidate| (&servers[c.server].peer, c.from, c.to, c.server);
    if prune == Prune::Dominated {
        candidates = undominated(candidates, n, |a, b| key(a) < key(b));
    }
    candidates.sort_by(|a, b| key(a).cmp(&key(b)));

    if let Some(gap) = first_gap(&candidates, n) {
        return Err(PlanError::Uncovered {
            missing: to_block(gap.start)..to_block(gap.end),
        });
    }
    Ok(cheapest_path(&candidates, n)
        .into_iter()
        .map(|(rank, blocks)| Span {
            peer: servers[candidates[rank].server].peer.clone(),
            blocks: to_block(blocks.start)..to_block(blocks.end),
        })
        .collect())
}

/// Up to this many peers banned at once are looked for by comparison, not by hashing.
const FEW_BANS: usize = 16;

/// A usable server clipped to the request, in boundary offsets from the request's start.
struct Candidate {
    /// Index into the caller's `servers`.
    server: usize,
    from: usize,
    to: usize,
    pricing: Pricing,
}

/// A server's edge cost in integer terms: `fixed_us + per_block_us × len`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Pricing {
    full: bool,
    fixed_us: u64,
    per_block_us: u64,
}

/// Path cost shifted as if the path continued on one server to the end of the request:
/// `(full blocks, latency, hops) + (full, per_block_us) × (n − i)` for a path ending at
/// boundary `i`. The shift is the same vector for every boarding point `i`, so it preserves
/// their (lexicographic) order, and it cancels exactly when the path leaves the server at `j`.
/// One running minimum per server therefore replaces relaxing every edge `i → j`. Wider
/// integers than [`RouteCost`] because the shift can exceed it.
type BoardingKey = (u64, u128, u32);

impl Pricing {
    fn new<P>(server: &ServerInfo<P>, price: Price, req: &PlanRequest<'_, P>) -> Self {
        let rtt_ms = server.rtt_ms.unwrap_or(req.default_rtt_ms);
        Self {
            full: price.free_cache_tokens < req.cache_tokens,
            fixed_us: ms_to_us(rtt_ms) + ms_to_us(HOP_OVERHEAD_MS),
            per_block_us: ms_to_us(price.decode_ms_per_block),
        }
    }

    fn cost(self, blocks: u32) -> RouteCost {
        RouteCost {
            full_cache_blocks: if self.full { blocks } else { 0 },
            latency_us: self.fixed_us + self.per_block_us * u64::from(blocks),
            hops: 1,
        }
    }

    fn board(self, cost: RouteCost, remaining: usize) -> BoardingKey {
        let remaining = remaining as u64;
        (
            u64::from(cost.full_cache_blocks) + u64::from(self.full) * remaining,
            u128::from(cost.latency_us) + u128::from(self.per_block_us) * u128::from(remaining),
            cost.hops,
        )
    }

    fn alight(self, (full, latency, hops): BoardingKey, remaining: usize) -> RouteCost {
        let remaining = remaining as u64;
        let full = full - u64::from(self.full) * remaining;
        let latency = latency - u128::from(self.per_block_us) * u128::from(remaining)
            + u128::from(self.fixed_us);
        // The results are costs of real paths, which fit (see MAX_ESTIMATE_MS).
        RouteCost {
            full_cache_blocks: u32::try_from(full).unwrap_or(u32::MAX),
            latency_us: u64::try_from(latency).unwrap_or(u64::MAX),
            hops: hops + 1,
        }
    }
}

/// NaN counts as the worst estimate, so a broken announcement cannot make a peer look free.
fn ms_to_us(ms: f32) -> u64 {
    let ms = if ms.is_nan() {
        MAX_ESTIMATE_MS
    } else {
        f64::from(ms).clamp(0.0, MAX_ESTIMATE_MS)
    };
    (ms * 1000.0).round() as u64
}

impl Pricing {
    /// No dearer than `other` for any span: no worse on cache room, round trip or compute.
    fn at_most(self, other: Self) -> bool {
        self.full <= other.full
            && self.fixed_us <= other.fixed_us
            && self.per_block_us <= other.per_block_us
    }
}

/// Servers [`undominated`] keeps at hand as possible dominators. A lookup of a large swarm lists
/// many servers of a few kinds (device, link), and a few fast, far-reaching ones dominate most
/// of the rest. Measured (`cargo bench --workspace --bench plan`, 800 servers): 4 plans fastest,
/// 32 spends more time looking for dominators than the sweep saves on load-aware prices.
const DOMINATORS: usize = 4;

/// A candidate that may dominate those boarding after it: its price and where it ends.
#[derive(Clone, Copy)]
struct Reach {
    pricing: Pricing,
    to: usize,
    candidate: usize,
}

/// `candidates` without those no plan can use. Candidate `a` is dominated by `b` when `b`
/// serves at least `a`'s blocks (`b.from <= a.from`, `a.to <= b.to`), is no dearer on any
/// count ([`Pricing::at_most`]), and wins every tie: it is dearer on none and cheaper on one,
/// or priced the same and `earlier` in the canonical order. Then for every boundary `a`
/// serves, `b` arrives there at most as cheaply from every boundary `a` could board at, and a
/// tie goes to `b` (lower rank). So the sweep never takes `a`, and dropping it changes neither
/// the plan nor any tie. Domination is transitive and strict, so dropping every dominated
/// candidate at once is safe: each has an undominated one dominating it.
///
/// A large lookup lists hundreds of servers, of which a few dozen can be on any plan: the
/// sweep costs the sum of their lengths (issue 19's simulations list ~770 servers, of which
/// this keeps ~5%). Only [`DOMINATORS`] possible dominators are kept at a time, so this is
/// O(candidates · DOMINATORS) and some dominated candidates may stay: that costs time, never a
/// different plan.
fn undominated(
    candidates: Vec<Candidate>,
    n: usize,
    earlier: impl Fn(&Candidate, &Candidate) -> bool,
) -> Vec<Candidate> {
    // By boarding boundary (a counting sort: boundaries are few).
    let mut start = vec![0usize; n + 1];
    for c in &candidates {
        start[c.from + 1] += 1;
    }
    for b in 1..=n {
        start[b] += start[b - 1];
    }
    let mut order = vec![0usize; candidates.len()];
    let mut next = start.clone();
    for (k, c) in candidates.iter().enumerate() {
        order[next[c.from]] = k;
        next[c.from] += 1;
    }

    let mut reach: Vec<Reach> = Vec::with_capacity(DOMINATORS);
    let mut dominated = vec![false; candidates.len()];
    for from in 0..n {
        let boarding = &order[start[from]..start[from + 1]];
        if boarding.is_empty() {
            continue;
        }
        // Nothing boarding here or later ends at or before `from`.
        reach.retain(|r| r.to > from);
        for &k in boarding {
            let c = &candidates[k];
            let new = Reach {
                pricing: c.pricing,
                to: c.to,
                candidate: k,
            };
            if let Some(r) = reach.iter_mut().find(|r| r.pricing == c.pricing) {
                let rival = &candidates[r.candidate];
                if c.to > r.to || (c.to == r.to && earlier(c, rival)) {
                    *r = new;
                }
            } else if reach.len() < DOMINATORS {
                reach.push(new);
            } else if let Some(r) = reach
                .iter_mut()
                .find(|r| c.pricing.at_most(r.pricing) && c.to >= r.to)
            {
                // It serves every later candidate the one it replaces would.
                *r = new;
            }
        }
        for &k in boarding {
            let c = &candidates[k];
            dominated[k] = reach.iter().any(|r| {
                r.to >= c.to
                    && r.pricing.at_most(c.pricing)
                    && (r.pricing != c.pricing || earlier(&candidates[r.candidate], c))
            });
        }
    }
    candidates
        .into_iter()
        .zip(dominated)
        .filter_map(|(c, d)| (!d).then_some(c))
        .collect()
}

/// The first maximal run of blocks (as offsets) that no candidate covers.
fn first_gap(candidates: &[Candidate], n: usize) -> Option<Range<usize>> {
    let mut delta = vec![0i64; n + 1];
    for c in candidates {
        delta[c.from] += 1;
        delta[c.to] -= 1;
    }
    let covering: Vec<i64> = delta[..n]
        .iter()
        .scan(0, |depth, d| {
            *depth += d;
            Some(*depth)
        })
        .collect();
    let start = covering.iter().position(|&depth| depth == 0)?;
    let len = covering[start..]
        .iter()
        .position(|&depth| depth > 0)
        .unwrap_or(n - start);
    Some(start..start + len)
}

/// The cheapest path over boundaries `0..=n`, as (candidate rank, offsets) per span. The
/// candidates must cover every block.
fn cheapest_path(candidates: &[Candidate], n: usize) -> Vec<(usize, Range<usize>)> {
    let mut boarding_at = vec![Vec::new(); n];
    for (rank, c) in candidates.iter().enumerate() {
        boarding_at[c.from].push(rank);
    }

    let mut cost_to = vec![None; n + 1];
    cost_to[0] = Some(RouteCost::default());
    // For boundary j: the rank of the last span's candidate and the boundary it starts at.
    let mut last_span: Vec<Option<(usize, usize)>> = vec![None; n + 1];
    // Per candidate: the best boarding key seen so far and its boundary.
    let mut boarding: Vec<Option<(BoardingKey, usize)>> = vec![None; candidates.len()];
    let mut serving = Vec::new();

    for j in 1..=n {
        let i = j - 1;
        serving.extend_from_slice(&boarding_at[i]);
        serving.retain(|&rank| candidates[rank].to >= j);

        let mut arrival: Option<(RouteCost, usize, usize)> = None;
        for &rank in &serving {
            let pricing = candidates[rank].pricing;
            if let Some(cost) = cost_to[i] {
                let key = pricing.board(cost, n - i);
                // `<=`: on a tie, board later, i.e. stay on the previous peer longer.
                if boarding[rank].is_none_or(|(best, _)| key <= best) {
                    boarding[rank] = Some((key, i));
                }
            }
            if let Some((key, from)) = boarding[rank] {
                let cost = pricing.alight(key, n - j);
                if arrival.is_none_or(|(best, best_rank, _)| (cost, rank) < (best, best_rank)) {
                    arrival = Some((cost, rank, from));
                }
            }
        }
        if let Some((cost, rank, from)) = arrival {
            cost_to[j] = Some(cost);
            last_span[j] = Some((rank, from));
        }
    }

    let mut route = Vec::new();
    let mut j = n;
    while j > 0 {
        let (rank, from) =
            last_span[j].expect("every block is covered, so every boundary is reachable");
        route.push((rank, from..j));
        j = from;
    }
    route.reverse();
    route
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000;

    fn server(
        peer: u32,
        blocks: Range<u32>,
        decode_ms_per_block: f32,
        rtt_ms: f32,
    ) -> ServerInfo<u32> {
        ServerInfo {
            peer,
            blocks,
            online: true,
            decode_ms_per_block,
            rtt_ms: Some(rtt_ms),
            free_cache_tokens: 10_000,
            load: Load::default(),
        }
    }

    fn request(blocks: Range<u32>, banned: &HashMap<u32, u64>) -> PlanRequest<'_, u32> {
        PlanRequest {
            blocks,
            cache_tokens: 1_000,
            now_ms: NOW,
            banned_until_ms: banned,
            default_rtt_ms: 50.0,
        }
    }

    fn plan(servers: &[ServerInfo<u32>], req: &PlanRequest<'_, u32>) -> Vec<(u32, Range<u32>)> {
        plan_route(servers, req)
            .unwrap()
            .into_iter()
            .map(|span| (span.peer, span.blocks))
            .collect()
    }

    #[test]
    fn servers_another_beats_on_every_count_are_left_out_before_the_sweep() {
        let no_bans = HashMap::new();
        let req = request(0..8, &no_bans);
        let servers = [
            server(1, 0..8, 1.0, 1.0),
            // Inside 1's blocks and dearer: out.
            server(2, 2..6, 2.0, 1.0),
            // Priced as 1 and after it in the canonical order: out.
            server(3, 0..8, 1.0, 1.0),
            // Faster than 1: stays, although 1 serves its blocks.
            server(4, 4..8, 0.1, 1.0),
            // Priced as 1 and before it in the canonical order, but reaching less far: stays.
            server(0, 0..4, 1.0, 1.0),
        ];
        let candidates = servers
            .iter()
            .enumerate()
            .map(|(k, s)| Candidate {
                server: k,
                from: s.blocks.start as usize,
                to: s.blocks.end as usize,
                pricing: Pricing::new(s, Price::announced(s), &req),
            })
            .collect();
        let key = |c: &Candidate| (servers[c.server].peer, c.from, c.to);
        let kept: Vec<u32> = undominated(candidates, 8, |a, b| key(a) < key(b))
            .iter()
            .map(|c| servers[c.server].peer)
            .collect();
        assert_eq!(kept, [1, 4, 0]);
        let announced = |_, s: &ServerInfo<u32>| Price::announced(s);
        let unpruned = plan_candidates(&servers, &req, announced, Prune::Nothing).unwrap();
        assert_eq!(plan_route(&servers, &req).unwrap(), unpruned);
        assert_eq!(unpruned.len(), 2, "{unpruned:?}");
    }

    /// Announcements are a peer's claims: NaN, infinite, negative and huge numbers and ranges
    /// past any model are priced as before and pruned no differently.
    #[test]
    fn forged_announcements_are_pruned_as_the_full_sweep_prices_them() {
        let no_bans = HashMap::new();
        let forged = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -5.0,
            0.0,
            f32::MAX,
            1.0,
        ];
        let mut servers = Vec::new();
        for (i, &ms) in forged.iter().enumerate() {
            for (j, &rtt) in forged.iter().enumerate() {
                let peer = (i * forged.len() + j) as u32;
                let start = peer % 7;
                let mut s = server(peer, start..start + 1 + peer % 5, ms, rtt);
                s.rtt_ms = (j % 3 != 0).then_some(rtt);
                s.free_cache_tokens = [0, 999, u64::MAX][peer as usize % 3];
                servers.push(s);
            }
        }
        servers.push(server(99, 3..u32::MAX, 1.0, 1.0));
        servers.push(server(98, 0..12, 2.0, 2.0));
        let announced = |_, s: &ServerInfo<u32>| Price::announced(s);
        for blocks in [0..12, 2..9, 5..6, 0..40] {
            let req = request(blocks, &no_bans);
            assert_eq!(
                plan_candidates(&servers, &req, announced, Prune::Dominated),
                plan_candidates(&servers, &req, announced, Prune::Nothing),
                "{:?}",
                req.blocks
            );
        }
    }

    #[test]
    fn one_fast_peer_beats_two_hops_when_cheaper() {
        let no_bans = HashMap::new();
        let req = request(0..32, &no_bans);
        // One hop: 20 + 1.5 × 32 + 1 = 69 ms. Two hops: 2 × (20 + 1 × 16 + 1) = 74 ms.
        let servers = [
            server(1, 0..32, 1.5, 20.0),
            server(2, 0..16, 1.0, 20.0),
            server(3, 16..32, 1.0, 20.0),
        ];
        let route = plan_route(&servers, &req).unwrap();
        assert_eq!(
            route,
            [Span {
                peer: 1,
                blocks: 0..32
            }]
        );
        let cost = route_cost(&servers, &req, &route).unwrap();
        assert_eq!((cost.latency_us, cost.hops), (69_000, 1));
    }

    #[test]
    fn two_hops_win_when_the_single_peer_is_slow() {
        let no_bans = HashMap::new();
        // One hop: 20 + 5 × 32 + 1 = 181 ms; two hops still 74 ms.
        let servers = [
            server(1, 0..32, 5.0, 20.0),
            server(2, 0..16, 1.0, 20.0),
            server(3, 16..32, 1.0, 20.0),
        ];
        assert_eq!(
            plan(&servers, &request(0..32, &no_bans)),
            [(2, 0..16), (3, 16..32)]
        );
    }

    #[test]
    fn prefers_a_peer_with_cache_room() {
        let no_bans = HashMap::new();
        let mut fast_but_full = server(1, 0..10, 0.1, 1.0);
        fast_but_full.free_cache_tokens = 999;
        let slow_with_room = server(2, 0..10, 50.0, 200.0);
        assert_eq!(
            plan(&[fast_but_full, slow_with_room], &request(0..10, &no_bans)),
            [(2, 0..10)]
        );
    }

    #[test]
    fn a_full_peer_only_gets_blocks_nobody_else_serves() {
        let no_bans = HashMap::new();
        let mut full = server(1, 0..30, 0.1, 1.0);
        full.free_cache_tokens = 0;
        let with_room = server(2, 0..20, 50.0, 200.0);
        assert_eq!(
            plan(&[full, with_room], &request(0..30, &no_bans)),
            [(2, 0..20), (1, 20..30)]
        );
    }

    #[test]
    fn overlapping_servers_hand_over_as_late_as_possible_on_a_tie() {
        let no_bans = HashMap::new();
        let servers = [server(1, 0..15, 1.0, 10.0), server(2, 10..30, 1.0, 10.0)];
        assert_eq!(
            plan(&servers, &request(0..30, &no_bans)),
            [(1, 0..15), (2, 15..30)]
        );
    }

    #[test]
    fn overlapping_servers_hand_over_where_it_is_cheapest() {
        let no_bans = HashMap::new();
        // Peer 2 computes faster, so it should take every block it can.
        let servers = [server(1, 0..15, 2.0, 10.0), server(2, 10..30, 1.0, 10.0)];
        assert_eq!(
            plan(&servers, &request(0..30, &no_bans)),
            [(1, 0..10), (2, 10..30)]
        );
    }

    #[test]
    fn reroutes_a_sub_range() {
        let no_bans = HashMap::new();
        let servers = [server(1, 0..15, 1.0, 10.0), server(2, 12..30, 1.0, 10.0)];
        assert_eq!(
            plan(&servers, &request(10..20, &no_bans)),
            [(1, 10..15), (2, 15..20)]
        );
        // Only blocks outside the sub-range are missing: not an error.
        assert_eq!(
            plan(&servers[1..], &request(12..20, &no_bans)),
            [(2, 12..20)]
        );
        assert_eq!(
            plan_route(&servers[1..], &request(10..20, &no_bans)),
            Err(PlanError::Uncovered { missing: 10..12 })
        );
    }

    #[test]
    fn names_the_first_missing_range() {
        let no_bans = HashMap::new();
        let servers = [
            server(1, 0..10, 1.0, 10.0),
            server(2, 20..25, 1.0, 10.0),
            server(3, 30..40, 1.0, 10.0),
        ];
        let err = plan_route(&servers, &request(0..40, &no_bans)).unwrap_err();
        assert_eq!(err, PlanError::Uncovered { missing: 10..20 });
        assert_eq!(err.to_string(), "no peer serves blocks 10..20");
    }

    #[test]
    fn banned_and_offline_peers_leave_gaps_until_usable() {
        let servers = [
            server(1, 0..10, 1.0, 10.0),
            server(2, 10..20, 1.0, 10.0),
            server(3, 20..30, 1.0, 10.0),
        ];
        let banned = HashMap::from([(2, NOW + 1)]);
        assert_eq!(
            plan_route(&servers, &request(0..30, &banned)),
            Err(PlanError::Uncovered { missing: 10..20 })
        );
        let expired = HashMap::from([(2, NOW)]);
        assert_eq!(plan(&servers, &request(0..30, &expired)).len(), 3);

        let mut offline = servers.clone();
        offline[2].online = false;
        assert_eq!(
            plan_route(&offline, &request(0..30, &HashMap::new())),
            Err(PlanError::Uncovered { missing: 20..30 })
        );
    }

    #[test]
    fn unmeasured_peers_get_the_default_rtt() {
        let no_bans = HashMap::new();
        let mut unmeasured = server(1, 0..10, 1.0, 0.0);
        unmeasured.rtt_ms = None;
        let measured = server(2, 0..10, 1.0, 70.0);
        let servers = [unmeasured, measured];
        let mut req = request(0..10, &no_bans);
        assert_eq!(plan(&servers, &req), [(1, 0..10)]);
        req.default_rtt_ms = 100.0;
        assert_eq!(plan(&servers, &req), [(2, 0..10)]);
    }

    #[test]
    fn ties_go_to_the_smaller_peer_whatever_the_listing_order() {
        let no_bans = HashMap::new();
        let req = request(0..8, &no_bans);
        let mut servers = vec![server(7, 0..8, 1.0, 10.0), server(3, 0..8, 1.0, 10.0)];
        assert_eq!(plan(&servers, &req), [(3, 0..8)]);
        servers.reverse();
        assert_eq!(plan(&servers, &req), [(3, 0..8)]);
    }

    #[test]
    fn rejects_an_empty_request() {
        let no_bans = HashMap::new();
        let servers = [server(1, 0..10, 1.0, 10.0)];
        assert_eq!(
            plan_route(&servers, &request(4..4, &no_bans)),
            Err(PlanError::EmptyRequest)
        );
    }

    #[test]
    fn handles_simulation_sized_swarms() {
        let no_bans = HashMap::new();
        let blocks = 300;
        let servers: Vec<_> = (0..20_000u32)
            .map(|k| {
                let start = k.wrapping_mul(2_654_435_761) % blocks;
                let end = (start + 1 + k % 60).min(blocks);
                server(k, start..end, 1.0 + (k % 7) as f32, 5.0 + (k % 13) as f32)
            })
            .collect();
        let route = plan(&servers, &request(0..blocks, &no_bans));
        assert_eq!(route.first().unwrap().1.start, 0);
        assert_eq!(route.last().unwrap().1.end, blocks);
        assert!(route.windows(2).all(|w| w[0].1.end == w[1].1.start));
    }

    /// A generated swarm and request. Peer `k` is `servers[k]`, so peers are unique.
    #[derive(Clone, Debug)]
    struct Instance {
        servers: Vec<ServerInfo<u32>>,
        banned: HashMap<u32, u64>,
        blocks: Range<u32>,
        cache_tokens: u64,
    }

    impl Instance {
        fn request(&self) -> PlanRequest<'_, u32> {
            PlanRequest {
                blocks: self.blocks.clone(),
                cache_tokens: self.cache_tokens,
                now_ms: NOW,
                banned_until_ms: &self.banned,
                default_rtt_ms: 4.0,
            }
        }

        /// Usability written out independently of [`ServerInfo::is_usable`].
        fn usable(&self, server: &ServerInfo<u32>) -> bool {
            server.online
                && self
                    .banned
                    .get(&server.peer)
                    .is_none_or(|&until| until <= NOW)
        }

        fn first_missing(&self) -> Option<Range<u32>> {
            let covered = |b: u32| {
                self.servers
                    .iter()
                    .any(|s| self.usable(s) && s.blocks.contains(&b))
            };
            let start = self.blocks.clone().find(|&b| !covered(b))?;
            let end = (start..self.blocks.end)
                .find(|&b| covered(b))
                .unwrap_or(self.blocks.end);
            Some(start..end)
        }
    }

    /// Small integer costs, so that exact ties between different routes are common.
    fn instance(max_blocks: u32, max_servers: usize) -> impl Strategy<Value = Instance> {
        (1..=max_blocks)
            .prop_flat_map(move |total| {
                let server = (
                    0..total,
                    0..=total,
                    prop::bool::weighted(0.85),
                    0u8..6,
                    prop::option::of(0u8..8),
                    0u64..4,
                    prop::option::of(NOW - 1..=NOW + 1),
                );
                let request =
                    (0..total).prop_flat_map(move |start| (Just(start), start + 1..=total));
                let servers = prop::collection::vec(server, 0..=max_servers);
                (Just(total), servers, request, 0u64..4)
            })
            .prop_map(|(total, raw, (start, end), cache_tokens)| {
                let mut banned = HashMap::new();
                let servers = raw
                    .into_iter()
                    .enumerate()
                    .map(|(peer, (first, len, online, decode, rtt, free, ban))| {
                        let peer = peer as u32;
                        if let Some(until) = ban {
                            banned.insert(peer, until);
                        }
                        ServerInfo {
                            peer,
                            blocks: first..(first + len).min(total),
                            online,
                            decode_ms_per_block: f32::from(decode) / 2.0,
                            rtt_ms: rtt.map(f32::from),
                            free_cache_tokens: free,
                            load: Load::default(),
                        }
                    })
                    .collect();
                Instance {
                    servers,
                    banned,
                    blocks: start..end,
                    cache_tokens,
                }
            })
    }

    /// The cheapest cost over every chain of spans, by exhaustive search.
    fn brute_force_cost(
        servers: &[ServerInfo<u32>],
        req: &PlanRequest<'_, u32>,
    ) -> Option<RouteCost> {
        fn extend(
            at: u32,
            so_far: RouteCost,
            servers: &[ServerInfo<u32>],
            req: &PlanRequest<'_, u32>,
            best: &mut Option<RouteCost>,
        ) {
            if at == req.blocks.end {
                *best = Some(best.map_or(so_far, |b| b.min(so_far)));
                return;
            }
            for s in servers
                .iter()
                .filter(|s| s.is_usable(req) && s.blocks.contains(&at))
            {
                for end in at + 1..=s.blocks.end.min(req.blocks.end) {
                    let step = span_cost(s, at..end, req);
                    extend(end, so_far + step, servers, req, best);
                }
            }
        }
        let mut best = None;
        extend(
            req.blocks.start,
            RouteCost::default(),
            servers,
            req,
            &mut best,
        );
        best
    }

    proptest! {
        #[test]
        fn plans_exist_exactly_when_usable_servers_cover_the_request(inst in instance(24, 12)) {
            let req = inst.request();
            match (plan_route(&inst.servers, &req), inst.first_missing()) {
                (Ok(route), None) => {
                    let mut at = req.blocks.start;
                    for span in &route {
                        let server = &inst.servers[span.peer as usize];
                        prop_assert!(inst.usable(server), "unusable server chosen: {server:?}");
                        prop_assert_eq!(span.blocks.start, at, "gap or overlap in {:?}", route);
                        prop_assert!(span.blocks.start < span.blocks.end, "empty span in {route:?}");
                        prop_assert!(
                            server.blocks.start <= span.blocks.start
                                && span.blocks.end <= server.blocks.end,
                            "{span:?} is outside {server:?}"
                        );
                        at = span.blocks.end;
                    }
                    prop_assert_eq!(at, req.blocks.end, "route {:?} stops short", route);
                }
                (Err(PlanError::Uncovered { missing }), Some(expected)) => {
                    prop_assert_eq!(missing, expected);
                }
                (result, expected) => {
                    prop_assert!(false, "planned {result:?}, but the first gap is {expected:?}");
                }
            }
        }

        #[test]
        fn plans_are_as_cheap_as_exhaustive_search(inst in instance(6, 5)) {
            let req = inst.request();
            let best = brute_force_cost(&inst.servers, &req);
            match plan_route(&inst.servers, &req) {
                Ok(route) => prop_assert_eq!(route_cost(&inst.servers, &req, &route), best),
                Err(err) => prop_assert!(best.is_none(), "{err} but {best:?} is possible"),
            }
        }

        /// Enough servers of enough prices to fill [`DOMINATORS`] and replace its entries.
        #[test]
        fn leaving_out_dominated_servers_changes_no_plan(inst in instance(24, 80)) {
            let req = inst.request();
            let announced = |_, s: &ServerInfo<u32>| Price::announced(s);
            prop_assert_eq!(
                plan_candidates(&inst.servers, &req, announced, Prune::Dominated),
                plan_candidates(&inst.servers, &req, announced, Prune::Nothing)
            );
            // Repriced per server, as load-aware routes are: nearly every price distinct.
            let tilted = |i: usize, s: &ServerInfo<u32>| Price {
                decode_ms_per_block: s.decode_ms_per_block * (1.0 + (i * 7 % 5) as f32 / 8.0),
                free_cache_tokens: s.free_cache_tokens,
            };
            prop_assert_eq!(
                plan_candidates(&inst.servers, &req, tilted, Prune::Dominated),
                plan_candidates(&inst.servers, &req, tilted, Prune::Nothing)
            );
        }

        #[test]
        fn plans_do_not_depend_on_listing_order(inst in instance(24, 12)) {
            let req = inst.request();
            let mut reversed = inst.servers.clone();
            reversed.reverse();
            prop_assert_eq!(plan_route(&inst.servers, &req), plan_route(&reversed, &req));
        }
    }
}
