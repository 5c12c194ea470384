//! `edge-node bench --local`: end-to-end speed and memory of this machine's engine.
//!
//! It runs exactly the code path of `generate` (embedding, every block, head, greedy pick) on a
//! fixed prompt of a chosen length, and never stops early at an end token, so runs are
//! comparable with llama.cpp's on the same file (see scripts/llama_cpp_bench.py).

use std::ops::Range;

use anyhow::{bail, Context};
use model::kernels::cpu;
use model::{GgufFile, LoadOptions};
use node::compute::measure_speed;

use super::args::BenchArgs;
use super::measure::{median, prompt_of, time_local};
use crate::cmd::open_local;
use crate::rss;

pub fn bench_full(args: &BenchArgs, threads: usize) -> anyhow::Result<serde_json::Value> {
    let model = open_local(&args.model)?;
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
pub fn bench_slice(
    args: &BenchArgs,
    threads: usize,
    range: Range<usize>,
) -> anyhow::Result<serde_json::Value> {
    let file = GgufFile::open(&args.model)?;
    let (bar, mut progress) =
        node::progress::loading_bar(&format!("blocks {}..{}", range.start, range.end));
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
