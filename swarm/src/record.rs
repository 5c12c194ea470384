//! Server entries only their owner can write, and the merge every reader and every DHT store
//! applies to them.
//!
//! Anyone can put any bytes under a block's DHT key. Without a check, one peer could mark an
//! honest server offline, invent servers that look infinitely fast, or date an entry a year
//! ahead so that it wins every "newest per peer" merge and outlives its author. So an entry is
//! believed only when it is signed by the key of the peer it names, is dated no later than a
//! minute from now, claims a lifetime no longer than [`MAX_TTL_MS`], and is small. Peers that
//! store a block's record merge what they receive into what they hold (newest valid entry per
//! peer) instead of replacing it, so a put can add or refresh its author's own entry but never
//! remove anybody else's.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use libp2p::identity::{Keypair, PublicKey, SigningError};
use libp2p::kad::RecordKey;
use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use prost::Message;
use proto::v1::{BlockRecord, OfflineClaim, ServerRecord};

use crate::offline;

/// Signed bytes start with this, so a server-entry signature can never be replayed as any
/// other kind of message signed by the same key (and a format change is a new version).
const DOMAIN: &[u8] = b"edge-swarm/server-record/v1\0";

/// How far ahead of the reader's clock an entry may be dated: home machines' clocks drift, but
/// NTP keeps them within seconds; more than a minute ahead is a forgery or a broken clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// The longest an entry may say it stays valid. Nodes refresh every announce interval and give
/// their entry three of them; an hour bounds how long a server that vanished (or a stale entry
/// replayed by somebody else) can linger in lookups.
pub const MAX_TTL_MS: u64 = 60 * 60_000;

/// Bound on one encoded entry: 32 addresses of ~50 bytes, ids, key, signature and numbers come
/// to about 2 KiB; anything bigger is junk meant to crowd the record.
pub const MAX_ENTRY_BYTES: usize = 4096;

/// Servers kept per block record. 64 entries of at most 4 KiB stay well inside the DHT's
/// 256 KiB value bound; when more peers serve one block, the freshest announcements stay.
pub const MAX_SERVERS_PER_BLOCK: usize = 64;

/// Highest block index a stored entry is matched against its record's key for: a claimed range
/// cannot make a storing peer hash forever (the largest open models have under 130 blocks).
const MAX_BLOCKS: u32 = 1024;

/// Why an entry from the network is not believed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("entry of {0} bytes is over the {MAX_ENTRY_BYTES}-byte bound")]
    TooLarge(usize),
    #[error("entry's peer id is malformed")]
    PeerId,
    #[error("entry is not signed")]
    Unsigned,
    #[error("entry's public key is malformed")]
    PublicKey,
    #[error("entry names peer {claimed} but carries the key of {signer}")]
    NotOwner { claimed: String, signer: String },
    #[error("entry's signature does not verify")]
    Signature,
    #[error("entry is dated {0} ms ahead of this clock")]
    FutureDated(u64),
    #[error("entry claims to stay valid {0} ms after its announcement")]
    TtlTooLong(u64),
    #[error("entry has expired")]
    Expired,
}

/// Puts the owner's public key and signature into `record` (any previous ones are replaced).
pub fn sign(record: &mut ServerRecord, key: &Keypair) -> Result<(), SigningError> {
    record.public_key = key.public().encode_protobuf();
    record.signature = Vec::new();
    let signature = key.sign(&signed_bytes(record))?;
    record.signature = signature;
    Ok(())
}

/// The bytes a signature covers: the entry encoded with an empty signature field.
fn signed_bytes(record: &ServerRecord) -> Vec<u8> {
    let unsigned = ServerRecord {
        signature: Vec::new(),
        ..record.clone()
    };
    domain_and(DOMAIN, &unsigned)
}

/// `domain`, then `unsigned` encoded. prost writes fields in tag order and skips defaults, so a
/// reader re-encoding a decoded message (its signature field emptied) gets exactly the bytes
/// its author signed.
pub(crate) fn domain_and<M: Message>(domain: &[u8], unsigned: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(domain.len() + unsigned.encoded_len());
    out.extend_from_slice(domain);
    unsigned
        .encode(&mut out)
        .expect("a Vec grows to fit any message");
    out
}

/// Checks an entry from the network; the cheap checks run before the signature.
pub fn verify(record: &ServerRecord, now_ms: u64) -> Result<PeerId, Rejected> {
    let size = record.encoded_len();
    if size > MAX_ENTRY_BYTES {
        return Err(Rejected::TooLarge(size));
    }
    let claimed = PeerId::from_bytes(&record.peer_id).map_err(|_| Rejected::PeerId)?;
    if record.signature.is_empty() || record.public_key.is_empty() {
        return Err(Rejected::Unsigned);
    }
    if record.announced_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Rejected::FutureDated(record.announced_at_ms - now_ms));
    }
    if record.expires_at_ms < now_ms {
        return Err(Rejected::Expired);
    }
    let ttl = record.expires_at_ms.saturating_sub(record.announced_at_ms);
    if ttl > MAX_TTL_MS {
        return Err(Rejected::TtlTooLong(ttl));
    }
    let key =
        PublicKey::try_decode_protobuf(&record.public_key).map_err(|_| Rejected::PublicKey)?;
    let signer = key.to_peer_id();
    if signer != claimed {
        return Err(Rejected::NotOwner {
            claimed: claimed.to_string(),
            signer: signer.to_string(),
        });
    }
    if !key.verify(&signed_bytes(record), &record.signature) {
        return Err(Rejected::Signature);
    }
    Ok(claimed)
}

/// Something signed that a [`Checker`] verifies: a server entry, or an offline claim.
pub trait Signed: Message {
    /// What it is, for the log line that says why one was dropped.
    const WHAT: &'static str;
    fn check(&self, now_ms: u64) -> Result<(), String>;
}

impl Signed for ServerRecord {
    const WHAT: &'static str = "a server entry";
    fn check(&self, now_ms: u64) -> Result<(), String> {
        verify(self, now_ms).map(drop).map_err(|e| e.to_string())
    }
}

impl Signed for OfflineClaim {
    const WHAT: &'static str = "an offline claim";
    fn check(&self, now_ms: u64) -> Result<(), String> {
        offline::verify(self, now_ms)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Verifies each distinct item once: a lookup sees the same entry in every copy of every block
/// of its author's range (and the same claims in every copy of a record), and an Ed25519 check
/// costs tens of microseconds.
pub struct Checker<M = ServerRecord> {
    seen: HashMap<Vec<u8>, bool>,
    item: PhantomData<fn(&M)>,
}

impl<M> Default for Checker<M> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            item: PhantomData,
        }
    }
}

impl<M: Signed> Checker<M> {
    /// Whether `item` is believable; logs why not, once per distinct item.
    pub fn accepts(&mut self, item: &M, now_ms: u64) -> bool {
        let bytes = item.encode_to_vec();
        if let Some(&ok) = self.seen.get(&bytes) {
            return ok;
        }
        let ok = match item.check(now_ms) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("dropping {}: {e}", M::WHAT);
                false
            }
        };
        self.seen.insert(bytes, ok);
        ok
    }
}

/// Newest believable entry per peer from `entries`, at most [`MAX_SERVERS_PER_BLOCK`] of them
/// (the freshest), sorted by peer id.
pub fn newest_per_peer(
    entries: impl IntoIterator<Item = ServerRecord>,
    keep: impl Fn(&ServerRecord) -> bool,
    checker: &mut Checker,
    now_ms: u64,
) -> Vec<ServerRecord> {
    newest(
        entries
            .into_iter()
            .filter(|s| keep(s) && checker.accepts(s, now_ms)),
    )
}

/// Newest entry per peer, at most [`MAX_SERVERS_PER_BLOCK`] (the freshest), by peer id.
pub(crate) fn newest(entries: impl IntoIterator<Item = ServerRecord>) -> Vec<ServerRecord> {
    let mut by_peer: HashMap<Vec<u8>, ServerRecord> = HashMap::new();
    for s in entries {
        match by_peer.get(&s.peer_id) {
            Some(old) if old.announced_at_ms >= s.announced_at_ms => {}
            _ => {
                by_peer.insert(s.peer_id.clone(), s);
            }
        }
    }
    let mut out: Vec<ServerRecord> = by_peer.into_values().collect();
    if out.len() > MAX_SERVERS_PER_BLOCK {
        out.sort_by_key(|s| std::cmp::Reverse(s.announced_at_ms));
        out.truncate(MAX_SERVERS_PER_BLOCK);
    }
    out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    out
}

/// Whether `record` belongs under `key`: its model's key for one of the blocks it claims.
fn belongs_to(record: &ServerRecord, key: &RecordKey) -> bool {
    let Ok(fp) = Fingerprint::try_from(record.fingerprint.as_slice()) else {
        return false;
    };
    let end = record.end_block.min(MAX_BLOCKS);
    (record.start_block..end).any(|b| crate::discovery::block_key(&fp, b) == *key)
}

/// What a peer storing the record under `key` keeps when `incoming` arrives on top of what it
/// `held`: the newest valid entry of each peer from both, and the offline claims (see
/// [`crate::offline`]) that are believable, unexpired and not refuted by a newer entry of the
/// server they name. `None` when the put brings nothing new and valid (it is ignored and what
/// was held stays).
///
/// Held entries were checked when they arrived and only need to be unexpired; of the incoming
/// ones only those not held already are checked. An announcer writes back the whole record it
/// read with its own entry refreshed, so a put usually costs one signature check, not one per
/// server of the block.
pub fn merge_stored(
    key: &RecordKey,
    held: Option<&[u8]>,
    incoming: &[u8],
    now_ms: u64,
) -> Option<Vec<u8>> {
    let decode = |b: &[u8]| BlockRecord::decode(b).unwrap_or_default();
    let incoming = decode(incoming);
    // Honest writers never send more than these; a bigger put is an attempt to make this peer
    // verify thousands of signatures.
    if incoming.servers.len() > MAX_SERVERS_PER_BLOCK
        || incoming.offline.len() > offline::MAX_CLAIMS_PER_BLOCK
    {
        return None;
    }
    let held = held.map(decode).unwrap_or_default();
    let known: HashSet<Vec<u8>> = held.servers.iter().map(|s| s.encode_to_vec()).collect();
    let mut checker = Checker::default();
    let fresh: Vec<ServerRecord> = incoming
        .servers
        .into_iter()
        .filter(|s| {
            !known.contains(&s.encode_to_vec()) && belongs_to(s, key) && checker.accepts(s, now_ms)
        })
        .collect();
    let live = held
        .servers
        .into_iter()
        .filter(|s| s.expires_at_ms >= now_ms);
    let fresh_entries = !fresh.is_empty();
    let servers = newest(live.chain(fresh));
    // Held claims were checked when they arrived; of the incoming ones only claims that would
    // be kept get a signature check (see `offline::kept`).
    let live: Vec<OfflineClaim> = held
        .offline
        .into_iter()
        .filter(|c| c.seen_at_ms.saturating_add(offline::CLAIM_TTL_MS) >= now_ms)
        .collect();
    let known: HashSet<Vec<u8>> = live.iter().map(|c| c.encode_to_vec()).collect();
    let mut checker = Checker::<OfflineClaim>::default();
    let mut fresh_claims = false;
    let offline = offline::kept(live.into_iter().chain(incoming.offline), &servers, |c| {
        if known.contains(&c.encode_to_vec()) {
            return true;
        }
        let ok = offline::belongs_to(c, key) && checker.accepts(c, now_ms);
        fresh_claims |= ok;
        ok
    });
    if !fresh_entries && !fresh_claims {
        return None;
    }
    Some(BlockRecord { servers, offline }.encode_to_vec())
}

#[cfg(test)]
mod tests;
