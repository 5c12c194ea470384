//! The generation loop: prefill the prompt, then sample and feed back one token at a time,
//! streaming text as it becomes printable. The loop does not know where the blocks run; a
//! [`Backend`] does (one process now, a chain of peers in the swarm).

pub mod sample;
pub mod tokenize;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use model::tokenizer::{StreamDecoder, Tokenizer};
use model::{LocalModel, ModelError, SessionKv};

pub use sample::{log_prob, Sampler, SamplerCheckpoint, SamplingOptions};

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
    /// The backend found that its results from position `to` on were wrong (a peer caught by
    /// verification) and forgot them; [`generate`] runs its tokens again from there.
    #[error("results from position {to} on were wrong and must be computed again")]
    Rewind { to: usize },
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

    /// Positions `0..settled()` are final: their results will never be taken back by a
    /// [`GenerateError::Rewind`]. Generation shows text only for tokens sampled from final
    /// results. Everything is final unless the backend checks its results after the fact.
    fn settled(&self) -> usize {
        usize::MAX
    }

    /// Makes every position computed so far final (checks what is still unchecked), or
    /// answers [`GenerateError::Rewind`].
    fn settle(&mut self) -> impl std::future::Future<Output = Result<(), GenerateError>> + Send {
        async { Ok(()) }
    }
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
    /// A stop sequence ended the text.
    hit: bool,
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
            hit: false,
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
    let mut text = TextOut {
        decoder: StreamDecoder::default(),
        stops: StopFilter::new(&opts.stop),
        released: 0,
        on_text,
    };
    let mut history = out.prompt_tokens.clone();
    // The sampler's state before each generated token not yet released, oldest first: a
    // rollback samples again from the state it had there.
    let mut checkpoints: VecDeque<SamplerCheckpoint> = VecDeque::new();
    // The backend runs `history[run_from..]` at `run_from` next.
    let mut run_from = 0;
    let started = Instant::now();
    let mut decode_started = None;
    loop {
        let logits = match backend.logits(&history[run_from..], run_from).await {
            Ok(logits) => logits,
            Err(GenerateError::Rewind { to }) => {
                run_from = roll_back(
                    to,
                    &mut out,
                    &mut history,
                    &mut sampler,
                    &mut checkpoints,
                    &text,
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if decode_started.is_none() {
            out.prefill_time = started.elapsed();
            decode_started = Some(Instant::now());
        }
        if text.release(
            &mut out,
            tokenizer,
            opts,
            backend.settled(),
            &mut checkpoints,
        ) {
            break;
        }
        checkpoints.push_back(sampler.checkpoint());
        let id = sampler.sample(&logits, &history);
        out.tokens.push(id);
        out.logprobs.push(log_prob(&logits, id));
        history.push(id);
        run_from = history.len() - 1;
        if text.release(
            &mut out,
            tokenizer,
            opts,
            backend.settled(),
            &mut checkpoints,
        ) {
            break;
        }
        let end = if opts.stop_at_eos && tokenizer.is_end_of_generation(id) {
            Some(FinishReason::Stop)
        } else if out.tokens.len() >= opts.max_new_tokens || history.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        };
        let Some(end) = end else { continue };
        // The last tokens were sampled from results perhaps not checked yet: check them before
        // they count.
        match backend.settle().await {
            Ok(()) => {}
            Err(GenerateError::Rewind { to }) => {
                run_from = roll_back(
                    to,
                    &mut out,
                    &mut history,
                    &mut sampler,
                    &mut checkpoints,
                    &text,
                )?;
                continue;
            }
            Err(e) => return Err(e),
        }
        if !text.release(&mut out, tokenizer, opts, usize::MAX, &mut checkpoints) {
            out.finish_reason = end;
        }
        break;
    }
    out.decode_time = decode_started.map(|t| t.elapsed()).unwrap_or_default();
    if !text.stops.hit {
        text.finish(&mut out);
    }
    Ok(out)
}

/// Where generated text goes: decoded and filtered for stop sequences token by token, but only
/// for tokens whose results are final, so nothing shown is ever taken back.
struct TextOut<'a, 'b> {
    decoder: StreamDecoder,
    stops: StopFilter<'a>,
    /// Generated tokens given to the decoder so far.
    released: usize,
    on_text: &'b mut (dyn FnMut(&str) + Send),
}

impl TextOut<'_, '_> {
    fn emit(&mut self, out: &mut Generation, piece: &str) {
        if !piece.is_empty() {
            (self.on_text)(piece);
            out.text.push_str(piece);
        }
    }

    /// Shows the text of every generated token sampled from positions below `settled`. True
    /// when a stop sequence or an end-of-generation token ended the generation (tokens after
    /// it are dropped).
    fn release(
        &mut self,
        out: &mut Generation,
        tokenizer: &Tokenizer,
        opts: &GenerateOptions,
        settled: usize,
        checkpoints: &mut VecDeque<SamplerCheckpoint>,
    ) -> bool {
        // Token `g` sits at position `prompt + g` and was sampled from the results of the
        // positions before it.
        let prompt = out.prompt_tokens.len();
        let last = settled
            .checked_sub(prompt)
            .map_or(0, |g| g.saturating_add(1))
            .min(out.tokens.len());
        while self.released < last {
            let g = self.released;
            let id = out.tokens[g];
            self.released += 1;
            checkpoints.pop_front();
            if opts.stop_at_eos && tokenizer.is_end_of_generation(id) {
                out.tokens.truncate(g + 1);
                out.logprobs.truncate(g + 1);
                out.finish_reason = FinishReason::Stop;
                return true;
            }
            let piece = self.decoder.push(tokenizer, id);
            let (piece, hit) = self.stops.push(&piece);
            self.emit(out, &piece);
            if hit {
                out.tokens.truncate(g + 1);
                out.logprobs.truncate(g + 1);
                out.finish_reason = FinishReason::Stop;
                self.stops.hit = true;
                return true;
            }
        }
        false
    }

    /// Whatever the decoder and the stop filter still hold, once no more tokens will come.
    fn finish(&mut self, out: &mut Generation) {
        let piece = std::mem::take(&mut self.decoder).finish();
        let (piece, hit) = self.stops.push(&piece);
        self.emit(out, &piece);
        if hit {
            out.finish_reason = FinishReason::Stop;
        } else {
            let rest = self.stops.finish();
            self.emit(out, &rest);
        }
    }
}

/// Forgets every result from position `to` on: the tokens sampled from them go, the sampler
/// goes back to where it was before the first of them. Returns where the backend runs from.
fn roll_back(
    to: usize,
    out: &mut Generation,
    history: &mut Vec<u32>,
    sampler: &mut Sampler,
    checkpoints: &mut VecDeque<SamplerCheckpoint>,
    text: &TextOut<'_, '_>,
) -> Result<usize, GenerateError> {
    let prompt = out.prompt_tokens.len();
    // The token at position `to` was sampled from results before it: it stays.
    let keep = (to + 1).max(prompt).min(history.len());
    let generated = keep - prompt;
    if generated < text.released || to >= history.len() {
        return Err(GenerateError::Backend(
            format!("the backend rolled back to position {to}, before results it had called final")
                .into(),
        ));
    }
    if generated < out.tokens.len() {
        if let Some(at) = checkpoints.get(generated - text.released).cloned() {
            sampler.restore(at);
        }
        checkpoints.truncate(generated - text.released);
    }
    out.tokens.truncate(generated);
    out.logprobs.truncate(generated);
    history.truncate(keep);
    tracing::info!(
        position = to,
        "results rolled back; generating again from there"
    );
    Ok(to)
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
