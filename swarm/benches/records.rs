//! What signed DHT entries cost: signing one (a node, once per block per announce interval),
//! verifying one (every reader, once per distinct entry per lookup), and the merge a storing peer
//! runs on each put of a block record holding `n` entries; the same for a client's offline claim
//! (see `swarm::offline`), put into a full record (64 entries, 31 claims held).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use libp2p::identity::Keypair;
use prost::Message;
use proto::v1::{BlockRecord, ServerRecord, ServerState};
use swarm::discovery::{block_key, now_ms};
use swarm::offline;
use swarm::record::{merge_stored, sign, verify};

const FP: [u8; 32] = [7; 32];

fn entry(key: &Keypair, now: u64) -> ServerRecord {
    let mut r = ServerRecord {
        peer_id: key.public().to_peer_id().to_bytes(),
        addrs: vec![
            "/ip4/192.168.1.20/tcp/31337"
                .parse::<libp2p::Multiaddr>()
                .unwrap()
                .to_vec(),
            "/ip4/192.168.1.20/udp/31337/quic-v1"
                .parse::<libp2p::Multiaddr>()
                .unwrap()
                .to_vec(),
        ],
        fingerprint: FP.to_vec(),
        start_block: 0,
        end_block: 30,
        state: ServerState::Online as i32,
        decode_ms_per_block: 0.4,
        prefill_ms_per_block: 3.1,
        free_cache_tokens: 8192,
        version: "0.1.0".into(),
        announced_at_ms: now,
        expires_at_ms: now + 30_000,
        ..Default::default()
    };
    sign(&mut r, key).unwrap();
    r
}

fn records(c: &mut Criterion) {
    let now = now_ms();
    let key = Keypair::generate_ed25519();
    let one = entry(&key, now);
    c.bench_function("sign one entry", |b| {
        b.iter(|| {
            let mut r = one.clone();
            sign(&mut r, &key).unwrap();
            r
        })
    });
    c.bench_function("verify one entry", |b| {
        b.iter(|| verify(&one, now).unwrap())
    });
    let dht_key = block_key(&FP, 29);
    let mut group = c.benchmark_group("merge a put into a held record");
    for n in [4usize, 64] {
        let servers: Vec<ServerRecord> = (0..n)
            .map(|_| entry(&Keypair::generate_ed25519(), now))
            .collect();
        let held = BlockRecord {
            servers,
            ..Default::default()
        }
        .encode_to_vec();
        let put = BlockRecord {
            servers: vec![one.clone()],
            ..Default::default()
        }
        .encode_to_vec();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| merge_stored(&dht_key, Some(&held), &put, now).unwrap())
        });
    }
    group.finish();

    let client = Keypair::generate_ed25519();
    let subject = key.public().to_peer_id();
    let claim = offline::claim(subject, &FP, 29, now, &client).unwrap();
    println!("one offline claim: {} bytes encoded", claim.encoded_len());
    c.bench_function("sign one offline claim", |b| {
        b.iter(|| offline::claim(subject, &FP, 29, now, &client).unwrap())
    });
    c.bench_function("verify one offline claim", |b| {
        b.iter(|| offline::verify(&claim, now).unwrap())
    });
    // A record keeps claims only about servers it lists: the held claims name 31 of its 64
    // servers, the new one a 32nd.
    let keys: Vec<Keypair> = (0..64).map(|_| Keypair::generate_ed25519()).collect();
    let servers: Vec<ServerRecord> = keys.iter().map(|k| entry(k, now - 1)).collect();
    let listed = |i: usize| keys[i].public().to_peer_id();
    let claim = offline::claim(listed(31), &FP, 29, now, &client).unwrap();
    let held_claims: Vec<_> = (0..offline::MAX_CLAIMS_PER_BLOCK - 1)
        .map(|i| offline::claim(listed(i), &FP, 29, now, &Keypair::generate_ed25519()).unwrap())
        .collect();
    let held = BlockRecord {
        servers: servers.clone(),
        offline: held_claims.clone(),
    }
    .encode_to_vec();
    // What a client writes: the record it read, with its claim added.
    let mut with_claim = held_claims;
    with_claim.push(claim);
    let put = BlockRecord {
        servers,
        offline: with_claim,
    }
    .encode_to_vec();
    println!(
        "a full record: {} bytes held, {} bytes with the claim",
        held.len(),
        put.len()
    );
    c.bench_function("merge a claim into a full record", |b| {
        b.iter(|| merge_stored(&dht_key, Some(&held), &put, now).unwrap())
    });
}

criterion_group!(benches, records);
criterion_main!(benches);
