//! A node's Prometheus metrics: what it serves and how fast. The compute thread records steps
//! and sessions where they happen; the HTTP endpoint only encodes.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use swarm::page::RateMeter;

pub struct NodeMetrics {
    registry: Registry,
    pub steps: Counter,
    /// Positions run through this node's blocks (prefill rows and decode tokens).
    pub tokens: Counter,
    pub step_seconds: Histogram,
    pub step_errors: Counter,
    /// Steps dropped because their stream closed or their session ended before the answer.
    pub steps_withdrawn: Counter,
    /// Rows and sessions of each batched product (one per span group and iteration).
    pub batch_rows: Histogram,
    pub batch_sessions: Histogram,
    /// Time from a step's arrival to its first rows being computed.
    pub queue_wait_seconds: Histogram,
    /// Prompt chunks run (a step longer than the chunk takes several).
    pub prefill_chunks: Counter,
    pub sessions: Gauge,
    pub sessions_opened: Counter,
    /// Sessions refused, by reason (`sessions_full`, `cache_full`, `leaving`, ...).
    pub sessions_refused: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub kv_cache_bytes: Gauge,
    pub kv_cache_reserved_tokens: Gauge,
    pub kv_cache_capacity_tokens: Gauge,
    pub block_start: Gauge,
    pub block_end: Gauge,
    /// Tokens served over the last 10 s, for the status page.
    pub rate: RateMeter,
    /// Batched products and the sessions in them over the last 10 s: their ratio is the batch
    /// occupancy the status page shows.
    pub batches_recent: RateMeter,
    pub batch_sessions_recent: RateMeter,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("edge_node");
        let m = Self {
            registry: Registry::default(),
            steps: Counter::default(),
            tokens: Counter::default(),
            // 0.1 ms .. ~1.6 s: one block of a small model up to a long prefill on a slow CPU.
            step_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            step_errors: Counter::default(),
            steps_withdrawn: Counter::default(),
            // 1 .. 1024 rows / sessions.
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            batch_sessions: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            queue_wait_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            prefill_chunks: Counter::default(),
            sessions: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_refused: Family::default(),
            kv_cache_bytes: Gauge::default(),
            kv_cache_reserved_tokens: Gauge::default(),
            kv_cache_capacity_tokens: Gauge::default(),
            block_start: Gauge::default(),
            block_end: Gauge::default(),
            rate: RateMeter::new(Duration::from_secs(10)),
            batches_recent: RateMeter::new(Duration::from_secs(10)),
            batch_sessions_recent: RateMeter::new(Duration::from_secs(10)),
        };
        r.register("steps", "Inference steps served", m.steps.clone());
        r.register(
            "tokens_processed",
            "Positions run through this node's blocks (prompt rows and generated tokens)",
            m.tokens.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Compute time of one step through this node's blocks",
            m.step_seconds.clone(),
        );
        r.register(
            "step_errors",
            "Steps that failed (bad position, unknown session, model error)",
            m.step_errors.clone(),
        );
        r.register(
            "steps_withdrawn",
            "Steps dropped because their stream or session ended before the answer",
            m.steps_withdrawn.clone(),
        );
        r.register(
            "batch_rows",
            "Rows (positions of all sessions) in one batched product",
            m.batch_rows.clone(),
        );
        r.register(
            "batch_sessions",
            "Sessions in one batched product",
            m.batch_sessions.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time from a step's arrival to its first computed rows",
            m.queue_wait_seconds.clone(),
        );
        r.register(
            "prefill_chunks",
            "Prompt chunks run (long steps are computed in several)",
            m.prefill_chunks.clone(),
        );
        r.register(
            "sessions",
            "Inference sessions open now",
            m.sessions.clone(),
        );
        r.register(
            "sessions_opened",
            "Inference sessions opened",
            m.sessions_opened.clone(),
        );
        r.register(
            "sessions_refused",
            "Sessions refused, by reason",
            m.sessions_refused.clone(),
        );
        r.register(
            "kv_cache_bytes",
            "Bytes of KV cache allocated for open sessions",
            m.kv_cache_bytes.clone(),
        );
        r.register(
            "kv_cache_reserved_tokens",
            "KV-cache positions allocated to open sessions (whole pages)",
            m.kv_cache_reserved_tokens.clone(),
        );
        r.register(
            "kv_cache_capacity_tokens",
            "KV-cache positions this node offers (--cache-tokens)",
            m.kv_cache_capacity_tokens.clone(),
        );
        r.register(
            "block_start",
            "First block served (inclusive)",
            m.block_start.clone(),
        );
        r.register(
            "block_end",
            "End of the served range (exclusive); 0 while loading",
            m.block_end.clone(),
        );
        Self { registry: r, ..m }
    }
}

impl NodeMetrics {
    /// Sessions per batched product over the last 10 s (0 when idle).
    pub fn batch_occupancy(&self) -> f64 {
        let batches = self.batches_recent.per_second();
        if batches > 0.0 {
            self.batch_sessions_recent.per_second() / batches
        } else {
            0.0
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
