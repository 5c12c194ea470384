//! `edge-node bench --swarm --fairness TOKENS`: what one user's long prompt does to another
//! user's generation. Client B decodes alone, then again while client A (another peer) sends a
//! prompt of TOKENS tokens through the same nodes; B's per-token latency in both phases, and A's
//! prefill time, are reported from the same run. Nodes cut A's prompt into chunks with B's
//! decode steps batched in between, so B should slow down by about one chunk per node, not
//! stop for the whole prompt.

use std::time::Instant;

use coordinator::generate::sample::argmax;
use coordinator::session::InferenceSession;
use coordinator::ClientModel;

use super::args::BenchArgs;
use super::measure::{median, prompt_of};
use super::procs::{connect, spawn_swarm};
use crate::cmd::runtime;

/// B's decode steps, one greedy token each, timed as its user sees them (embedding, the route,
/// the head); stops after `steps` or, with `until`, when `until` has finished.
async fn decode(
    model: &ClientModel,
    session: &mut InferenceSession,
    mut next: u32,
    mut pos: usize,
    steps: usize,
    until: Option<&tokio::task::JoinHandle<anyhow::Result<f64>>>,
) -> anyhow::Result<(Vec<f64>, u32, usize)> {
    let mut times = Vec::new();
    while times.len() < steps && until.is_none_or(|t| !t.is_finished()) {
        let t = Instant::now();
        let y = session
            .run_blocks(model.embedding.embed(&[next])?, pos as u32)
            .await?;
        next = argmax(model.head.last_logits(&y)?.iter().copied());
        times.push(t.elapsed().as_secs_f64() * 1e3);
        pos += 1;
    }
    Ok((times, next, pos))
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
    // B's budget: its solo steps, then as many as A's prompt may take.
    let b_max = (short.len() + 8 * args.gen_tokens + 4096).min(spec.context_length);
    let report = rt.block_on(async {
        // Two clients, so the nodes see two peers.
        let (client_a, client_b) = (connect(&boot).await?, connect(&boot).await?);
        let mut b = client_b.open_session(&model, b_max as u32).await?;
        let y = b.run_blocks(model.embedding.embed(&short)?, 0).await?;
        let next = argmax(model.head.last_logits(&y)?.iter().copied());
        let (solo, next, pos) =
            decode(&model, &mut b, next, short.len(), args.gen_tokens, None).await?;

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
        let room = b_max - pos;
        let (during, _, _) = decode(&model, &mut b, next, pos, room, Some(&prefill)).await?;
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
