//! Wire formats shared by peers, clients and tools: the protobuf messages of
//! `proto/edge_swarm.proto`, tensor encoding, the frame codec, protocol names and size bounds,
//! and what a client does on each error code. No candle dependency, so anything that only talks
//! to the swarm stays light.

pub mod arrival;
mod error;
mod frame;
mod protocol;
mod push;
mod tensor;
mod wire;

pub use error::WireError;
pub use frame::{frames, read_frame, read_timed, write_frame, Received};
pub use protocol::{
    hidden_limits, max_step_frame, step_bound, DEFAULT_MAX_STEP_TOKENS, DHT_PROTOCOL,
    IDENTIFY_PROTOCOL, INFERENCE_PROTOCOL, MAX_OPEN_FRAME,
};
pub use push::{
    check_hops, MAX_HOPS, MAX_HOP_ADDRS, MAX_HOP_ADDR_BYTES, PUSH_PROTOCOL, PUSH_TOKEN_LEN,
};
pub use tensor::{decode_tensor, element_size, encode_tensor, DecodedTensor, TensorLimits};
pub use wire::{
    auto_dtype, Link, Wire, AUTO_F16_MIN_SAVING, AUTO_MIN_BYTES, AUTO_MIN_RTT, AUTO_Q8_MIN_SAVING,
};

/// Messages generated from `proto/edge_swarm.proto`, package `edge_swarm.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/edge_swarm.v1.rs"));
}

/// The encoded descriptor set of `proto/gateway.proto`, the public gRPC API. The gateway
/// generates its service from it and serves it for gRPC reflection, so the schema is compiled
/// here, next to the file, and nowhere else.
pub const GATEWAY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gateway_descriptor.bin"));

use v1::{client_frame, server_frame, ErrorCode};

/// What a client should do after a server answers with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// Transient: try the same server again, after a pause.
    Retry,
    /// This server cannot serve the request; another server of the same blocks may.
    Reroute,
    /// The peer says the request itself is wrong, so every server would refuse it. Clients
    /// believe that only when a second peer says so too (one peer could lie to stop them).
    GiveUp,
    /// The step had more rows than this server takes at once: the request's own fault, so the
    /// server must not be banned for it. Send the rows again in steps of at most the bound the
    /// server gave when the session opened (the session stays open). A server that refuses a
    /// step within its own bound is lying, and a client treats that as a broken peer.
    Split,
}

impl ErrorCode {
    /// The code of a received error; a number we do not know is UNSPECIFIED (and so gives up).
    pub fn from_wire(code: i32) -> Self {
        ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified)
    }

    /// The recovery the `.proto` prescribes for this code. UNSPECIFIED (a peer that sent no
    /// code, or a code newer than us) gives up, since we cannot know that retrying is safe.
    pub fn action(self) -> ErrorAction {
        match self {
            ErrorCode::Busy => ErrorAction::Retry,
            ErrorCode::StepTooLarge => ErrorAction::Split,
            ErrorCode::WrongModel
            | ErrorCode::BlocksNotServed
            | ErrorCode::CacheFull
            | ErrorCode::TooManySessions
            | ErrorCode::ShuttingDown
            | ErrorCode::Internal => ErrorAction::Reroute,
            ErrorCode::Unspecified | ErrorCode::BadRequest | ErrorCode::BadPosition => {
                ErrorAction::GiveUp
            }
        }
    }
}

impl v1::ClientFrame {
    pub fn open(open: v1::OpenSession) -> Self {
        Self::of(client_frame::Kind::Open(open))
    }

    pub fn step(position: u32, hidden: v1::Tensor) -> Self {
        Self::of(client_frame::Kind::Step(v1::Step {
            position,
            hidden: Some(hidden),
            ..v1::Step::default()
        }))
    }

    /// A step with every field set by the caller (step id, hops to push along).
    pub fn step_of(step: v1::Step) -> Self {
        Self::of(client_frame::Kind::Step(step))
    }

    pub fn close() -> Self {
        Self::of(client_frame::Kind::Close(v1::CloseSession {}))
    }

    fn of(kind: client_frame::Kind) -> Self {
        Self { kind: Some(kind) }
    }
}

impl v1::ServerFrame {
    pub fn opened(max_length: u32, max_step_tokens: u32) -> Self {
        Self::of(server_frame::Kind::Opened(v1::SessionOpened {
            max_length,
            max_step_tokens,
            push_token: Vec::new(),
        }))
    }

    pub fn result(hidden: v1::Tensor, compute_ms: f32) -> Self {
        Self::of(server_frame::Kind::Result(v1::StepResult {
            hidden: Some(hidden),
            compute_ms,
            ..v1::StepResult::default()
        }))
    }

    /// A step's answer with every field set by the caller (step id, forward outcome).
    pub fn step_result(result: v1::StepResult) -> Self {
        Self::of(server_frame::Kind::Result(result))
    }

    /// The report that the output of step `step_id`, already answered, was not forwarded.
    pub fn forward_failed(step_id: u64, reason: impl Into<String>) -> Self {
        Self::of(server_frame::Kind::ForwardFailed(v1::ForwardFailed {
            step_id,
            reason: reason.into(),
        }))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::of(server_frame::Kind::Error(v1::Error {
            code: code as i32,
            message: message.into(),
        }))
    }

    fn of(kind: server_frame::Kind) -> Self {
        Self { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_actions_follow_the_proto() {
        use ErrorAction::*;
        let expected = [
            (ErrorCode::Unspecified, GiveUp),
            (ErrorCode::BadRequest, GiveUp),
            (ErrorCode::WrongModel, Reroute),
            (ErrorCode::BlocksNotServed, Reroute),
            (ErrorCode::CacheFull, Reroute),
            (ErrorCode::TooManySessions, Reroute),
            (ErrorCode::ShuttingDown, Reroute),
            (ErrorCode::BadPosition, GiveUp),
            (ErrorCode::Internal, Reroute),
            (ErrorCode::Busy, Retry),
            (ErrorCode::StepTooLarge, Split),
        ];
        for (code, action) in expected {
            assert_eq!(code.action(), action, "{code:?}");
            assert_eq!(ErrorCode::from_wire(code as i32), code);
        }
        assert_eq!(ErrorCode::from_wire(1000), ErrorCode::Unspecified);
    }

    #[test]
    fn constructors_fill_the_oneof() {
        let f = v1::ServerFrame::error(ErrorCode::CacheFull, "full");
        let Some(server_frame::Kind::Error(e)) = f.kind else {
            panic!("not an error frame: {f:?}");
        };
        assert_eq!(
            (e.code(), e.message.as_str()),
            (ErrorCode::CacheFull, "full")
        );
        assert!(matches!(
            v1::ClientFrame::close().kind,
            Some(client_frame::Kind::Close(_))
        ));
    }
}
