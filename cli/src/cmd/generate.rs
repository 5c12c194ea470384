use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use coordinator::generate::{self, tokenize, GenerateOptions, LocalBackend, SamplingOptions};
use coordinator::session::RouteHop;
use coordinator::{SwarmBackend, SwarmClient};

use super::client::{log_route, open_client_model, print_text, RouteArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    /// Path to a GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print only one JSON object on stdout, at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Penalty for recently generated tokens (1.0 = none).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> anyhow::Result<SamplingOptions> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature must be 0 or more, got {}", self.temperature);
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            bail!(
                "--repeat-penalty must be positive, got {}",
                self.repeat_penalty
            );
        }
        Ok(SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingOptions::default()
        })
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.options()?;
    args.route.check()?;
    super::init_threads(args.threads)?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_at_eos: true,
        stop: Vec::new(),
    };
    let rt = super::runtime()?;
    let (out, route) = if args.route.local {
        let model = super::open_local(&args.model)?;
        let prompt = prompt_ids(
            &model.tokenizer,
            model.chat_template.as_ref(),
            &args,
            model.spec().context_length,
        )?;
        let capacity = (prompt.len() + args.max_new_tokens).min(model.spec().context_length);
        let mut backend = LocalBackend::new(&model, capacity)?;
        let mut sink = text_sink(args.json);
        let context = model.spec().context_length;
        let out = rt.block_on(generate::generate(
            &mut backend,
            &model.tokenizer,
            prompt,
            context,
            &opts,
            &mut sink,
        ))?;
        (out, None)
    } else {
        rt.block_on(swarm_generate(&args, &opts))?
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::to_value(&out)?;
        v["prefill_tokens_per_s"] = out.prefill_tokens_per_s().into();
        v["decode_tokens_per_s"] = out.decode_tokens_per_s().into();
        if let Some(info) = route {
            v["route"] = serde_json::to_value(info.route)?;
            v["reroutes"] = info.reroutes.into();
            v["caught"] = serde_json::to_value(info.caught)?;
            v["pushed_spans"] = info.hops.0.into();
            v["relayed_spans"] = info.hops.1.into();
        }
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else {
        writeln!(stdout)?;
        tracing::info!(
            prompt_tokens = out.prompt_tokens.len(),
            generated = out.tokens.len(),
            prefill_tok_s = format!("{:.1}", out.prefill_tokens_per_s()),
            decode_tok_s = format!("{:.1}", out.decode_tokens_per_s()),
            "done"
        );
    }
    Ok(())
}

/// Streams text to stdout as it is generated, unless only JSON is wanted.
fn text_sink(json: bool) -> impl FnMut(&str) + Send {
    move |piece: &str| {
        if !json {
            print_text(piece);
        }
    }
}

fn prompt_ids(
    tokenizer: &model::tokenizer::Tokenizer,
    template: Option<&model::chat::ChatTemplate>,
    args: &GenerateArgs,
    context: usize,
) -> anyhow::Result<Vec<u32>> {
    let prompt = tokenize::prompt_ids(tokenizer, template, &args.prompt, args.chat)?;
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens but the model's context holds {context}",
            prompt.len()
        );
    }
    Ok(prompt)
}

async fn swarm_generate(
    args: &GenerateArgs,
    opts: &GenerateOptions,
) -> anyhow::Result<(generate::Generation, Option<SwarmInfo>)> {
    let model = open_client_model(&args.model)?;
    let context = model.spec.context_length;
    let prompt = prompt_ids(
        &model.tokenizer,
        model.chat_template.as_ref(),
        args,
        context,
    )?;
    let client = SwarmClient::connect(args.route.client_config()?).await?;
    let max_length = (prompt.len() + args.max_new_tokens).min(context) as u32;
    let session = client.open_session(&model, max_length).await?;
    log_route("route", &session.route());
    let mut backend = SwarmBackend {
        model: &model,
        session,
    };
    let mut sink = text_sink(args.json);
    let run = generate::generate(
        &mut backend,
        &model.tokenizer,
        prompt,
        context,
        opts,
        &mut sink,
    );
    let out = args.route.bounded(run).await;
    let route = backend.session.route();
    let reroutes = backend.session.reroutes();
    let hops = backend.session.hops();
    let caught = backend
        .session
        .caught()
        .iter()
        .map(|p| p.to_string())
        .collect();
    if reroutes > 0 {
        log_route(&format!("final route after {reroutes} reroute(s)"), &route);
    }
    backend.session.close().await;
    client.close().await;
    Ok((
        out?,
        Some(SwarmInfo {
            route,
            reroutes,
            caught,
            hops,
        }),
    ))
}

/// What a swarm run adds to the JSON output.
struct SwarmInfo {
    route: Vec<RouteHop>,
    reroutes: usize,
    /// Peers caught returning wrong outputs (verification on).
    caught: Vec<String>,
    /// Span steps pushed node to node, and span steps the client relayed.
    hops: (usize, usize),
}
