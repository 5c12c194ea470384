//! Wire formats shared by peers and clients. Empty until the swarm protocol lands: the
//! `.proto` files and tensor encoding are defined together with the node that speaks them.
