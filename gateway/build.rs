//! Generates the gRPC service of the public API from the descriptor set the `proto` crate
//! compiles from its `gateway.proto`: the schema stays in `proto/`, and this crate never reads
//! a path inside another one.

use std::error::Error;

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let descriptors = prost_types::FileDescriptorSet::decode(proto::GATEWAY_DESCRIPTOR_SET)?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)?;
    Ok(())
}
