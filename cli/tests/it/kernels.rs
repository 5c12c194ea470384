//! Kernel paths as a user meets them: `EDGE_CPU` picks a path or fails in one line, and every
//! path this CPU runs generates the very same tokens and log-probabilities (the kernels share
//! one canonical arithmetic, which is what lets peers on different CPUs form one swarm).

use std::process::{Command, Output};

use super::{assert_clean_error, default_model, json_of};

fn edge_node_on(path: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("EDGE_CPU", path)
        .output()
        .expect("run edge-node")
}

/// The paths this CPU can run, best first (what `EDGE_CPU` accepts here).
fn paths_here() -> Vec<&'static str> {
    model::kernels::cpu::available()
        .iter()
        .map(|isa| isa.name())
        .collect()
}

#[test]
fn an_unknown_or_unrunnable_edge_cpu_is_one_line() {
    let model = default_model();
    let args = ["generate", "--local", "--model", &model, "--prompt", "hi"];
    assert_clean_error(
        &edge_node_on("sse9", &args),
        "EDGE_CPU=\"sse9\" is not a kernel path",
    );
    let foreign = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    assert_clean_error(&edge_node_on(foreign, &args), "EDGE_CPU");
    #[cfg(target_arch = "x86_64")]
    if !paths_here().contains(&"avx512") {
        assert_clean_error(
            &edge_node_on("avx512", &args),
            "asks for a path this CPU cannot run",
        );
    }
}

#[test]
fn every_path_generates_the_same_logprobs() {
    let models = [
        default_model(),
        // Q4_K, Q5_0, Q6_K and Q8_0 weights: the K-quant kernels too.
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
        )
        .to_string(),
    ];
    let paths = paths_here();
    println!("kernel paths exercised here: {paths:?}");
    for model in &models {
        let run = |path: &str| {
            let v = json_of(&edge_node_on(
                path,
                &[
                    "generate",
                    "--local",
                    "--model",
                    model,
                    "--prompt",
                    "The capital of France is",
                    "--max-new-tokens",
                    "6",
                    "--json",
                    "--threads",
                    "2",
                ],
            ));
            (v["tokens"].clone(), v["logprobs"].clone())
        };
        let want = run(paths[0]);
        for path in &paths[1..] {
            assert_eq!(run(path), want, "{model}: {path} differs from {}", paths[0]);
        }
    }
}
