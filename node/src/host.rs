//! The node's libp2p host: its identity, and the listening addresses it prints (scripts wait
//! for them on stdout) and announces.

use std::sync::{Arc, Mutex};

use libp2p::Multiaddr;
use swarm::host::NatOptions;
use swarm::{host, identity, swarm_key, Host, NetConfig, OnListen};
use tokio_util::sync::CancellationToken;

use crate::config::NetOptions;
use crate::error::JoinError;

/// The addresses this node listens on, as reported so far (what it announces).
pub type ListenAddrs = Arc<Mutex<Vec<Multiaddr>>>;

/// Prints each listening address on stdout the moment it is known, and keeps it.
fn print_listen() -> (ListenAddrs, OnListen) {
    let addrs = Arc::new(Mutex::new(Vec::new()));
    let a = addrs.clone();
    let cb = Box::new(move |addr: &Multiaddr| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
        if let Ok(mut v) = a.lock() {
            v.push(addr.clone());
        }
    });
    (addrs, cb)
}

/// Starts the host as a DHT server; returns it with the addresses to announce (the
/// `--external` ones when given, else those it listens on, relayed ones included once a relay
/// has accepted a reservation).
pub fn start(
    opts: &NetOptions,
    shutdown: &CancellationToken,
) -> Result<(Host, ListenAddrs), JoinError> {
    let (addrs, on_listen) = print_listen();
    let announced = if opts.external.is_empty() {
        addrs
    } else {
        Arc::new(Mutex::new(opts.external.clone()))
    };
    let nat = NatOptions {
        relay_server: opts.relay,
        // A node with a port forward is dialled there; it needs no relay.
        relay_listen: opts.relay_listen && opts.external.is_empty(),
        external: opts.external.clone(),
    };
    let host = host::start_with(
        NetConfig {
            keypair: identity::load_or_generate(opts.identity.as_deref())?,
            listen: opts.listen.clone(),
            bootstrap: opts.bootstrap.clone(),
            mdns: opts.mdns,
            dht_server: true,
            on_listen: Some(on_listen),
            swarm_key: opts.swarm_key.as_deref().map(swarm_key::load).transpose()?,
        },
        nat,
        shutdown.clone(),
    )?;
    tracing::info!(peer = %host.handle.peer_id(), "network started");
    Ok((host, announced))
}
