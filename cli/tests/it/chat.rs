//! `edge-node chat` with piped input: the first reply is `generate --chat`'s text, later turns
//! reuse the session's cache, and a swarm gives the same conversation as one process.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::swarm::{bootstrap, node_with};
use super::{assert_clean_error, default_model, edge_node};

pub const TURNS: [&str; 2] = ["What is the capital of France?", "And of Germany?"];

/// Runs `chat`, writing the lines of `turns` with `pause` between them.
pub fn chat(route: &[&str], turns: &[&str], pause: Duration) -> Output {
    let model = default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(["chat", "--model", &model, "--temperature", "0"])
        .args(["--max-new-tokens", "16", "--threads", "1"])
        .args(route)
        .env("RUST_LOG", "warn,edge_node=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edge-node chat");
    let mut stdin = child.stdin.take().unwrap();
    for (i, line) in turns.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What `generate --chat` prints for the first question (its text and a newline).
fn first_reply() -> String {
    let model = default_model();
    let out = edge_node(&[
        "generate",
        "--local",
        "--model",
        &model,
        "--chat",
        "--prompt",
        TURNS[0],
        "--max-new-tokens",
        "16",
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn chat_in_one_process_answers_like_generate_and_reuses_the_cache() {
    let out = chat(&["--local"], &TURNS, Duration::ZERO);
    let text = String::from_utf8(out.stdout).unwrap();
    let first = first_reply();
    assert!(
        text.starts_with(&first),
        "first reply {text:?} is not generate's {first:?}"
    );
    assert!(
        !text[first.len()..].trim().is_empty(),
        "no second reply: {text:?}"
    );
    // The second turn ran only what follows the first turn's cached positions.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prefix cache"), "{stderr}");

    let model = default_model();
    assert_clean_error(
        &edge_node(&["chat", "--model", &model]),
        "say where the blocks run",
    );
}

/// The nodes close sessions silent for 2 s and the user pauses 4 s between turns: keepalive
/// steps hold the one session open, so the second turn needs no reroute.
#[test]
fn chat_through_a_swarm_is_the_same_conversation() {
    let boot = bootstrap();
    let idle = ["--idle-timeout", "2"];
    let _a = node_with("0..10", &boot, &idle);
    let _b = node_with("10..20", &boot, &idle);
    let _c = node_with("20..30", &boot, &idle);
    let route = [
        "--bootstrap",
        &boot.addr,
        "--discovery-timeout",
        "30",
        "--keepalive",
        "1",
    ];
    let swarm = chat(&route, &TURNS, Duration::from_secs(4));
    let local = chat(&["--local"], &TURNS, Duration::ZERO);
    let text = String::from_utf8(swarm.stdout).unwrap();
    assert!(text.starts_with(&first_reply()), "{text:?}");
    assert_eq!(text, String::from_utf8(local.stdout).unwrap());
    let stderr = String::from_utf8_lossy(&swarm.stderr);
    assert!(stderr.contains("prefix cache"), "{stderr}");
    assert!(
        stderr.contains("[0..10] -> "),
        "banner shows the route: {stderr}"
    );
    assert!(
        !stderr.contains("rerouting"),
        "the session was lost: {stderr}"
    );
}
