//! An inference session through the swarm: a chain of span sessions covering every block.

pub mod span;

use model::Hidden;
use serde::Serialize;

pub use span::{SessionError, SpanSession, Timeouts};

/// One hop of a route as reported to users: which peer ran which blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteHop {
    pub peer: String,
    pub blocks: String,
}

/// Hidden states in, hidden states out, through every span in order. Each span keeps its own
/// KV cache on its peer, so a decode step sends one row per hop.
pub struct InferenceSession {
    spans: Vec<SpanSession>,
}

impl InferenceSession {
    pub fn new(spans: Vec<SpanSession>) -> Self {
        Self { spans }
    }

    pub fn route(&self) -> Vec<RouteHop> {
        self.spans
            .iter()
            .map(|s| RouteHop {
                peer: s.peer.to_string(),
                blocks: format!("{}..{}", s.blocks.start, s.blocks.end),
            })
            .collect()
    }

    /// Runs positions `pos..pos + x.tokens` through the whole chain.
    pub async fn forward(&mut self, mut x: Hidden, pos: u32) -> Result<Hidden, SessionError> {
        for span in &mut self.spans {
            x = span.step(pos, &x).await?;
        }
        Ok(x)
    }

    /// Frees every span's cache on its peer (best effort, bounded).
    pub async fn close(self) {
        futures::future::join_all(self.spans.into_iter().map(SpanSession::close)).await;
    }
}
