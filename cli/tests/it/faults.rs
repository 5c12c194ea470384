//! Peers dying, freezing and coming back in the middle of a generation, with real processes.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::swarm::{bootstrap, local, node, node_with, route_of, swarm_command, Proc};

const PROMPT: &str = "Once upon a time, in a small village by the sea,";
const TOKENS: &str = "300";

/// Starts a swarm client and returns once it has logged its route, so a test can hurt a peer
/// while the generation is running. Resolves to the client's JSON output.
struct Running {
    child: std::process::Child,
    route_line: String,
    stderr: std::thread::JoinHandle<Vec<String>>,
}

fn start_client(boot: &Proc, extra: &[&str]) -> Running {
    let model = super::default_model();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edge-node"));
    cmd.args(super::swarm::generate_args(&model, PROMPT, TOKENS))
        .args(["--bootstrap", &boot.addr])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("client: {line}");
            if line.contains("route: ") {
                let _ = tx.send(line.clone());
            }
            all.push(line);
        }
        all
    });
    let route_line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("client logged no route");
    Running {
        child,
        route_line,
        stderr: reader,
    }
}

impl Running {
    fn uses(&self, p: &Proc) -> bool {
        self.route_line.contains(p.peer_id())
    }

    /// Waits for the client; its output, with every line it wrote on stderr.
    fn finish(self) -> (std::process::Output, Vec<String>) {
        let out = self.child.wait_with_output().unwrap();
        (out, self.stderr.join().unwrap_or_default())
    }
}

/// The swarm the fault tests share: one node for 0..15, two for 15..30. A client generates
/// while `signal` hits whichever of the two it uses; the generation must complete with the
/// local tokens after at least one reroute. Returns the output, the client's log and the victim.
fn survive(signal: &str, client_args: &[&str]) -> (Value, Vec<String>, Proc) {
    survive_on(signal, &[], client_args)
}

/// [`survive`] with `node_args` given to the two nodes of 15..30.
fn survive_on(
    signal: &str,
    node_args: &[&str],
    client_args: &[&str],
) -> (Value, Vec<String>, Proc) {
    let boot = bootstrap();
    let _first = node("0..15", &boot);
    let mut spares = vec![
        node_with("15..30", &boot, node_args),
        node_with("15..30", &boot, node_args),
    ];
    let run = start_client(&boot, client_args);
    std::thread::sleep(Duration::from_millis(800));
    let i = spares
        .iter()
        .position(|p| run.uses(p))
        .expect("a 15..30 node is in the route");
    let victim = spares.swap_remove(i);
    victim.signal(signal);
    let (out, log) = run.finish();
    let v = super::json_of(&out);
    assert!(
        v["reroutes"].as_u64().unwrap() >= 1,
        "no reroute recorded: {v}"
    );
    assert_eq!(
        v["tokens"],
        local(PROMPT, TOKENS)["tokens"],
        "tokens changed after the reroute"
    );
    (v, log, victim)
}

#[test]
fn kill_9_mid_generation_reroutes_with_identical_tokens() {
    let (v, _, _) = survive("-KILL", &[]);
    assert_eq!(route_of(&v).concat(), "0..1515..30");
}

/// The replacement of a killed node rebuilds its cache from a history longer than it takes in
/// one step (the prompt alone is three times the bound of 4 rows): the replay goes in bounded steps,
/// and the tokens stay the local ones. Without chunked replays the replacement would refuse
/// the history and the generation would fail.
#[test]
fn a_reroute_replays_a_long_history_in_bounded_steps() {
    let (v, _, _) = survive_on("-KILL", &["--max-step-tokens", "4"], &[]);
    assert_eq!(route_of(&v).concat(), "0..1515..30");
}

/// Three spans pushing node to node; the middle node is killed: the first node's forward fails
/// or the client's wait for the middle answer does, the client reroutes the middle span and
/// replays it from the answers it kept, and the text is the local one.
#[test]
fn kill_9_of_a_middle_node_with_push_reroutes_with_identical_tokens() {
    let boot = bootstrap();
    let _first = node("0..10", &boot);
    let _last = node("20..30", &boot);
    let mut middles = vec![node("10..20", &boot), node("10..20", &boot)];
    let run = start_client(&boot, &[]);
    std::thread::sleep(Duration::from_millis(800));
    let i = middles
        .iter()
        .position(|p| run.uses(p))
        .expect("a 10..20 node is in the route");
    let victim = middles.swap_remove(i);
    victim.signal("-KILL");
    let (out, _) = run.finish();
    let v = super::json_of(&out);
    assert!(v["reroutes"].as_u64().unwrap() >= 1, "no reroute: {v}");
    assert!(
        v["pushed_spans"].as_u64().unwrap() > 0,
        "nothing pushed: {v}"
    );
    assert_eq!(route_of(&v).concat(), "0..1010..2020..30");
    assert_eq!(v["tokens"], local(PROMPT, TOKENS)["tokens"]);
}

#[test]
fn a_frozen_node_is_detected_by_timeout_and_routed_around() {
    let started = Instant::now();
    let (_, _, victim) = survive("-STOP", &["--step-timeout", "2"]);
    assert!(started.elapsed() < Duration::from_secs(60));
    victim.signal("-CONT");
}

#[test]
fn a_restarted_node_with_the_same_identity_is_used_again() {
    let dir = super::TempDir::new("restart");
    let key = dir.file("b.key");
    let key = key.to_str().unwrap();
    let boot = bootstrap();
    let _first = node("0..15", &boot);
    let b = node_with("15..30", &boot, &["--identity", key]);
    let id = b.peer_id().to_string();
    b.signal("-KILL");
    drop(b);
    let b = node_with("15..30", &boot, &["--identity", key]);
    assert_eq!(b.peer_id(), id);
    let prompt = "The capital of France is";
    let v: Value = super::json_of(&swarm_command(&boot, prompt, "8").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "8")["tokens"]);
    assert!(
        v["route"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["peer"] == id.as_str()),
        "{v}"
    );
}

#[test]
fn with_no_replacement_the_error_comes_within_the_bound() {
    let boot = bootstrap();
    let _first = node("0..15", &boot);
    let second = node("15..30", &boot);
    let run = start_client(&boot, &["--discovery-timeout", "4", "--step-timeout", "2"]);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    second.signal("-KILL");
    let (out, stderr) = run.finish();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let last = stderr.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("no peer serves blocks 15..30"),
        "{stderr:?}"
    );
}

#[test]
fn a_node_leaving_gracefully_mid_generation_costs_no_failed_step() {
    let (_, log, mut victim) = survive("-TERM", &[]);
    // The node refused the next step with SHUTTING_DOWN: a clean hand-over, not a broken stream.
    assert!(log.iter().any(|l| l.contains("ShuttingDown")), "{log:?}");
    assert!(
        victim.child.wait().unwrap().success(),
        "SIGTERM must end the node cleanly"
    );
}
