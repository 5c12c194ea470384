//! Seeded, deterministic simulations of large swarms, driving the project's real planning and
//! reroute code.
//!
//! A scenario (peers, blocks, hours, seed) is drawn up front ([`scenario`]): the hardware and
//! link of every peer, when it joins and how it leaves, and the clients. Each policy then runs
//! that same scenario in its own swarm ([`world`]) on a paused tokio clock, where time only
//! advances when every task waits: an hour passes in seconds and the same seed gives the same
//! report, byte for byte. Peers choose blocks with `choose_blocks` and move with `should_move`;
//! clients generate through `InferenceSession`, whose planning, bans and replay are the
//! client's own, behind the `Network` seam. Only compute and links are modelled.

pub mod compute;
pub mod network;
pub mod plot;
pub mod profiles;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod world;

use std::path::Path;
use std::sync::Arc;

pub use report::Report;
pub use scenario::Config;
pub use sim::Policy;

use network::RoutePolicy;
use profiles::{parse_links, ProfileError, LINKS_TXT};
use report::{PlacementStudy, PolicyReport};
use scenario::{Scenario, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("the simulation of {0} panicked")]
    Panicked(String),
}

/// Mean peer lifetime in the skewed-join study, whatever the main run's churn: the study asks
/// whether rebalancing evens the blocks out, and with heavy churn arrivals choosing the weakest
/// blocks would do it for static placement too.
pub const SKEWED_JOIN_LIFETIME_MIN: f64 = 120.0;

/// A finished run: the report, as it is written, and the plots.
pub struct Output {
    pub report: Report,
    pub json: String,
    pub plots: Vec<(&'static str, String)>,
}

/// Runs every policy of `policies` on the scenario of `cfg`, and both placements on the
/// skewed-join scenario of the same swarm without clients (placement does not depend on them),
/// each on its own thread: they share nothing but the drawn scenarios, so the results do not
/// depend on scheduling.
pub fn run(cfg: &Config, policies: &[Policy]) -> Result<Output, SimError> {
    let links = parse_links(LINKS_TXT)?;
    let schedule = Arc::new(Schedule::draw(cfg, &links)?);
    let mut skewed_cfg = cfg.clone();
    skewed_cfg.scenario = Scenario::SkewedJoin;
    skewed_cfg.clients = 0;
    skewed_cfg.mean_lifetime_min = SKEWED_JOIN_LIFETIME_MIN;
    let skewed = Arc::new(Schedule::draw(&skewed_cfg, &links)?);
    let placements = [true, false].map(|rebalance| Policy {
        route: RoutePolicy::Planner,
        rebalance,
    });
    let jobs: Vec<(&Config, &Arc<Schedule>, Policy)> = policies
        .iter()
        .map(|&p| (cfg, &schedule, p))
        .chain(placements.iter().map(|&p| (&skewed_cfg, &skewed, p)))
        .collect();
    let mut raws = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(cfg, schedule, policy)| {
                let (links, schedule) = (&links, schedule.clone());
                scope.spawn(move || sim::run_policy(cfg, links, schedule, policy))
            })
            .collect();
        handles
            .into_iter()
            .zip(&jobs)
            .map(|(h, (_, _, p))| match h.join() {
                Ok(r) => Ok(r?),
                Err(_) => Err(SimError::Panicked(p.name())),
            })
            .collect::<Result<Vec<_>, SimError>>()
    })?;
    let placement_raws = raws.split_off(policies.len());
    let reports = policies
        .iter()
        .zip(&raws)
        .map(|(&p, raw)| PolicyReport::new(p, raw))
        .collect();
    let study = PlacementStudy::new(&placement_raws[0], &placement_raws[1]);
    let report = Report::new(cfg, &links, &schedule, reports, study);
    let json = serde_json::to_string_pretty(&report)?;
    let plots = report::plots(&report, &raws);
    Ok(Output {
        report,
        json,
        plots,
    })
}

impl Output {
    /// Writes `report.json` and the plots into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), &self.json)?;
        for (name, svg) in &self.plots {
            std::fs::write(dir.join(name), svg)?;
        }
        Ok(())
    }
}
