//! Checking peers' outputs on a second peer, so that a peer computing wrong answers is caught,
//! banned, and its effect on the text undone.
//!
//! # Why a check is an equality test
//!
//! Every kernel path computes the same bits on every CPU, and a block's output for a position
//! does not depend on how positions are batched. An honest second peer given a span's kept
//! inputs therefore returns exactly the primary's outputs, position by position, whether it
//! gets them one by one or in one batched step. Any difference is a fault of one of the two.
//!
//! # The scheme: a verifier per span that catches up in batches
//!
//! A position's output depends on the keys and values of every earlier position, so a second
//! peer can only check position `t` once it has computed `0..t` itself: sampling single steps
//! saves nothing, the second peer has to run every position anyway. What can be chosen is how
//! it runs them. Each span gets a verifier session on another peer serving the same blocks; it
//! is sent nothing while the primary decodes, and when `every` positions are waiting it gets
//! them all in ONE step (the client keeps every input it sent anyway, for cache rebuilds) and
//! its answer is compared with what the primary returned. So:
//!
//! * Detection: EVERY position is compared, not a sample, at most `every - 1` tokens after it
//!   was generated; before the text of a position is released the position is checked (text
//!   is held back until then, and the end of a generation checks whatever is left). A peer
//!   that corrupts every step, or only one, is caught within `every` tokens with probability
//!   1; with `every <= 10` that meets "within 10 tokens with probability at least 0.99".
//!   Randomising when the catch-up happens would not help: a random check of probability `p`
//!   per step needs `p >= 0.37` to catch an always-corrupting peer within 10 steps with 0.99
//!   (`1 - (1 - p)^10 >= 0.99`), and each such check would still run every position since the
//!   last one.
//! * Cost: the verifier runs each position once, in batches of `every` rows, where the primary
//!   ran it as a one-row decode step. A decode step reads every weight of the span for one
//!   row; a batch of `every` rows reads them once for all, so when reading weights dominates,
//!   its cost per row is a fraction of a decode step's. Compute overhead = (time of one
//!   `every`-row step) / (`every` x time of one decode step), plus a second prefill of the
//!   prompt. That is the best case: it needs weight reads to dominate, and the check to run on
//!   another machine beside the primary. Measured (BENCHMARKS.md, `bench --swarm
//!   --verify-every`, 135M model, 2 shared cores, check in the step's critical path) the
//!   generation is 91% slower at `every = 8` and 69% at 32: the 10% the issue asks for is NOT
//!   met there. A sampled scheme cheap enough for 10% would miss a peer that corrupts rarely,
//!   and would still not reach the detection bound (see above), so we do not sample.
//! * Disagreement: a third peer serving the blocks (a tie-break) replays the span's inputs;
//!   the peer that differs from the two others is banned. A wrong primary means the text may
//!   have gone wrong from the first differing position: every span is rolled back to it and
//!   the caller regenerates from there ([`RouteError::Rewound`]), so the final text equals the
//!   local reference. Without a third peer nobody can tell who lied: both are banned and the
//!   span is routed again (and fails if nobody else serves it).
//! * A span with no second peer at all is not verified (a warning says so); the generation
//!   goes on as it would without verification.

use std::ops::Range;

use libp2p::PeerId;
use model::Hidden;
use proto::v1::ServerState;
use rand::seq::SliceRandom;

use super::network::Network;
use super::span::SessionError;
use super::{capacity_refusal, InferenceSession, OpenSpan, RouteError, Router};

/// How a session checks its peers' outputs. The default is off: see
/// [`VerifyPolicy::every`] for what it costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Positions a span's verifier takes in one batch; 0 turns verification off. Smaller
    /// catches a wrong peer sooner and releases text sooner; larger costs less compute (see
    /// the module documentation for the arithmetic).
    ///
    /// Off by default because it is not free: every span needs a second peer, which holds a
    /// second copy of the session's KV cache and computes every position again (a generation
    /// 69-91% slower on the 2-core machine of BENCHMARKS.md), and streamed text waits for its
    /// check (up to `every` tokens). A private swarm (one swarm key, known operators)
    /// gains nothing from it; an open swarm of strangers should turn it on.
    pub every: usize,
}

impl VerifyPolicy {
    pub const OFF: Self = Self { every: 0 };

    pub fn every(every: usize) -> Self {
        Self { every }
    }

    pub fn is_on(&self) -> bool {
        self.every > 0
    }
}

/// What one span knows about the correctness of its primary's outputs.
pub(super) struct Check<S> {
    /// Positions `0..verified` agree with a second peer (or could not be checked, when no
    /// second peer serves the span's blocks).
    pub verified: usize,
    /// The primary's outputs for positions `verified..`, waiting for their check.
    pub outputs: Vec<f32>,
    /// The second peer's session and how many positions its cache holds.
    pub verifier: Option<Verifier<S>>,
}

pub(super) struct Verifier<S> {
    pub peer: PeerId,
    pub session: S,
    pub cached: usize,
}

impl<S> Default for Check<S> {
    fn default() -> Self {
        Self {
            verified: 0,
            outputs: Vec::new(),
            verifier: None,
        }
    }
}

impl<S> Check<S> {
    /// Notes the primary's outputs `y` for positions `pos..`; anything this span held from
    /// `pos` on was rolled back by the step.
    pub fn record(&mut self, pos: usize, y: &Hidden) {
        self.rewind(pos, y.dim);
        self.outputs.extend_from_slice(&y.data);
    }

    /// Forgets everything from position `to` on.
    pub fn rewind(&mut self, to: usize, dim: usize) {
        if self.verified > to {
            self.verified = to;
        }
        self.outputs.truncate((to - self.verified) * dim);
        if let Some(v) = &mut self.verifier {
            v.cached = v.cached.min(to);
        }
    }
}

/// How many verifiers (or tie-breakers) one check tries before it gives the span up as not
/// verifiable for now.
const OPEN_ATTEMPTS: usize = 3;

/// Index of the first row where `a` and `b` differ (as bits), if any.
fn first_difference(a: &[f32], b: &[f32], dim: usize) -> Option<usize> {
    let rows = a.len().min(b.len()) / dim.max(1);
    (0..rows)
        .find(|&r| {
            let (x, y) = (&a[r * dim..(r + 1) * dim], &b[r * dim..(r + 1) * dim]);
            x.iter().zip(y).any(|(p, q)| p.to_bits() != q.to_bits())
        })
        .or((a.len() != b.len()).then_some(rows))
}

impl<N: Network> InferenceSession<N> {
    /// Positions whose outputs are final on every span: checked by a second peer, or not
    /// checkable. Everything when verification is off.
    pub fn settled(&self) -> usize {
        if !self.router.verify.is_on() {
            return usize::MAX;
        }
        self.spans
            .iter()
            .map(|s| s.check.verified)
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Checks every position not checked yet; [`RouteError::Rewound`] when a peer was caught.
    pub async fn settle(&mut self) -> Result<(), RouteError> {
        self.verify(true).await
    }

    /// Runs the checks that are due (every span with at least `every` unchecked positions,
    /// or all of them when `all`), stopping at the first that rolls the session back.
    pub(super) async fn verify(&mut self, all: bool) -> Result<(), RouteError> {
        let every = self.router.verify.every;
        if every == 0 {
            return Ok(());
        }
        let dim = self.router.dim;
        for i in 0..self.spans.len() {
            let waiting = self.spans[i].inputs.len() / dim - self.spans[i].check.verified;
            if waiting > 0 && (all || waiting >= every) {
                if let Some(to) = self.check_span(i).await? {
                    self.rewind(to);
                    return Err(RouteError::Rewound { to });
                }
            }
        }
        Ok(())
    }

    /// Rolls every span back to position `to`: inputs, outputs and checks from there on are
    /// forgotten; the peers roll their caches back when the next step starts at `to`.
    fn rewind(&mut self, to: usize) {
        let dim = self.router.dim;
        for s in &mut self.spans {
            s.inputs.truncate(to * dim);
            s.check.rewind(to, dim);
        }
    }

    /// Has span `i`'s unchecked positions checked by its verifier. `Some(to)` when its primary
    /// was wrong from position `to` on (it is banned and replaced; the caller rolls back).
    async fn check_span(&mut self, i: usize) -> Result<Option<usize>, RouteError> {
        let dim = self.router.dim;
        let len = self.spans[i].inputs.len() / dim;
        let from = self.spans[i].check.verified;
        let primary = self.spans[i].span.peer;
        let blocks = self.spans[i].span.blocks.clone();
        let mut tried = vec![primary];
        for _ in 0..OPEN_ATTEMPTS {
            let verifier = match self.spans[i].check.verifier.take() {
                Some(v) => v,
                None => match open_second(&self.router, &blocks, &tried, self.max_length).await? {
                    Some((peer, session)) => Verifier {
                        peer,
                        session,
                        cached: 0,
                    },
                    None => break,
                },
            };
            tried.push(verifier.peer);
            let Verifier {
                peer,
                mut session,
                cached,
            } = verifier;
            // The verifier's cache holds `0..start`; it runs the rest in one step.
            let start = cached.min(from);
            let x = self.spans[i].input_rows(start..len, dim);
            let answer = match self
                .router
                .network
                .step(&mut session, start as u32, &x)
                .await
            {
                Ok(y) => y,
                Err(e) => {
                    tracing::warn!(
                        "verifier of blocks {}..{} failed: {e}",
                        blocks.start,
                        blocks.end
                    );
                    self.router.ban(peer);
                    self.router.network.close(session).await;
                    continue;
                }
            };
            let theirs = &answer.data[(from - start) * dim..];
            let state = &mut self.spans[i];
            let Some(row) = first_difference(&state.check.outputs, theirs, dim) else {
                tracing::debug!(
                    "blocks {}..{}: positions {from}..{len} of {primary} checked on {peer}",
                    blocks.start,
                    blocks.end
                );
                state.check.verified = len;
                state.check.outputs.clear();
                state.check.verifier = Some(Verifier {
                    peer,
                    session,
                    cached: len,
                });
                return Ok(None);
            };
            let at = from + row;
            let theirs = theirs.to_vec();
            return self
                .settle_disagreement(i, at, len, (peer, session), theirs, &tried)
                .await
                .map(Some);
        }
        let state = &mut self.spans[i];
        tracing::warn!(
            "no second peer serves blocks {}..{}: positions {from}..{len} there are not verified",
            blocks.start,
            blocks.end
        );
        state.check.verified = len;
        state.check.outputs.clear();
        Ok(None)
    }

    /// The primary of span `i` and its verifier disagree from position `at` on. A third peer
    /// decides; whoever differs from the majority is banned. Returns the position to roll back
    /// to (`at` if the primary was wrong, nothing to roll back otherwise: `len`).
    async fn settle_disagreement(
        &mut self,
        i: usize,
        at: usize,
        len: usize,
        (peer, session): (PeerId, N::Span),
        theirs: Vec<f32>,
        tried: &[PeerId],
    ) -> Result<usize, RouteError> {
        let dim = self.router.dim;
        let from = self.spans[i].check.verified;
        let primary = self.spans[i].span.peer;
        let blocks = self.spans[i].span.blocks.clone();
        tracing::warn!(
            "blocks {}..{}: {primary} and {peer} disagree from position {at}; asking a third peer",
            blocks.start,
            blocks.end
        );
        let mut third = None;
        let mut excluded = tried.to_vec();
        for _ in 0..OPEN_ATTEMPTS {
            let Some((p, mut s)) =
                open_second(&self.router, &blocks, &excluded, self.max_length).await?
            else {
                break;
            };
            excluded.push(p);
            let x = self.spans[i].input_rows(0..len, dim);
            match self.router.network.step(&mut s, 0, &x).await {
                Ok(y) => {
                    third = Some((p, s, y.data[from * dim..].to_vec()));
                    break;
                }
                Err(e) => {
                    tracing::warn!("tie-break peer failed: {e}");
                    self.router.ban(p);
                    self.router.network.close(s).await;
                }
            }
        }
        let Some((judge, judge_session, verdict)) = third else {
            tracing::warn!(
                "blocks {}..{}: no third peer to decide between {primary} and {peer}; banning both",
                blocks.start,
                blocks.end
            );
            self.router.ban(peer);
            self.router.network.close(session).await;
            self.rewind(at);
            let reason = format!("its outputs differ from {peer}'s from position {at}");
            self.replace(
                i,
                SessionError::Protocol {
                    peer: primary,
                    reason,
                },
            )
            .await?;
            return Ok(at);
        };
        let primary_right = first_difference(&self.spans[i].check.outputs, &verdict, dim).is_none();
        let verifier_right = first_difference(&theirs, &verdict, dim).is_none();
        if primary_right {
            tracing::warn!(
                "blocks {}..{}: {peer} disagrees with {primary} and {judge}: banned",
                blocks.start,
                blocks.end
            );
            self.router.ban(peer);
            self.caught.push(peer);
            self.router.network.close(session).await;
            let check = &mut self.spans[i].check;
            check.verified = len;
            check.outputs.clear();
            check.verifier = Some(Verifier {
                peer: judge,
                session: judge_session,
                cached: len,
            });
            return Ok(len);
        }
        let agreeing = if verifier_right {
            format!("{peer} and {judge}")
        } else {
            format!("{judge}")
        };
        tracing::warn!(
            "blocks {}..{}: {primary} disagrees with {agreeing} from position {at}: banned, generating again from there",
            blocks.start,
            blocks.end,
        );
        self.router.ban(primary);
        self.caught.push(primary);
        // The third peer becomes the primary (its cache holds the inputs up to `len`, rolled
        // back at the next step); the verifier stays if it agreed with it.
        let old = std::mem::replace(
            &mut self.spans[i].span,
            OpenSpan {
                peer: judge,
                blocks: blocks.clone(),
                session: judge_session,
            },
        );
        self.router.network.close(old.session).await;
        if verifier_right {
            self.spans[i].check.verifier = Some(Verifier {
                peer,
                session,
                cached: len,
            });
        } else {
            self.router.ban(peer);
            self.caught.push(peer);
            self.router.network.close(session).await;
        }
        self.rewind(at);
        Ok(at)
    }
}

/// Opens a session on a peer other than `exclude` that serves all of `blocks`, chosen at random
/// among the usable ones (a fixed choice would let a group of peers arrange to check each
/// other). `None` when there is none.
async fn open_second<N: Network>(
    router: &Router<N>,
    blocks: &Range<u32>,
    exclude: &[PeerId],
    max_length: u32,
) -> Result<Option<(PeerId, N::Span)>, RouteError> {
    let servers = router.network.lookup().await?;
    let now = router.network.now_ms();
    let banned = router.bans.lock().map(|b| b.snapshot()).unwrap_or_default();
    let mut candidates: Vec<_> = servers
        .iter()
        .filter(|s| {
            s.state == ServerState::Online
                && s.blocks.start <= blocks.start
                && s.blocks.end >= blocks.end
                && !exclude.contains(&s.peer)
                && banned.get(&s.peer).is_none_or(|&until| until <= now)
        })
        .collect();
    candidates.shuffle(&mut rand::rng());
    for server in candidates.into_iter().take(OPEN_ATTEMPTS) {
        match router
            .network
            .open(server, blocks.clone(), max_length)
            .await
        {
            Ok(session) => return Ok(Some((server.peer, session))),
            Err(e) if capacity_refusal(&e) => tracing::debug!("{e}"),
            Err(e) => {
                tracing::debug!("opening a second session failed: {e}");
                router.ban(server.peer);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_found_by_bits_and_row() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(first_difference(&a, &a, 2), None);
        assert_eq!(first_difference(&a, &[1.0, 2.0, 3.0, 5.0], 2), Some(1));
        // -0.0 == 0.0 as numbers, but not the same bits: an honest peer sends the same bits.
        assert_eq!(first_difference(&[0.0, 1.0], &[-0.0, 1.0], 2), Some(0));
        assert_eq!(first_difference(&a, &a[..2], 2), Some(1));
    }

    #[test]
    fn a_check_forgets_what_is_rolled_back() {
        let mut c: Check<()> = Check {
            verified: 3,
            outputs: vec![0.0; 4],
            verifier: Some(Verifier {
                peer: PeerId::random(),
                session: (),
                cached: 3,
            }),
        };
        c.rewind(4, 2);
        assert_eq!((c.verified, c.outputs.len()), (3, 2));
        c.rewind(1, 2);
        assert_eq!((c.verified, c.outputs.len()), (1, 0));
        assert_eq!(c.verifier.as_ref().map(|v| v.cached), Some(1));
    }
}
