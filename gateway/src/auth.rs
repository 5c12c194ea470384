//! Optional API keys (`serve-api --api-key-file`): every OpenAI and gRPC request must carry
//! `Authorization: Bearer <key>` with one of the file's keys. The status page, `/metrics` and
//! gRPC health stay open, as monitoring reads them without credentials.
//!
//! Only SHA-256 digests of the keys are kept, and a presented key is compared with every one
//! of them without stopping early, so neither the time of a refusal nor a memory dump tells an
//! attacker how close a guess came.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorKind};

/// Largest key file read: far more than any list of keys needs, and a file of gigabytes named
/// by mistake fails at once instead of filling memory.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("cannot read the API key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the API key file {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("the API key file {path} is not UTF-8 text")]
    NotText { path: String },
    #[error("the API key file {path}, line {line}: a key is printable ASCII without spaces (it travels in an HTTP header)")]
    BadKey { path: String, line: usize },
    #[error("the API key file {path} holds no key (one per line; blank lines and lines starting with # are skipped)")]
    Empty { path: String },
}

/// The keys a gateway accepts (their digests).
#[derive(Clone)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// Reads one key per line of `path`.
    pub fn load(path: &Path) -> Result<Self, ApiKeyError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read = |e: std::io::Error| ApiKeyError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(ApiKeyError::TooLarge { path: shown });
        }
        let text = String::from_utf8(bytes).map_err(|_| ApiKeyError::NotText {
            path: shown.clone(),
        })?;
        Self::parse(&text, &shown)
    }

    /// One key per line; surrounding whitespace, blank lines and `#` comment lines are
    /// skipped. Errors name the line, never the key.
    pub fn parse(text: &str, path: &str) -> Result<Self, ApiKeyError> {
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiKeyError::BadKey {
                    path: path.into(),
                    line: i + 1,
                });
            }
            digests.push(digest(key.as_bytes()));
        }
        if digests.is_empty() {
            return Err(ApiKeyError::Empty { path: path.into() });
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Whether `key` is one of the keys, in time that does not depend on which key or how
    /// much of one matched.
    pub fn accepts(&self, key: &[u8]) -> bool {
        let presented = digest(key);
        let mut found = 0u8;
        for d in self.digests.iter() {
            let diff = d
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(std::hint::black_box(diff) == 0);
        }
        found == 1
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The key of an `Authorization: Bearer <key>` header (scheme case-insensitive).
fn bearer(request: &Request) -> Option<&[u8]> {
    let value = request.headers().get(AUTHORIZATION)?.as_bytes();
    let (scheme, key) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = key.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Paths served without a key: gRPC health (probes have no credentials).
fn open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Middleware: lets a request through only with an accepted key; otherwise 401 in OpenAI's
/// shape, or UNAUTHENTICATED for gRPC.
pub async fn require_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    if open_path(request.uri().path()) {
        return next.run(request).await;
    }
    let error = match bearer(&request) {
        Some(key) if keys.accepts(key) => None,
        Some(_) => Some(ApiError::new(
            ErrorKind::Unauthorized,
            "Incorrect API key provided.",
        )),
        None => Some(ApiError::new(
            ErrorKind::Unauthorized,
            "You didn't provide an API key. Send it in an Authorization header using Bearer \
             auth (Authorization: Bearer YOUR_KEY).",
        )),
    };
    let Some(error) = error else {
        return next.run(request).await;
    };
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        error.grpc().into_http()
    } else {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_skip_comments_and_blanks_and_refuse_what_cannot_be_a_key() {
        let keys = ApiKeys::parse("# team keys\n\n  sk-one  \r\nsk-two\n", "k").unwrap();
        assert!(keys.accepts(b"sk-one"));
        assert!(keys.accepts(b"sk-two"));
        assert!(!keys.accepts(b"sk-on"));
        assert!(!keys.accepts(b"sk-one "));
        assert!(!keys.accepts(b""));
        assert!(!keys.accepts(b"# team keys"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");

        let empty = ApiKeys::parse("# nothing\n\n   \n", "k").unwrap_err();
        assert!(matches!(empty, ApiKeyError::Empty { .. }), "{empty}");
        let spaced = ApiKeys::parse("ok\nsk one\n", "k").unwrap_err();
        assert!(
            matches!(spaced, ApiKeyError::BadKey { line: 2, .. }),
            "{spaced}"
        );
        assert!(!spaced.to_string().contains("sk one"), "{spaced}");
        let control = ApiKeys::parse("sk-\u{7f}x", "k").unwrap_err();
        assert!(matches!(control, ApiKeyError::BadKey { line: 1, .. }));
        let unicode = ApiKeys::parse("sk-é", "k").unwrap_err();
        assert!(matches!(unicode, ApiKeyError::BadKey { line: 1, .. }));
    }

    #[test]
    fn key_files_that_are_not_text_or_too_large_are_one_line_errors() {
        let dir = std::env::temp_dir().join(format!("gateway-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00, b'\n']).unwrap();
        let e = ApiKeys::load(&binary).unwrap_err();
        assert!(matches!(e, ApiKeyError::NotText { .. }), "{e}");
        let huge = dir.join("huge");
        std::fs::write(&huge, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let e = ApiKeys::load(&huge).unwrap_err();
        assert!(matches!(e, ApiKeyError::TooLarge { .. }), "{e}");
        let e = ApiKeys::load(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, ApiKeyError::Read { .. }), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_key() {
        let with = |value: &str| {
            let request = Request::builder()
                .header(AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .unwrap();
            bearer(&request).map(<[u8]>::to_vec)
        };
        assert_eq!(with("Bearer sk-1"), Some(b"sk-1".to_vec()));
        assert_eq!(with("bearer  sk-1 "), Some(b"sk-1".to_vec()));
        assert_eq!(with("Basic sk-1"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bear"), None);
    }

    /// Raw HTTP/1.1 to a router behind the middleware, served on 127.0.0.1.
    #[tokio::test]
    async fn requests_without_a_key_get_401_or_unauthenticated_and_health_stays_open() {
        use axum::routing::{get, post};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let keys = ApiKeys::parse("sk-good", "k").unwrap();
        let router = axum::Router::new()
            .route("/v1/models", get(|| async { "models" }))
            .route("/edge.Gateway/Generate", post(|| async { "generated" }))
            .route("/grpc.health.v1.Health/Check", post(|| async { "healthy" }))
            .layer(axum::middleware::from_fn_with_state(keys, require_key));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(swarm::page::serve(listener, router, stop.clone()));
        let ask = |head: String| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                s.read_to_string(&mut out),
            )
            .await
            .unwrap()
            .unwrap();
            out
        };
        let request = |method: &str, path: &str, headers: &str| {
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n")
        };
        let grpc = "Content-Type: application/grpc\r\n";

        let out = ask(request("GET", "/v1/models", "")).await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        assert!(out.contains("\"code\":\"invalid_api_key\""), "{out}");
        let out = ask(request(
            "GET",
            "/v1/models",
            "Authorization: Bearer sk-good\r\n",
        ))
        .await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("models"),
            "{out}"
        );

        let out = ask(request("POST", "/edge.Gateway/Generate", grpc)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.to_ascii_lowercase().contains("grpc-status: 16"),
            "{out}"
        );
        assert!(!out.contains("generated"), "{out}");
        let with_key = format!("{grpc}authorization: Bearer sk-good\r\n");
        let out = ask(request("POST", "/edge.Gateway/Generate", &with_key)).await;
        assert!(out.ends_with("generated"), "{out}");
        let out = ask(request("POST", "/grpc.health.v1.Health/Check", grpc)).await;
        assert!(out.ends_with("healthy"), "{out}");

        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
