//! The health file: touched on every announcement while serving, so a container runtime (or
//! `edge-node health`) can tell a serving node from a stuck one without speaking libp2p.

use std::path::Path;

use swarm::discovery::now_ms;

/// Writes the current time into `path`, if the node was given one. A failure is logged, not
/// fatal: the node still serves, and the health check will say it looks silent.
pub fn touch(path: Option<&Path>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::write(p, now_ms().to_string()) {
            tracing::warn!("cannot write health file {}: {e}", p.display());
        }
    }
}
