//! The status page and `/metrics`, served the same way by the gateway and by every node: one
//! HTML page that polls `/api/status`, and Prometheus text from whoever serves it. The swarm
//! snapshot behind the page is refreshed in the background, so page views never query the DHT.

use std::collections::HashMap;
use std::net::IpAddr;
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
/// connections open forever). A new connection must also start its first request within this
/// time, whatever protocol it speaks.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections one client address may hold at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;
/// How long a connection may stay open with no request in flight (HTTP/1.1 keep-alive and
/// HTTP/2 alike; HTTP/2 pings keep a connection alive but are not requests).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long open requests (streams included) may run on after shutdown was asked for.
const DRAIN: Duration = Duration::from_secs(5);

/// What connections may hold, so that nobody can lock everyone else out by opening many and
/// sending nothing: the slots are few, and each is freed by a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// Per client address (IPv6 clients per /64, which one client usually holds whole).
    pub per_ip: usize,
    /// From accepting a connection to its first request, and for each request's headers.
    pub header_timeout: Duration,
    /// With no request in flight, after the first.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            per_ip: MAX_CONNECTIONS_PER_IP,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` with the default [`ConnLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, router, ConnLimits::default(), shutdown).await
}

/// Serves `router` on `listener` until `shutdown`: HTTP/1.1 and HTTP/2 on one port (so gRPC
/// works too), with a header-read timeout, HTTP/2 keep-alive pings that drop dead peers, a cap
/// on concurrent connections and on those of one address, and an idle timeout.
///
/// hyper's protocol detection waits for the first bytes with no timeout of its own, and an
/// HTTP/2 connection without streams lives as long as it answers pings, so each connection is
/// watched here: closed if no request starts within `header_timeout` of accepting it, or
/// if none is in flight for `idle_timeout` afterwards.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerIp::default());
    let tasks = tokio_util::task::TaskTracker::new();
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
        let Some(ip_slot) = per_ip.take(peer.ip(), limits.per_ip) else {
            tracing::debug!(
                "refusing {peer}: its address holds {} connections already",
                limits.per_ip
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (busy_tx, busy) = watch::channel(0usize);
        let busy_tx = Arc::new(busy_tx);
        let inner = TowerToHyperService::new(router.clone());
        let client = ClientAddr(client_key(peer.ip()));
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                use hyper::service::Service;
                req.extensions_mut().insert(client);
                let in_flight = InFlight::start(&busy_tx);
                let response = inner.call(req);
                async move {
                    let response = response.await?;
                    Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                        body,
                        _in_flight: in_flight,
                    }))
                }
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let _slots = (slot, ip_slot);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!("connection from {peer}: {e}");
                    }
                    return;
                }
                _ = stop.cancelled() => {}
                _ = idle(busy, limits) => tracing::debug!("closing idle connection from {peer}"),
            }
            // Requests in flight finish; an idle connection closes at once.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN, conn).await {
                Ok(Err(e)) => tracing::debug!("connection from {peer}: {e}"),
                Ok(Ok(())) => {}
                Err(_) => {
                    tracing::debug!("connection from {peer} still busy after {DRAIN:?}; closed")
                }
            }
        });
    }
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::debug!("connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

/// Resolves when the connection whose in-flight count `busy` reports has had no request for
/// too long: `header_timeout` before its first request, `idle_timeout` after one.
async fn idle(mut busy: watch::Receiver<usize>, limits: ConnLimits) {
    let mut served = false;
    loop {
        if *busy.borrow_and_update() > 0 {
            served = true;
            if busy.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        let wait = if served {
            limits.idle_timeout
        } else {
            limits.header_timeout
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => return,
            changed = busy.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// One request being served, from its headers to the end of its response body (streams
/// included): counted so that a connection is idle only when none is.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn start(busy: &Arc<watch::Sender<usize>>) -> Self {
        busy.send_modify(|n| *n += 1);
        Self(busy.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that holds its request's [`InFlight`] until hyper is done with it.
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        hyper::body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx)
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }
}

/// Connections held per client address.
#[derive(Default)]
struct PerIp(std::sync::Mutex<HashMap<IpAddr, usize>>);

/// The address a request came from, as its connection counts against the per-address limits
/// (IPv6 by /64): a request extension, for limits on what one client may hold beyond its
/// connections (one HTTP/2 connection carries any number of requests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// One connection's share of its address's allowance, given back when dropped.
struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl PerIp {
    /// A slot for a connection from `ip`, or `None` if its address holds `limit` already.
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<IpSlot> {
        let key = client_key(ip);
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut held = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// The address a connection counts against: IPv4 as it is (also when mapped into IPv6), IPv6
/// by its /64 prefix, since one client usually holds a whole /64 and could otherwise spread
/// its connections over its addresses.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
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

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_prefix() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("10.0.0.1"), key("::ffff:10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = table.take(ip, 2).unwrap();
        let _b = table.take(ip, 2).unwrap();
        assert!(table.take(ip, 2).is_none());
        assert!(table.take("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(table.take(ip, 2).is_some());
    }

    /// Reads until the peer closes (or `limit` passes): what arrived, and whether it closed.
    async fn read_to_close(s: &mut tokio::net::TcpStream, limit: Duration) -> (String, bool) {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (String::from_utf8_lossy(&got).into(), false),
            }
        }
    }

    #[tokio::test]
    async fn silent_idle_and_crowding_connections_cannot_lock_others_out() {
        use tokio::io::AsyncWriteExt;
        use tokio::net::{TcpSocket, TcpStream};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits {
            max_connections: 16,
            per_ip: 3,
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_millis(500),
        };
        use futures::StreamExt;
        let slow = || async {
            let chunks = futures::stream::iter(0..8).then(|i| async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok::<_, std::io::Error>(format!("<{i}>"))
            });
            axum::body::Body::from_stream(chunks)
        };
        let router = Router::new()
            .route("/", get(|| async { "hello" }))
            .route("/slow", get(slow));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_with(listener, router, limits, stop.clone()));

        // 127.0.0.1 fills its allowance with connections that send nothing, or only the
        // start of the HTTP/2 preface (hyper's protocol detection waits for the rest).
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"PRI * HT").await.unwrap();
        // A fourth from the same address is closed at once...
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let (_, closed) = read_to_close(&mut refused, Duration::from_secs(30)).await;
        assert!(closed);
        // ...while those it holds are still open (their header timeout has not passed)...
        let mut probe = [0u8; 1];
        assert!(matches!(
            silent[0].try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ));
        // ...and another address is served, a response body that outlasts the idle timeout
        // included; once nothing is in flight the connection is closed as idle.
        let other = TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        other
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (answer, closed) = read_to_close(&mut other, Duration::from_secs(30)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("<0>") && answer.contains("<7>"), "{answer}");
        assert!(closed, "an idle keep-alive connection stayed open");

        // The silent and the half-preface connections are cut at the header timeout.
        for s in silent.iter_mut().chain([&mut partial]) {
            let (_, closed) = read_to_close(s, Duration::from_secs(30)).await;
            assert!(closed, "a silent connection stayed open");
        }
        // Then 127.0.0.1 is served again.
        let mut again = TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_to_close(&mut again, Duration::from_secs(30)).await;
        assert!(answer.ends_with("hello"), "{answer}");

        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
