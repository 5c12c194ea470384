//! `edge-node bench`: `--local` times this machine's engine ([`local`]), `--swarm` a swarm of
//! real processes on 127.0.0.1 against it ([`swarm`]), `--swarm --fairness` one client's
//! latency under another's long prompt ([`fairness`]), `--swarm --verify-every N` what checking
//! peers' outputs costs ([`verify`]), `--bootstrap ADDR` a swarm running elsewhere
//! ([`remote`]), `--local --wire-agreement` what lossy wire dtypes cost in agreement with
//! f32 ([`wire`]). They build on [`args`], [`measure`] and [`procs`]; none
//! imports another.

pub mod args;
mod fairness;
mod local;
mod measure;
mod procs;
mod remote;
mod swarm;
mod verify;
mod wire;

use anyhow::bail;

pub use args::{parse_block_range, BenchArgs};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.local && !args.swarm && args.bootstrap.is_empty() {
        bail!("say what to benchmark: --local, --swarm (a 127.0.0.1 swarm against local), or --bootstrap ADDR (a running swarm)");
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeats must be at least 1");
    }
    if !args.bootstrap.is_empty() {
        let report = remote::run(&args, &args.bootstrap)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let threads = super::init_threads(args.threads)?;
    let report = match args.blocks.clone() {
        _ if args.swarm => match (args.recovery, args.api, args.fairness, args.verify_every) {
            (Some(history), ..) => swarm::recovery(&args, threads, history.max(2))?,
            (None, Some(clients), ..) => swarm::api(&args, threads, args.nodes, clients)?,
            (None, None, Some(long), _) => fairness::run(&args, threads, args.nodes, long.max(1))?,
            (None, None, None, Some(every)) => verify::run(&args, threads, every as usize)?,
            (None, None, None, None) => swarm::run(&args, threads, args.nodes)?,
        },
        _ if args.wire_agreement => wire::run(&args, threads)?,
        None => local::bench_full(&args, threads)?,
        Some(range) => local::bench_slice(&args, threads, range)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
