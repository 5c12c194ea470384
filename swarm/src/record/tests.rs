use super::*;
use crate::discovery::block_key;
use crate::offline;
use proto::v1::ServerState;

const NOW: u64 = 1_700_000_000_000;
const FP: Fingerprint = [7u8; 32];

fn entry(key: &Keypair, state: ServerState, at: u64) -> ServerRecord {
    let mut r = ServerRecord {
        peer_id: key.public().to_peer_id().to_bytes(),
        fingerprint: FP.to_vec(),
        start_block: 0,
        end_block: 15,
        state: state as i32,
        decode_ms_per_block: 1.5,
        announced_at_ms: at,
        expires_at_ms: at + 90_000,
        ..Default::default()
    };
    sign(&mut r, key).unwrap();
    r
}

fn record(servers: Vec<ServerRecord>) -> Vec<u8> {
    BlockRecord {
        servers,
        ..Default::default()
    }
    .encode_to_vec()
}

fn servers(bytes: &[u8]) -> Vec<ServerRecord> {
    BlockRecord::decode(bytes).unwrap().servers
}

#[test]
fn a_signed_entry_verifies_as_its_owner() {
    let k = Keypair::generate_ed25519();
    let r = entry(&k, ServerState::Online, NOW);
    assert_eq!(verify(&r, NOW), Ok(k.public().to_peer_id()));
    // A decoded copy verifies too: the signed bytes survive the wire.
    let copy = ServerRecord::decode(r.encode_to_vec().as_slice()).unwrap();
    assert_eq!(verify(&copy, NOW + 1000), Ok(k.public().to_peer_id()));
}

#[test]
fn any_changed_field_breaks_the_signature() {
    let k = Keypair::generate_ed25519();
    let r = entry(&k, ServerState::Online, NOW);
    let changes: [fn(&mut ServerRecord); 6] = [
        |r| r.state = ServerState::Offline as i32,
        |r| r.decode_ms_per_block = 1e-6,
        |r| r.start_block = 1,
        |r| r.announced_at_ms += 1,
        |r| r.addrs.push(vec![4, 127, 0, 0, 1]),
        |r| r.fingerprint[0] ^= 1,
    ];
    for change in changes {
        let mut forged = r.clone();
        change(&mut forged);
        assert_eq!(verify(&forged, NOW), Err(Rejected::Signature));
    }
}

#[test]
fn nobody_can_write_another_peers_entry() {
    let (honest, attacker) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    // Signed by the attacker's own key, naming the honest peer.
    let mut forged = entry(&attacker, ServerState::Offline, NOW);
    forged.peer_id = honest.public().to_peer_id().to_bytes();
    assert_eq!(
        verify(&forged, NOW),
        Err(Rejected::NotOwner {
            claimed: honest.public().to_peer_id().to_string(),
            signer: attacker.public().to_peer_id().to_string(),
        })
    );
    // Carrying the honest peer's public key, signed by the attacker.
    let mut forged = entry(&honest, ServerState::Offline, NOW);
    forged.signature = attacker.sign(&signed_bytes(&forged)).unwrap();
    assert_eq!(verify(&forged, NOW), Err(Rejected::Signature));
    // Not signed at all (what every entry was before signing existed).
    let mut unsigned = entry(&honest, ServerState::Offline, NOW);
    unsigned.signature.clear();
    assert_eq!(verify(&unsigned, NOW), Err(Rejected::Unsigned));
    unsigned.public_key.clear();
    assert_eq!(verify(&unsigned, NOW), Err(Rejected::Unsigned));
    let mut junk_key = entry(&honest, ServerState::Offline, NOW);
    junk_key.public_key = vec![1, 2, 3];
    assert_eq!(verify(&junk_key, NOW), Err(Rejected::PublicKey));
    let mut junk_peer = entry(&honest, ServerState::Offline, NOW);
    junk_peer.peer_id = vec![0xff; 3];
    assert_eq!(verify(&junk_peer, NOW), Err(Rejected::PeerId));
}

#[test]
fn implausible_times_and_sizes_are_refused_even_when_signed() {
    let k = Keypair::generate_ed25519();
    let year = 365 * 24 * 3_600_000;
    let ahead = entry(&k, ServerState::Online, NOW + year);
    assert_eq!(verify(&ahead, NOW), Err(Rejected::FutureDated(year)));
    // Within the clock skew allowance it is fine.
    let skewed = entry(&k, ServerState::Online, NOW + MAX_CLOCK_SKEW_MS);
    assert!(verify(&skewed, NOW).is_ok());

    let mut forever = entry(&k, ServerState::Online, NOW);
    forever.expires_at_ms = u64::MAX;
    sign(&mut forever, &k).unwrap();
    assert!(matches!(
        verify(&forever, NOW),
        Err(Rejected::TtlTooLong(_))
    ));

    let old = entry(&k, ServerState::Online, NOW - 100_000);
    assert_eq!(verify(&old, NOW), Err(Rejected::Expired));

    let mut big = entry(&k, ServerState::Online, NOW);
    big.addrs = vec![vec![0u8; 64]; 100];
    sign(&mut big, &k).unwrap();
    assert!(matches!(verify(&big, NOW), Err(Rejected::TooLarge(_))));
}

#[test]
fn a_stored_record_keeps_honest_entries_whatever_is_put_on_top() {
    let (honest, attacker) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let key = block_key(&FP, 3);
    let held = record(vec![entry(&honest, ServerState::Online, NOW)]);

    // A put without the honest entry, with a forged "offline" copy of it a year ahead and the
    // attacker's own valid entry: the honest entry stays, the attacker's own joins.
    let mut forged = entry(&attacker, ServerState::Offline, NOW + 365 * 86_400_000);
    forged.peer_id = honest.public().to_peer_id().to_bytes();
    let own = entry(&attacker, ServerState::Online, NOW);
    let put = record(vec![forged, own.clone()]);
    let kept = servers(&merge_stored(&key, Some(&held), &put, NOW).unwrap());
    assert_eq!(kept.len(), 2);
    assert!(kept.contains(&entry(&honest, ServerState::Online, NOW)));
    assert!(kept.contains(&own));

    // Nothing new and valid in the put: nothing to store, what is held stays.
    assert_eq!(merge_stored(&key, Some(&held), b"junk", NOW), None);
    assert_eq!(merge_stored(&key, None, &record(vec![]), NOW), None);
    assert_eq!(merge_stored(&key, Some(&held), &held, NOW), None);
    // A put of more entries than any honest record holds is not even looked at.
    let flood = vec![own.clone(); MAX_SERVERS_PER_BLOCK + 1];
    assert_eq!(merge_stored(&key, None, &record(flood), NOW), None);
    // Held entries that expired go with the next put.
    let later = NOW + 200_000;
    let fresh_own = entry(&attacker, ServerState::Online, later);
    let kept =
        servers(&merge_stored(&key, Some(&held), &record(vec![fresh_own.clone()]), later).unwrap());
    assert_eq!(kept, vec![fresh_own]);

    // The owner's newer entry (here: leaving) replaces its older one.
    let leaving = entry(&honest, ServerState::Offline, NOW + 10);
    let kept =
        servers(&merge_stored(&key, Some(&held), &record(vec![leaving.clone()]), NOW).unwrap());
    assert_eq!(kept, vec![leaving]);

    // An entry for blocks this key is not about, or for another model, is not stored here.
    let elsewhere = block_key(&FP, 20);
    assert_eq!(merge_stored(&elsewhere, None, &held, NOW), None);
    let other_model = block_key(&[8u8; 32], 3);
    assert_eq!(merge_stored(&other_model, None, &held, NOW), None);
}

#[test]
fn a_crowded_block_keeps_the_freshest_entries() {
    let entries: Vec<ServerRecord> = (0..MAX_SERVERS_PER_BLOCK as u64 + 6)
        .map(|i| entry(&Keypair::generate_ed25519(), ServerState::Online, NOW - i))
        .collect();
    let kept = newest_per_peer(entries.clone(), |_| true, &mut Checker::default(), NOW);
    assert_eq!(kept.len(), MAX_SERVERS_PER_BLOCK);
    let oldest_kept = kept.iter().map(|s| s.announced_at_ms).min().unwrap();
    assert_eq!(oldest_kept, NOW - MAX_SERVERS_PER_BLOCK as u64 + 1);
}

/// Whatever bytes peers put under a block's key, or send as copies of it: the decoder, the
/// stores' merge and the readers' merge never panic, and what they keep is only ever entries
/// that verify as their owner's (or, for a store, entries it already held).
mod arbitrary_bytes {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::discovery::{merge_copies, Server};

    /// Three fixed identities (key generation is slow, and failures should reproduce).
    fn keys() -> [Keypair; 3] {
        [1u8, 2, 3].map(|i| Keypair::ed25519_from_bytes([i; 32]).unwrap())
    }

    /// How an arbitrary entry is signed.
    #[derive(Debug, Clone)]
    enum Signing {
        Unsigned,
        KeyOnly,
        Garbage(Vec<u8>),
        /// Signed by another key than the one of the peer it names.
        ByOther(usize),
        Owner,
    }

    fn signing() -> impl Strategy<Value = Signing> {
        prop_oneof![
            Just(Signing::Unsigned),
            Just(Signing::KeyOnly),
            prop::collection::vec(any::<u8>(), 0..80).prop_map(Signing::Garbage),
            (0usize..3).prop_map(Signing::ByOther),
            Just(Signing::Owner),
        ]
    }

    /// Entries with every field arbitrary within a range that makes some of them plausible.
    fn entry_of_any_kind() -> impl Strategy<Value = ServerRecord> {
        (
            (0usize..3, signing(), any::<bool>()),
            (0u32..20, 0u32..20, -1i32..5),
            (-200_000i64..200_000, 0u64..2 * MAX_TTL_MS),
            (
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..3),
                any::<f32>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |((owner, how, our_model), (start, len, state), (at, ttl), (addrs, ms, free))| {
                    let keys = keys();
                    let announced_at_ms = NOW.saturating_add_signed(at);
                    let mut r = ServerRecord {
                        peer_id: keys[owner].public().to_peer_id().to_bytes(),
                        fingerprint: if our_model { FP.to_vec() } else { vec![9; 32] },
                        start_block: start,
                        end_block: start.saturating_add(len),
                        state,
                        addrs,
                        decode_ms_per_block: ms,
                        free_cache_tokens: free,
                        announced_at_ms,
                        expires_at_ms: announced_at_ms.saturating_add(ttl),
                        ..Default::default()
                    };
                    match how {
                        Signing::Unsigned => {}
                        Signing::KeyOnly => r.public_key = keys[owner].public().encode_protobuf(),
                        Signing::Garbage(sig) => {
                            r.public_key = keys[owner].public().encode_protobuf();
                            r.signature = sig;
                        }
                        Signing::ByOther(signer) => {
                            sign(&mut r, &keys[signer]).unwrap();
                            r.peer_id = keys[(signer + 1) % 3].public().to_peer_id().to_bytes();
                        }
                        Signing::Owner => sign(&mut r, &keys[owner]).unwrap(),
                    }
                    r
                },
            )
    }

    /// A record's bytes as a peer might put them: well-formed records of arbitrary entries,
    /// such records with bytes overwritten or cut off, and plain noise.
    fn record_bytes() -> impl Strategy<Value = Vec<u8>> {
        let well_formed = || {
            prop::collection::vec(entry_of_any_kind(), 0..5).prop_map(|servers| {
                BlockRecord {
                    servers,
                    ..Default::default()
                }
                .encode_to_vec()
            })
        };
        prop_oneof![
            well_formed(),
            (
                well_formed(),
                prop::collection::vec((any::<Index>(), any::<u8>()), 1..8),
                prop::option::of(any::<Index>()),
            )
                .prop_map(|(mut bytes, edits, cut)| {
                    if !bytes.is_empty() {
                        for (at, b) in edits {
                            let i = at.index(bytes.len());
                            bytes[i] = b;
                        }
                        if let Some(cut) = cut {
                            bytes.truncate(cut.index(bytes.len()));
                        }
                    }
                    bytes
                }),
            prop::collection::vec(any::<u8>(), 0..512),
        ]
    }

    /// What a store may keep: something it held, or an entry that verifies, is for `key` and
    /// is signed.
    fn believable(s: &ServerRecord, key: &RecordKey, held: &[ServerRecord]) -> bool {
        held.contains(s)
            || (!s.signature.is_empty() && verify(s, NOW).is_ok() && belongs_to(s, key))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_store_keeps_only_what_it_held_or_what_verifies(
            incoming in record_bytes(),
            block in 0u32..20,
            holds in any::<bool>(),
        ) {
            let key = block_key(&FP, block);
            let keys = keys();
            let held: Vec<ServerRecord> = if holds {
                vec![entry(&keys[0], ServerState::Online, NOW - 5)]
            } else {
                Vec::new()
            };
            let held_bytes = record(held.clone());
            let merged = merge_stored(&key, holds.then_some(held_bytes.as_slice()), &incoming, NOW);
            if let Some(out) = merged {
                let kept = BlockRecord::decode(out.as_slice()).expect("the store writes records");
                prop_assert!(!kept.servers.is_empty());
                prop_assert!(kept.servers.len() <= MAX_SERVERS_PER_BLOCK);
                for s in &kept.servers {
                    prop_assert!(believable(s, &key, &held), "kept {:?}", s);
                }
                let mut peers: Vec<&[u8]> = kept.servers.iter().map(|s| &s.peer_id[..]).collect();
                peers.dedup();
                prop_assert_eq!(peers.len(), kept.servers.len(), "one entry per peer");
            }
        }

        #[test]
        fn a_reader_keeps_only_entries_that_verify(
            copies in prop::collection::vec(record_bytes(), 0..4),
        ) {
            let merged = merge_copies(&copies, &FP, NOW, &mut Checker::default());
            prop_assert!(merged.len() <= MAX_SERVERS_PER_BLOCK);
            for s in &merged {
                prop_assert!(!s.signature.is_empty(), "unsigned entry kept: {:?}", s);
                prop_assert_eq!(verify(s, NOW).ok(), PeerId::from_bytes(&s.peer_id).ok());
                prop_assert_eq!(&s.fingerprint[..], &FP[..]);
                // What a client builds from it is checked again, and never panics either.
                let _ = Server::from_record(s, &FP, 20, NOW);
            }
            let mut peers: Vec<&[u8]> = merged.iter().map(|s| &s.peer_id[..]).collect();
            peers.dedup();
            prop_assert_eq!(peers.len(), merged.len(), "one entry per peer");
        }

        #[test]
        fn decoding_noise_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(r) = BlockRecord::decode(bytes.as_slice()) {
                for s in &r.servers {
                    let _ = verify(s, NOW);
                    let _ = Server::from_record(s, &FP, 20, NOW);
                }
            }
            let _ = ServerRecord::decode(bytes.as_slice()).map(|s| verify(&s, NOW));
        }
    }
}

fn claims(bytes: &[u8]) -> Vec<OfflineClaim> {
    BlockRecord::decode(bytes).unwrap().offline
}

fn with_claims(servers: Vec<ServerRecord>, offline: Vec<OfflineClaim>) -> Vec<u8> {
    BlockRecord { servers, offline }.encode_to_vec()
}

#[test]
fn a_stored_claim_lasts_until_its_server_announces_again() {
    let (server, client) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let subject = server.public().to_peer_id();
    let key = block_key(&FP, 3);
    let held = record(vec![entry(&server, ServerState::Online, NOW)]);

    // A client's claim, written back with the record it read: stored beside the entry.
    let claim = offline::claim(subject, &FP, 3, NOW + 1_000, &client).unwrap();
    let put = with_claims(
        vec![entry(&server, ServerState::Online, NOW)],
        vec![claim.clone()],
    );
    let stored = merge_stored(&key, Some(&held), &put, NOW + 1_000).unwrap();
    assert_eq!(claims(&stored), std::slice::from_ref(&claim));
    assert_eq!(servers(&stored).len(), 1);
    // The same put again brings nothing new.
    assert_eq!(merge_stored(&key, Some(&stored), &put, NOW + 1_000), None);

    // Another server's announcement carries it on; the subject's next one refutes it.
    let other = entry(
        &Keypair::generate_ed25519(),
        ServerState::Online,
        NOW + 2_000,
    );
    let stored2 = merge_stored(&key, Some(&stored), &record(vec![other]), NOW + 2_000).unwrap();
    assert_eq!(claims(&stored2), std::slice::from_ref(&claim));
    let again = record(vec![entry(&server, ServerState::Online, NOW + 3_000)]);
    let refuted = merge_stored(&key, Some(&stored2), &again, NOW + 3_000).unwrap();
    assert!(claims(&refuted).is_empty());

    // A minute on, an unrefuted claim is gone with the next write.
    let later = NOW + 1_000 + offline::CLAIM_TTL_MS + 1;
    let late = record(vec![entry(
        &Keypair::generate_ed25519(),
        ServerState::Online,
        later,
    )]);
    assert!(claims(&merge_stored(&key, Some(&stored), &late, later).unwrap()).is_empty());
}

#[test]
fn forged_misplaced_and_excess_claims_are_not_stored() {
    let (server, client) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let subject = server.public().to_peer_id();
    let key = block_key(&FP, 3);
    let held = record(vec![entry(&server, ServerState::Online, NOW)]);
    let at = NOW + 1_000;

    let mut forged = offline::claim(subject, &FP, 3, at, &client).unwrap();
    forged.seen_at_ms += 1;
    let misplaced = offline::claim(subject, &FP, 4, at, &client).unwrap();
    let ahead = offline::claim(subject, &FP, 3, at + 3_600_000, &client).unwrap();
    let own = offline::claim(subject, &FP, 3, at, &server).unwrap();
    let put = with_claims(Vec::new(), vec![forged, misplaced, ahead, own]);
    assert_eq!(merge_stored(&key, Some(&held), &put, at), None);

    // More claims than a record keeps: the put is refused whole, valid ones included.
    let many = (0..offline::MAX_CLAIMS_PER_BLOCK + 1)
        .map(|_| offline::claim(subject, &FP, 3, at, &Keypair::generate_ed25519()).unwrap())
        .collect();
    assert_eq!(
        merge_stored(&key, Some(&held), &with_claims(Vec::new(), many), at),
        None
    );
}

#[test]
fn claims_about_unlisted_servers_are_not_stored_and_a_flood_cannot_mute_a_dead_server() {
    let key = block_key(&FP, 3);
    let (dead, client) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let live: Vec<Keypair> = (0..offline::MAX_CLAIMS_PER_BLOCK)
        .map(|_| Keypair::generate_ed25519())
        .collect();
    // The dead server last announced 12 s ago; the live ones 1 s ago.
    let mut entries = vec![entry(&dead, ServerState::Online, NOW - 12_000)];
    entries.extend(
        live.iter()
            .map(|k| entry(k, ServerState::Online, NOW - 1_000)),
    );
    let genuine = offline::claim(dead.public().to_peer_id(), &FP, 3, NOW, &client).unwrap();
    let held = merge_stored(
        &key,
        None,
        &with_claims(entries.clone(), vec![genuine.clone()]),
        NOW,
    )
    .unwrap();
    assert_eq!(claims(&held), std::slice::from_ref(&genuine));

    // About a peer the record does not list: nothing to store.
    let nobody = Keypair::generate_ed25519().public().to_peer_id();
    let junk = offline::claim(nobody, &FP, 3, NOW + 1, &client).unwrap();
    assert_eq!(
        merge_stored(
            &key,
            Some(&held),
            &with_claims(Vec::new(), vec![junk]),
            NOW + 1
        ),
        None
    );

    // A Sybil's newer claims about every live server, each from a key of its own, fill the
    // record's room: the claim about the server that stopped announcing stays.
    let flood = live
        .iter()
        .map(|k| {
            let sybil = Keypair::generate_ed25519();
            offline::claim(k.public().to_peer_id(), &FP, 3, NOW + 2, &sybil).unwrap()
        })
        .collect();
    let stored = merge_stored(&key, Some(&held), &with_claims(Vec::new(), flood), NOW + 2).unwrap();
    let kept = claims(&stored);
    assert_eq!(kept.len(), offline::MAX_CLAIMS_PER_BLOCK);
    assert!(kept.contains(&genuine));
}
