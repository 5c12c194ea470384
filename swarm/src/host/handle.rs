//! The cloneable side of the host: commands to the event loop, each with a one-shot reply.

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::RecordKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::link_rates::{Direction, LinkRates};
use super::NetError;

pub(crate) enum Command {
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
    IsConnected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
}

/// A cheap, cloneable handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// Signs this peer's DHT entries; stays inside the crate.
    keypair: Keypair,
    control: libp2p_stream::Control,
    /// Measured link rates, shared by every clone of this handle.
    rates: Arc<LinkRates>,
}

impl NetHandle {
    pub(super) fn new(
        tx: mpsc::Sender<Command>,
        keypair: Keypair,
        control: libp2p_stream::Control,
    ) -> Self {
        Self {
            tx,
            peer_id: keypair.public().to_peer_id(),
            keypair,
            control,
            rates: Arc::default(),
        }
    }

    pub(crate) fn keypair(&self) -> &Keypair {
        &self.keypair
    }

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
        tokio::time::timeout(timeout.saturating_add(Duration::from_secs(1)), ask)
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

    /// The latest measured rate, in bytes/s, of the link from this peer to `peer` (`To`) or back
    /// (`From`); see [`super::link_rates`].
    pub fn link_rate(&self, peer: PeerId, dir: Direction) -> Option<u64> {
        self.rates.get(peer, dir)
    }

    /// Keeps a measure of the link's rate in bytes/s; zero (not measured) is ignored.
    pub fn note_link_rate(&self, peer: PeerId, dir: Direction, rate: u64) {
        self.rates.set(peer, dir, rate);
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

    /// Whether a connection to `peer` is open now.
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        self.ask(|reply| Command::IsConnected { peer, reply })
            .await
            .unwrap_or(false)
    }
}
