//! The client side of the swarm: what a program calls to generate text through peers.
//!
//! The client keeps the token embedding, the final norm and the LM head (and the tokenizer) of
//! the model; every transformer block runs on peers found through the DHT.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use model::chat::ChatTemplate;
use model::embed::Embedding;
use model::fingerprint::{fingerprint, short_hex, Fingerprint};
use model::head::Head;
use model::tokenizer::Tokenizer;
use model::{load, GgufFile, LoadOptions, ModelError, ModelSpec};
use proto::v1::{Dtype, ServerState};
use tokio_util::sync::CancellationToken;

use crate::discovery::{self, now_ms, Server};
use crate::generate::{Forward, GenerateError};
use crate::net::{self, NetConfig, NetError, NetHandle};
use crate::route::{plan_route, PlanError, PlanRequest, ServerInfo, Span};
use crate::session::{InferenceSession, SessionError, SpanSession, Timeouts};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot build a route for model {model}: {source}")]
    Route { model: String, source: PlanError },
    #[error("no peer of the swarm answered within {secs:.0}s (check the --bootstrap address)")]
    NoPeers { secs: f64 },
}

/// What the client holds of a model: embeddings, head, tokenizer, and the model's identity.
pub struct ClientModel {
    pub spec: ModelSpec,
    pub fingerprint: Fingerprint,
    pub embedding: Embedding,
    pub head: Head,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl ClientModel {
    pub fn open(
        path: impl AsRef<Path>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let fp = fingerprint(&file)?;
        let mut slice = load(&file, &LoadOptions::client(), progress)?;
        let missing = ModelError::NotLoaded {
            what: "embeddings and head",
        };
        Ok(Self {
            spec: slice.spec.clone(),
            fingerprint: fp,
            embedding: slice.embedding.take().ok_or(missing)?,
            head: slice.head.take().ok_or(ModelError::NotLoaded {
                what: "the LM head",
            })?,
            tokenizer: Tokenizer::from_gguf(file.metadata())?,
            chat_template: ChatTemplate::from_gguf(file.metadata())?,
        })
    }

    pub fn short_id(&self) -> String {
        short_hex(&self.fingerprint)
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// dtype of hidden states on the wire; f32 keeps results bit-identical to one process.
    pub wire_dtype: Dtype,
    pub timeouts: Timeouts,
    /// How long to wait for the first peer and for servers to appear in the DHT.
    pub discovery_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            bootstrap: Vec::new(),
            mdns: false,
            wire_dtype: Dtype::F32,
            timeouts: Timeouts::default(),
            discovery_timeout: Duration::from_secs(20),
        }
    }
}

/// A connection to the swarm. Dropping it stops its network task.
pub struct SwarmClient {
    net: NetHandle,
    config: ClientConfig,
    shutdown: CancellationToken,
}

impl Drop for SwarmClient {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl SwarmClient {
    /// Joins the swarm as a client and waits (bounded) until some peer is connected.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let shutdown = CancellationToken::new();
        let network = net::start(
            NetConfig {
                keypair: libp2p::identity::Keypair::generate_ed25519(),
                listen: Vec::new(),
                bootstrap: config.bootstrap.clone(),
                mdns: config.mdns,
                dht_server: false,
                on_listen: None,
            },
            shutdown.clone(),
        )?;
        let client = Self {
            net: network.handle,
            config,
            shutdown,
        };
        let deadline = tokio::time::Instant::now() + client.config.discovery_timeout;
        while client.net.connected_peers().await == 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::NoPeers {
                    secs: client.config.discovery_timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(client)
    }

    pub fn net(&self) -> &NetHandle {
        &self.net
    }

    /// Every server the DHT lists for this model.
    pub async fn servers(&self, model: &ClientModel) -> Result<Vec<Server>, ClientError> {
        Ok(discovery::lookup(&self.net, &model.fingerprint, model.spec.block_count as u32).await?)
    }

    /// The cheapest chain of spans over blocks `0..L`, from what the DHT and ping say now.
    pub async fn plan(
        &self,
        model: &ClientModel,
        servers: &[Server],
        cache_tokens: u64,
        banned_until_ms: &HashMap<PeerId, u64>,
    ) -> Result<Vec<Span<PeerId>>, ClientError> {
        let mut infos = Vec::with_capacity(servers.len());
        for s in servers {
            infos.push(ServerInfo {
                peer: s.peer,
                blocks: s.blocks.clone(),
                online: s.state == ServerState::Online,
                decode_ms_per_block: s.decode_ms_per_block,
                rtt_ms: self.net.rtt(s.peer).await.map(|d| d.as_secs_f32() * 1e3),
                free_cache_tokens: s.free_cache_tokens,
            });
        }
        let req = PlanRequest {
            blocks: 0..model.spec.block_count as u32,
            cache_tokens,
            now_ms: now_ms(),
            banned_until_ms,
            default_rtt_ms: 20.0,
        };
        plan_route(&infos, &req).map_err(|source| ClientError::Route {
            model: model.short_id(),
            source,
        })
    }

    /// Finds servers, plans a route and opens a session on every hop.
    ///
    /// Servers may take a moment to appear in the DHT after they start, so a route that is not
    /// yet complete is retried until the discovery timeout; the error then names the blocks
    /// nobody serves.
    pub async fn open_session(
        &self,
        model: &ClientModel,
        max_length: u32,
    ) -> Result<InferenceSession, ClientError> {
        let deadline = tokio::time::Instant::now() + self.config.discovery_timeout;
        let banned = HashMap::new();
        let (servers, route) = loop {
            let servers = self.servers(model).await?;
            match self.plan(model, &servers, max_length as u64, &banned).await {
                Ok(route) => break (servers, route),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!("route not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut spans = Vec::with_capacity(route.len());
        for hop in &route {
            let Some(server) = servers.iter().find(|s| s.peer == hop.peer) else {
                continue;
            };
            let span = SpanSession::open(
                &self.net,
                server,
                hop.blocks.clone(),
                &model.fingerprint,
                model.spec.embedding_length,
                max_length,
                self.config.wire_dtype,
                self.config.timeouts,
            )
            .await?;
            spans.push(span);
        }
        Ok(InferenceSession::new(spans))
    }
}

/// Generation backend that runs the blocks through a swarm session.
pub struct SwarmForward<'a> {
    pub model: &'a ClientModel,
    pub session: InferenceSession,
}

impl Forward for SwarmForward<'_> {
    async fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        let x = self.model.embedding.embed(ids)?;
        let pos = u32::try_from(pos).map_err(|_| ModelError::CacheFull {
            needed: pos,
            capacity: u32::MAX as usize,
        })?;
        let y = self.session.forward(x, pos).await?;
        Ok(self.model.head.last_logits(&y)?)
    }
}
