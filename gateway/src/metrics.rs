//! The gateway's Prometheus metrics. Names follow Prometheus conventions (`_total` counters,
//! base units in seconds) so stock dashboards and alert rules apply.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request: which endpoint and how it ended (HTTP status, or gRPC code name).
pub type RequestLabels = Vec<(&'static str, String)>;

pub struct GatewayMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub reroutes: Counter,
    pub active: Gauge,
    pub generation_seconds: Histogram,
    pub first_token_seconds: Histogram,
    pub swarm_peers_online: Gauge,
    pub swarm_complete: Gauge,
    all_requests: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edge_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let reroutes = Counter::default();
        let active = Gauge::default();
        // 10 ms .. ~160 s: from a cached short answer to a long generation on slow peers.
        let generation_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        let first_token_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let swarm_peers_online = Gauge::default();
        let swarm_complete = Gauge::default();
        registry.register(
            "requests",
            "API requests by endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens generated through the swarm",
            generated_tokens.clone(),
        );
        registry.register(
            "reroutes",
            "Peers replaced during generations (failures survived)",
            reroutes.clone(),
        );
        registry.register(
            "generations_active",
            "Generations running now",
            active.clone(),
        );
        registry.register(
            "generation_duration_seconds",
            "Time from an accepted request to its last token",
            generation_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from an accepted request to its first token (route set-up and prefill)",
            first_token_seconds.clone(),
        );
        registry.register(
            "swarm_peers_online",
            "Online servers of the model in the latest swarm snapshot",
            swarm_peers_online.clone(),
        );
        registry.register(
            "swarm_complete",
            "1 when every block has an online server in the latest snapshot",
            swarm_complete.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            reroutes,
            active,
            generation_seconds,
            first_token_seconds,
            swarm_peers_online,
            swarm_complete,
            all_requests: Counter::default(),
        }
    }
}

impl GatewayMetrics {
    pub fn request(&self, endpoint: &'static str, outcome: impl Into<String>) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.into()),
                ("outcome", outcome.into()),
            ])
            .inc();
        self.all_requests.inc();
    }

    /// Every request so far, for the status page (the family is for Prometheus).
    pub fn requests_total(&self) -> u64 {
        self.all_requests.get()
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
