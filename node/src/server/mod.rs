//! The inference protocol on the serving side: one task per stream, one session per stream.
//!
//! Every frame is checked before anything is allocated or computed: size, dtype, shape, block
//! range, position continuity. A bad frame is answered with an error code and ends that
//! session only; a silent client, or one that leaves an answer unread, is dropped after the idle
//! timeout (or the write timeout, if shorter), and its cache freed.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use model::Hidden;
use proto::v1::{
    client_frame, server_frame, ClientFrame, Dtype, ErrorCode, ServerFrame, StepResult,
};
use proto::{decode_tensor, encode_tensor, hidden_limits, max_step_frame, TensorLimits};
use proto::{read_frame, write_frame, WireError, MAX_OPEN_FRAME};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::compute::{ComputeError, ComputeHandle};

mod push_in;
mod push_out;

pub use push_in::{accept_loop as accept_push_loop, Inboxes};

/// Everything a session task needs to know about this node.
pub struct ServeContext {
    pub fingerprint: Fingerprint,
    pub blocks: Range<usize>,
    /// Blocks of the whole model.
    pub block_count: u32,
    pub dim: usize,
    pub context_length: usize,
    pub compute: ComputeHandle,
    pub idle_timeout: Duration,
    /// Most rows one step may carry (`--max-step-tokens`), told to clients when their session
    /// opens; a larger step is refused with STEP_TOO_LARGE and the session goes on.
    pub max_step_tokens: usize,
    /// What this node does wrong on purpose (tests only; see [`crate::Fault`]).
    pub fault: crate::Fault,
    /// Set when the node is leaving: new sessions are refused with SHUTTING_DOWN.
    pub leaving: AtomicBool,
    /// This node's host, to forward outputs to the next span's node.
    pub net: swarm::NetHandle,
    /// The open sessions other nodes may push steps into, by token.
    pub inboxes: Inboxes,
}

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts inference streams until `shutdown`, each served by a task of `sessions`. The same
/// token ends the sessions still open, so whoever cancels it can wait for `sessions` to empty
/// and know that nothing uses the compute thread any more.
pub async fn accept_loop(
    mut control: libp2p_stream::Control,
    ctx: Arc<ServeContext>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut incoming = match control.accept(swarm::INFERENCE_STREAM) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot accept inference streams: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => match next {
                Some((peer, stream)) => {
                    let ctx = ctx.clone();
                    let stop = shutdown.clone();
                    sessions.spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = serve_stream(peer, stream, ctx) => {}
                        }
                    });
                }
                None => break,
            }
        }
    }
}

fn compute_error(e: ComputeError) -> ServerFrame {
    let code = match &e {
        ComputeError::Busy { .. } => ErrorCode::Busy,
        ComputeError::CacheFull { .. } | ComputeError::PeerCacheFull { .. } => ErrorCode::CacheFull,
        ComputeError::TooManySessions(_) | ComputeError::PeerSessions { .. } => {
            ErrorCode::TooManySessions
        }
        ComputeError::BadPosition { .. } => ErrorCode::BadPosition,
        ComputeError::StepInFlight => ErrorCode::BadRequest,
        ComputeError::UnknownSession
        | ComputeError::Model(_)
        | ComputeError::BatchFailed(_)
        | ComputeError::Stopped => ErrorCode::Internal,
    };
    ServerFrame::error(code, e.to_string())
}

/// Longest a frame may take to be written: a client that stops reading is cut off (and its
/// session's cache freed) instead of holding the session open forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServeContext {
    /// How long one frame may take to be written: [`WRITE_TIMEOUT`], or the idle timeout if
    /// that is shorter. A client that leaves an answer unread is as silent as one that sends
    /// nothing, and its session must not outlive what `--idle-timeout` promises.
    fn write_timeout(&self) -> Duration {
        WRITE_TIMEOUT.min(self.idle_timeout)
    }
}

/// Writes `frame`, giving up after `limit` (the stream is then useless: the task ends and the
/// session with it).
async fn send<W: futures::io::AsyncWrite + Unpin>(
    stream: &mut W,
    frame: &ServerFrame,
    limit: Duration,
) -> Result<(), WireError> {
    match tokio::time::timeout(limit, write_frame(stream, frame)).await {
        Ok(r) => r,
        Err(_) => Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer did not read a frame within {limit:?}"),
        ))),
    }
}

/// Spoils a step's answer when the node is told to (test builds only).
fn corrupt(fault: crate::Fault, _hidden: &mut [f32]) {
    match fault {
        crate::Fault::None => {}
        #[cfg(feature = "fault-injection")]
        crate::Fault::CorruptOutputs => _hidden.iter_mut().for_each(|v| *v = -*v),
        #[cfg(feature = "fault-injection")]
        crate::Fault::RefuseSteps | crate::Fault::RefusePushes | crate::Fault::IgnoreOpens => {}
    }
}

/// The refusal a node told to lie about every step sends instead of computing it (test builds
/// only).
fn refusal(_fault: crate::Fault) -> Option<ServerFrame> {
    #[cfg(feature = "fault-injection")]
    if _fault == crate::Fault::RefuseSteps {
        return Some(ServerFrame::error(ErrorCode::BadRequest, "malformed step"));
    }
    None
}

/// Frees the session's cache however the task ends.
struct CloseOnDrop(ComputeHandle, u64);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

/// Where a step came from: the session's own client, or the node of the previous span.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Client,
    Pushed,
}

async fn serve_stream(peer: PeerId, mut stream: libp2p::Stream, ctx: Arc<ServeContext>) {
    #[cfg(feature = "fault-injection")]
    if ctx.fault == crate::Fault::IgnoreOpens {
        tokio::time::sleep(ctx.idle_timeout).await;
        return;
    }
    let (reply, session) = match open(&mut stream, &ctx, peer).await {
        Ok(ok) => ok,
        Err(Some(frame)) => {
            let _ = send(&mut stream, &frame, ctx.write_timeout()).await;
            return;
        }
        Err(None) => return,
    };
    let (id, max_length, dtype, blocks) = session;
    let _guard = CloseOnDrop(ctx.compute.clone(), id);
    let (token, mut inbox, _listed) = ctx.inboxes.register(blocks.clone());
    let reply = with_push_token(reply, &token);
    if send(&mut stream, &reply, ctx.write_timeout())
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(%peer, session = id, blocks = ?blocks, max_length, "session opened");
    let max_frame = max_step_frame(max_length, ctx.dim);
    let limits = hidden_limits(max_length, ctx.dim);
    let end_block = u32::try_from(blocks.end).unwrap_or(u32::MAX);
    let (reader, mut stream) = futures::io::AsyncReadExt::split(stream);
    let mut frames = Box::pin(proto::frames::<_, ClientFrame>(reader, max_frame));
    let mut forwarder = push_out::Forwarder::new(ctx.net.clone(), ctx.fingerprint, ctx.block_count);
    // Highest step id run so far: a push older than that is a leftover of a step the client
    // has since sent again itself, and running it would roll the cache back.
    let mut last_step_id = 0u64;
    loop {
        let next = tokio::time::timeout(ctx.idle_timeout, async {
            tokio::select! {
                f = frames.next() => Err(f),
                Some(p) = inbox.recv() => Ok(p),
            }
        })
        .await;
        let (step, origin, input_rate) = match next {
            Err(_) => {
                tracing::info!(%peer, session = id, "session idle for {:?}, closing", ctx.idle_timeout);
                return;
            }
            Ok(Err(None)) => return,
            Ok(Err(Some(Err(e)))) => {
                let _ = send(
                    &mut stream,
                    &ServerFrame::error(ErrorCode::BadRequest, e.to_string()),
                    ctx.write_timeout(),
                )
                .await;
                return;
            }
            Ok(Err(Some(Ok(got)))) => match got.frame.kind {
                Some(client_frame::Kind::Step(s)) => (s, Origin::Client, got.rate),
                Some(client_frame::Kind::Close(_)) => return,
                _ => {
                    let _ = send(
                        &mut stream,
                        &ServerFrame::error(
                            ErrorCode::BadRequest,
                            "expected a step or close frame",
                        ),
                        ctx.write_timeout(),
                    )
                    .await;
                    return;
                }
            },
            Ok(Ok(pushed)) => match take_push(&ctx, &pushed.step, last_step_id, end_block) {
                Ok(()) => {
                    let _ = pushed.taken.send(Ok(()));
                    (pushed.step, Origin::Pushed, None)
                }
                Err(e) => {
                    tracing::debug!(%peer, session = id, "push refused: {}", e.message);
                    let _ = pushed.taken.send(Err(e));
                    continue;
                }
            },
        };
        if origin == Origin::Client {
            if let Some(frame) = oversized(&step, ctx.max_step_tokens) {
                // Nothing was computed and the session's cache is untouched, so the client may
                // go on in smaller steps on this same session.
                tracing::debug!(%peer, session = id, "step over the row bound refused");
                if send(&mut stream, &frame, ctx.write_timeout())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            if ctx.leaving.load(Ordering::Relaxed) {
                // The client reroutes this step elsewhere; nothing is lost.
                let _ = send(
                    &mut stream,
                    &ServerFrame::error(ErrorCode::ShuttingDown, "this node is leaving the swarm"),
                    ctx.write_timeout(),
                )
                .await;
                return;
            }
            if let Err(e) = proto::check_hops(&step, end_block) {
                let _ = send(
                    &mut stream,
                    &ServerFrame::error(ErrorCode::BadRequest, e),
                    ctx.write_timeout(),
                )
                .await;
                return;
            }
        }
        let answer = match (
            refusal(ctx.fault),
            check_step(&step, &limits, ctx.dim, max_length),
        ) {
            (Some(lie), _) => Err(lie),
            (None, Err(frame)) => Err(frame),
            (None, Ok(hidden)) => {
                let compute = ctx.compute.step(id, step.position as usize, hidden);
                let done = match origin {
                    // The client sends nothing while its step runs, so anything read meanwhile
                    // (end of stream, a reset, a frame out of turn) means it has gone or broken
                    // the protocol: the step is dropped at once, and with it its queued rows.
                    Origin::Client => tokio::select! {
                        done = compute => done,
                        _ = frames.next() => {
                            tracing::debug!(%peer, session = id, "stream ended during a step; step withdrawn");
                            return;
                        }
                    },
                    // A client that falls back after a failed push may send this step again
                    // while the push runs: its frame waits for the next turn.
                    Origin::Pushed => compute.await,
                };
                match done {
                    Ok((mut out, took)) => {
                        corrupt(ctx.fault, &mut out.data);
                        let dtype = output_dtype(&ctx, peer, &step, out.tokens, dtype).await;
                        Ok((
                            encode_tensor(&out.data, &[out.tokens, out.dim], dtype),
                            took.as_secs_f32() * 1e3,
                        ))
                    }
                    Err(e) => Err(compute_error(e)),
                }
            }
        };
        let (hidden, compute_ms) = match answer {
            Ok(ok) => ok,
            Err(frame) => {
                tracing::debug!(%peer, session = id, "step refused");
                let _ = send(&mut stream, &frame, ctx.write_timeout()).await;
                return;
            }
        };
        last_step_id = last_step_id.max(step.step_id);
        // The output goes on before the client hears of it: the next node's work is what the
        // client waits for. The client gets the very same bytes, for its replay history, and
        // gets them before this node waits for the next one's acknowledgement.
        let (sent, forward_error) = match forwarder.start(&step, &hidden).await {
            Ok(sent) => (sent, String::new()),
            Err(e) => {
                tracing::info!(%peer, session = id, "{e}; the client sends the next span itself");
                (None, e)
            }
        };
        let frame = ServerFrame::step_result(StepResult {
            hidden: Some(hidden),
            compute_ms,
            step_id: step.step_id,
            forward_error,
            input_rate: input_rate.unwrap_or(0),
        });
        if let Err(e) = send(&mut stream, &frame, ctx.write_timeout()).await {
            tracing::info!(%peer, session = id, "answer not delivered ({e}), closing");
            return;
        }
        if let Some(sent) = sent {
            if let Err(e) = forwarder.confirm(sent).await {
                tracing::info!(%peer, session = id, "{e}; the client sends the next span itself");
                let report = ServerFrame::forward_failed(step.step_id, e);
                if send(&mut stream, &report, ctx.write_timeout())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// The dtype of a step's output: the session's, or under the client's `auto_wire` the one
/// [`proto::auto_dtype`] picks for the link it goes out on first, to the next node when the
/// step is forwarded (its rate as that node reported it in earlier acknowledgements), else back
/// to the client (its rate as the client measured this node's earlier answers). The client gets
/// the same bytes as the next node either way, so its replay history holds exactly what that
/// node computed from.
async fn output_dtype(
    ctx: &ServeContext,
    client: PeerId,
    step: &proto::v1::Step,
    rows: usize,
    session: Dtype,
) -> Dtype {
    if !step.auto_wire {
        return session;
    }
    // A step too small to compress on any link needs no measurement.
    let worst = proto::Link {
        rtt: Some(Duration::MAX),
        rate: Some(1),
    };
    if proto::auto_dtype(rows, ctx.dim, worst) == Dtype::F32 {
        return Dtype::F32;
    }
    let link = match step.next.first() {
        Some(hop) => match PeerId::from_bytes(&hop.peer_id) {
            Ok(next) => proto::Link {
                rtt: ctx.net.rtt(next).await,
                rate: ctx.net.link_rate(next, swarm::Direction::To),
            },
            Err(_) => proto::Link::default(),
        },
        None => proto::Link {
            rtt: ctx.net.rtt(client).await,
            rate: (step.answer_rate > 0).then_some(step.answer_rate),
        },
    };
    let dtype = proto::auto_dtype(rows, ctx.dim, link);
    // Prompt-sized steps only (smaller ones returned above): one line per prompt and node.
    tracing::info!(
        rows,
        rtt_ms = link.rtt.map(|r| r.as_millis() as u64),
        rate_kbit_s = link.rate_kbit_s(),
        "auto wire: output as {dtype:?}"
    );
    dtype
}

/// Whether the session takes a step pushed by the previous span's node: it must be newer than
/// every step run so far, fit the node's step bound and carry well-formed hops, and the node
/// must not be leaving. The push is acknowledged with this answer before anything is computed.
fn take_push(
    ctx: &ServeContext,
    step: &proto::v1::Step,
    last_step_id: u64,
    end_block: u32,
) -> Result<(), proto::v1::Error> {
    #[cfg(feature = "fault-injection")]
    if ctx.fault == crate::Fault::RefusePushes {
        return Err(push_in::refusal(
            ErrorCode::BadRequest,
            "this node takes no pushed steps (fault injection)",
        ));
    }
    if step.step_id == 0 || step.step_id <= last_step_id {
        return Err(push_in::refusal(
            ErrorCode::BadRequest,
            format!(
                "step {} is not newer than step {last_step_id}, already run",
                step.step_id
            ),
        ));
    }
    if ctx.leaving.load(Ordering::Relaxed) {
        return Err(push_in::refusal(
            ErrorCode::ShuttingDown,
            "this node is leaving the swarm",
        ));
    }
    if let Some(ServerFrame {
        kind: Some(server_frame::Kind::Error(e)),
    }) = oversized(step, ctx.max_step_tokens)
    {
        return Err(e);
    }
    proto::check_hops(step, end_block).map_err(|e| push_in::refusal(ErrorCode::BadRequest, e))
}

/// The session-opened answer, naming the token other nodes push into this session with.
fn with_push_token(mut frame: ServerFrame, token: &[u8]) -> ServerFrame {
    if let Some(server_frame::Kind::Opened(o)) = &mut frame.kind {
        o.push_token = token.to_vec();
    }
    frame
}

type Opened = (u64, usize, Dtype, Range<usize>);

/// Reads and checks the first frame; `Err(Some(frame))` is an answer to send before closing.
async fn open(
    stream: &mut libp2p::Stream,
    ctx: &ServeContext,
    peer: PeerId,
) -> Result<(ServerFrame, Opened), Option<ServerFrame>> {
    let frame = match tokio::time::timeout(
        OPEN_TIMEOUT,
        read_frame::<_, ClientFrame>(stream, MAX_OPEN_FRAME),
    )
    .await
    {
        Ok(Ok(Some(f))) => f,
        Ok(Err(e)) => {
            return Err(Some(ServerFrame::error(
                ErrorCode::BadRequest,
                e.to_string(),
            )))
        }
        _ => return Err(None),
    };
    let Some(client_frame::Kind::Open(open)) = frame.kind else {
        return Err(Some(ServerFrame::error(
            ErrorCode::BadRequest,
            "the first frame must open a session",
        )));
    };
    if ctx.leaving.load(Ordering::Relaxed) {
        return Err(Some(ServerFrame::error(
            ErrorCode::ShuttingDown,
            "this node is leaving the swarm",
        )));
    }
    if open.fingerprint.as_slice() != ctx.fingerprint.as_slice() {
        return Err(Some(ServerFrame::error(
            ErrorCode::WrongModel,
            "this node serves a different model file",
        )));
    }
    let blocks = open.start_block as usize..open.end_block as usize;
    if blocks.is_empty() || blocks.start < ctx.blocks.start || blocks.end > ctx.blocks.end {
        return Err(Some(ServerFrame::error(
            ErrorCode::BlocksNotServed,
            format!(
                "blocks {}..{} requested, this node serves {}..{}",
                blocks.start, blocks.end, ctx.blocks.start, ctx.blocks.end
            ),
        )));
    }
    let max_length = open.max_length as usize;
    if max_length == 0 || max_length > ctx.context_length {
        return Err(Some(ServerFrame::error(
            ErrorCode::BadRequest,
            format!("max_length {max_length} outside 1..={}", ctx.context_length),
        )));
    }
    let dtype = match Dtype::try_from(open.wire_dtype) {
        Ok(d @ (Dtype::F32 | Dtype::F16 | Dtype::Bf16 | Dtype::Q8Row)) => d,
        _ => {
            return Err(Some(ServerFrame::error(
                ErrorCode::BadRequest,
                "unknown wire dtype",
            )))
        }
    };
    match ctx.compute.open(blocks.clone(), max_length, peer).await {
        Ok(id) => Ok((
            ServerFrame::opened(
                max_length as u32,
                u32::try_from(ctx.max_step_tokens).unwrap_or(u32::MAX),
            ),
            (id, max_length, dtype, blocks),
        )),
        Err(e) => Err(Some(compute_error(e))),
    }
}

/// The refusal of a step with more than `max_rows` rows, judged by the shape it declares
/// before any of its data is decoded. A step whose shape is malformed is left to
/// [`check_step`], which refuses it as a bad request.
fn oversized(step: &proto::v1::Step, max_rows: usize) -> Option<ServerFrame> {
    let rows = *step.hidden.as_ref()?.shape.first()?;
    (rows > max_rows as u64).then(|| {
        ServerFrame::error(
            ErrorCode::StepTooLarge,
            format!(
                "a step of {rows} rows exceeds this node's bound of {max_rows} rows per step; \
                 send them in smaller steps"
            ),
        )
    })
}

fn check_step(
    step: &proto::v1::Step,
    limits: &TensorLimits,
    dim: usize,
    max_length: usize,
) -> Result<Hidden, ServerFrame> {
    let bad = |m: String| ServerFrame::error(ErrorCode::BadRequest, m);
    let t = step
        .hidden
        .as_ref()
        .ok_or_else(|| bad("step without hidden states".into()))?;
    let d = decode_tensor(t, limits).map_err(|e| bad(e.to_string()))?;
    let [tokens, width] = d.shape[..] else {
        return Err(bad(format!(
            "hidden states must be [tokens, {dim}], got {:?}",
            d.shape
        )));
    };
    if width != dim || tokens == 0 {
        return Err(bad(format!(
            "hidden states must be [tokens, {dim}], got {:?}",
            d.shape
        )));
    }
    if step.position as usize + tokens > max_length {
        return Err(ServerFrame::error(
            ErrorCode::BadPosition,
            format!(
                "positions {}..{} exceed the session's max_length {max_length}",
                step.position,
                step.position as usize + tokens
            ),
        ));
    }
    Hidden::new(tokens, dim, d.values).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proto::ErrorAction;

    use super::*;

    #[test]
    fn a_step_over_the_bound_is_the_requests_fault_not_the_nodes() {
        let step = |rows: usize| proto::v1::Step {
            position: 0,
            hidden: Some(encode_tensor(&vec![0.0; rows * 2], &[rows, 2], Dtype::F32)),
            ..proto::v1::Step::default()
        };
        assert!(oversized(&step(16), 16).is_none());
        let frame = oversized(&step(17), 16).expect("17 rows refused");
        let Some(server_frame::Kind::Error(e)) = frame.kind else {
            panic!("not an error frame: {frame:?}");
        };
        let code = ErrorCode::from_wire(e.code);
        assert_eq!(code, ErrorCode::StepTooLarge);
        assert_eq!(code.action(), ErrorAction::Split);
        assert!(
            e.message.contains("17 rows") && e.message.contains("16"),
            "{}",
            e.message
        );
        // No hidden states or no shape: check_step's to refuse as malformed.
        assert!(oversized(&proto::v1::Step::default(), 16).is_none());
    }

    #[test]
    fn a_full_compute_queue_is_answered_busy_and_the_client_retries() {
        let frame = compute_error(ComputeError::Busy { queued: 8 });
        let Some(server_frame::Kind::Error(e)) = frame.kind else {
            panic!("not an error frame: {frame:?}");
        };
        let code = ErrorCode::from_wire(e.code);
        assert_eq!(code, ErrorCode::Busy);
        assert_eq!(code.action(), ErrorAction::Retry);
    }
}
