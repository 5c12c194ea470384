//! Fault scenarios against the docker-compose home cluster (deploy/docker-compose.yml).
//!
//! `cargo run --release -p simulations --bin compose-scenarios -- NAME|all` builds the image and
//! starts the cluster when needed, runs the scenario(s), prints PASS or FAIL with the measured
//! figures, and always removes its containers and network. Every scenario compares the swarm's
//! greedy tokens with a local run of the same model in the same image.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

const PROJECT: &str = "edgeswarm-scenarios";
const MODEL: &str = "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "Once upon a time, in a small village by the sea,";
const NODES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];
const SCENARIOS: [&str; 6] = [
    "steady",
    "node-loss",
    "partition",
    "slow-link",
    "rolling-restart",
    "big-model",
];

mod big_model;

/// The edge-node image the scenarios run (`EDGE_IMAGE`, as in docker-compose.yml).
fn image() -> String {
    std::env::var("EDGE_IMAGE").unwrap_or_else(|_| "edge-swarm/edge-node:latest".into())
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `docker compose` (plugin) when present, else the standalone `docker-compose`.
fn compose() -> Command {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut c = if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    };
    c.current_dir(root().join("deploy"))
        .args(["-p", PROJECT, "-f", "docker-compose.yml"])
        .env("EDGE_API_PORT", api_port().to_string());
    c
}

/// A free port on the host for the gateway's published port, chosen once per run so a busy
/// 8080 on a CI machine cannot break the scenarios.
fn api_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(18080, |a| a.port())
    })
}

/// A plain HTTP/1.1 request to the gateway on the host; returns status and body.
fn api(method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr = format!("127.0.0.1:{}", api_port());
    let mut s = std::net::TcpStream::connect(&addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn container(service: &str) -> anyhow::Result<String> {
    let id = run(compose().args(["ps", "-q", service]))?;
    id.lines()
        .next()
        .map(str::to_string)
        .context(format!("{service} has no container"))
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("docker").args(args))
}

/// Removes the cluster whatever happens (also when a scenario panics or fails).
struct Cluster;
impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = compose()
            .args(["down", "-v", "--remove-orphans"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        run(Command::new("bash").arg(root().join("scripts/fetch-model.sh")))?;
        big_model::ensure_image()?;
        let _ = compose().args(["down", "-v", "--remove-orphans"]).output();
        let cluster = Cluster;
        run(compose().args(["up", "-d"]))?;
        cluster.wait_healthy(&NODES)?;
        Ok(cluster)
    }

    fn wait_healthy(&self, services: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for s in services {
            loop {
                let id = container(s)?;
                let state =
                    docker(&["inspect", "-f", "{{.State.Health.Status}}", &id]).unwrap_or_default();
                if state.trim() == "healthy" {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{s} did not become healthy within 120 s (state {})",
                        state.trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(())
    }

    /// Peer id of a node, from its latest `listening on` line.
    fn peer_id(&self, service: &str) -> anyhow::Result<String> {
        let logs = run(compose().args(["logs", "--no-color", service]))?;
        // The newest `listening on` line: a restarted container keeps the logs of its earlier
        // runs, and without an identity file each run has a new peer id. The id is the last
        // `/p2p/` part: a relayed address names the relay first (`/p2p/<relay>/p2p-circuit/
        // p2p/<node>`), and other lines name other peers.
        logs.lines()
            .filter(|l| l.contains("listening on "))
            .filter_map(|l| l.rsplit("/p2p/").next())
            .map(|p| p.trim().to_string())
            .next_back()
            .context(format!("{service} printed no peer id"))
    }
}

/// A generation running in a one-off client container.
struct Generation {
    child: std::process::Child,
    route: mpsc::Receiver<String>,
    log: std::thread::JoinHandle<Vec<String>>,
}

fn generate(extra: &[&str], tokens: usize) -> anyhow::Result<Generation> {
    let tokens = tokens.to_string();
    let mut args = vec![
        "run",
        "--rm",
        "-T",
        "-e",
        "RUST_LOG=info",
        "client",
        "generate",
        "--model",
        MODEL,
    ];
    args.extend(["--prompt", PROMPT, "--max-new-tokens", &tokens, "--json"]);
    args.extend(extra);
    let mut child = compose()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("client stderr")?;
    let (tx, rx) = mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("route: ") {
                let _ = tx.send(line.clone());
            }
            all.push(line);
        }
        all
    });
    Ok(Generation {
        child,
        route: rx,
        log,
    })
}

impl Generation {
    fn route_line(&self) -> anyhow::Result<String> {
        self.route
            .recv_timeout(Duration::from_secs(90))
            .context("the client never found a route")
    }

    fn finish(self) -> anyhow::Result<(Value, Vec<String>)> {
        let out = self.child.wait_with_output()?;
        let log = self.log.join().unwrap_or_default();
        if !out.status.success() {
            bail!(
                "generation failed: {}",
                log.last().cloned().unwrap_or_default()
            );
        }
        let json = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(json.trim()).context("client printed no JSON")?;
        Ok((v, log))
    }
}

const SWARM: [&str; 8] = [
    "--bootstrap",
    "/dns4/bootstrap/tcp/31330",
    "--step-timeout",
    "3",
    "--discovery-timeout",
    "40",
    "--connect-timeout",
    "3",
];

fn reference(tokens: usize) -> anyhow::Result<Value> {
    Ok(generate(&["--local"], tokens)?.finish()?.0)
}

fn same_tokens(a: &Value, b: &Value) -> bool {
    a["tokens"] == b["tokens"] && a["tokens"].as_array().is_some_and(|t| !t.is_empty())
}

/// Which of the 15..30 nodes the running generation uses.
fn second_half_in_route(cluster: &Cluster, route: &str) -> anyhow::Result<&'static str> {
    for s in ["node-b", "node-d"] {
        if route.contains(&cluster.peer_id(s)?) {
            return Ok(s);
        }
    }
    bail!("neither node-b nor node-d is in the route: {route}")
}

fn recovery_ms(log: &[String]) -> Option<String> {
    log.iter()
        .find_map(|l| l.split(" rerouted in ").nth(1))
        .and_then(|r| r.split(" ms").next())
        .map(str::to_string)
}

type Outcome = anyhow::Result<String>;

fn steady(_: &Cluster, reference: &Value) -> Outcome {
    let (v, _) = generate(&SWARM, 300)?.finish()?;
    anyhow::ensure!(
        same_tokens(&v, reference),
        "tokens differ from the local run"
    );
    let api = through_the_gateway(reference)?;
    Ok(format!(
        "300 tokens identical to local, {:.1} tokens/s; {api}",
        v["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
    ))
}

/// The gateway container, from the host through its published port: the status page sees all
/// four nodes and the OpenAI completions endpoint gives the local text.
fn through_the_gateway(reference: &Value) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let online = loop {
        let status = api("GET", "/api/status", "")
            .ok()
            .filter(|(c, _)| *c == 200);
        let online = status
            .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| {
                let peers = v["swarm"]["peers"].as_array()?.clone();
                Some(peers.iter().filter(|p| p["state"] == "online").count())
            })
            .unwrap_or(0);
        if online == NODES.len() {
            break online;
        }
        if Instant::now() > deadline {
            bail!("the gateway's status page shows {online} of 4 nodes online after 90 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let request = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "prompt": PROMPT,
        "max_tokens": 300,
        "temperature": 0,
    });
    let (code, body) = api("POST", "/v1/completions", &request.to_string())?;
    anyhow::ensure!(code == 200, "the gateway answered {code}: {body}");
    let v: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
    anyhow::ensure!(
        v["choices"][0]["text"] == reference["text"],
        "the gateway's text differs from the local run"
    );
    Ok(format!(
        "gateway: {online} nodes on the status page, /v1/completions text identical"
    ))
}

/// How long after the route is known a fault is injected: long enough for the victim to hold
/// a cache worth rebuilding, short enough that the 300-token generation is still running when
/// the fault lands. At 1 s the scenario failed once ("the kill went unnoticed") after decode got
/// faster: 300 tokens at 150 tokens/s take 2 s, and a `docker kill` can take most of a second
/// on a busy VM, so the kill most likely landed after the last token.
const FAULT_AFTER: Duration = Duration::from_millis(400);

fn node_loss(cluster: &Cluster, reference: &Value) -> Outcome {
    let g = generate(&SWARM, 300)?;
    let victim = second_half_in_route(cluster, &g.route_line()?)?;
    std::thread::sleep(FAULT_AFTER);
    docker(&["kill", &container(victim)?])?;
    let (v, log) = g.finish()?;
    let reroutes = v["reroutes"].as_u64().unwrap_or(0);
    run(compose().args(["up", "-d", victim]))?;
    cluster.wait_healthy(&[victim])?;
    anyhow::ensure!(reroutes >= 1, "the kill of {victim} went unnoticed");
    anyhow::ensure!(
        same_tokens(&v, reference),
        "tokens differ after the reroute"
    );
    Ok(format!(
        "docker kill {victim}: identical tokens, {reroutes} reroute(s), recovery {} ms",
        recovery_ms(&log).unwrap_or_else(|| "?".into())
    ))
}

fn network_name() -> String {
    format!("{}_swarm", PROJECT.replace('-', ""))
}

fn network_of(id: &str) -> anyhow::Result<String> {
    let nets = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        id,
    ])?;
    Ok(nets
        .split_whitespace()
        .next()
        .map(str::to_string)
        .unwrap_or_else(network_name))
}

fn partition(cluster: &Cluster, reference: &Value) -> Outcome {
    let g = generate(&SWARM, 300)?;
    let victim = second_half_in_route(cluster, &g.route_line()?)?;
    let other = if victim == "node-b" {
        "node-d"
    } else {
        "node-b"
    };
    let id = container(victim)?;
    let net = network_of(&id)?;
    std::thread::sleep(FAULT_AFTER);
    docker(&["network", "disconnect", &net, &id])?;
    let (v, log) = g.finish()?;
    anyhow::ensure!(
        v["reroutes"].as_u64().unwrap_or(0) >= 1,
        "the partition went unnoticed"
    );
    anyhow::ensure!(
        same_tokens(&v, reference),
        "tokens differ after the partition"
    );
    let recovery = recovery_ms(&log).unwrap_or_else(|| "?".into());
    // Reconnected, it must serve again: with its twin stopped it is the only way through.
    docker(&["network", "connect", &net, &id])?;
    std::thread::sleep(Duration::from_secs(8));
    docker(&["stop", "-t", "15", &container(other)?])?;
    let again = generate(&SWARM, 16)?;
    let route = again.route_line()?;
    let (v2, _) = again.finish()?;
    run(compose().args(["up", "-d", other]))?;
    cluster.wait_healthy(&[other])?;
    anyhow::ensure!(
        route.contains(&cluster.peer_id(victim)?),
        "{victim} was not used again after reconnecting"
    );
    anyhow::ensure!(
        v2["tokens"].as_array().map(Vec::len) == Some(16),
        "no generation through the reconnected node"
    );
    Ok(format!("{victim} cut off: identical tokens (step timeout 3 s, recovery {recovery} ms); reconnected and used again"))
}

/// Whether the kernel can shape links with netem (VM kernels often lack `sch_netem`).
fn have_netem() -> bool {
    let ns = format!("edgeswarm-netem-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ip")
            .args([
                "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                "1ms",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ok
}

/// Containers a scenario starts outside compose; removed however the scenario ends.
struct Extra(Vec<String>);
impl Drop for Extra {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("docker")
                .args(["rm", "-f", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A fifth server of blocks 15..30 behind the `wan-100ms` link profile, next to the fast
/// `node-b` (`node-d` is stopped meanwhile): the client must route around it. The delay is
/// tc netem on the node's interface where the kernel has netem. Otherwise a relay that adds the
/// profile's delay in each direction shares the node's network namespace and is its only way
/// in: the node listens on loopback only and announces the relay's port.
fn slow_link(cluster: &Cluster, reference: &Value) -> Outcome {
    let net = network_of(&container("node-b")?)?;
    let models = root().join("models");
    let models = format!("{}:/models:ro", models.canonicalize()?.display());
    let (slow, relay) = (format!("{PROJECT}-slow"), format!("{PROJECT}-slow-relay"));
    let image = image();
    let extra = Extra(vec![slow.clone(), relay.clone()]);
    let netem = have_netem();
    let listen = if netem {
        "/ip4/0.0.0.0/tcp/31330"
    } else {
        "/ip4/127.0.0.1/tcp/31330"
    };
    let mut join = vec![
        "run",
        "-d",
        "--name",
        &slow,
        "--network",
        &net,
        "--network-alias",
        "slow",
        "-v",
        &models,
        &image,
        "join",
        "--model",
        MODEL,
        "--blocks",
        "15..30",
        "--listen",
        listen,
        "--bootstrap",
        "/dns4/bootstrap/tcp/31330",
        "--no-mdns",
        "--announce-interval",
        "2",
        "--threads",
        "1",
        "--no-rebalance",
        "--health-file",
        "/tmp/serving",
    ];
    if !netem {
        join.extend(["--external-address", "/dns4/slow/tcp/31331"]);
    }
    docker(&["stop", "-t", "15", &container("node-d")?])?;
    let result =
        (|| {
            docker(&join)?;
            if netem {
                run(Command::new("bash")
                    .arg(root().join("deploy/netem.sh"))
                    .args(["wan-100ms", &slow]))?;
            } else {
                let ns = format!("container:{slow}");
                docker(&[
                    "run",
                    "-d",
                    "--name",
                    &relay,
                    "--network",
                    &ns,
                    "edge-swarm/link-delay:latest",
                    "--listen",
                    "0.0.0.0:31331",
                    "--to",
                    "127.0.0.1:31330",
                    "--profile",
                    "wan-100ms",
                ])?;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while docker(&[
                "exec",
                &slow,
                "/edge-node",
                "health",
                "--file",
                "/tmp/serving",
            ])
            .is_err()
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the slow node never started serving"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            std::thread::sleep(Duration::from_secs(3));
            let logs = docker(&["logs", &slow])?;
            let slow_id = logs
                .lines()
                .filter_map(|l| l.split("/p2p/").nth(1))
                .next()
                .context("slow node id")?
                .trim()
                .to_string();
            let g = generate(&SWARM, 64)?;
            let route = g.route_line()?;
            let (v, _) = g.finish()?;
            let fast_id = cluster.peer_id("node-b")?;
            anyhow::ensure!(
                !route.contains(&slow_id),
                "the route uses the slow node {slow_id}: {route}"
            );
            anyhow::ensure!(
                route.contains(&fast_id),
                "the route does not use the fast node-b {fast_id}: {route}"
            );
            let want = &reference["tokens"].as_array().context("reference tokens")?[..64];
            anyhow::ensure!(
                v["tokens"].as_array().map(|t| &t[..]) == Some(want),
                "tokens differ from the local run"
            );
            Ok(format!(
            "wan-100ms link ({}) on a second server of 15..30: routed around it, {:.1} tokens/s",
            if netem { "tc netem" } else { "delay relay, no netem in this kernel" },
            v["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        ))
        })();
    drop(extra);
    run(compose().args(["up", "-d", "node-d"]))?;
    cluster.wait_healthy(&["node-d"])?;
    result
}

fn rolling_restart(cluster: &Cluster, reference: &Value) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reference2 = reference.clone();
    let load = std::thread::spawn(move || {
        let mut done = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && done < 40 {
            let r = generate(&SWARM, 120)
                .and_then(|g| g.finish())
                .map(|(v, _)| {
                    v["tokens"].as_array().unwrap_or(&vec![])[..]
                        == reference2["tokens"].as_array().unwrap_or(&vec![])[..120]
                });
            let _ = tx.send(r.map_err(|e| e.to_string()));
            done += 1;
        }
    });
    for s in NODES {
        docker(&["restart", "-t", "15", &container(s)?])?;
        cluster.wait_healthy(&[s])?;
        std::thread::sleep(Duration::from_secs(3));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.join();
    let results: Vec<Result<bool, String>> = rx.try_iter().collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let wrong = results.iter().filter(|r| matches!(r, Ok(false))).count();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} generations failed, e.g. {}",
        failed.len(),
        results.len(),
        failed[0]
    );
    anyhow::ensure!(wrong == 0, "{wrong} generations differ from the local run");
    anyhow::ensure!(
        results.len() >= 2,
        "too few generations ran during the restarts"
    );
    Ok(format!(
        "4 nodes restarted one by one; {} generations meanwhile, none failed, all identical",
        results.len()
    ))
}

fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let names: Vec<&str> = if name == "all" {
        SCENARIOS.to_vec()
    } else if let Some(n) = SCENARIOS.iter().find(|s| **s == name) {
        vec![*n]
    } else {
        bail!("unknown scenario `{name}`; one of {SCENARIOS:?} or all");
    };
    let mut failures = 0;
    let mut report = |n: &str, started: Instant, outcome: Outcome| {
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(figures) => println!("PASS {n} ({secs:.0} s): {figures}"),
            Err(e) => {
                failures += 1;
                println!("FAIL {n} ({secs:.0} s): {e:#}");
            }
        }
    };
    // The scenarios of the small model share one cluster; the big model runs on its own,
    // after that cluster is gone.
    let small: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != "big-model")
        .collect();
    if !small.is_empty() {
        let cluster = Cluster::start()?;
        let reference = reference(300)?;
        for n in small {
            let started = Instant::now();
            let outcome = match n {
                "steady" => steady(&cluster, &reference),
                "node-loss" => node_loss(&cluster, &reference),
                "partition" => partition(&cluster, &reference),
                "slow-link" => slow_link(&cluster, &reference),
                _ => rolling_restart(&cluster, &reference),
            };
            report(n, started, outcome);
        }
        drop(cluster);
    }
    if names.contains(&"big-model") {
        let started = Instant::now();
        let outcome = big_model::ensure_image().and_then(|()| big_model::big_model());
        report("big-model", started, outcome);
    }
    if failures > 0 {
        bail!("{failures} scenario(s) failed");
    }
    Ok(())
}
