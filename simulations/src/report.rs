//! Turns raw measurements into the per-policy report and its plots.

use serde::Serialize;

use crate::network::RoutePolicy;
use crate::plot::{bar_chart, line_chart, Series};
use crate::profiles::LinkProfile;
use crate::scenario::{Config, Device, Leave, Schedule, DEVICES};
use crate::sim::{Policy, Raw, Sample};

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub config: Config,
    pub links: Vec<LinkProfile>,
    pub devices: Vec<Device>,
    pub swarm: SwarmSummary,
    pub policies: Vec<PolicyReport>,
    /// The same swarm after a skewed join, without clients: rebalancing against static
    /// placement.
    pub skewed_join: PlacementStudy,
}

/// Weakest block over mean block throughput that a placement should reach.
pub const EVEN_TARGET: f64 = 0.8;

/// How quickly placement recovers from [`crate::scenario::Scenario::SkewedJoin`].
#[derive(Debug, Serialize)]
pub struct PlacementStudy {
    pub target: f64,
    pub rebalance: PlacementRun,
    #[serde(rename = "static")]
    pub fixed: PlacementRun,
}

#[derive(Debug, Serialize)]
pub struct PlacementRun {
    pub moves: u64,
    /// First sample at which the weakest block reached `target` of the mean, if any.
    pub minutes_to_target: Option<f64>,
    /// Weakest over mean block throughput at the first sample and at the last.
    pub evenness_start: f64,
    pub evenness_end: f64,
    pub samples: Vec<Sample>,
}

fn evenness(s: &Sample) -> f64 {
    if s.mean > 0.0 {
        s.weakest / s.mean
    } else {
        0.0
    }
}

impl PlacementRun {
    fn new(raw: &Raw) -> Self {
        Self {
            moves: raw.moves,
            minutes_to_target: raw
                .samples
                .iter()
                .find(|s| evenness(s) >= EVEN_TARGET)
                .map(|s| round(s.minute)),
            evenness_start: round(raw.samples.first().map_or(0.0, evenness)),
            evenness_end: round(raw.samples.last().map_or(0.0, evenness)),
            samples: raw.samples.iter().map(rounded).collect(),
        }
    }
}

impl PlacementStudy {
    pub fn new(rebalance: &Raw, fixed: &Raw) -> Self {
        Self {
            target: EVEN_TARGET,
            rebalance: PlacementRun::new(rebalance),
            fixed: PlacementRun::new(fixed),
        }
    }
}

fn rounded(s: &Sample) -> Sample {
    Sample {
        minute: round(s.minute),
        weakest: round(s.weakest),
        mean: round(s.mean),
    }
}

/// The churn every policy faced.
#[derive(Debug, Serialize)]
pub struct SwarmSummary {
    pub peers_at_start: usize,
    pub arrivals: usize,
    pub graceful_leaves: usize,
    pub crashes: usize,
    pub freezes: usize,
}

#[derive(Debug, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub policy: Policy,
    pub tokens: u64,
    /// Tokens per second of time spent generating (open, prefill and decode), per client.
    pub tokens_per_s_per_client: Spread,
    /// Time of each decode step, failures and their recovery included.
    pub token_latency_ms: Spread,
    pub generations: Generations,
    pub recovery: Recovery,
    pub block_throughput: Coverage,
    /// Blocks moves made by rebalancing.
    pub moves: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Spread {
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Generations {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    /// Still running when the simulation ended.
    pub unfinished: u64,
}

#[derive(Debug, Serialize)]
pub struct Recovery {
    /// Failed spans replaced by the session (peer lost, timed out or moved away).
    pub reroutes: usize,
    /// Generations that lost a peer, and how many of them still completed.
    pub generations_hit: u64,
    pub generations_recovered: u64,
    /// From the failure being noticed to the replacement having replayed the history.
    pub recovery_ms: Spread,
}

#[derive(Debug, Serialize)]
pub struct Coverage {
    /// Lowest weakest-block throughput over the run, tokens/s.
    pub weakest_min: f64,
    pub weakest_mean: f64,
    /// Mean over samples of (weakest block / mean block): 1 is perfectly even.
    pub evenness: f64,
    /// Samples in which some block had no online peer.
    pub uncovered_samples: usize,
    pub samples: Vec<Sample>,
}

fn round(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// Nearest-rank percentile of sorted data.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn spread(values: &[f64]) -> Spread {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread::default();
    }
    Spread {
        n: v.len(),
        mean: round(v.iter().sum::<f64>() / v.len() as f64),
        min: round(v[0]),
        p50: round(pct(&v, 0.5)),
        p90: round(pct(&v, 0.9)),
        p99: round(pct(&v, 0.99)),
        max: round(v[v.len() - 1]),
    }
}

impl PolicyReport {
    pub fn new(policy: Policy, raw: &Raw) -> Self {
        let per_client: Vec<f64> = raw
            .client_tokens
            .iter()
            .zip(&raw.client_busy_ms)
            .map(|(&t, &ms)| if ms > 0.0 { t as f64 / (ms / 1e3) } else { 0.0 })
            .collect();
        let weakest: Vec<f64> = raw.samples.iter().map(|s| s.weakest).collect();
        let evenness = raw
            .samples
            .iter()
            .map(|s| {
                if s.mean > 0.0 {
                    s.weakest / s.mean
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / raw.samples.len().max(1) as f64;
        Self {
            name: policy.name(),
            policy,
            tokens: raw.client_tokens.iter().sum(),
            tokens_per_s_per_client: spread(&per_client),
            token_latency_ms: spread(&raw.token_latency_ms),
            generations: Generations {
                started: raw.started,
                completed: raw.completed,
                failed: raw.failed,
                unfinished: raw.started - raw.completed - raw.failed,
            },
            recovery: Recovery {
                reroutes: raw.recovery_ms.len(),
                generations_hit: raw.hit,
                generations_recovered: raw.hit_completed,
                recovery_ms: spread(&raw.recovery_ms),
            },
            block_throughput: Coverage {
                weakest_min: round(weakest.iter().copied().fold(f64::INFINITY, f64::min)),
                weakest_mean: round(weakest.iter().sum::<f64>() / weakest.len().max(1) as f64),
                evenness: round(evenness),
                uncovered_samples: weakest.iter().filter(|&&w| w <= 0.0).count(),
                samples: raw.samples.iter().map(rounded).collect(),
            },
            moves: raw.moves,
        }
    }
}

impl Report {
    pub fn new(
        cfg: &Config,
        links: &[LinkProfile],
        schedule: &Schedule,
        policies: Vec<PolicyReport>,
        skewed_join: PlacementStudy,
    ) -> Self {
        let leaves = |kind| {
            schedule
                .peers
                .iter()
                .filter(|p| p.leave.is_some_and(|(_, k)| k == kind))
                .count()
        };
        let at_start = schedule.peers.iter().filter(|p| p.join_ms == 0).count();
        Self {
            seed: cfg.seed,
            config: cfg.clone(),
            links: links.to_vec(),
            devices: DEVICES.to_vec(),
            swarm: SwarmSummary {
                peers_at_start: at_start,
                arrivals: schedule.peers.len() - at_start,
                graceful_leaves: leaves(Leave::Graceful),
                crashes: leaves(Leave::Crash),
                freezes: leaves(Leave::Freeze),
            },
            policies,
            skewed_join,
        }
    }
}

fn color(route: RoutePolicy) -> &'static str {
    match route {
        RoutePolicy::Planner => "#1f77b4",
        RoutePolicy::LoadAware => "#9467bd",
        RoutePolicy::FewestHops => "#ff7f0e",
        RoutePolicy::Random => "#2ca02c",
    }
}

/// The plots, as (file name, SVG).
pub fn plots(report: &Report, raws: &[Raw]) -> Vec<(&'static str, String)> {
    let cdf: Vec<Series> = report
        .policies
        .iter()
        .zip(raws)
        .map(|(p, raw)| {
            let mut v = raw.token_latency_ms.clone();
            v.sort_by(f64::total_cmp);
            let points = (0..=200)
                .filter(|_| !v.is_empty())
                .map(|k| {
                    let q = f64::from(k) / 200.0;
                    (pct(&v, q.max(1e-9)).max(0.1), q)
                })
                .collect();
            Series {
                name: p.name.clone(),
                color: color(p.policy.route),
                dashed: !p.policy.rebalance,
                points,
            }
        })
        .collect();
    // Placement does not depend on the clients' routes: one line per placement policy.
    let first_route = report.policies.first().map(|p| p.policy.route);
    let weakest: Vec<Series> = report
        .policies
        .iter()
        .filter(|p| Some(p.policy.route) == first_route)
        .map(|p| Series {
            name: if p.policy.rebalance {
                "rebalance".into()
            } else {
                "static".into()
            },
            color: if p.policy.rebalance {
                "#1f77b4"
            } else {
                "#d62728"
            },
            dashed: !p.policy.rebalance,
            points: p
                .block_throughput
                .samples
                .iter()
                .map(|s| (s.minute, s.weakest))
                .collect(),
        })
        .collect();
    let bars = |f: &dyn Fn(&PolicyReport) -> f64| -> Vec<(String, f64, &'static str)> {
        report
            .policies
            .iter()
            .map(|p| (p.name.clone(), f(p), color(p.policy.route)))
            .collect()
    };
    let title = format!(
        "{} peers, {} blocks, seed {}",
        report.config.peers, report.config.blocks, report.seed
    );
    let skewed: Vec<Series> = [
        ("rebalance", "#1f77b4", false, &report.skewed_join.rebalance),
        ("static", "#d62728", true, &report.skewed_join.fixed),
    ]
    .into_iter()
    .map(|(name, color, dashed, run)| Series {
        name: name.into(),
        color,
        dashed,
        points: run
            .samples
            .iter()
            .map(|s| (s.minute, evenness(s)))
            .collect(),
    })
    .collect();
    vec![
        (
            "skewed_join.svg",
            line_chart(
                &format!("Weakest block / mean block after a skewed join ({title})"),
                "simulated minutes",
                "weakest / mean block throughput",
                &skewed,
                false,
            ),
        ),
        (
            "latency_cdf.svg",
            line_chart(
                &format!("Per-token latency CDF ({title})"),
                "latency per token, ms (log)",
                "fraction of tokens",
                &cdf,
                true,
            ),
        ),
        (
            "weakest_block.svg",
            line_chart(
                &format!("Weakest block's throughput ({title})"),
                "simulated minutes",
                "tokens/s of the weakest block",
                &weakest,
                false,
            ),
        ),
        (
            "tokens_per_s.svg",
            bar_chart(
                &format!("Mean tokens/s per client ({title})"),
                "tokens/s",
                &bars(&|p| p.tokens_per_s_per_client.mean),
            ),
        ),
        (
            "failures.svg",
            bar_chart(
                &format!("Failed generations ({title})"),
                "generations failed",
                &bars(&|p| p.generations.failed as f64),
            ),
        ),
    ]
}
