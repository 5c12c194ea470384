//! What the node says about itself in the DHT, and what it reads there about the other
//! servers of its model (to place itself where the swarm is weakest).

use std::ops::Range;
use std::time::Duration;

use libp2p::Multiaddr;
use model::fingerprint::Fingerprint;
use proto::v1::{ServerRecord, ServerState};
use swarm::discovery::{self, now_ms, Server};
use swarm::load::Load;
use swarm::placement::{span_throughput, Served};
use swarm::NetHandle;

use crate::host::ListenAddrs;
use crate::probe::{Probes, MAX_PROBES};

/// A node's measured speed: milliseconds per block of one decode step and of a prefill.
#[derive(Clone, Copy, Debug, Default)]
pub struct Speed {
    pub decode_ms_per_block: f64,
    /// A prefill of the measured length, per block.
    pub prefill_ms_per_block: f64,
}

/// Writes this node's entry into the records of the blocks it serves.
pub struct Announcer {
    pub net: NetHandle,
    pub fp: Fingerprint,
    pub addrs: ListenAddrs,
    pub interval: Duration,
}

impl Announcer {
    pub async fn announce(
        &self,
        blocks: &Range<usize>,
        state: ServerState,
        speed: Speed,
        free_cache_tokens: u64,
        load: Load,
    ) {
        let now = now_ms();
        let mut addrs = self.addrs.lock().map(|v| v.clone()).unwrap_or_default();
        // Another host dialing our loopback address would reach itself; announce loopback only
        // when there is nothing else (a swarm on one machine).
        let routable = |a: &Multiaddr| {
            !a.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
                libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        };
        if addrs.iter().any(routable) {
            addrs.retain(routable);
        }
        let record = ServerRecord {
            peer_id: self.net.peer_id().to_bytes(),
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            fingerprint: self.fp.to_vec(),
            start_block: blocks.start as u32,
            end_block: blocks.end as u32,
            state: state as i32,
            decode_ms_per_block: speed.decode_ms_per_block as f32,
            prefill_ms_per_block: speed.prefill_ms_per_block as f32,
            free_cache_tokens,
            version: env!("CARGO_PKG_VERSION").into(),
            announced_at_ms: now,
            // Three missed refreshes and readers forget this node (readers refuse longer lives).
            expires_at_ms: now
                + u64::try_from(self.interval.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_mul(3)
                    .min(swarm::record::MAX_TTL_MS),
            // Filled in by `discovery::announce`, which signs with this peer's key.
            public_key: Vec::new(),
            signature: Vec::new(),
            sessions: load.sessions,
            max_sessions: load.max_sessions,
            waiting_steps: load.waiting_steps,
        };
        let failed = discovery::announce(&self.net, &self.fp, &record).await;
        tracing::debug!(?state, failed, "announced");
    }
}

/// A joining server's decode time is not measured yet; count it as typical so that nodes
/// starting together still see each other's choices.
const JOINING_DECODE_MS: f32 = 1.0;

/// Which servers balancing counts besides this node (see [`crate::probe`] for why).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Placing a joining node: servers this node measured, and servers still joining that
    /// answer a connection (at a typical speed), so that nodes starting together spread out.
    /// A peer claiming to join forever can at worst steer where a new node sits.
    Join,
    /// Deciding to move: only servers this node measured. A move leaves blocks behind, so it
    /// must not rest on anything a peer merely claims.
    Move,
}

/// The swarm's servers of this model as the balancing logic sees them: this node at the speed
/// it measured itself; every other server only on evidence checked from here, at the slower of
/// its claim and this node's measurement of it.
pub async fn served(
    net: &NetHandle,
    fp: &Fingerprint,
    block_count: u32,
    dim: usize,
    probes: &mut Probes,
    evidence: Evidence,
) -> Vec<Served<libp2p::PeerId>> {
    let servers = discovery::lookup(net, fp, block_count)
        .await
        .unwrap_or_default();
    let me = net.peer_id();
    let online: Vec<&Server> = servers
        .iter()
        .filter(|s| s.peer != me && s.state == ServerState::Online)
        .collect();
    let measured = probes.measure(net, fp, dim, &online).await;
    let mut out = Vec::with_capacity(servers.len());
    let mut count = |s: &Server, ms: f32| {
        out.push(Served {
            throughput: span_throughput(ms, s.blocks.len() as u32),
            peer: s.peer,
            blocks: s.blocks.clone(),
        })
    };
    for (s, ms) in online.iter().zip(measured) {
        if let Some(ms) = ms {
            count(s, ms.max(s.decode_ms_per_block));
        }
    }
    if let Some(mine) = servers.iter().find(|s| s.peer == me) {
        let ms = mine.decode_ms_per_block;
        count(mine, if ms > 0.0 { ms } else { JOINING_DECODE_MS });
    }
    if evidence == Evidence::Join {
        let joining: Vec<&Server> = servers
            .iter()
            .filter(|s| s.peer != me && s.state == ServerState::Joining)
            .take(MAX_PROBES)
            .collect();
        let live = futures::future::join_all(
            joining
                .iter()
                .map(|s| net.dial(s.peer, s.addrs.clone(), Duration::from_secs(3))),
        )
        .await;
        for (s, r) in joining.iter().zip(live) {
            if r.is_ok() {
                count(s, JOINING_DECODE_MS);
            }
        }
    }
    out
}
