//! Routing: which peers serve which blocks for one inference session. (Where a server should
//! sit, the other side of the same question, is `swarm::placement`: servers decide it.)
//!
//! Planning is a pure function of what discovery reports, the client's own measurements and
//! the current time, all passed in. The swarm client, the simulations and the tests can then
//! run the same planner on live, simulated or generated data and get the same plan for the
//! same input.

pub mod load_aware;
pub mod planner;

pub use load_aware::plan_load_aware;
pub use planner::*;

/// How a client chooses its routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// [`plan_route`]: the cheapest route for a client alone in the swarm. The default, as
    /// its plans are reproducible (tests and benchmarks rely on which peer a route uses).
    #[default]
    Planner,
    /// [`plan_load_aware`]: priced at announced load, near-equal routes chosen at random, so
    /// that many clients spread over the swarm.
    LoadAware,
}
