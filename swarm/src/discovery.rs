//! Which peers serve which blocks of a model, through the DHT.
//!
//! Under the key of each block (derived from the model fingerprint and the block index) lives a
//! [`BlockRecord`]: every server of that block. A record in Kademlia has one value, so several
//! servers of one block merge: an announcer reads what is there, replaces its own entry and
//! writes the union back; a reader merges every copy it receives. Lost updates from two servers
//! announcing at the same moment heal at the next refresh, and entries carry their own expiry,
//! so a node that vanishes without a goodbye drops out on its own.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use libp2p::kad::RecordKey;
use libp2p::{Multiaddr, PeerId};
use model::fingerprint::Fingerprint;
use prost::Message;
use proto::v1::{BlockRecord, OfflineClaim, ServerRecord, ServerState};
use sha2::{Digest, Sha256};

use crate::host::{NetError, NetHandle};
use crate::load::Load;
use crate::offline::{self, ClaimChecker};
use crate::record::{self, Checker};

/// How long one DHT query may take before its answer is used as it is.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(8);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The DHT key of one block of one model.
pub fn block_key(fp: &Fingerprint, block: u32) -> RecordKey {
    let mut h = Sha256::new();
    h.update(b"edge-swarm/block/v1\0");
    h.update(fp);
    h.update(block.to_be_bytes());
    RecordKey::new(&h.finalize().as_slice())
}

/// A server as a client sees it, decoded and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub blocks: Range<u32>,
    pub state: ServerState,
    pub decode_ms_per_block: f32,
    pub prefill_ms_per_block: f32,
    pub free_cache_tokens: u64,
    pub version: String,
    pub announced_at_ms: u64,
    /// The load it announced, bounded (a claim: see [`crate::load`]).
    pub load: Load,
    /// A client said it could not reach this server after its newest announcement (see
    /// [`crate::offline`]): route through it only where nobody else serves its blocks.
    pub reported_offline: bool,
}

impl Server {
    /// Checks an entry that came from the network; `None` for anything malformed or foreign.
    pub fn from_record(
        r: &ServerRecord,
        fp: &Fingerprint,
        block_count: u32,
        now_ms: u64,
    ) -> Option<Self> {
        if r.fingerprint.as_slice() != fp.as_slice() || r.expires_at_ms < now_ms {
            return None;
        }
        if r.start_block >= r.end_block || r.end_block > block_count {
            return None;
        }
        let peer = PeerId::from_bytes(&r.peer_id).ok()?;
        let addrs = r
            .addrs
            .iter()
            .take(32)
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .collect();
        let finite = |x: f32| {
            if x.is_finite() && x >= 0.0 {
                x
            } else {
                f32::MAX
            }
        };
        Some(Self {
            peer,
            addrs,
            blocks: r.start_block..r.end_block,
            state: ServerState::try_from(r.state).unwrap_or(ServerState::Unspecified),
            decode_ms_per_block: finite(r.decode_ms_per_block),
            prefill_ms_per_block: finite(r.prefill_ms_per_block),
            free_cache_tokens: r.free_cache_tokens,
            version: r.version.chars().take(64).collect(),
            announced_at_ms: r.announced_at_ms,
            load: Load::from_record(r),
            reported_offline: false,
        })
    }
}

/// Every copy of a block record decoded once (undecodable ones dropped): its entries, per
/// copy, and the claims of all copies, at most [`offline::MAX_CLAIMS_PER_BLOCK`] from each (an
/// honest record holds no more; a copy with more is not worth more signature checks).
/// Announcers, claimants and readers all need both halves.
fn decode_copies(copies: &[Vec<u8>]) -> (Vec<Vec<ServerRecord>>, Vec<OfflineClaim>) {
    let mut entries = Vec::with_capacity(copies.len());
    let mut claims = Vec::new();
    for r in copies
        .iter()
        .filter_map(|c| BlockRecord::decode(c.as_slice()).ok())
    {
        entries.push(r.servers);
        claims.extend(r.offline.into_iter().take(offline::MAX_CLAIMS_PER_BLOCK));
    }
    (entries, claims)
}

/// Merges every copy of a block record: newest believable entry per peer wins; expired,
/// unsigned, forged and foreign entries go (see [`crate::record`]).
pub fn merge_copies(
    copies: &[Vec<u8>],
    fp: &Fingerprint,
    now_ms: u64,
    checker: &mut Checker,
) -> Vec<ServerRecord> {
    let (entries, _) = decode_copies(copies);
    merge_entries(entries.into_iter().flatten(), fp, now_ms, checker)
}

fn merge_entries(
    entries: impl IntoIterator<Item = ServerRecord>,
    fp: &Fingerprint,
    now_ms: u64,
    checker: &mut Checker,
) -> Vec<ServerRecord> {
    record::newest_per_peer(
        entries,
        |s| s.fingerprint.as_slice() == fp.as_slice(),
        checker,
        now_ms,
    )
}

/// Whether a claim read from a record is believable for model `fp`: signed, dated and sized as
/// [`offline::verify`] wants. Each distinct claim is checked once per lookup.
fn believable(fp: &Fingerprint, now_ms: u64) -> impl FnMut(&OfflineClaim) -> bool + '_ {
    let mut checker = ClaimChecker::default();
    move |c| c.fingerprint.as_slice() == fp.as_slice() && checker.accepts(c, now_ms)
}

/// Signs `me` with this peer's key and writes it into the record of every block in its range.
/// Returns how many blocks failed.
pub async fn announce(net: &NetHandle, fp: &Fingerprint, me: &ServerRecord) -> usize {
    let mut signed = me.clone();
    if let Err(e) = record::sign(&mut signed, net.keypair()) {
        tracing::warn!("cannot sign this node's entry: {e}");
        return me.end_block.saturating_sub(me.start_block) as usize;
    }
    let me = &signed;
    let blocks = me.start_block..me.end_block;
    let jobs = blocks.map(|b| async move {
        let key = block_key(fp, b);
        let copies = net
            .get_record(key.clone(), QUERY_TIMEOUT)
            .await
            .unwrap_or_default();
        let now = now_ms();
        let (entries, claims) = decode_copies(&copies);
        let mut servers = merge_entries(
            entries.into_iter().flatten(),
            fp,
            now,
            &mut Checker::default(),
        );
        servers.retain(|s| s.peer_id != me.peer_id);
        servers.push(me.clone());
        // At the per-block bound the stalest others make room; our own entry is the newest.
        let servers = record::newest(servers);
        // Other servers' claims are carried over; ours are refuted by the entry we write.
        let offline = offline::kept(claims, &servers, believable(fp, now));
        let value = BlockRecord { servers, offline }.encode_to_vec();
        net.put_record(key, value, QUERY_TIMEOUT).await
    });
    let results = join_all(jobs).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        tracing::warn!("announcing {failed} block(s) failed, e.g.: {e}");
    }
    failed
}

/// Every server the DHT knows for blocks `0..block_count` of the model, one entry per peer.
pub async fn lookup(
    net: &NetHandle,
    fp: &Fingerprint,
    block_count: u32,
) -> Result<Vec<Server>, NetError> {
    let jobs = (0..block_count).map(|b| net.get_record(block_key(fp, b), QUERY_TIMEOUT));
    let mut copies = Vec::new();
    for r in join_all(jobs).await {
        copies.extend(r?);
    }
    Ok(servers_of(&copies, fp, block_count))
}

/// The servers the DHT lists for one block: what [`lookup`] gives, for one record.
pub async fn lookup_block(
    net: &NetHandle,
    fp: &Fingerprint,
    block: u32,
    block_count: u32,
) -> Result<Vec<Server>, NetError> {
    let copies = net.get_record(block_key(fp, block), QUERY_TIMEOUT).await?;
    Ok(servers_of(&copies, fp, block_count))
}

/// Writes a claim, signed by this peer, that `subject` (serving `block`) did not answer: other
/// clients then route around it until it announces again (see [`crate::offline`]). The claim
/// goes into that block's record with what the record held, like an announcement.
pub async fn report_offline(
    net: &NetHandle,
    fp: &Fingerprint,
    subject: PeerId,
    block: u32,
) -> Result<(), NetError> {
    let now = now_ms();
    let claim = offline::claim(subject, fp, block, now, net.keypair())
        .map_err(|e| NetError::Put(format!("cannot sign an offline claim: {e}")))?;
    let key = block_key(fp, block);
    let copies = net
        .get_record(key.clone(), QUERY_TIMEOUT)
        .await
        .unwrap_or_default();
    let (entries, claims) = decode_copies(&copies);
    let servers = merge_entries(
        entries.into_iter().flatten(),
        fp,
        now,
        &mut Checker::default(),
    );
    let claims = claims.into_iter().chain([claim]);
    let offline = offline::kept(claims, &servers, believable(fp, now));
    let value = BlockRecord { servers, offline }.encode_to_vec();
    net.put_record(key, value, QUERY_TIMEOUT).await
}

/// Every believable server in `copies` of block records, the newest announcement per peer,
/// marked when a client claimed it offline after that announcement.
fn servers_of(copies: &[Vec<u8>], fp: &Fingerprint, block_count: u32) -> Vec<Server> {
    let now = now_ms();
    let mut checker = Checker::default();
    let mut by_peer: HashMap<PeerId, Server> = HashMap::new();
    let (entries, claims) = decode_copies(copies);
    // Each copy is merged on its own, then across blocks: newest announcement per peer wins.
    for copy in entries {
        for rec in merge_entries(copy, fp, now, &mut checker) {
            if let Some(s) = Server::from_record(&rec, fp, block_count, now) {
                match by_peer.get(&s.peer) {
                    Some(old) if old.announced_at_ms >= s.announced_at_ms => {}
                    _ => {
                        by_peer.insert(s.peer, s);
                    }
                }
            }
        }
    }
    // A claim counts only against a listed server that has not announced since it, and one
    // believable claim is enough to mark it: so only such claims are checked, and a server's
    // claims stop being checked at the first that verifies. Junk about made-up or refuted servers
    // costs no signature check.
    let mut believable = believable(fp, now);
    for c in claims {
        let Ok(subject) = PeerId::from_bytes(&c.subject) else {
            continue;
        };
        if let Some(s) = by_peer.get_mut(&subject) {
            if !s.reported_offline && c.seen_at_ms > s.announced_at_ms && believable(&c) {
                s.reported_offline = true;
            }
        }
    }
    let mut out: Vec<Server> = by_peer.into_values().collect();
    out.sort_by_key(|s| (s.blocks.start, s.peer));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn rec(key: &Keypair, at: u64, expires: u64, fp: &Fingerprint) -> ServerRecord {
        let mut r = ServerRecord {
            peer_id: key.public().to_peer_id().to_bytes(),
            fingerprint: fp.to_vec(),
            start_block: 0,
            end_block: 10,
            state: ServerState::Online as i32,
            announced_at_ms: at,
            expires_at_ms: expires,
            ..Default::default()
        };
        record::sign(&mut r, key).unwrap();
        r
    }

    #[test]
    fn merge_keeps_newest_per_peer_and_drops_expired_and_foreign() {
        let fp = [7u8; 32];
        let other = [8u8; 32];
        let [a, b, c] = [(); 3].map(|_| Keypair::generate_ed25519());
        let copy1 = BlockRecord {
            servers: vec![rec(&a, 10, 1000, &fp), rec(&b, 10, 50, &fp)],
            ..Default::default()
        }
        .encode_to_vec();
        let copy2 = BlockRecord {
            servers: vec![rec(&a, 20, 1000, &fp), rec(&c, 10, 1000, &other)],
            ..Default::default()
        }
        .encode_to_vec();
        let copies = [copy1, copy2, b"garbage".to_vec()];
        let merged = merge_copies(&copies, &fp, 100, &mut Checker::default());
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].announced_at_ms, 20);
    }

    #[test]
    fn malformed_entries_are_rejected() {
        let fp = [1u8; 32];
        let p = Keypair::generate_ed25519();
        let mut r = rec(&p, 1, 100, &fp);
        assert!(Server::from_record(&r, &fp, 30, 0).is_some());
        r.end_block = 31;
        assert!(Server::from_record(&r, &fp, 30, 0).is_none());
        r.end_block = 0;
        assert!(Server::from_record(&r, &fp, 30, 0).is_none());
        let mut r = rec(&p, 1, 100, &fp);
        r.peer_id = vec![1, 2, 3];
        assert!(Server::from_record(&r, &fp, 30, 0).is_none());
    }

    fn marked(servers: &[Server], p: PeerId) -> bool {
        servers
            .iter()
            .find(|s| s.peer == p)
            .unwrap()
            .reported_offline
    }

    #[test]
    fn a_server_is_marked_when_claimed_offline_after_its_newest_announcement() {
        let fp = [7u8; 32];
        let now = now_ms();
        let [a, b, client] = [(); 3].map(|_| Keypair::generate_ed25519());
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        let claim = |p, at| offline::claim(p, &fp, 0, at, &client).unwrap();
        let copy = BlockRecord {
            servers: vec![rec(&a, now - 2_000, now + 30_000, &fp)],
            // About `a`, after its announcement; about `b`, before its (newer) one.
            offline: vec![claim(pa, now - 1_000), claim(pb, now - 1_500)],
        }
        .encode_to_vec();
        // `b`'s entry arrives in another block's record: claims hold across blocks.
        let other = BlockRecord {
            servers: vec![rec(&b, now - 1_000, now + 30_000, &fp)],
            ..Default::default()
        }
        .encode_to_vec();
        let servers = servers_of(&[copy, other], &fp, 10);
        assert!(marked(&servers, pa));
        assert!(!marked(&servers, pb));
    }

    #[test]
    fn a_forged_claim_beside_a_genuine_one_neither_marks_nor_hides_it() {
        let fp = [7u8; 32];
        let now = now_ms();
        let [a, b, client] = [(); 3].map(|_| Keypair::generate_ed25519());
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        let claim = |p, at| offline::claim(p, &fp, 0, at, &client).unwrap();
        let mut forged = claim(pa, now - 500);
        forged.seen_at_ms += 1;
        let mut forged_b = claim(pb, now - 500);
        forged_b.seen_at_ms += 1;
        let copy = BlockRecord {
            servers: vec![
                rec(&a, now - 2_000, now + 30_000, &fp),
                rec(&b, now - 2_000, now + 30_000, &fp),
            ],
            // The forgery about `a` comes first and is newer: checking stops at a believable
            // claim, not at the first one.
            offline: vec![forged, claim(pa, now - 1_000), forged_b],
        }
        .encode_to_vec();
        let servers = servers_of(&[copy], &fp, 10);
        assert!(marked(&servers, pa));
        assert!(!marked(&servers, pb));
    }

    #[test]
    fn keys_differ_per_block_and_model() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_ne!(block_key(&a, 0), block_key(&a, 1));
        assert_ne!(block_key(&a, 0), block_key(&b, 0));
    }
}
