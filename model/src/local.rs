//! The whole model in one process: the golden reference every distributed run is checked
//! against, and the engine of `edge-node generate --local`.

use std::path::Path;

use crate::blocks::Hidden;
use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::SessionKv;
use crate::load::{load, LoadOptions, ModelSlice};
use crate::spec::ModelSpec;
use crate::tokenizer::Tokenizer;

pub struct LocalModel {
    pub slice: ModelSlice,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl LocalModel {
    pub fn open(path: impl AsRef<Path>, progress: &mut dyn FnMut(u64, u64)) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let spec = ModelSpec::from_file(&file)?;
        let slice = load(&file, &LoadOptions::full(&spec), progress)?;
        Ok(Self {
            tokenizer: Tokenizer::from_gguf(file.metadata())?,
            chat_template: ChatTemplate::from_gguf(file.metadata())?,
            slice,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.slice.spec
    }

    /// A cache for every block, able to hold `capacity` positions (at most the context length).
    pub fn new_cache(&self, capacity: usize) -> Result<SessionKv> {
        let ctx = self.spec().context_length;
        if capacity > ctx {
            return Err(ModelError::CacheFull {
                needed: capacity,
                capacity: ctx,
            });
        }
        let stack = self.slice.stack()?;
        Ok(stack.new_cache(stack.range(), capacity))
    }

    /// Runs `ids` at positions `pos..` through every block; returns the final hidden states.
    pub fn forward_hidden(&self, ids: &[u32], kv: &mut SessionKv, pos: usize) -> Result<Hidden> {
        let mut x = self.slice.embedding()?.embed(ids)?;
        self.slice.stack()?.forward(&mut x, kv, pos)?;
        Ok(x)
    }

    /// Logits of the last of `ids`.
    pub fn forward(&self, ids: &[u32], kv: &mut SessionKv, pos: usize) -> Result<Vec<f32>> {
        let x = self.forward_hidden(ids, kv, pos)?;
        self.slice.head()?.last_logits(&x)
    }
}
