//! Peers behind NAT: circuit relay v2, DCUtR hole punching and AutoNAT, with the policy of who
//! relays for whom and how much.
//!
//! A home node behind a NAT router cannot be dialled. It reserves a slot on a relay (a bootstrap
//! peer, or any node with a public address) and listens on, and announces, the relayed address
//! `/…/p2p/<relay>/p2p-circuit/p2p/<node>`. Whoever dials that address reaches it through the
//! relay; both ends then try DCUtR (simultaneous dials to each other's observed addresses),
//! which opens a direct connection where the NATs keep a mapping per local port (endpoint-
//! independent mapping). Where they do not, the relayed connection carries the traffic, within
//! the limits below. AutoNAT tells a node whether others can dial it directly; a node that is
//! reachable then offers relaying itself when its policy is [`RelayServer::Auto`].

use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{autonat, relay, Multiaddr, PeerId};

/// Whether this peer relays circuits for peers behind NAT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayServer {
    /// Never (clients: they come and go, and relay for nobody).
    #[default]
    Off,
    /// Once one of this peer's addresses is confirmed reachable from outside (by AutoNAT, or
    /// given with `--external-address`): a node with a public address helps the ones without.
    Auto,
    /// Always, from the start (bootstrap peers: they are reachable by definition).
    On,
}

impl std::str::FromStr for RelayServer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            _ => Err(format!("relay mode {s:?}: expected off, auto or on")),
        }
    }
}

/// What a host does about NAT. The default is a client's: it dials relayed addresses and hole
/// punches, but relays nothing and reserves no relayed address of its own.
#[derive(Clone, Debug)]
pub struct NatOptions {
    pub relay_server: RelayServer,
    /// Reserve a relayed address through relays this peer connects to (serving nodes, which
    /// must be dialable even behind NAT).
    pub relay_listen: bool,
    /// Addresses known to reach this peer (port forwards): confirmed external addresses from
    /// the start, so Kademlia, identify and the relay server treat the peer as reachable.
    pub external: Vec<Multiaddr>,
}

impl Default for NatOptions {
    fn default() -> Self {
        Self {
            relay_server: RelayServer::Off,
            relay_listen: false,
            external: Vec::new(),
        }
    }
}

/// At most this many relays hold a reservation for one node: one is enough to be reachable,
/// a second survives one relay leaving.
pub const MAX_RELAYS: usize = 2;

/// How long a dial that ended on a relayed connection waits for the hole punch that follows
/// before it reports "connected": streams opened before the punch would stay on the relay.
pub const PUNCH_WAIT: Duration = Duration::from_secs(4);

/// Relay limits. A relay forwards bytes it cannot use, so it must not be a free proxy: few
/// reservations and circuits, each bounded in time and bytes. The circuit budget is sized for
/// its real use, the DHT traffic of a home node plus inference steps until a hole punch
/// succeeds (or, where the NAT does not allow one, a generation of a few hundred tokens of a
/// small model: a 576-wide f32 hidden state is 2.3 KB a token).
pub const MAX_RESERVATIONS: usize = 128;
pub const MAX_RESERVATIONS_PER_PEER: usize = 4;
pub const RESERVATION_DURATION: Duration = Duration::from_secs(60 * 60);
pub const MAX_CIRCUITS: usize = 64;
pub const MAX_CIRCUITS_PER_PEER: usize = 8;
pub const MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(10 * 60);
pub const MAX_CIRCUIT_BYTES: u64 = 64 * 1024 * 1024;

/// New circuits a source peer may open at once, then one every [`CIRCUIT_REFILL_PER_PEER`].
pub const CIRCUIT_BURST_PER_PEER: u32 = 30;
pub const CIRCUIT_REFILL_PER_PEER: Duration = Duration::from_secs(10);
/// New circuits one source IP may open at once, then one every [`CIRCUIT_REFILL_PER_IP`].
pub const CIRCUIT_BURST_PER_IP: u32 = 120;
pub const CIRCUIT_REFILL_PER_IP: Duration = Duration::from_secs(2);

/// The relay server's configuration: the limits above, libp2p's default reservation rate limits
/// (a burst of 30 per peer and 60 per IP, then one every 2 minutes per peer and one a minute per
/// IP), and circuit rate limits of our own. libp2p's defaults for circuits (a burst of 60 per
/// IP, then one a minute) ran out after about ten generations from one home in the namespace
/// bench: each generation opens a circuit to every node of its route before the hole punch, and
/// the clients of a whole carrier-grade NAT share one IP. Circuits stay bounded in number,
/// duration and bytes by the limits above, so a faster refill does not make the relay a proxy.
pub fn relay_config() -> relay::Config {
    let mut config = relay::Config {
        max_reservations: MAX_RESERVATIONS,
        max_reservations_per_peer: MAX_RESERVATIONS_PER_PEER,
        reservation_duration: RESERVATION_DURATION,
        max_circuits: MAX_CIRCUITS,
        max_circuits_per_peer: MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: MAX_CIRCUIT_DURATION,
        max_circuit_bytes: MAX_CIRCUIT_BYTES,
        ..relay::Config::default()
    };
    config.circuit_src_rate_limiters.clear();
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    config
        .circuit_src_per_peer(nonzero(CIRCUIT_BURST_PER_PEER), CIRCUIT_REFILL_PER_PEER)
        .circuit_src_per_ip(nonzero(CIRCUIT_BURST_PER_IP), CIRCUIT_REFILL_PER_IP)
}

/// AutoNAT (v1): other peers try to dial this one back at its observed addresses. Probes
/// start soon after joining (a node wants to know early whether to relay for others), and are
/// answered for peers at private addresses too: a server only ever dials the prober's own
/// observed IP, so this opens nothing new, and home swarms, test benches and carrier-grade NAT
/// (100.64/10) would otherwise never learn anything.
pub fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(5),
        retry_interval: Duration::from_secs(30),
        timeout: Duration::from_secs(15),
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The address to listen on to reserve a slot on `relay` reached at `relay_addr` (the address
/// this peer dialled it on): `<relay_addr>/p2p/<relay>/p2p-circuit`.
pub fn circuit_listen_addr(relay_addr: &Multiaddr, relay: PeerId) -> Multiaddr {
    let mut base: Multiaddr = relay_addr
        .iter()
        .take_while(|p| !matches!(p, Protocol::P2p(_) | Protocol::P2pCircuit))
        .collect();
    base.push(Protocol::P2p(relay));
    base.with(Protocol::P2pCircuit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_is_bounded_in_circuits_time_and_bytes() {
        let c = relay_config();
        assert_eq!(c.max_circuits, MAX_CIRCUITS);
        assert_eq!(c.max_circuits_per_peer, MAX_CIRCUITS_PER_PEER);
        assert_eq!(c.max_circuit_duration, MAX_CIRCUIT_DURATION);
        assert_eq!(c.max_circuit_bytes, MAX_CIRCUIT_BYTES);
        assert_eq!(c.max_reservations, MAX_RESERVATIONS);
        assert_eq!(c.max_reservations_per_peer, MAX_RESERVATIONS_PER_PEER);
        // Rate limits: libp2p's, two on reservations and two on new circuits.
        assert_eq!(c.reservation_rate_limiters.len(), 2);
        assert_eq!(c.circuit_src_rate_limiters.len(), 2);
        // Finite, and far from "unlimited".
        const { assert!(MAX_CIRCUIT_BYTES <= 1 << 30) };
        assert!(c.max_circuit_duration <= Duration::from_secs(3600));
    }

    #[test]
    fn a_circuit_address_names_the_relay_once() {
        let relay = PeerId::random();
        let plain: Multiaddr = "/ip4/100.64.0.1/tcp/31000".parse().unwrap();
        let with_id = plain.clone().with(Protocol::P2p(relay));
        let want: Multiaddr = format!("/ip4/100.64.0.1/tcp/31000/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(circuit_listen_addr(&plain, relay), want);
        assert_eq!(circuit_listen_addr(&with_id, relay), want);
        assert!(is_relayed(&want));
        assert!(!is_relayed(&plain));
    }

    #[test]
    fn relay_modes_parse() {
        assert_eq!("on".parse::<RelayServer>(), Ok(RelayServer::On));
        assert_eq!("auto".parse::<RelayServer>(), Ok(RelayServer::Auto));
        assert_eq!("off".parse::<RelayServer>(), Ok(RelayServer::Off));
        assert!("maybe".parse::<RelayServer>().is_err());
    }
}

/// Three hosts on loopback: a relay, a node that reserves a relayed address through it, and a
/// client that reaches the node by that address alone.
#[cfg(test)]
mod relayed {
    use std::time::Duration;

    use libp2p::identity::Keypair;
    use libp2p::multiaddr::Protocol;
    use libp2p::Multiaddr;
    use tokio_util::sync::CancellationToken;

    use super::{is_relayed, NatOptions, RelayServer};
    use crate::host::{start_with, Host, NetConfig};

    fn host(bootstrap: Vec<Multiaddr>, nat: NatOptions, stop: &CancellationToken) -> Host {
        let config = NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            mdns: false,
            dht_server: true,
            on_listen: None,
            swarm_key: None,
        };
        start_with(config, nat, stop.clone()).unwrap()
    }

    /// The first listening address `pick` accepts, waiting (bounded) for it to appear.
    async fn address(h: &Host, pick: impl Fn(&Multiaddr) -> bool) -> Multiaddr {
        for _ in 0..200 {
            if let Some(a) = h.handle.listen_addrs().await.into_iter().find(&pick) {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no such listening address within 10 s");
    }

    #[tokio::test]
    async fn a_node_reserves_a_relayed_address_and_is_dialled_through_it() {
        let stop = CancellationToken::new();
        let relay = host(
            Vec::new(),
            NatOptions {
                relay_server: RelayServer::On,
                ..NatOptions::default()
            },
            &stop,
        );
        let relay_addr = address(&relay, |a| !is_relayed(a))
            .await
            .with(Protocol::P2p(relay.handle.peer_id()));
        let node = host(
            vec![relay_addr.clone()],
            NatOptions {
                relay_listen: true,
                ..NatOptions::default()
            },
            &stop,
        );
        let circuit = address(&node, is_relayed).await;
        let want_prefix = format!("{relay_addr}/p2p-circuit");
        assert!(
            circuit.to_string().starts_with(&want_prefix),
            "{circuit} is not through {relay_addr}"
        );
        // A client that knows only the relayed address reaches the node.
        let client = host(vec![relay_addr], NatOptions::default(), &stop);
        // As a real client does (`SwarmClient::connect`): join through the bootstrap first. A
        // circuit dialled while the connection to its relay is still being made is refused by
        // libp2p's relay client ("Response from behaviour was canceled").
        for _ in 0..200 {
            if client.handle.connected_peers().await > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
            .handle
            .dial(
                node.handle.peer_id(),
                vec![circuit],
                Duration::from_secs(15),
            )
            .await
            .unwrap();
        stop.cancel();
        for h in [relay, node, client] {
            let _ = h.task.await;
        }
    }

    /// Two callers dialling the same peer at once both get the connection: the second dial
    /// finds the first under way and waits for it instead of failing (a client that opens
    /// several spans on one peer, or dials while a probe does, used to get "dial condition
    /// ... cancelling new dial" and banned a healthy peer).
    #[tokio::test]
    async fn dials_to_a_peer_already_being_dialled_wait_for_that_dial() {
        let stop = CancellationToken::new();
        let target = host(Vec::new(), NatOptions::default(), &stop);
        let addr = address(&target, |a| !is_relayed(a)).await;
        let caller = host(Vec::new(), NatOptions::default(), &stop);
        let peer = target.handle.peer_id();
        let wait = Duration::from_secs(15);
        let (a, b) = tokio::join!(
            caller.handle.dial(peer, vec![addr.clone()], wait),
            caller.handle.dial(peer, vec![addr], wait),
        );
        a.unwrap();
        b.unwrap();
        stop.cancel();
        for h in [target, caller] {
            let _ = h.task.await;
        }
    }
}
