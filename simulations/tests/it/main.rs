//! A small swarm simulated end to end: 300 peers, 24 blocks, 10 minutes, heavy churn.

use std::sync::OnceLock;

use simulations::network::RoutePolicy;
use simulations::report::PolicyReport;
use simulations::{run, Config, Output, Policy};

fn small(seed: u64) -> Config {
    let mut cfg = Config::new(300, 24, 10.0 / 60.0, seed);
    cfg.clients = 8;
    // Peers stay 15 minutes on average, so failures happen within the ten.
    cfg.mean_lifetime_min = 15.0;
    // The node's default gain (0.2): rebalancing has to fire with it.
    cfg.ramp_s = 30.0;
    cfg
}

fn output() -> &'static Output {
    static OUT: OnceLock<Output> = OnceLock::new();
    OUT.get_or_init(|| run(&small(11), &Policy::all()).expect("simulation runs"))
}

fn policy(route: RoutePolicy, rebalance: bool) -> &'static PolicyReport {
    output()
        .report
        .policies
        .iter()
        .find(|p| p.policy == Policy { route, rebalance })
        .expect("every policy is reported")
}

#[test]
fn same_seed_gives_the_same_report_and_another_seed_does_not() {
    let again = run(&small(11), &Policy::all()).unwrap();
    assert_eq!(output().json, again.json);
    let other = run(&small(12), &Policy::all()).unwrap();
    assert_ne!(output().json, other.json);
}

#[test]
fn every_policy_generates_tokens() {
    for p in &output().report.policies {
        assert!(p.tokens > 0, "{} produced no tokens", p.name);
        assert!(p.generations.completed > 0, "{} completed nothing", p.name);
        assert!(p.token_latency_ms.p50 > 0.0, "{}", p.name);
    }
}

#[test]
fn the_planner_is_no_slower_than_random_routes() {
    for rebalance in [true, false] {
        let planner = policy(RoutePolicy::Planner, rebalance);
        let random = policy(RoutePolicy::Random, rebalance);
        assert!(
            planner.token_latency_ms.p50 <= random.token_latency_ms.p50,
            "planner {:?} vs random {:?}",
            planner.token_latency_ms,
            random.token_latency_ms
        );
        assert!(planner.tokens >= random.tokens);
    }
}

#[test]
fn after_a_skewed_join_rebalancing_evens_the_blocks_within_ten_minutes_and_static_does_not() {
    let study = &output().report.skewed_join;
    let reached = study.rebalance.minutes_to_target;
    assert!(
        reached.is_some_and(|m| m <= 10.0),
        "rebalance: {:?}",
        study.rebalance
    );
    assert!(study.rebalance.moves > 0);
    assert_eq!(study.fixed.moves, 0);
    assert!(study.fixed.minutes_to_target.is_none(), "{:?}", study.fixed);
    assert!(study.fixed.evenness_end < study.target);
}

#[test]
fn rebalancing_moves_peers_and_keeps_the_weakest_block_at_least_as_strong() {
    for route in RoutePolicy::ALL {
        let moving = policy(route, true);
        let fixed = policy(route, false);
        assert!(moving.moves > 0);
        assert_eq!(fixed.moves, 0);
        assert!(
            moving.block_throughput.weakest_mean >= fixed.block_throughput.weakest_mean,
            "{} {} vs {}",
            moving.name,
            moving.block_throughput.weakest_mean,
            fixed.block_throughput.weakest_mean
        );
    }
}

#[test]
fn lost_peers_are_replaced_mid_generation() {
    let policies = &output().report.policies;
    assert!(output().report.swarm.crashes + output().report.swarm.freezes > 0);
    let reroutes: usize = policies.iter().map(|p| p.recovery.reroutes).sum();
    let recovered: u64 = policies
        .iter()
        .map(|p| p.recovery.generations_recovered)
        .sum();
    assert!(reroutes > 0, "churn never hit a route");
    assert!(recovered > 0, "no generation survived a failure");
}

#[test]
fn plots_are_written_as_svg() {
    let dir = std::env::temp_dir().join(format!("swarm-sim-test-{}", std::process::id()));
    output().write(&dir).unwrap();
    let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
    assert!(json.contains("\"seed\": 11"));
    for (name, _) in &output().plots {
        let svg = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Many clients on a small swarm, with the two planners only: the plain planner sends every
/// client onto the same fastest peers, the load-aware one spreads them.
fn loaded() -> &'static Output {
    static OUT: OnceLock<Output> = OnceLock::new();
    OUT.get_or_init(|| {
        let mut cfg = Config::new(200, 16, 10.0 / 60.0, 5);
        cfg.clients = 150;
        cfg.ramp_s = 30.0;
        let policies = [RoutePolicy::Planner, RoutePolicy::LoadAware].map(|route| Policy {
            route,
            rebalance: true,
        });
        run(&cfg, &policies).expect("simulation runs")
    })
}

#[test]
fn under_load_load_aware_routes_at_least_halve_the_planners_per_token_latency() {
    let [planner, aware] = [RoutePolicy::Planner, RoutePolicy::LoadAware].map(|route| {
        loaded()
            .report
            .policies
            .iter()
            .find(|p| p.policy.route == route)
            .expect("both policies ran")
    });
    assert!(
        aware.token_latency_ms.p50 <= 0.5 * planner.token_latency_ms.p50,
        "load-aware {:?} vs planner {:?}",
        aware.token_latency_ms,
        planner.token_latency_ms
    );
    assert!(aware.tokens > planner.tokens);
}
