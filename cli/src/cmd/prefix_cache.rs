//! Reusing a session's KV cache across generations that share a beginning (the turns of a chat).
//!
//! Both backends accept a step at a position inside what they already hold and roll their cache
//! back to it: a swarm peer truncates its session's cache (`node/src/compute.rs`) and the client
//! truncates each span's kept history (`InferenceSession::run_blocks`); `LocalBackend` does the
//! same in this process. [`PrefixReuse`] remembers the ids fed so far and, when a generation
//! starts again from position 0, runs only what follows the common prefix. Blocks compute the
//! same bits whether positions arrive one by one or in one batch, so the logits are exactly
//! those of a fresh prefill.

use coordinator::generate::{Backend, GenerateError};

/// A [`Backend`] that skips the ids its backend already holds.
pub struct PrefixReuse<F> {
    inner: F,
    /// Ids whose keys and values the backend holds, position by position.
    fed: Vec<u32>,
    /// Positions served from the cache instead of being run again, over the whole session.
    pub reused: usize,
}

impl<F: Backend + Send> PrefixReuse<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            fed: Vec::new(),
            reused: 0,
        }
    }

    #[cfg(test)]
    pub fn inner(&self) -> &F {
        &self.inner
    }

    pub fn into_inner(self) -> F {
        self.inner
    }

    /// Positions the backend holds.
    pub fn cached(&self) -> usize {
        self.fed.len()
    }

    /// Runs the last cached position again (a one-token step that leaves the cache as it was),
    /// so that a peer does not close the session for being idle. With nothing cached yet it
    /// caches `first` at position 0: best a token that the next prompt starts with.
    pub async fn touch(&mut self, first: u32) -> Result<(), GenerateError> {
        let last = self.fed.last().copied().unwrap_or(first);
        let pos = self.fed.len().saturating_sub(1);
        self.fed.truncate(pos);
        self.inner.logits(&[last], pos).await?;
        self.fed.push(last);
        Ok(())
    }
}

impl<F: Backend + Send> Backend for PrefixReuse<F> {
    async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        let held = self.fed.get(pos..).unwrap_or_default();
        // Keep at least one id to run: its logits are the result.
        let skip = held
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        let start = (pos + skip).min(self.fed.len());
        // Until the step succeeds, only what precedes it is known to be in the backend (also if
        // this future is dropped half-way).
        self.fed.truncate(start);
        let logits = self
            .inner
            .logits(&ids[skip..], pos + skip)
            .await
            .map_err(|e| self.forget_rewound(e))?;
        self.fed.extend_from_slice(&ids[skip..]);
        self.reused += skip;
        if skip > 0 {
            tracing::debug!(reused = skip, ran = ids.len() - skip, "prefix cache");
        }
        Ok(logits)
    }

    fn settled(&self) -> usize {
        self.inner.settled()
    }

    async fn settle(&mut self) -> Result<(), GenerateError> {
        self.inner
            .settle()
            .await
            .map_err(|e| self.forget_rewound(e))
    }
}

impl<F> PrefixReuse<F> {
    /// A backend that rolled back no longer holds what it held from there on.
    fn forget_rewound(&mut self, e: GenerateError) -> GenerateError {
        if let GenerateError::Rewind { to } = e {
            self.fed.truncate(to);
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::generate::LocalBackend;
    use model::LocalModel;

    /// Records each step; logits say how many positions the "cache" holds after it.
    #[derive(Default)]
    struct Recorder {
        steps: Vec<(Vec<u32>, usize)>,
        len: usize,
    }

    impl Backend for Recorder {
        async fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
            assert!(
                pos <= self.len,
                "step at {pos} past the cache ({})",
                self.len
            );
            self.steps.push((ids.to_vec(), pos));
            self.len = pos + ids.len();
            Ok(vec![self.len as f32])
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_second_turn_runs_only_what_follows_the_common_prefix() {
        block_on(async {
            let mut f = PrefixReuse::new(Recorder::default());
            // Turn 1: prompt, then two decoded tokens (the last sampled one is never fed).
            f.logits(&[1, 2, 3], 0).await.unwrap();
            f.logits(&[7], 3).await.unwrap();
            f.logits(&[8], 4).await.unwrap();
            assert_eq!(f.cached(), 5);
            // Turn 2 re-renders the conversation; it agrees with the cache up to position 4.
            let logits = f.logits(&[1, 2, 3, 7, 9, 10], 0).await.unwrap();
            assert_eq!(logits, [6.0]);
            assert_eq!(f.inner().steps.last().unwrap(), &(vec![9, 10], 4));
            assert_eq!(f.reused, 4);
            assert_eq!(f.cached(), 6);
            // A prompt the cache holds entirely still runs its last id, for its logits.
            f.logits(&[1, 2, 3], 0).await.unwrap();
            assert_eq!(f.inner().steps.last().unwrap(), &(vec![3], 2));
            assert_eq!(f.cached(), 3);
            // Nothing in common: everything runs from 0.
            f.logits(&[5, 6], 0).await.unwrap();
            assert_eq!(f.inner().steps.last().unwrap(), &(vec![5, 6], 0));
        });
    }

    #[test]
    fn touch_repeats_the_last_position() {
        block_on(async {
            let mut f = PrefixReuse::new(Recorder::default());
            f.touch(1).await.unwrap();
            assert_eq!(f.inner().steps, [(vec![1], 0)]);
            assert_eq!(f.cached(), 1);
            // The first prompt starts with that token: it is not run again.
            f.logits(&[1, 2, 3], 0).await.unwrap();
            assert_eq!(f.inner().steps.last().unwrap(), &(vec![2, 3], 1));
            f.touch(1).await.unwrap();
            assert_eq!(f.inner().steps.last().unwrap(), &(vec![3], 2));
            assert_eq!(f.cached(), 3);
        });
    }

    #[test]
    fn the_local_cache_rolls_back_to_the_same_logits() {
        let dir = std::env::temp_dir().join(format!("edge-node-prefix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        model::synthetic::SyntheticModel::default()
            .write(&path)
            .unwrap();
        let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        block_on(async {
            let fresh = LocalBackend::new(&model, 16)
                .unwrap()
                .logits(&[3, 4, 5, 9], 0)
                .await
                .unwrap();
            let mut f = PrefixReuse::new(LocalBackend::new(&model, 16).unwrap());
            f.logits(&[3, 4, 5, 6, 7], 0).await.unwrap();
            let reused = f.logits(&[3, 4, 5, 9], 0).await.unwrap();
            assert_eq!(f.reused, 3);
            assert_eq!(reused, fresh);
        });
    }
}
