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
//! # The scheme: a verifier per span that catches up in batches, beside the primary
//!
//! A position's output depends on the keys and values of every earlier position, so a second
//! peer can only check position `t` once it has computed `0..t` itself: sampling single steps
//! saves nothing, the second peer has to run every position anyway. What can be chosen is how
//! and when it runs them. Each span gets a verifier session on another peer serving the same
//! blocks; it is sent nothing while the primary decodes, and when a check is due it gets every
//! waiting position in ONE step (the client keeps every input it sent anyway, for cache
//! rebuilds). That step runs in a task of its own: the primary goes on decoding while the
//! verifier works, and the answer is compared with what the primary returned once it arrives.
//!
//! * When: a span's first check starts after its second step (the prompt and the first
//!   generated position; after its first step for an unaudited span, see Sampling), and the
//!   session waits for it before running more than [`VerifyPolicy::first`] further positions. Later checks start whenever
//!   [`VerifyPolicy::every`] positions wait and no check is running, and must come back before
//!   `every` more positions run. Text of a position is released only once it is checked (the
//!   end of a generation checks whatever is left), so nothing shown is ever taken back.
//! * Detection: EVERY position is compared, not a sample. A peer that corrupts every step (or
//!   only the prompt, or only generated positions) is caught by the first check, before
//!   `first + 2` tokens are sampled: with the default `first` of 6, within 8 tokens, with
//!   probability 1, which meets "within 10 tokens with probability at least 0.99". A peer that
//!   corrupts only later steps is caught within `2 * every` positions. Randomising the checks
//!   would not help: a random check of probability `p` per step needs `p >= 0.37` to catch an
//!   always-corrupting peer within 10 steps with 0.99 (`1 - (1 - p)^10 >= 0.99`), and each
//!   such check would still run every position since the last one.
//! * Cost: the verifier runs each position once, in batches of up to `every` rows (the first
//!   batch holds the prompt), where the primary ran it as a one-row decode step. A decode step
//!   reads every weight of the span for one row; a batch reads them once for all its rows, so
//!   its cost per row is a prefill row's, a fraction of a decode step's. The verifier's
//!   compute relative to the primary's is therefore about (prompt + generated x batched cost
//!   per row) / (prompt x batched cost + generated x decode cost per row); on a spare device it
//!   slows the client only where the session waits for a late check, and at the end, where the
//!   last tokens wait for theirs. How much a batched row saves depends on the device: on one
//!   CPU thread a 135M model's batched row costs about 60% of a decode row (compute-bound
//!   against memory-bound), so the verifier spends 59-65% of the primary's CPU time and the
//!   10% the issue asks for is not met there (BENCHMARKS.md, "Verification beside the
//!   primary"); devices with more arithmetic per byte of memory bandwidth save far more.
//! * Sampling ([`VerifyPolicy::audit_per_mille`]): each span is drawn, at its first step, to be
//!   audited (checked to the end, all of them by default) or not. Every span gets a first
//!   check, which is what catches a peer that corrupts every step. An unaudited span's first
//!   check covers only the first [`VerifyPolicy::first_rows`] positions of its first step:
//!   any row catches such a peer, and the spare then pays for those few rows, batched, instead
//!   of the whole prompt (as much as the primary's prefill, most of a short generation's
//!   work). It then closes its verifier, and its text is released as it comes. An audited
//!   span's first check covers the prompt and the first generated position, and later ones
//!   the rest. A peer honest on those first rows and wrong later is caught in the audited
//!   share of its sessions, and banned for good by each client that catches it
//!   (BENCHMARKS.md measures the costs).
//! * Disagreement: a third peer serving the blocks (a tie-break) replays the span's inputs;
//!   the peer that differs from the two others is banned. A wrong primary means the text may
//!   have gone wrong from the first differing position: every span is rolled back to it and
//!   the caller regenerates from there ([`RouteError::Rewound`]), so the final text equals the
//!   local reference. When all three differ there is no majority: all three are banned and the
//!   span is routed again through other peers (failing, with that reason, if there are none).
//!   Without a third peer nobody can tell who lied: both are banned and the span is routed
//!   again (and fails if nobody else serves it).
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

/// How a session checks its peers' outputs. The default is off: see the module documentation
/// for what it costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Positions after which a later check starts, and the most positions the primary may
    /// run past a running check before the session waits for it; 0 turns verification off.
    /// Larger costs less compute per position (bigger batches) but releases text later.
    ///
    /// Off by default because it is not free: every span needs a second peer, which holds a
    /// second copy of the session's KV cache and computes every position again, batched, and
    /// streamed text waits for its check. A private swarm (one swarm key, known operators)
    /// gains nothing from it; an open swarm of strangers should turn it on.
    pub every: usize,
    /// Positions the primary may run past a span's first check (the prompt and the first
    /// generated position) before the session waits for it: a peer that corrupts every step
    /// is caught before `first + 2` tokens are sampled.
    pub first: usize,
    /// Of the spans whose first check agreed, the share (per mille) that stay under check to
    /// the end; the others close their verifier and release text unchecked from there.
    ///
    /// The first check is what catches a peer that corrupts every step, and it is cheap next
    /// to a whole generation (the prompt and a few positions, batched). Checking the rest
    /// costs the spare about 60% of the primary's compute on a CPU (module docs); auditing a
    /// random share of spans divides that by the share, while a peer that corrupts only later
    /// steps is still caught in that share of its sessions, and banned, so cheating across
    /// many sessions does not pay. 1000 (everything, the default of [`VerifyPolicy::every`])
    /// is the exact guarantee.
    pub audit_per_mille: u16,
    /// How many of the prompt's first positions the first check of an unaudited span covers
    /// (an audited span's first check covers the whole prompt and the first generated
    /// position, since its later checks need the verifier to hold them anyway).
    ///
    /// A peer that corrupts every step is caught by any row it computed, and a few rows cost
    /// the spare a few batched rows, where the whole prompt cost it as much as the primary's
    /// prefill: with a long prompt and a short answer that alone was most of the primary's
    /// work. What escapes is a peer honest on exactly these first rows of each session and
    /// wrong only later: audits catch that one, in their share of its sessions.
    pub first_rows: usize,
}

/// [`VerifyPolicy::first`] unless set: caught within 8 tokens, under the 10.
pub const DEFAULT_FIRST: usize = 6;
/// [`VerifyPolicy::first_rows`] unless set.
pub const DEFAULT_FIRST_ROWS: usize = 4;

impl VerifyPolicy {
    pub const OFF: Self = Self {
        every: 0,
        first: 0,
        audit_per_mille: 0,
        first_rows: 0,
    };

    /// Later checks every `every` positions, the first one within [`DEFAULT_FIRST`] (or
    /// `every`, if smaller), every span audited to the end.
    pub fn every(every: usize) -> Self {
        Self {
            every,
            first: every.min(DEFAULT_FIRST),
            audit_per_mille: 1000,
            first_rows: DEFAULT_FIRST_ROWS,
        }
    }

    /// The same policy with the first check due within `first` positions.
    pub fn first_within(self, first: usize) -> Self {
        Self { first, ..self }
    }

    /// The same policy with an unaudited span's first check covering `rows` prompt positions
    /// (at least one).
    pub fn first_check_rows(self, rows: usize) -> Self {
        Self {
            first_rows: rows.max(1),
            ..self
        }
    }

    /// The same policy auditing `share` (0 to 1) of the spans past their first check.
    pub fn audit_share(self, share: f64) -> Self {
        Self {
            audit_per_mille: (share.clamp(0.0, 1.0) * 1000.0).round() as u16,
            ..self
        }
    }

    /// Draws whether a span stays under check past its first check.
    fn keeps_auditing(&self) -> bool {
        self.audit_per_mille >= 1000 || rand::random_range(0..1000u16) < self.audit_per_mille
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
    /// The second peer's session and how many positions its cache holds, while no check runs.
    pub verifier: Option<Verifier<S>>,
    /// The check running now, if any; it owns the verifier session meanwhile.
    running: Option<Running<S>>,
    /// Steps the span has run, counted until its first check starts.
    steps: usize,
    first_started: bool,
    /// Whether this span stays under check past its first check
    /// ([`VerifyPolicy::audit_per_mille`]), drawn when its first step is recorded.
    audited: Option<bool>,
    /// The first check agreed and this span is not audited: its outputs are final as they
    /// come.
    unaudited: bool,
    /// Checks in a row that failed on the verifier's side; at [`OPEN_ATTEMPTS`] the waiting
    /// positions are given up as not checkable.
    failures: usize,
}

pub(super) struct Verifier<S> {
    pub peer: PeerId,
    pub session: S,
    pub cached: usize,
}

/// A check in flight: the verifier computing positions `start..to` in a task of its own.
struct Running<S> {
    /// The first position compared (the span's `verified` when the check started).
    from: usize,
    to: usize,
    /// Positions from here on were rolled back while the check ran: their inputs changed, so
    /// the answer says nothing about them.
    valid_until: usize,
    /// The primary's outputs for `from..to`, as they were when the check started.
    expected: Vec<f32>,
    first: bool,
    /// The session waits for this check before a step at this position or later.
    due: usize,
    task: tokio::task::JoinHandle<Outcome<S>>,
}

impl<S> Drop for Running<S> {
    /// A check nobody will read (its span was replaced or the session closed) stops at once;
    /// its verifier session is dropped with it, which the peer sees as a closed stream.
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Outcome<S> {
    /// The verifier's outputs for positions `start..`.
    Answer {
        verifier: Verifier<S>,
        start: usize,
        answer: Hidden,
    },
    /// No usable second peer serves the span's blocks.
    NoSecond,
    /// The verifier failed (its session is closed).
    Failed { peer: PeerId, error: SessionError },
    /// Discovery itself failed.
    Lookup(RouteError),
}

impl<S> Check<S> {
    /// A check of a span whose positions `0..verified` need no checking by it.
    pub fn new(verified: usize) -> Self {
        Self {
            verified,
            outputs: Vec::new(),
            verifier: None,
            running: None,
            steps: 0,
            first_started: false,
            audited: None,
            unaudited: false,
            failures: 0,
        }
    }

    /// Notes the primary's outputs `y` for positions `pos..`; anything this span held from
    /// `pos` on was rolled back by the step.
    pub fn record(&mut self, pos: usize, y: &Hidden) {
        self.rewind(pos, y.dim);
        self.outputs.extend_from_slice(&y.data);
        self.steps += 1;
        if self.unaudited {
            self.release_all(y.dim);
        }
    }

    /// Takes every output held as final, unchecked (the span is not audited).
    fn release_all(&mut self, dim: usize) {
        self.verified += self.outputs.len() / dim.max(1);
        self.outputs.clear();
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
        if let Some(r) = &mut self.running {
            r.valid_until = r.valid_until.min(to);
        }
    }

    /// Marks `from..to` as checked (or given up), if the span still waits on exactly those.
    fn settle_range(&mut self, from: usize, to: usize, dim: usize) {
        if self.verified == from && to > from {
            let rows = (to - from).min(self.outputs.len() / dim.max(1));
            self.outputs.drain(..rows * dim);
            self.verified = from + rows;
        }
    }

    /// The verifier sessions this check holds (idle, or inside a running check, which stops).
    pub fn into_verifier(mut self) -> Option<S> {
        self.running = None;
        self.verifier.take().map(|v| v.session)
    }
}

/// How many verifiers (or tie-breakers) a check tries before it gives the span's waiting
/// positions up as not verifiable for now.
const OPEN_ATTEMPTS: usize = 3;

/// Index of the first row where `a` and `b` differ (as bits), if any.
pub(super) fn first_difference(a: &[f32], b: &[f32], dim: usize) -> Option<usize> {
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

    /// Checks every position not checked yet, waiting for the answers; [`RouteError::Rewound`]
    /// when a peer was caught.
    pub async fn settle(&mut self) -> Result<(), RouteError> {
        if !self.router.verify.is_on() {
            return Ok(());
        }
        // Each round either settles a span's waiting positions or counts a verifier's failure,
        // and OPEN_ATTEMPTS failures give them up, so this many rounds settle everything.
        for _ in 0..=OPEN_ATTEMPTS + 1 {
            let mut busy = false;
            for i in 0..self.spans.len() {
                if self.spans[i].check.running.is_none() && self.waiting(i) > 0 {
                    self.start_check(i);
                }
                busy |= self.spans[i].check.running.is_some();
            }
            if !busy {
                return Ok(());
            }
            for i in 0..self.spans.len() {
                self.collect(i, true).await?;
            }
        }
        Ok(())
    }

    /// Before a step at `pos`: reads the answers of checks that are done, and waits for those
    /// the primary must not run further past.
    pub(super) async fn checks_before_step(&mut self, pos: usize) -> Result<(), RouteError> {
        let policy = self.router.verify;
        if !policy.is_on() {
            return Ok(());
        }
        for i in 0..self.spans.len() {
            let late = self.spans[i]
                .check
                .running
                .as_ref()
                .is_some_and(|r| pos >= r.due);
            self.collect(i, late).await?;
        }
        Ok(())
    }

    /// After a step: reads the answers that came meanwhile and starts the checks that are due.
    pub(super) async fn checks_after_step(&mut self) -> Result<(), RouteError> {
        let policy = self.router.verify;
        if !policy.is_on() {
            return Ok(());
        }
        for i in 0..self.spans.len() {
            self.collect(i, false).await?;
            let waiting = self.waiting(i);
            let check = &mut self.spans[i].check;
            let audited = *check.audited.get_or_insert_with(|| policy.keeps_auditing());
            let due = if !check.first_started {
                // An unaudited span's first check needs only its first step's first rows.
                check.steps >= if audited || check.verified > 0 { 2 } else { 1 }
            } else {
                waiting >= policy.every || check.failures > 0
            };
            if due && waiting > 0 && check.running.is_none() {
                self.start_check(i);
            }
        }
        Ok(())
    }

    /// Positions of span `i` run by its primary and not checked yet.
    fn waiting(&self, i: usize) -> usize {
        let s = &self.spans[i];
        (s.inputs.len() / self.router.dim).saturating_sub(s.check.verified)
    }

    /// Starts a check of span `i`'s waiting positions in a task of its own: the verifier
    /// (opened first if the span has none) computes them while the primary goes on.
    fn start_check(&mut self, i: usize) {
        let dim = self.router.dim;
        let policy = self.router.verify;
        let held = self.spans[i].inputs.len() / dim;
        let state = &mut self.spans[i];
        let from = state.check.verified;
        let first = !state.check.first_started;
        let prefix_only = first && from == 0 && state.check.audited == Some(false);
        let len = if prefix_only {
            held.min(policy.first_rows.max(1))
        } else {
            held
        };
        let verifier = state.check.verifier.take();
        // The verifier's cache holds `0..start`; a new one starts from nothing.
        let start = verifier.as_ref().map_or(0, |v| v.cached.min(from));
        let x = state.input_rows(start..len, dim);
        let expected = state.check.outputs[..(len - from) * dim].to_vec();
        state.check.first_started = true;
        let lead = if first { policy.first } else { policy.every };
        let due = held.saturating_add(lead);
        let router = self.router.clone();
        let blocks = state.span.blocks.clone();
        let primary = state.span.peer;
        let max_length = self.max_length;
        let task = tokio::spawn(async move {
            let mut v = match verifier {
                Some(v) => v,
                None => match open_second(&router, &blocks, &[primary], max_length).await {
                    Ok(Some((peer, session))) => Verifier {
                        peer,
                        session,
                        cached: 0,
                    },
                    Ok(None) => return Outcome::NoSecond,
                    Err(e) => return Outcome::Lookup(e),
                },
            };
            match router.network.step(&mut v.session, start as u32, &x).await {
                Ok(answer) => {
                    v.cached = len;
                    Outcome::Answer {
                        verifier: v,
                        start,
                        answer,
                    }
                }
                Err(error) => {
                    router.network.close(v.session).await;
                    Outcome::Failed {
                        peer: v.peer,
                        error,
                    }
                }
            }
        });
        state.check.running = Some(Running {
            from,
            to: len,
            valid_until: len,
            expected,
            first,
            due,
            task,
        });
    }

    /// Reads span `i`'s running check if it is done (or waits for it, when `wait`), and acts
    /// on the answer. [`RouteError::Rewound`] when it caught the primary.
    async fn collect(&mut self, i: usize, wait: bool) -> Result<(), RouteError> {
        let dim = self.router.dim;
        let check = &mut self.spans[i].check;
        let done = check.running.as_ref().is_some_and(|r| r.task.is_finished());
        if !(done || wait) {
            return Ok(());
        }
        let Some(mut running) = check.running.take() else {
            return Ok(());
        };
        let outcome = match (&mut running.task).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Lookup(RouteError::Session(SessionError::Protocol {
                peer: self.spans[i].span.peer,
                reason: format!("the check of its outputs stopped: {e}"),
            })),
        };
        let blocks = self.spans[i].span.blocks.clone();
        let primary = self.spans[i].span.peer;
        let (from, valid_to) = (running.from, running.to.min(running.valid_until));
        let check = &mut self.spans[i].check;
        match outcome {
            Outcome::Lookup(e) => Err(e),
            Outcome::NoSecond => {
                tracing::warn!(
                    "no second peer serves blocks {}..{}: positions {from}..{valid_to} there are not verified",
                    blocks.start,
                    blocks.end
                );
                check.failures = 0;
                check.settle_range(from, valid_to, dim);
                Ok(())
            }
            Outcome::Failed { peer, error } => {
                tracing::warn!(
                    "verifier {peer} of blocks {}..{} failed: {error}",
                    blocks.start,
                    blocks.end
                );
                self.router.ban(peer);
                let check = &mut self.spans[i].check;
                check.failures += 1;
                if check.failures >= OPEN_ATTEMPTS {
                    tracing::warn!(
                        "{OPEN_ATTEMPTS} verifiers of blocks {}..{} failed in a row: positions {from}..{valid_to} there are not verified",
                        blocks.start,
                        blocks.end
                    );
                    check.failures = 0;
                    check.settle_range(from, valid_to, dim);
                }
                Ok(())
            }
            Outcome::Answer {
                mut verifier,
                start,
                answer,
            } => {
                check.failures = 0;
                verifier.cached = verifier.cached.min(running.valid_until);
                if valid_to <= from {
                    check.verifier = Some(verifier);
                    return Ok(());
                }
                let theirs = &answer.data[(from - start) * dim..(valid_to - start) * dim];
                let ours = &running.expected[..(valid_to - from) * dim];
                let Some(row) = first_difference(ours, theirs, dim) else {
                    tracing::debug!(
                        "blocks {}..{}: positions {from}..{valid_to} of {primary} checked on {}",
                        blocks.start,
                        blocks.end,
                        verifier.peer
                    );
                    check.settle_range(from, valid_to, dim);
                    if running.first && check.audited == Some(false) {
                        tracing::debug!(
                            "blocks {}..{}: first check of {primary} agreed; not audited further",
                            blocks.start,
                            blocks.end
                        );
                        check.unaudited = true;
                        check.release_all(dim);
                        self.router.network.close(verifier.session).await;
                    } else {
                        check.verifier = Some(verifier);
                    }
                    return Ok(());
                };
                let theirs = theirs.to_vec();
                let ours = std::mem::take(&mut running.expected);
                let disputed = Disputed {
                    from,
                    at: from + row,
                    len: valid_to,
                    ours,
                    theirs,
                };
                match self.settle_disagreement(i, disputed, verifier).await? {
                    Some(to) => Err(RouteError::Rewound { to }),
                    None => Ok(()),
                }
            }
        }
    }

    /// Rolls every span back to position `to`: inputs, outputs and checks from there on are
    /// forgotten; the peers roll their caches back when the next step starts at `to`.
    pub(super) fn rewind(&mut self, to: usize) {
        let dim = self.router.dim;
        for s in &mut self.spans {
            s.inputs.truncate(to * dim);
            s.check.rewind(to, dim);
        }
    }

    /// The primary of span `i` and its verifier disagree from position `at` on. A third peer
    /// decides; whoever differs from the majority is banned. Returns the position to roll back
    /// to, if the primary's outputs were (or may have been) wrong.
    async fn settle_disagreement(
        &mut self,
        i: usize,
        d: Disputed,
        verifier: Verifier<N::Span>,
    ) -> Result<Option<usize>, RouteError> {
        let dim = self.router.dim;
        let Disputed {
            from,
            at,
            len,
            ours,
            theirs,
        } = d;
        let Verifier { peer, session, .. } = verifier;
        let primary = self.spans[i].span.peer;
        let blocks = self.spans[i].span.blocks.clone();
        tracing::warn!(
            "blocks {}..{}: {primary} and {peer} disagree from position {at}; asking a third peer",
            blocks.start,
            blocks.end
        );
        let mut third = None;
        let mut excluded = vec![primary, peer];
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
            return Ok(Some(at));
        };
        let primary_right = first_difference(&ours, &verdict, dim).is_none();
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
            check.settle_range(from, len, dim);
            check.verifier = Some(Verifier {
                peer: judge,
                session: judge_session,
                cached: len,
            });
            return Ok(None);
        }
        if !verifier_right {
            // Honest peers agree bit for bit, so at most one of three different answers is
            // right, and nothing says which: none of them is trusted with this span again.
            let contested =
                first_difference(&ours, &verdict, dim).map_or(at, |r| (from + r).min(at));
            tracing::warn!(
                "blocks {}..{}: {primary}, {peer} and {judge} gave three different outputs (from position {contested}): banning all three",
                blocks.start,
                blocks.end
            );
            for p in [peer, judge] {
                self.router.ban(p);
            }
            self.router.network.close(session).await;
            self.router.network.close(judge_session).await;
            self.rewind(contested);
            let reason = format!(
                "its outputs, {peer}'s and {judge}'s for blocks {}..{} all differ from position {contested}: no majority to trust",
                blocks.start, blocks.end
            );
            self.replace(
                i,
                SessionError::Protocol {
                    peer: primary,
                    reason,
                },
            )
            .await?;
            return Ok(Some(contested));
        }
        tracing::warn!(
            "blocks {}..{}: {primary} disagrees with {peer} and {judge} from position {at}: banned, generating again from there",
            blocks.start,
            blocks.end,
        );
        self.router.ban(primary);
        self.caught.push(primary);
        // The third peer becomes the primary (its cache holds the inputs up to `len`, rolled
        // back at the next step); the verifier, which agreed with it, stays.
        let old = std::mem::replace(
            &mut self.spans[i].span,
            OpenSpan {
                peer: judge,
                blocks: blocks.clone(),
                session: judge_session,
            },
        );
        self.router.network.close(old.session).await;
        self.spans[i].check.verifier = Some(Verifier {
            peer,
            session,
            cached: len,
        });
        self.rewind(at);
        Ok(Some(at))
    }
}

/// A check whose answer differs from the primary's.
struct Disputed {
    /// First position compared.
    from: usize,
    /// First position where the two differ.
    at: usize,
    /// End of the positions compared.
    len: usize,
    /// The primary's outputs and the verifier's for `from..len`.
    ours: Vec<f32>,
    theirs: Vec<f32>,
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
            outputs: vec![0.0; 4],
            verifier: Some(Verifier {
                peer: PeerId::random(),
                session: (),
                cached: 3,
            }),
            ..Check::new(3)
        };
        c.rewind(4, 2);
        assert_eq!((c.verified, c.outputs.len()), (3, 2));
        c.rewind(1, 2);
        assert_eq!((c.verified, c.outputs.len()), (1, 0));
        assert_eq!(c.verifier.as_ref().map(|v| v.cached), Some(1));
    }

    #[test]
    fn settling_a_range_the_span_no_longer_waits_on_changes_nothing() {
        let mut c: Check<()> = Check {
            outputs: vec![0.0; 6],
            ..Check::new(2)
        };
        c.settle_range(1, 4, 2);
        assert_eq!((c.verified, c.outputs.len()), (2, 6));
        c.settle_range(2, 4, 2);
        assert_eq!((c.verified, c.outputs.len()), (4, 2));
    }
}
