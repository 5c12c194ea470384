//! One peer's part of a route: an open session on `blocks` of that peer, over one stream.

use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::io::{AsyncReadExt, WriteHalf};
use futures::{Stream, StreamExt};

use libp2p::{Multiaddr, PeerId};
use model::fingerprint::Fingerprint;
use model::Hidden;
use proto::v1::{
    server_frame, ClientFrame, ErrorCode, Hop, OpenSession, ServerFrame, Step, StepResult,
};
use proto::{decode_tensor, encode_tensor, hidden_limits, max_step_frame, step_bound};
use proto::{write_frame, Link, Received, Wire};
use proto::{ErrorAction, WireError};
use swarm::discovery::Server;
use swarm::{Direction, NetError, NetHandle, INFERENCE_STREAM};

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

    /// Whether the peer did not answer at all (no connection, or no reply in time), as a
    /// frozen or vanished node does; other clients are told (see [`swarm::offline`]). Refusals,
    /// bad answers and closed sessions come from a peer that is there.
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            SessionError::Stream { .. } | SessionError::Timeout { .. }
        )
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

/// Step ids increase across every session of this process, so each node sees them increase
/// whichever route a step took to it (sent by this client, or pushed by another node).
static NEXT_STEP_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_step_id() -> u64 {
    NEXT_STEP_ID.fetch_add(1, Ordering::Relaxed)
}

/// Most answers to older steps read before the one awaited. Each push this client gave up on
/// can leave one answer (and one report of a failed forward) behind on a stream; more than this
/// is a peer making answers up.
const MAX_STALE_ANSWERS: usize = 8;

/// A session's answers, read so that a wait for one can be dropped without losing a frame.
type Frames = Pin<Box<dyn Stream<Item = Result<Received<ServerFrame>, WireError>> + Send>>;

pub struct SpanSession {
    pub peer: PeerId,
    pub blocks: Range<u32>,
    /// Where the peer said it can be reached, for nodes that forward to it.
    addrs: Vec<Multiaddr>,
    /// The token other nodes push this session's steps with; empty if the peer takes none.
    push_token: Vec<u8>,
    writer: WriteHalf<libp2p::Stream>,
    frames: Frames,
    dim: usize,
    /// Most rows the peer takes in one step, as it said when the session opened.
    max_step_tokens: usize,
    wire: Wire,
    /// The round trip to the peer (ping, else the session open's), for `Wire::Auto`.
    rtt: Option<Duration>,
    timeouts: Timeouts,
    /// Where the measured rates of this client's links are kept, across sessions.
    net: NetHandle,
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
        wire: Wire,
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
        let (reader, writer) = stream.split();
        let mut s = Self {
            peer,
            blocks: blocks.clone(),
            addrs: server.addrs.clone(),
            push_token: Vec::new(),
            writer,
            frames: Box::pin(proto::frames(
                reader,
                max_step_frame(max_length as usize, dim),
            )),
            dim,
            max_step_tokens: proto::DEFAULT_MAX_STEP_TOKENS,
            wire,
            rtt: None,
            timeouts,
            net: net.clone(),
        };
        let open = ClientFrame::open(OpenSession {
            fingerprint: fp.to_vec(),
            start_block: blocks.start,
            end_block: blocks.end,
            max_length,
            wire_dtype: wire.session_dtype() as i32,
        });
        let started = std::time::Instant::now();
        let answer = s
            .exchange(&open, "session open", timeouts.connect, 0)
            .await?;
        s.rtt = match wire {
            Wire::Auto => Some(net.rtt(peer).await.unwrap_or_else(|| started.elapsed())),
            Wire::Fixed(_) => None,
        };
        match answer {
            server_frame::Kind::Opened(o) => {
                s.max_step_tokens = step_bound(o.max_step_tokens);
                if o.push_token.len() == proto::PUSH_TOKEN_LEN {
                    s.push_token = o.push_token;
                }
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

    /// The frame of a step at `pos`, in this session's wire dtype (or the one
    /// [`proto::auto_dtype`] picks for this link); `next` is the rest of the route for a pushed
    /// step, empty for one the client relays itself.
    fn step_frame(&self, pos: u32, hidden: &Hidden, step_id: u64, next: Vec<Hop>) -> ClientFrame {
        let (dtype, auto_wire) = match self.wire {
            Wire::Fixed(d) => (d, false),
            Wire::Auto => {
                let link = Link {
                    rtt: self.rtt,
                    rate: self.net.link_rate(self.peer, Direction::To),
                };
                let dtype = proto::auto_dtype(hidden.tokens, hidden.dim, link);
                if hidden.tokens > 1 {
                    tracing::debug!(
                        peer = %self.peer,
                        rows = hidden.tokens,
                        rtt_ms = link.rtt.map(|r| r.as_millis() as u64),
                        rate_kbit_s = link.rate_kbit_s(),
                        "auto wire: step as {dtype:?}"
                    );
                }
                (dtype, true)
            }
        };
        ClientFrame::step_of(Step {
            position: pos,
            hidden: Some(encode_tensor(
                &hidden.data,
                &[hidden.tokens, hidden.dim],
                dtype,
            )),
            step_id,
            next,
            auto_wire,
            answer_rate: self.answer_rate(),
        })
    }

    /// One step of at most the peer's bound.
    async fn step_once(&mut self, pos: u32, hidden: &Hidden) -> Result<Hidden, SessionError> {
        let step_id = next_step_id();
        let frame = self.step_frame(pos, hidden, step_id, Vec::new());
        let answer = match self
            .exchange(&frame, "step", self.timeouts.step, step_id)
            .await
        {
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
            server_frame::Kind::Result(r) => self.decode_result(r, hidden.tokens),
            other => Err(self.unexpected(other)),
        }
    }

    /// This span as a hop the previous span's node can forward to; `None` when its peer takes
    /// no pushes.
    pub fn hop(&self) -> Option<Hop> {
        if self.push_token.is_empty() {
            return None;
        }
        Some(Hop {
            peer_id: self.peer.to_bytes(),
            addrs: self
                .addrs
                .iter()
                .map(|a| a.to_vec())
                .filter(|a| a.len() <= proto::MAX_HOP_ADDR_BYTES)
                .take(proto::MAX_HOP_ADDRS)
                .collect(),
            push_token: self.push_token.clone(),
            start_block: self.blocks.start,
            end_block: self.blocks.end,
            answer_rate: self.answer_rate(),
        })
    }

    /// The rate at which this peer's answers reached this client so far (0: not measured), for
    /// the peer's choice of dtype under `Wire::Auto` when it answers only the client.
    fn answer_rate(&self) -> u64 {
        self.net.link_rate(self.peer, Direction::From).unwrap_or(0)
    }

    /// Sends a step of at most the peer's bound whose output the peer forwards along `next`;
    /// each span's answer is then read from its own session with [`SpanSession::pushed_answer`].
    pub async fn send_pushed(
        &mut self,
        pos: u32,
        hidden: &Hidden,
        step_id: u64,
        next: Vec<Hop>,
    ) -> Result<(), SessionError> {
        let peer = self.peer;
        let frame = self.step_frame(pos, hidden, step_id, next);
        let limit = self.timeouts.step;
        tokio::time::timeout(limit, write_frame(&mut self.writer, &frame))
            .await
            .map_err(|_| SessionError::Timeout {
                peer,
                what: "pushed step",
                secs: limit.as_secs_f64(),
            })?
            .map_err(|source| SessionError::Wire { peer, source })
    }

    /// This span's answer to the pushed step `step_id` of `tokens` rows, and the reason its peer
    /// gave for not forwarding the output (empty if it did, or had nothing to forward to).
    pub async fn pushed_answer(
        &mut self,
        step_id: u64,
        tokens: usize,
    ) -> Result<(Hidden, String), SessionError> {
        let limit = self.timeouts.step;
        let peer = self.peer;
        let answer = tokio::time::timeout(limit, self.answer(step_id))
            .await
            .map_err(|_| SessionError::Timeout {
                peer,
                what: "pushed step",
                secs: limit.as_secs_f64(),
            })??;
        match answer {
            server_frame::Kind::Result(mut r) => {
                let forward_error: String = std::mem::take(&mut r.forward_error)
                    .chars()
                    .take(500)
                    .collect();
                Ok((self.decode_result(r, tokens)?, forward_error))
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// The hidden states of an answer to `tokens` rows, checked against the session's shape.
    fn decode_result(&self, r: StepResult, tokens: usize) -> Result<Hidden, SessionError> {
        let peer = self.peer;
        let t = r.hidden.ok_or(SessionError::Protocol {
            peer,
            reason: "step result without hidden states".into(),
        })?;
        let limits = hidden_limits(tokens, self.dim);
        let d = decode_tensor(&t, &limits).map_err(|source| SessionError::Wire { peer, source })?;
        if d.shape != [tokens, self.dim] {
            return Err(SessionError::Protocol {
                peer,
                reason: format!("answered shape {:?} for {}x{}", d.shape, tokens, self.dim),
            });
        }
        Hidden::new(tokens, self.dim, d.values).map_err(|e| SessionError::Protocol {
            peer,
            reason: e.to_string(),
        })
    }

    /// Tells the peer to free the session; best effort, bounded.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            write_frame(&mut self.writer, &ClientFrame::close()),
        )
        .await;
    }

    /// Sends `frame` and reads its answer (for a step, the answer to `step_id`), all within
    /// `limit`.
    async fn exchange(
        &mut self,
        frame: &ClientFrame,
        what: &'static str,
        limit: Duration,
        step_id: u64,
    ) -> Result<server_frame::Kind, SessionError> {
        let peer = self.peer;
        let io = async {
            write_frame(&mut self.writer, frame)
                .await
                .map_err(|source| SessionError::Wire { peer, source })?;
            self.answer(step_id).await
        };
        tokio::time::timeout(limit, io)
            .await
            .map_err(|_| SessionError::Timeout {
                peer,
                what,
                secs: limit.as_secs_f64(),
            })?
    }

    /// Reads the next answer, dropping answers to steps older than `step_id`: a step pushed
    /// to this peer that the client then sent again itself (after a failed push) is answered
    /// twice, and the first answer is of no use any more; so is a late report that its output
    /// was not forwarded.
    async fn answer(&mut self, step_id: u64) -> Result<server_frame::Kind, SessionError> {
        let peer = self.peer;
        for _ in 0..=MAX_STALE_ANSWERS {
            match self.next_frame().await? {
                server_frame::Kind::Error(e) => {
                    return Err(SessionError::Remote {
                        peer,
                        code: ErrorCode::from_wire(e.code),
                        message: e.message.chars().take(500).collect(),
                    })
                }
                server_frame::Kind::Result(r) if r.step_id != step_id => {
                    if r.step_id < step_id {
                        tracing::debug!(%peer, "dropped the answer to step {}, sent again since", r.step_id);
                        continue;
                    }
                    return Err(SessionError::Protocol {
                        peer,
                        reason: format!("answered step {} when asked step {step_id}", r.step_id),
                    });
                }
                server_frame::Kind::ForwardFailed(f) if f.step_id < step_id => continue,
                kind => return Ok(kind),
            }
        }
        Err(SessionError::Protocol {
            peer,
            reason: format!("sent more than {MAX_STALE_ANSWERS} answers to old steps"),
        })
    }

    /// Waits for this peer to report that it could not forward its output of the pushed step
    /// `step_id`, which it has answered already, and returns its reason. Nothing comes when the
    /// forward went through: the caller waits for the next span's answer beside this, and
    /// drops this wait once that answer arrives. A session that ends or breaks meanwhile is a
    /// forward that may not have happened, so it is reported too.
    pub async fn forward_failure(&mut self, step_id: u64) -> String {
        let peer = self.peer;
        for _ in 0..=MAX_STALE_ANSWERS {
            match self.next_frame().await {
                Ok(server_frame::Kind::ForwardFailed(f)) if f.step_id < step_id => continue,
                Ok(server_frame::Kind::ForwardFailed(f)) if f.step_id == step_id => {
                    return format!("{peer}: {}", f.reason.chars().take(500).collect::<String>())
                }
                Ok(_) => return format!("{peer} sent a frame out of turn after its answer"),
                Err(e) => return format!("after its answer: {e}"),
            }
        }
        format!("{peer} sent more than {MAX_STALE_ANSWERS} stale reports")
    }

    /// The next frame of the session, whatever it is.
    async fn next_frame(&mut self) -> Result<server_frame::Kind, SessionError> {
        let peer = self.peer;
        match self.frames.next().await {
            None => Err(SessionError::Closed { peer }),
            Some(Err(source)) => Err(SessionError::Wire { peer, source }),
            Some(Ok(got)) => {
                // Rates learned on the way: of this peer's answers (timed here), and of this
                // client's own steps (timed by the peer).
                if let Some(rate) = got.rate {
                    self.net.note_link_rate(peer, Direction::From, rate);
                }
                if let Some(server_frame::Kind::Result(r)) = &got.frame.kind {
                    self.net.note_link_rate(peer, Direction::To, r.input_rate);
                }
                got.frame.kind.ok_or(SessionError::Closed { peer })
            }
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
                    server_frame::Kind::ForwardFailed(_) => "forward-report",
                }
            ),
        }
    }
}
