//! `edge-node bench --swarm`: the same prompt and decode steps through a swarm of real
//! processes on 127.0.0.1 and through one local process, in the same run, so the cost of the
//! network hops is measured rather than guessed. Each node's peak RSS is read from
//! `/proc/<pid>/status` next to the weight bytes of its slice.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::generate::sample::argmax;
use coordinator::ClientModel;
use model::GgufFile;

use super::args::BenchArgs;
use super::measure::{median, prompt_of, time_local, time_swarm};
use super::procs::{connect, peak_rss_mib, spawn_bootstrap, spawn_node, spawn_swarm, spawn_until};
use crate::cmd::{open_local, runtime};

/// Bytes of the block tensors in `range`, straight from the file's tensor table.
fn slice_weight_mib(file: &GgufFile, range: &Range<usize>) -> anyhow::Result<f64> {
    let mut bytes = 0usize;
    for view in file.tensors()? {
        let block = view
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if block.is_some_and(|b| range.contains(&b)) {
            bytes += view.len_bytes();
        }
    }
    Ok(bytes as f64 / (1 << 20) as f64)
}

pub fn run(args: &BenchArgs, threads: usize, nodes: usize) -> anyhow::Result<serde_json::Value> {
    let model_path = args.model.to_string_lossy().into_owned();
    let local = open_local(&args.model)?;
    let spec = local.spec().clone();
    let prompt = prompt_of(&local.tokenizer, args.prompt_tokens)?;

    let (boot, peers) = spawn_swarm(&model_path, spec.block_count, nodes, threads)?;

    let rt = runtime()?;
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let client = rt.block_on(connect(&boot))?;

    let (mut local_prefill, mut local_step, mut swarm_prefill, mut swarm_step) =
        (vec![], vec![], vec![], vec![]);
    let mut route = Vec::new();
    for run in 0..=args.repeats {
        // Local, then swarm, alternating, so drifts of the machine hit both alike.
        let (prefill, steps) = time_local(&local, &prompt, args.gen_tokens)?;
        let (s_prefill, s_steps, hops) =
            rt.block_on(time_swarm(&client, &client_model, &prompt, args.gen_tokens))?;
        route = hops;
        if run > 0 {
            local_prefill.push(prefill.as_secs_f64() * 1e3);
            local_step.push(steps.as_secs_f64() * 1e3 / args.gen_tokens as f64);
            swarm_prefill.push(s_prefill.as_secs_f64() * 1e3);
            swarm_step.push(s_steps.as_secs_f64() * 1e3 / args.gen_tokens as f64);
        }
    }
    let file = GgufFile::open(&args.model)?;
    let mut node_reports = Vec::new();
    for p in &peers {
        let r = p.blocks.clone().unwrap_or(0..0);
        node_reports.push(serde_json::json!({
            "blocks": format!("{}..{}", r.start, r.end),
            "weights_mib": slice_weight_mib(&file, &r)?,
            "peak_rss_mib": peak_rss_mib(p.child.id()),
        }));
    }
    let (ls, ss) = (median(local_step), median(swarm_step));
    let (lp, sp) = (median(local_prefill), median(swarm_prefill));
    drop(client);
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "swarm-vs-local",
        "nodes": nodes,
        "threads": threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "local_decode_ms_per_token": ls,
        "swarm_decode_ms_per_token": ss,
        "decode_latency_ratio": ss / ls,
        "local_prefill_ms": lp,
        "swarm_prefill_ms": sp,
        "prefill_ratio": sp / lp,
        "route": route,
        "node_memory": node_reports,
        "bootstrap_peak_rss_mib": peak_rss_mib(boot.child.id()),
    }))
}

/// Recovery time: a generation with `history` positions behind it loses the node serving its
/// second span (`kill -9`); measured from the kill to the next token's logits, which includes
/// noticing the failure, finding the spare, and replaying the history there.
pub fn recovery(
    args: &BenchArgs,
    threads: usize,
    history: usize,
) -> anyhow::Result<serde_json::Value> {
    let model_path = args.model.to_string_lossy().into_owned();
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let spec = client_model.spec.clone();
    let half = spec.block_count / 2;
    let boot = spawn_bootstrap()?;
    let join = |r: Range<usize>| spawn_node(&model_path, r, &boot, threads);
    let _first = join(0..half)?;
    let mut spares = vec![join(half..spec.block_count)?, join(half..spec.block_count)?];
    let rt = runtime()?;
    let client = rt.block_on(connect(&boot))?;
    let prompt_len = history.saturating_sub(10).max(1);
    let tokenizer = &client_model.tokenizer;
    let prompt = prompt_of(tokenizer, prompt_len)?;
    let (mut recoveries, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let (recovery_ms, step_ms) = rt.block_on(async {
            let mut session = client
                .open_session(&client_model, (history + 8) as u32)
                .await?;
            let x = client_model.embedding.embed(&prompt)?;
            let y = session.run_blocks(x, 0).await?;
            let mut next = argmax(client_model.head.last_logits(&y)?.iter().copied());
            let mut pos = prompt.len();
            let t = Instant::now();
            while pos < history {
                let y = session
                    .run_blocks(client_model.embedding.embed(&[next])?, pos as u32)
                    .await?;
                next = argmax(client_model.head.last_logits(&y)?.iter().copied());
                pos += 1;
            }
            let step_ms = t.elapsed().as_secs_f64() * 1e3 / (history - prompt.len()).max(1) as f64;
            let route = session.route();
            let victim = spares
                .iter()
                .position(|p| route.iter().any(|h| p.addr.ends_with(&h.peer)))
                .context("no spare node is in the route")?;
            let mut dead = spares.remove(victim);
            let killed = Instant::now();
            dead.child.kill()?;
            let y = session
                .run_blocks(client_model.embedding.embed(&[next])?, pos as u32)
                .await?;
            client_model.head.last_logits(&y)?;
            let recovery_ms = killed.elapsed().as_secs_f64() * 1e3;
            anyhow::ensure!(session.reroutes() >= 1, "the kill was not noticed");
            session.close().await;
            drop(dead);
            anyhow::Ok((recovery_ms, step_ms))
        })?;
        recoveries.push(recovery_ms);
        steps.push(step_ms);
        // Put a spare back for the next round.
        spares.push(join(half..spec.block_count)?);
    }
    drop(client);
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "recovery",
        "history_tokens": history,
        "threads": threads,
        "repeats": args.repeats,
        "recovery_ms": recoveries,
        "recovery_ms_median": median(recoveries.clone()),
        "decode_step_ms_median": median(steps),
    }))
}

/// `bench --swarm --api`: what the OpenAI-compatible gateway costs over calling the swarm from
/// the client library, and how it holds up with `clients` concurrent streams, all against the
/// same 127.0.0.1 swarm in one run. Both paths generate the same greedy tokens from the same
/// text, so their times compare directly.
pub fn api(
    args: &BenchArgs,
    threads: usize,
    nodes: usize,
    clients: usize,
) -> anyhow::Result<serde_json::Value> {
    use coordinator::generate::{self, GenerateOptions, SamplingOptions};
    use coordinator::SwarmBackend;

    let model_path = args.model.to_string_lossy().into_owned();
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let spec = client_model.spec.clone();
    let prompt_ids = prompt_of(&client_model.tokenizer, args.prompt_tokens)?;
    let prompt_text = client_model.tokenizer.decode(&prompt_ids);
    let model_id = ::swarm::status::ModelInfo::id_of(&args.model);
    let (boot, _peers) = spawn_swarm(&model_path, spec.block_count, nodes, threads)?;
    let concurrent = clients.max(1).to_string();
    let gateway = spawn_until(
        &[
            "serve-api",
            "--model",
            &model_path,
            "--bootstrap",
            &boot.addr,
            "--listen",
            "127.0.0.1:0",
            "--discovery-timeout",
            "60",
            "--max-concurrent",
            &concurrent,
        ]
        .map(String::from),
        None,
        "serving the API on http://",
        ":",
    )?;

    let rt = runtime()?;
    let client = rt.block_on(connect(&boot))?;
    let opts = GenerateOptions {
        max_new_tokens: args.gen_tokens,
        sampling: SamplingOptions::greedy(),
        stop_at_eos: true,
        stop: Vec::new(),
    };
    // The gateway tokenizes the text itself; the library path gets the same ids.
    let ids = generate::tokenize::prompt_ids(&client_model.tokenizer, None, &prompt_text, false)?;

    let (mut lib_ttft, mut lib_step, mut api_ttft, mut api_step) = (vec![], vec![], vec![], vec![]);
    let mut tokens = 0;
    for run in 0..=args.repeats {
        let (ttft, step, n) = rt.block_on(async {
            let t = Instant::now();
            let session = client
                .open_session(&client_model, (ids.len() + args.gen_tokens) as u32)
                .await?;
            let opened = t.elapsed();
            let mut backend = SwarmBackend {
                model: &client_model,
                session,
            };
            let context = spec.context_length;
            let g = generate::generate(
                &mut backend,
                &client_model.tokenizer,
                ids.clone(),
                context,
                &opts,
                &mut |_| {},
            )
            .await?;
            backend.session.close().await;
            let steps = g.tokens.len().saturating_sub(1).max(1);
            anyhow::Ok((
                opened + g.prefill_time,
                g.decode_time.as_secs_f64() * 1e3 / steps as f64,
                g.tokens.len(),
            ))
        })?;
        let stream = stream_completion(&gateway.addr, &model_id, &prompt_text, args.gen_tokens)?;
        anyhow::ensure!(
            stream.tokens == n,
            "the gateway generated {} tokens, the library {n}",
            stream.tokens
        );
        tokens = n;
        if run > 0 {
            lib_ttft.push(ttft.as_secs_f64() * 1e3);
            lib_step.push(step);
            api_ttft.push(stream.first_ms);
            api_step.push(stream.step_ms);
        }
    }

    // Aggregate throughput of `clients` concurrent streams against one stream.
    let single = {
        let t = Instant::now();
        let s = stream_completion(&gateway.addr, &model_id, &prompt_text, args.gen_tokens)?;
        s.tokens as f64 / t.elapsed().as_secs_f64()
    };
    let t = Instant::now();
    let handles: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (addr, id) = (gateway.addr.clone(), model_id.clone());
            let (text, n) = (prompt_text.clone(), args.gen_tokens);
            std::thread::spawn(move || stream_completion(&addr, &id, &text, n))
        })
        .collect();
    let mut total = 0;
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        total += s.tokens;
    }
    let concurrent_tps = total as f64 / t.elapsed().as_secs_f64();
    drop(client);
    let (ls, as_) = (median(lib_step), median(api_step));
    let (lt, at) = (median(lib_ttft), median(api_ttft));
    Ok(serde_json::json!({
        "engine": "edge-swarm",
        "mode": "api-vs-library",
        "nodes": nodes,
        "threads": threads,
        "prompt_tokens": ids.len(),
        "gen_tokens": tokens,
        "repeats": args.repeats,
        "library_decode_ms_per_token": ls,
        "api_decode_ms_per_token": as_,
        "decode_ratio": as_ / ls,
        "library_first_token_ms": lt,
        "api_first_token_ms": at,
        "first_token_ratio": at / lt,
        "concurrent_clients": clients.max(1),
        "api_single_stream_tokens_per_s": single,
        "api_concurrent_tokens_per_s": concurrent_tps,
        "concurrency_gain": concurrent_tps / single,
    }))
}

struct Streamed {
    tokens: usize,
    /// From sending the request to the first text chunk.
    first_ms: f64,
    /// Per token between the first text chunk and the end of the stream.
    step_ms: f64,
}

/// One streaming `/v1/completions` request over a plain socket, timed as a client sees it.
fn stream_completion(
    addr: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<Streamed> {
    use std::io::Write;
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(300)))?;
    sock.set_nodelay(true)?;
    let sent = Instant::now();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let (mut first, mut last, mut tokens) = (None, None, None);
    for line in BufReader::new(sock).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            last = Some(Instant::now());
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("the gateway failed: {e}");
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
            && first.is_none()
        {
            first = Some(Instant::now());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    let (Some(first), Some(last), Some(tokens)) = (first, last, tokens) else {
        bail!("the stream from {addr} ended early");
    };
    Ok(Streamed {
        tokens,
        first_ms: first.duration_since(sent).as_secs_f64() * 1e3,
        step_ms: last.duration_since(first).as_secs_f64() * 1e3
            / tokens.saturating_sub(1).max(1) as f64,
    })
}
