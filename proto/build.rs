//! Generates the wire types from `proto/edge_swarm.proto`, and the descriptor set of
//! `proto/gateway.proto` that the gateway builds its gRPC service from. protox is a pure-Rust
//! protobuf compiler, so building needs no `protoc` binary on the machine.

use std::error::Error;
use std::path::PathBuf;

use prost::Message;

const SCHEMA: &str = "proto/edge_swarm.proto";
const GATEWAY_SCHEMA: &str = "proto/gateway.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={SCHEMA}");
    println!("cargo:rerun-if-changed={GATEWAY_SCHEMA}");
    let descriptors = protox::compile([SCHEMA], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    let gateway = protox::compile([GATEWAY_SCHEMA], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("gateway_descriptor.bin"), gateway.encode_to_vec())?;
    Ok(())
}
