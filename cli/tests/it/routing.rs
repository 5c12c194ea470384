//! Routes that learn from the swarm on real processes: nodes announce the sessions they hold in
//! their signed records, `status` shows them, and a load-aware client leaves the node other
//! clients crowd; a client that could not reach a node says so, and the next one routes around
//! it without waiting for it. Tokens are the same as one process's throughout.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use node::Fault;

use super::swarm::{bootstrap, local, node, swarm_command, Proc};
use super::verification::{through_the_liar, Liar};
use super::{default_model, edge_node, json_of, TempDir};

/// Sessions held open on the first node: enough that its announced load outweighs both the
/// random tilt of load-aware prices (up to 1.3x) and a twofold difference in measured speed
/// between two nodes on this machine (see `coordinator::route::load_aware`).
const CROWD: usize = 12;

/// A `chat` whose stdin stays open: it opens its session at start and then waits for a line,
/// holding the session (and its place in the node's announced load) until dropped.
struct IdleChat {
    child: Child,
    _stdin: ChildStdin,
}

impl Drop for IdleChat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an idle chat through the swarm of `boot`; the receiver gets the route line it prints.
fn idle_chat(boot: &Proc) -> (IdleChat, mpsc::Receiver<String>) {
    let model = default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(["chat", "--model", &model, "--max-context", "256"])
        .args(["--bootstrap", &boot.addr, "--discovery-timeout", "60"])
        .args(["--threads", "1"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edge-node chat");
    let stdin = child.stdin.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.ends_with(" positions") {
                let _ = tx.send(line);
            }
        }
    });
    (
        IdleChat {
            child,
            _stdin: stdin,
        },
        rx,
    )
}

/// `edge-node status`'s row of `peer`, split into columns: peer, blocks, state, ms/block, RTT,
/// free cache, sessions, waiting, coverage.
fn status_row(boot: &Proc, peer: &str) -> Option<Vec<String>> {
    let model = default_model();
    let out = edge_node(&["status", "--bootstrap", &boot.addr, "--model", &model]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(peer))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
}

fn wait_for_row(boot: &Proc, peer: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    loop {
        if let Some(row) = status_row(boot, peer).filter(|r| r.len() == 9 && done(r)) {
            return row;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "status never showed the expected row of {peer}: {:?}",
            status_row(boot, peer)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn load_aware_clients_leave_the_node_other_clients_crowd() {
    // Also reads the model into the page cache, so that neither node measures its speed cold.
    let prompt = "The capital of France is";
    let want = local(prompt, "8")["tokens"].clone();
    let boot = bootstrap();
    let crowded = node("0..30", &boot);
    // Every chat started now can only route through `crowded`.
    let chats: Vec<_> = (0..CROWD).map(|_| idle_chat(&boot)).collect();
    for (_, route) in &chats {
        let line = route
            .recv_timeout(Duration::from_secs(120))
            .expect("a chat printed no route");
        assert!(line.contains(crowded.peer_id()), "{line}");
    }
    let idle = node("0..30", &boot);

    let held = format!("{CROWD}/16");
    let busy = wait_for_row(&boot, crowded.peer_id(), |r| {
        r[2] == "online" && r[6] == held
    });
    let free = wait_for_row(&boot, idle.peer_id(), |r| {
        r[2] == "online" && r[6] == "0/16"
    });
    assert_eq!(busy[7], "0", "idle chats have no step waiting: {busy:?}");

    // Load-aware prices `crowded` at 1 + 0.12 per session; that must beat the tilt and the
    // speed difference the two nodes measured, or the choice is a coin toss and proves nothing.
    let ms = |r: &[String]| r[3].parse::<f64>().expect("ms/block");
    let factor = 1.0 + 0.12 * CROWD as f64;
    if ms(&free) * 1.3 >= ms(&busy) * factor {
        println!(
            "skipped: the nodes measured {} and {} ms/block, too far apart for the load to decide",
            ms(&busy),
            ms(&free)
        );
        return;
    }

    // Five times: were the load ignored, each would be about a coin toss between two nodes of
    // about the same speed.
    for _ in 0..5 {
        let mut cmd = swarm_command(&boot, prompt, "8");
        let v = json_of(&cmd.args(["--routing", "load-aware"]).output().unwrap());
        assert_eq!(v["tokens"], want);
        let hops = v["route"].as_array().expect("route");
        assert_eq!(hops.len(), 1, "{hops:?}");
        assert_eq!(hops[0]["peer"], idle.peer_id(), "{hops:?}");
    }

    // Their sessions closed, the crowd is gone from the record too.
    drop(chats);
    wait_for_row(&boot, crowded.peer_id(), |r| r[6] == "0/16");
}

/// A node that takes sessions and never answers them (stuck, while it still answers pings),
/// announcing a tenfold speed once for the whole test: a live node refutes claims about it at
/// its next announcement, and this one has none.
#[test]
fn a_client_that_could_not_reach_a_node_spares_the_next_client_the_wait() {
    let dir = TempDir::new("offline-claim");
    let prompt = "The capital of France is";
    let want = local(prompt, "4")["tokens"].clone();
    let boot = bootstrap();
    let _honest = node("0..30", &boot);
    let stuck = Liar::announcing(
        &boot,
        &dir,
        Fault::IgnoreOpens,
        0..30,
        Duration::from_secs(600),
    );
    let run = || {
        let mut cmd = swarm_command(&boot, prompt, "4");
        let out = cmd.args(["--connect-timeout", "3"]).output().unwrap();
        assert_eq!(json_of(&out)["tokens"], want);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let tried = log.contains(&stuck.peer);
        (log, tried)
    };
    let first = through_the_liar(&stuck, run);
    assert!(first.contains("did not answer"), "{first}");

    // The first client's claim is in the DHT: `status` marks the node, and the next client
    // plans around it instead of losing its connect timeout there too.
    wait_for_row(&boot, &stuck.peer, |r| r[2] == "unreached");
    let (log, tried) = run();
    assert!(!tried, "the next client tried the stuck node again: {log}");
}
