//! `edge-node serve-api`: the OpenAI-compatible HTTP API, the gRPC service, the status page and
//! `/metrics`, on one port, backed by the swarm.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use coordinator::SwarmClient;
use gateway::{Gateway, GatewayConfig};
use swarm::status::ModelInfo;

use super::client::{open_client_model, SwarmArgs};

#[derive(Args, Debug)]
pub struct ServeApiArgs {
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// Path to the GGUF model file (the same file the swarm's nodes serve).
    #[arg(long)]
    pub model: PathBuf,
    /// Address for HTTP (OpenAI API, status page, /metrics) and gRPC alike.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name clients use for the model (default: the file name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Generations running at once; further requests wait.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Requests allowed to wait for a slot; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// Seconds a request may wait for a slot before it is refused with 429.
    #[arg(long, default_value_t = 60)]
    pub queue_timeout: u64,
    /// Seconds one generation may take before it fails with 504.
    #[arg(long, default_value_t = 600)]
    pub generation_timeout: u64,
    /// `max_tokens` of chat requests that do not say (completions default to 16, as OpenAI).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
}

pub fn run(args: ServeApiArgs) -> anyhow::Result<()> {
    if !args.swarm.is_set() {
        bail!("say where the swarm is: --bootstrap MULTIADDR (or --mdns)");
    }
    let rt = super::runtime()?;
    rt.block_on(async {
        let shutdown = super::shutdown_on_signal();
        let model = open_client_model(&args.model)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let client = SwarmClient::connect(args.swarm.client_config()).await?;
        let config = GatewayConfig {
            default_max_tokens: args.default_max_tokens.max(1),
            max_concurrent: args.max_concurrent.max(1),
            max_waiting: args.max_waiting,
            queue_timeout: Duration::from_secs(args.queue_timeout),
            generation_timeout: Duration::from_secs(args.generation_timeout.max(1)),
            ..GatewayConfig::default()
        };
        let id = args
            .model_id
            .clone()
            .unwrap_or_else(|| ModelInfo::id_of(&args.model));
        let gw = Gateway::start(client, model, id.clone(), config, shutdown.clone());
        let addr = listener.local_addr()?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "serving the API on http://{addr}")?;
            out.flush()?;
        }
        tracing::info!(
            "model `{id}`: OpenAI API at http://{addr}/v1, gRPC at {addr}, status page at http://{addr}/"
        );
        swarm::page::serve(listener, gw.router(shutdown.clone()), shutdown).await?;
        anyhow::Ok(())
    })
}
