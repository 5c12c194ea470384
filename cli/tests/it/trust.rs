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
        let value = BlockRecord { servers }.encode_to_vec();
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
