//! The libp2p side of a peer or client: one event-loop task owns the swarm; everything else
//! talks to it through a cloneable [`NetHandle`] whose commands each carry a one-shot reply.
//! Every pending request is answered, with a result or an error, when its query ends, when its
//! own deadline passes or when the loop stops: nothing is left hanging.
//!
//! Transports: QUIC and TCP (Noise + Yamux). Behaviours: Kademlia (our own protocol name, so we
//! never mix with other DHTs), identify, ping (round-trip times for route planning), optional
//! mDNS for zero-configuration home LANs, and raw streams for the inference data plane.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, Mode, Quorum, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot};

pub mod identity;

/// The inference data plane: one stream per session, length-delimited protobuf frames.
pub const INFERENCE_PROTOCOL: StreamProtocol = StreamProtocol::new("/edge-swarm/inference/1");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/edge-swarm/kad/1.0.0");
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

/// Callback told each new listening address.
pub type OnListen = Box<dyn Fn(&Multiaddr) + Send>;
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

pub struct NetConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Serve DHT queries (peers do; a client that only generates need not).
    pub dht_server: bool,
    /// Called with each address the swarm starts listening on, full with `/p2p/<id>`.
    pub on_listen: Option<OnListen>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    GetRecord {
        key: RecordKey,
        timeout: Duration,
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    PutRecord {
        key: RecordKey,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Rtt {
        peer: PeerId,
        reply: oneshot::Sender<Option<Duration>>,
    },
    /// Connects to peers not yet connected, so ping measures their round-trip time.
    Probe {
        peers: Vec<(PeerId, Vec<Multiaddr>)>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<usize>,
    },
}

/// A cheap, cloneable handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    control: libp2p_stream::Control,
}

/// The running network: its handle, plus the task that owns the swarm.
pub struct Network {
    pub handle: NetHandle,
    pub task: tokio::task::JoinHandle<()>,
}

impl NetHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A stream control for the inference protocol (open or accept streams).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The copies of the record found in the DHT (several peers may hold different versions),
    /// possibly none. The network task answers by `timeout` with whatever it has found, so a
    /// frozen peer slows a lookup down but never fails it.
    pub async fn get_record(
        &self,
        key: RecordKey,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, NetError> {
        let ask = self.ask(|reply| Command::GetRecord {
            key,
            timeout,
            reply,
        });
        tokio::time::timeout(timeout + Duration::from_secs(1), ask)
            .await
            .map_err(|_| NetError::Timeout {
                op: "get",
                secs: timeout.as_secs_f64(),
            })?
    }

    pub async fn put_record(
        &self,
        key: RecordKey,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), NetError> {
        tokio::time::timeout(
            timeout,
            self.ask(|reply| Command::PutRecord { key, value, reply }),
        )
        .await
        .map_err(|_| NetError::Timeout {
            op: "put",
            secs: timeout.as_secs_f64(),
        })??
    }

    /// Connects to `peer` (using `addrs` if not yet connected); returns when connected.
    pub async fn dial(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        timeout: Duration,
    ) -> Result<(), NetError> {
        tokio::time::timeout(
            timeout,
            self.ask(|reply| Command::Dial { peer, addrs, reply }),
        )
        .await
        .map_err(|_| NetError::Dial {
            peer: peer.to_string(),
            reason: format!("no connection within {:.1}s", timeout.as_secs_f64()),
        })??
    }

    /// The latest ping round-trip time to `peer`, if one was measured.
    pub async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        self.ask(|reply| Command::Rtt { peer, reply })
            .await
            .ok()
            .flatten()
    }

    /// Starts connections to `peers` (ping then measures them) without waiting for them.
    pub async fn probe(&self, peers: Vec<(PeerId, Vec<Multiaddr>)>) {
        let _ = self.tx.send(Command::Probe { peers }).await;
    }

    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.ask(|reply| Command::ListenAddrs { reply })
            .await
            .unwrap_or_default()
    }

    pub async fn connected_peers(&self) -> usize {
        self.ask(|reply| Command::ConnectedPeers { reply })
            .await
            .unwrap_or(0)
    }
}

/// Starts the swarm and its event loop; stops when `shutdown` resolves or every handle is gone.
pub fn start(
    config: NetConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Network, NetError> {
    let peer_id = config.keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let dht_server = config.dht_server;
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|key| {
            let mut kcfg = kad::Config::new(KAD_PROTOCOL);
            kcfg.set_query_timeout(Duration::from_secs(10));
            // Servers re-announce themselves on their own period; the DHT must not keep
            // re-publishing stale copies for a day.
            kcfg.set_publication_interval(None);
            kcfg.set_record_ttl(Some(Duration::from_secs(600)));
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
            Ok(Behaviour {
                kad: kad::Behaviour::with_config(peer_id, store, kcfg),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/edge-swarm/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                mdns: mdns.into(),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    // On loopback and in LANs no address is ever "confirmed external", so kad would stay a
    // client forever; peers must answer DHT queries from the start.
    swarm.behaviour_mut().kad.set_mode(Some(if dht_server {
        Mode::Server
    } else {
        Mode::Client
    }));
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &config.bootstrap {
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, "cannot dial bootstrap address: {e}");
        }
    }
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(256);
    let event_loop = EventLoop {
        swarm,
        rx,
        on_listen: config.on_listen,
        pending_get: HashMap::new(),
        pending_put: HashMap::new(),
        pending_dial: HashMap::new(),
        rtts: HashMap::new(),
        bootstrapped: false,
        bootstrap: config.bootstrap.clone(),
    };
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok(Network {
        handle: NetHandle {
            tx,
            peer_id,
            control,
        },
        task,
    })
}

struct EventLoop {
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
    /// Dialled again whenever this peer has lost every connection (Wi-Fi gone, network cut).
    bootstrap: Vec<Multiaddr>,
}

impl EventLoop {
    async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
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
                _ = expiry.tick() => self.answer_due_lookups(),
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
                        deadline: Instant::now() + timeout,
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
                    let _ = reply.send(Ok(()));
                    return;
                }
                for a in &addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                }
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .build();
                match self.swarm.dial(opts) {
                    Ok(()) => self
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
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!("listening on {full}");
                if let Some(cb) = &self.on_listen {
                    cb(&full);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if endpoint.is_dialer() {
                    // Bootstrap addresses may come without `/p2p/<id>`: learn the id here.
                    let addr = endpoint.get_remote_address().clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    if !self.bootstrapped {
                        self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                    }
                }
                for (_, reply) in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
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
