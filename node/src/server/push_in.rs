//! Pushes arriving from other nodes: the previous span's node forwards its output here, on
//! `/edge-swarm/push/1`, naming the receiving session by the random token that session gave its
//! client. Each push is handed to that session's task, which takes it (or refuses it) and only
//! then is the sender acknowledged; the result goes to the client, never back to the sender.
//!
//! Nothing here trusts the sender: the token must name a live session, the span the sender was
//! told must be exactly that session's, frames are bounded by the node's step bound, every read
//! and write has a timeout, and at most [`MAX_PUSH_STREAMS`] push streams are served at once,
//! [`MAX_PUSH_STREAMS_PER_PEER`] of them from any one peer.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use proto::v1::{ErrorCode, PushAck, PushStep, Step};
use proto::{max_step_frame, read_timed, write_frame, PUSH_TOKEN_LEN};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ServeContext;

/// Most push streams served at once; more are dropped as they arrive. Honest routes need one
/// per session whose predecessor is on another node.
pub const MAX_PUSH_STREAMS: usize = 64;

/// Most push streams one peer may hold open: an honest predecessor needs one per session it
/// serves for clients routed on through here (16 sessions by default), and a peer holding more
/// would only crowd others' pushes out (they would fall back to client relaying, not fail).
pub const MAX_PUSH_STREAMS_PER_PEER: usize = 16;

/// Push streams open per peer; a [`PeerSlot`] gives its place back when dropped.
#[derive(Default)]
struct PerPeer(Mutex<HashMap<PeerId, usize>>);

struct PeerSlot {
    counts: Arc<PerPeer>,
    peer: PeerId,
}

impl PerPeer {
    fn take(self: &Arc<Self>, peer: PeerId) -> Option<PeerSlot> {
        let mut counts = self.0.lock().ok()?;
        let n = counts.entry(peer).or_default();
        if *n >= MAX_PUSH_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.0.lock() {
            if let Some(n) = counts.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.peer);
                }
            }
        }
    }
}

/// How long a sender waits for the receiving session to take a step: the session is idle
/// whenever its client waits on a push, so this only runs out when something is wrong.
const TAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pushed step on its way to its session, with the answer the sender waits for.
pub struct Pushed {
    pub step: Step,
    pub taken: oneshot::Sender<Result<(), proto::v1::Error>>,
}

type Token = [u8; PUSH_TOKEN_LEN];

struct Inbox {
    blocks: Range<usize>,
    tx: mpsc::Sender<Pushed>,
}

/// The sessions that take pushes, by token.
#[derive(Default, Clone)]
pub struct Inboxes(Arc<Mutex<HashMap<Token, Inbox>>>);

/// Keeps a session's inbox listed; dropping it (the session ends) removes it.
pub struct Registration {
    inboxes: Inboxes,
    token: Token,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inboxes.0.lock() {
            map.remove(&self.token);
        }
    }
}

impl Inboxes {
    /// Lists a new session of `blocks` under a fresh random token.
    pub fn register(&self, blocks: Range<usize>) -> (Token, mpsc::Receiver<Pushed>, Registration) {
        let token: Token = rand::random();
        // One step at a time: a session has at most one step in flight anyway.
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut map) = self.0.lock() {
            map.insert(token, Inbox { blocks, tx });
        }
        let reg = Registration {
            inboxes: self.clone(),
            token,
        };
        (token, rx, reg)
    }

    /// The inbox of `token` if it serves exactly `blocks`.
    fn find(
        &self,
        token: &[u8],
        blocks: Range<usize>,
    ) -> Result<mpsc::Sender<Pushed>, proto::v1::Error> {
        let token: Token = token
            .try_into()
            .map_err(|_| refusal(ErrorCode::BadRequest, "push token of the wrong length"))?;
        let map = self
            .0
            .lock()
            .map_err(|_| refusal(ErrorCode::Internal, "session table unavailable"))?;
        let inbox = map.get(&token).ok_or_else(|| {
            refusal(
                ErrorCode::BlocksNotServed,
                "no session here has this push token",
            )
        })?;
        if inbox.blocks != blocks {
            return Err(refusal(
                ErrorCode::BlocksNotServed,
                format!(
                    "this session serves blocks {}..{}, not {}..{}",
                    inbox.blocks.start, inbox.blocks.end, blocks.start, blocks.end
                ),
            ));
        }
        Ok(inbox.tx.clone())
    }
}

pub fn refusal(code: ErrorCode, message: impl Into<String>) -> proto::v1::Error {
    proto::v1::Error {
        code: code as i32,
        message: message.into(),
    }
}

/// Accepts push streams until `shutdown`, each served by a task of `tasks`.
pub async fn accept_loop(
    mut control: libp2p_stream::Control,
    ctx: Arc<ServeContext>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut incoming = match control.accept(swarm::PUSH_STREAM) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot accept push streams: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_PUSH_STREAMS));
    let per_peer = Arc::new(PerPeer::default());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => match next {
                Some((peer, stream)) => {
                    let Some(peer_slot) = per_peer.take(peer) else {
                        tracing::debug!(%peer, "push stream refused: {MAX_PUSH_STREAMS_PER_PEER} already open from this peer");
                        continue;
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!(%peer, "push stream refused: {MAX_PUSH_STREAMS} already open");
                        continue;
                    };
                    let ctx = ctx.clone();
                    let stop = shutdown.clone();
                    tasks.spawn(async move {
                        let _slots = (slot, peer_slot);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = serve_pushes(peer, stream, ctx) => {}
                        }
                    });
                }
                None => break,
            }
        }
    }
}

/// Serves one push stream: each frame is delivered and acknowledged, until the sender closes
/// it, sends garbage, stays silent for the idle timeout or does not read an acknowledgement.
async fn serve_pushes(peer: PeerId, mut stream: libp2p::Stream, ctx: Arc<ServeContext>) {
    let max = max_step_frame(ctx.max_step_tokens, ctx.dim);
    loop {
        let read = read_timed::<_, PushStep>(&mut stream, max);
        let (push, rate) = match tokio::time::timeout(ctx.idle_timeout, read).await {
            Ok(Ok(Some(p))) => (p.frame, p.rate),
            Ok(Err(e)) => {
                tracing::debug!(%peer, "bad push frame: {e}");
                return;
            }
            Ok(Ok(None)) | Err(_) => return,
        };
        let step_id = push.step.as_ref().map_or(0, |s| s.step_id);
        let ack = PushAck {
            step_id,
            error: deliver(&ctx, push).await.err(),
            rate: rate.unwrap_or(0),
        };
        if let Some(e) = &ack.error {
            tracing::debug!(%peer, step_id, "push refused: {}", e.message);
        }
        match tokio::time::timeout(ctx.write_timeout(), write_frame(&mut stream, &ack)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn deliver(ctx: &ServeContext, push: PushStep) -> Result<(), proto::v1::Error> {
    let blocks = push.start_block as usize..push.end_block as usize;
    let tx = ctx.inboxes.find(&push.push_token, blocks)?;
    let step = push
        .step
        .ok_or_else(|| refusal(ErrorCode::BadRequest, "push without a step"))?;
    let (taken, answer) = oneshot::channel();
    tx.try_send(Pushed { step, taken })
        .map_err(|_| refusal(ErrorCode::Busy, "the session has a step waiting already"))?;
    match tokio::time::timeout(TAKE_TIMEOUT, answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(refusal(ErrorCode::Internal, "the session ended")),
        Err(_) => Err(refusal(
            ErrorCode::Busy,
            format!("the session did not take the step within {TAKE_TIMEOUT:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_holds_at_most_its_share_of_push_streams_and_gets_them_back() {
        let per_peer = Arc::new(PerPeer::default());
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let held: Vec<PeerSlot> = (0..MAX_PUSH_STREAMS_PER_PEER)
            .map(|_| per_peer.take(greedy).expect("within the share"))
            .collect();
        assert!(per_peer.take(greedy).is_none());
        assert!(per_peer.take(other).is_some());
        drop(held);
        assert!(per_peer.take(greedy).is_some());
        assert_eq!(
            per_peer.0.lock().unwrap().len(),
            0,
            "dropped slots leave no entries"
        );
    }

    #[test]
    fn a_push_reaches_only_the_session_of_its_token_and_span() {
        let inboxes = Inboxes::default();
        let (token, _rx, reg) = inboxes.register(10..20);
        assert!(inboxes.find(&token, 10..20).is_ok());
        let e = inboxes.find(&token, 10..25).unwrap_err();
        assert_eq!(e.code, ErrorCode::BlocksNotServed as i32);
        assert!(
            e.message.contains("10..20") && e.message.contains("10..25"),
            "{}",
            e.message
        );
        let mut other = token;
        other[0] ^= 1;
        assert!(inboxes.find(&other, 10..20).is_err());
        assert!(inboxes.find(&token[..8], 10..20).is_err());
        drop(reg);
        let e = inboxes.find(&token, 10..20).unwrap_err();
        assert!(e.message.contains("no session"), "{}", e.message);
    }

    #[test]
    fn tokens_differ_between_sessions() {
        let inboxes = Inboxes::default();
        let (a, _ra, _ga) = inboxes.register(0..5);
        let (b, _rb, _gb) = inboxes.register(0..5);
        assert_ne!(a, b);
    }
}
