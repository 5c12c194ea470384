//! The real Qwen2.5 and Gemma 3 files (and a synthetic Gemma 2 whose sliding window is shorter
//! than the text) served as slices by three nodes on 127.0.0.1: the swarm gives the tokens of
//! one process, and the OpenAI gateway serves each file with its own chat template to the
//! official `openai` client.

use std::path::PathBuf;

use model::synthetic::{GgmlDType, SyntheticModel};
use serde_json::json;

use super::api::{gateway_of, require_python_clients, run_python};
use super::swarm::{bootstrap, local_of, node_of, swarm_command_of};
use super::{edge_node, json_of, TempDir};

/// A file fetched by `scripts/fetch-model.sh all`; the test fails (does not skip) without it.
fn model(file: &str) -> String {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/")).join(file);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-model.sh all",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

/// `generate --local --chat --json`: what the gateway must stream for the same question.
fn local_chat(model: &str, question: &str, tokens: usize) -> serde_json::Value {
    let n = tokens.to_string();
    json_of(&edge_node(&[
        "generate",
        "--local",
        "--model",
        model,
        "--prompt",
        question,
        "--max-new-tokens",
        &n,
        "--json",
        "--chat",
        "--threads",
        "1",
    ]))
}

/// Three nodes serving thirds of `file`; plain generation equals the local run, then the
/// gateway answers a streamed and a plain chat with the local chat text.
fn three_nodes_and_the_gateway(file: &str, blocks: [&str; 3], prompt: &str, question: &str) {
    let model = model(file);
    let boot = bootstrap();
    let _nodes: Vec<_> = blocks
        .iter()
        .map(|b| node_of(&model, b, &boot, &[]))
        .collect();
    let v = json_of(
        &swarm_command_of(&model, &boot, prompt, "12")
            .output()
            .unwrap(),
    );
    assert_eq!(
        v["tokens"],
        local_of(&model, prompt, "12")["tokens"],
        "{file}: swarm output differs from local"
    );
    let route: Vec<&str> = v["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|h| h["blocks"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(route, blocks, "{file}");

    let py = require_python_clients();
    let chat = local_chat(&model, question, 10);
    let api = gateway_of(&model, &boot, &[]);
    run_python(
        &py,
        "openai_families.py",
        &[
            ("BASE_URL", format!("http://{}/v1", api.addr)),
            ("MODEL_ID", file.trim_end_matches(".gguf").into()),
            (
                "EXPECTED",
                json!({
                    "question": question,
                    "text": chat["text"],
                    "prompt_tokens": chat["prompt_tokens"].as_array().map_or(0, Vec::len),
                    "tokens": 10,
                })
                .to_string(),
            ),
        ],
    );
}

#[test]
fn qwen2_through_three_nodes_and_the_gateway() {
    three_nodes_and_the_gateway(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        ["0..8", "8..16", "16..24"],
        "def quicksort(xs):",
        "Write a Python one-liner that reverses a list.",
    );
}

#[test]
fn gemma3_through_three_nodes_and_the_gateway() {
    three_nodes_and_the_gateway(
        "gemma-3-270m.Q4_K_M.gguf",
        ["0..6", "6..12", "12..18"],
        "The capital of France is",
        "Name three colours.",
    );
}

/// Gemma 2 with a window of 8 over 100 positions: every node's window layers wrap their ring
/// (8 + 64 slots) and still give the local tokens.
#[test]
fn sliding_window_rings_on_nodes_give_the_local_tokens() {
    let dir = TempDir::new("gemma2-window");
    let path = dir.file("gemma2.gguf");
    SyntheticModel::family("gemma2", GgmlDType::Q8_0)
        .write(&path)
        .expect("write synthetic gemma2");
    let model = path.to_string_lossy().into_owned();
    let boot = bootstrap();
    let _a = node_of(&model, "0..2", &boot, &[]);
    let _b = node_of(&model, "2..4", &boot, &[]);
    let prompt = "Sliding windows keep only the last few positions of every layer.";
    let v = json_of(
        &swarm_command_of(&model, &boot, prompt, "40")
            .output()
            .unwrap(),
    );
    let local = local_of(&model, prompt, "40");
    assert_eq!(local["tokens"].as_array().map(Vec::len), Some(40));
    assert_eq!(v["tokens"], local["tokens"]);
}
