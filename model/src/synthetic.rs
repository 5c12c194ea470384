//! Small random-weight Llama models written as real GGUF files.
//!
//! Tests of the loader, the blocks and (later) the swarm use these instead of the 98 MB default
//! model: they go through exactly the same parsing and kernels, in milliseconds.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
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
        }
    }
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
        let head_dim = self.dim / self.heads;
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
        for b in 0..self.blocks {
            let n = |t: &str| format!("blk.{b}.{t}.weight");
            norm(n("attn_norm"), self.dim, &mut tensors)?;
            norm(n("ffn_norm"), self.dim, &mut tensors)?;
            matrix(
                n("attn_q"),
                self.heads * head_dim,
                self.dim,
                w,
                s,
                &mut tensors,
            )?;
            matrix(
                n("attn_k"),
                self.kv_heads * head_dim,
                self.dim,
                w,
                s,
                &mut tensors,
            )?;
            matrix(
                n("attn_v"),
                self.kv_heads * head_dim,
                self.dim,
                w,
                s,
                &mut tensors,
            )?;
            matrix(
                n("attn_output"),
                self.dim,
                self.heads * head_dim,
                w,
                s,
                &mut tensors,
            )?;
            matrix(n("ffn_gate"), self.ff, self.dim, w, s, &mut tensors)?;
            matrix(n("ffn_up"), self.ff, self.dim, w, s, &mut tensors)?;
            matrix(
                n("ffn_down"),
                self.dim,
                self.ff,
                w,
                1.0 / (self.ff as f32).sqrt() * 2.0,
                &mut tensors,
            )?;
        }

        let arch = self.architecture.as_str();
        let mut tokens: Vec<Value> = (0..=255u8)
            .map(|b| Value::String(byte_char(b).to_string()))
            .collect();
        let mut types: Vec<Value> = vec![Value::I32(1); 256];
        for t in SPECIAL_TOKENS {
            tokens.push(Value::String(t.into()));
            types.push(Value::I32(3));
        }
        let u32v = |v: usize| Value::U32(v as u32);
        let meta: Vec<(String, Value)> = vec![
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
            ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
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
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        std::io::Write::flush(&mut f)?;
        Ok(())
    }
}
