//! The swarm's state for one model as people look at it: who serves which blocks, how fast,
//! how much cache is free, and where coverage has holes. One snapshot type is shared by the
//! terminal table, the status pages of gateway and nodes, and the gRPC `SwarmStatus` call, so
//! they never disagree.

use std::ops::Range;

use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use proto::v1::ServerState;
use serde::Serialize;

use crate::discovery::{self, Server};
use crate::host::{NetError, NetHandle};

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The id clients use to name the model (the file name without `.gguf`).
    pub id: String,
    pub fingerprint: String,
    pub architecture: String,
    pub block_count: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub peer_id: String,
    pub start_block: u32,
    pub end_block: u32,
    pub state: &'static str,
    pub decode_ms_per_block: f32,
    /// Decode steps per second through the peer's whole range (what one client can get).
    pub tokens_per_second: f32,
    pub free_cache_tokens: u64,
    /// The load the peer announced (what `--routing load-aware` clients price it at): sessions
    /// open, sessions it takes (0 when it did not say), and steps waiting for its compute.
    pub sessions: u32,
    pub max_sessions: u32,
    pub waiting_steps: u32,
    /// A client claimed it could not reach the peer after its newest announcement; clients
    /// route through it only where nobody else serves its blocks (see [`crate::offline`]).
    pub reported_offline: bool,
    /// Ping round trip from the process that made the snapshot; `None` before one answered.
    pub rtt_ms: Option<f32>,
    pub version: String,
    pub announced_ms_ago: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SwarmView {
    pub model: ModelInfo,
    pub peers: Vec<PeerView>,
    /// Online servers of each block.
    pub servers_per_block: Vec<u32>,
    /// The first run of blocks no online server covers.
    pub first_gap: Option<Range<u32>>,
    pub taken_at_ms: u64,
}

impl ModelInfo {
    pub fn new(id: String, fingerprint: &Fingerprint, spec: &model::ModelSpec) -> Self {
        Self {
            id,
            fingerprint: fingerprint.iter().map(|b| format!("{b:02x}")).collect(),
            architecture: spec.architecture.clone(),
            block_count: spec.block_count as u32,
        }
    }

    /// The model id of a file: its name without the `.gguf` extension.
    pub fn id_of(path: &std::path::Path) -> String {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_else(|| "model".into());
        name.strip_suffix(".gguf")
            .map(str::to_owned)
            .unwrap_or(name)
    }
}

impl SwarmView {
    pub fn complete(&self) -> bool {
        self.first_gap.is_none()
    }

    /// Builds a snapshot from server entries and the RTTs measured to them.
    pub fn from_servers(
        model: ModelInfo,
        servers: &[Server],
        rtt: impl Fn(&PeerId) -> Option<f32>,
        now_ms: u64,
    ) -> Self {
        let blocks = model.block_count as usize;
        let mut served = vec![0u32; blocks];
        let peers = servers
            .iter()
            .map(|s| {
                if s.state == ServerState::Online {
                    for b in s.blocks.clone() {
                        if let Some(n) = served.get_mut(b as usize) {
                            *n += 1;
                        }
                    }
                }
                let span_ms = s.decode_ms_per_block * s.blocks.len() as f32;
                PeerView {
                    peer_id: s.peer.to_string(),
                    start_block: s.blocks.start,
                    end_block: s.blocks.end,
                    state: state_name(s.state),
                    decode_ms_per_block: s.decode_ms_per_block,
                    tokens_per_second: if span_ms > 0.0 { 1000.0 / span_ms } else { 0.0 },
                    free_cache_tokens: s.free_cache_tokens,
                    sessions: s.load.sessions,
                    max_sessions: s.load.max_sessions,
                    waiting_steps: s.load.waiting_steps,
                    reported_offline: s.reported_offline,
                    rtt_ms: rtt(&s.peer),
                    version: s.version.clone(),
                    announced_ms_ago: now_ms.saturating_sub(s.announced_at_ms),
                }
            })
            .collect();
        let first_gap = served.iter().position(|&n| n == 0).map(|first| {
            let end = served[first..]
                .iter()
                .position(|&n| n > 0)
                .map_or(blocks, |k| first + k);
            first as u32..end as u32
        });
        Self {
            model,
            peers,
            servers_per_block: served,
            first_gap,
            taken_at_ms: now_ms,
        }
    }
}

pub fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Joining => "joining",
        ServerState::Online => "online",
        ServerState::Offline => "offline",
        ServerState::Unspecified => "unknown",
    }
}

/// Looks the model's servers up in the DHT and asks the network task for their RTTs.
pub async fn snapshot(
    net: &NetHandle,
    fingerprint: &Fingerprint,
    model: ModelInfo,
) -> Result<SwarmView, NetError> {
    let servers = discovery::lookup(net, fingerprint, model.block_count).await?;
    let mut rtts = std::collections::HashMap::new();
    for s in &servers {
        if let Some(rtt) = net.rtt(s.peer).await {
            rtts.insert(s.peer, rtt.as_secs_f32() * 1000.0);
        }
    }
    Ok(SwarmView::from_servers(
        model,
        &servers,
        |p| rtts.get(p).copied(),
        discovery::now_ms(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(blocks: Range<u32>, state: ServerState, ms: f32) -> Server {
        Server {
            peer: PeerId::random(),
            addrs: Vec::new(),
            blocks,
            state,
            decode_ms_per_block: ms,
            prefill_ms_per_block: 0.0,
            free_cache_tokens: 100,
            version: "t".into(),
            announced_at_ms: 900,
            load: Default::default(),
            reported_offline: false,
        }
    }

    fn info(blocks: u32) -> ModelInfo {
        ModelInfo {
            id: "m".into(),
            fingerprint: "00".repeat(32),
            architecture: "llama".into(),
            block_count: blocks,
        }
    }

    #[test]
    fn coverage_counts_only_online_servers_and_names_the_first_gap() {
        let servers = [
            server(0..4, ServerState::Online, 2.0),
            server(2..6, ServerState::Online, 1.0),
            server(6..8, ServerState::Joining, 1.0),
            server(8..10, ServerState::Online, 1.0),
        ];
        let v = SwarmView::from_servers(info(10), &servers, |_| Some(3.0), 1000);
        assert_eq!(v.servers_per_block, [1, 1, 2, 2, 1, 1, 0, 0, 1, 1]);
        assert_eq!(v.first_gap, Some(6..8));
        assert!(!v.complete());
        assert_eq!(v.peers[0].tokens_per_second, 125.0);
        assert_eq!(v.peers[2].state, "joining");
        assert_eq!(v.peers[0].announced_ms_ago, 100);
    }

    #[test]
    fn the_announced_load_is_shown_as_announced() {
        let mut busy = server(0..4, ServerState::Online, 1.0);
        busy.load = crate::load::Load {
            sessions: 5,
            max_sessions: 16,
            waiting_steps: 2,
        };
        let v = SwarmView::from_servers(info(4), &[busy], |_| None, 1000);
        let p = &v.peers[0];
        assert_eq!((p.sessions, p.max_sessions, p.waiting_steps), (5, 16, 2));
    }

    #[test]
    fn full_coverage_has_no_gap() {
        let v = SwarmView::from_servers(
            info(4),
            &[server(0..4, ServerState::Online, 1.0)],
            |_| None,
            0,
        );
        assert!(v.complete());
        assert_eq!(v.peers[0].rtt_ms, None);
    }
}
