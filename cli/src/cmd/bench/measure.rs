//! What both benchmarks time and how they summarise it: the same fixed prompt, the same local
//! run (the reference the swarm is compared against), the median of repeats.

use std::time::Instant;

use coordinator::generate::sample::argmax;

const TEXT: &str = "The history of computing is a story of people finding ways to make machines \
do arithmetic faster and more reliably. Early mechanical calculators gave way to relays, then \
vacuum tubes, transistors and integrated circuits. Each step made computers smaller and cheaper, \
until a phone in a pocket held more power than the rooms of machines that sent people to the moon. ";

/// One swarm run through `client`: the prompt's prefill (up to its first token's logits), then
/// `steps` greedy decode steps; their durations and the route taken.
pub async fn time_swarm(
    client: &coordinator::SwarmClient,
    model: &coordinator::ClientModel,
    prompt: &[u32],
    steps: usize,
) -> anyhow::Result<(
    std::time::Duration,
    std::time::Duration,
    Vec<coordinator::session::RouteHop>,
)> {
    let mut session = client
        .open_session(model, (prompt.len() + steps) as u32)
        .await?;
    let route = session.route();
    let t = Instant::now();
    let x = model.embedding.embed(prompt)?;
    let y = session.run_blocks(x, 0).await?;
    let logits = model.head.last_logits(&y)?;
    let prefill = t.elapsed();
    let mut next = argmax(logits.iter().copied());
    let t = Instant::now();
    for i in 0..steps {
        let x = model.embedding.embed(&[next])?;
        let y = session.run_blocks(x, (prompt.len() + i) as u32).await?;
        next = argmax(model.head.last_logits(&y)?.iter().copied());
    }
    let decode = t.elapsed();
    session.close().await;
    Ok((prefill, decode, route))
}

/// One local run: the prompt's prefill, then `steps` greedy decode steps; their durations.
pub fn time_local(
    model: &model::LocalModel,
    prompt: &[u32],
    steps: usize,
) -> anyhow::Result<(std::time::Duration, std::time::Duration)> {
    let mut kv = model.new_cache(prompt.len() + steps)?;
    let t = Instant::now();
    let logits = model.forward(prompt, &mut kv, 0)?;
    let prefill = t.elapsed();
    let mut next = argmax(logits.iter().copied());
    let t = Instant::now();
    for i in 0..steps {
        let logits = model.forward(&[next], &mut kv, prompt.len() + i)?;
        next = argmax(logits.iter().copied());
    }
    Ok((prefill, t.elapsed()))
}

/// A fixed English prompt of exactly `n` tokens.
pub fn prompt_of(tokenizer: &model::tokenizer::Tokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut prompt = Vec::new();
    while prompt.len() < n {
        prompt.extend(tokenizer.encode(TEXT, false)?);
    }
    prompt.truncate(n);
    Ok(prompt)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
