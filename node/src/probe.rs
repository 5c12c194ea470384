//! Timing one step through another server's blocks: the evidence balancing goes by.
//!
//! A server's announced speed is a claim. Signed records stop a peer from making ANOTHER peer
//! look fast, but nothing stops it from saying that it is fast itself, or from announcing
//! blocks on a peer id that never answers: a record for a peer that did not exist, claiming
//! 1e-6 ms per block, once made an honest node move off the blocks it served, and clients then
//! found nobody for them. So a node counts another server for placement only once it has
//! opened a session on it for the announced blocks and timed one step of one row through them:
//! a peer that does not exist, does not serve those blocks or does not compute is not counted,
//! and one that does counts at no more than the speed measured here (network included, so a
//! far peer counts as slower than it says, never as faster).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use proto::v1::{server_frame, ClientFrame, Dtype, OpenSession, ServerFrame};
use proto::{encode_tensor, max_step_frame, read_frame, write_frame, WireError, MAX_OPEN_FRAME};
use swarm::discovery::Server;
use swarm::{NetHandle, INFERENCE_STREAM};

/// Bound on one probe, connection included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a measurement is believed before the server is measured again.
const PROBE_TTL: Duration = Duration::from_secs(300);

/// Most servers probed in one placement decision; the rest are probed at later ones.
pub const MAX_PROBES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no connection: {0}")]
    Dial(String),
    #[error("no inference stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("answered {0} instead")]
    Unexpected(&'static str),
    #[error("no answer within {PROBE_TIMEOUT:?}")]
    Timeout,
}

/// Measured decode times of other servers, by peer and blocks, kept for [`PROBE_TTL`].
#[derive(Default)]
pub struct Probes {
    measured: HashMap<(PeerId, u32, u32), (Instant, Option<f32>)>,
}

impl Probes {
    /// Milliseconds per block one decode step of each of `servers` took here, by index; `None`
    /// for those that failed their probe. Servers without a recent measurement are probed all
    /// at once (at most [`MAX_PROBES`] of them, the rest count as unmeasured until a later
    /// call), so a swarm full of records of silent peers costs one [`PROBE_TIMEOUT`], not one
    /// each.
    pub async fn measure(
        &mut self,
        net: &NetHandle,
        fp: &Fingerprint,
        dim: usize,
        servers: &[&Server],
    ) -> Vec<Option<f32>> {
        let now = Instant::now();
        self.measured
            .retain(|_, (at, _)| now.duration_since(*at) < PROBE_TTL);
        let key = |s: &Server| (s.peer, s.blocks.start, s.blocks.end);
        let todo: Vec<&Server> = servers
            .iter()
            .copied()
            .filter(|s| !self.measured.contains_key(&key(s)))
            .take(MAX_PROBES)
            .collect();
        let timed = futures::future::join_all(todo.iter().map(|s| async move {
            match tokio::time::timeout(PROBE_TIMEOUT, time_step(net, fp, dim, s)).await {
                Ok(Ok(ms)) => Some(ms),
                Ok(Err(e)) => {
                    tracing::info!(peer = %s.peer, "not counted for placement: {e}");
                    None
                }
                Err(_) => {
                    tracing::info!(peer = %s.peer, "not counted for placement: {}", ProbeError::Timeout);
                    None
                }
            }
        }))
        .await;
        for (s, ms) in todo.iter().zip(timed) {
            self.measured.insert(key(s), (now, ms));
        }
        servers
            .iter()
            .map(|s| self.measured.get(&key(s)).and_then(|(_, ms)| *ms))
            .collect()
    }
}

/// Opens a one-position session on `server` for its announced blocks, times one step of one
/// row through them, and closes it. Milliseconds per block.
async fn time_step(
    net: &NetHandle,
    fp: &Fingerprint,
    dim: usize,
    server: &Server,
) -> Result<f32, ProbeError> {
    let peer = server.peer;
    net.dial(peer, server.addrs.clone(), PROBE_TIMEOUT)
        .await
        .map_err(|e| ProbeError::Dial(e.to_string()))?;
    let mut stream = net
        .stream_control()
        .open_stream(peer, INFERENCE_STREAM)
        .await
        .map_err(|e| ProbeError::Stream(e.to_string()))?;
    let open = ClientFrame::open(OpenSession {
        fingerprint: fp.to_vec(),
        start_block: server.blocks.start,
        end_block: server.blocks.end,
        max_length: 1,
        wire_dtype: Dtype::F32 as i32,
    });
    write_frame(&mut stream, &open).await?;
    match read_frame::<_, ServerFrame>(&mut stream, MAX_OPEN_FRAME)
        .await?
        .and_then(|f| f.kind)
    {
        Some(server_frame::Kind::Opened(_)) => {}
        other => return Err(ProbeError::Unexpected(kind_name(other.as_ref()))),
    }
    let row = vec![0.0f32; dim];
    let started = Instant::now();
    write_frame(
        &mut stream,
        &ClientFrame::step(0, encode_tensor(&row, &[1, dim], Dtype::F32)),
    )
    .await?;
    let answer = read_frame::<_, ServerFrame>(&mut stream, max_step_frame(1, dim))
        .await?
        .and_then(|f| f.kind);
    let elapsed = started.elapsed();
    if !matches!(answer, Some(server_frame::Kind::Result(_))) {
        return Err(ProbeError::Unexpected(kind_name(answer.as_ref())));
    }
    let _ = write_frame(&mut stream, &ClientFrame::close()).await;
    let blocks = server.blocks.len().max(1) as f32;
    Ok(elapsed.as_secs_f32() * 1e3 / blocks)
}

fn kind_name(kind: Option<&server_frame::Kind>) -> &'static str {
    match kind {
        None => "nothing",
        Some(server_frame::Kind::Opened(_)) => "session-opened",
        Some(server_frame::Kind::Result(_)) => "a result",
        Some(server_frame::Kind::Error(_)) => "an error",
        Some(server_frame::Kind::ForwardFailed(_)) => "a forward report",
    }
}
