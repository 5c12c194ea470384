//! The edge-swarm client library. Today it runs generation on a local model; the swarm client
//! (discovery, routing, span sessions) builds on the same [`generate`] loop.

pub mod generate;
