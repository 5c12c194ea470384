//! The status page and `/metrics`, served the same way by the gateway and by every node: one
//! HTML page that polls `/api/status`, and Prometheus text from whoever serves it. The swarm
//! snapshot behind the page is refreshed in the background, so page views never query the DHT.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use coordinator::net::NetHandle;
use coordinator::status::{self, ModelInfo, SwarmView};
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

/// Refreshes the snapshot of `model`'s swarm every `every` until `shutdown`.
pub fn watch_swarm(
    net: NetHandle,
    fingerprint: Fingerprint,
    model: ModelInfo,
    every: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<SwarmSnapshot> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
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
    });
    rx
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

/// Serves `router` on `listener` until `shutdown` (HTTP/1.1 and HTTP/2, so gRPC works too).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
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
