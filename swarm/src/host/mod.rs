//! The libp2p host of a peer or client, built here and only here. One event-loop task
//! ([`event_loop`]) owns the swarm; everything else talks to it through a cloneable
//! [`NetHandle`] ([`handle`]) whose commands each carry a one-shot reply. Every pending request
//! is answered, with a result or an error, when its query ends, when its own deadline passes or
//! when the loop stops: nothing is left hanging.
//!
//! Transports: QUIC and TCP (Noise + Yamux); in a private swarm TCP only, behind the pnet
//! handshake; both with the circuit relay v2 client transport on top, so peers behind NAT can
//! be dialled through a relay ([`nat`]). Behaviours: Kademlia (our own protocol name, so we
//! never mix with other DHTs), identify, ping (round-trip times for route planning), optional
//! mDNS for zero-configuration home LANs, raw streams for the inference data plane, and for NAT
//! traversal the relay client, an optional relay server, DCUtR and AutoNAT.

mod event_loop;
mod handle;
mod link_rates;
pub mod nat;
mod relay_guard;

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, Mode};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour};
use libp2p::{
    autonat, dcutr, identify, mdns, noise, ping, relay, tcp, yamux, Multiaddr, StreamProtocol,
};
use tokio::sync::mpsc;

pub use handle::NetHandle;
pub use link_rates::Direction;
pub use nat::{NatOptions, RelayServer};

use event_loop::EventLoop;

/// The inference data plane as a libp2p protocol: [`proto::INFERENCE_PROTOCOL`], typed for
/// stream controls.
pub const INFERENCE_STREAM: StreamProtocol = StreamProtocol::new(proto::INFERENCE_PROTOCOL);
/// Server-to-server push ([`proto::PUSH_PROTOCOL`]): a node forwards its output to the next span.
pub const PUSH_STREAM: StreamProtocol = StreamProtocol::new(proto::PUSH_PROTOCOL);
const DHT_STREAM: StreamProtocol = StreamProtocol::new(proto::DHT_PROTOCOL);
/// A block's record lists every server of that block; a few hundred fit in this.
const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid listen address {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("building the libp2p swarm: {0}")]
    Build(String),
    #[error("could not reach {peer}: {reason}")]
    Dial { peer: String, reason: String },
    #[error("DHT {op} timed out after {secs:.1}s")]
    Timeout { op: &'static str, secs: f64 },
    #[error("DHT put failed: {0}")]
    Put(String),
    #[error("the network task has stopped")]
    Stopped,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The behaviours of every host; `mdns_on` adds mDNS discovery on the local network, and
/// `relay_server` (anything but [`RelayServer::Off`]) the circuit relay v2 server.
fn make_behaviour(
    key: &Keypair,
    peer_id: libp2p::PeerId,
    mdns_on: bool,
    relay_server: RelayServer,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, BoxError> {
    let mut kcfg = kad::Config::new(DHT_STREAM);
    kcfg.set_query_timeout(Duration::from_secs(10));
    // Servers re-announce themselves on their own period; the DHT must not keep re-publishing
    // stale copies for a day.
    kcfg.set_publication_interval(None);
    kcfg.set_record_ttl(Some(Duration::from_secs(600)));
    // A put is merged into what this peer holds (crate::record::merge_stored), never stored
    // over it: otherwise any peer could erase every honest server's entry.
    kcfg.set_record_filtering(kad::StoreInserts::FilterBoth);
    let store_cfg = kad::store::MemoryStoreConfig {
        max_value_bytes: MAX_RECORD_BYTES,
        ..Default::default()
    };
    let store = MemoryStore::with_config(peer_id, store_cfg);
    let mdns = if mdns_on {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };
    let relay = (relay_server != RelayServer::Off).then(|| {
        let mut server = relay::Behaviour::new(peer_id, nat::relay_config());
        // Not libp2p's automatic status: that turns the relay on for any confirmed external
        // address, relayed ones included, so a node behind NAT would offer to relay. `Auto`
        // is turned on by the event loop when a direct address is confirmed.
        server.set_status(Some(if relay_server == RelayServer::On {
            relay::Status::Enable
        } else {
            relay::Status::Disable
        }));
        relay_guard::GuardedRelay::new(server)
    });
    Ok(Behaviour {
        kad: kad::Behaviour::with_config(peer_id, store, kcfg),
        // Pushed when our addresses change: a relayed address appears only after a relay has
        // accepted the reservation, and peers must learn it before their next periodic identify.
        identify: identify::Behaviour::new(
            identify::Config::new(proto::IDENTIFY_PROTOCOL.into(), key.public())
                .with_push_listen_addr_updates(true),
        ),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        mdns: mdns.into(),
        stream: libp2p_stream::Behaviour::new(),
        relay_client,
        relay: relay.into(),
        dcutr: dcutr::Behaviour::new(peer_id),
        autonat: autonat::Behaviour::new(peer_id, nat::autonat_config()),
    })
}

/// Callback told each new listening address.
pub type OnListen = Box<dyn Fn(&Multiaddr) + Send>;
pub struct NetConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Serve DHT queries (peers do; a client that only generates need not).
    pub dht_server: bool,
    /// Called with each address the swarm starts listening on, full with `/p2p/<id>`.
    pub on_listen: Option<OnListen>,
    /// A private swarm's shared key (see [`crate::swarm_key`]): only peers holding it can
    /// connect. Such a swarm runs on TCP only (the pnet handshake needs a byte stream).
    pub swarm_key: Option<PreSharedKey>,
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay_guard::GuardedRelay>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
}

/// A started host: its handle, plus the task that owns the swarm. Whoever started it awaits
/// `task` after cancelling the shutdown token, so the swarm is gone before the process is.
pub struct Host {
    pub handle: NetHandle,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the swarm and its event loop as a client does about NAT ([`NatOptions::default`]:
/// dials relayed addresses and hole punches, relays nothing); stops when `shutdown` resolves or
/// every handle is gone.
pub fn start(
    config: NetConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Host, NetError> {
    start_with(config, NatOptions::default(), shutdown)
}

/// [`start`], with what this peer does about NAT: relay for others, reserve a relayed address.
pub fn start_with(
    config: NetConfig,
    nat: NatOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Host, NetError> {
    let peer_id = config.keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let dht_server = config.dht_server;
    let relay_server = nat.relay_server;
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let behaviour = move |key: &Keypair,
                          relay_client: relay::client::Behaviour|
          -> Result<Behaviour, BoxError> {
        make_behaviour(key, peer_id, mdns_on, relay_server, relay_client)
    };
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(120));
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone()).with_tokio();
    let mut swarm = match &config.swarm_key {
        None => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| build(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| build(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| build(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| build(&e))?
            .with_swarm_config(idle)
            .build(),
        Some(psk) => {
            let psk = *psk;
            builder
                .with_other_transport(|key| {
                    use libp2p::core::upgrade::Version;
                    use libp2p::Transport;
                    let noise = noise::Config::new(key)?;
                    Ok::<_, BoxError>(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default()),
                    )
                })
                .map_err(|e| build(&e))?
                .with_dns()
                .map_err(|e| build(&e))?
                // Circuits run inside connections to the relay, which pnet already guards.
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| build(&e))?
                .with_behaviour(behaviour)
                .map_err(|e| build(&e))?
                .with_swarm_config(idle)
                .build()
        }
    };
    // On loopback and in LANs no address is ever "confirmed external", so kad would stay a
    // client forever; peers must answer DHT queries from the start.
    swarm.behaviour_mut().kad.set_mode(Some(if dht_server {
        Mode::Server
    } else {
        Mode::Client
    }));
    for addr in &config.listen {
        if config.swarm_key.is_some() && addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            tracing::warn!(%addr, "not listening on QUIC: a private swarm runs on TCP only");
            continue;
        }
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &nat.external {
        // Given by the operator (a port forward): reachable without asking AutoNAT.
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, "cannot dial bootstrap address: {e}");
        }
    }
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(256);
    let event_loop = EventLoop::new(swarm, rx, config.on_listen, config.bootstrap, nat);
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok(Host {
        handle: NetHandle::new(tx, config.keypair, control),
        task,
    })
}
