//! `edge-node bench --swarm --verify-every N`: what checking peers' outputs costs. Two nodes
//! each serve every block (one to generate through, one to check it); the same greedy
//! generation runs through them with verification off and on, alternating in one run, so both
//! see the same machine. The texts must be identical.
//!
//! Two costs are reported: the client's (decode tokens/s and whole-generation time, off
//! against on), and the verifier's compute against the primary's, as the CPU time each node
//! process spent during the verified generations (the sum over its threads of
//! `/proc/PID/task/TID/schedstat`). On a machine whose cores all nodes share, the first
//! includes the verifier taking cores from the primary; the second is what a swarm with a
//! spare device pays, where the verifier runs elsewhere.

use std::time::Instant;

use anyhow::{ensure, Context};
use coordinator::generate::{self, GenerateOptions, SamplingOptions};
use coordinator::session::VerifyPolicy;
use coordinator::{ClientConfig, ClientModel, SwarmBackend, SwarmClient};

use super::args::BenchArgs;
use super::measure::{median, prompt_of};
use super::procs::{spawn_bootstrap, spawn_node, Peer};
use crate::cmd::{open_local, runtime};

/// CPU time (ns) the threads of process `pid` have run, from the scheduler's per-thread count.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).context("reading /proc")? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read: it no longer counts.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{} has no run time", path.display()))?;
        total += ns;
    }
    Ok(total)
}

/// CPU time of each node, in the order of `nodes`.
fn cpu_of(nodes: &[Peer]) -> anyhow::Result<Vec<u64>> {
    nodes.iter().map(|n| cpu_ns(n.child.id())).collect()
}

pub fn run(args: &BenchArgs, threads: usize, every: usize) -> anyhow::Result<serde_json::Value> {
    let model_path = args.model.to_string_lossy().into_owned();
    let spec = open_local(&args.model)?.spec().clone();
    let client_model = ClientModel::open(&args.model, &mut |_, _| {})?;
    let prompt = prompt_of(&client_model.tokenizer, args.prompt_tokens)?;
    let boot = spawn_bootstrap()?;
    let nodes = [
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
    let policy = match args.verify_first {
        Some(first) => VerifyPolicy::every(every).first_within(first as usize),
        None => VerifyPolicy::every(every),
    }
    .audit_share(args.verify_sample);
    let checked = connect(policy)?;
    let opts = GenerateOptions {
        max_new_tokens: args.gen_tokens,
        sampling: SamplingOptions::greedy(),
        // The same number of tokens in every run, whatever the text.
        stop_at_eos: false,
        stop: Vec::new(),
    };
    let max_len = (prompt.len() + args.gen_tokens) as u32;
    // Also returns the CPU time each node spent on it and which node was the primary.
    let generate = |client: &SwarmClient| {
        rt.block_on(async {
            let session = client.open_session(&client_model, max_len).await?;
            let primary = session.route()[0].peer.clone();
            let primary = nodes
                .iter()
                .position(|n| n.addr.ends_with(&primary))
                .context("the route's peer is none of the bench's nodes")?;
            let mut backend = SwarmBackend {
                model: &client_model,
                session,
            };
            let before = cpu_of(&nodes)?;
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
            let after = cpu_of(&nodes)?;
            backend.session.close().await;
            let spent: Vec<f64> = after
                .iter()
                .zip(&before)
                .map(|(a, b)| a.saturating_sub(*b) as f64 / 1e9)
                .collect();
            let primary_cpu = spent[primary];
            let other_cpu = spent[1 - primary];
            anyhow::Ok((g, total, primary_cpu, other_cpu))
        })
    };
    let (mut off_tps, mut on_tps, mut off_total, mut on_total) = (vec![], vec![], vec![], vec![]);
    let (mut off_cpu, mut on_cpu, mut verifier_cpu, mut share) = (vec![], vec![], vec![], vec![]);
    // What the second node spends while it has nothing to do (the generation without
    // verification): its network task, announcements, idle threads.
    let mut idle_cpu = vec![];
    for run in 0..=args.repeats {
        let (a, a_total, a_cpu, a_idle) = generate(&plain)?;
        let (b, b_total, b_cpu, b_verifier) = generate(&checked)?;
        ensure!(a.tokens == b.tokens, "verification changed the tokens");
        // The first run of each warms connections and caches.
        if run > 0 {
            off_tps.push(a.decode_tokens_per_s());
            on_tps.push(b.decode_tokens_per_s());
            off_total.push(a_total);
            on_total.push(b_total);
            off_cpu.push(a_cpu);
            idle_cpu.push(a_idle);
            on_cpu.push(b_cpu);
            verifier_cpu.push(b_verifier);
            share.push(b_verifier / b_cpu.max(1e-9));
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
        "verify_every": policy.every,
        "verify_first": policy.first,
        "verify_sample": f64::from(policy.audit_per_mille) / 1000.0,
        "decode_tokens_per_s_off": off,
        "decode_tokens_per_s_on": on,
        "generation_s_off": off_s,
        "generation_s_on": on_s,
        "slowdown": on_s / off_s - 1.0,
        "decode_slowdown": off / on - 1.0,
        "primary_cpu_s_off": median(off_cpu),
        "primary_cpu_s_on": median(on_cpu),
        "verifier_cpu_s": median(verifier_cpu),
        // With --verify-sample below 1 a run either audits its span or not: the mean over
        // runs is what a spare pays on average.
        "verifier_cpu_share_mean": share.iter().sum::<f64>() / share.len().max(1) as f64,
        "verifier_cpu_share": median(share),
        "idle_node_cpu_s_off": median(idle_cpu),
    }))
}
