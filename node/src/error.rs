//! Why a node could not start or go on serving.

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Net(#[from] swarm::NetError),
    #[error(transparent)]
    Identity(#[from] swarm::identity::IdentityError),
    #[error(transparent)]
    SwarmKey(#[from] swarm::swarm_key::SwarmKeyError),
    #[error("starting the compute thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(
        "--max-memory {} MiB cannot hold even one block: one needs {}",
        mib(*max_memory_bytes),
        cost
    )]
    NoRoom {
        max_memory_bytes: u64,
        cost: BlockCost,
    },
    #[error(
        "--max-memory {} MiB holds {fit} block(s), not the {asked} asked for: each needs {}",
        mib(*max_memory_bytes),
        cost
    )]
    TooManyBlocks {
        max_memory_bytes: u64,
        asked: usize,
        fit: usize,
        cost: BlockCost,
    },
    #[error("cannot serve the status page on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What serving one block costs in memory, for the errors that say a budget is too small.
#[derive(Clone, Copy, Debug)]
pub struct BlockCost {
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub cache_tokens: usize,
    pub overhead_bytes: u64,
}

impl std::fmt::Display for BlockCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB of weights + {} MiB of KV cache (--cache-tokens {}), plus {} MiB for the \
             process",
            mib(self.weight_bytes),
            mib(self.kv_bytes),
            self.cache_tokens,
            mib(self.overhead_bytes)
        )
    }
}

/// Mebibytes, rounded to one decimal when under 10.
fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1u64 << 20) as f64;
    if m < 10.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.0}")
    }
}
