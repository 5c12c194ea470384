//! `edge-node status`: the swarm's view of one model, as a table in the terminal.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use coordinator::{ClientConfig, ClientModel, SwarmClient};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A peer of the swarm (repeatable); `/p2p/<peer id>` may be left out.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", required = true)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// The model file whose servers to list (its fingerprint selects them).
    #[arg(long)]
    pub model: PathBuf,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let blocks = model.spec.block_count;
    let rt = super::runtime()?;
    let servers = rt.block_on(async {
        let client = SwarmClient::connect(ClientConfig {
            bootstrap: args.bootstrap.clone(),
            discovery_timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        })
        .await?;
        anyhow::Ok(client.servers(&model).await?)
    })?;
    println!(
        "model {} ({blocks} blocks): {} server(s)",
        model.short_id(),
        servers.len()
    );
    println!(
        "{:<54} {:>8} {:>8} {:>11} {:>12}  coverage",
        "peer", "blocks", "state", "ms/block", "free cache"
    );
    let mut served = vec![0usize; blocks];
    for s in &servers {
        let online = s.state == proto::v1::ServerState::Online;
        let bar: String = (0..blocks as u32)
            .map(|b| {
                if s.blocks.contains(&b) {
                    if online {
                        '#'
                    } else {
                        '-'
                    }
                } else {
                    '.'
                }
            })
            .collect();
        if online {
            for b in s.blocks.clone() {
                served[b as usize] += 1;
            }
        }
        println!(
            "{:<54} {:>8} {:>8} {:>11.3} {:>12}  {bar}",
            s.peer.to_string(),
            format!("{}..{}", s.blocks.start, s.blocks.end),
            format!("{:?}", s.state).to_lowercase(),
            s.decode_ms_per_block,
            s.free_cache_tokens,
        );
    }
    let per_block: String = served
        .iter()
        .map(|&n| std::char::from_digit(n.min(9) as u32, 10).unwrap_or('9'))
        .collect();
    println!(
        "{:<54} {:>8} {:>8} {:>11} {:>12}  {per_block}",
        "servers per block", "", "", "", ""
    );
    match served.iter().position(|&n| n == 0) {
        Some(first) => {
            let end = served[first..]
                .iter()
                .position(|&n| n > 0)
                .map_or(blocks, |k| first + k);
            println!("not covered: blocks {first}..{end} have no online server");
        }
        None => println!("every block is served"),
    }
    Ok(())
}
