//! The generation loop: prefill the prompt, then sample and feed back one token at a time,
//! streaming text as it becomes printable. The loop does not know where the blocks run; a
//! [`Forward`] backend does (one process now, a chain of peers in the swarm).

pub mod sample;
pub mod tokenize;

use std::time::{Duration, Instant};

use model::tokenizer::{StreamDecoder, Tokenizer};
use model::{LocalModel, ModelError, SessionKv};

pub use sample::{log_prob, Sampler, SamplingOptions};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the prompt is empty: there is nothing to continue")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the model's context holds {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error(transparent)]
    Route(#[from] crate::session::RouteError),
}

/// Runs token ids at positions `pos..` through every block and returns the last logits.
pub trait Forward {
    fn forward(
        &mut self,
        ids: &[u32],
        pos: usize,
    ) -> impl std::future::Future<Output = Result<Vec<f32>, GenerateError>> + Send;
}

/// Every block in this process, with one KV cache.
pub struct LocalForward<'a> {
    model: &'a LocalModel,
    kv: SessionKv,
}

impl<'a> LocalForward<'a> {
    pub fn new(model: &'a LocalModel, capacity: usize) -> Result<Self, GenerateError> {
        Ok(Self {
            kv: model.new_cache(capacity)?,
            model,
        })
    }
}

impl Forward for LocalForward<'_> {
    /// Computes in place: the local engine is the only work of its caller's thread.
    async fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        Ok(self.model.forward(ids, &mut self.kv, pos)?)
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Stop at the tokenizer's end-of-generation tokens (EOS, `<|im_end|>`, ...).
    pub stop_at_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` reached or the context is full.
    Length,
    /// The model produced an end-of-generation token.
    Stop,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated ids, an end-of-generation token included when it ended the run.
    pub tokens: Vec<u32>,
    /// `log softmax` of each generated token over the whole vocabulary, before sampling filters.
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip)]
    pub prefill_time: Duration,
    #[serde(skip)]
    pub decode_time: Duration,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens.len(), self.prefill_time)
    }

    /// Tokens produced by one-token decode steps (all but the first) per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.tokens.len().saturating_sub(1), self.decode_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if n == 0 || t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt`, calling `on_text` with each
/// printable piece as soon as it is complete UTF-8.
pub async fn generate<F: Forward>(
    backend: &mut F,
    tokenizer: &Tokenizer,
    prompt: Vec<u32>,
    context: usize,
    opts: &GenerateOptions,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut decoder = StreamDecoder::default();
    let mut history = prompt.clone();
    let mut out = Generation {
        prompt_tokens: prompt,
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
    };
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let started = Instant::now();
    let mut logits = backend.forward(&out.prompt_tokens, 0).await?;
    out.prefill_time = started.elapsed();
    let decode_started = Instant::now();
    loop {
        let id = sampler.sample(&logits, &history);
        out.tokens.push(id);
        out.logprobs.push(log_prob(&logits, id));
        history.push(id);
        if opts.stop_at_eos && tokenizer.is_end_of_generation(id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        let piece = decoder.push(tokenizer, id);
        if !piece.is_empty() {
            on_text(&piece);
            out.text.push_str(&piece);
        }
        if out.tokens.len() >= opts.max_new_tokens || history.len() >= context {
            break;
        }
        logits = backend.forward(&[id], history.len() - 1).await?;
    }
    out.decode_time = decode_started.elapsed();
    let rest = decoder.finish();
    if !rest.is_empty() {
        on_text(&rest);
        out.text.push_str(&rest);
    }
    Ok(out)
}
