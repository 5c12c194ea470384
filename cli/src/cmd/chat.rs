//! `edge-node chat`: a conversation in the terminal, through the swarm or in this process.
//!
//! The conversation is a list of messages rendered with the model's own chat template each
//! turn. One session stays open for the whole chat, and [`PrefixReuse`] feeds it only what the
//! new rendering adds after what it already holds, so a turn costs its own tokens, not the
//! whole history again. The assistant's text streams to stdout; everything else (banner,
//! prompts, notices) goes to stderr, so `edge-node chat ... > reply.txt` keeps only the replies.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use coordinator::generate::{self, tokenize, Backend, FinishReason, GenerateOptions, LocalBackend};
use coordinator::{SwarmBackend, SwarmClient};
use model::chat::{ChatMessage, ChatTemplate};
use model::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use super::client::{open_client_model, print_text, route_text, RouteArgs};
use super::generate::SamplingArgs;
use super::prefix_cache::PrefixReuse;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    /// Path to a GGUF model file with a chat template.
    #[arg(long)]
    pub model: PathBuf,
    /// A system message that opens the conversation (and every one after /reset).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens in one reply.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Positions the session holds, the whole conversation included (at most the model's
    /// context).
    #[arg(long, default_value_t = 2048)]
    pub max_context: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Through a swarm, seconds between one-token steps that keep the session open while
    /// waiting for input (nodes close sessions silent for their --idle-timeout; 0 = never; at
    /// most a day).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=super::MAX_SECS))]
    pub keepalive: u64,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.options()?;
    args.route.check()?;
    if args.max_context < 2 {
        anyhow::bail!("--max-context must be at least 2");
    }
    super::init_threads(args.threads)?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_at_eos: true,
        stop: Vec::new(),
    };
    let rt = super::runtime()?;
    if args.route.local {
        let model = super::open_local(&args.model)?;
        let spec = model.spec();
        let capacity = args.max_context.min(spec.context_length);
        let chat = Chat {
            tokenizer: &model.tokenizer,
            template: template_of(model.chat_template.as_ref(), &args)?,
            capacity,
            system: args.system.clone(),
        };
        let mut backend = PrefixReuse::new(LocalBackend::new(&model, capacity)?);
        eprintln!(
            "{}: all {} blocks in this process, {capacity} positions",
            model_name(spec.name.as_deref(), &args),
            spec.block_count,
        );
        rt.block_on(chat.run(&mut backend, &opts, &args.route, None))
    } else {
        rt.block_on(async {
            let model = open_client_model(&args.model)?;
            let capacity = args.max_context.min(model.spec.context_length);
            let chat = Chat {
                tokenizer: &model.tokenizer,
                template: template_of(model.chat_template.as_ref(), &args)?,
                capacity,
                system: args.system.clone(),
            };
            let client = SwarmClient::connect(args.route.client_config()?).await?;
            let session = client.open_session(&model, capacity as u32).await?;
            eprintln!(
                "{}: {}, {capacity} positions",
                model_name(model.spec.name.as_deref(), &args),
                route_text(&session.route()),
            );
            let mut backend = PrefixReuse::new(SwarmBackend {
                model: &model,
                session,
            });
            let keepalive = Some(Duration::from_secs(args.keepalive)).filter(|d| !d.is_zero());
            let result = chat.run(&mut backend, &opts, &args.route, keepalive).await;
            let session = backend.into_inner().session;
            if session.reroutes() > 0 {
                tracing::info!(
                    "route after {} reroute(s): {}",
                    session.reroutes(),
                    route_text(&session.route())
                );
            }
            session.close().await;
            client.close().await;
            result
        })
    }
}

fn model_name(name: Option<&str>, args: &ChatArgs) -> String {
    name.map(str::to_string)
        .unwrap_or_else(|| args.model.display().to_string())
}

fn template_of<'a>(
    template: Option<&'a ChatTemplate>,
    args: &ChatArgs,
) -> anyhow::Result<&'a ChatTemplate> {
    template.ok_or_else(|| {
        anyhow!(
            "{} has no chat template (tokenizer.chat_template); use `edge-node generate` for plain text",
            args.model.display()
        )
    })
}

/// What a conversation needs besides the backend.
struct Chat<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    /// Positions the session holds.
    capacity: usize,
    system: Option<String>,
}

enum Input {
    Line(String),
    End,
}

impl Chat<'_> {
    fn opening(&self) -> Vec<ChatMessage> {
        self.system
            .iter()
            .map(|s| message("system", s.clone()))
            .collect()
    }

    /// The conversation as prompt ids, the assistant's turn open.
    fn prompt(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        Ok(tokenize::chat_ids(self.tokenizer, self.template, messages)?)
    }

    /// Reads lines until `/exit` or the end of input, answering each one.
    async fn run<F: Backend + Send>(
        &self,
        backend: &mut PrefixReuse<F>,
        opts: &GenerateOptions,
        route: &RouteArgs,
        keepalive: Option<Duration>,
    ) -> anyhow::Result<()> {
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!("/reset starts a new conversation, /exit or Ctrl-D quits");
        }
        let mut lines = stdin_lines();
        let mut messages = self.opening();
        // What a keepalive caches when nothing is yet: the token every prompt starts with.
        let first = self
            .prompt(&messages)
            .ok()
            .and_then(|p| p.first().copied())
            .unwrap_or(self.tokenizer.bos_id());
        loop {
            if interactive {
                eprint!("> ");
                let _ = std::io::stderr().flush();
            }
            let line = match next_line(&mut lines, backend, keepalive, first).await? {
                Input::Line(l) => l,
                Input::End => {
                    if interactive {
                        eprintln!();
                    }
                    return Ok(());
                }
            };
            let line = line.trim();
            match line {
                "" => continue,
                "/exit" | "/quit" => return Ok(()),
                "/reset" => {
                    messages = self.opening();
                    eprintln!("(new conversation)");
                    continue;
                }
                _ => {}
            }
            messages.push(message("user", line.to_string()));
            let prompt = match self.prompt(&messages) {
                Ok(p) => p,
                Err(e) => {
                    messages.pop();
                    eprintln!("cannot render this conversation: {e:#}");
                    continue;
                }
            };
            if prompt.len() >= self.capacity {
                messages.pop();
                eprintln!(
                    "the conversation would be {} tokens, more than this session holds ({}, \
                     --max-context); /reset starts a new one",
                    prompt.len(),
                    self.capacity
                );
                continue;
            }
            let prompt_len = prompt.len();
            let mut sink = print_text;
            let run = generate::generate(
                backend,
                self.tokenizer,
                prompt,
                self.capacity,
                opts,
                &mut sink,
            );
            let out = route.bounded(run).await?;
            print_text("\n");
            tracing::debug!(
                prompt = prompt_len,
                cached = backend.cached(),
                reused_total = backend.reused,
                generated = out.tokens.len(),
                "turn done"
            );
            let full = prompt_len + out.tokens.len() >= self.capacity;
            messages.push(message("assistant", out.text));
            if out.finish_reason == FinishReason::Length {
                if full {
                    eprintln!(
                        "(the conversation filled this session's {} positions; /reset starts a \
                         new one)",
                        self.capacity
                    );
                } else {
                    eprintln!("(reply cut at --max-new-tokens {})", opts.max_new_tokens);
                }
            }
        }
    }
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content,
    }
}

/// Lines of stdin, read on their own thread so that waiting for the user does not block the
/// runtime (and the session can be kept alive meanwhile).
fn stdin_lines() -> mpsc::UnboundedReceiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let failed = line.is_err();
            if tx.send(line).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// The next line of input; while there is none, touches the session every `keepalive`.
async fn next_line<F: Backend + Send>(
    lines: &mut mpsc::UnboundedReceiver<std::io::Result<String>>,
    backend: &mut PrefixReuse<F>,
    keepalive: Option<Duration>,
    first: u32,
) -> anyhow::Result<Input> {
    loop {
        let wait = keepalive.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            line = lines.recv() => {
                return match line {
                    Some(line) => Ok(Input::Line(line.context("reading stdin")?)),
                    None => Ok(Input::End),
                };
            }
            _ = tokio::time::sleep(wait), if keepalive.is_some() => {
                backend.touch(first).await.context("keeping the session open")?;
            }
        }
    }
}
