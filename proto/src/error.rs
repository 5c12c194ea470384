//! The one error type of the wire layer, so callers can map every failure of a peer's bytes
//! to a single "this peer sent garbage" path.

/// Everything that can go wrong reading or writing wire data. Never caused by our own bugs:
/// each variant describes what the remote side (or the transport) did wrong.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Rejected before the buffer is allocated, so a hostile length costs nothing.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("truncated frame: stream ended inside a frame")]
    Truncated,
    #[error("bad frame length prefix: varint longer than 10 bytes or above u64::MAX")]
    BadVarint,
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("bad tensor: {0}")]
    BadTensor(String),
}
