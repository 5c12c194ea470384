//! A step pushed node to node: the client sends the hidden states to the first span's node
//! with the rest of the route, each node forwards its output to the next, and every node also
//! answers the client with its own output. The last answer, which the client waits for, comes
//! after N + 1 one-way trips through N nodes instead of 2N.
//!
//! A node answers the client before it waits for the next node's acknowledgement, and reports
//! a forward that failed after that answer in a frame of its own; the client watches for that
//! report from the span before the one whose answer it awaits.
//!
//! Each span's answer arrives on that span's own session, from the node that computed it, so
//! the client keeps exactly what it keeps when it relays every hop itself: each span's input
//! (the previous span's output, the very bytes that node forwarded) for replay, and each
//! output under the name of the peer that produced it. A push that stops part way therefore
//! leaves the session as a client-routed step would at the same span: the caller records the
//! answers it got and goes on from there span by span, rerouting a failed span as always.

use model::Hidden;

use super::span::{next_step_id, SessionError, SpanSession};

/// What came back of a push: the outputs of the leading spans that answered, in route order,
/// and why it stopped before the end, if it did.
#[derive(Default)]
pub struct Pushed {
    pub outputs: Vec<Hidden>,
    pub stop: Option<PushStop>,
}

pub enum PushStop {
    /// The span after the last output failed as a client-routed step can fail.
    Failed(SessionError),
    /// The node of the last output could not forward it (the reason it gave): the next span
    /// has not run this step.
    NotForwarded(String),
}

/// Whether `x` can be pushed through `spans`: more than one span, each peer taking pushes, and
/// no span needing the rows cut into smaller steps (a push carries one step end to end).
pub fn pushable(spans: &[&mut SpanSession], x: &Hidden) -> bool {
    spans.len() > 1
        && spans
            .iter()
            .all(|s| s.hop().is_some() && x.tokens <= s.max_step_tokens())
}

/// Pushes positions `pos..pos + x.tokens` through `spans`, which [`pushable`] accepted.
pub async fn push_through(spans: &mut [&mut SpanSession], pos: u32, x: &Hidden) -> Pushed {
    let mut pushed = Pushed::default();
    let next: Vec<_> = spans[1..].iter().filter_map(|s| s.hop()).collect();
    let step_id = next_step_id();
    let Some(first) = spans.first_mut() else {
        return pushed;
    };
    if let Err(e) = first.send_pushed(pos, x, step_id, next).await {
        pushed.stop = Some(PushStop::Failed(e));
        return pushed;
    }
    let last = spans.len() - 1;
    for i in 0..spans.len() {
        let (before, rest) = spans.split_at_mut(i);
        let span = &mut rest[0];
        // While this span's answer is awaited, the span before it may report that its output,
        // answered already, did not reach this one: the answer will then never come.
        let not_forwarded = async {
            match before.last_mut() {
                Some(prev) => prev.forward_failure(step_id).await,
                None => std::future::pending().await,
            }
        };
        let answer = tokio::select! {
            biased;
            answer = span.pushed_answer(step_id, x.tokens) => answer,
            reason = not_forwarded => {
                pushed.stop = Some(PushStop::NotForwarded(reason));
                break;
            }
        };
        match answer {
            Ok((y, forward_error)) => {
                pushed.outputs.push(y);
                if !forward_error.is_empty() && i < last {
                    pushed.stop = Some(PushStop::NotForwarded(format!(
                        "{}: {forward_error}",
                        span.peer
                    )));
                    break;
                }
            }
            Err(e) => {
                pushed.stop = Some(PushStop::Failed(e));
                break;
            }
        }
    }
    pushed
}
