//! `edge-node status`: the swarm's view of one model, as a table in the terminal. The same
//! snapshot feeds the status pages and the gRPC `SwarmStatus` call.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use coordinator::{ClientConfig, ClientModel, SwarmClient};
use swarm::status::{self, ModelInfo};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A peer of the swarm (repeatable); `/p2p/<peer id>` may be left out.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", required = true)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// The model file whose servers to list (its fingerprint selects them).
    #[arg(long)]
    pub model: PathBuf,
    /// Key file of a private swarm: the one its nodes were started with.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let info = ModelInfo::new(
        ModelInfo::id_of(&args.model),
        &model.fingerprint,
        &model.spec,
    );
    let swarm_key = args
        .swarm_key
        .as_deref()
        .map(swarm::swarm_key::load)
        .transpose()?;
    let view = super::runtime()?.block_on(async {
        let client = SwarmClient::connect(ClientConfig {
            bootstrap: args.bootstrap.clone(),
            discovery_timeout: Duration::from_secs(10),
            swarm_key,
            ..ClientConfig::default()
        })
        .await?;
        let view = status::snapshot(client.net(), &model.fingerprint, info).await;
        client.close().await;
        anyhow::Ok(view?)
    })?;
    let blocks = view.model.block_count;
    println!(
        "model {} ({blocks} blocks): {} server(s)",
        model.short_id(),
        view.peers.len()
    );
    println!(
        "{:<54} {:>8} {:>9} {:>9} {:>9} {:>11} {:>9} {:>7}  coverage",
        "peer", "blocks", "state", "ms/block", "RTT ms", "free cache", "sessions", "waiting"
    );
    for p in &view.peers {
        let bar: String = (0..blocks)
            .map(|b| match (b >= p.start_block && b < p.end_block, p.state) {
                (false, _) => '.',
                (true, "online") => '#',
                (true, _) => '-',
            })
            .collect();
        let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}"));
        // What load-aware clients price the peer at; an older node says nothing of its limit.
        let sessions = match p.max_sessions {
            0 => p.sessions.to_string(),
            max => format!("{}/{max}", p.sessions),
        };
        println!(
            "{:<54} {:>8} {:>9} {:>9.3} {:>9} {:>11} {:>9} {:>7}  {bar}",
            p.peer_id,
            format!("{}..{}", p.start_block, p.end_block),
            // Announced online, but a client could not reach it since (see `swarm::offline`).
            if p.reported_offline && p.state == "online" {
                "unreached"
            } else {
                p.state
            },
            p.decode_ms_per_block,
            rtt,
            p.free_cache_tokens,
            sessions,
            p.waiting_steps,
        );
    }
    let per_block: String = view
        .servers_per_block
        .iter()
        .map(|&n| std::char::from_digit(n.min(9), 10).unwrap_or('9'))
        .collect();
    println!("{:<123}  {per_block}", "servers per block");
    match &view.first_gap {
        Some(gap) => println!(
            "not covered: blocks {}..{} have no online server",
            gap.start, gap.end
        ),
        None => println!("every block is served"),
    }
    Ok(())
}
