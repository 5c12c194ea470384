//! Seeded simulations of large swarms. Empty until the swarm exists to be simulated.
