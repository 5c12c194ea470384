//! A hostile peer, written on the project's own crates, against an honest swarm of real
//! processes: what it puts into the DHT must not change what an honest client is served.

use std::process::Command;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use model::gguf::GgufFile;
use prost::Message;
use proto::v1::{BlockRecord, ServerRecord, ServerState};
use swarm::discovery::{self, block_key, now_ms};
use swarm::{NetConfig, NetHandle};
use tokio_util::sync::CancellationToken;

use super::default_model;
use super::swarm::{bootstrap, local, node_with, route_of, swarm_command};

const YEAR_MS: u64 = 365 * 24 * 3_600_000;
const WAIT: Duration = Duration::from_secs(8);

/// Waits (bounded) until the DHT, as `net` reads it, shows exactly `online` peers online.
async fn wait_online(net: &NetHandle, fp: &[u8; 32], blocks: u32, online: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let servers = discovery::lookup(net, fp, blocks).await.unwrap_or_default();
        let n = servers
            .iter()
            .filter(|s| s.state == ServerState::Online)
            .count();
        if n == online {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the DHT shows {n} servers online, not {online}, after 60 s: {servers:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// For every block: copies of each honest entry marked offline and dated a year ahead (one
/// re-signed by the attacker under the victim's name, one unsigned), and no honest entry at all,
/// plus the attacker's own validly signed entry, so that a store that replaced what it held
/// would lose every honest server.
async fn poison(net: &NetHandle, attacker: &Keypair, fp: &[u8; 32], blocks: u32) {
    for b in 0..blocks {
        let key = block_key(fp, b);
        let copies = net.get_record(key.clone(), WAIT).await.unwrap_or_default();
        let mut servers = Vec::new();
        for copy in copies {
            for honest in BlockRecord::decode(copy.as_slice()).unwrap().servers {
                let mut forged = ServerRecord {
                    state: ServerState::Offline as i32,
                    announced_at_ms: honest.announced_at_ms + YEAR_MS,
                    expires_at_ms: honest.expires_at_ms + 2 * YEAR_MS,
                    ..honest.clone()
                };
                let mut unsigned = forged.clone();
                unsigned.signature.clear();
                unsigned.public_key.clear();
                swarm::record::sign(&mut forged, attacker).unwrap();
                forged.peer_id = honest.peer_id.clone();
                servers.extend([forged, unsigned]);
            }
        }
        let now = now_ms();
        let mut own = ServerRecord {
            peer_id: attacker.public().to_peer_id().to_bytes(),
            fingerprint: fp.to_vec(),
            start_block: b,
            end_block: b + 1,
            state: ServerState::Offline as i32,
            announced_at_ms: now,
            expires_at_ms: now + 60_000,
            ..Default::default()
        };
        swarm::record::sign(&mut own, attacker).unwrap();
        servers.push(own);
        let value = BlockRecord {
            servers,
            ..Default::default()
        }
        .encode_to_vec();
        net.put_record(key, value, WAIT).await.expect("put");
    }
}

#[test]
fn forged_entries_cannot_take_honest_servers_offline() {
    let boot = bootstrap();
    // Nodes that do not re-announce during the test: nothing heals what the attack does except
    // the checks under attack.
    let quiet = ["--announce-interval", "1200"];
    let _a = node_with("0..15", &boot, &quiet);
    let _b = node_with("15..30", &boot, &quiet);
    let model = default_model();
    let fp = model::fingerprint::fingerprint(&GgufFile::open(&model).unwrap()).unwrap();
    let blocks = 30;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let attacker = Keypair::generate_ed25519();
        let host = swarm::host::start(
            NetConfig {
                keypair: attacker.clone(),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()],
                bootstrap: vec![boot.addr.parse().unwrap()],
                mdns: false,
                dht_server: true,
                on_listen: None,
                swarm_key: None,
            },
            shutdown.clone(),
        )
        .unwrap();
        let net = host.handle.clone();
        wait_online(&net, &fp, blocks, 2).await;
        poison(&net, &attacker, &fp, blocks).await;
        // Readers drop the forgeries and the stores kept the honest entries.
        wait_online(&net, &fp, blocks, 2).await;
        shutdown.cancel();
        let _ = host.task.await;
    });

    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&boot, prompt, "12").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "12")["tokens"]);
    assert_eq!(route_of(&v), ["0..15", "15..30"]);
}

#[test]
fn a_private_swarm_admits_only_peers_with_its_key() {
    let dir = super::TempDir::new("swarm-key");
    let (key, other) = (dir.file("swarm.key"), dir.file("other.key"));
    let (key, other) = (key.to_str().unwrap(), other.to_str().unwrap());
    for k in [key, other] {
        let out = super::edge_node(&["swarm-key", k]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let again = super::edge_node(&["swarm-key", key]);
    assert!(!again.status.success(), "overwrote an existing key");

    let boot = super::swarm::spawn(&[
        "bootstrap",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--swarm-key",
        key,
    ]);
    let _node = node_with("0..30", &boot, &["--swarm-key", key]);
    let prompt = "The capital of France is";
    let with_key = swarm_command(&boot, prompt, "8")
        .args(["--swarm-key", key])
        .output()
        .unwrap();
    assert_eq!(
        super::json_of(&with_key)["tokens"],
        local(prompt, "8")["tokens"]
    );

    // Without the key, or with another one, the client cannot even connect.
    let model = default_model();
    for key_args in [vec![], vec!["--swarm-key", other]] {
        let out = Command::new(env!("CARGO_BIN_EXE_edge-node"))
            .args(super::swarm::generate_args(&model, prompt, "8"))
            .args(["--bootstrap", &boot.addr, "--discovery-timeout", "5"])
            .args(&key_args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("no peer of the swarm answered"),
            "a client with {key_args:?} through a private swarm: {stderr}"
        );
    }
}

/// Signed entries claiming `blocks` at 1e-6 ms per block: one of a peer that does not exist
/// (its key signs, nobody answers at its address) and one of the attacker's own live peer,
/// which answers connections but serves no blocks.
async fn claim_speed(
    net: &NetHandle,
    fp: &[u8; 32],
    blocks: std::ops::Range<u32>,
    liars: &[(&Keypair, Multiaddr)],
) {
    let now = now_ms();
    let servers: Vec<ServerRecord> = liars
        .iter()
        .map(|(key, addr)| {
            let mut r = ServerRecord {
                peer_id: key.public().to_peer_id().to_bytes(),
                addrs: vec![addr.to_vec()],
                fingerprint: fp.to_vec(),
                start_block: blocks.start,
                end_block: blocks.end,
                state: ServerState::Online as i32,
                decode_ms_per_block: 1e-6,
                prefill_ms_per_block: 1e-6,
                free_cache_tokens: 1 << 20,
                announced_at_ms: now,
                expires_at_ms: now + 30_000,
                ..Default::default()
            };
            swarm::record::sign(&mut r, key).unwrap();
            r
        })
        .collect();
    let value = BlockRecord {
        servers,
        ..Default::default()
    }
    .encode_to_vec();
    for b in blocks {
        let _ = net.put_record(block_key(fp, b), value.clone(), WAIT).await;
    }
}

/// Placement that trusted announced speeds let such claims move an honest node off 0..15
/// within 18 s, and clients then found nobody for those blocks. Nodes now count another server
/// only at a speed they measured themselves by timing a step through it: the two honest nodes,
/// checking every 2 s, stay where they are while the claims are renewed, and the client is
/// served the local text.
#[test]
fn claimed_speeds_do_not_move_honest_nodes() {
    let boot = bootstrap();
    let fast = ["--rebalance-interval", "2", "--announce-interval", "1"];
    let a = node_with("0..15", &boot, &fast);
    let b = node_with("15..30", &boot, &fast);
    let model = default_model();
    let fp = model::fingerprint::fingerprint(&GgufFile::open(&model).unwrap()).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let attacker = Keypair::generate_ed25519();
        let ghost = Keypair::generate_ed25519();
        let (tx, rx) = std::sync::mpsc::channel::<Multiaddr>();
        let host = swarm::host::start(
            NetConfig {
                keypair: attacker.clone(),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()],
                bootstrap: vec![boot.addr.parse().unwrap()],
                mdns: false,
                dht_server: true,
                on_listen: Some(Box::new(move |a: &Multiaddr| {
                    let _ = tx.send(a.clone());
                })),
                swarm_key: None,
            },
            shutdown.clone(),
        )
        .unwrap();
        let net = host.handle.clone();
        wait_online(&net, &fp, 30, 2).await;
        let live = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("an address");
        // Nothing listens on port 1 of the loopback.
        let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let liars = [(&ghost, nowhere), (&attacker, live)];
        claim_speed(&net, &fp, 0..15, &liars).await;
        // The claims are in the DHT: readers see two more servers online.
        wait_online(&net, &fp, 30, 4).await;
        // Six rebalancing checks of each node at least, the claims renewed meanwhile.
        let until = Instant::now() + Duration::from_secs(16);
        while Instant::now() < until {
            claim_speed(&net, &fp, 0..15, &liars).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        shutdown.cancel();
        let _ = host.task.await;
    });

    for (node, range) in [(&a, "0..15"), (&b, "15..30")] {
        let history = node.serving.lock().unwrap().clone();
        assert_eq!(history, [range], "the node moved on claims: {history:?}");
    }
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&boot, prompt, "12").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "12")["tokens"]);
    assert_eq!(route_of(&v), ["0..15", "15..30"]);
}

/// A copy of the default model whose only difference is `rope.freq_base` (100000 -> 10000):
/// the header's f32 is rewritten in place, so every tensor byte and offset is the same.
fn with_other_rope_base(dir: &super::TempDir) -> String {
    let mut bytes = std::fs::read(default_model()).unwrap();
    let key = b"llama.rope.freq_base";
    let at = bytes
        .windows(key.len())
        .take(1 << 20)
        .position(|w| w == key)
        .expect("the model has a rope.freq_base key")
        + key.len();
    // GGUF: the key, then its value type (6 = f32), then the value.
    assert_eq!(
        bytes[at..at + 4],
        6u32.to_le_bytes(),
        "rope.freq_base is an f32"
    );
    assert_eq!(bytes[at + 4..at + 8], 100_000f32.to_le_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&10_000f32.to_le_bytes());
    let path = dir.file("other-rope.gguf");
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

/// A node whose file differs from the real one only in `rope.freq_base` once had the same
/// fingerprint, and a client routed through it and printed other text. Here it serves all 30
/// blocks in one hop, which a client would prefer to two honest nodes' two hops if it could
/// see it: it cannot (different fingerprint, different DHT keys), so the text is the local
/// one. A client of the other file is served by that node, with that file's own text, which
/// differs: the change does alter the math.
#[test]
fn a_file_differing_only_in_rope_base_is_never_mixed_in() {
    let dir = super::TempDir::new("rope");
    let other = with_other_rope_base(&dir);
    let real = default_model();
    let fp = |p: &str| model::fingerprint::fingerprint(&GgufFile::open(p).unwrap()).unwrap();
    assert_ne!(
        fp(&real),
        fp(&other),
        "the fingerprint misses rope.freq_base"
    );

    let boot = bootstrap();
    let _odd = super::swarm::node_of(&other, "0..30", &boot, &[]);
    let _a = node_with("0..15", &boot, &[]);
    let _b = node_with("15..30", &boot, &[]);
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&boot, prompt, "12").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "12")["tokens"]);
    assert_eq!(route_of(&v), ["0..15", "15..30"]);

    let w = super::json_of(
        &super::swarm::swarm_command_of(&other, &boot, prompt, "12")
            .output()
            .unwrap(),
    );
    let theirs = super::swarm::local_of(&other, prompt, "12");
    assert_eq!(w["tokens"], theirs["tokens"]);
    assert_eq!(route_of(&w), ["0..30"]);
    assert_ne!(
        theirs["tokens"], v["tokens"],
        "the rope base did not change the text: this test shows nothing"
    );
}
