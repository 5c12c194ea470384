//! The task that owns the libp2p swarm: runs its events and the handle's commands, and answers
//! every pending request before it ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, Quorum, Record};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{autonat, dcutr, identify, mdns, ping, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::handle::Command;
use super::nat::{self, NatOptions};
use super::{Behaviour, BehaviourEvent, NetError, OnListen};
use crate::{discovery, record};

/// DHT puts accepted per remote peer and minute. Checking one costs up to a few milliseconds
/// (signatures, key matching); an honest node puts each of its blocks once per announce interval
/// (10 s by default), so 1,200 leaves room for a hundred blocks announced every 5 s.
const PUTS_PER_MINUTE: u32 = 1200;

/// Per-peer count of puts in the current minute.
#[derive(Default)]
struct PutAllowance {
    windows: HashMap<PeerId, (Instant, u32)>,
}

impl PutAllowance {
    fn take(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        if self.windows.len() > 10_000 {
            self.windows.retain(|_, (start, _)| now - *start < minute);
        }
        let (start, count) = self.windows.entry(peer).or_insert((now, 0));
        if now - *start >= minute {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= PUTS_PER_MINUTE
    }
}

type DialWaiter = (Instant, oneshot::Sender<Result<(), NetError>>);
/// A lookup in progress: copies found so far, the reply, when to answer at the latest, and when
/// the first copy arrived.
struct GetWaiter {
    found: Vec<Vec<u8>>,
    reply: oneshot::Sender<Vec<Vec<u8>>>,
    deadline: Instant,
    first_found: Option<Instant>,
}

/// Once one copy of a record is in, other copies get this long to arrive. A query otherwise
/// waits for every close peer, and one frozen peer would stall it for the whole kad timeout.
const GET_GRACE: Duration = Duration::from_millis(400);

pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    on_listen: Option<OnListen>,
    pending_get: HashMap<kad::QueryId, GetWaiter>,
    pending_put: HashMap<kad::QueryId, oneshot::Sender<Result<(), NetError>>>,
    pending_dial: HashMap<PeerId, Vec<DialWaiter>>,
    /// Latest ping round trip per peer. Kept after a disconnect: the planner still needs to
    /// know how far a peer is, and a dead one is kept out by bans, not by a missing number
    /// (which would make every re-plan wait for a probe that cannot succeed).
    rtts: HashMap<PeerId, Duration>,
    bootstrapped: bool,
    put_allowance: PutAllowance,
    /// Dialled again whenever this peer has lost every connection (Wi-Fi gone, network cut).
    bootstrap: Vec<Multiaddr>,
    nat: NatOptions,
    /// Circuit listeners (relay reservations, held or asked for) and the relay of each.
    relays: HashMap<ListenerId, PeerId>,
    /// The direct address this peer dialled each peer on: where to reach it as a relay.
    dialled: HashMap<PeerId, Multiaddr>,
    /// Open connections per peer: whether each goes through a relay, and its remote address.
    conns: HashMap<PeerId, HashMap<ConnectionId, (bool, Multiaddr)>>,
    /// Peers reached only through a relay, since when: a hole punch is (probably) under way,
    /// and dials wait for it (up to [`nat::PUNCH_WAIT`]) so streams start on the direct path.
    punching: HashMap<PeerId, Instant>,
    /// Peers whose relayed connections are closing after a successful hole punch.
    leaving_relay: HashMap<PeerId, Instant>,
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        rx: mpsc::Receiver<Command>,
        on_listen: Option<OnListen>,
        bootstrap: Vec<Multiaddr>,
        nat: NatOptions,
    ) -> Self {
        Self {
            swarm,
            rx,
            on_listen,
            pending_get: HashMap::new(),
            pending_put: HashMap::new(),
            pending_dial: HashMap::new(),
            rtts: HashMap::new(),
            bootstrapped: false,
            put_allowance: PutAllowance::default(),
            bootstrap,
            nat,
            relays: HashMap::new(),
            dialled: HashMap::new(),
            conns: HashMap::new(),
            punching: HashMap::new(),
            leaving_relay: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        let mut reconnect = tokio::time::interval(Duration::from_secs(3));
        let mut expiry = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = reconnect.tick() => {
                    if self.swarm.connected_peers().next().is_none() {
                        for addr in self.bootstrap.clone() {
                            let _ = self.swarm.dial(addr);
                        }
                    }
                }
                _ = tick.tick() => {
                    // Keep the routing table fresh; harmless when nobody is known yet.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = expiry.tick() => {
                    self.answer_due_lookups();
                    self.end_due_punch_waits();
                }
            }
        }
        // Dropping the senders answers every waiter with `Stopped`.
        tracing::debug!("network task stopped");
    }

    fn command(&mut self, cmd: Command) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        match cmd {
            Command::GetRecord {
                key,
                timeout,
                reply,
            } => {
                let id = kad.get_record(key);
                self.pending_get.insert(
                    id,
                    GetWaiter {
                        found: Vec::new(),
                        reply,
                        deadline: Instant::now() + crate::deadline::bounded(timeout),
                        first_found: None,
                    },
                );
            }
            Command::PutRecord { key, value, reply } => {
                let record = Record::new(key, value);
                match kad.put_record(record, Quorum::One) {
                    Ok(id) => {
                        self.pending_put.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Put(format!("{e:?}"))));
                    }
                }
            }
            Command::Dial { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    self.pending_dial
                        .entry(peer)
                        .or_default()
                        .push((Instant::now(), reply));
                    self.settle_dials(peer);
                    return;
                }
                for a in &addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                }
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .build();
                match self.swarm.dial(opts) {
                    // A dial already under way (a probe's, Kademlia's, another caller's, or a
                    // relayed one awaiting its hole punch) settles this one too: its outcome is
                    // reported to every waiter, and the caller's own timeout bounds the wait.
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => self
                        .pending_dial
                        .entry(peer)
                        .or_default()
                        .push((Instant::now(), reply)),
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            peer: peer.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Probe { peers } => {
                for (peer, addrs) in peers {
                    if !self.swarm.is_connected(&peer) && !addrs.is_empty() {
                        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                            .addresses(addrs)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            Command::Rtt { peer, reply } => {
                let _ = reply.send(self.rtts.get(&peer).copied());
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().count());
            }
            Command::IsConnected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let relayed = nat::is_relayed(&address);
                if !relayed
                    && self.nat.relay_server == nat::RelayServer::On
                    && self.nat.external.is_empty()
                {
                    // A relay hands its external addresses to the peers it reserves for (they
                    // announce them); one told to relay is reachable where it listens.
                    self.swarm.add_external_address(address.clone());
                }
                // Relayed addresses already end with `/p2p/<this peer>`.
                let local = *self.swarm.local_peer_id();
                let full = address.clone().with_p2p(local).unwrap_or(address);
                tracing::info!("listening on {full}");
                if let Some(cb) = &self.on_listen {
                    cb(&full);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                if endpoint.is_dialer() {
                    // Bootstrap addresses may come without `/p2p/<id>`: learn the id here.
                    let addr = endpoint.get_remote_address().clone();
                    if !relayed {
                        self.dialled.insert(peer_id, addr.clone());
                    }
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    if !self.bootstrapped {
                        self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                    }
                }
                let conns = self.conns.entry(peer_id).or_default();
                let direct_before = conns.values().any(|(r, _)| !r);
                conns.insert(
                    connection_id,
                    (relayed, endpoint.get_remote_address().clone()),
                );
                if relayed {
                    tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected through a relay");
                    if !direct_before {
                        self.punching.entry(peer_id).or_insert_with(Instant::now);
                    }
                } else if self.punching.remove(&peer_id).is_some() {
                    // The hole punch's connection comes before DCUtR's report of it: the
                    // relayed ones go now, while dials still wait and none of our streams is on
                    // them.
                    self.leave_relay(peer_id, connection_id);
                }
                self.settle_dials(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(conns) = self.conns.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                    if conns.is_empty() {
                        // A long-lived node dials many peers over its life; what it learnt of
                        // one goes with the last connection (a new dial learns it again).
                        self.conns.remove(&peer_id);
                        self.dialled.remove(&peer_id);
                        self.punching.remove(&peer_id);
                        self.leaving_relay.remove(&peer_id);
                    }
                }
                self.settle_dials(peer_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.relays.remove(&listener_id) {
                    // Asked for again the next time identify hears from a relay. A listener
                    // closed without error is this peer stopping (or the relay leaving cleanly).
                    match reason {
                        Ok(()) => tracing::debug!(%relay, "relayed address closed"),
                        Err(e) => tracing::warn!(%relay, "lost the relayed address: {e}"),
                    }
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                if nat::is_relayed(&address) {
                    tracing::info!(%address, "reachable through a relay");
                } else {
                    tracing::info!(%address, "external address confirmed: reachable directly");
                    if self.nat.relay_server == nat::RelayServer::Auto {
                        if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
                            relay.set_status(Some(relay::Status::Enable));
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => {
                for (_, reply) in self.pending_dial.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(NetError::Dial {
                        peer: peer.to_string(),
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    self.reserve_on(peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => match e {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    ..
                } => tracing::info!(relay = %relay_peer_id, "relay reservation accepted"),
                other => tracing::debug!(?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => match e {
                relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed: false,
                } => {
                    tracing::info!(peer = %src_peer_id, "relaying for a peer: reservation accepted")
                }
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status,
                } => tracing::info!(peer = %src_peer_id, ?status, "relay reservation denied"),
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relaying a circuit"),
                relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    status,
                } => {
                    tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay circuit denied")
                }
                other => tracing::debug!(?other, "relay server"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => self.hole_punched(remote_peer_id, result),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                old,
                new,
            })) => {
                tracing::info!(?old, ?new, "AutoNAT: reachability changed");
                if self.nat.relay_server == nat::RelayServer::Auto
                    && new == autonat::NatStatus::Private
                {
                    if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
                        relay.set_status(Some(relay::Status::Disable));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::info!(%peer, %addr, "found peer on the local network");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(incoming),
                        ..
                    },
            })) => self.store_merged(source, incoming),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => {
                self.query_progressed(id, result, step.last);
            }
            _ => {}
        }
    }

    /// Asks `relay` (a peer offering circuit relay v2) for a reservation, when this peer wants
    /// relayed addresses, does not hold one there yet, holds fewer than [`nat::MAX_RELAYS`],
    /// and reached it directly (the address to reserve through is the one it was dialled on).
    /// It does so even when AutoNAT has confirmed a direct address: behind a NAT that keeps
    /// ports, a dial-back that arrives on a hole-punched or otherwise open mapping confirms an
    /// address nobody else can dial (seen in the namespace bench: a node gave its reservation up
    /// on such a confirmation and was unreachable until AutoNAT said private again, 40 s
    /// later).
    fn reserve_on(&mut self, relay: PeerId) {
        if !self.nat.relay_listen
            || self.relays.len() >= nat::MAX_RELAYS
            || self.relays.values().any(|r| *r == relay)
        {
            return;
        }
        let Some(relay_addr) = self.dialled.get(&relay) else {
            return;
        };
        let addr = nat::circuit_listen_addr(relay_addr, relay);
        match self.swarm.listen_on(addr.clone()) {
            Ok(id) => {
                tracing::info!(%relay, %addr, "asking a relay for a relayed address");
                self.relays.insert(id, relay);
            }
            Err(e) => tracing::warn!(%relay, %addr, "cannot listen through a relay: {e}"),
        }
    }

    /// The outcome of a DCUtR hole punch with `peer`. On success the relayed connections are
    /// closed if the punch came while dials still waited for it (usually done already, when
    /// the direct connection was established), so every stream after runs on the direct path;
    /// a later punch leaves them (streams may be open on them) to idle out.
    fn hole_punched(&mut self, peer: PeerId, result: Result<ConnectionId, dcutr::Error>) {
        let waited = self.punching.remove(&peer).is_some();
        match result {
            Ok(direct) => {
                let addr = self
                    .conns
                    .get(&peer)
                    .and_then(|c| c.get(&direct))
                    .map(|(_, a)| a.to_string())
                    .unwrap_or_default();
                tracing::info!(%peer, %addr, "hole punch succeeded: direct connection");
                if waited {
                    self.leave_relay(peer, direct);
                }
            }
            Err(e) => tracing::info!(%peer, "hole punch failed ({e}): staying on the relay"),
        }
        self.settle_dials(peer);
    }

    /// Closes `peer`'s relayed connections now that `direct` reaches it. This must happen
    /// before streams open: libp2p-stream puts each new stream on a connection of the peer
    /// chosen at random, so a relayed connection left open would carry some sessions (and
    /// end them when it closes; the namespace bench lost sessions that way).
    fn leave_relay(&mut self, peer: PeerId, direct: ConnectionId) {
        let relayed: Vec<ConnectionId> = self
            .conns
            .get(&peer)
            .into_iter()
            .flatten()
            .filter(|(id, (relayed, _))| *relayed && **id != direct)
            .map(|(id, _)| *id)
            .collect();
        for id in relayed {
            self.swarm.close_connection(id);
            self.leaving_relay.insert(peer, Instant::now());
        }
    }

    /// Answers the dials waiting for `peer` once it is connected and no hole punch or relay
    /// hand-over is pending.
    fn settle_dials(&mut self, peer: PeerId) {
        if !self.pending_dial.contains_key(&peer) || !self.swarm.is_connected(&peer) {
            return;
        }
        let relayed_left = self
            .conns
            .get(&peer)
            .is_some_and(|c| c.values().any(|(r, _)| *r));
        if self.punching.contains_key(&peer)
            || (self.leaving_relay.contains_key(&peer) && relayed_left)
        {
            return;
        }
        self.leaving_relay.remove(&peer);
        for (_, reply) in self.pending_dial.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Ok(()));
        }
    }

    /// Stops waiting for hole punches (and relay hand-overs) older than [`nat::PUNCH_WAIT`]:
    /// the relayed connection is what there is.
    fn end_due_punch_waits(&mut self) {
        let now = Instant::now();
        let due = |since: &Instant| now - *since >= nat::PUNCH_WAIT;
        let mut peers: Vec<PeerId> = Vec::new();
        for map in [&mut self.punching, &mut self.leaving_relay] {
            map.retain(|peer, since| {
                if due(since) {
                    peers.push(*peer);
                    false
                } else {
                    true
                }
            });
        }
        for peer in peers {
            self.settle_dials(peer);
        }
    }

    /// Merges a record another peer put here into what this peer holds for its key.
    fn store_merged(&mut self, source: PeerId, incoming: Record) {
        if !self.put_allowance.take(source) {
            tracing::debug!(%source, "ignored a DHT put: over {PUTS_PER_MINUTE} a minute");
            return;
        }
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let held = store.get(&incoming.key).map(|r| r.value.clone());
        let Some(value) = record::merge_stored(
            &incoming.key,
            held.as_deref(),
            &incoming.value,
            discovery::now_ms(),
        ) else {
            tracing::debug!(%source, "ignored a DHT put with no valid server entry");
            return;
        };
        let merged = Record {
            key: incoming.key,
            value,
            publisher: incoming.publisher,
            expires: incoming.expires,
        };
        if let Err(e) = store.put(merged) {
            tracing::debug!(%source, "not storing a DHT record: {e:?}");
        }
    }

    /// Answers lookups that reached their deadline, or whose first copy arrived more than
    /// `GET_GRACE` ago, with what they found, and stops their queries.
    fn answer_due_lookups(&mut self) {
        let now = Instant::now();
        let due: Vec<kad::QueryId> = self
            .pending_get
            .iter()
            .filter(|(_, w)| {
                now >= w.deadline || w.first_found.is_some_and(|t| now - t >= GET_GRACE)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
            if let Some(w) = self.pending_get.remove(&id) {
                let _ = w.reply.send(w.found);
            }
        }
    }

    fn query_progressed(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::GetRecord(res) => {
                if let Some(w) = self.pending_get.get_mut(&id) {
                    if let Ok(kad::GetRecordOk::FoundRecord(r)) = res {
                        w.found.push(r.record.value);
                        w.first_found.get_or_insert_with(Instant::now);
                    }
                }
                if last {
                    if let Some(w) = self.pending_get.remove(&id) {
                        let _ = w.reply.send(w.found);
                    }
                }
            }
            kad::QueryResult::PutRecord(res) => {
                if let Some(reply) = self.pending_put.remove(&id) {
                    // The record is stored locally either way; a quorum failure only means no
                    // other peer confirmed yet (a lone node, or a swarm still forming).
                    let _ = reply.send(match res {
                        Ok(_) | Err(kad::PutRecordError::QuorumFailed { .. }) => Ok(()),
                        Err(e) => Err(NetError::Put(format!("{e:?}"))),
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_flooding_puts_is_cut_off_without_touching_others() {
        let mut allowance = PutAllowance::default();
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        for _ in 0..PUTS_PER_MINUTE {
            assert!(allowance.take(flooder));
        }
        assert!(!allowance.take(flooder));
        assert!(!allowance.take(flooder));
        assert!(allowance.take(honest));
        // A minute later the flooder's window starts over.
        let window = allowance.windows.get_mut(&flooder).unwrap();
        if let Some(earlier) = window.0.checked_sub(Duration::from_secs(61)) {
            window.0 = earlier;
            assert!(allowance.take(flooder));
        }
    }
}
