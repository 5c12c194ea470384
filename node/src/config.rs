//! What a node is told at start: which model, which blocks, how to reach the swarm, and the
//! limits and periods of its life.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;

pub struct NetOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub identity: Option<PathBuf>,
    pub mdns: bool,
    /// Addresses others should dial instead of the ones we listen on (a port forward, a
    /// proxy); announced in place of the listening addresses when given.
    pub external: Vec<Multiaddr>,
    /// A private swarm's key file (`swarm::swarm_key`): only peers holding it connect.
    pub swarm_key: Option<PathBuf>,
    /// Whether this peer relays circuits for peers behind NAT (see `swarm::host::nat`).
    pub relay: swarm::host::RelayServer,
    /// Whether to reserve, and announce, a relayed address through relays it connects to, so
    /// it can be dialled from outside its NAT.
    pub relay_listen: bool,
}

/// Which blocks a node serves: a fixed range, a count placed where the swarm is weakest, or as
/// many as fit in [`JoinConfig::max_memory_bytes`], placed the same way.
#[derive(Clone, Debug)]
pub enum BlockChoice {
    Fixed(Range<usize>),
    Count(usize),
    Auto,
}

/// Misbehaviour a node simulates. Outside builds with the `fault-injection` feature (which only
/// the test harness enables) `None` is the only value, so no flag, file or peer can make a
/// release node misbehave: the code is not there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    #[default]
    None,
    /// Answer every step with wrong hidden states (each value negated), and announce a decode
    /// speed ten times the measured one, as an attacker would to draw clients to itself.
    #[cfg(feature = "fault-injection")]
    CorruptOutputs,
    /// Answer every step with BAD_REQUEST (a lie: the request is fine), and announce ten times
    /// the measured speed, to draw clients that would give up on such an answer.
    #[cfg(feature = "fault-injection")]
    RefuseSteps,
    /// Serve the client's own steps, but refuse every step another node pushes (acknowledged
    /// as a bad request), as a node that cannot or will not take part in push would; the
    /// forwarding node then reports the failure after it has answered.
    #[cfg(feature = "fault-injection")]
    RefusePushes,
    /// Take every inference stream and never answer its open, as a node whose compute is stuck
    /// would (it still answers pings and announces itself), and announce ten times the measured
    /// speed so that clients try it.
    #[cfg(feature = "fault-injection")]
    IgnoreOpens,
}

pub struct JoinConfig {
    pub model: PathBuf,
    pub blocks: BlockChoice,
    /// Memory budget for weights, KV cache and overhead: sizes [`BlockChoice::Auto`], and a
    /// fixed range or count that does not fit is refused before anything is loaded.
    pub max_memory_bytes: Option<u64>,
    pub net: NetOptions,
    pub max_sessions: usize,
    pub cache_tokens: usize,
    /// Sessions one remote peer may hold; `None` is [`crate::compute::fair_share`] of
    /// `max_sessions`.
    pub max_sessions_per_peer: Option<usize>,
    /// Cache positions one remote peer may hold; `None` is the fair share of `cache_tokens`.
    pub cache_tokens_per_peer: Option<usize>,
    /// Prompt rows per batch; `None` derives it from the measured speed.
    pub prefill_chunk: Option<usize>,
    /// Most rows one inference step may carry; clients learn it when a session opens.
    pub max_step_tokens: usize,
    pub announce_interval: Duration,
    pub idle_timeout: Duration,
    /// How often to check whether moving would help the swarm; `None` never moves.
    pub rebalance_interval: Option<Duration>,
    /// Move only if the swarm's weakest block gets this much faster (0.2 = 20%), or if the move
    /// gives this share of the node's throughput to blocks below the mean (see
    /// `swarm::placement::should_move`).
    pub rebalance_min_gain: f64,
    /// How long a leaving node waits for its sessions to move elsewhere.
    pub drain_timeout: Duration,
    /// Touched on every announcement while serving, for container health checks.
    pub health_file: Option<PathBuf>,
    /// Where to serve this node's status page and `/metrics` (none when `None`).
    pub http_listen: Option<std::net::SocketAddr>,
    pub fault: Fault,
}
