//! The gRPC face of the gateway (`proto/proto/gateway.proto`): server-streaming `Generate` and
//! `SwarmStatus`, plus reflection (v1 and v1alpha, so grpcurl and Python's reflection client
//! both work) and the standard health service, which says NOT_SERVING while some block of the
//! model has no online server.

use std::pin::Pin;
use std::sync::Arc;

use futures::{stream, Stream};
use model::chat::ChatMessage;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::engine::{Event, Job, Prompt, Running};
use crate::error::ApiError;
use crate::Gateway;

pub mod pb {
    tonic::include_proto!("edge_swarm.gateway.v1");
    pub const DESCRIPTOR_SET: &[u8] = proto::GATEWAY_DESCRIPTOR_SET;
}

use pb::gateway_server::{Gateway as GatewayService, GatewayServer};

/// The service name clients pass to `grpc.health.v1.Health/Check`.
pub const SERVICE_NAME: &str = "edge_swarm.gateway.v1.Gateway";

pub fn router(gw: Arc<Gateway>, shutdown: CancellationToken) -> axum::Router {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut updates = gw.swarm_updates();
    tokio::spawn(async move {
        loop {
            let complete = matches!(&*updates.borrow_and_update(), Some(Ok(v)) if v.complete());
            if complete {
                health.set_serving::<GatewayServer<Grpc>>().await;
            } else {
                health.set_not_serving::<GatewayServer<Grpc>>().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = updates.changed() => if changed.is_err() { break },
            }
        }
    });
    let mut routes =
        tonic::service::Routes::new(GatewayServer::new(Grpc(gw))).add_service(health_service);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The descriptor sets are compiled in; building from them only fails if they are corrupt.
    match reflection().build_v1() {
        Ok(v1) => routes = routes.add_service(v1),
        Err(e) => tracing::warn!("gRPC reflection (v1) unavailable: {e}"),
    }
    match reflection().build_v1alpha() {
        Ok(v1alpha) => routes = routes.add_service(v1alpha),
        Err(e) => tracing::warn!("gRPC reflection (v1alpha) unavailable: {e}"),
    }
    routes.into_axum_router()
}

pub struct Grpc(Arc<Gateway>);

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GatewayService for Grpc {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let gw = &self.0;
        let client = request
            .extensions()
            .get::<swarm::page::ClientAddr>()
            .map(|c| c.0);
        match self.start(request.into_inner(), client).await {
            Ok(running) => {
                gw.metrics.request("grpc_generate", "ok");
                Ok(Response::new(Box::pin(responses(running))))
            }
            Err(e) => {
                let status = e.grpc();
                gw.metrics
                    .request("grpc_generate", format!("{:?}", status.code()));
                Err(status)
            }
        }
    }

    async fn swarm_status(
        &self,
        _request: Request<pb::SwarmStatusRequest>,
    ) -> Result<Response<pb::SwarmStatusResponse>, Status> {
        let gw = &self.0;
        gw.metrics.request("grpc_swarm_status", "ok");
        let view = match gw.swarm() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(Status::unavailable(format!("swarm lookup failed: {e}"))),
            None => {
                return Err(Status::unavailable(
                    "the first swarm lookup has not finished",
                ))
            }
        };
        Ok(Response::new(pb::SwarmStatusResponse {
            model: view.model.id.clone(),
            fingerprint: view.model.fingerprint.clone(),
            block_count: view.model.block_count,
            complete: view.complete(),
            servers_per_block: view.servers_per_block.clone(),
            peers: view
                .peers
                .iter()
                .map(|p| pb::Peer {
                    peer_id: p.peer_id.clone(),
                    start_block: p.start_block,
                    end_block: p.end_block,
                    state: p.state.into(),
                    decode_ms_per_block: p.decode_ms_per_block,
                    tokens_per_second: p.tokens_per_second,
                    free_cache_tokens: p.free_cache_tokens,
                    rtt_ms: p.rtt_ms,
                    sessions: p.sessions,
                    max_sessions: p.max_sessions,
                    waiting_steps: p.waiting_steps,
                    reported_offline: p.reported_offline,
                    version: p.version.clone(),
                })
                .collect(),
        }))
    }
}

impl Grpc {
    async fn start(
        &self,
        r: pb::GenerateRequest,
        client: Option<std::net::IpAddr>,
    ) -> Result<Running, ApiError> {
        let gw = &self.0;
        let prompt = match (r.prompt.is_empty(), r.messages.is_empty()) {
            (false, true) => gw.prompt_ids(Prompt::Text(r.prompt)).await?,
            (true, false) => {
                let messages: Vec<ChatMessage> = r
                    .messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                if let Some(m) = messages
                    .iter()
                    .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
                {
                    return Err(ApiError::bad(
                        "messages",
                        format!("role `{}` is not supported", m.role),
                    ));
                }
                gw.prompt_ids(Prompt::Chat(messages)).await?
            }
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "give exactly one of `prompt` and `messages`",
                ))
            }
        };
        let max_tokens = (r.max_tokens > 0).then_some(r.max_tokens as usize);
        let job = Job::new(prompt, max_tokens, r.temperature, r.top_p, r.seed, r.stop)?;
        gw.run(job.from_client(client)).await
    }
}

/// Text pieces as they come; the last message has the finish reason, usage and route.
fn responses(running: Running) -> impl Stream<Item = Result<pb::GenerateResponse, Status>> {
    stream::unfold(Some(running), |state| async move {
        let mut running = state?;
        let item = match running.events.recv().await? {
            Event::Text(text) => {
                return Some((
                    Ok(pb::GenerateResponse {
                        text,
                        ..Default::default()
                    }),
                    Some(running),
                ))
            }
            Event::Done(o) => Ok(pb::GenerateResponse {
                text: String::new(),
                finish_reason: match o.finish_reason {
                    coordinator::generate::FinishReason::Stop => pb::FinishReason::Stop,
                    coordinator::generate::FinishReason::Length => pb::FinishReason::Length,
                } as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: o.prompt_tokens as u32,
                    completion_tokens: o.completion_tokens as u32,
                }),
                route: o
                    .route
                    .iter()
                    .map(|h| format!("{} [{}]", h.peer, h.blocks))
                    .collect(),
                reroutes: o.reroutes as u32,
            }),
            Event::Failed(e) => Err(e.grpc()),
        };
        Some((item, None))
    })
}
