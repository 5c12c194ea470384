//! `edge-node bench --bootstrap ADDR`: time a swarm that already runs elsewhere (containers,
//! other machines) through the client library: time to first token of a fixed prompt and the
//! per-token decode latency, the median of repeats. Unlike `--swarm` it starts nothing and
//! holds no blocks itself, so it also works for a model this machine's client could never
//! load whole: only the embeddings and head are opened.

use std::time::Instant;

use coordinator::generate::sample::argmax;
use coordinator::{ClientConfig, ClientModel, SwarmClient};

use super::args::BenchArgs;
use super::measure::{median, prompt_of};
use crate::cmd::runtime;

pub fn run(args: &BenchArgs, bootstrap: &[libp2p::Multiaddr]) -> anyhow::Result<serde_json::Value> {
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let prompt = prompt_of(&client_model.tokenizer, args.prompt_tokens)?;
    let max_len = (args.prompt_tokens + args.gen_tokens) as u32;
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
        let (first, steps) = rt.block_on(async {
            let mut session = client.open_session(&client_model, max_len).await?;
            route = session.route();
            let t = Instant::now();
            let x = client_model.embedding.embed(&prompt)?;
            let y = session.run_blocks(x, 0).await?;
            let mut next = argmax(client_model.head.last_logits(&y)?.iter().copied());
            let first = t.elapsed();
            let t = Instant::now();
            for i in 0..args.gen_tokens {
                let x = client_model.embedding.embed(&[next])?;
                let y = session.run_blocks(x, (prompt.len() + i) as u32).await?;
                next = argmax(client_model.head.last_logits(&y)?.iter().copied());
            }
            let steps = t.elapsed();
            session.close().await;
            anyhow::Ok((first, steps))
        })?;
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
