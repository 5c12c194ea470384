//! Generate text through a running swarm with the client library.
//!
//! ```sh
//! cargo run --release -p coordinator --example generate -- \
//!     /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID models/SmolLM2-135M-Instruct.Q4_1.gguf "Why is the sky blue?"
//! ```
//! (start a swarm first, e.g. with `bash scripts/demo.sh`, or `edge-node bootstrap` and
//! `edge-node join` as in the README).

use std::io::Write;

use coordinator::generate::{generate, tokenize, GenerateOptions, SamplingOptions};
use coordinator::{ClientConfig, ClientModel, SwarmBackend, SwarmClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(bootstrap), Some(model_path)) = (args.next(), args.next()) else {
        eprintln!("usage: generate BOOTSTRAP_MULTIADDR MODEL.gguf [PROMPT]");
        std::process::exit(2);
    };
    let prompt = args.next().unwrap_or_else(|| "Why is the sky blue?".into());

    // The client keeps only the embeddings, the final norm, the LM head and the tokenizer.
    let model = ClientModel::open(&model_path, &mut |_, _| {})?;
    let client = SwarmClient::connect(ClientConfig {
        bootstrap: vec![bootstrap.parse()?],
        ..ClientConfig::default()
    })
    .await?;

    let ids = tokenize::prompt_ids(
        &model.tokenizer,
        model.chat_template.as_ref(),
        &prompt,
        true,
    )?;
    let max_new_tokens = 64;
    let session = client
        .open_session(&model, (ids.len() + max_new_tokens) as u32)
        .await?;
    println!("route: {:?}", session.route());

    let opts = GenerateOptions {
        max_new_tokens,
        sampling: SamplingOptions {
            temperature: 0.7,
            seed: 1,
            ..SamplingOptions::default()
        },
        stop_at_eos: true,
        stop: Vec::new(),
    };
    let mut backend = SwarmBackend {
        model: &model,
        session,
    };
    // Tokens stream into the callback as soon as they form printable text.
    let out = generate(
        &mut backend,
        &model.tokenizer,
        ids,
        model.spec.context_length,
        &opts,
        &mut |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        },
    )
    .await?;
    println!(
        "\n{} tokens at {:.1} tokens/s",
        out.tokens.len(),
        out.decode_tokens_per_s()
    );
    backend.session.close().await;
    client.close().await;
    Ok(())
}
