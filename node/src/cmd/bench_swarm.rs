//! `edge-node bench --swarm`: the same prompt and decode steps through a swarm of real
//! processes on 127.0.0.1 and through one local process, in the same run, so the cost of the
//! network hops is measured rather than guessed. Each node's peak RSS is read from
//! `/proc/<pid>/status` next to the weight bytes of its slice.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::generate::sample::argmax;
use coordinator::{ClientConfig, ClientModel, SwarmClient};
use model::GgufFile;

use super::bench::{median, prompt_of, time_local, BenchArgs};

struct Peer {
    child: Child,
    addr: String,
    blocks: Option<Range<usize>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String], blocks: Option<Range<usize>>) -> anyhow::Result<Peer> {
    let exe = std::env::current_exe().context("locating edge-node")?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a swarm peer")?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let mut peer = Peer {
        child,
        addr: String::new(),
        blocks,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while peer.addr.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(a) if a.contains("/tcp/") => peer.addr = a,
            Ok(_) => {}
            Err(_) => bail!("a swarm peer printed no listening address within 60 s"),
        }
    }
    Ok(peer)
}

fn spawn_bootstrap() -> anyhow::Result<Peer> {
    spawn(
        &["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"].map(String::from),
        None,
    )
}

/// A node serving `blocks` on 127.0.0.1, joined through `boot`.
fn spawn_node(
    model: &str,
    blocks: Range<usize>,
    boot: &Peer,
    threads: usize,
) -> anyhow::Result<Peer> {
    let range = format!("{}..{}", blocks.start, blocks.end);
    let threads = threads.to_string();
    let args = [
        "join",
        "--model",
        model,
        "--blocks",
        &range,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot.addr,
        "--no-mdns",
        "--threads",
        &threads,
    ]
    .map(String::from);
    spawn(&args, Some(blocks))
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

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
    let local = super::open_local(&args.model)?;
    let spec = local.spec().clone();
    if nodes == 0 || nodes > spec.block_count {
        bail!("--nodes must be between 1 and {}", spec.block_count);
    }
    let prompt = prompt_of(&local.tokenizer, args.prompt_tokens)?;
    let max_len = args.prompt_tokens + args.gen_tokens;

    let boot = spawn_bootstrap()?;
    let mut peers = Vec::new();
    for i in 0..nodes {
        let r = spec.block_count * i / nodes..spec.block_count * (i + 1) / nodes;
        peers.push(spawn_node(&model_path, r, &boot, threads)?);
    }

    let rt = super::runtime()?;
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let client = rt.block_on(SwarmClient::connect(ClientConfig {
        bootstrap: vec![boot.addr.parse()?],
        discovery_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    }))?;

    let (mut local_prefill, mut local_step, mut swarm_prefill, mut swarm_step) =
        (vec![], vec![], vec![], vec![]);
    let mut route = Vec::new();
    for run in 0..=args.repeats {
        // Local, then swarm, alternating, so drifts of the machine hit both alike.
        let (prefill, steps) = time_local(&local, &prompt, args.gen_tokens)?;
        let (s_prefill, s_steps) = rt.block_on(async {
            let mut session = client.open_session(&client_model, max_len as u32).await?;
            route = session.route();
            let t = Instant::now();
            let x = client_model.embedding.embed(&prompt)?;
            let y = session.forward(x, 0).await?;
            let logits = client_model.head.last_logits(&y)?;
            let prefill = t.elapsed();
            let mut next = argmax(logits.iter().copied());
            let t = Instant::now();
            for i in 0..args.gen_tokens {
                let x = client_model.embedding.embed(&[next])?;
                let y = session.forward(x, (prompt.len() + i) as u32).await?;
                next = argmax(client_model.head.last_logits(&y)?.iter().copied());
            }
            let steps = t.elapsed();
            session.close().await;
            anyhow::Ok((prefill, steps))
        })?;
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
    let rt = super::runtime()?;
    let client = rt.block_on(SwarmClient::connect(ClientConfig {
        bootstrap: vec![boot.addr.parse()?],
        discovery_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    }))?;
    let prompt_len = history.saturating_sub(10).max(1);
    let tokenizer = &client_model.tokenizer;
    let prompt = super::bench::prompt_of(tokenizer, prompt_len)?;
    let (mut recoveries, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let (recovery_ms, step_ms) = rt.block_on(async {
            let mut session = client
                .open_session(&client_model, (history + 8) as u32)
                .await?;
            let x = client_model.embedding.embed(&prompt)?;
            let y = session.forward(x, 0).await?;
            let mut next = argmax(client_model.head.last_logits(&y)?.iter().copied());
            let mut pos = prompt.len();
            let t = Instant::now();
            while pos < history {
                let y = session
                    .forward(client_model.embedding.embed(&[next])?, pos as u32)
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
                .forward(client_model.embedding.embed(&[next])?, pos as u32)
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
