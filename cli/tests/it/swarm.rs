//! Real processes on 127.0.0.1: a bootstrap peer and nodes serving slices of the default model,
//! with clients generating through them. Every process is killed when its handle drops, so a
//! failing test leaves nothing running.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::{default_model, edge_node};

pub struct Proc {
    pub child: Child,
    pub addr: String,
    /// Every `serving blocks A..B` line the process printed, in order.
    pub serving: Arc<Mutex<Vec<String>>>,
    /// Every line the process printed on stdout.
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `edge-node ARGS` and waits for its TCP `listening on` line.
pub fn spawn(args: &[&str]) -> Proc {
    spawn_until(args, "listening on ", "/tcp/")
}

/// Starts `edge-node ARGS` and waits for a stdout line `{prefix}...` containing `must`; the
/// rest of that line becomes `addr`.
pub fn spawn_until(args: &[&str], prefix: &str, must: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn edge-node");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let serving = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (sv, all) = (serving.clone(), lines.clone());
    let prefix_owned = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix(&prefix_owned) {
                let _ = tx.send(addr.to_string());
            }
            if let Some(r) = line.strip_prefix("serving blocks ") {
                sv.lock().unwrap().push(r.to_string());
            }
            all.lock().unwrap().push(line);
        }
    });
    let addr = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) if a.contains(must) => break a,
            Ok(_) => continue,
            Err(e) => panic!("edge-node {args:?} printed no `{prefix}` line: {e}"),
        }
    };
    Proc {
        child,
        addr,
        serving,
        lines,
    }
}

pub fn bootstrap() -> Proc {
    spawn(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
}

pub fn node(blocks: &str, bootstrap: &Proc) -> Proc {
    node_with(blocks, bootstrap, &[])
}

pub fn node_with(blocks: &str, bootstrap: &Proc, extra: &[&str]) -> Proc {
    node_of(&default_model(), blocks, bootstrap, extra)
}

/// A node serving `blocks` of the model file `model`.
pub fn node_of(model: &str, blocks: &str, bootstrap: &Proc, extra: &[&str]) -> Proc {
    let mut args = vec![
        "join",
        "--model",
        model,
        "--blocks",
        blocks,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &bootstrap.addr,
        "--no-mdns",
        "--announce-interval",
        "2",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

impl Proc {
    /// Waits (bounded) for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_string));
            if let Some(rest) = found {
                return rest;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no `{prefix}` line within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn peer_id(&self) -> &str {
        self.addr.rsplit("/p2p/").next().unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} failed");
    }
}

pub fn generate_args<'a>(model: &'a str, prompt: &'a str, tokens: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        tokens,
        "--json",
        "--threads",
        "1",
    ]
}

pub fn local(prompt: &str, tokens: &str) -> Value {
    local_of(&default_model(), prompt, tokens)
}

/// `generate --local --json` with the model file `model`.
pub fn local_of(model: &str, prompt: &str, tokens: &str) -> Value {
    let mut args = generate_args(model, prompt, tokens);
    args.push("--local");
    super::json_of(&edge_node(&args))
}

pub fn swarm_command(bootstrap: &Proc, prompt: &str, tokens: &str) -> Command {
    swarm_command_of(&default_model(), bootstrap, prompt, tokens)
}

/// `generate --json` through the swarm of `bootstrap`, with the model file `model`.
pub fn swarm_command_of(model: &str, bootstrap: &Proc, prompt: &str, tokens: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    cmd.args(generate_args(model, prompt, tokens))
        .args(["--bootstrap", &bootstrap.addr, "--discovery-timeout", "30"])
        .env("RUST_LOG", "warn");
    cmd
}

pub fn route_of(v: &Value) -> Vec<String> {
    v["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|h| h["blocks"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn three_nodes_give_the_local_tokens_also_to_two_clients_at_once() {
    let boot = bootstrap();
    let _a = node("0..10", &boot);
    let _b = node("10..20", &boot);
    let _c = node("20..30", &boot);
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&boot, prompt, "24").output().unwrap());
    assert_eq!(
        v["tokens"],
        local(prompt, "24")["tokens"],
        "swarm output differs from local"
    );
    assert_eq!(route_of(&v), ["0..10", "10..20", "20..30"]);
    for hop in v["route"].as_array().unwrap() {
        assert!(
            hop["peer"].as_str().unwrap().starts_with("12D3KooW"),
            "{hop}"
        );
    }

    // Two clients at once, each must get exactly its own local text.
    let prompts = ["def fibonacci(n):", "Once upon a time"];
    let children: Vec<_> = prompts
        .iter()
        .map(|p| {
            swarm_command(&boot, p, "16")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, p) in children.into_iter().zip(prompts) {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            super::json_of(&out)["tokens"],
            local(p, "16")["tokens"],
            "concurrent client for {p:?}"
        );
    }
}

/// A prompt many times longer than the nodes take in one step goes through in bounded steps
/// (each node's own bound, 16 and 7 rows), and the tokens are still the local ones bit for bit:
/// blocks are batch-invariant, so how a prompt is cut changes nothing. Without chunking on the
/// client, both nodes refuse the prompt and the generation fails.
#[test]
fn a_long_prompt_in_bounded_steps_gives_the_local_tokens() {
    let boot = bootstrap();
    let _a = node_with("0..15", &boot, &["--max-step-tokens", "16"]);
    let _b = node_with("15..30", &boot, &["--max-step-tokens", "7"]);
    let prompt = "The history of the city goes back to a fishing village on the river, \
                  which grew into a market town when the bridge was built, and then into a \
                  port once the canal reached the sea. Merchants from three countries \
                  settled along the quays, and their warehouses still stand. Its old quarter";
    let v = super::json_of(&swarm_command(&boot, prompt, "12").output().unwrap());
    let local = local(prompt, "12");
    assert!(
        local["prompt_tokens"].as_array().unwrap().len() > 3 * 16,
        "the prompt must span several steps of the larger bound"
    );
    assert_eq!(
        v["tokens"], local["tokens"],
        "swarm output differs from local"
    );
    assert_eq!(route_of(&v), ["0..15", "15..30"]);
}

#[test]
fn overlapping_spans_cover_the_model() {
    let boot = bootstrap();
    let _a = node("0..15", &boot);
    let _b = node("10..30", &boot);
    let prompt = "1, 2, 3, 4, 5,";
    let v = super::json_of(&swarm_command(&boot, prompt, "12").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "12")["tokens"]);
    let route = route_of(&v);
    assert_eq!(route.len(), 2, "{route:?}");
    assert_eq!(route.first().map(|r| r.starts_with("0..")), Some(true));
    assert_eq!(route.last().map(|r| r.ends_with("..30")), Some(true));
}

#[test]
fn a_missing_range_is_named() {
    let boot = bootstrap();
    let _a = node("0..10", &boot);
    let _c = node("20..30", &boot);
    let model = default_model();
    let mut args = generate_args(&model, "hello", "4");
    args.extend(["--bootstrap", &boot.addr, "--discovery-timeout", "6"]);
    let out = edge_node(&args);
    super::assert_clean_error(&out, "no peer serves blocks 10..20");
}

#[test]
fn an_identity_file_keeps_the_peer_id_and_bootstrap_needs_no_peer_id() {
    let dir = super::TempDir::new("identity");
    let key = dir.file("node.key");
    let key = key.to_str().unwrap();
    let peer_of = |p: &Proc| p.addr.rsplit("/p2p/").next().unwrap().to_string();
    let start = || {
        spawn(&[
            "bootstrap",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--identity",
            key,
        ])
    };
    let first = start();
    let id = peer_of(&first);
    drop(first);
    let again = start();
    assert_eq!(peer_of(&again), id, "same identity file, same peer id");

    // Nodes and clients join through an address without `/p2p/<id>`.
    let bare = again.addr.split("/p2p/").next().unwrap().to_string();
    let bare_boot = Proc {
        child: Command::new("true").spawn().unwrap(),
        addr: bare,
        serving: Arc::default(),
        lines: Arc::default(),
    };
    let _n = node("0..30", &bare_boot);
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&bare_boot, prompt, "6").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "6")["tokens"]);
}

#[test]
fn a_node_stopped_with_sigterm_announces_that_it_left() {
    let boot = bootstrap();
    let _a = node("0..20", &boot);
    let mut b = node("20..30", &boot);
    let prompt = "hello";
    let v = super::json_of(&swarm_command(&boot, prompt, "2").output().unwrap());
    assert_eq!(route_of(&v), ["0..20", "20..30"]);
    let status = Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = b.child.wait().unwrap();
    assert!(exit.success(), "SIGTERM must be a clean exit, got {exit:?}");
    // Its record now says offline (it would otherwise linger until it expired), so the gap is
    // reported at once.
    let model = default_model();
    let mut args = generate_args(&model, prompt, "2");
    args.extend(["--bootstrap", &boot.addr, "--discovery-timeout", "3"]);
    super::assert_clean_error(&edge_node(&args), "no peer serves blocks 20..30");
}

#[test]
fn status_shows_coverage_and_gaps() {
    let boot = bootstrap();
    let a = node("0..20", &boot);
    let _b = node("15..25", &boot);
    let model = default_model();
    let run = || edge_node(&["status", "--bootstrap", &boot.addr, "--model", &model]);
    // Nodes announce "joining" at once and "online" after loading; on a busy machine that can
    // take a while, so wait (bounded) for both to be online.
    let mut out = run();
    for _ in 0..60 {
        if String::from_utf8_lossy(&out.stdout).contains("not covered: blocks 25..30") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        out = run();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 server(s)"), "{text}");
    assert!(text.contains(a.peer_id()), "{text}");
    assert!(text.contains("not covered: blocks 25..30"), "{text}");
    assert!(text.contains("111111111111111222221111100000"), "{text}");
}
