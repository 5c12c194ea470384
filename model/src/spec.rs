//! The model's shape, read from GGUF metadata into a typed struct that fails early.
//!
//! Every other part of the crate trusts these numbers, so they are all checked here: a missing
//! key, an unsupported architecture or an inconsistent head layout is reported by name before a
//! single weight is touched.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Every architecture this crate runs, for error messages and `--help`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
];

/// The model families: each is data (which optional parts its block has and how its numbers
/// are scaled), read by the one decoder block in `blocks.rs`; nothing here is a copy of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama and Mistral: the plain pre-norm block.
    Llama,
    /// Qwen2/Qwen2.5: Q/K/V biases, NeoX RoPE.
    Qwen2,
    /// Qwen3: per-head RMSNorm of Q and K before RoPE, head size from `attention.key_length`.
    Qwen3,
    /// Gemma 2: scaled embeddings, four norms, GELU, attention and final soft-capping,
    /// sliding window on alternate layers.
    Gemma2,
    /// Gemma 3: as Gemma 2 with QK-norm instead of attention soft-capping, 5 local : 1 global
    /// layers with their own RoPE base.
    Gemma3,
    /// Phi-3: fused QKV and gate/up tensors, LongRoPE factors.
    Phi3,
}

impl Family {
    fn of(architecture: &str) -> Option<Self> {
        Some(match architecture {
            "llama" | "mistral" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma2" => Self::Gemma2,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: Llama as converted to GGUF.
    Normal,
    /// Halves `(i, i + dim/2)`: GPT-NeoX, Qwen, Gemma, Phi-3.
    Neox,
}

/// The gate nonlinearity of the gated feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU), through ggml's f16 GELU table.
    Gelu,
}

/// RoPE of one kind of layer (Gemma's local and global layers differ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub freq_base: f32,
    /// Linear position scaling, `1 / rope.scaling.factor`.
    pub freq_scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub architecture: String,
    pub family: Family,
    pub name: Option<String>,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rope_freq_base: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    /// RoPE of global (full-attention) layers.
    pub rope_global: RopeParams,
    /// RoPE of sliding-window layers.
    pub rope_local: RopeParams,
    /// `rope.scaling.attn_factor`: multiplies cos and sin (LongRoPE's magnitude correction).
    pub rope_attn_factor: f32,
    /// Context length the RoPE factors were trained for: LongRoPE uses its long factors for
    /// sessions longer than this, its short ones otherwise.
    pub rope_original_context: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// True when the file has no `output.weight`, so the LM head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Window of the sliding-window layers (a query sees itself and the `window - 1` positions
    /// before it); 0 when the model has none.
    pub sliding_window: usize,
    /// Per block: does it attend through the sliding window?
    pub sliding_layers: Vec<bool>,
    /// Multiplies the query before attention (Gemma, Phi-3) or, with
    /// `scale_query_first == false`, each score after the dot product (Llama, Qwen): the two
    /// round differently, and llama.cpp does each where the original model did.
    pub attention_scale: f32,
    pub scale_query_first: bool,
    /// `c * tanh(score / c)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `c * tanh(logit / c)` on the LM head's output (Gemma 2, optionally Gemma 3).
    pub final_softcap: Option<f32>,
    /// Multiplies token embeddings (Gemma: `sqrt(d)`).
    pub embedding_scale: Option<f32>,
    pub activation: Activation,
    /// Per-head RMSNorm of Q and K before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add (Gemma).
    pub post_norms: bool,
}

impl ModelSpec {
    pub fn from_file(file: &GgufFile) -> Result<Self> {
        let mut spec = Self::try_from(file.metadata())?;
        // llama.cpp's Gemma 2 always reads the head from the token embedding.
        spec.tied_embeddings = spec.family == Family::Gemma2 || !file.has_tensor("output.weight");
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

    /// Bytes of KV cache one token occupies in one full-attention block (keys and values, f16).
    pub fn kv_bytes_per_token_per_block(&self) -> usize {
        2 * self.kv_dim() * 2
    }

    /// Is block `index` a sliding-window layer?
    pub fn is_sliding(&self, index: usize) -> bool {
        self.sliding_layers.get(index).copied().unwrap_or(false)
    }
}

impl TryFrom<&HashMap<String, Value>> for ModelSpec {
    type Error = ModelError;

    fn try_from(md: &HashMap<String, Value>) -> Result<Self> {
        let architecture = get_string(md, "general.architecture")?;
        let family = Family::of(&architecture)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(architecture.clone()))?;
        let arch = architecture.as_str();
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match md.get(&key(k)) {
                Some(_) => get_usize(md, &key(k)).map(Some),
                None => Ok(None),
            }
        };
        let opt_f32 = |k: &str| -> Result<Option<f32>> {
            match md.get(&key(k)) {
                Some(_) => get_f32(md, &key(k)).map(Some),
                None => Ok(None),
            }
        };
        let bad = |k: &str, reason: String| ModelError::BadKey {
            key: key(k),
            reason,
        };

        let embedding_length = get_usize(md, &key("embedding_length"))?;
        let head_count = get_usize(md, &key("attention.head_count"))?;
        let head_count_kv = opt_usize("attention.head_count_kv")?.unwrap_or(head_count);
        if head_count == 0 {
            return Err(bad(
                "attention.head_count",
                "a model needs attention heads".into(),
            ));
        }
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{head_count_kv} KV heads do not divide {head_count} heads"),
            ));
        }
        let head_dim = match opt_usize("attention.key_length")? {
            Some(n) => n,
            None if embedding_length % head_count == 0 => embedding_length / head_count,
            None => {
                return Err(bad(
                    "attention.head_count",
                    format!("{head_count} heads do not divide embedding length {embedding_length}"),
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(
                "attention.key_length",
                format!("{head_dim} must be even and positive"),
            ));
        }
        if let Some(v) = opt_usize("attention.value_length")? {
            if v != head_dim {
                return Err(bad(
                    "attention.value_length",
                    format!("{v} differs from the key length {head_dim}, which is not supported"),
                ));
            }
        }
        let rope_dim = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 || rope_dim == 0 {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dim} must be even, positive and at most the head size {head_dim}"),
            ));
        }
        let positive = |k: &str, v: f32| -> Result<f32> {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(bad(k, format!("{v} is not a positive number")))
            }
        };
        let rope_freq_base = positive(
            "rope.freq_base",
            opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
        )?;
        match md.get(&key("rope.scaling.type")) {
            None => {}
            Some(Value::String(t)) if matches!(t.as_str(), "none" | "linear") => {}
            Some(other) => {
                return Err(bad(
                    "rope.scaling.type",
                    format!("{other:?} is not supported (supported: none, linear)"),
                ))
            }
        }
        let scaling_none =
            matches!(md.get(&key("rope.scaling.type")), Some(Value::String(t)) if t == "none");
        let freq_scale = match opt_f32("rope.scaling.factor")? {
            Some(f) if f != 0.0 && !scaling_none => 1.0 / positive("rope.scaling.factor", f)?,
            _ => 1.0,
        };
        let rope_global = RopeParams {
            freq_base: rope_freq_base,
            freq_scale,
        };
        let rope_attn_factor = positive(
            "rope.scaling.attn_factor",
            opt_f32("rope.scaling.attn_factor")?.unwrap_or(1.0),
        )?;
        let rms_eps = get_f32(md, &key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                format!("{rms_eps} is not a valid epsilon"),
            ));
        }
        let block_count = get_usize(md, &key("block_count"))?;
        if block_count == 0 {
            return Err(bad(
                "block_count",
                "a model needs at least one block".into(),
            ));
        }
        let context_length = get_usize(md, &key("context_length"))?;
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

        // Sliding windows as llama.cpp's `load_arch_hparams` sets them per family: Gemma 2
        // always (window 4096 unless the file says), every 2nd layer global; Gemma 3 when the
        // file names a window, every 6th layer global. Phi-3 files may name a window, but
        // llama.cpp ignores it (its results are the reference), and so do we.
        let (sliding_window, pattern) = match family {
            Family::Gemma2 => (opt_usize("attention.sliding_window")?.unwrap_or(4096), 2),
            Family::Gemma3 => (opt_usize("attention.sliding_window")?.unwrap_or(0), 6),
            _ => (0, 0),
        };
        let sliding_layers = if sliding_window == 0 {
            vec![false; block_count]
        } else {
            match md.get(&key("attention.sliding_window_pattern")) {
                Some(Value::Array(flags)) => {
                    if flags.len() < block_count {
                        return Err(bad(
                            "attention.sliding_window_pattern",
                            format!("{} entries for {block_count} blocks", flags.len()),
                        ));
                    }
                    flags[..block_count]
                        .iter()
                        .map(|f| match f {
                            Value::Bool(b) => Ok(*b),
                            other => Err(bad(
                                "attention.sliding_window_pattern",
                                format!("expected booleans, found {:?}", other.value_type()),
                            )),
                        })
                        .collect::<Result<_>>()?
                }
                Some(_) => {
                    let n = get_usize(md, &key("attention.sliding_window_pattern"))?;
                    (0..block_count)
                        .map(|il| n == 0 || il % n < n - 1)
                        .collect()
                }
                None => (0..block_count)
                    .map(|il| il % pattern < pattern - 1)
                    .collect(),
            }
        };
        let rope_local = match family {
            // llama.cpp: Gemma 2's local layers default to the global RoPE, Gemma 3's to base
            // 10000 without scaling.
            Family::Gemma2 => RopeParams {
                freq_base: opt_f32("rope.freq_base_swa")?.unwrap_or(rope_freq_base),
                freq_scale,
            },
            Family::Gemma3 => RopeParams {
                freq_base: opt_f32("rope.freq_base_swa")?.unwrap_or(10_000.0),
                freq_scale: 1.0,
            },
            _ => rope_global,
        };
        positive("rope.freq_base_swa", rope_local.freq_base)?;

        let softcap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
            match opt_f32(k)?.or(default) {
                None => Ok(None),
                Some(0.0) => Ok(None),
                Some(c) => positive(k, c).map(Some),
            }
        };
        let (attn_softcap, final_softcap) = match family {
            Family::Gemma2 => (
                softcap("attn_logit_softcapping", Some(50.0))?,
                softcap("final_logit_softcapping", Some(30.0))?,
            ),
            Family::Gemma3 => (None, softcap("final_logit_softcapping", None)?),
            _ => (None, None),
        };
        let head_scale = 1.0 / (head_dim as f32).sqrt();
        let (attention_scale, scale_query_first) = match family {
            // llama.cpp (after gemma_pytorch): the 27B models scale by d/heads, not head size.
            Family::Gemma2 | Family::Gemma3
                if (family == Family::Gemma2 && block_count == 46)
                    || (family == Family::Gemma3 && block_count == 62) =>
            {
                (1.0 / ((embedding_length / head_count) as f32).sqrt(), true)
            }
            Family::Gemma2 | Family::Gemma3 | Family::Phi3 => (head_scale, true),
            _ => (head_scale, false),
        };

        Ok(Self {
            name,
            family,
            block_count,
            embedding_length,
            feed_forward_length: get_usize(md, &key("feed_forward_length"))?,
            head_count,
            head_count_kv,
            head_dim,
            rope_freq_base,
            rope_dim,
            rope_style: if family == Family::Llama {
                RopeStyle::Normal
            } else {
                RopeStyle::Neox
            },
            rope_global,
            rope_local,
            rope_attn_factor,
            rope_original_context: opt_usize("rope.scaling.original_context_length")?
                .unwrap_or(context_length),
            rms_eps,
            context_length,
            vocab_size,
            tied_embeddings: false,
            sliding_window,
            sliding_layers,
            attention_scale,
            scale_query_first,
            attn_softcap,
            final_softcap,
            embedding_scale: family.is_gemma().then(|| (embedding_length as f32).sqrt()),
            activation: if family.is_gemma() {
                Activation::Gelu
            } else {
                Activation::Silu
            },
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            post_norms: family.is_gemma(),
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
