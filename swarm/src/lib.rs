//! What a serving node and a client of the swarm share: the libp2p [`host`] and its
//! [`identity`], the shared key of a private swarm ([`swarm_key`]), the DHT records of who
//! serves which blocks ([`discovery`]) and the signed entries they hold ([`record`]), where a
//! server should sit in the pipeline ([`placement`]), the [`status`] snapshot of a model's swarm
//! and the status [`page`] both roles serve, and [`deadline`]s that cannot overflow the clock.
//! Neither side's logic lives here, so the daemon and the client library build on this crate
//! without depending on each other.

pub mod deadline;
pub mod discovery;
pub mod host;
pub mod identity;
pub mod load;
pub mod offline;
pub mod page;
pub mod placement;
pub mod record;
pub mod status;
pub mod swarm_key;

pub use host::{
    Direction, Host, NetConfig, NetError, NetHandle, OnListen, INFERENCE_STREAM, PUSH_STREAM,
};
