//! The edge-swarm client library: connect to a swarm ([`client::SwarmClient`]), find the servers
//! of a model (through `swarm::discovery`), plan a route over them ([`route`]), open an
//! [`session::InferenceSession`] and [`generate`] text through it. The same generation loop
//! runs a local model, which is how swarm output is checked against one process.

pub mod client;
pub mod generate;
pub mod route;
pub mod session;

pub use client::{ClientConfig, ClientModel, SwarmBackend, SwarmClient};
