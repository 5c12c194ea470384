//! The generation loop: prefill the prompt, then sample and feed back one token at a time,
//! streaming text as it becomes printable. The loop does not know where the blocks run; a
//! [`Backend`] does (one process now, a chain of peers in the swarm).

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
    /// A [`Backend`] outside this crate failed (the in-process compute thread of
    /// `serve-api --local`, say).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// Where the blocks run, seen from generation: given token ids at positions `pos..`, the
/// logits after the last of them. One process ([`LocalBackend`]) or a chain of peers
/// ([`crate::SwarmBackend`]); wrappers (prefix reuse, metering) implement it too.
pub trait Backend {
    fn logits(
        &mut self,
        ids: &[u32],
        pos: usize,
    ) -> impl std::future::Future<Output = Result<Vec<f32>, GenerateError>> + Send;
}

/// Every block in this process, with one KV cache.
pub struct LocalBackend<'a> {
    model: &'a LocalModel,
    kv: SessionKv,
}

impl<'a> LocalBackend<'a> {
    pub fn new(model: &'a LocalModel, capacity: usize) -> Result<Self, GenerateError> {
        Ok(Self {
            kv: model.new_cache(capacity)?,
            model,
        })
    }
}

impl Backend for LocalBackend<'_> {
    /// Computes in place: the local engine is the only work of its caller's thread. A position
    /// inside the cache rolls it back, as swarm nodes do, so a caller can re-run from any point
    /// (a chat that reuses the conversation's common prefix).
    async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        self.kv.truncate(pos);
        Ok(self.model.forward(ids, &mut self.kv, pos)?)
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Stop at the tokenizer's end-of-generation tokens (EOS, `<|im_end|>`, ...).
    pub stop_at_eos: bool,
    /// Stop as soon as the text contains one of these; the text ends before it. Text that
    /// might be the start of one is held back until it is decided, so a streaming reader
    /// never sees part of a stop sequence.
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` reached or the context is full.
    Length,
    /// The model produced an end-of-generation token or the text reached a stop sequence.
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

/// Finds stop sequences in streamed text, holding back any tail that could begin one.
struct StopFilter<'a> {
    stops: Vec<&'a str>,
    held: String,
}

impl<'a> StopFilter<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops: stops
                .iter()
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text now safe to show and whether a stop sequence was hit
    /// (the returned text then ends right before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// Whatever was held back, once no more text will come.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
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
pub async fn generate<F: Backend>(
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
    let mut stops = StopFilter::new(&opts.stop);
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
    let mut emit = |out: &mut Generation, text: &str| {
        if !text.is_empty() {
            on_text(text);
            out.text.push_str(text);
        }
    };
    let started = Instant::now();
    let mut logits = backend.logits(&out.prompt_tokens, 0).await?;
    out.prefill_time = started.elapsed();
    let decode_started = Instant::now();
    let mut stopped = false;
    loop {
        let id = sampler.sample(&logits, &history);
        out.tokens.push(id);
        out.logprobs.push(log_prob(&logits, id));
        history.push(id);
        if opts.stop_at_eos && tokenizer.is_end_of_generation(id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        let (text, hit) = stops.push(&decoder.push(tokenizer, id));
        emit(&mut out, &text);
        if hit {
            out.finish_reason = FinishReason::Stop;
            stopped = true;
            break;
        }
        if out.tokens.len() >= opts.max_new_tokens || history.len() >= context {
            break;
        }
        logits = backend.logits(&[id], history.len() - 1).await?;
    }
    out.decode_time = decode_started.elapsed();
    if !stopped {
        let (text, hit) = stops.push(&decoder.finish());
        emit(&mut out, &text);
        if hit {
            out.finish_reason = FinishReason::Stop;
        } else {
            emit(&mut out, &stops.finish());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    /// Feeds pieces one by one; returns what a streaming reader saw and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut seen = String::new();
        for p in pieces {
            let (text, hit) = f.push(p);
            seen.push_str(&text);
            if hit {
                return (seen, true);
            }
        }
        seen.push_str(&f.finish());
        (seen, false)
    }

    #[test]
    fn stop_sequence_split_over_pieces_is_never_shown() {
        assert_eq!(run(&["\n\n"], &["a", "b\n", "\nc"]), ("ab".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "Dy"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_start_a_stop() {
        let stops = vec!["END".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("aE"), ("a".into(), false));
        assert_eq!(f.push("x"), ("Ex".into(), false));
        assert_eq!(f.push("EN"), ("".into(), false));
        assert_eq!(f.finish(), "EN");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_empty_stops_are_ignored() {
        assert_eq!(run(&["", "cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&[""], &["ab", "c"]), ("abc".into(), false));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        assert_eq!(run(&["éz"], &["aé", "é", "b"]), ("aééb".into(), false));
        assert_eq!(run(&["éz"], &["aé", "z"]), ("a".into(), true));
    }
}
