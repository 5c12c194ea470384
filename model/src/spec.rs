//! The model's shape, read from GGUF metadata into a typed struct that fails early.
//!
//! Every other part of the crate trusts these numbers, so they are all checked here: a missing
//! key, an unsupported architecture or an inconsistent head layout is reported by name before a
//! single weight is touched.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Architectures whose tensors follow the Llama layout (RMSNorm, RoPE, GQA, SwiGLU, no biases).
const LLAMA_FAMILY: &[&str] = &["llama", "mistral"];

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub architecture: String,
    pub name: Option<String>,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rope_freq_base: f32,
    pub rope_dim: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// True when the file has no `output.weight`, so the LM head reuses the token embedding.
    pub tied_embeddings: bool,
}

impl ModelSpec {
    pub fn from_file(file: &GgufFile) -> Result<Self> {
        let mut spec = Self::try_from(file.metadata())?;
        spec.tied_embeddings = !file.has_tensor("output.weight");
        let embd = file.tensor("token_embd.weight")?;
        match embd.dims.as_slice() {
            [vocab, dim] if *dim == spec.embedding_length => spec.vocab_size = *vocab,
            dims => {
                return Err(ModelError::BadTensor {
                    name: "token_embd.weight".into(),
                    reason: format!(
                        "shape {dims:?} does not match embedding length {}",
                        spec.embedding_length
                    ),
                })
            }
        }
        Ok(spec)
    }

    pub fn q_dim(&self) -> usize {
        self.head_count * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.head_count_kv * self.head_dim
    }

    /// Bytes of KV cache one token occupies in one block (keys and values, f16).
    pub fn kv_bytes_per_token_per_block(&self) -> usize {
        2 * self.kv_dim() * 2
    }
}

impl TryFrom<&HashMap<String, Value>> for ModelSpec {
    type Error = ModelError;

    fn try_from(md: &HashMap<String, Value>) -> Result<Self> {
        let architecture = get_string(md, "general.architecture")?;
        if !LLAMA_FAMILY.contains(&architecture.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(architecture));
        }
        let arch = architecture.as_str();
        let key = |k: &str| format!("{arch}.{k}");

        let embedding_length = get_usize(md, &key("embedding_length"))?;
        let head_count = get_usize(md, &key("attention.head_count"))?;
        let head_count_kv = match md.get(&key("attention.head_count_kv")) {
            Some(_) => get_usize(md, &key("attention.head_count_kv"))?,
            None => head_count,
        };
        let bad = |k: &str, reason: String| ModelError::BadKey {
            key: key(k),
            reason,
        };
        if head_count == 0 || embedding_length % head_count != 0 {
            return Err(bad(
                "attention.head_count",
                format!("{head_count} heads do not divide embedding length {embedding_length}"),
            ));
        }
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{head_count_kv} KV heads do not divide {head_count} heads"),
            ));
        }
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(_) => get_usize(md, &key("attention.key_length"))?,
            None => embedding_length / head_count,
        };
        let rope_dim = match md.get(&key("rope.dimension_count")) {
            Some(_) => get_usize(md, &key("rope.dimension_count"))?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dim} must be even and at most the head size {head_dim}"),
            ));
        }
        let rope_freq_base = match md.get(&key("rope.freq_base")) {
            Some(_) => get_f32(md, &key("rope.freq_base"))?,
            None => 10_000.0,
        };
        if !(rope_freq_base.is_finite() && rope_freq_base > 0.0) {
            return Err(bad(
                "rope.freq_base",
                format!("{rope_freq_base} is not positive"),
            ));
        }
        let rms_eps = get_f32(md, &key("attention.layer_norm_rms_epsilon"))?;
        let block_count = get_usize(md, &key("block_count"))?;
        if block_count == 0 {
            return Err(bad(
                "block_count",
                "a model needs at least one block".into(),
            ));
        }
        let vocab_size = match md.get(&key("vocab_size")) {
            Some(_) => get_usize(md, &key("vocab_size"))?,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => return Err(ModelError::MissingKey(key("vocab_size"))),
            },
        };
        let name = match md.get("general.name") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Self {
            name,
            block_count,
            embedding_length,
            feed_forward_length: get_usize(md, &key("feed_forward_length"))?,
            head_count,
            head_count_kv,
            head_dim,
            rope_freq_base,
            rope_dim,
            rms_eps,
            context_length: get_usize(md, &key("context_length"))?,
            vocab_size,
            tied_embeddings: false,
            architecture,
        })
    }
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| ModelError::MissingKey(key.to_string()))
}

fn get_string(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    match get(md, key)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(ModelError::BadKey {
            key: key.into(),
            reason: format!("expected a string, found {:?}", other.value_type()),
        }),
    }
}

fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = get(md, key)?;
    let n: Option<u64> = match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    // Anything this large is a corrupt header, not a model; refusing it keeps later
    // multiplications (cache sizes, tensor shapes) far from overflow.
    const LIMIT: u64 = 1 << 24;
    match n {
        Some(n) if n <= LIMIT => Ok(n as usize),
        _ => Err(ModelError::BadKey {
            key: key.into(),
            reason: format!("expected an integer in 0..={LIMIT}, found {v:?}"),
        }),
    }
}

fn get_f32(md: &HashMap<String, Value>, key: &str) -> Result<f32> {
    match get(md, key)? {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        other => Err(ModelError::BadKey {
            key: key.into(),
            reason: format!("expected a float, found {:?}", other.value_type()),
        }),
    }
}
