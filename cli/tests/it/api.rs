//! `edge-node serve-api` and the nodes' status pages as their users meet them: a 3-node swarm
//! on 127.0.0.1 driven by clients that are not ours (the official `openai` package, grpcio,
//! headless Chromium). The Python packages and the browser come from
//! `scripts/setup-test-tools.sh` (run by `scripts/test.sh`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::swarm::{bootstrap, node_with, spawn_until, Proc};
use super::{default_model, edge_node, json_of};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The Python with the test clients: `EDGE_TEST_PYTHON`, else the setup script's venv.
fn python() -> String {
    if let Ok(p) = std::env::var("EDGE_TEST_PYTHON") {
        return p;
    }
    let venv = PathBuf::from(REPO).join(".venv-test/bin/python");
    if venv.exists() {
        return venv.to_string_lossy().into_owned();
    }
    "python3".into()
}

pub fn require_python_clients() -> String {
    let py = python();
    let ok = Command::new(&py)
        .args([
            "-c",
            "import openai, grpc, grpc_tools, grpc_health, grpc_reflection",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{py} lacks the test clients (openai, grpcio...): run scripts/setup-test-tools.sh"
    );
    py
}

fn chromium() -> String {
    if let Ok(p) = std::env::var("EDGE_TEST_CHROMIUM") {
        return p;
    }
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.into();
        }
    }
    panic!("no headless Chromium found: run scripts/setup-test-tools.sh");
}

/// A plain HTTP/1.1 request; returns status and body.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let s = TcpStream::connect(addr).expect("connect to the gateway");
    http_on(s, addr, method, path, body, &[])
}

/// [`http`] on a connection already open, with extra header lines (`Name: value`).
pub fn http_on(
    mut s: TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[&str],
) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading everything; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

pub fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, b"");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// `serve-api` on a free port of 127.0.0.1; its `addr` is host:port.
fn gateway(boot: &Proc, extra: &[&str]) -> Proc {
    gateway_of(&default_model(), boot, extra)
}

/// `serve-api` for the model file `model`.
pub fn gateway_of(model: &str, boot: &Proc, extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve-api",
        "--model",
        model,
        "--bootstrap",
        &boot.addr,
        "--listen",
        "127.0.0.1:0",
        "--discovery-timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    spawn_until(&args, "serving the API on http://", ":")
}

struct Swarm {
    _boot: Proc,
    nodes: Vec<Proc>,
    api: Proc,
}

impl Swarm {
    /// Bootstrap, three nodes with status pages, and a gateway; returns once the gateway's
    /// snapshot shows every node online.
    fn start() -> Self {
        let boot = bootstrap();
        let nodes: Vec<Proc> = ["0..10", "10..20", "20..30"]
            .iter()
            .map(|r| node_with(r, &boot, &["--http-listen", "127.0.0.1:0"]))
            .collect();
        let api = gateway(&boot, &[]);
        let swarm = Self {
            _boot: boot,
            nodes,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let st = get_json(swarm.http(), "/api/status");
            let online = st["swarm"]["peers"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p["state"] == "online").count());
            if online == 3 && st["swarm"]["first_gap"].is_null() {
                break;
            }
            assert!(Instant::now() < deadline, "swarm never complete: {st}");
            std::thread::sleep(Duration::from_millis(300));
        }
        swarm
    }

    /// host:port of the gateway (HTTP and gRPC).
    fn http(&self) -> &str {
        &self.api.addr
    }

    fn node_http(&self, i: usize) -> String {
        self.nodes[i].wait_line("status page on http://")
    }
}

/// `generate --local --json` of `prompt` (as a chat turn with `chat`): the reference.
pub fn local(prompt: &str, tokens: usize, chat: bool) -> Value {
    let model = default_model();
    let n = tokens.to_string();
    let mut args = vec![
        "generate",
        "--local",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n,
        "--json",
    ];
    if chat {
        args.push("--chat");
    }
    json_of(&edge_node(&args))
}

/// Greedy single-process reference for the clients to compare with.
fn reference(tokens: usize) -> Value {
    let chat_prompt = "What is the capital of France?";
    let completion_prompt = "The capital of France is";
    let chat = local(chat_prompt, tokens, true);
    let completion = local(completion_prompt, tokens, false);
    assert_eq!(chat["tokens"].as_array().unwrap().len(), tokens);
    json!({
        "chat_prompt": chat_prompt,
        "chat_text": chat["text"],
        "chat_prompt_tokens": chat["prompt_tokens"].as_array().unwrap().len(),
        "completion_prompt": completion_prompt,
        "completion_text": completion["text"],
        "tokens": tokens,
        "peers": 3,
    })
}

pub fn run_python(py: &str, script: &str, env: &[(&str, String)]) {
    let path = PathBuf::from(REPO).join("cli/tests/python").join(script);
    let out = Command::new(py)
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("ok: "), "{script}: {stdout}");
    eprintln!("{script}: {}", stdout.trim());
}

/// `openai_api.py`: the official client against the gateway at `addr`, greedy texts compared
/// with the single-process reference `expected`.
fn openai_checks(py: &str, addr: &str, expected: &Value) {
    run_python(
        py,
        "openai_api.py",
        &[
            ("BASE_URL", format!("http://{addr}/v1")),
            ("MODEL_ID", "SmolLM2-135M-Instruct.Q4_1".into()),
            ("EXPECTED", expected.to_string()),
        ],
    );
}

/// The value of a metric line `name value` (labels included in `name`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn openai_and_grpc_clients_get_the_local_reference_through_the_gateway() {
    let py = require_python_clients();
    let expected = reference(12);
    let swarm = Swarm::start();
    let addr = swarm.http().to_string();
    openai_checks(&py, &addr, &expected);
    run_python(
        &py,
        "grpc_api.py",
        &[
            ("GRPC_ADDR", addr.clone()),
            ("PROTO_DIR", format!("{REPO}/proto/proto")),
            ("EXPECTED", expected.to_string()),
        ],
    );

    // Prometheus: the gateway counted what it generated, the nodes what they served.
    let (status, text) = http(&addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    assert!(metric(&text, "edge_gateway_tokens_generated_total") >= 12.0 * 6.0);
    assert_eq!(metric(&text, "edge_gateway_generations_active"), 0.0);
    assert!(metric(&text, "edge_gateway_time_to_first_token_seconds_count") >= 6.0);
    assert_eq!(metric(&text, "edge_gateway_swarm_complete"), 1.0);
    assert!(
        metric(
            &text,
            "edge_gateway_requests_total{endpoint=\"chat_completions\",outcome=\"404\"}"
        ) >= 1.0
    );
    for i in 0..3 {
        let (status, text) = http(&swarm.node_http(i), "GET", "/metrics", b"");
        assert_eq!(status, 200);
        assert!(metric(&text, "edge_node_steps_total") >= 12.0);
        assert!(metric(&text, "edge_node_step_duration_seconds_count") >= 12.0);
        assert_eq!(metric(&text, "edge_node_sessions"), 0.0);
        assert_eq!(metric(&text, "edge_node_kv_cache_bytes"), 0.0);
        assert_eq!(metric(&text, "edge_node_block_end"), 10.0 * (i + 1) as f64);
    }
}

#[test]
fn status_pages_show_the_swarm_in_a_browser_and_bad_requests_fail_alone() {
    let browser = chromium();
    let swarm = Swarm::start();
    // A client that never finishes its headers is cut off (header timeout 10 s) while
    // everything below is served.
    let api_addr = swarm.http().to_string();
    let stalled = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&api_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        t.elapsed()
    });
    let gateway = format!("http://{}/", swarm.http());
    let node0 = format!("http://{}/", swarm.node_http(0));
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for (name, url, title) in [
        ("gateway", &gateway, "edge-swarm gateway"),
        ("node", &node0, "edge-swarm node"),
    ] {
        // The rows come from the page's own fetch of /api/status; on a loaded machine the
        // dump can be taken before it lands, so a page without them is loaded again (bounded).
        let has_rows = |dom: &str| {
            swarm
                .nodes
                .iter()
                .all(|n| dom.contains(&format!("<tr data-peer=\"{}\"", n.peer_id())))
        };
        let mut dom = headless(&browser, &["--dump-dom", url.as_str()]);
        for _ in 0..3 {
            if has_rows(&dom) {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
            dom = headless(&browser, &["--dump-dom", url.as_str()]);
        }
        assert!(dom.contains(title), "{name} page: {dom}");
        assert!(dom.contains("every block served"), "{name} page: {dom}");
        for n in &swarm.nodes {
            assert!(
                dom.contains(&format!("<tr data-peer=\"{}\"", n.peer_id())),
                "{name} page lacks peer {}: {dom}",
                n.peer_id()
            );
        }
        if name == "node" {
            assert!(dom.contains("(this node)"), "{dom}");
        }
        let png = shots.join(format!("status-{name}.png"));
        let _ = std::fs::remove_file(&png);
        headless(
            &browser,
            &[
                "--window-size=1200,900",
                &format!("--screenshot={}", png.display()),
                url.as_str(),
            ],
        );
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
        eprintln!("screenshot: {}", png.display());
    }

    // Bad requests get OpenAI-shaped errors and leave the gateway serving.
    let api = swarm.http();
    let (status, body) = http(api, "POST", "/v1/chat/completions", b"{not json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let huge = vec![b'x'; 5 << 20];
    let (status, body) = http(api, "POST", "/v1/completions", &huge);
    assert_eq!(status, 413, "{body}");
    let (status, _) = http(api, "GET", "/v1/nothing-here", b"");
    assert_eq!(status, 404);
    let (status, _) = http(api, "GET", "/v1/chat/completions", b"");
    assert_eq!(status, 405);
    let ok = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Hello", "max_tokens": 3,
                    "temperature": 0});
    let (status, body) = http(api, "POST", "/v1/completions", ok.to_string().as_bytes());
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["edge_swarm"]["route"].as_array().unwrap().len(), 3);

    // A streaming client that hangs up stops its generation and frees the peers' caches.
    let stream = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once upon a time",
                        "max_tokens": 2000, "temperature": 0, "stream": true});
    let body = stream.to_string();
    let mut s = TcpStream::connect(api).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    let busy = |addr: &str, name: &str| metric(&http(addr, "GET", "/metrics", b"").1, name);
    assert_eq!(busy(api, "edge_gateway_generations_active"), 1.0);
    drop(s);
    // 2000 tokens would keep them busy for half a minute at least.
    let deadline = Instant::now() + Duration::from_secs(5);
    let nodes: Vec<String> = (0..3).map(|i| swarm.node_http(i)).collect();
    while busy(api, "edge_gateway_generations_active") > 0.0
        || nodes.iter().any(|n| busy(n, "edge_node_sessions") > 0.0)
    {
        assert!(
            Instant::now() < deadline,
            "a dropped stream kept its generation or sessions"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tokens = busy(api, "edge_gateway_tokens_generated_total");
    assert!(
        tokens < 2000.0,
        "the dropped generation ran to its end ({tokens} tokens)"
    );
    let waited = stalled.join().unwrap();
    assert!(
        waited < Duration::from_secs(30),
        "a stalled client held its connection for {waited:?}"
    );
}

/// Runs headless Chromium with the page's scripts given time to fetch and render.
fn headless(browser: &str, args: &[&str]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .args(args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_node_killed_during_an_api_request_costs_a_reroute_not_the_answer() {
    let boot = bootstrap();
    let _first = node_with("0..15", &boot, &["--http-listen", "127.0.0.1:0"]);
    let mut twins: Vec<Proc> = (0..2)
        .map(|_| node_with("15..30", &boot, &["--http-listen", "127.0.0.1:0"]))
        .collect();
    let api = gateway(&boot, &["--step-timeout", "5", "--connect-timeout", "3"]);
    let prompt = "Once upon a time, in a small village by the sea,";
    let tokens = 160;
    let reference = local(prompt, tokens, false);
    let deadline = Instant::now() + Duration::from_secs(90);
    while get_json(&api.addr, "/api/status")["swarm"]["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["state"] == "online").count())
        < 3
    {
        assert!(Instant::now() < deadline, "the swarm never came online");
        std::thread::sleep(Duration::from_millis(300));
    }

    let addr = api.addr.clone();
    let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt,
                      "max_tokens": tokens, "temperature": 0})
    .to_string();
    let request =
        std::thread::spawn(move || http(&addr, "POST", "/v1/completions", body.as_bytes()));
    // The twin holding the session says so in its metrics; kill that one, mid-generation.
    let victim = loop {
        let busy = twins.iter().position(|n| {
            let (_, text) = http(
                &n.wait_line("status page on http://"),
                "GET",
                "/metrics",
                b"",
            );
            metric(&text, "edge_node_sessions") >= 1.0
        });
        if let Some(i) = busy {
            break i;
        }
        assert!(
            !request.is_finished(),
            "the request ended before a twin was seen busy"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    twins[victim].signal("-KILL");
    let (status, body) = request.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], reference["text"], "{body}");
    assert!(v["edge_swarm"]["reroutes"].as_u64().unwrap() >= 1, "{body}");
    let (_, metrics) = http(&api.addr, "GET", "/metrics", b"");
    assert!(metric(&metrics, "edge_gateway_reroutes_total") >= 1.0);
    drop(twins.remove(victim));
}

/// `serve-api --local`: the same API from one process holding every block, its generations
/// batched on the node's compute thread. The official client gets the reference, concurrent
/// requests each get their own reference text, and the metrics show the batching happened.
#[test]
fn serve_api_local_batches_concurrent_requests_and_each_gets_the_local_reference() {
    let py = require_python_clients();
    let expected = reference(12);
    let model = default_model();
    let api = spawn_until(
        &[
            "serve-api",
            "--local",
            "--model",
            &model,
            "--listen",
            "127.0.0.1:0",
            "--max-sessions",
            "4",
            "--prefill-chunk",
            "16",
        ],
        "serving the API on http://",
        ":",
    );
    let addr = api.addr.clone();
    openai_checks(&py, &addr, &expected);

    // Six different prompts at once (four run, two wait for a slot), one of them longer than
    // a prefill chunk: each text is what one process alone produces for it.
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "The three primary colors are",
        "In 1492, Columbus",
        "The largest planet in the solar system is",
        "Water boils at a temperature of 100 degrees Celsius at sea level, and the reason \
         it boils at a lower temperature on a mountain is that",
    ];
    let n = 16;
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (addr, p) = (addr.clone(), p.to_string());
            std::thread::spawn(move || {
                let body = json!({
                    "model": "SmolLM2-135M-Instruct.Q4_1",
                    "prompt": p,
                    "max_tokens": n,
                    "temperature": 0,
                });
                let (status, text) = http(
                    &addr,
                    "POST",
                    "/v1/completions",
                    body.to_string().as_bytes(),
                );
                assert_eq!(status, 200, "{text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let texts: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (p, got) in prompts.iter().zip(&texts) {
        let want = local(p, n, false);
        assert_eq!(got, want["text"].as_str().unwrap(), "prompt {p:?}");
    }

    let (status, text) = http(&addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    assert_eq!(text.matches("# EOF").count(), 1, "one exposition:\n{text}");
    // Mean sessions per batched product above one: generations shared products.
    let sessions = metric(&text, "edge_node_batch_sessions_sum");
    let batches = metric(&text, "edge_node_batch_sessions_count");
    assert!(
        sessions > batches,
        "{sessions} sessions in {batches} batches"
    );
    assert!(metric(&text, "edge_node_prefill_chunks_total") >= 2.0);
    assert_eq!(metric(&text, "edge_node_sessions"), 0.0);
    assert_eq!(metric(&text, "edge_gateway_generations_active"), 0.0);
    let st = get_json(&addr, "/api/status");
    assert_eq!(st["local"], true, "{st}");
    assert!(st["swarm"]["first_gap"].is_null(), "{st}");
}
