//! Runs generations for both front ends: admission (a bounded queue in front of a fixed number
//! of concurrent generations), a session of the blocks (swarm or local) per request, and a stream of events. Dropping
//! the [`Running`] handle (a client hung up) stops the generation and frees its peers' caches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use coordinator::generate::{self, Backend, FinishReason, GenerateError, GenerateOptions};
use coordinator::session::RouteHop;
use model::chat::ChatMessage;
use tokio::sync::mpsc;

use crate::blocks::{Session, SessionBackend};
use crate::error::{ApiError, ErrorKind};
use crate::per_client::ClientSlot;
use crate::Gateway;

/// What to continue: plain text, or a conversation for the chat template.
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// One generation as the front ends ask for it (already validated).
#[derive(Clone, Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    /// `None`: the gateway's default. Capped by what is left of the model's context.
    pub max_tokens: Option<usize>,
    pub sampling: generate::SamplingOptions,
    pub stop: Vec<String>,
    /// Where the request came from, for the per-client limit (`None`: not limited).
    pub client: Option<std::net::IpAddr>,
}

const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 1024;

impl Job {
    /// Validates sampling parameters as OpenAI defines them: `temperature` in [0, 2]
    /// (default 1, 0 = greedy), `top_p` in (0, 1] (default 1), a random seed when none is
    /// given, at most 16 stop sequences.
    pub fn new(
        prompt: Vec<u32>,
        max_tokens: Option<usize>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        seed: Option<u64>,
        stop: Vec<String>,
    ) -> Result<Self, ApiError> {
        let temperature = temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        if stop.len() > MAX_STOPS {
            return Err(ApiError::bad(
                "stop",
                format!("at most {MAX_STOPS} stop sequences"),
            ));
        }
        if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad(
                "stop",
                format!("stop sequences are limited to {MAX_STOP_BYTES} bytes"),
            ));
        }
        Ok(Self {
            prompt,
            max_tokens,
            sampling: generate::SamplingOptions {
                temperature,
                top_p,
                top_k: 0,
                repetition_penalty: 1.0,
                seed: seed.unwrap_or_else(rand::random),
                ..generate::SamplingOptions::default()
            },
            stop,
            client: None,
        })
    }

    /// The same job, counted against `client`'s share of the generation slots.
    pub fn from_client(self, client: Option<std::net::IpAddr>) -> Self {
        Self { client, ..self }
    }
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Outcome),
    Failed(ApiError),
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub route: Vec<RouteHop>,
    pub reroutes: usize,
}

/// A generation in progress; its task is aborted when this is dropped.
pub struct Running {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// Token ids of a prompt, worked out on the blocking pool: a request of a few MiB takes
    /// a while to render and tokenize, and the async workers must keep serving meanwhile.
    pub async fn prompt_ids(self: &Arc<Self>, prompt: Prompt) -> Result<Vec<u32>, ApiError> {
        let gw = self.clone();
        tokio::task::spawn_blocking(move || match prompt {
            Prompt::Text(text) => gw.text_prompt(&text),
            Prompt::Chat(messages) => gw.chat_prompt(&messages),
        })
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("cannot read the prompt: {e}"),
            )
        })?
    }

    /// Token ids of a conversation rendered with the model's chat template, the assistant's
    /// turn open.
    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let template = self.model.chat_template.as_ref().ok_or_else(|| {
            ApiError::bad(
                "messages",
                format!(
                    "model {} has no chat template; use /v1/completions with a prompt",
                    self.info.id
                ),
            )
        })?;
        // Contents are tokenized as text: a message cannot write another role's turn.
        let ids = generate::tokenize::chat_ids(&self.model.tokenizer, template, messages)
            .map_err(|e| ApiError::bad("messages", format!("cannot render the chat: {e}")))?;
        if ids.is_empty() {
            return Err(ApiError::bad("messages", "the prompt is empty"));
        }
        Ok(ids)
    }

    /// Token ids of plain text (special tokens parsed, BOS if the model wants it).
    fn text_prompt(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let ids = generate::tokenize::prompt_ids(&self.model.tokenizer, None, text, false)
            .map_err(|e| ApiError::bad("prompt", format!("cannot tokenize: {e}")))?;
        if ids.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        Ok(ids)
    }

    /// Admits `job`, opens a route through the swarm and starts generating. Errors before the
    /// first token (queue full, no route) come back here, so the front ends can answer them
    /// with a status code instead of a broken stream.
    pub async fn run(self: &Arc<Self>, job: Job) -> Result<Running, ApiError> {
        let context = self.model.spec.context_length;
        let prompt_tokens = job.prompt.len();
        if prompt_tokens >= context {
            return Err(ApiError::new(
                ErrorKind::ContextLength,
                format!(
                    "the prompt has {prompt_tokens} tokens but the model's context holds {context}"
                ),
            ));
        }
        let max_tokens = job
            .max_tokens
            .unwrap_or(self.config.default_max_tokens)
            .min(context - prompt_tokens);

        let (permit, client_slot) = self.admit(job.client).await?;
        let max_length = (prompt_tokens + max_tokens) as u32;
        let started = Instant::now();
        let session = self
            .blocks
            .open(&self.model, &self.info.id, max_length)
            .await?;

        let (tx, events) = mpsc::unbounded_channel();
        let gw = self.clone();
        let task = tokio::spawn(async move {
            let _permit = (permit, client_slot);
            gw.metrics.active.inc();
            // Also when the task is aborted because the client went away.
            let _active = scopeguard(|| {
                gw.metrics.active.dec();
            });
            let event = gw.generate(job, max_tokens, session, started, &tx).await;
            let _ = tx.send(event);
        });
        Ok(Running {
            events,
            prompt_tokens,
            task,
        })
    }

    /// A generation slot, and one of `client`'s share of them: at once if both are free,
    /// else after waiting in the bounded queue (429 when it is full or the wait too long).
    async fn admit(
        &self,
        client: Option<std::net::IpAddr>,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, Option<ClientSlot>), ApiError> {
        let limit = self.config.per_client_limit();
        let mut slot = match client {
            Some(ip) => self.per_client.try_take(ip, limit).map(Some),
            None => Some(None),
        };
        if let Some(s) = slot.take() {
            match self.permits.clone().try_acquire_owned() {
                Ok(p) => return Ok((p, s)),
                Err(_) => slot = Some(s),
            }
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _undo = scopeguard(|| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        });
        if waiting >= self.config.max_waiting {
            return Err(ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "{} generations are running and {waiting} waiting; try again later",
                    self.config.max_concurrent
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        let waited = || self.config.queue_timeout.as_secs_f64();
        let slot = match (slot, client) {
            (Some(s), _) => s,
            (None, Some(ip)) => {
                match tokio::time::timeout_at(deadline, self.per_client.take(ip, limit)).await {
                    Ok(s) => Some(s),
                    Err(_) => {
                        return Err(ApiError::new(
                            ErrorKind::Overloaded,
                            format!(
                                "this client address runs {limit} generations at once already; waited {:.0} s for one of them to end",
                                waited()
                            ),
                        ))
                    }
                }
            }
            (None, None) => None,
        };
        match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok((p, slot)),
            Ok(Err(_)) => Err(ApiError::new(
                ErrorKind::SwarmUnavailable,
                "the gateway is shutting down",
            )),
            Err(_) => Err(ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "waited {:.0} s for a free generation slot; try again later",
                    waited()
                ),
            )),
        }
    }

    async fn generate(
        &self,
        job: Job,
        max_tokens: usize,
        session: Session,
        started: Instant,
        tx: &mpsc::UnboundedSender<Event>,
    ) -> Event {
        let opts = GenerateOptions {
            max_new_tokens: max_tokens,
            sampling: job.sampling,
            stop_at_eos: true,
            stop: job.stop,
        };
        let mut backend = Metered {
            inner: SessionBackend {
                model: &self.model,
                session,
            },
            gateway: self,
            started,
            first: true,
        };
        let mut on_text = |piece: &str| {
            let _ = tx.send(Event::Text(piece.to_owned()));
        };
        let run = generate::generate(
            &mut backend,
            &self.model.tokenizer,
            job.prompt,
            self.model.spec.context_length,
            &opts,
            &mut on_text,
        );
        let result = tokio::time::timeout(self.config.generation_timeout, run).await;
        let session = backend.inner.session;
        let route = session.route();
        let reroutes = session.reroutes();
        session.close().await;
        self.metrics.reroutes.inc_by(reroutes as u64);
        self.metrics
            .generation_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(out)) => {
                self.metrics
                    .prompt_tokens
                    .inc_by(out.prompt_tokens.len() as u64);
                Event::Done(Outcome {
                    finish_reason: out.finish_reason,
                    prompt_tokens: out.prompt_tokens.len(),
                    completion_tokens: out.tokens.len(),
                    route,
                    reroutes,
                })
            }
            Ok(Err(e)) => Event::Failed(generate_error(e)),
            Err(_) => Event::Failed(ApiError::new(
                ErrorKind::Timeout,
                format!(
                    "the generation did not finish within {:.0} s",
                    self.config.generation_timeout.as_secs_f64()
                ),
            )),
        }
    }
}

fn generate_error(e: GenerateError) -> ApiError {
    match e {
        GenerateError::EmptyPrompt => ApiError::bad("prompt", e.to_string()),
        GenerateError::PromptTooLong { .. } => {
            ApiError::new(ErrorKind::ContextLength, e.to_string())
        }
        // `generate` runs a rollback again itself; one escaping it is a failed generation.
        GenerateError::Route(_)
        | GenerateError::Model(_)
        | GenerateError::Backend(_)
        | GenerateError::Rewind { .. } => ApiError::new(
            ErrorKind::SwarmUnavailable,
            format!("generation failed: {e}"),
        ),
    }
}

/// Counts generated tokens for the live speed and times the first one.
struct Metered<'a> {
    inner: SessionBackend<'a>,
    gateway: &'a Gateway,
    started: Instant,
    first: bool,
}

impl Backend for Metered<'_> {
    async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        let logits = self.inner.logits(ids, pos).await?;
        if self.first {
            // The prefill's logits give the first token.
            self.first = false;
            self.gateway
                .metrics
                .first_token_seconds
                .observe(self.started.elapsed().as_secs_f64());
        }
        // Every forward yields one sampled token: count it now, so aborted and failed
        // generations are counted too.
        self.gateway.rate.add(1);
        self.gateway.metrics.generated_tokens.inc();
        Ok(logits)
    }

    fn settled(&self) -> usize {
        self.inner.settled()
    }

    async fn settle(&mut self) -> Result<(), GenerateError> {
        self.inner.settle().await
    }
}

/// Runs `f` when dropped (undoes a counter on every return path).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
