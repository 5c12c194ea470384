//! Offline claims: a client that could not reach a server says so in the DHT, so that other
//! clients stop routing through it before its record expires (up to three announce intervals
//! after it froze or lost its network, 30 s by default). A client that plans onto such a
//! server pays a whole connect timeout for it, 10 s by default; most servers of a large swarm
//! are never probed before a plan, so the planner cannot tell a dead one from a distant one.
//!
//! A claim is one client's word about somebody else's server, so it is weighed as one:
//! - signed by the claimant, so nobody can put words in another client's mouth;
//! - void once the server announces again after it: a live server refutes every claim about
//!   it at its next refresh, and a claim older than the server's newest entry counts for
//!   nothing;
//! - dated at most [`MAX_CLAIM_SKEW_MS`] ahead of the reader and believed for
//!   [`CLAIM_TTL_MS`], so one cannot outlive the refresh that refutes it by much;
//! - never a removal: readers price a claimed server like one without cache room, used only
//!   where nobody else serves its blocks;
//! - about a server the record lists, or it is dropped: made-up subjects take no room, and
//!   when the room runs out, claims about the servers that announced longest ago stay (see
//!   [`kept`]). Readers check the signature of a claim only when it would mark a listed
//!   server, and stop at the first that does.
//!
//! The worst a lying client can do is steer other clients away from an honest server until
//! that server's next announcement, one signed put at a time, within the per-peer put
//! allowance of the peers that store the record.

use std::collections::HashMap;

use libp2p::identity::{Keypair, PublicKey, SigningError};
use libp2p::kad::RecordKey;
use libp2p::PeerId;
use model::fingerprint::Fingerprint;
use prost::Message;
use proto::v1::{OfflineClaim, ServerRecord};

/// Signed bytes start with this, so a claim's signature is never valid as anything else the
/// same key signs (server entries have their own domain).
const DOMAIN: &[u8] = b"edge-swarm/offline-claim/v1\0";

/// How long a claim is believed. Servers refresh every 10 s by default, so a claim about a
/// live server is refuted long before; one about a dead server stays useful until the
/// server's own entry expires (30 s by default).
pub const CLAIM_TTL_MS: u64 = 60_000;

/// How far ahead of the reader's clock a claim may be dated. Much less than the minute
/// allowed for server entries: a claim dated ahead would hold against the server's next
/// announcements, so only ordinary clock drift is tolerated.
pub const MAX_CLAIM_SKEW_MS: u64 = 5_000;

/// Bound on one encoded claim: two ids, a key, a signature and two numbers come to ~200 bytes.
pub const MAX_CLAIM_BYTES: usize = 512;

/// Claims kept per block record (the freshest); a put carrying more is refused whole.
pub const MAX_CLAIMS_PER_BLOCK: usize = 32;

/// Highest block a stored claim is matched against its record's key for (as for entries).
const MAX_BLOCKS: u32 = 1024;

/// Why a claim from the network is not believed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("claim of {0} bytes is over the {MAX_CLAIM_BYTES}-byte bound")]
    TooLarge(usize),
    #[error("claim's subject peer id is malformed")]
    Subject,
    #[error("claim is not signed")]
    Unsigned,
    #[error("claim's public key is malformed")]
    PublicKey,
    #[error("a server cannot claim itself offline")]
    OwnServer,
    #[error("claim's signature does not verify")]
    Signature,
    #[error("claim is dated {0} ms ahead of this clock")]
    FutureDated(u64),
    #[error("claim is older than {CLAIM_TTL_MS} ms")]
    Expired,
}

/// A claim by `key`'s owner that `subject` (serving from `block` of model `fp`) did not
/// answer at `seen_at_ms`.
pub fn claim(
    subject: PeerId,
    fp: &Fingerprint,
    block: u32,
    seen_at_ms: u64,
    key: &Keypair,
) -> Result<OfflineClaim, SigningError> {
    let mut c = OfflineClaim {
        subject: subject.to_bytes(),
        fingerprint: fp.to_vec(),
        block,
        seen_at_ms,
        public_key: key.public().encode_protobuf(),
        signature: Vec::new(),
    };
    c.signature = key.sign(&signed_bytes(&c))?;
    Ok(c)
}

/// The bytes a signature covers: the claim encoded with an empty signature field.
fn signed_bytes(c: &OfflineClaim) -> Vec<u8> {
    let unsigned = OfflineClaim {
        signature: Vec::new(),
        ..c.clone()
    };
    crate::record::domain_and(DOMAIN, &unsigned)
}

/// Checks a claim from the network (cheap checks first) and returns its subject.
pub fn verify(c: &OfflineClaim, now_ms: u64) -> Result<PeerId, Rejected> {
    let size = c.encoded_len();
    if size > MAX_CLAIM_BYTES {
        return Err(Rejected::TooLarge(size));
    }
    let subject = PeerId::from_bytes(&c.subject).map_err(|_| Rejected::Subject)?;
    if c.signature.is_empty() || c.public_key.is_empty() {
        return Err(Rejected::Unsigned);
    }
    if c.seen_at_ms > now_ms.saturating_add(MAX_CLAIM_SKEW_MS) {
        return Err(Rejected::FutureDated(c.seen_at_ms - now_ms));
    }
    if c.seen_at_ms.saturating_add(CLAIM_TTL_MS) < now_ms {
        return Err(Rejected::Expired);
    }
    let key = PublicKey::try_decode_protobuf(&c.public_key).map_err(|_| Rejected::PublicKey)?;
    if key.to_peer_id() == subject {
        return Err(Rejected::OwnServer);
    }
    if !key.verify(&signed_bytes(c), &c.signature) {
        return Err(Rejected::Signature);
    }
    Ok(subject)
}

/// Verifies each distinct claim once per lookup: every copy of a record carries the same ones.
pub type ClaimChecker = crate::record::Checker<OfflineClaim>;

/// The claims a record keeps beside `servers`, its entries (newest per peer): of each claimant
/// the newest `believable` claim about each server the record lists and that has not announced
/// since, at most [`MAX_CLAIMS_PER_BLOCK`], in a canonical order. `believable` (a signature
/// check, as a rule) is asked only about claims that would count, after the cheap tests.
///
/// A claim about a server the record does not list steers nobody, so it takes no room: junk
/// about made-up peers cannot push real claims out. When more claims qualify than a record
/// keeps, those about the servers that announced longest ago stay. A dead server stops
/// announcing, so within an interval claims about it outrank every claim, true or not, about a
/// server still refreshing, and a flood of fresh claims about live servers cannot mute it.
pub fn kept(
    claims: impl IntoIterator<Item = OfflineClaim>,
    servers: &[ServerRecord],
    mut believable: impl FnMut(&OfflineClaim) -> bool,
) -> Vec<OfflineClaim> {
    let announced: HashMap<&[u8], u64> = servers
        .iter()
        .map(|s| (s.peer_id.as_slice(), s.announced_at_ms))
        .collect();
    let mut by_pair: HashMap<(Vec<u8>, Vec<u8>), (u64, OfflineClaim)> = HashMap::new();
    for c in claims {
        let Some(&at) = announced.get(c.subject.as_slice()) else {
            continue;
        };
        if c.seen_at_ms <= at || !believable(&c) {
            continue;
        }
        let pair = (c.public_key.clone(), c.subject.clone());
        match by_pair.get(&pair) {
            Some((_, old)) if old.seen_at_ms >= c.seen_at_ms => {}
            _ => {
                by_pair.insert(pair, (at, c));
            }
        }
    }
    let mut out: Vec<(u64, OfflineClaim)> = by_pair.into_values().collect();
    if out.len() > MAX_CLAIMS_PER_BLOCK {
        // Stalest server first, then the newest claim; the rest only makes the cut the same
        // on every peer that stores the record.
        out.sort_by(|(a_at, a), (b_at, b)| {
            a_at.cmp(b_at)
                .then(b.seen_at_ms.cmp(&a.seen_at_ms))
                .then_with(|| (&a.subject, &a.public_key).cmp(&(&b.subject, &b.public_key)))
        });
        out.truncate(MAX_CLAIMS_PER_BLOCK);
    }
    let mut out: Vec<OfflineClaim> = out.into_iter().map(|(_, c)| c).collect();
    out.sort_by(|a, b| (&a.subject, &a.public_key).cmp(&(&b.subject, &b.public_key)));
    out
}

/// Whether `c` belongs under `key`: its model's key for the block it names.
pub fn belongs_to(c: &OfflineClaim, key: &RecordKey) -> bool {
    let Ok(fp) = Fingerprint::try_from(c.fingerprint.as_slice()) else {
        return false;
    };
    c.block < MAX_BLOCKS && crate::discovery::block_key(&fp, c.block) == *key
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const FP: Fingerprint = [7u8; 32];

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn a_signed_claim_verifies_and_names_its_subject() {
        let (client, subject) = (Keypair::generate_ed25519(), peer());
        let c = claim(subject, &FP, 3, NOW, &client).unwrap();
        assert_eq!(verify(&c, NOW), Ok(subject));
        let copy = OfflineClaim::decode(c.encode_to_vec().as_slice()).unwrap();
        assert_eq!(verify(&copy, NOW + CLAIM_TTL_MS), Ok(subject));
    }

    #[test]
    fn forged_stale_early_and_self_claims_are_refused() {
        let client = Keypair::generate_ed25519();
        let c = claim(peer(), &FP, 3, NOW, &client).unwrap();
        let changes: [fn(&mut OfflineClaim); 4] = [
            |c| c.seen_at_ms -= 1,
            |c| c.block = 4,
            |c| c.subject = Keypair::generate_ed25519().public().to_peer_id().to_bytes(),
            |c| c.fingerprint[0] ^= 1,
        ];
        for change in changes {
            let mut forged = c.clone();
            change(&mut forged);
            assert_eq!(verify(&forged, NOW), Err(Rejected::Signature));
        }
        // Another client's key on this claim: the signature is no longer its author's.
        let mut stolen = c.clone();
        stolen.public_key = Keypair::generate_ed25519().public().encode_protobuf();
        assert_eq!(verify(&stolen, NOW), Err(Rejected::Signature));
        assert_eq!(verify(&c, NOW + CLAIM_TTL_MS + 1), Err(Rejected::Expired));
        let ahead = claim(peer(), &FP, 3, NOW + MAX_CLAIM_SKEW_MS + 1, &client).unwrap();
        assert_eq!(
            verify(&ahead, NOW),
            Err(Rejected::FutureDated(MAX_CLAIM_SKEW_MS + 1))
        );
        // A server claiming itself offline could void nothing, but it is no claim either.
        let own = claim(client.public().to_peer_id(), &FP, 3, NOW, &client).unwrap();
        assert_eq!(verify(&own, NOW), Err(Rejected::OwnServer));
        let mut unsigned = c.clone();
        unsigned.signature.clear();
        assert_eq!(verify(&unsigned, NOW), Err(Rejected::Unsigned));
        let mut junk = c.clone();
        junk.subject = vec![1, 2, 3];
        assert_eq!(verify(&junk, NOW), Err(Rejected::Subject));
        let mut big = c;
        big.public_key = vec![0; MAX_CLAIM_BYTES];
        assert!(matches!(verify(&big, NOW), Err(Rejected::TooLarge(_))));
    }

    /// An entry as `kept` reads it: only who announced and when.
    fn listed(p: PeerId, at: u64) -> ServerRecord {
        ServerRecord {
            peer_id: p.to_bytes(),
            announced_at_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn one_claim_per_claimant_about_each_listed_unrefuted_server_is_kept() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (s, refuted, unlisted) = (peer(), peer(), peer());
        let servers = [listed(s, NOW - 10), listed(refuted, NOW + 2)];
        let kept = kept(
            [
                claim(s, &FP, 0, NOW, &a).unwrap(),
                claim(s, &FP, 0, NOW + 5, &a).unwrap(),
                claim(s, &FP, 0, NOW + 1, &b).unwrap(),
                claim(refuted, &FP, 0, NOW + 1, &a).unwrap(),
                claim(unlisted, &FP, 0, NOW + 1, &a).unwrap(),
            ],
            &servers,
            |_| true,
        );
        let pairs: Vec<(Vec<u8>, u64)> = kept
            .iter()
            .map(|c| (c.public_key.clone(), c.seen_at_ms))
            .collect();
        let key = |k: &Keypair| k.public().encode_protobuf();
        let mut want = vec![(key(&a), NOW + 5), (key(&b), NOW + 1)];
        want.sort();
        let mut got = pairs;
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_flood_of_fresh_claims_about_live_servers_cannot_push_out_one_about_a_dead_server() {
        let (honest, dead) = (Keypair::generate_ed25519(), peer());
        // The dead server last announced 12 s ago; the live ones just did.
        let mut servers = vec![listed(dead, NOW - 12_000)];
        let live: Vec<PeerId> = (0..MAX_CLAIMS_PER_BLOCK + 8).map(|_| peer()).collect();
        servers.extend(live.iter().map(|&p| listed(p, NOW - 1_000)));
        let genuine = claim(dead, &FP, 0, NOW - 2_000, &honest).unwrap();
        // Newer than the genuine claim, each from a key of its own.
        let flood = live
            .iter()
            .map(|&p| claim(p, &FP, 0, NOW, &Keypair::generate_ed25519()).unwrap());
        let kept = kept(flood.chain([genuine.clone()]), &servers, |_| true);
        assert_eq!(kept.len(), MAX_CLAIMS_PER_BLOCK);
        assert!(kept.contains(&genuine));
    }

    #[test]
    fn a_claim_belongs_under_the_key_of_the_block_it_names() {
        let c = claim(peer(), &FP, 3, NOW, &Keypair::generate_ed25519()).unwrap();
        assert!(belongs_to(&c, &crate::discovery::block_key(&FP, 3)));
        assert!(!belongs_to(&c, &crate::discovery::block_key(&FP, 4)));
        assert!(!belongs_to(&c, &crate::discovery::block_key(&[8u8; 32], 3)));
    }
}
