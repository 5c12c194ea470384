//! Generates the gRPC service from `proto/proto/gateway.proto` (with protox: no `protoc`
//! needed) and keeps the encoded descriptor set for gRPC reflection.

use std::error::Error;
use std::path::PathBuf;

use prost::Message;

const SCHEMA: &str = "../proto/proto/gateway.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={SCHEMA}");
    let descriptors = protox::compile([SCHEMA], ["../proto/proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("gateway_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)?;
    Ok(())
}
