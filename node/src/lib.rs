//! The edge-node daemon as a library: serving a slice of a model to the swarm (`join`), running
//! a bootstrap peer, and the compute thread and inference protocol behind them. The binary in
//! `main.rs` only parses flags and calls in here.

pub mod compute;
pub mod http;
pub mod join;
pub mod metrics;
pub mod progress;
pub mod server;
