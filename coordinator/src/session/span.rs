//! One peer's part of a route: an open session on `blocks` of that peer, over one stream.

use std::ops::Range;
use std::time::Duration;

use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use model::Hidden;
use proto::v1::{server_frame, ClientFrame, Dtype, ErrorCode, OpenSession, ServerFrame};
use proto::{decode_tensor, encode_tensor, hidden_limits, max_step_frame, step_bound};
use proto::{read_frame, write_frame};
use proto::{ErrorAction, WireError};
use swarm::discovery::Server;
use swarm::{NetError, NetHandle, INFERENCE_STREAM};

/// Bounds every wait of a session, so a dead or frozen peer is noticed instead of waited on.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub step: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            step: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Discovery could not ask the DHT (the client's own network task is gone, or timed out).
    #[error(transparent)]
    Lookup(#[from] NetError),
    #[error("opening a stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("talking to {peer}: {source}")]
    Wire { peer: PeerId, source: WireError },
    #[error("{peer} refused: {message} ({code:?})")]
    Remote {
        peer: PeerId,
        code: ErrorCode,
        message: String,
    },
    #[error("{peer} did not answer the {what} within {secs:.1}s")]
    Timeout {
        peer: PeerId,
        what: &'static str,
        secs: f64,
    },
    #[error("{peer} closed the session")]
    Closed { peer: PeerId },
    #[error("{peer} broke the protocol: {reason}")]
    Protocol { peer: PeerId, reason: String },
}

impl SessionError {
    /// Whether another peer might succeed where this one failed.
    pub fn action(&self) -> ErrorAction {
        match self {
            SessionError::Remote { code, .. } => code.action(),
            SessionError::Protocol { .. } => ErrorAction::Reroute,
            _ => ErrorAction::Reroute,
        }
    }

    pub fn peer(&self) -> Option<PeerId> {
        match self {
            SessionError::Lookup(_) => None,
            SessionError::Stream { peer, .. }
            | SessionError::Wire { peer, .. }
            | SessionError::Remote { peer, .. }
            | SessionError::Timeout { peer, .. }
            | SessionError::Closed { peer }
            | SessionError::Protocol { peer, .. } => Some(*peer),
        }
    }
}

pub struct SpanSession {
    pub peer: PeerId,
    pub blocks: Range<u32>,
    stream: libp2p::Stream,
    dim: usize,
    max_length: u32,
    /// Most rows the peer takes in one step, as it said when the session opened.
    max_step_tokens: usize,
    dtype: Dtype,
    timeouts: Timeouts,
}

impl SpanSession {
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        net: &NetHandle,
        server: &Server,
        blocks: Range<u32>,
        fp: &Fingerprint,
        dim: usize,
        max_length: u32,
        dtype: Dtype,
        timeouts: Timeouts,
    ) -> Result<Self, SessionError> {
        let peer = server.peer;
        net.dial(peer, server.addrs.clone(), timeouts.connect)
            .await
            .map_err(|e| SessionError::Stream {
                peer,
                reason: e.to_string(),
            })?;
        let mut control = net.stream_control();
        let stream = tokio::time::timeout(
            timeouts.connect,
            control.open_stream(peer, INFERENCE_STREAM),
        )
        .await
        .map_err(|_| SessionError::Timeout {
            peer,
            what: "stream open",
            secs: timeouts.connect.as_secs_f64(),
        })?
        .map_err(|e| SessionError::Stream {
            peer,
            reason: e.to_string(),
        })?;
        let mut s = Self {
            peer,
            blocks: blocks.clone(),
            stream,
            dim,
            max_length,
            max_step_tokens: proto::DEFAULT_MAX_STEP_TOKENS,
            dtype,
            timeouts,
        };
        let open = ClientFrame::open(OpenSession {
            fingerprint: fp.to_vec(),
            start_block: blocks.start,
            end_block: blocks.end,
            max_length,
            wire_dtype: dtype as i32,
        });
        match s.exchange(&open, "session open", timeouts.connect).await? {
            server_frame::Kind::Opened(o) => {
                s.max_step_tokens = step_bound(o.max_step_tokens);
                Ok(s)
            }
            other => Err(s.unexpected(other)),
        }
    }

    /// Most rows the peer takes in one step.
    pub fn max_step_tokens(&self) -> usize {
        self.max_step_tokens
    }

    /// Sends `hidden` for positions `pos..` through this peer's blocks and returns the result,
    /// in steps of at most the peer's bound. Blocks compute the same bits however a prompt is
    /// cut, so the result equals one step of every row.
    pub async fn step(&mut self, pos: u32, hidden: &Hidden) -> Result<Hidden, SessionError> {
        let bound = self.max_step_tokens.max(1);
        if hidden.tokens <= bound {
            return self.step_once(pos, hidden).await;
        }
        let mut data = Vec::with_capacity(hidden.tokens * self.dim);
        let mut at = pos;
        for rows in hidden.data.chunks(bound * hidden.dim) {
            let part = Hidden {
                tokens: rows.len() / hidden.dim,
                dim: hidden.dim,
                data: rows.to_vec(),
            };
            data.extend_from_slice(&self.step_once(at, &part).await?.data);
            at += part.tokens as u32;
        }
        Ok(Hidden {
            tokens: hidden.tokens,
            dim: self.dim,
            data,
        })
    }

    /// One step of at most the peer's bound.
    async fn step_once(&mut self, pos: u32, hidden: &Hidden) -> Result<Hidden, SessionError> {
        let frame = ClientFrame::step(
            pos,
            encode_tensor(&hidden.data, &[hidden.tokens, hidden.dim], self.dtype),
        );
        let answer = match self.exchange(&frame, "step", self.timeouts.step).await {
            // We keep to the bound the peer gave; a refusal within it is the peer's lie, not
            // our fault, and it is treated as any broken peer (rerouted, banned).
            Err(SessionError::Remote {
                peer,
                code: ErrorCode::StepTooLarge,
                message,
            }) if hidden.tokens <= self.max_step_tokens => {
                return Err(SessionError::Protocol {
                    peer,
                    reason: format!(
                    "refused a step of {} rows as too large ({message}) after saying it takes {}",
                    hidden.tokens, self.max_step_tokens
                ),
                })
            }
            other => other?,
        };
        match answer {
            server_frame::Kind::Result(r) => {
                let peer = self.peer;
                let t = r.hidden.ok_or(SessionError::Protocol {
                    peer,
                    reason: "step result without hidden states".into(),
                })?;
                let limits = hidden_limits(hidden.tokens, self.dim);
                let d = decode_tensor(&t, &limits)
                    .map_err(|source| SessionError::Wire { peer, source })?;
                if d.shape != [hidden.tokens, self.dim] {
                    return Err(SessionError::Protocol {
                        peer,
                        reason: format!(
                            "answered shape {:?} for {}x{}",
                            d.shape, hidden.tokens, self.dim
                        ),
                    });
                }
                Hidden::new(hidden.tokens, self.dim, d.values).map_err(|e| SessionError::Protocol {
                    peer,
                    reason: e.to_string(),
                })
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Tells the peer to free the session; best effort, bounded.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            write_frame(&mut self.stream, &ClientFrame::close()),
        )
        .await;
    }

    async fn exchange(
        &mut self,
        frame: &ClientFrame,
        what: &'static str,
        limit: Duration,
    ) -> Result<server_frame::Kind, SessionError> {
        let peer = self.peer;
        let max = max_step_frame(self.max_length as usize, self.dim);
        let io = async {
            write_frame(&mut self.stream, frame).await?;
            read_frame::<_, ServerFrame>(&mut self.stream, max).await
        };
        let reply = tokio::time::timeout(limit, io)
            .await
            .map_err(|_| SessionError::Timeout {
                peer,
                what,
                secs: limit.as_secs_f64(),
            })?
            .map_err(|source| SessionError::Wire { peer, source })?;
        match reply.and_then(|f| f.kind) {
            None => Err(SessionError::Closed { peer }),
            Some(server_frame::Kind::Error(e)) => Err(SessionError::Remote {
                peer,
                code: ErrorCode::from_wire(e.code),
                message: e.message.chars().take(500).collect(),
            }),
            Some(kind) => Ok(kind),
        }
    }

    fn unexpected(&self, kind: server_frame::Kind) -> SessionError {
        SessionError::Protocol {
            peer: self.peer,
            reason: format!(
                "unexpected {} frame",
                match kind {
                    server_frame::Kind::Opened(_) => "session-opened",
                    server_frame::Kind::Result(_) => "step-result",
                    server_frame::Kind::Error(_) => "error",
                }
            ),
        }
    }
}
