//! Nodes that are not told which blocks to serve: they pick the weakest part of the swarm and
//! move when a gap opens.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::swarm::{bootstrap, local, route_of, spawn, swarm_command, Proc};

fn auto_node(boot: &Proc, n: &str) -> Proc {
    let model = super::default_model();
    spawn(&[
        "join",
        "--model",
        &model,
        "--num-blocks",
        n,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot.addr,
        "--no-mdns",
        "--announce-interval",
        "1",
        "--rebalance-interval",
        "2",
        "--threads",
        "1",
    ])
}

fn current(p: &Proc) -> Option<String> {
    p.serving.lock().unwrap().last().cloned()
}

/// The blocks the given nodes serve right now.
fn covered(nodes: &[&Proc]) -> BTreeSet<usize> {
    let mut blocks = BTreeSet::new();
    for r in nodes.iter().filter_map(|p| current(p)) {
        if let Some((a, b)) = r.split_once("..") {
            blocks.extend(a.parse::<usize>().unwrap()..b.parse::<usize>().unwrap());
        }
    }
    blocks
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn generates_like_local(boot: &Proc) {
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(boot, prompt, "8").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "8")["tokens"]);
    assert_eq!(
        route_of(&v).first().map(|r| r.starts_with("0..")),
        Some(true)
    );
}

#[test]
fn nodes_choose_their_blocks_and_move_to_cover_a_gap() {
    let boot = bootstrap();
    // Started together, none told which blocks: together they must cover all 30.
    let nodes: Vec<Proc> = (0..3).map(|_| auto_node(&boot, "10")).collect();
    let all: BTreeSet<usize> = (0..30).collect();
    wait_until(
        "three nodes cover all blocks",
        Duration::from_secs(90),
        || covered(&nodes.iter().collect::<Vec<_>>()) == all,
    );
    generates_like_local(&boot);

    // A fourth node doubles one range; then a node that is the only server of its range
    // leaves, and one of the doubled pair moves into the gap.
    let extra = auto_node(&boot, "10");
    wait_until("the fourth node serves", Duration::from_secs(60), || {
        current(&extra).is_some()
    });
    let everyone: Vec<&Proc> = nodes.iter().chain(std::iter::once(&extra)).collect();
    let ranges: Vec<Option<String>> = everyone.iter().map(|p| current(p)).collect();
    let sole = (0..everyone.len())
        .find(|&i| ranges.iter().filter(|r| **r == ranges[i]).count() == 1)
        .expect("some node is the only server of its range");
    everyone[sole].signal("-TERM");
    let rest: Vec<&Proc> = everyone
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != sole)
        .map(|(_, p)| *p)
        .collect();
    wait_until(
        "the remaining nodes cover all blocks again",
        Duration::from_secs(90),
        || covered(&rest) == all,
    );
    generates_like_local(&boot);
}
