//! Errors of API requests, with what each means in OpenAI's error shape and in gRPC status
//! codes, so both front ends report the same problem the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or unsupported request: fix the request.
    BadRequest,
    /// Prompt (plus the requested tokens) does not fit the model's context.
    ContextLength,
    /// The request body is larger than the gateway reads.
    TooLarge,
    ModelNotFound,
    NotFound,
    MethodNotAllowed,
    /// Too many requests queued or running: retry later.
    Overloaded,
    /// The swarm cannot serve the model now (blocks without servers, every route failing).
    SwarmUnavailable,
    Timeout,
    /// No API key, or not one the gateway accepts (`serve-api --api-key-file`).
    Unauthorized,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, as OpenAI reports it.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::BadRequest,
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::BadRequest | ErrorKind::ContextLength => StatusCode::BAD_REQUEST,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::ModelNotFound | ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::SwarmUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    fn openai_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::BadRequest
            | ErrorKind::ContextLength
            | ErrorKind::TooLarge
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::Unauthorized => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::SwarmUnavailable | ErrorKind::Timeout => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self.kind {
            ErrorKind::ContextLength => Some("context_length_exceeded"),
            ErrorKind::ModelNotFound => Some("model_not_found"),
            ErrorKind::Overloaded => Some("rate_limit_exceeded"),
            ErrorKind::SwarmUnavailable => Some("swarm_unavailable"),
            ErrorKind::Timeout => Some("timeout"),
            ErrorKind::Unauthorized => Some("invalid_api_key"),
            ErrorKind::BadRequest
            | ErrorKind::TooLarge
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed => None,
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`, as OpenAI answers.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.param,
                "code": self.code(),
            }
        })
    }

    pub fn grpc(&self) -> tonic::Status {
        let code = match self.kind {
            ErrorKind::BadRequest | ErrorKind::ContextLength => tonic::Code::InvalidArgument,
            ErrorKind::TooLarge => tonic::Code::ResourceExhausted,
            ErrorKind::ModelNotFound | ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::MethodNotAllowed => tonic::Code::Unimplemented,
            ErrorKind::Overloaded => tonic::Code::ResourceExhausted,
            ErrorKind::SwarmUnavailable => tonic::Code::Unavailable,
            ErrorKind::Timeout => tonic::Code::DeadlineExceeded,
            ErrorKind::Unauthorized => tonic::Code::Unauthenticated,
        };
        tonic::Status::new(code, self.message.clone())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_is_401_in_openai_shape_and_unauthenticated_in_grpc() {
        let e = ApiError::new(ErrorKind::Unauthorized, "Incorrect API key provided.");
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }})
        );
        assert_eq!(e.grpc().code(), tonic::Code::Unauthenticated);
    }
}
