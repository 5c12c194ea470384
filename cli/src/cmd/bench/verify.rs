//! `edge-node bench --swarm --verify-every N`: what checking peers' outputs costs. Two nodes
//! each serve every block (one to generate through, one to check it); the same greedy
//! generation runs through them with verification off and on, alternating in one run, so both
//! see the same machine. The texts must be identical.

use std::time::Instant;

use anyhow::ensure;
use coordinator::generate::{self, GenerateOptions, SamplingOptions};
use coordinator::session::VerifyPolicy;
use coordinator::{ClientConfig, ClientModel, SwarmBackend, SwarmClient};

use super::args::BenchArgs;
use super::measure::{median, prompt_of};
use super::procs::{spawn_bootstrap, spawn_node};
use crate::cmd::{open_local, runtime};

pub fn run(args: &BenchArgs, threads: usize, every: usize) -> anyhow::Result<serde_json::Value> {
    let model_path = args.model.to_string_lossy().into_owned();
    let spec = open_local(&args.model)?.spec().clone();
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let prompt = prompt_of(&client_model.tokenizer, args.prompt_tokens)?;
    let boot = spawn_bootstrap()?;
    let _nodes = [
        spawn_node(&model_path, 0..spec.block_count, &boot, threads)?,
        spawn_node(&model_path, 0..spec.block_count, &boot, threads)?,
    ];
    let rt = runtime()?;
    let connect = |verify: VerifyPolicy| {
        rt.block_on(SwarmClient::connect(ClientConfig {
            bootstrap: vec![boot.addr.parse()?],
            discovery_timeout: std::time::Duration::from_secs(60),
            verify,
            ..ClientConfig::default()
        }))
        .map_err(anyhow::Error::from)
    };
    let plain = connect(VerifyPolicy::OFF)?;
    let checked = connect(VerifyPolicy::every(every))?;
    let opts = GenerateOptions {
        max_new_tokens: args.gen_tokens,
        sampling: SamplingOptions::greedy(),
        // The same number of tokens in every run, whatever the text.
        stop_at_eos: false,
        stop: Vec::new(),
    };
    let max_len = (prompt.len() + args.gen_tokens) as u32;
    let generate = |client: &SwarmClient| {
        rt.block_on(async {
            let session = client.open_session(&client_model, max_len).await?;
            let mut backend = SwarmBackend {
                model: &client_model,
                session,
            };
            let t = Instant::now();
            let g = generate::generate(
                &mut backend,
                &client_model.tokenizer,
                prompt.clone(),
                spec.context_length,
                &opts,
                &mut |_| {},
            )
            .await?;
            let total = t.elapsed().as_secs_f64();
            backend.session.close().await;
            anyhow::Ok((g, total))
        })
    };
    let (mut off_tps, mut on_tps, mut off_total, mut on_total) = (vec![], vec![], vec![], vec![]);
    for run in 0..=args.repeats {
        let (a, a_total) = generate(&plain)?;
        let (b, b_total) = generate(&checked)?;
        ensure!(a.tokens == b.tokens, "verification changed the tokens");
        // The first run of each warms connections and caches.
        if run > 0 {
            off_tps.push(a.decode_tokens_per_s());
            on_tps.push(b.decode_tokens_per_s());
            off_total.push(a_total);
            on_total.push(b_total);
        }
    }
    let (off, on) = (median(off_tps), median(on_tps));
    let (off_s, on_s) = (median(off_total), median(on_total));
    rt.block_on(async {
        plain.close().await;
        checked.close().await;
    });
    Ok(serde_json::json!({
        "bench": "verification",
        "model": model_path,
        "threads_per_node": threads,
        "prompt_tokens": prompt.len(),
        "gen_tokens": args.gen_tokens,
        "verify_every": every,
        "decode_tokens_per_s_off": off,
        "decode_tokens_per_s_on": on,
        "generation_s_off": off_s,
        "generation_s_on": on_s,
        "slowdown": on_s / off_s - 1.0,
    }))
}
