//! `edge-node join --config FILE`: a node started from a TOML file serves what the file says.

use std::time::{Duration, Instant};

use super::swarm::{bootstrap, node, route_of, spawn, swarm_command};
use super::{assert_clean_error, default_model, edge_node, json_of, TempDir};

#[test]
fn a_node_serves_the_blocks_its_config_file_names() {
    let dir = TempDir::new("config");
    // A relative `model` and `health-file` are taken from the file's directory, not the cwd.
    std::os::unix::fs::symlink(default_model(), dir.file("model.gguf")).unwrap();
    let boot = bootstrap();
    let config = dir.file("edge-node.toml");
    std::fs::write(
        &config,
        format!(
            r#"# a node of the test swarm
model = "model.gguf"
blocks = "0..12"
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = ["{}"]
no-mdns = true
announce_interval = 2
threads = 1
health-file = "health"
"#,
            boot.addr
        ),
    )
    .unwrap();
    let from_file = spawn(&["join", "--config", config.to_str().unwrap()]);
    let _rest = node("12..30", &boot);

    let v = json_of(
        &swarm_command(&boot, "The capital of France is", "4")
            .output()
            .unwrap(),
    );
    assert_eq!(route_of(&v), ["0..12", "12..30"]);
    assert_eq!(
        from_file
            .serving
            .lock()
            .unwrap()
            .first()
            .map(String::as_str),
        Some("0..12")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.file("health").exists() {
        assert!(
            Instant::now() < deadline,
            "no health file next to the config file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_bad_config_file_is_one_line_naming_file_and_key() {
    let dir = TempDir::new("config-bad");
    let config = dir.file("node.toml");
    std::fs::write(&config, "model = \"m.gguf\"\nnum_block = 3\n").unwrap();
    let path = config.to_str().unwrap();
    assert_clean_error(
        &edge_node(&["join", "--config", path]),
        &format!("{path}: line 2: unknown key `num_block`"),
    );
    std::fs::write(&config, "model = \"m.gguf\"\nno-mdns = \"yes\"\n").unwrap();
    assert_clean_error(
        &edge_node(&["join", "--config", path]),
        "line 2: `no-mdns` must be true or false, not a string",
    );
}
