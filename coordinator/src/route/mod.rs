//! Routing: which peers serve which blocks for one inference session. (Where a server should
//! sit, the other side of the same question, is `swarm::placement`: servers decide it.)
//!
//! Planning is a pure function of what discovery reports, the client's own measurements and
//! the current time, all passed in. The swarm client, the simulations and the tests can then
//! run the same planner on live, simulated or generated data and get the same plan for the
//! same input.

pub mod planner;

pub use planner::*;
