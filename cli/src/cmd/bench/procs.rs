//! The processes a swarm benchmark runs: a bootstrap peer and nodes of this same binary on
//! 127.0.0.1, killed when dropped, and a client entering through them.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::{ClientConfig, SwarmClient};

pub struct Peer {
    pub child: Child,
    pub addr: String,
    pub blocks: Option<Range<usize>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String], blocks: Option<Range<usize>>) -> anyhow::Result<Peer> {
    spawn_until(args, blocks, "listening on ", "/tcp/")
}

/// Starts `edge-node ARGS` and waits for a stdout line `{prefix}...` containing `must`, whose
/// rest becomes the peer's `addr`.
pub fn spawn_until(
    args: &[String],
    blocks: Option<Range<usize>>,
    prefix: &'static str,
    must: &str,
) -> anyhow::Result<Peer> {
    let exe = std::env::current_exe().context("locating edge-node")?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a swarm peer")?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix(prefix) {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let mut peer = Peer {
        child,
        addr: String::new(),
        blocks,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while peer.addr.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(a) if a.contains(must) => peer.addr = a,
            Ok(_) => {}
            Err(_) => bail!("{args:?} printed no `{prefix}` line within 60 s"),
        }
    }
    Ok(peer)
}

pub fn spawn_bootstrap() -> anyhow::Result<Peer> {
    spawn(
        &["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"].map(String::from),
        None,
    )
}

/// A node serving `blocks` on 127.0.0.1, joined through `boot`.
pub fn spawn_node(
    model: &str,
    blocks: Range<usize>,
    boot: &Peer,
    threads: usize,
) -> anyhow::Result<Peer> {
    let range = format!("{}..{}", blocks.start, blocks.end);
    let threads = threads.to_string();
    let args = [
        "join",
        "--model",
        model,
        "--blocks",
        &range,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot.addr,
        "--no-mdns",
        "--threads",
        &threads,
    ]
    .map(String::from);
    spawn(&args, Some(blocks))
}

/// A bootstrap peer and `nodes` nodes splitting `blocks` evenly.
pub fn spawn_swarm(
    model: &str,
    blocks: usize,
    nodes: usize,
    threads: usize,
) -> anyhow::Result<(Peer, Vec<Peer>)> {
    if nodes == 0 || nodes > blocks {
        bail!("--nodes must be between 1 and {blocks}");
    }
    let boot = spawn_bootstrap()?;
    let mut peers = Vec::new();
    for i in 0..nodes {
        let r = blocks * i / nodes..blocks * (i + 1) / nodes;
        peers.push(spawn_node(model, r, &boot, threads)?);
    }
    Ok((boot, peers))
}

/// A swarm client entering through the bench's bootstrap peer.
pub async fn connect(boot: &Peer) -> anyhow::Result<SwarmClient> {
    Ok(SwarmClient::connect(ClientConfig {
        bootstrap: vec![boot.addr.parse()?],
        discovery_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    })
    .await?)
}

pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
