//! `edge-node bench --swarm --fairness TOKENS`: what one user's long prompt does to another
//! user's generation. Client B decodes alone, then again while client A (another peer) sends a
//! prompt of TOKENS tokens through the same nodes; B's per-token latency in both phases, and A's
//! prefill time, are reported from the same run. Nodes cut A's prompt into chunks with B's
//! decode steps batched in between, so B should slow down by about one chunk per node, not
//! stop for the whole prompt.
//!
//! While A's prompt runs, B replays its solo steps (the same tokens at the same positions, over
//! and over): a step at a position the node holds rolls its cache back, so B's context, and
//! what its own step costs, stay what they were alone. Generating on instead, B would make
//! thousands of steps during a long prompt and its own attention over that growing context
//! would be counted as A's doing.

use std::time::Instant;

use coordinator::generate::sample::argmax;
use coordinator::session::InferenceSession;
use coordinator::ClientModel;

use super::args::BenchArgs;
use super::measure::{median, prompt_of};
use super::procs::{connect, spawn_swarm};
use crate::cmd::runtime;

/// Most steps B replays during A's prompt: A's end stops it long before.
const MAX_REPLAYED_STEPS: usize = 1_000_000;

/// One decode step of B, timed as its user sees it (embedding, the route, the head); the
/// greedy next token.
async fn step(
    model: &ClientModel,
    session: &mut InferenceSession,
    token: u32,
    pos: usize,
    times: &mut Vec<f64>,
) -> anyhow::Result<u32> {
    let t = Instant::now();
    let y = session
        .run_blocks(model.embedding.embed(&[token])?, pos as u32)
        .await?;
    let next = argmax(model.head.last_logits(&y)?.iter().copied());
    times.push(t.elapsed().as_secs_f64() * 1e3);
    Ok(next)
}

pub fn run(
    args: &BenchArgs,
    threads: usize,
    nodes: usize,
    long: usize,
) -> anyhow::Result<serde_json::Value> {
    let model_path = args.model.to_string_lossy().into_owned();
    let model = std::sync::Arc::new(ClientModel::open(&args.model, &mut |_, _| {})?);
    let spec = model.spec.clone();
    anyhow::ensure!(
        long < spec.context_length,
        "--fairness {long} does not fit the model's context of {}",
        spec.context_length
    );
    let (boot, _peers) = spawn_swarm(&model_path, spec.block_count, nodes, threads)?;
    let rt = runtime()?;
    let short = prompt_of(&model.tokenizer, args.prompt_tokens)?;
    let long_ids = prompt_of(&model.tokenizer, long)?;
    // B's budget: its prompt and solo steps (replayed at the same positions after).
    let b_max = (short.len() + args.gen_tokens).min(spec.context_length);
    let report = rt.block_on(async {
        // Two clients, so the nodes see two peers.
        let (client_a, client_b) = (connect(&boot).await?, connect(&boot).await?);
        let mut b = client_b.open_session(&model, b_max as u32).await?;
        let y = b.run_blocks(model.embedding.embed(&short)?, 0).await?;
        let mut next = argmax(model.head.last_logits(&y)?.iter().copied());
        let mut solo = Vec::new();
        let mut fed = Vec::new();
        for pos in short.len()..b_max {
            fed.push((next, pos));
            next = step(&model, &mut b, next, pos, &mut solo).await?;
        }

        let mut a = client_a.open_session(&model, (long + 1) as u32).await?;
        let x = model.embedding.embed(&long_ids)?;
        let a_model = model.clone();
        let prefill = tokio::spawn(async move {
            let t = Instant::now();
            let y = a.run_blocks(x, 0).await?;
            a_model.head.last_logits(&y)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            a.close().await;
            anyhow::Ok(ms)
        });
        let mut during = Vec::new();
        for &(token, pos) in fed.iter().cycle().take(MAX_REPLAYED_STEPS) {
            if prefill.is_finished() {
                break;
            }
            step(&model, &mut b, token, pos, &mut during).await?;
        }
        let prefill_ms = prefill.await??;
        b.close().await;
        client_a.close().await;
        client_b.close().await;
        anyhow::ensure!(!during.is_empty(), "B made no step while A's prompt ran");
        let (solo_ms, during_ms) = (median(solo.clone()), median(during.clone()));
        let worst = during.iter().copied().fold(0.0, f64::max);
        anyhow::Ok(serde_json::json!({
            "engine": "edge-swarm",
            "mode": "fairness",
            "nodes": nodes,
            "threads": threads,
            "long_prompt_tokens": long,
            "a_prefill_ms": prefill_ms,
            "b_solo_ms_per_token": solo_ms,
            "b_during_prefill_ms_per_token": during_ms,
            "b_during_prefill_worst_ms": worst,
            "b_steps_during_prefill": during.len(),
            "b_latency_ratio": during_ms / solo_ms,
        }))
    })?;
    Ok(report)
}
