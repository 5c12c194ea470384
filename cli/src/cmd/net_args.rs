use std::path::PathBuf;

use clap::Args;
use libp2p::Multiaddr;

/// Network flags shared by `join` and `bootstrap`.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Address to listen on (repeatable). Default: TCP and QUIC on port 31330, all interfaces.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// A peer of the swarm to join through (repeatable); `/p2p/<peer id>` may be left out.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Key file that keeps this node's peer id across restarts (created when missing).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Address other peers should dial to reach this one, announced instead of the listening
    /// addresses (repeatable; for port forwards and proxies).
    #[arg(long = "external-address", value_name = "MULTIADDR")]
    pub external: Vec<Multiaddr>,
    /// Key file of a private swarm (make one with `edge-node swarm-key FILE`): only peers with
    /// the same key can connect. A private swarm runs on TCP only.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Relay circuits (circuit relay v2, with limits) for peers behind NAT: `on`, `off`, or
    /// `auto` (once an address of this peer is confirmed reachable from outside). Default: `on`
    /// for `bootstrap`, `auto` for `join`.
    #[arg(long, value_name = "on|off|auto")]
    pub relay: Option<swarm::host::RelayServer>,
    /// Do not reserve a relayed address through the relays this node meets (a node behind NAT
    /// then cannot be dialled unless its router forwards a port).
    #[arg(long)]
    pub no_relay_listen: bool,
}

impl NetArgs {
    /// The options of a serving node (`join`); `bootstrap` overrides the relay defaults.
    pub fn options(&self) -> node::NetOptions {
        let listen = if self.listen.is_empty() {
            ["/ip4/0.0.0.0/tcp/31330", "/ip4/0.0.0.0/udp/31330/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect()
        } else {
            self.listen.clone()
        };
        node::NetOptions {
            listen,
            bootstrap: self.bootstrap.clone(),
            identity: self.identity.clone(),
            mdns: !self.no_mdns,
            external: self.external.clone(),
            swarm_key: self.swarm_key.clone(),
            relay: self.relay.unwrap_or(swarm::host::RelayServer::Auto),
            relay_listen: !self.no_relay_listen,
        }
    }
}
