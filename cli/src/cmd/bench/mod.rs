//! `edge-node bench`: `--local` times this machine's engine ([`local`]), `--swarm` a swarm of
//! real processes on 127.0.0.1 against it ([`swarm`]). Both build on [`args`] and [`measure`];
//! neither imports the other.

pub mod args;
mod local;
mod measure;
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
        _ if args.swarm => match (args.recovery, args.api) {
            (Some(history), _) => swarm::recovery(&args, threads, history.max(2))?,
            (None, Some(clients)) => swarm::api(&args, threads, args.nodes, clients)?,
            (None, None) => swarm::run(&args, threads, args.nodes)?,
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
