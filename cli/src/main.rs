//! `edge-node`: thin entry point. Parses flags, sets up logging and threads, runs a command, and
//! turns any error into one line on stderr and a non-zero exit code.

mod cmd;
mod rss;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "edge-node",
    version,
    about = "Run a language model across the devices you own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(cmd::generate::GenerateArgs),
    /// Chat with the model in the terminal (reads lines from stdin; /reset, /exit).
    Chat(cmd::chat::ChatArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(cmd::bench::BenchArgs),
    /// Serve a range of a model's blocks to the swarm.
    Join(cmd::join::JoinArgs),
    /// Run a peer that hosts no blocks, for others to find the swarm through.
    Bootstrap(cmd::join::BootstrapArgs),
    /// Check that a local node is serving (for container health checks).
    Health(cmd::join::HealthArgs),
    /// Serve the OpenAI-compatible HTTP API, gRPC, a status page and metrics, backed by the swarm.
    ServeApi(cmd::serve_api::ServeApiArgs),
    /// Show which peers serve which blocks of a model, as a table.
    Status(cmd::status::StatusArgs),
    /// Write a new key for a private swarm to FILE (give it to every node and client).
    SwarmKey(cmd::swarm_key::SwarmKeyArgs),
}

fn main() -> ExitCode {
    // `join --config FILE` reads flags from a TOML file; everything else is plain clap.
    let cli = match cmd::config::parse::<Cli>(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,edge_node=info,node=info,swarm=info,coordinator=info,model=info",
                )
            }),
        )
        .with_target(false)
        .with_ansi(colour_logs())
        .compact()
        .init();
    // Before any work: a bad EDGE_CPU, or a binary built for a newer CPU, is one clear line.
    if let Err(e) = model::kernels::cpu::init() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Join(args) => cmd::join::run_join_cmd(args),
        Command::Bootstrap(args) => cmd::join::run_bootstrap_cmd(args),
        Command::Health(args) => cmd::join::run_health_cmd(args),
        Command::Status(args) => cmd::status::run(args),
        Command::ServeApi(args) => cmd::serve_api::run(args),
        Command::SwarmKey(args) => cmd::swarm_key::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Colour codes only for a terminal, and not when `NO_COLOR` is set (https://no-color.org).
fn colour_logs() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
