//! Forwarding a step's output to the next span's node (server-to-server push), so hidden states
//! go node to node instead of back through the client: N + 1 one-way trips per token through N
//! nodes instead of 2N.
//!
//! The forward is best effort and bounded: whatever goes wrong (the peer cannot be reached, it
//! does not serve the next blocks, it does not take the step within [`FORWARD_TIMEOUT`]) comes
//! back as a one-line reason, which the node puts in its answer to the client, or sends right
//! after it when the failure shows only in the acknowledgement; the client then sends the next
//! span this output itself. A stream is kept per session and next peer, and dropped on any
//! error.
//!
//! The node dials the next peer only at the addresses that peer announced for the next blocks in
//! its own signed DHT entry, never at the addresses the step names: those come from the client,
//! and a node that dialled them could be pointed at any host and port (and would have written
//! them into its Kademlia routing table, which other peers read).

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use model::fingerprint::Fingerprint;
use proto::v1::{ErrorCode, PushAck, PushStep, Step, Tensor};
use proto::{read_frame, write_frame};
use swarm::{NetHandle, PUSH_STREAM};
use tokio::time::Instant;

/// Longest a forward may take, from dialling to the acknowledgement. Well under a client's step
/// timeout (30 s by default), so the client hears about a failed forward before it gives up on
/// this node.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);

/// An acknowledgement is a step id and at most a short error.
const MAX_ACK_FRAME: usize = 4096;

pub struct Forwarder {
    net: NetHandle,
    /// The model and its block count, to read the next peer's DHT entry.
    fingerprint: Fingerprint,
    block_count: u32,
    stream: Option<(PeerId, libp2p::Stream)>,
}

/// A forward whose step is written to the next node and whose acknowledgement is still to be
/// read ([`Forwarder::confirm`]).
pub struct Sent {
    peer: PeerId,
    step_id: u64,
    blocks: (u32, u32),
    deadline: Instant,
}

impl Forwarder {
    pub fn new(net: NetHandle, fingerprint: Fingerprint, block_count: u32) -> Self {
        Self {
            net,
            fingerprint,
            block_count,
            stream: None,
        }
    }

    /// Sends `output`, the answer to `step`, to the first of `step.next` with the rest of the
    /// route; `Ok(None)` when the step has nowhere to go. The hops were checked when the step
    /// arrived ([`proto::check_hops`]). The acknowledgement is read by [`Forwarder::confirm`],
    /// after the node has answered its client: the client waits for the last span's answer,
    /// and an acknowledgement read first would hold this span's answer back by one trip.
    pub async fn start(&mut self, step: &Step, output: &Tensor) -> Result<Option<Sent>, String> {
        let Some(hop) = step.next.first() else {
            return Ok(None);
        };
        let push = PushStep {
            push_token: hop.push_token.clone(),
            start_block: hop.start_block,
            end_block: hop.end_block,
            step: Some(Step {
                position: step.position,
                hidden: Some(output.clone()),
                step_id: step.step_id,
                next: step.next[1..].to_vec(),
                auto_wire: step.auto_wire,
                answer_rate: hop.answer_rate,
            }),
        };
        let blocks = (hop.start_block, hop.end_block);
        let peer = PeerId::from_bytes(&hop.peer_id)
            .map_err(|e| in_blocks(blocks, format!("bad next peer id: {e}")))?;
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let sent = match tokio::time::timeout_at(deadline, self.send(peer, blocks, &push)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{peer} did not take the forwarded step within {FORWARD_TIMEOUT:?}"
            )),
        };
        if let Err(e) = sent {
            self.stream = None;
            return Err(in_blocks(blocks, e));
        }
        Ok(Some(Sent {
            peer,
            step_id: step.step_id,
            blocks,
            deadline,
        }))
    }

    /// Reads the next node's acknowledgement of `sent`, within what is left of
    /// [`FORWARD_TIMEOUT`].
    pub async fn confirm(&mut self, sent: Sent) -> Result<(), String> {
        let peer = sent.peer;
        let read = tokio::time::timeout_at(sent.deadline, self.ack(peer, sent.step_id)).await;
        let result = match read {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{peer} did not acknowledge the forwarded step within {FORWARD_TIMEOUT:?}"
            )),
        };
        if result.is_err() {
            self.stream = None;
        }
        result.map_err(|e| in_blocks(sent.blocks, e))
    }

    async fn send(
        &mut self,
        peer: PeerId,
        blocks: (u32, u32),
        push: &PushStep,
    ) -> Result<(), String> {
        if peer == self.net.peer_id() {
            return Err("the next span is on this node itself".into());
        }
        let reuse = matches!(&self.stream, Some((p, _)) if *p == peer);
        if !reuse {
            self.stream = None;
            let (fp, count) = (self.fingerprint, self.block_count);
            let addrs = announced_addrs(&self.net, &fp, count, peer, blocks).await?;
            self.net
                .dial(peer, addrs, FORWARD_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let s = self
                .net
                .stream_control()
                .open_stream(peer, PUSH_STREAM)
                .await
                .map_err(|e| format!("opening a push stream to {peer}: {e}"))?;
            self.stream = Some((peer, s));
        }
        let Some((_, stream)) = self.stream.as_mut() else {
            return Err("no push stream".into());
        };
        write_frame(stream, push)
            .await
            .map_err(|e| format!("sending to {peer}: {e}"))
    }

    async fn ack(&mut self, peer: PeerId, step_id: u64) -> Result<(), String> {
        let Some((_, stream)) = self.stream.as_mut() else {
            return Err("no push stream".into());
        };
        let ack = read_frame::<_, PushAck>(stream, MAX_ACK_FRAME)
            .await
            .map_err(|e| format!("reading {peer}'s acknowledgement: {e}"))?
            .ok_or_else(|| format!("{peer} closed the push stream"))?;
        // The next node timed the step's arrival: the rate of this node's link to it, for
        // choosing the dtype of the next forward under `auto_wire`.
        self.net
            .note_link_rate(peer, swarm::Direction::To, ack.rate);
        if ack.step_id != step_id {
            return Err(format!(
                "{peer} acknowledged step {} instead of {step_id}",
                ack.step_id
            ));
        }
        match ack.error {
            None => Ok(()),
            Some(e) => Err(format!(
                "{peer} refused: {} ({:?})",
                e.message.chars().take(200).collect::<String>(),
                ErrorCode::from_wire(e.code)
            )),
        }
    }
}

/// Where to dial `peer`: nowhere new if a connection is open, else the addresses of its own
/// signed entry for the first of `blocks`.
async fn announced_addrs(
    net: &NetHandle,
    fingerprint: &Fingerprint,
    block_count: u32,
    peer: PeerId,
    blocks: (u32, u32),
) -> Result<Vec<Multiaddr>, String> {
    if net.is_connected(peer).await {
        return Ok(Vec::new());
    }
    let servers = swarm::discovery::lookup_block(net, fingerprint, blocks.0, block_count)
        .await
        .map_err(|e| format!("looking up {peer}'s announcement: {e}"))?;
    match servers.into_iter().find(|s| s.peer == peer) {
        Some(s) if !s.addrs.is_empty() => Ok(s.addrs),
        Some(_) => Err(format!("{peer} announces no address")),
        None => Err(format!(
            "{peer} does not announce block {} in the DHT: not dialled",
            blocks.0
        )),
    }
}

fn in_blocks((start, end): (u32, u32), e: String) -> String {
    format!("forward to blocks {start}..{end}: {e}")
}
