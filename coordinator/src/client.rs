//! The client side of the swarm: what a program calls to generate text through peers.
//!
//! The client keeps the token embedding, the final norm and the LM head (and the tokenizer) of
//! the model; every transformer block runs on peers found through the DHT.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use libp2p::Multiaddr;
use model::chat::ChatTemplate;
use model::embed::Embedding;
use model::fingerprint::{fingerprint, short_hex, Fingerprint};
use model::head::Head;
use model::tokenizer::Tokenizer;
use model::{load, GgufFile, LoadOptions, ModelError, ModelSpec};
use proto::v1::Dtype;
use proto::Wire;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use swarm::discovery::{self, Server};
use swarm::{host, NetConfig, NetError, NetHandle};

use crate::generate::{Backend, GenerateError};
use crate::route::Routing;
use crate::session::{
    Bans, InferenceSession, Libp2pNetwork, Reported, RouteError, Router, Timeouts, VerifyPolicy,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Route(#[from] RouteError),
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
    /// Type of hidden states on the wire; f32 keeps results bit-identical to one process.
    pub wire: Wire,
    pub timeouts: Timeouts,
    /// How long to wait for the first peer and for servers to appear in the DHT.
    pub discovery_timeout: Duration,
    /// The key of a private swarm (`swarm::swarm_key`), when the swarm has one.
    pub swarm_key: Option<PreSharedKey>,
    /// Whether sessions check their peers' outputs on second peers (off by default; see
    /// [`VerifyPolicy::every`] for the cost).
    pub verify: VerifyPolicy,
    /// How routes are chosen (see [`Routing`]).
    pub routing: Routing,
    /// Whether hidden states go node to node (server-to-server push) when verification is
    /// off, instead of back through the client after every span. On by default: N + 1 one-way
    /// trips per step through N nodes instead of 2N; the client relays a span itself wherever
    /// a push fails.
    pub push: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            bootstrap: Vec::new(),
            mdns: false,
            wire: Wire::Fixed(Dtype::F32),
            timeouts: Timeouts::default(),
            discovery_timeout: Duration::from_secs(20),
            swarm_key: None,
            verify: VerifyPolicy::OFF,
            routing: Routing::default(),
            push: true,
        }
    }
}

/// A connection to the swarm. Dropping it stops its network task; [`SwarmClient::close`] also
/// waits for that task to end, so connections are closed before the program goes on or exits.
pub struct SwarmClient {
    net: NetHandle,
    config: ClientConfig,
    shutdown: CancellationToken,
    network_task: Option<tokio::task::JoinHandle<()>>,
    /// Failed peers, shared by every session of this client.
    bans: Arc<Mutex<Bans>>,
    /// Peers claimed offline lately, and the claims still being written.
    reported: Arc<Mutex<Reported>>,
    reports: TaskTracker,
}

impl Drop for SwarmClient {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How long [`SwarmClient::close`] waits for the network task.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

impl SwarmClient {
    /// Joins the swarm as a client and waits (bounded) until some peer is connected.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let shutdown = CancellationToken::new();
        let host = host::start(
            NetConfig {
                keypair: libp2p::identity::Keypair::generate_ed25519(),
                listen: Vec::new(),
                bootstrap: config.bootstrap.clone(),
                mdns: config.mdns,
                dht_server: false,
                on_listen: None,
                swarm_key: config.swarm_key,
            },
            shutdown.clone(),
        )?;
        let client = Self {
            net: host.handle,
            config,
            shutdown,
            network_task: Some(host.task),
            bans: Arc::default(),
            reported: Arc::default(),
            reports: TaskTracker::new(),
        };
        let deadline = swarm::deadline::after(client.config.discovery_timeout);
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

    /// Stops the network task and waits (bounded) for it to finish.
    pub async fn close(mut self) {
        // Offline claims are for other clients; a short generation would otherwise end before
        // its claim reached the DHT.
        self.reports.close();
        if tokio::time::timeout(CLOSE_TIMEOUT, self.reports.wait())
            .await
            .is_err()
        {
            tracing::debug!("an offline claim was still being written at close");
        }
        self.shutdown.cancel();
        if let Some(task) = self.network_task.take() {
            match tokio::time::timeout(CLOSE_TIMEOUT, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("the network task failed: {e}"),
                Err(_) => tracing::warn!("the network task did not stop within {CLOSE_TIMEOUT:?}"),
            }
        }
    }

    pub fn net(&self) -> &NetHandle {
        &self.net
    }

    /// Every server the DHT lists for this model.
    pub async fn servers(&self, model: &ClientModel) -> Result<Vec<Server>, ClientError> {
        Ok(discovery::lookup(&self.net, &model.fingerprint, model.spec.block_count as u32).await?)
    }

    /// What sessions of `model` use to find, open and replace peers.
    pub fn router(&self, model: &ClientModel) -> Arc<Router> {
        let block_count = model.spec.block_count as u32;
        Arc::new(Router {
            network: Libp2pNetwork {
                net: self.net.clone(),
                fingerprint: model.fingerprint,
                block_count,
                dim: model.spec.embedding_length,
                wire: self.config.wire,
                timeouts: self.config.timeouts,
                routing: self.config.routing,
                push: self.config.push,
                reported: self.reported.clone(),
                reports: self.reports.clone(),
            },
            fingerprint: model.fingerprint,
            block_count,
            dim: model.spec.embedding_length,
            discovery_timeout: self.config.discovery_timeout,
            bans: self.bans.clone(),
            verify: self.config.verify,
        })
    }

    /// Finds servers, plans a route over every block and opens a session on each hop.
    ///
    /// Servers may take a moment to appear in the DHT after they start, so an incomplete route
    /// is retried until the discovery timeout; the error then names the blocks nobody serves.
    pub async fn open_session(
        &self,
        model: &ClientModel,
        max_length: u32,
    ) -> Result<InferenceSession, ClientError> {
        Ok(InferenceSession::open(self.router(model), max_length).await?)
    }
}

/// Generation backend that runs the blocks through a swarm session.
pub struct SwarmBackend<'a> {
    pub model: &'a ClientModel,
    pub session: InferenceSession,
}

impl Backend for SwarmBackend<'_> {
    async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        self.model.logits_through(&mut self.session, ids, pos).await
    }

    fn settled(&self) -> usize {
        self.session.settled()
    }

    async fn settle(&mut self) -> Result<(), GenerateError> {
        settle(&mut self.session).await
    }
}

/// [`InferenceSession::settle`] for a generation backend: a caught peer's rollback becomes
/// [`GenerateError::Rewind`].
pub async fn settle(session: &mut InferenceSession) -> Result<(), GenerateError> {
    session.settle().await.map_err(rewind_or_route)
}

fn rewind_or_route(e: RouteError) -> GenerateError {
    match e {
        RouteError::Rewound { to } => GenerateError::Rewind { to },
        e => GenerateError::Route(e),
    }
}

impl ClientModel {
    /// Embeds `ids`, runs them at `pos..` through `session`'s peers and returns the logits
    /// after the last one.
    pub async fn logits_through(
        &self,
        session: &mut InferenceSession,
        ids: &[u32],
        pos: usize,
    ) -> Result<Vec<f32>, GenerateError> {
        let x = self.embedding.embed(ids)?;
        let pos = u32::try_from(pos).map_err(|_| ModelError::CacheFull {
            needed: pos,
            capacity: u32::MAX as usize,
        })?;
        let y = session.run_blocks(x, pos).await.map_err(rewind_or_route)?;
        Ok(self.head.last_logits(&y)?)
    }
}
