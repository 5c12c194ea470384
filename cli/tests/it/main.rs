//! The `edge-node` binary as a user runs it: output contracts and error behaviour.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use model::synthetic::SyntheticModel;
use serde_json::Value;

mod api;
mod balance;
mod chat;
mod config;
mod fairness;
mod families;
mod faults;
mod hostile_clients;
mod kernels;
mod push;
mod routing;
mod swarm;
mod trust;
mod verification;

fn edge_node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run edge-node")
}

fn default_model() -> String {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
    assert!(
        p.exists(),
        "default model missing: run scripts/fetch-model.sh first"
    );
    p.to_string_lossy().into_owned()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("edge-node-it-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        stdout.trim_end().lines().count(),
        1,
        "stdout must be one JSON line: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap()
}

/// A user mistake: non-zero exit, one line on stderr that says what is wrong, no panic.
fn assert_clean_error(out: &Output, must_contain: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(must_contain),
        "expected `{must_contain}` in: {stderr}"
    );
}

/// A log written to a file or a pipe is plain text: colour codes only go to a terminal.
#[test]
fn logs_to_a_file_have_no_escape_sequences() {
    let model = default_model();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(["generate", "--local", "--model", &model, "--prompt", "Hi"])
        .args(["--max-new-tokens", "2", "--json"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run edge-node");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("kernels"), "no log lines to check: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape sequences in a piped log: {log:?}"
    );
}

#[test]
fn greedy_json_matches_the_reference_and_has_every_field() {
    let out = edge_node(&[
        "generate",
        "--local",
        "--model",
        &default_model(),
        "--prompt",
        "def fibonacci(n):",
        "--max-new-tokens",
        "8",
        "--json",
        "--threads",
        "2",
    ]);
    let v = json_of(&out);
    let ids = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids("prompt_tokens"), [1604, 3987, 46477, 24, 94, 727]);
    // llama.cpp's greedy continuation (model/tests/data/smollm2-135m.generations.json, before its near-tie).
    assert_eq!(ids("tokens"), [472, 585, 304, 1758, 216, 32, 42, 448]);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(v["text"], "\n    if n == 0:\n       ");
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let model = default_model();
    let run = |seed: &str| {
        json_of(&edge_node(&[
            "generate",
            "--local",
            "--model",
            &model,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repeat-penalty",
            "1.1",
            "--seed",
            seed,
            "--json",
        ]))["tokens"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn chat_wraps_the_prompt_in_the_template() {
    let out = edge_node(&[
        "generate",
        "--local",
        "--model",
        &default_model(),
        "--chat",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "1",
        "--json",
    ]);
    let v = json_of(&out);
    let prompt: Vec<u64> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // <|im_start|>system ... <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    assert_eq!(prompt[0], 1);
    assert_eq!(
        prompt[prompt.len() - 9..],
        [4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    );
}

#[test]
fn user_mistakes_are_one_line_errors() {
    let dir = TempDir::new("errors");
    let missing = dir.file("missing.gguf");
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--local",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
        ];
        args.extend_from_slice(extra);
        edge_node(&args)
    };
    assert_clean_error(&run(&missing, &[]), "missing.gguf");

    let text = dir.file("notes.txt");
    std::fs::write(&text, "not a model at all").unwrap();
    assert_clean_error(&run(&text, &[]), "is not a GGUF file");

    let truncated = dir.file("truncated.gguf");
    let real = std::fs::read(default_model()).unwrap();
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    assert_clean_error(&run(&truncated, &[]), "truncated");

    // A header claiming 2^60 tensors, and the truncated file, with RUST_BACKTRACE=1: these
    // once printed a 45-line backtrace from inside the parser; still one line.
    let huge = dir.file("huge-count.gguf");
    let mut header = real[..1 << 20].to_vec();
    header[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&huge, &header).unwrap();
    for file in [&huge, &truncated] {
        let out = Command::new(env!("CARGO_BIN_EXE_edge-node"))
            .args(["generate", "--local", "--model", file.to_str().unwrap()])
            .args(["--prompt", "hi"])
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert_clean_error(&out, "error: ");
    }

    let mamba = dir.file("mamba.gguf");
    SyntheticModel {
        architecture: "mamba".into(),
        ..Default::default()
    }
    .write(&mamba)
    .unwrap();
    assert_clean_error(
        &run(&mamba, &[]),
        "unsupported model architecture `mamba` (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3)",
    );

    let tiny = dir.file("tiny.gguf");
    SyntheticModel {
        context: 64,
        ..Default::default()
    }
    .write(&tiny)
    .unwrap();
    let long = "word ".repeat(100);
    let out = edge_node(&[
        "generate",
        "--local",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        &long,
    ]);
    assert_clean_error(&out, "the model's context holds 64");

    let out = edge_node(&[
        "bench",
        "--local",
        "--model",
        tiny.to_str().unwrap(),
        "--blocks",
        "2..9",
    ]);
    assert_clean_error(&out, "block range 2..9 is outside the model's blocks 0..4");

    assert_clean_error(&run(&tiny, &["--top-p", "1.5"]), "--top-p");
}

/// A number of seconds past a day is a usage error that names the flag (clap's exit code 2),
/// where it used to reach `Instant + Duration` and panic with an overflow.
/// `--max-memory` is checked against the file's tensor directory before any weight is read: a
/// budget that holds no block, or fewer blocks than a range or count asks for, is one line
/// naming the numbers, and the node exits.
#[test]
fn memory_budgets_that_do_not_fit_are_refused_before_loading() {
    let model = default_model();
    let join = |extra: &[&str]| {
        let mut args = vec!["join", "--model", &model, "--no-mdns"];
        args.extend(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        args.extend(extra);
        edge_node(&args)
    };
    let out = join(&["--blocks", "auto", "--max-memory", "1M"]);
    assert_clean_error(&out, "--max-memory 1.0 MiB cannot hold even one block");
    assert_clean_error(&out, "MiB of weights + ");
    for ask in [&["--blocks", "0..30"][..], &["--num-blocks", "30"]] {
        let mut args = ask.to_vec();
        args.extend(["--max-memory", "300M"]);
        let out = join(&args);
        assert_clean_error(&out, "not the 30 asked for");
        assert_clean_error(&out, "(--cache-tokens 16384)");
    }
}

#[test]
fn durations_are_bounded_where_they_are_parsed() {
    let huge = "18446744073709551615";
    let model = default_model();
    let join = |flag: &str| {
        edge_node(&[
            "join",
            "--model",
            &model,
            "--blocks",
            "0..1",
            "--no-mdns",
            flag,
            huge,
        ])
    };
    let generate = |flag: &str| {
        edge_node(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "hi",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/9",
            flag,
            huge,
        ])
    };
    let cases = [
        (
            join("--drain-timeout"),
            "--drain-timeout <DRAIN_TIMEOUT>",
            "0..=86400",
        ),
        (
            join("--rebalance-interval"),
            "--rebalance-interval <REBALANCE_INTERVAL>",
            "1..=86400",
        ),
        (
            join("--idle-timeout"),
            "--idle-timeout <IDLE_TIMEOUT>",
            "1..=86400",
        ),
        (
            generate("--discovery-timeout"),
            "--discovery-timeout <DISCOVERY_TIMEOUT>",
            "1..=86400",
        ),
        (
            generate("--step-timeout"),
            "--step-timeout <STEP_TIMEOUT>",
            "1..=86400",
        ),
        (generate("--timeout"), "--timeout <TIMEOUT>", "1..=86400"),
    ];
    for (out, flag, range) in cases {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // Clap's one error line, then only its usual pointer to --help.
        let mut lines = stderr.lines().filter(|l| !l.trim().is_empty());
        assert_eq!(
            lines.next(),
            Some(
                format!("error: invalid value '{huge}' for '{flag}': {huge} is not in {range}")
                    .as_str()
            ),
            "{stderr}"
        );
        assert_eq!(
            lines.collect::<Vec<_>>(),
            ["For more information, try '--help'."],
            "{stderr}"
        );
    }
}

#[test]
fn a_tiny_model_generates_end_to_end() {
    let dir = TempDir::new("tiny");
    let tiny = dir.file("tiny.gguf");
    SyntheticModel::default().write(&tiny).unwrap();
    let v = json_of(&edge_node(&[
        "generate",
        "--local",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "5",
        "--json",
    ]));
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 3);
    assert!(!v["tokens"].as_array().unwrap().is_empty());
}
