//! Generates the wire types from `proto/edge_swarm.proto`. protox is a pure-Rust protobuf
//! compiler, so building needs no `protoc` binary on the machine.

use std::error::Error;

const SCHEMA: &str = "proto/edge_swarm.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={SCHEMA}");
    let descriptors = protox::compile([SCHEMA], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
