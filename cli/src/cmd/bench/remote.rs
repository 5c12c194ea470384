//! `edge-node bench --bootstrap ADDR`: time a swarm that already runs elsewhere (containers,
//! other machines) through the client library: time to first token of a fixed prompt and the
//! per-token decode latency, the median of repeats. Unlike `--swarm` it starts nothing and
//! holds no blocks itself, so it also works for a model this machine's client could never
//! load whole: only the embeddings and head are opened.

use coordinator::{ClientConfig, ClientModel, SwarmClient};

use super::args::BenchArgs;
use super::measure::{median, prompt_of, time_swarm};
use crate::cmd::runtime;

pub fn run(args: &BenchArgs, bootstrap: &[libp2p::Multiaddr]) -> anyhow::Result<serde_json::Value> {
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let prompt = prompt_of(&client_model.tokenizer, args.prompt_tokens)?;
    let rt = runtime()?;
    let client = rt.block_on(SwarmClient::connect(ClientConfig {
        bootstrap: bootstrap.to_vec(),
        discovery_timeout: std::time::Duration::from_secs(60),
        ..ClientConfig::default()
    }))?;
    let (mut ttft, mut step) = (Vec::new(), Vec::new());
    let mut route = Vec::new();
    // One untimed warm-up run first: connections, first page faults, allocator.
    for run in 0..=args.repeats {
        let (first, steps, hops) =
            rt.block_on(time_swarm(&client, &client_model, &prompt, args.gen_tokens))?;
        route = hops;
        if run > 0 {
            ttft.push(first.as_secs_f64() * 1e3);
            step.push(steps.as_secs_f64() * 1e3 / args.gen_tokens as f64);
        }
    }
    drop(client);
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "remote-swarm",
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "time_to_first_token_ms": median(ttft),
        "decode_ms_per_token": median(step),
        "route": route,
    }))
}
