//! Server-to-server push with real processes on 127.0.0.1: hidden states go node to node, the
//! text is the local text, and a forward that cannot be made comes back to the client as a
//! clear reason next to the node's own output, never as a hang.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use model::{GgufFile, ModelSpec};
use proto::v1::{server_frame, ClientFrame, Dtype, Hop, OpenSession, ServerFrame, Step};
use proto::{encode_tensor, max_step_frame, read_frame, write_frame, MAX_OPEN_FRAME};
use serde_json::Value;
use swarm::{Host, NetConfig, INFERENCE_STREAM};
use tokio_util::sync::CancellationToken;

use node::Fault;

use super::swarm::{bootstrap, local, node, swarm_command, Proc};
use super::verification::Liar;
use super::{default_model, TempDir};

#[test]
fn three_nodes_pushing_node_to_node_give_the_local_tokens() {
    let boot = bootstrap();
    let _a = node("0..10", &boot);
    let _b = node("10..20", &boot);
    let _c = node("20..30", &boot);
    let prompt = "The capital of France is";
    let tokens = "24";
    let want = local(prompt, tokens)["tokens"].clone();

    let pushed: Value = super::json_of(&swarm_command(&boot, prompt, tokens).output().unwrap());
    assert_eq!(pushed["tokens"], want, "{pushed}");
    // The prompt and every generated token but the last went through all three spans by
    // push; the client relayed nothing.
    let steps = want.as_array().unwrap().len() as u64;
    assert_eq!(pushed["relayed_spans"], 0, "{pushed}");
    assert_eq!(pushed["pushed_spans"], 3 * steps, "{pushed}");

    let relayed: Value = super::json_of(
        &swarm_command(&boot, prompt, tokens)
            .arg("--no-push")
            .output()
            .unwrap(),
    );
    assert_eq!(relayed["tokens"], want, "{relayed}");
    assert_eq!(relayed["pushed_spans"], 0, "{relayed}");
}

/// A peer of its own that speaks the inference protocol to the nodes directly.
struct Raw {
    host: Host,
    shutdown: CancellationToken,
}

/// A session opened on a node: its stream and the token that node takes pushes with.
struct Opened {
    stream: libp2p::Stream,
    token: Vec<u8>,
}

impl Raw {
    async fn connect(nodes: &[&Proc]) -> Self {
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
        for n in nodes {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while n.serving.lock().unwrap().is_empty() {
                assert!(std::time::Instant::now() < deadline, "node never served");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let id: PeerId = n.peer_id().parse().unwrap();
            host.handle
                .dial(id, vec![n.addr.parse().unwrap()], Duration::from_secs(10))
                .await
                .expect("dial the node");
        }
        Self { host, shutdown }
    }

    async fn open(&self, node: &Proc, fp: &[u8], blocks: (u32, u32)) -> Opened {
        let id: PeerId = node.peer_id().parse().unwrap();
        let io = async {
            let mut stream = self
                .host
                .handle
                .stream_control()
                .open_stream(id, INFERENCE_STREAM)
                .await
                .expect("open a stream");
            let open = ClientFrame::open(OpenSession {
                fingerprint: fp.to_vec(),
                start_block: blocks.0,
                end_block: blocks.1,
                max_length: 64,
                wire_dtype: Dtype::F32 as i32,
            });
            write_frame(&mut stream, &open).await.unwrap();
            let reply: ServerFrame = read_frame(&mut stream, MAX_OPEN_FRAME)
                .await
                .unwrap()
                .expect("an answer");
            (stream, reply)
        };
        let (stream, reply) = tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("open answered within 10 s");
        let Some(server_frame::Kind::Opened(o)) = reply.kind else {
            panic!("open refused: {reply:?}");
        };
        assert_eq!(o.push_token.len(), proto::PUSH_TOKEN_LEN);
        Opened {
            stream,
            token: o.push_token,
        }
    }
}

/// Sends one row through `a` asking it to forward to `hop`; returns why the forward failed,
/// which the node says in its answer (a failure before it answered, such as no connection) or
/// in a report right after it (a refusal by the next node). The answer must carry a's output
/// all the same.
async fn forward_error(a: &mut Opened, dim: usize, step_id: u64, hop: Hop) -> String {
    let step = ClientFrame::step_of(Step {
        position: 0,
        hidden: Some(encode_tensor(&vec![0.25; dim], &[1, dim], Dtype::F32)),
        step_id,
        next: vec![hop],
        auto_wire: false,
        answer_rate: 0,
    });
    let max = max_step_frame(64, dim);
    let io = async {
        write_frame(&mut a.stream, &step).await.unwrap();
        let answer = read_frame::<_, ServerFrame>(&mut a.stream, max)
            .await
            .unwrap()
            .expect("an answer");
        let Some(server_frame::Kind::Result(r)) = answer.kind else {
            panic!("not a result: {answer:?}");
        };
        if !r.forward_error.is_empty() {
            return (r, None);
        }
        let report = read_frame::<_, ServerFrame>(&mut a.stream, max)
            .await
            .unwrap()
            .expect("a report of the failed forward");
        (r, Some(report))
    };
    // Bounded by the node's forward timeout (8 s) plus the step itself.
    let (r, report) = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .expect("the node answers despite the failed forward");
    assert_eq!(r.step_id, step_id);
    let t = r.hidden.expect("the node's own output");
    assert_eq!(t.shape, [1, dim as u64]);
    match report {
        None => r.forward_error,
        Some(ServerFrame {
            kind: Some(server_frame::Kind::ForwardFailed(f)),
        }) => {
            assert_eq!(f.step_id, step_id);
            f.reason
        }
        Some(other) => panic!("not a forward report: {other:?}"),
    }
}

#[test]
fn a_forward_to_an_unreachable_peer_or_to_the_wrong_blocks_comes_back_as_a_reason() {
    let boot = bootstrap();
    let a = node("0..10", &boot);
    let c = node("20..30", &boot);
    let file = GgufFile::open(default_model()).unwrap();
    let fp = model::fingerprint::fingerprint(&file).unwrap();
    let dim = ModelSpec::from_file(&file).unwrap().embedding_length;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let raw = Raw::connect(&[&a, &c]).await;
        let mut on_a = raw.open(&a, &fp, (0, 10)).await;
        let on_c = raw.open(&c, &fp, (20, 30)).await;

        // A peer nobody announced, at an address the client names: a plain TCP socket of this
        // test. The node must not dial it (a client could point nodes at any host and port),
        // only at addresses a peer announced itself in its signed DHT entry.
        let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        trap.set_nonblocking(true).unwrap();
        let trap_addr: Multiaddr =
            format!("/ip4/127.0.0.1/tcp/{}", trap.local_addr().unwrap().port())
                .parse()
                .unwrap();
        let nowhere = Hop {
            peer_id: PeerId::random().to_bytes(),
            addrs: vec![trap_addr.to_vec()],
            push_token: vec![9; proto::PUSH_TOKEN_LEN],
            start_block: 10,
            end_block: 20,
            answer_rate: 0,
        };
        let e = forward_error(&mut on_a, dim, 1, nowhere).await;
        match trap.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the node dialled the address the client named: {other:?}"),
        }
        assert!(
            e.contains("blocks 10..20") && e.contains("does not announce block 10"),
            "{e}"
        );

        // A real node and a real session, but it serves 20..30, not the 10..20 that follow a.
        let wrong = Hop {
            peer_id: c.peer_id().parse::<PeerId>().unwrap().to_bytes(),
            addrs: vec![c.addr.parse::<Multiaddr>().unwrap().to_vec()],
            push_token: on_c.token.clone(),
            start_block: 10,
            end_block: 20,
            answer_rate: 0,
        };
        let e = forward_error(&mut on_a, dim, 2, wrong).await;
        // Connected to c already (the usual case on one loopback swarm), a sends it the step
        // and c refuses it; not connected, a finds no entry of c's for block 10 and does not
        // dial. Either way the client hears why.
        assert!(
            (e.contains("serves blocks 20..30, not 10..20") && e.contains("BlocksNotServed"))
                || e.contains("does not announce block 10"),
            "{e}"
        );
        raw.shutdown.cancel();
        let _ = raw.host.task.await;
    });
}

/// The middle node takes no pushes (the test-only fault switch): the first node answers the
/// client, then reports that the middle node refused its forward, and the client relays the
/// rest itself. Without that report the client would wait for the middle node's answer until
/// its step timeout and then, with no other peer for 10..20, fail.
#[test]
fn a_forward_refused_after_the_answer_is_reported_and_the_client_relays_the_rest() {
    let dir = TempDir::new("refuse-pushes");
    let boot = bootstrap();
    let first = node("0..10", &boot);
    let last = node("20..30", &boot);
    first.wait_line("serving blocks ");
    last.wait_line("serving blocks ");
    let middle = Liar::serving(&boot, &dir, Fault::RefusePushes, 10..20);
    let prompt = "The capital of France is";
    let tokens = "8";
    let want = local(prompt, tokens)["tokens"].clone();
    let out = swarm_command(&boot, prompt, tokens)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = super::json_of(&out);
    assert_eq!(v["tokens"], want, "{stderr}");
    assert!(v["route"].to_string().contains(&middle.peer), "{v}");
    assert!(
        stderr.contains("push stopped at span 1") && stderr.contains("takes no pushed steps"),
        "the client never heard of the refused forward: {stderr}"
    );
    // Every step went to the first span by push and was relayed from there by the client.
    let steps = want.as_array().unwrap().len() as u64;
    assert_eq!(v["pushed_spans"], steps, "{v}");
    assert_eq!(v["relayed_spans"], 2 * steps, "{v}");
}
