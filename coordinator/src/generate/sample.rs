//! Turning logits into the next token: greedy, or temperature sampling with top-k, top-p and a
//! repetition penalty, seeded so the same seed gives the same text.

use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingOptions {
    /// 0 (or less) means greedy: always the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0 = off).
    pub top_p: f32,
    /// Divide positive / multiply negative logits of recently seen tokens (1.0 = off).
    pub repetition_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A [`Sampler`]'s state at one point of a generation.
#[derive(Clone, Debug)]
pub struct SamplerCheckpoint(rand::rngs::StdRng);

pub struct Sampler {
    opts: SamplingOptions,
    rng: rand::rngs::StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(opts.seed),
            opts,
            scratch: Vec::new(),
        }
    }

    /// The random state before the next draw: restoring it makes the sampler draw again what
    /// it drew from here (a generation rolled back by a caught peer samples the same way).
    pub fn checkpoint(&self) -> SamplerCheckpoint {
        SamplerCheckpoint(self.rng.clone())
    }

    pub fn restore(&mut self, at: SamplerCheckpoint) {
        self.rng = at.0;
    }

    /// Picks the next token. `history` is every token so far (prompt included), for the penalty.
    /// Follows llama.cpp's chain order: penalty, top-k, top-p, temperature, draw.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let o = &self.opts;
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if o.repetition_penalty != 1.0 && o.repetition_penalty > 0.0 {
            let recent = &history[history.len().saturating_sub(o.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &id in recent {
                if let Some(entry) = c.get_mut(id as usize) {
                    if seen.insert(id) {
                        entry.1 = if entry.1 > 0.0 {
                            entry.1 / o.repetition_penalty
                        } else {
                            entry.1 * o.repetition_penalty
                        };
                    }
                }
            }
        }
        if o.is_greedy() {
            return argmax(c.iter().map(|&(_, l)| l));
        }
        // Sorting 49k candidates per token is avoidable: partial selection first.
        let keep = if o.top_k > 0 {
            o.top_k.min(c.len())
        } else {
            c.len()
        };
        if keep < c.len() {
            c.select_nth_unstable_by(keep - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(keep);
        }
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Probabilities at temperature 1 decide top-p (llama.cpp applies temperature last).
        let probs = softmax(c.iter().map(|&(_, l)| l));
        if o.top_p < 1.0 {
            let mut cum = 0.0;
            let mut n = 0;
            for p in &probs {
                cum += p;
                n += 1;
                if cum >= o.top_p as f64 {
                    break;
                }
            }
            c.truncate(n.max(1));
        }
        let probs = softmax(c.iter().map(|&(_, l)| l / o.temperature));
        let r: f64 = self.rng.random();
        let mut cum = 0.0;
        for (&(id, _), p) in c.iter().zip(&probs) {
            cum += p;
            if r < cum {
                return id;
            }
        }
        c.last().map_or(0, |&(id, _)| id)
    }
}

/// Index of the largest value; the first one on ties, so greedy output is unambiguous.
pub fn argmax(values: impl Iterator<Item = f32>) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best.0
}

fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.map(|l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `log softmax(logits)[id]` over the whole vocabulary, before any sampling filter.
pub fn log_prob(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 101) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let l = logits();
        let best = argmax(l.iter().copied());
        assert_eq!(
            Sampler::new(SamplingOptions::greedy()).sample(&l, &[]),
            best
        );
        assert_eq!(l[best as usize], l.iter().copied().fold(f32::MIN, f32::max));
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let l: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |o: SamplingOptions| {
            let mut s = Sampler::new(o);
            (0..32).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(opts.clone()), draw(opts.clone()));
        assert_ne!(
            draw(opts.clone()),
            draw(SamplingOptions { seed: 8, ..opts })
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let l = logits();
        let best = argmax(l.iter().copied());
        let mut s = Sampler::new(SamplingOptions {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&l, &[]) == best));
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&l, &[]) == best));
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_repeated_token() {
        let mut l = vec![0.0f32; 10];
        l[3] = 2.0;
        l[5] = 1.5;
        let mut s = Sampler::new(SamplingOptions {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[3]), 5);
        assert_eq!(s.sample(&l, &[]), 3);
    }

    #[test]
    fn log_prob_is_normalised() {
        let l = logits();
        let total: f64 = (0..l.len() as u32)
            .map(|i| (log_prob(&l, i) as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert_eq!(log_prob(&l, 1000), f32::NEG_INFINITY);
    }
}
