//! The circuit relay server, kept from crashing its relayed connections when it is turned on.
//!
//! libp2p-relay 0.22 gives relayed connections a dummy handler (no relaying over a relay), but
//! [`relay::Behaviour::set_status`] still sends the new status to every connection it tracks,
//! relayed ones included. libp2p-swarm's `Either` handler then reaches `unreachable!()` and the
//! connection's task panics, taking every stream on it: in the namespace bench a node behind NAT
//! whose AutoNAT confirmed an address (`--relay auto`) dropped the relayed connection a client's
//! session ran on, mid-generation. This wrapper passes everything through except events for
//! relayed connections, which the dummy handler could not take anyway. (No later libp2p-relay
//! release than 0.22.0 exists to take instead.)

use std::collections::HashSet;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::relay;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// A [`relay::Behaviour`] whose status may change while relayed connections are open.
pub struct GuardedRelay {
    inner: relay::Behaviour,
    /// Connections that run through a relay: the inner behaviour's dummy-handled ones.
    relayed: HashSet<ConnectionId>,
}

impl GuardedRelay {
    pub fn new(inner: relay::Behaviour) -> Self {
        Self {
            inner,
            relayed: HashSet::new(),
        }
    }

    pub fn set_status(&mut self, status: Option<relay::Status>) {
        self.inner.set_status(status);
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl NetworkBehaviour for GuardedRelay {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(local) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = &event {
            self.relayed.remove(&closed.connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(id),
                    ..
                }) if self.relayed.contains(&id) => {
                    tracing::debug!(connection = %id, "relay status not sent to a relayed connection");
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;

    use super::*;

    /// Establishes connection `n` from `peer`, inbound on `local`, as the swarm would.
    fn connect(relay: &mut GuardedRelay, n: usize, peer: PeerId, local: &str) -> ConnectionId {
        let id = ConnectionId::new_unchecked(n);
        let local: Multiaddr = local.parse().unwrap();
        let remote: Multiaddr = "/ip4/10.0.0.9/tcp/4001".parse().unwrap();
        relay
            .handle_established_inbound_connection(id, peer, &local, &remote)
            .unwrap();
        let endpoint = ConnectedPoint::Listener {
            local_addr: local,
            send_back_addr: remote,
        };
        relay.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: id,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
        id
    }

    /// The connections the behaviour asks the swarm to notify, until it has nothing more.
    fn notified(relay: &mut GuardedRelay) -> Vec<ConnectionId> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut ids = Vec::new();
        while let Poll::Ready(event) = relay.poll(&mut cx) {
            if let ToSwarm::NotifyHandler {
                handler: NotifyHandler::One(id),
                ..
            } = event
            {
                ids.push(id);
            }
        }
        ids
    }

    /// A relay server turned off (as `--relay auto` starts), guarded, with one relayed
    /// connection (id 2) established.
    fn off_with_a_relayed_connection() -> (GuardedRelay, ConnectionId) {
        let mut inner = relay::Behaviour::new(PeerId::random(), relay::Config::default());
        inner.set_status(Some(relay::Status::Disable));
        let mut relay = GuardedRelay::new(inner);
        let through = format!(
            "/ip4/100.64.0.1/tcp/31000/p2p/{}/p2p-circuit",
            PeerId::random()
        );
        let relayed = connect(&mut relay, 2, PeerId::random(), &through);
        (relay, relayed)
    }

    #[test]
    fn turning_the_relay_on_notifies_direct_connections_only() {
        let (mut relay, relayed) = off_with_a_relayed_connection();
        let direct = connect(&mut relay, 1, PeerId::random(), "/ip4/10.0.0.1/tcp/4001");
        assert!(notified(&mut relay).is_empty());
        relay.set_status(Some(relay::Status::Enable));
        // Unguarded, the swarm would hand connection 2's dummy handler a status and panic.
        let ids = notified(&mut relay);
        assert_eq!(
            ids,
            [direct],
            "relayed connection {relayed} must not be notified"
        );
    }

    #[test]
    fn the_unguarded_relay_does_notify_relayed_connections() {
        // What the guard is for: if libp2p-relay stops notifying relayed connections, this
        // fails and the guard can go.
        let (mut relay, relayed) = off_with_a_relayed_connection();
        relay.relayed.clear();
        relay.set_status(Some(relay::Status::Enable));
        assert_eq!(notified(&mut relay), [relayed]);
    }
}
