//! Small random-weight models of every supported family written as real GGUF files.
//!
//! Tests of the loader, the blocks and the swarm use these instead of the 98 MB default model:
//! they go through exactly the same parsing and kernels, in milliseconds. For families with no
//! real file at hand (Qwen3, Gemma 2, Phi-3) they also carry every tensor and key the
//! architecture has, so that llama.cpp, run on the same file, gives the reference outputs.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
/// Re-exported so that crates writing synthetic files need no candle dependency of their own.
pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

#[derive(Clone, Debug)]
pub struct SyntheticModel {
    pub architecture: String,
    pub blocks: usize,
    pub dim: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub weight_dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying the head to the embedding.
    pub separate_head: bool,
    pub seed: u64,
    /// Head size when it is not `dim / heads` (written as `attention.key_length`).
    pub head_dim: Option<usize>,
    /// Sliding window of the sliding-window layers (Gemma); 0 writes no window key.
    pub sliding_window: usize,
    /// Phi-3's `rope.scaling.original_context_length`: LongRoPE uses its long factors above it.
    pub original_context: Option<usize>,
}

impl Default for SyntheticModel {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            blocks: 4,
            dim: 64,
            ff: 128,
            heads: 4,
            kv_heads: 2,
            context: 256,
            weight_dtype: GgmlDType::Q4_1,
            separate_head: false,
            seed: 1,
            head_dim: None,
            sliding_window: 0,
            original_context: None,
        }
    }
}

impl SyntheticModel {
    /// A small model of `architecture` with the shape choices that exercise its differences
    /// (a head size other than d/heads for Qwen3, a window shorter than the tests' sequences
    /// for Gemma, LongRoPE long factors in use for Phi-3).
    pub fn family(architecture: &str, weight_dtype: GgmlDType) -> Self {
        let base = Self {
            architecture: architecture.into(),
            weight_dtype,
            ..Default::default()
        };
        match architecture {
            "qwen3" => Self {
                head_dim: Some(32),
                ..base
            },
            "gemma2" => Self {
                sliding_window: 8,
                ..base
            },
            "gemma3" => Self {
                blocks: 7,
                sliding_window: 8,
                ..base
            },
            "phi3" => Self {
                original_context: Some(64),
                kv_heads: 4,
                ..base
            },
            _ => base,
        }
    }
}

/// The synthetic files compared against llama.cpp, by name: every family, in F32 (so the
/// comparison sees the block math, not quantization kernels) and Q8_0.
#[allow(non_snake_case)]
pub fn SYNTHETIC_FAMILIES() -> Vec<(String, SyntheticModel)> {
    let mut out = Vec::new();
    for arch in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        for (tag, dtype) in [("f32", GgmlDType::F32), ("q8_0", GgmlDType::Q8_0)] {
            out.push((format!("{arch}-{tag}"), SyntheticModel::family(arch, dtype)));
        }
    }
    // LongRoPE's short factors: the session stays below the original context.
    out.push((
        "phi3-short-f32".into(),
        SyntheticModel {
            original_context: Some(512),
            ..SyntheticModel::family("phi3", GgmlDType::F32)
        },
    ));
    out
}

/// The special tokens after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies store them.
fn byte_char(b: u8) -> char {
    let printable =
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable {
        b as char
    } else {
        let skipped = (0..b)
            .filter(|&x| {
                !((b'!'..=b'~').contains(&x)
                    || (0xA1..=0xAC).contains(&x)
                    || (0xAE..=0xFF).contains(&x))
            })
            .count() as u32;
        char::from_u32(256 + skipped).unwrap_or('?')
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl SyntheticModel {
    pub fn vocab_size(&self) -> usize {
        256 + SPECIAL_TOKENS.len()
    }

    /// Writes the model to `path` as GGUF.
    pub fn write(&self, path: &Path) -> candle_core::Result<()> {
        let mut rng = Rng(self.seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let dev = Device::Cpu;
        let head_dim = self.head_dim.unwrap_or(self.dim / self.heads);
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut matrix = |name: String,
                          rows: usize,
                          cols: usize,
                          dtype: GgmlDType,
                          scale: f32,
                          tensors: &mut Vec<(String, QTensor)>|
         -> candle_core::Result<()> {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.next() * scale).collect();
            let t = Tensor::from_vec(data, (rows, cols), &dev)?;
            tensors.push((name, QTensor::quantize(&t, dtype)?));
            Ok(())
        };
        let norm = |name: String,
                    len: usize,
                    tensors: &mut Vec<(String, QTensor)>|
         -> candle_core::Result<()> {
            let data: Vec<f32> = (0..len)
                .map(|i| 1.0 + 0.1 * ((i * 7 % 11) as f32 / 11.0 - 0.5))
                .collect();
            tensors.push((
                name,
                QTensor::quantize(&Tensor::from_vec(data, len, &dev)?, GgmlDType::F32)?,
            ));
            Ok(())
        };
        let vocab = self.vocab_size();
        matrix(
            "token_embd.weight".into(),
            vocab,
            self.dim,
            GgmlDType::Q8_0,
            1.0,
            &mut tensors,
        )?;
        if self.separate_head {
            matrix(
                "output.weight".into(),
                vocab,
                self.dim,
                self.weight_dtype,
                0.5,
                &mut tensors,
            )?;
        }
        norm("output_norm.weight".into(), self.dim, &mut tensors)?;
        let w = self.weight_dtype;
        let s = 1.0 / (self.dim as f32).sqrt() * 2.0;
        let arch = self.architecture.as_str();
        let (qd, kvd) = (self.heads * head_dim, self.kv_heads * head_dim);
        let vector = |name: String,
                      len: usize,
                      center: f32,
                      spread: f32,
                      rng: &mut Rng,
                      tensors: &mut Vec<(String, QTensor)>|
         -> candle_core::Result<()> {
            let data: Vec<f32> = (0..len).map(|_| center + spread * rng.next()).collect();
            tensors.push((
                name,
                QTensor::quantize(&Tensor::from_vec(data, len, &dev)?, GgmlDType::F32)?,
            ));
            Ok(())
        };
        let mut vrng = Rng(self.seed.wrapping_mul(0x2545F4914F6CDD1D) | 1);
        if arch == "phi3" {
            // LongRoPE: factors >= 1 that stretch the low frequencies, short ones milder.
            let n = head_dim / 2;
            vector(
                "rope_factors_short.weight".into(),
                n,
                1.2,
                0.2,
                &mut vrng,
                &mut tensors,
            )?;
            vector(
                "rope_factors_long.weight".into(),
                n,
                4.0,
                3.0,
                &mut vrng,
                &mut tensors,
            )?;
        }
        for b in 0..self.blocks {
            let n = |t: &str| format!("blk.{b}.{t}.weight");
            norm(n("attn_norm"), self.dim, &mut tensors)?;
            norm(n("ffn_norm"), self.dim, &mut tensors)?;
            if arch == "phi3" {
                matrix(n("attn_qkv"), qd + 2 * kvd, self.dim, w, s, &mut tensors)?;
            } else {
                matrix(n("attn_q"), qd, self.dim, w, s, &mut tensors)?;
                matrix(n("attn_k"), kvd, self.dim, w, s, &mut tensors)?;
                matrix(n("attn_v"), kvd, self.dim, w, s, &mut tensors)?;
            }
            if arch == "qwen2" {
                for (t, len) in [("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)] {
                    let name = format!("blk.{b}.{t}.bias");
                    vector(name, len, 0.0, 0.5, &mut vrng, &mut tensors)?;
                }
            }
            if matches!(arch, "qwen3" | "gemma3") {
                vector(
                    n("attn_q_norm"),
                    head_dim,
                    1.0,
                    0.3,
                    &mut vrng,
                    &mut tensors,
                )?;
                vector(
                    n("attn_k_norm"),
                    head_dim,
                    1.0,
                    0.3,
                    &mut vrng,
                    &mut tensors,
                )?;
            }
            if matches!(arch, "gemma2" | "gemma3") {
                vector(
                    n("post_attention_norm"),
                    self.dim,
                    1.0,
                    0.3,
                    &mut vrng,
                    &mut tensors,
                )?;
                vector(
                    n("post_ffw_norm"),
                    self.dim,
                    1.0,
                    0.3,
                    &mut vrng,
                    &mut tensors,
                )?;
            }
            matrix(n("attn_output"), self.dim, qd, w, s, &mut tensors)?;
            if arch == "phi3" {
                matrix(n("ffn_up"), 2 * self.ff, self.dim, w, s, &mut tensors)?;
            } else {
                matrix(n("ffn_gate"), self.ff, self.dim, w, s, &mut tensors)?;
                matrix(n("ffn_up"), self.ff, self.dim, w, s, &mut tensors)?;
            }
            matrix(
                n("ffn_down"),
                self.dim,
                self.ff,
                w,
                1.0 / (self.ff as f32).sqrt() * 2.0,
                &mut tensors,
            )?;
        }

        let mut tokens: Vec<Value> = (0..=255u8)
            .map(|b| Value::String(byte_char(b).to_string()))
            .collect();
        let mut types: Vec<Value> = vec![Value::I32(1); 256];
        for t in SPECIAL_TOKENS {
            tokens.push(Value::String(t.into()));
            types.push(Value::I32(3));
        }
        let u32v = |v: usize| Value::U32(v as u32);
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("synthetic".into())),
            (format!("{arch}.block_count"), u32v(self.blocks)),
            (format!("{arch}.context_length"), u32v(self.context)),
            (format!("{arch}.embedding_length"), u32v(self.dim)),
            (format!("{arch}.feed_forward_length"), u32v(self.ff)),
            (format!("{arch}.attention.head_count"), u32v(self.heads)),
            (format!("{arch}.attention.head_count_kv"), u32v(self.kv_heads)),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{arch}.rope.dimension_count"), u32v(head_dim)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            (format!("{arch}.vocab_size"), u32v(vocab)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            // One merge (of two control bytes no text here contains): an empty array has no
            // element type, which llama.cpp refuses.
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![Value::String(format!("{} {}", byte_char(0), byte_char(1)))]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), u32v(256)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(258)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                Value::String(
                    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
                ),
            ),
        ];
        let key = |k: &str| format!("{arch}.{k}");
        if self.head_dim.is_some() {
            meta.push((key("attention.key_length"), u32v(head_dim)));
            meta.push((key("attention.value_length"), u32v(head_dim)));
        }
        if self.sliding_window > 0 {
            meta.push((key("attention.sliding_window"), u32v(self.sliding_window)));
        }
        match arch {
            "gemma2" => {
                meta.push((key("attn_logit_softcapping"), Value::F32(3.0)));
                meta.push((key("final_logit_softcapping"), Value::F32(5.0)));
            }
            "gemma3" => {
                meta.push((key("final_logit_softcapping"), Value::F32(8.0)));
                meta.push((key("rope.freq_base_swa"), Value::F32(100.0)));
            }
            "phi3" => meta.push((key("rope.scaling.attn_factor"), Value::F32(1.19))),
            _ => {}
        }
        if let Some(n) = self.original_context {
            meta.push((key("rope.scaling.original_context_length"), u32v(n)));
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        std::io::Write::flush(&mut f)?;
        Ok(())
    }
}
