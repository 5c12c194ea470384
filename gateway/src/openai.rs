//! OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions` (both with
//! `stream: true` as server-sent events) and `/v1/models`, with errors in OpenAI's shape, so
//! existing clients, SDKs and chat UIs work by changing their base URL.
//!
//! Accepted but without effect: `frequency_penalty`, `presence_penalty`, `logit_bias`, `user`
//! and other fields this gateway does not implement are ignored, as many servers do, so
//! clients that always send them keep working. `n` other than 1, `logprobs`, `echo`,
//! `suffix` and tool calls are refused with a 400 that names the field.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use coordinator::generate::FinishReason;
use futures::{stream, Stream, StreamExt};
use model::chat::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use swarm::page::ClientAddr;

use crate::engine::{Event, Job, Outcome, Prompt, Running};
use crate::error::{ApiError, ErrorKind};
use crate::Gateway;

/// Largest request body: a long conversation fits many times over.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat).fallback(method_not_allowed),
        )
        .route(
            "/v1/completions",
            post(completions).fallback(method_not_allowed),
        )
        .route("/v1/models", get(models).fallback(method_not_allowed))
        .route("/v1/models/{*id}", get(model).fallback(method_not_allowed))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gw)
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no endpoint {method} {uri}"))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{uri} does not accept {method}"),
    )
}

// ---- request types ----

#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    n: Option<i64>,
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    tools: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    echo: Option<bool>,
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn parse<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorKind::TooLarge,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("cannot read the request body: {e}"),
            )
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("the request body is not a valid request: {e}"),
        )
    })
}

impl Common {
    /// Checks everything both endpoints share and builds the job's options.
    fn job(
        &self,
        gw: &Gateway,
        prompt: Vec<u32>,
        default_max_tokens: Option<usize>,
    ) -> Result<Job, ApiError> {
        match self.model.as_deref() {
            None => return Err(ApiError::bad("model", "`model` is required")),
            Some(m) if !gw.serves(m) => {
                return Err(ApiError {
                    kind: ErrorKind::ModelNotFound,
                    message: format!(
                        "the model `{m}` does not exist here; this gateway serves `{}`",
                        gw.info.id
                    ),
                    param: Some("model"),
                })
            }
            Some(_) => {}
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!(false))
        {
            return Err(ApiError::bad("logprobs", "logprobs are not supported"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(n) if n < 1 => {
                return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"))
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => default_max_tokens,
        };
        Job::new(
            prompt,
            max_tokens,
            self.temperature,
            self.top_p,
            self.seed.map(|s| s as u64),
            self.stop.clone().map_or_else(Vec::new, OneOrMany::into_vec),
        )
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn messages(msgs: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("messages[{i}]: role `{other}` is not supported"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::bad(
                                    "messages",
                                    format!("messages[{i}]: content of type `{kind}` is not supported (text only)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: role.into(),
                content,
            })
        })
        .collect()
}

// ---- handlers ----

/// The address a request came from, when it came through `swarm::page::serve_with`.
type Client = Option<Extension<ClientAddr>>;

fn client_ip(client: Client) -> Option<std::net::IpAddr> {
    client.map(|Extension(ClientAddr(ip))| ip)
}

async fn chat(State(gw): State<Arc<Gateway>>, client: Client, body: Body) -> Response {
    let result = async {
        let req: ChatRequest = parse(body)?;
        if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::bad("tools", "tool calls are not supported"));
        }
        let prompt = gw.prompt_ids(Prompt::Chat(messages(req.messages)?)).await?;
        let job = req.common.job(&gw, prompt, None)?;
        let running = gw.run(job.from_client(client_ip(client))).await?;
        Ok((req.common, running))
    }
    .await;
    respond(&gw, Kind::Chat, result).await
}

async fn completions(State(gw): State<Arc<Gateway>>, client: Client, body: Body) -> Response {
    let result = async {
        let req: CompletionRequest = parse(body)?;
        if req.echo == Some(true) {
            return Err(ApiError::bad("echo", "echo is not supported"));
        }
        if req.suffix.is_some() {
            return Err(ApiError::bad("suffix", "suffix is not supported"));
        }
        let mut prompts = req.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::bad("prompt", "exactly one prompt per request"));
        }
        let prompt = gw.prompt_ids(Prompt::Text(prompts.remove(0))).await?;
        // OpenAI's default for this endpoint.
        let job = req.common.job(&gw, prompt, Some(16))?;
        let running = gw.run(job.from_client(client_ip(client))).await?;
        Ok((req.common, running))
    }
    .await;
    respond(&gw, Kind::Completion, result).await
}

async fn models(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    gw.metrics.request("models", "200");
    Json(json!({ "object": "list", "data": [model_object(&gw)] }))
}

async fn model(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    if gw.serves(&id) {
        gw.metrics.request("models", "200");
        Json(model_object(&gw)).into_response()
    } else {
        gw.metrics.request("models", "404");
        ApiError {
            kind: ErrorKind::ModelNotFound,
            message: format!("the model `{id}` does not exist"),
            param: Some("model"),
        }
        .into_response()
    }
}

fn model_object(gw: &Gateway) -> Value {
    json!({
        "id": gw.info.id,
        "object": "model",
        "created": gw.created,
        "owned_by": "edge-swarm",
    })
}

// ---- responses ----

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }
}

/// What every chunk and answer of one response share.
struct Envelope {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    system_fingerprint: String,
}

impl Envelope {
    fn new(gw: &Gateway, kind: Kind) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Self {
            kind,
            id: format!(
                "{prefix}-{:016x}{:08x}",
                rand::random::<u64>(),
                rand::random::<u32>()
            ),
            created: swarm::discovery::now_ms() / 1000,
            model: gw.info.id.clone(),
            system_fingerprint: format!("edge-swarm-{}", &gw.info.fingerprint[..12]),
        }
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// A streamed piece: `delta` for chat, `text` for completions.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(finish_name)})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish.map(finish_name)})
            }
        };
        self.object_with(true, vec![choice])
    }

    fn usage_chunk(&self, o: &Outcome) -> Value {
        let mut v = self.object_with(true, Vec::new());
        v["usage"] = usage(o);
        v
    }

    /// The fields every answer and chunk of this response share, with `choices`.
    fn object_with(&self, stream: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(stream),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
        })
    }

    fn answer(&self, text: String, o: &Outcome) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_name(o.finish_reason),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_name(o.finish_reason),
            }),
        };
        let mut v = self.object_with(false, vec![choice]);
        v["usage"] = usage(o);
        v["edge_swarm"] = json!({"route": o.route, "reroutes": o.reroutes});
        v
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(o: &Outcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
    })
}

async fn respond(
    gw: &Arc<Gateway>,
    kind: Kind,
    started: Result<(Common, Running), ApiError>,
) -> Response {
    let (common, mut running) = match started {
        Ok(s) => s,
        Err(e) => {
            gw.metrics
                .request(kind.endpoint(), e.status().as_u16().to_string());
            return e.into_response();
        }
    };
    let env = Envelope::new(gw, kind);
    if common.stream {
        gw.metrics.request(kind.endpoint(), "200");
        return Sse::new(sse_events(env, running, common.include_usage()))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut text = String::new();
    let result = loop {
        match running.events.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(o)) => break Ok(o),
            Some(Event::Failed(e)) => break Err(e),
            None => {
                break Err(ApiError::new(
                    ErrorKind::SwarmUnavailable,
                    "the generation stopped unexpectedly",
                ))
            }
        }
    };
    match result {
        Ok(o) => {
            gw.metrics.request(kind.endpoint(), "200");
            Json(env.answer(text, &o)).into_response()
        }
        Err(e) => {
            gw.metrics
                .request(kind.endpoint(), e.status().as_u16().to_string());
            e.into_response()
        }
    }
}

/// The SSE body: a role chunk (chat), text chunks, a chunk with the finish reason, the usage
/// chunk when asked for, and `[DONE]`. A failure after the headers went out is sent as an
/// `error` object, which OpenAI's clients raise as an exception.
fn sse_events(
    env: Envelope,
    running: Running,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let env = Arc::new(env);
    let first = match env.kind {
        Kind::Chat => vec![data(&env.chunk(Some(""), true, None))],
        Kind::Completion => Vec::new(),
    };
    let rest = stream::unfold(Some(running), move |state| {
        let env = env.clone();
        async move {
            let mut running = state?;
            let out = match running.events.recv().await? {
                Event::Text(t) => {
                    return Some((vec![data(&env.chunk(Some(&t), false, None))], Some(running)))
                }
                Event::Done(o) => {
                    let mut v = vec![data(&env.chunk(None, false, Some(o.finish_reason)))];
                    if include_usage {
                        v.push(data(&env.usage_chunk(&o)));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Event::Failed(e) => vec![data(&e.body())],
            };
            Some((out, None))
        }
    });
    stream::iter(vec![first])
        .chain(rest)
        .flat_map(|v| stream::iter(v.into_iter().map(Ok)))
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl Gateway {
    /// Whether `name` names this gateway's model (with or without `.gguf`).
    pub fn serves(&self, name: &str) -> bool {
        name == self.info.id || name.strip_suffix(".gguf") == Some(self.info.id.as_str())
    }
}
