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
    #[error("not even one block fits in --max-memory {} MiB", max_memory_bytes >> 20)]
    NoRoom { max_memory_bytes: u64 },
    #[error("cannot serve the status page on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}
