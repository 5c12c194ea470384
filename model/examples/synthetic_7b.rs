//! Writes the full-size synthetic models (Mistral-7B shape by default, Q4_0 and Q4_K_M) that the
//! memory-limited swarm scenario and its benchmark run, skipping files already present:
//!
//!   cargo run --release -p model --example synthetic_7b -- models/synthetic \
//!       [--shape mistral-7b|llama2-7b] [Q4_0|Q4_K_M ...]
//!
//! (`scripts/make-synthetic-7b.sh` runs exactly this.) Prints each file's path when done.
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use model::synthetic_full::{FullSizeModel, Quant, Shape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let dir =
        PathBuf::from(args.next().ok_or(
            "usage: synthetic_7b OUT_DIR [--shape mistral-7b|llama2-7b] [Q4_0|Q4_K_M ...]",
        )?);
    let mut shape = Shape::Mistral7B;
    let mut quants = Vec::new();
    while let Some(a) = args.next() {
        if a == "--shape" {
            let name = args
                .next()
                .ok_or("--shape needs a value (mistral-7b, llama2-7b)")?;
            shape = Shape::parse(&name)
                .ok_or(format!("unknown shape {name:?} (mistral-7b, llama2-7b)"))?;
        } else {
            quants.push(
                Quant::parse(&a).ok_or(format!("unknown quantization {a:?} (Q4_0, Q4_K_M)"))?,
            );
        }
    }
    if quants.is_empty() {
        quants = vec![Quant::Q4_0, Quant::Q4KM];
    }
    for quant in quants {
        let spec = FullSizeModel::new(shape, quant);
        let bar = ProgressBar::new(spec.file_bytes()).with_style(ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?);
        bar.set_message(spec.file_name());
        let path = spec.write_if_missing(&dir, &mut |done, _| bar.set_position(done))?;
        bar.finish_and_clear();
        println!("{}", path.display());
    }
    Ok(())
}
