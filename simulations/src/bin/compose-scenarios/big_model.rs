//! The `big-model` scenario: the reason the project exists, shown. A 7B-class model (the
//! synthetic Mistral-7B-shaped Q4_0 file, 3.8 GiB) runs on four nodes whose containers are
//! hard-limited to 1600 MiB, so no node could hold it; each takes a quarter of the blocks by
//! `--blocks auto --max-memory`. Passes when the swarm's 512 greedy tokens equal a local run of
//! the same file in one unlimited container, the route has four nodes, no container was
//! OOM-killed and each one's peak memory (its cgroup's, page cache included) stayed below its
//! limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::synthetic_full::{FullSizeModel, Quant, Shape};
use serde_json::Value;

use super::{api, compose, container, docker, image, root, run, Outcome};

const PROFILE: &str = "big-model";
const NODES: [&str; 4] = ["big-node-a", "big-node-b", "big-node-c", "big-node-d"];
/// What the scenario generates: long enough that every node's KV cache grows through several
/// pages while the limit holds.
const TOKENS: usize = 512;
/// The first prompt of `model/tests/data/synthetic-7b.reference.json`, so the local run is
/// also checked against llama.cpp's greedy tokens.
const PROMPT: &str = "The history of the city begins with a small settlement on the river,";

fn spec() -> FullSizeModel {
    FullSizeModel::new(Shape::Mistral7B, Quant::Q4_0)
}

/// The file inside the containers (`../models` is mounted on `/models`).
fn model_in_container() -> String {
    format!("/models/synthetic/{}", spec().file_name())
}

fn big_compose() -> Command {
    let mut c = compose();
    c.args(["--profile", PROFILE]);
    c
}

/// Writes the model once (about 4 GB, streamed; kept for later runs after a content check).
fn ensure_model() -> anyhow::Result<PathBuf> {
    let dir = root().join("models/synthetic");
    let spec = spec();
    let total = spec.file_bytes();
    let mut last = 0;
    let started = Instant::now();
    let path = spec.write_if_missing(&dir, &mut |done, _| {
        let tenth = done * 10 / total.max(1);
        if tenth > last {
            last = tenth;
            println!(
                "big-model: writing {} ... {}% ({:.0} s)",
                spec.file_name(),
                tenth * 10,
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    Ok(path)
}

/// Removes the big-model services however the scenario ends.
struct BigCluster;
impl Drop for BigCluster {
    fn drop(&mut self) {
        let _ = big_compose()
            .args(["down", "-v", "--remove-orphans"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn wait_healthy(service: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let id = container(service)?;
        let state = docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.Health.Status}}",
            &id,
        ])
        .unwrap_or_default();
        match state.split_whitespace().collect::<Vec<_>>()[..] {
            [_, "healthy"] => return Ok(()),
            [status, _] if status != "running" && status != "created" => {
                let logs = docker(&["logs", "--tail", "5", &id]).unwrap_or_default();
                bail!("{service} stopped ({status}): {}", logs.trim());
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "{service} not healthy within {} s ({})",
                within.as_secs(),
                state.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One generation in a one-off client container; returns its JSON.
fn generate(extra: &[&str]) -> anyhow::Result<Value> {
    let model = model_in_container();
    let tokens = TOKENS.to_string();
    let mut args = vec![
        "run",
        "--rm",
        "-T",
        "big-client",
        "generate",
        "--model",
        &model,
    ];
    args.extend(["--prompt", PROMPT, "--max-new-tokens", &tokens, "--json"]);
    args.extend(extra);
    let out = run(big_compose().args(&args))?;
    serde_json::from_str(out.trim()).context("the client printed no JSON")
}

/// Peak memory of a container's cgroup (page cache included) and its limit, in bytes, from the
/// host: cgroup v2's `memory.peak` or v1's `memory.max_usage_in_bytes`.
fn cgroup_peak(id: &str) -> anyhow::Result<u64> {
    let candidates = [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak"),
        format!("/sys/fs/cgroup/docker/{id}/memory.peak"),
        format!("/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes"),
        format!("/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.max_usage_in_bytes"),
    ];
    for p in &candidates {
        if let Ok(s) = std::fs::read_to_string(p) {
            return s.trim().parse().with_context(|| format!("{p}: {s:?}"));
        }
    }
    bail!("no cgroup memory peak for container {id} (looked at {candidates:?})")
}

/// The node process's peak resident set (VmHWM), from the host's /proc.
fn peak_rss(id: &str) -> anyhow::Result<u64> {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", id])?;
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.trim()).join("status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")?;
    Ok(kb << 10)
}

/// The weights a node loaded, in MiB, from its `blocks loaded and measured` log line.
fn weights_mib(service: &str) -> Option<f64> {
    let logs = run(big_compose().args(["logs", "--no-color", service])).ok()?;
    logs.lines()
        .filter_map(|l| l.split("weights_mib=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.trim_matches('"').parse().ok())
        .next_back()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub fn big_model() -> Outcome {
    let started = Instant::now();
    let path = ensure_model()?;
    let file_bytes = std::fs::metadata(&path)?.len();
    let written = started.elapsed().as_secs_f64();
    let _ = big_compose()
        .args(["down", "-v", "--remove-orphans"])
        .output();
    let cluster = BigCluster;
    // The reference first, alone: one process with the whole file and no limit.
    let local = generate(&["--local"])?;
    run(big_compose().args(["up", "-d", "bootstrap"]))?;
    // One at a time: each node places itself where the swarm is weakest, so it must see the
    // blocks the previous ones took.
    for n in NODES {
        run(big_compose().args(["up", "-d", n]))?;
        wait_healthy(n, Duration::from_secs(300))?;
    }
    run(big_compose().args(["up", "-d", "big-gateway"]))?;
    let swarm = generate(&[
        "--bootstrap",
        "/dns4/bootstrap/tcp/31330",
        "--step-timeout",
        "30",
        "--discovery-timeout",
        "60",
        "--connect-timeout",
        "5",
    ])?;
    let tokens = |v: &Value| v["tokens"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        tokens(&local).len() == TOKENS,
        "the local run made {} tokens, not {TOKENS}",
        tokens(&local).len()
    );
    if let Some(i) = (0..TOKENS).find(|&i| tokens(&swarm).get(i) != tokens(&local).get(i)) {
        bail!("the swarm's token {i} differs from the local run");
    }
    let llama = against_llama_cpp(&local)?;
    let route = swarm["route"].as_array().cloned().unwrap_or_default();
    let peers: std::collections::HashSet<String> =
        route.iter().map(|h| h["peer"].to_string()).collect();
    anyhow::ensure!(
        route.len() == 4 && peers.len() == 4,
        "the route is not four nodes: {route:?}"
    );
    let mut memory = Vec::new();
    for n in NODES {
        let id = container(n)?;
        let state = docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.OOMKilled}} {{.HostConfig.Memory}}",
            &id,
        ])?;
        let [status, oom, limit] = state.split_whitespace().collect::<Vec<_>>()[..] else {
            bail!("{n}: unexpected inspect output {state:?}");
        };
        anyhow::ensure!(
            status == "running" && oom == "false",
            "{n} is {status}, OOM-killed: {oom}"
        );
        let limit: u64 = limit.parse().context("memory limit")?;
        anyhow::ensure!(
            limit > 0 && limit < file_bytes,
            "{n}'s limit {limit} does not keep it from holding the {file_bytes}-byte file"
        );
        let peak = cgroup_peak(&id)?;
        anyhow::ensure!(
            peak < limit,
            "{n}'s peak memory {:.0} MiB reached its {:.0} MiB limit",
            mib(peak),
            mib(limit)
        );
        let rss = peak_rss(&id).map_or("?".into(), |b| format!("{:.0}", mib(b)));
        let weights = weights_mib(n).map_or("?".into(), |w| format!("{w:.0}"));
        memory.push(format!(
            "{n}: cgroup peak {:.0} MiB of {:.0} MiB, RSS peak {rss} MiB, weights {weights} MiB",
            mib(peak),
            mib(limit)
        ));
    }
    let gateway = through_the_gateway(&local)?;
    drop(cluster);
    Ok(format!(
        "{TOKENS} tokens identical to local through 4 nodes ({:.2} tokens/s; local {:.2}); \
         {llama}; file {:.2} GiB ({written:.0} s to write or check); {gateway}; {}",
        swarm["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
        local["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
        file_bytes as f64 / (1u64 << 30) as f64,
        memory.join("; ")
    ))
}

/// The local run's first tokens against llama.cpp's greedy tokens on the same file (committed
/// reference data, `model/tests/data/synthetic-7b.reference.json`): equal until the first
/// difference, and that difference only where llama.cpp's top two were within 0.2 nats, where
/// the last bits of two correct implementations may rightly choose differently (after it the
/// two continue from different texts, so nothing later compares).
fn against_llama_cpp(local: &Value) -> anyhow::Result<String> {
    let path = root().join("model/tests/data/synthetic-7b.reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    anyhow::ensure!(
        reference["model"] == spec().file_name().as_str(),
        "{} is about {}, not {}",
        path.display(),
        reference["model"],
        spec().file_name()
    );
    let case = &reference["generations"][0];
    anyhow::ensure!(
        case["prompt"] == PROMPT,
        "the reference's first prompt is not this scenario's"
    );
    let want = case["generated_token_ids"]
        .as_array()
        .context("reference tokens")?;
    let margins = case["top2_margin_per_position"]
        .as_array()
        .context("reference margins")?;
    let got = local["tokens"].as_array().context("local tokens")?;
    anyhow::ensure!(
        local["prompt_tokens"] == case["prompt_token_ids"],
        "prompt ids {} differ from llama.cpp's {}",
        local["prompt_tokens"],
        case["prompt_token_ids"]
    );
    let agree = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    if agree < want.len() {
        let margin = margins.get(agree).and_then(Value::as_f64).unwrap_or(0.0);
        anyhow::ensure!(
            margin < 0.2,
            "the local run parts from llama.cpp at token {agree}, where llama.cpp's top two \
             are {margin:.3} nats apart"
        );
        return Ok(format!(
            "local equals llama.cpp for {agree} of its {} tokens, then parts at a near-tie \
             ({margin:.3} nats)",
            want.len()
        ));
    }
    Ok(format!(
        "local equals llama.cpp for all its {} tokens",
        want.len()
    ))
}

/// The gateway of the big model sees the four nodes online, and its completions endpoint
/// gives the beginning of the local text.
fn through_the_gateway(local: &Value) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let online = api("GET", "/api/status", "")
            .ok()
            .filter(|(c, _)| *c == 200)
            .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| {
                let peers = v["swarm"]["peers"].as_array()?.clone();
                Some(peers.iter().filter(|p| p["state"] == "online").count())
            })
            .unwrap_or(0);
        if online == NODES.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the gateway's status page shows {online} of 4 nodes online after 90 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let model_id = spec().file_name().trim_end_matches(".gguf").to_string();
    let request = serde_json::json!({
        "model": model_id,
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0,
    });
    let (code, body) = api("POST", "/v1/completions", &request.to_string())?;
    anyhow::ensure!(code == 200, "the gateway answered {code}: {body}");
    let v: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
    let want = local["text"].as_str().unwrap_or_default();
    anyhow::ensure!(
        !text.is_empty() && want.starts_with(text),
        "the gateway's 16 tokens {text:?} do not begin the local text"
    );
    Ok("gateway: 4 nodes on its status page, 16 tokens of /v1/completions identical".into())
}

/// The image the scenario runs, built when missing (as the other scenarios do).
pub fn ensure_image() -> anyhow::Result<()> {
    if docker(&["image", "inspect", &image()]).is_err() {
        println!("building the edge-node image...");
        run(Command::new("bash").arg(root().join("deploy/build-image.sh")))?;
    }
    Ok(())
}
