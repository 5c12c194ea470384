//! `edge-node bench`: `--local` times this machine's engine ([`local`]), `--swarm` a swarm of
//! real processes on 127.0.0.1 against it ([`swarm`]), `--swarm --fairness` one client's
//! latency under another's long prompt ([`fairness`]). They build on [`args`], [`measure`] and
//! [`procs`]; none imports another.

pub mod args;
mod fairness;
mod local;
mod measure;
mod procs;
mod swarm;

use anyhow::bail;

pub use args::{parse_block_range, BenchArgs};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.local && !args.swarm {
        bail!("say what to benchmark: --local, or --swarm (a 127.0.0.1 swarm against local)");
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeats must be at least 1");
    }
    let threads = super::init_threads(args.threads)?;
    let report = match args.blocks.clone() {
        _ if args.swarm => match (args.recovery, args.api, args.fairness) {
            (Some(history), _, _) => swarm::recovery(&args, threads, history.max(2))?,
            (None, Some(clients), _) => swarm::api(&args, threads, args.nodes, clients)?,
            (None, None, Some(long)) => fairness::run(&args, threads, args.nodes, long.max(1))?,
            (None, None, None) => swarm::run(&args, threads, args.nodes)?,
        },
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
