//! The status page and `/metrics`, served the same way by the gateway and by every node: one
//! HTML page that polls `/api/status`, and Prometheus text from whoever serves it. The swarm
//! snapshot behind the page is refreshed in the background, so page views never query the DHT.

use std::sync::Arc;
use std::time::Duration;

use crate::host::NetHandle;
use crate::status::{self, ModelInfo, SwarmView};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use model::fingerprint::Fingerprint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PAGE: &str = include_str!("status.html");

/// What a process shows on its status page and `/metrics`.
pub trait StatusSource: Send + Sync + 'static {
    /// The `/api/status` document: `role`, `model`, `swarm` (a [`SwarmView`] or null),
    /// `swarm_error`, and a role-specific `live` object.
    fn status(&self) -> serde_json::Value;
    /// Prometheus text exposition format.
    fn metrics(&self) -> String;
}

/// `/`, `/status`, `/api/status` and `/metrics` for `source`.
pub fn router<S: StatusSource>(source: Arc<S>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status", get(page))
        .route("/api/status", get(api_status::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(source)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn api_status<S: StatusSource>(State(source): State<Arc<S>>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(source.status()),
    )
        .into_response()
}

async fn metrics<S: StatusSource>(State(source): State<Arc<S>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        source.metrics(),
    )
        .into_response()
}

/// The latest snapshot of the swarm, or why there is none.
pub type SwarmSnapshot = Option<Result<SwarmView, String>>;

/// Refreshes the snapshot of `model`'s swarm every `every` until `shutdown`, on a task of its
/// own.
pub fn watch_swarm(
    net: NetHandle,
    fingerprint: Fingerprint,
    model: ModelInfo,
    every: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<SwarmSnapshot> {
    let (rx, refresh) = swarm_watcher(net, fingerprint, model, every, shutdown);
    tokio::spawn(refresh);
    rx
}

/// The snapshot's receiver and the future that keeps it fresh, for a caller that runs its
/// tasks in a tracker of its own (and so knows when this one has ended).
pub fn swarm_watcher(
    net: NetHandle,
    fingerprint: Fingerprint,
    model: ModelInfo,
    every: Duration,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<SwarmSnapshot>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = watch::channel(None);
    let refresh = async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A lookup answers within its own query timeouts; this bound is for safety only.
            let snap = tokio::time::timeout(
                Duration::from_secs(30),
                status::snapshot(&net, &fingerprint, model.clone()),
            )
            .await;
            let snap = match snap {
                Ok(Ok(view)) => Ok(view),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the DHT lookup took longer than 30 s".into()),
            };
            if tx.send(Some(snap)).is_err() {
                break;
            }
        }
    };
    (rx, refresh)
}

/// The `swarm` and `swarm_error` fields of a status document.
pub fn swarm_fields(snapshot: &SwarmSnapshot) -> (serde_json::Value, serde_json::Value) {
    match snapshot {
        None => (serde_json::Value::Null, "looking up the swarm...".into()),
        Some(Ok(view)) => (
            serde_json::to_value(view).unwrap_or_default(),
            serde_json::Value::Null,
        ),
        Some(Err(e)) => (serde_json::Value::Null, e.as_str().into()),
    }
}

/// Events per second over a sliding window (live generation or serving speed).
pub struct RateMeter {
    window: Duration,
    events: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

impl RateMeter {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            events: Default::default(),
        }
    }

    pub fn add(&self, n: u64) {
        let now = std::time::Instant::now();
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        ev.push_back((now, n));
        Self::expire(&mut ev, now, self.window);
    }

    pub fn per_second(&self) -> f64 {
        let now = std::time::Instant::now();
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut ev, now, self.window);
        ev.iter().map(|&(_, n)| n).sum::<u64>() as f64 / self.window.as_secs_f64()
    }

    fn expire(
        ev: &mut std::collections::VecDeque<(std::time::Instant, u64)>,
        now: std::time::Instant,
        window: Duration,
    ) {
        while ev
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > window)
        {
            ev.pop_front();
        }
    }
}

/// Longest a client may take to send a request's headers (slow or stalled clients cannot hold
/// connections open forever).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// How long open requests (streams included) may run on after shutdown was asked for.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown`: HTTP/1.1 and HTTP/2 on one port (so gRPC
/// works too), with a header-read timeout, HTTP/2 keep-alive pings that drop dead peers, and
/// a cap on concurrent connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_meter_counts_only_the_window() {
        let m = RateMeter::new(Duration::from_millis(200));
        m.add(10);
        m.add(10);
        assert!((m.per_second() - 100.0).abs() < 1e-9);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(m.per_second(), 0.0);
    }
}
