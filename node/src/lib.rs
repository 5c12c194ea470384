//! The edge-node daemon as a library: serving a slice of a model to the swarm ([`run_join`]),
//! running a bootstrap peer ([`run_bootstrap`]), and the compute thread and inference protocol
//! behind them. It builds on `swarm` for everything peers share and knows nothing of the client
//! library or the gateway; the `edge-node` binary (crate `cli`) parses flags and calls in here.

pub mod announce;
pub mod bootstrap;
pub mod compute;
pub mod config;
pub mod error;
pub mod health;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod probe;
pub mod progress;
pub mod server;
pub mod status_page;

pub use bootstrap::run_bootstrap;
pub use config::{BlockChoice, Fault, JoinConfig, NetOptions};
pub use error::JoinError;
pub use lifecycle::{run_join, Phase};
