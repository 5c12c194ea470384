use super::*;
use crate::discovery::block_key;
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
    BlockRecord { servers }.encode_to_vec()
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
