//! `swarm-sim`: simulates a large swarm under churn and compares routing and placement
//! policies. The seed is printed first, so any run can be repeated exactly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use simulations::network::RoutePolicy;
use simulations::scenario::Scenario;
use simulations::{run, Config, Policy};

/// Small allocations per simulated token dominate the allocator's work; mimalloc serves them
/// faster than glibc's malloc (see BENCHMARKS.md, issue 19).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    Scenario::ALL
        .into_iter()
        .find(|x| x.name() == s)
        .ok_or_else(|| format!("unknown scenario {s:?}"))
}

#[derive(Parser, Debug)]
#[command(about = "Seeded, deterministic simulation of an edge-swarm under churn")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    #[arg(long, default_value_t = 80)]
    blocks: u32,
    #[arg(long, default_value_t = 1.0)]
    hours: f64,
    /// Drawn at random (and printed) when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Clients generating at once in each policy's swarm.
    #[arg(long, default_value_t = 24)]
    clients: usize,
    /// Mean minutes a peer stays in the swarm.
    #[arg(long, default_value_t = 120.0)]
    mean_lifetime_min: f64,
    /// `should_move`'s minimum gain (the node's default is 0.2).
    #[arg(long, default_value_t = 0.2)]
    rebalance_min_gain: f64,
    /// What happens besides churn: steady, flash-crowd, region-outage or skewed-join.
    #[arg(long, default_value = "steady", value_parser = parse_scenario)]
    scenario: Scenario,
    /// Also run every route policy with static placement (placement alone is compared on the
    /// skewed join in every run).
    #[arg(long)]
    with_static: bool,
    /// Clients relay every span's step themselves, as the real client does under `--no-push`,
    /// instead of pushing it node to node (the real client's default). Slower to simulate: one
    /// simulated call per span and token instead of one per token.
    #[arg(long)]
    no_push: bool,
    /// Clients write no offline claims: each finds a dead peer out for itself (what every
    /// client did before claims), for comparison.
    #[arg(long)]
    no_offline_claims: bool,
    /// Directory for report.json and the plots.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("seed {seed}");
    anyhow::ensure!(args.blocks > 0, "--blocks must be positive");
    anyhow::ensure!(args.hours > 0.0, "--hours must be positive");
    let mut cfg = Config::new(args.peers, args.blocks, args.hours, seed);
    cfg.clients = args.clients;
    cfg.mean_lifetime_min = args.mean_lifetime_min;
    cfg.rebalance_min_gain = args.rebalance_min_gain;
    cfg.scenario = args.scenario;
    cfg.push = !args.no_push;
    cfg.offline_claims = !args.no_offline_claims;

    let policies: Vec<Policy> = if args.with_static {
        Policy::all()
    } else {
        RoutePolicy::ALL
            .into_iter()
            .map(|route| Policy {
                route,
                rebalance: true,
            })
            .collect()
    };
    let started = Instant::now();
    let out = run(&cfg, &policies)?;
    out.write(&args.out)
        .with_context(|| format!("writing to {}", args.out.display()))?;
    println!(
        "{:<24} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9}",
        "policy",
        "tok/s/cl",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "reroute",
        "rec p50",
        "failed",
        "weakest"
    );
    for p in &out.report.policies {
        println!(
            "{:<24} {:>9.2} {:>8.0} {:>8.0} {:>8.0} {:>8} {:>7.0} {:>7} {:>9.1}",
            p.name,
            p.tokens_per_s_per_client.mean,
            p.token_latency_ms.p50,
            p.token_latency_ms.p90,
            p.token_latency_ms.p99,
            p.recovery.reroutes,
            p.recovery.recovery_ms.p50,
            p.generations.failed,
            p.block_throughput.weakest_mean,
        );
    }
    let study = &out.report.skewed_join;
    for (name, r) in [("rebalance", &study.rebalance), ("static", &study.fixed)] {
        println!(
            "skewed join, {name}: weakest/mean {:.2} -> {:.2}, {} moves, {} reached {:.0}% of the mean",
            r.evenness_start,
            r.evenness_end,
            r.moves,
            r.minutes_to_target
                .map_or("never".to_string(), |m| format!("at minute {m:.0}")),
            study.target * 100.0
        );
    }
    println!(
        "wrote {} and {} plots in {:.1}s",
        args.out.join("report.json").display(),
        out.plots.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
