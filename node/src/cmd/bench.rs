//! `edge-node bench --local`: end-to-end speed and memory of this machine's engine.
//!
//! It runs exactly the code path of `generate` (embedding, every block, head, greedy pick) on a
//! fixed prompt of a chosen length, and never stops early at an end token, so runs are
//! comparable with llama.cpp's on the same file (see scripts/llama_cpp_bench.py).

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use coordinator::generate::sample::argmax;
use edge_node::compute::measure_speed;
use model::kernels::cpu;
use model::{GgufFile, LoadOptions};

use crate::rss;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Benchmark this process alone.
    #[arg(long, conflicts_with = "swarm")]
    pub local: bool,
    /// Benchmark a swarm of real processes on 127.0.0.1 against the local run, in one run.
    #[arg(long)]
    pub swarm: bool,
    /// Nodes of the benchmark swarm; the blocks are split evenly between them.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// With --swarm: measure recovery instead, killing a node after this many positions of
    /// history (e.g. 100).
    #[arg(long)]
    pub recovery: Option<usize>,
    /// With --swarm: measure the OpenAI-compatible gateway (`serve-api`) against the client
    /// library on the same swarm, and CLIENTS concurrent streams against one.
    #[arg(long, value_name = "CLIENTS", conflicts_with = "recovery")]
    pub api: Option<usize>,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// The median of this many runs is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Load only these blocks (e.g. 0..10) and time them alone: what one peer holds and costs.
    #[arg(long, value_parser = parse_block_range)]
    pub blocks: Option<Range<usize>>,
    #[arg(long)]
    pub json: bool,
}

pub fn parse_block_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a block range like 0..10"))?;
    let start = a
        .trim()
        .parse()
        .map_err(|_| format!("bad range start in `{s}`"))?;
    let end = b
        .trim()
        .parse()
        .map_err(|_| format!("bad range end in `{s}`"))?;
    if start >= end {
        return Err(format!("block range `{s}` is empty"));
    }
    Ok(start..end)
}

const TEXT: &str = "The history of computing is a story of people finding ways to make machines \
do arithmetic faster and more reliably. Early mechanical calculators gave way to relays, then \
vacuum tubes, transistors and integrated circuits. Each step made computers smaller and cheaper, \
until a phone in a pocket held more power than the rooms of machines that sent people to the moon. ";

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

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.local && !args.swarm {
        bail!("say what to benchmark: --local, or --swarm (a 127.0.0.1 swarm against local)");
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeats must be at least 1");
    }
    let threads = super::init_threads(args.threads)?;
    let report = match args.blocks.clone() {
        _ if args.swarm => match (args.recovery, args.api) {
            (Some(history), _) => super::bench_swarm::recovery(&args, threads, history.max(2))?,
            (None, Some(clients)) => super::bench_swarm::api(&args, threads, args.nodes, clients)?,
            (None, None) => super::bench_swarm::run(&args, threads, args.nodes)?,
        },
        None => bench_full(&args, threads)?,
        Some(range) => bench_slice(&args, threads, range)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn bench_full(args: &BenchArgs, threads: usize) -> anyhow::Result<serde_json::Value> {
    let model = super::open_local(&args.model)?;
    let spec = model.spec().clone();
    let prompt = prompt_of(&model.tokenizer, args.prompt_tokens)?;
    let capacity = args.prompt_tokens + args.gen_tokens;
    if capacity > spec.context_length {
        bail!(
            "prompt + generated tokens exceed the context of {}",
            spec.context_length
        );
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One untimed warm-up run so page faults and lazy thread start-up are not measured.
    for run in 0..=args.repeats {
        let (t_prefill, t_decode) = time_local(&model, &prompt, args.gen_tokens)?;
        if run > 0 {
            prefill.push(args.prompt_tokens as f64 / t_prefill.as_secs_f64());
            decode.push(args.gen_tokens as f64 / t_decode.as_secs_f64());
        }
    }
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "local",
        "model": spec.name,
        "threads": threads,
        "kernels": cpu::selected().name(),
        "cpu": cpu::cpu_model(),
        "cpu_flags": cpu::cpu_flags().join(" "),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "prefill_tokens_per_s": median(prefill),
        "decode_tokens_per_s": median(decode),
        "weights_mib": rss::mib(model.slice.weight_bytes() as u64),
        "peak_rss_mib": rss::peak_rss_bytes().map(rss::mib),
    }))
}

/// Loads only `range` and runs synthetic hidden states through it, to show what one peer's
/// slice costs in memory and time per block.
fn bench_slice(
    args: &BenchArgs,
    threads: usize,
    range: Range<usize>,
) -> anyhow::Result<serde_json::Value> {
    let file = GgufFile::open(&args.model)?;
    let (bar, mut progress) =
        edge_node::progress::loading_bar(&format!("blocks {}..{}", range.start, range.end));
    let slice = model::load(&file, &LoadOptions::blocks(range.clone()), &mut progress);
    bar.finish_and_clear();
    let slice = slice?;
    let stack = slice.stack().context("no blocks loaded")?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One untimed warm-up run, as in the full benchmark.
    for run in 0..=args.repeats {
        let (d, p) = measure_speed(stack, args.prompt_tokens, args.gen_tokens)?;
        if run > 0 {
            decode.push(d);
            prefill.push(p);
        }
    }
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "slice",
        "blocks": format!("{}..{}", range.start, range.end),
        "threads": threads,
        "kernels": cpu::selected().name(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_ms_per_block": median(prefill),
        "decode_ms_per_block": median(decode),
        "weights_mib": rss::mib(slice.weight_bytes() as u64),
        "peak_rss_mib": rss::peak_rss_bytes().map(rss::mib),
    }))
}
