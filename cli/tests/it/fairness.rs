//! Peers that take more than their share of a node, written on the project's own crates: one
//! that opens sessions in a loop, one that sends a big step and never reads the answer, and
//! one that sends more rows in a step than the node takes. None keeps the node from an honest
//! client, who is served the local text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use model::fingerprint::Fingerprint;
use model::{GgufFile, ModelSpec};
use proto::v1::{server_frame, ClientFrame, Dtype, ErrorCode, OpenSession, ServerFrame};
use proto::{encode_tensor, max_step_frame, read_frame, write_frame, MAX_OPEN_FRAME};
use swarm::{Host, NetConfig, NetHandle, INFERENCE_STREAM};
use tokio_util::sync::CancellationToken;

use super::default_model;
use super::swarm::{bootstrap, local, node_with, route_of, swarm_command, Proc};

/// What the hostile peer needs to know of the model to speak the protocol.
struct Model {
    fp: Fingerprint,
    dim: usize,
}

fn model() -> Model {
    let file = GgufFile::open(default_model()).unwrap();
    Model {
        fp: model::fingerprint::fingerprint(&file).unwrap(),
        dim: ModelSpec::from_file(&file).unwrap().embedding_length,
    }
}

/// A peer of its own (no DHT, no mDNS), connected to `node` only.
struct Hostile {
    host: Host,
    shutdown: CancellationToken,
    node: PeerId,
}

impl Hostile {
    async fn connect(node: &Proc) -> Self {
        // "listening on" comes before the model is loaded; opens need the range served.
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.serving.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the node never said it serves its blocks"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let shutdown = CancellationToken::new();
        let host = swarm::host::start(
            NetConfig {
                keypair: Keypair::generate_ed25519(),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()],
                bootstrap: vec![],
                mdns: false,
                dht_server: false,
                on_listen: None,
                swarm_key: None,
            },
            shutdown.clone(),
        )
        .unwrap();
        let node_id: PeerId = node.peer_id().parse().unwrap();
        let addr: Multiaddr = node.addr.parse().unwrap();
        host.handle
            .dial(node_id, vec![addr], Duration::from_secs(10))
            .await
            .expect("dial the node");
        Self {
            host,
            shutdown,
            node: node_id,
        }
    }

    fn net(&self) -> &NetHandle {
        &self.host.handle
    }

    /// Opens a session of `blocks` on the node: the stream if it was opened, else the code it
    /// was refused with.
    async fn open(
        &self,
        m: &Model,
        blocks: (u32, u32),
        max_length: u32,
    ) -> Result<libp2p::Stream, ErrorCode> {
        let mut control = self.net().stream_control();
        let io = async {
            let mut stream = control
                .open_stream(self.node, INFERENCE_STREAM)
                .await
                .expect("open a stream");
            let open = ClientFrame::open(OpenSession {
                fingerprint: m.fp.to_vec(),
                start_block: blocks.0,
                end_block: blocks.1,
                max_length,
                wire_dtype: Dtype::F32 as i32,
            });
            write_frame(&mut stream, &open).await.expect("send open");
            let reply: ServerFrame = read_frame(&mut stream, MAX_OPEN_FRAME)
                .await
                .expect("read the answer")
                .expect("an answer, not the end of the stream");
            (stream, reply)
        };
        let (stream, reply) = tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("the node answers an open within 10 s");
        match reply.kind {
            Some(server_frame::Kind::Opened(o)) => {
                assert!(o.max_step_tokens > 0, "the node says its step bound");
                Ok(stream)
            }
            Some(server_frame::Kind::Error(e)) => Err(ErrorCode::from_wire(e.code)),
            other => panic!("unexpected answer to an open: {other:?}"),
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.host.task.await;
    }
}

#[test]
fn one_peer_opening_sessions_in_a_loop_leaves_room_for_an_honest_client() {
    let boot = bootstrap();
    // Default limits (16 sessions, a peer at most 12), and sessions that do not expire while
    // the test runs.
    let node = node_with("0..30", &boot, &["--idle-timeout", "600"]);
    let m = model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (hostile, held) = rt.block_on(async {
        let hostile = Hostile::connect(&node).await;
        let mut held = Vec::new();
        let mut refused = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        for _ in 0..200 {
            assert!(Instant::now() < deadline, "200 opens took over 120 s");
            match hostile.open(&m, (0, 30), 64).await {
                Ok(stream) => held.push(stream),
                Err(code) => refused.push(code),
            }
        }
        assert_eq!(held.len(), 12, "one peer holds three quarters of 16 slots");
        assert!(
            refused.iter().all(|c| *c == ErrorCode::TooManySessions),
            "refusals a client reroutes on: {refused:?}"
        );
        (hostile, held)
    });

    // The hostile peer's sessions are all still open while the honest client generates.
    let prompt = "The capital of France is";
    let v = super::json_of(&swarm_command(&boot, prompt, "8").output().unwrap());
    assert_eq!(v["tokens"], local(prompt, "8")["tokens"]);
    assert_eq!(route_of(&v), ["0..30"]);
    drop(held);
    rt.block_on(hostile.stop());
}

/// One GET of the node's Prometheus page.
fn metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the status page");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn a_client_that_stops_reading_is_dropped_within_the_idle_timeout() {
    let boot = bootstrap();
    let idle = 1;
    let node = node_with(
        "0..4",
        &boot,
        &[
            "--idle-timeout",
            &idle.to_string(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let status = node.wait_line("status page on http://");
    let m = model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A step whose answer (about 1.2 MB of f32) is far more than the stream's flow-control
    // window: unread, it blocks the node's write. 512 rows is the most one step may carry.
    let tokens = 512;
    let (hostile, stream) = rt.block_on(async {
        let hostile = Hostile::connect(&node).await;
        let mut stream = hostile
            .open(&m, (0, 4), 2048)
            .await
            .expect("the session opens");
        let hidden = vec![0.01f32; tokens * m.dim];
        let step = ClientFrame::step(0, encode_tensor(&hidden, &[tokens, m.dim], Dtype::F32));
        tokio::time::timeout(Duration::from_secs(30), write_frame(&mut stream, &step))
            .await
            .expect("the node reads the step")
            .expect("send the step");
        (hostile, stream)
    });

    // From when the answer is computed, the session may last the idle timeout and a margin;
    // the write timeout alone (10 s) would keep it longer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let computed = loop {
        let text = metrics(&status);
        if metric(&text, "edge_node_steps_total") >= 1.0 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the step was not computed in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let freed = loop {
        let text = metrics(&status);
        if metric(&text, "edge_node_sessions") == 0.0
            && metric(&text, "edge_node_kv_cache_reserved_tokens") == 0.0
        {
            break computed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the unread session still holds its cache after 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        freed < Duration::from_secs(idle + 5),
        "the session of a client that stopped reading was freed only after {freed:?}"
    );
    drop(stream);
    rt.block_on(hostile.stop());
}

/// Sends a step of `rows` rows at `pos` on `stream`; the node's answer.
async fn step(stream: &mut libp2p::Stream, m: &Model, pos: u32, rows: usize) -> ServerFrame {
    let hidden = vec![0.01f32; rows * m.dim];
    let frame = ClientFrame::step(pos, encode_tensor(&hidden, &[rows, m.dim], Dtype::F32));
    let io = async {
        write_frame(&mut *stream, &frame)
            .await
            .expect("send the step");
        read_frame::<_, ServerFrame>(&mut *stream, max_step_frame(64, m.dim))
            .await
            .expect("read the answer")
            .expect("an answer, not the end of the stream")
    };
    tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .expect("the node answers a step within 30 s")
}

/// A step over `--max-step-tokens` is refused with STEP_TOO_LARGE, the code that says the
/// request is at fault (clients split, never ban), before anything is computed; the session
/// stays open and takes the same rows in steps within the bound.
#[test]
fn a_step_over_the_bound_is_refused_and_the_session_goes_on() {
    let boot = bootstrap();
    let node = node_with("0..2", &boot, &["--max-step-tokens", "16"]);
    let m = model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let hostile = Hostile::connect(&node).await;
        let mut stream = hostile
            .open(&m, (0, 2), 64)
            .await
            .expect("the session opens");
        match step(&mut stream, &m, 0, 17).await.kind {
            Some(server_frame::Kind::Error(e)) => {
                assert_eq!(
                    ErrorCode::from_wire(e.code),
                    ErrorCode::StepTooLarge,
                    "{e:?}"
                );
                assert_eq!(ErrorCode::StepTooLarge.action(), proto::ErrorAction::Split);
                assert!(e.message.contains("bound of 16 rows"), "{}", e.message);
            }
            other => panic!("a 17-row step was not refused: {other:?}"),
        }
        for (pos, rows) in [(0, 16), (16, 1)] {
            match step(&mut stream, &m, pos, rows).await.kind {
                Some(server_frame::Kind::Result(r)) => {
                    let shape = r.hidden.map(|t| t.shape).unwrap_or_default();
                    assert_eq!(shape, [rows as u64, m.dim as u64]);
                }
                other => panic!("{rows} rows at {pos} not computed: {other:?}"),
            }
        }
        drop(stream);
        hostile.stop().await;
    });
}
