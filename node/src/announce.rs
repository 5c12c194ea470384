//! What the node says about itself in the DHT, and what it reads there about the other
//! servers of its model (to place itself where the swarm is weakest).

use std::ops::Range;
use std::time::Duration;

use libp2p::Multiaddr;
use model::fingerprint::Fingerprint;
use proto::v1::{ServerRecord, ServerState};
use swarm::discovery::{self, now_ms};
use swarm::placement::{span_throughput, Served};
use swarm::NetHandle;

use crate::host::ListenAddrs;

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
        };
        let failed = discovery::announce(&self.net, &self.fp, &record).await;
        tracing::debug!(?state, failed, "announced");
    }
}

/// A joining server's decode time is not measured yet; count it as typical so that nodes
/// starting together still see each other's choices.
const JOINING_DECODE_MS: f32 = 1.0;

/// The swarm's servers of this model as the balancing logic sees them.
pub async fn served(
    net: &NetHandle,
    fp: &Fingerprint,
    block_count: u32,
) -> Vec<Served<libp2p::PeerId>> {
    let servers = discovery::lookup(net, fp, block_count)
        .await
        .unwrap_or_default();
    servers
        .into_iter()
        .filter(|s| matches!(s.state, ServerState::Online | ServerState::Joining))
        .map(|s| {
            let ms = if s.decode_ms_per_block > 0.0 {
                s.decode_ms_per_block
            } else {
                JOINING_DECODE_MS
            };
            Served {
                throughput: span_throughput(ms, s.blocks.len() as u32),
                peer: s.peer,
                blocks: s.blocks,
            }
        })
        .collect()
}
