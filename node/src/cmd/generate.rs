use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use coordinator::generate::{self, tokenize, GenerateOptions, LocalForward, SamplingOptions};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    pub local: bool,
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
    if !args.local {
        bail!("generation through a swarm is not available in this version yet; pass --local");
    }
    let sampling = args.sampling.options()?;
    super::init_threads(args.threads)?;
    let model = super::open_local(&args.model)?;
    let prompt = tokenize::prompt_ids(
        &model.tokenizer,
        model.chat_template.as_ref(),
        &args.prompt,
        args.chat,
    )?;
    let context = model.spec().context_length;
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens but the model's context holds {context}",
            prompt.len()
        );
    }
    let capacity = (prompt.len() + args.max_new_tokens).min(context);
    let mut backend = LocalForward::new(&model, capacity)?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_at_eos: true,
    };
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let out = generate::generate(
        &mut backend,
        &model.tokenizer,
        prompt,
        context,
        &opts,
        &mut |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    if json {
        let mut v = serde_json::to_value(&out)?;
        v["prefill_tokens_per_s"] = out.prefill_tokens_per_s().into();
        v["decode_tokens_per_s"] = out.decode_tokens_per_s().into();
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
