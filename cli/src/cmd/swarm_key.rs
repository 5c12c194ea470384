//! `edge-node swarm-key FILE`: a new key for a private swarm.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct SwarmKeyArgs {
    /// Where to write the key (never over an existing file).
    pub file: PathBuf,
}

pub fn run(args: SwarmKeyArgs) -> anyhow::Result<()> {
    swarm::swarm_key::create(&args.file)?;
    println!(
        "wrote a new swarm key to {}; start every node and client of the swarm with --swarm-key {}",
        args.file.display(),
        args.file.display()
    );
    Ok(())
}
