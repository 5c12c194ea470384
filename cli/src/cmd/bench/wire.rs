//! `edge-node bench --local --wire-agreement`: what each wire dtype of hidden states costs in
//! agreement with f32, with the model split into `--nodes` spans as a swarm would split it.
//!
//! Every span boundary goes through the real wire encoding ([`proto::encode_tensor`] then
//! [`proto::decode_tensor`]): the client's embeddings into the first span, each span's output
//! into the next, the last into the head. That is what a swarm does, in one process, so it
//! measures the numbers and not the network. For each prompt the f32 greedy continuation of
//! `--gen-tokens` tokens is the reference; each dtype then reads the same tokens
//! (teacher-forced) and is scored on the share of positions where its greedy pick is the
//! reference token and on the mean absolute difference of the reference token's log-prob;
//! it also generates freely, and the length of the prefix identical to the reference is given.

use std::ops::Range;

use anyhow::bail;
use model::{BlockStack, Hidden, LocalModel, SessionKv};
use proto::v1::Dtype;
use proto::{decode_tensor, encode_tensor, hidden_limits};
use serde_json::{json, Value};

use super::args::BenchArgs;
use crate::cmd::open_local;

const PROMPTS: [&str; 4] = [
    "The history of the printing press begins",
    "def quicksort(items):",
    "Here is a recipe for a simple tomato soup:",
    "Photosynthesis is the process by which",
];

const DTYPES: [Dtype; 4] = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8Row];

/// The model cut into spans, each with its own cache, hidden states crossing every boundary in
/// one wire dtype.
struct Pipeline<'a> {
    stack: &'a BlockStack,
    spans: Vec<(Range<usize>, SessionKv)>,
    dtype: Dtype,
}

impl<'a> Pipeline<'a> {
    fn new(stack: &'a BlockStack, spans: &[Range<usize>], capacity: usize, dtype: Dtype) -> Self {
        Self {
            stack,
            spans: spans
                .iter()
                .map(|r| (r.clone(), stack.new_cache(r.clone(), capacity)))
                .collect(),
            dtype,
        }
    }

    fn run(&mut self, x: Hidden, pos: usize) -> anyhow::Result<Hidden> {
        let mut x = wire(self.dtype, &x)?;
        for (span, kv) in &mut self.spans {
            self.stack.forward_span(span.clone(), &mut x, kv, pos)?;
            x = wire(self.dtype, &x)?;
        }
        Ok(x)
    }
}

/// `x` as it arrives after crossing the wire in `dtype`.
fn wire(dtype: Dtype, x: &Hidden) -> anyhow::Result<Hidden> {
    let t = encode_tensor(&x.data, &[x.tokens, x.dim], dtype);
    let d = decode_tensor(&t, &hidden_limits(x.tokens, x.dim))?;
    Ok(Hidden::new(x.tokens, x.dim, d.values)?)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

fn log_prob(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[token] as f64 - max - sum.ln()
}

/// Greedy generation of `n` tokens after `prompt` through a pipeline of `dtype`.
fn greedy(
    model: &LocalModel,
    spans: &[Range<usize>],
    prompt: &[u32],
    n: usize,
    dtype: Dtype,
) -> anyhow::Result<Vec<u32>> {
    let (stack, embed, head) = (
        model.slice.stack()?,
        model.slice.embedding()?,
        model.slice.head()?,
    );
    let mut p = Pipeline::new(stack, spans, prompt.len() + n, dtype);
    let mut y = p.run(embed.embed(prompt)?, 0)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = argmax(&head.last_logits(&y)?) as u32;
        out.push(t);
        if i + 1 < n {
            y = p.run(embed.embed(&[t])?, prompt.len() + i)?;
        }
    }
    Ok(out)
}

/// Log-softmax of the next token at each of the last `n` positions of `seq` (all of which
/// are read in one pass), through a pipeline of `dtype`: the picks and the log-probs of `want`.
fn teacher_forced(
    model: &LocalModel,
    spans: &[Range<usize>],
    seq: &[u32],
    want: &[u32],
    dtype: Dtype,
) -> anyhow::Result<(Vec<usize>, Vec<f64>)> {
    let (stack, embed, head) = (
        model.slice.stack()?,
        model.slice.embedding()?,
        model.slice.head()?,
    );
    let mut p = Pipeline::new(stack, spans, seq.len(), dtype);
    let y = p.run(embed.embed(seq)?, 0)?;
    let n = want.len();
    let logits = head.logits(&y.tail(n))?;
    let vocab = logits.len() / n;
    let mut picks = Vec::with_capacity(n);
    let mut lps = Vec::with_capacity(n);
    for (row, &w) in logits.chunks(vocab).zip(want) {
        picks.push(argmax(row));
        lps.push(log_prob(row, w as usize));
    }
    Ok((picks, lps))
}

pub fn run(args: &BenchArgs, threads: usize) -> anyhow::Result<Value> {
    let model = open_local(&args.model)?;
    let spec = model.spec().clone();
    let nodes = args.nodes.clamp(1, spec.block_count);
    let spans: Vec<Range<usize>> = (0..nodes)
        .map(|i| i * spec.block_count / nodes..(i + 1) * spec.block_count / nodes)
        .collect();
    let n = args.gen_tokens;
    let mut per_dtype: Vec<(usize, usize, f64, usize)> = vec![(0, 0, 0.0, 0); DTYPES.len()];
    let mut prompts = Vec::new();
    for text in PROMPTS {
        let mut prompt = vec![model.tokenizer.bos_id()];
        prompt.extend(model.tokenizer.encode(text, false)?);
        if prompt.len() + n > spec.context_length {
            bail!(
                "prompt + generated tokens exceed the context of {}",
                spec.context_length
            );
        }
        let reference = greedy(&model, &spans, &prompt, n, Dtype::F32)?;
        // Inputs of the teacher-forced pass: the prompt and all but the last reference token;
        // its last n positions predict the n reference tokens.
        let mut seq = prompt.clone();
        seq.extend(&reference[..n - 1]);
        let (_, ref_lp) = teacher_forced(&model, &spans, &seq, &reference, Dtype::F32)?;
        let mut rows = Vec::new();
        for (k, &dtype) in DTYPES.iter().enumerate() {
            let (picks, lp) = teacher_forced(&model, &spans, &seq, &reference, dtype)?;
            let same = picks
                .iter()
                .zip(&reference)
                .filter(|(p, r)| **p == **r as usize)
                .count();
            let diff: f64 = lp.iter().zip(&ref_lp).map(|(a, b)| (a - b).abs()).sum();
            let free = greedy(&model, &spans, &prompt, n, dtype)?;
            let prefix = free
                .iter()
                .zip(&reference)
                .take_while(|(a, b)| a == b)
                .count();
            let acc = &mut per_dtype[k];
            acc.0 += same;
            acc.1 += n;
            acc.2 += diff;
            acc.3 += prefix;
            rows.push(json!({
                "dtype": dtype.as_str_name(),
                "same_greedy_token_share": same as f64 / n as f64,
                "mean_abs_logprob_diff": diff / n as f64,
                "free_run_identical_prefix": prefix,
            }));
        }
        prompts.push(json!({ "prompt": text, "dtypes": rows }));
    }
    let dim = spec.embedding_length;
    let summary: Vec<Value> = DTYPES
        .iter()
        .zip(&per_dtype)
        .map(|(dtype, (same, total, diff, prefix))| {
            let bytes = encode_tensor(&vec![0.0; dim], &[1, dim], *dtype).data.len();
            json!({
                "dtype": dtype.as_str_name(),
                "bytes_per_row": bytes,
                "same_greedy_token_share": *same as f64 / *total as f64,
                "mean_abs_logprob_diff": diff / *total as f64,
                "mean_free_run_identical_prefix": *prefix as f64 / PROMPTS.len() as f64,
            })
        })
        .collect();
    Ok(json!({
        "mode": "wire-agreement",
        "model": spec.name,
        "threads": threads,
        "spans": spans.iter().map(|r| format!("{}..{}", r.start, r.end)).collect::<Vec<_>>(),
        "gen_tokens": n,
        "summary": summary,
        "prompts": prompts,
    }))
}
