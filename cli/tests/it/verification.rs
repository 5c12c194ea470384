//! A peer that computes wrong answers, against clients that check (`--verify-every`) and
//! clients that do not. The liar is a real node with the test-only fault switch
//! (`node::Fault::CorruptOutputs`, compiled only with the `fault-injection` feature that these
//! tests' dev-dependency turns on), run in this process because no flag of the `edge-node`
//! binary can turn the switch on; the honest nodes are `edge-node` processes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use node::{BlockChoice, Fault, JoinConfig, NetOptions};
use tokio_util::sync::CancellationToken;

use super::chat::{chat, TURNS};
use super::swarm::{bootstrap, local, node_with, swarm_command, Proc};
use super::{default_model, TempDir};

/// A node of all 30 blocks with a fault (negated outputs, or every step refused as malformed)
/// that announces ten times its speed, so that clients route through it. Stops when dropped.
pub(super) struct Liar {
    pub(super) peer: String,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Liar {
    fn start(boot: &Proc, dir: &TempDir, fault: Fault) -> Self {
        Self::serving(boot, dir, fault, 0..30)
    }

    /// A liar serving `blocks` only.
    pub(super) fn serving(
        boot: &Proc,
        dir: &TempDir,
        fault: Fault,
        blocks: std::ops::Range<usize>,
    ) -> Self {
        Self::announcing(boot, dir, fault, blocks, Duration::from_secs(2))
    }

    /// A liar serving `blocks` that announces itself every `interval`.
    pub(super) fn announcing(
        boot: &Proc,
        dir: &TempDir,
        fault: Fault,
        blocks: std::ops::Range<usize>,
        interval: Duration,
    ) -> Self {
        let identity = dir.file("liar.key");
        let peer = swarm::identity::load_or_create(&identity)
            .expect("an identity for the liar")
            .public()
            .to_peer_id()
            .to_string();
        let health = dir.file("liar.health");
        let config = JoinConfig {
            model: PathBuf::from(default_model()),
            blocks: BlockChoice::Fixed(blocks),
            max_memory_bytes: None,
            net: NetOptions {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap: vec![boot.addr.parse().unwrap()],
                identity: Some(identity),
                mdns: false,
                external: Vec::new(),
                swarm_key: None,
                relay: swarm::host::RelayServer::Auto,
                relay_listen: true,
            },
            max_sessions: 16,
            cache_tokens: 16384,
            max_sessions_per_peer: None,
            cache_tokens_per_peer: None,
            prefill_chunk: None,
            max_step_tokens: proto::DEFAULT_MAX_STEP_TOKENS,
            announce_interval: interval,
            idle_timeout: Duration::from_secs(120),
            rebalance_interval: None,
            rebalance_min_gain: 0.2,
            drain_timeout: Duration::ZERO,
            health_file: Some(health.clone()),
            http_listen: None,
            fault,
        };
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime for the liar");
            if let Err(e) = rt.block_on(node::run_join(config, token)) {
                eprintln!("the lying node failed: {e}");
            }
        });
        // The health file is touched once the node announces itself as serving.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !health.exists() {
            assert!(Instant::now() < deadline, "the lying node never served");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            peer,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a client (`run` returns its output and whether the liar's peer id appears in it at
/// all) until one routes through the liar, at most three times. A client prices a server it
/// could not ping within its short probe wait at a 100 ms round trip, which the liar's claimed
/// speed does not outweigh, so on a loaded machine (the suite runs tests side by side) a client
/// may never try the liar; that run shows nothing about verification, and the next client
/// measures afresh. A client that did route through the liar is returned whatever happened.
pub(super) fn through_the_liar<T>(liar: &Liar, mut run: impl FnMut() -> (T, bool)) -> T {
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let (out, routed) = run();
        if routed {
            return out;
        }
        eprintln!("attempt {attempt}: the client did not route through the liar; again");
    }
    panic!(
        "in {ATTEMPTS} runs no client routed through the liar {}, so nothing was checked",
        liar.peer
    );
}

/// Waits (bounded) until `node` has said it serves its blocks.
fn serving(node: &Proc) {
    node.wait_line("serving blocks ");
}

/// Without verification the liar's answers reach the text (so the swarm below really routes
/// through it, and this test could fail); with `--verify-every 8 --verify-sample 1` (every
/// position checked) the liar is caught by the honest verifier and the spare tie-breaker,
/// banned, and the text is the local one; so it is with `--verify-sample 0`, where only the
/// prompt's first rows are checked.
#[test]
fn a_peer_that_corrupts_every_step_is_caught_and_the_text_is_the_local_one() {
    let dir = TempDir::new("verify");
    let boot = bootstrap();
    let honest = node_with("0..30", &boot, &[]);
    let spare = node_with("0..30", &boot, &[]);
    serving(&honest);
    serving(&spare);
    let liar = Liar::start(&boot, &dir, Fault::CorruptOutputs);
    let prompt = "The capital of France is";
    let reference = local(prompt, "24");

    let unchecked = through_the_liar(&liar, || {
        let v = super::json_of(&swarm_command(&boot, prompt, "24").output().unwrap());
        let routed = v["route"].to_string().contains(&liar.peer);
        (v, routed)
    });
    assert_ne!(
        unchecked["tokens"], reference["tokens"],
        "the liar's outputs did not change the text: nothing for verification to catch"
    );

    let verified = |sample: &str| {
        through_the_liar(&liar, || {
            let out = swarm_command(&boot, prompt, "24")
                .args(["--verify-every", "8", "--verify-sample", sample])
                .output()
                .unwrap();
            let v = super::json_of(&out);
            // The liar's id is in the route if it was used, and in `caught` if it was caught.
            let routed = v.to_string().contains(&liar.peer);
            (v, routed)
        })
    };
    let checked = verified("1");
    assert_eq!(
        checked["tokens"], reference["tokens"],
        "verified swarm output differs from local"
    );
    assert_eq!(
        checked["caught"],
        serde_json::json!([liar.peer]),
        "the liar must be caught, and nobody else"
    );
    assert!(
        !checked["route"].to_string().contains(&liar.peer),
        "the liar is still in the final route: {checked}"
    );

    // Auditing no session: the first check covers only the first rows of the prompt, and
    // still catches a peer that corrupts every step.
    let sampled = verified("0");
    assert_eq!(sampled["tokens"], reference["tokens"], "{sampled}");
    assert_eq!(
        sampled["caught"],
        serde_json::json!([liar.peer]),
        "{sampled}"
    );
}

/// `chat` keeps one session over several turns (later turns reuse the cached conversation):
/// with verification on, the liar is caught in the first turn and the whole conversation is
/// the one process's.
#[test]
fn a_chat_with_verification_is_the_local_conversation() {
    let dir = TempDir::new("verify-chat");
    let boot = bootstrap();
    let honest = node_with("0..30", &boot, &[]);
    let spare = node_with("0..30", &boot, &[]);
    serving(&honest);
    serving(&spare);
    let liar = Liar::start(&boot, &dir, Fault::CorruptOutputs);
    let route = [
        "--bootstrap",
        &boot.addr,
        "--discovery-timeout",
        "60",
        "--verify-every",
        "16",
    ];
    let swarm = through_the_liar(&liar, || {
        let out = chat(&route, &TURNS, Duration::ZERO);
        let routed = String::from_utf8_lossy(&out.stderr).contains(&liar.peer);
        (out, routed)
    });
    let local = chat(&["--local"], &TURNS, Duration::ZERO);
    let stderr = String::from_utf8_lossy(&swarm.stderr);
    assert_eq!(
        String::from_utf8_lossy(&swarm.stdout),
        String::from_utf8_lossy(&local.stdout),
        "the verified conversation differs from the local one: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{} disagrees with", liar.peer)),
        "the liar was not caught: {stderr}"
    );
}

/// A node that answers every step with BAD_REQUEST, the request's fault by its word: clients
/// used to give up on it. One peer's word is not believed: the client bans it, reroutes to the
/// honest node and prints the local text.
#[test]
fn a_peer_calling_every_step_malformed_is_routed_around() {
    let dir = TempDir::new("refuse");
    let boot = bootstrap();
    let honest = node_with("0..30", &boot, &[]);
    serving(&honest);
    let liar = Liar::start(&boot, &dir, Fault::RefuseSteps);
    let prompt = "The capital of France is";
    let out = swarm_command(&boot, prompt, "12").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = super::json_of(&out);
    assert_eq!(v["tokens"], local(prompt, "12")["tokens"], "{stderr}");
    assert!(
        stderr.contains(&format!("{} refused: malformed step", liar.peer)),
        "the client never tried the liar, so this shows nothing: {stderr}"
    );
    assert!(v["route"].to_string().contains(honest.peer_id()), "{v}");
}
