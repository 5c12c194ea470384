//! Full-size (7B-class) synthetic models, written as GGUF files without a model hub.
//!
//! Why: the point of a swarm is a model no single device can hold, and proving it needs a file
//! of a real 7B shape that llama.cpp also runs. The weights are random but scaled like a trained
//! network's (each matrix keeps its input's magnitude), so activations stay finite over all 32
//! blocks, and the vocabulary segments plain text (see [`vocab`]). The file is written tensor by
//! tensor, streaming from a seeded generator to disk, so it never sits in memory; the same seed
//! gives the same bytes on every machine, which is how a present file is recognised and kept.

mod gguf_writer;
mod random_quant;
pub mod vocab;

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gguf_writer::{Meta, TensorEntry};
use random_quant::{fill_blocks, Format, Rng};

/// The block layout of a 7B-class model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Mistral-7B: grouped-query attention with 8 KV heads, FFN 14336.
    Mistral7B,
    /// Llama-2-7B: 32 KV heads (plain multi-head attention), FFN 11008.
    Llama2_7B,
}

/// The weight mix of a file, as llama.cpp's quantizer would produce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Q4_0 matrices, a Q6_K head.
    Q4_0,
    /// Q4_K matrices with Q6_K for `attn_v` and `ffn_down` in llama.cpp's "more bits" layers,
    /// and a Q6_K head.
    Q4KM,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Mistral7B => "mistral-7b",
            Shape::Llama2_7B => "llama2-7b",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Shape::Mistral7B, Shape::Llama2_7B]
            .into_iter()
            .find(|v| v.name() == s)
    }

    fn kv_heads(self) -> usize {
        match self {
            Shape::Mistral7B => 8,
            Shape::Llama2_7B => 32,
        }
    }

    fn ff(self) -> usize {
        match self {
            Shape::Mistral7B => 14336,
            Shape::Llama2_7B => 11008,
        }
    }
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4_0 => "Q4_0",
            Quant::Q4KM => "Q4_K_M",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Quant::Q4_0, Quant::Q4KM]
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s))
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Quant::Q4_0 => 2,
            Quant::Q4KM => 15,
        }
    }

    fn base(self) -> Format {
        match self {
            Quant::Q4_0 => Format::Q4_0,
            Quant::Q4KM => Format::Q4K,
        }
    }
}

pub const BLOCKS: usize = 32;
pub const DIM: usize = 4096;
pub const HEADS: usize = 32;
pub const VOCAB: usize = 32000;
pub const CONTEXT: usize = 4096;
const HEAD_DIM: usize = DIM / HEADS;
/// Gain of the matrices that add to the residual stream (see `plan`).
const RESIDUAL_GAIN: f32 = 0.3;

/// The file a spec is written to, and the parameters that decide its bytes.
#[derive(Clone, Debug)]
pub struct FullSizeModel {
    pub shape: Shape,
    pub quant: Quant,
    pub seed: u64,
}

/// One tensor to write: where it goes, its format, and the spread of its values.
struct Planned {
    entry: TensorEntry,
    format: Format,
    std: f32,
    center: f32,
    /// Leading bytes written with a hundredth of `std` (the head's rows of the control tokens).
    quiet_bytes: usize,
}

impl Planned {
    /// Fills `out` with the tensor's bytes from `offset` on, continuing `rng`'s stream (the
    /// caller goes through the tensor in order, so any prefix can be regenerated alone).
    fn fill(&self, rng: &mut Rng, offset: usize, out: &mut [u8]) {
        let quiet = self.quiet_bytes.saturating_sub(offset).min(out.len());
        let (head, rest) = out.split_at_mut(quiet);
        fill_blocks(self.format, rng, self.std / 100.0, self.center, head);
        fill_blocks(self.format, rng, self.std, self.center, rest);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, SyntheticError>;

/// Bytes generated and checked per chunk: big enough for sequential disk writes, small enough
/// to be nothing in memory.
const CHUNK: usize = 4 << 20;
/// Bytes at the start of every tensor compared when deciding whether a present file is ours.
const CHECK_BYTES: usize = 64 << 10;

impl FullSizeModel {
    pub fn new(shape: Shape, quant: Quant) -> Self {
        Self {
            shape,
            quant,
            seed: 7,
        }
    }

    /// `synthetic-<shape>.<quant>.gguf`.
    pub fn file_name(&self) -> String {
        format!(
            "synthetic-{}-s{}.{}.gguf",
            self.shape.name(),
            self.seed,
            self.quant.name()
        )
    }

    /// "More bits" layers of llama.cpp's Q4_K_M mix (`use_more_bits`).
    fn more_bits(layer: usize) -> bool {
        let n = BLOCKS;
        layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
    }

    fn plan(&self) -> Vec<Planned> {
        let base = self.quant.base();
        let (ff, kvd) = (self.shape.ff(), self.shape.kv_heads() * HEAD_DIM);
        let mut out = Vec::new();
        let mut add = |name: String, dims: Vec<usize>, format: Format, std: f32, center: f32| {
            let elems: usize = dims.iter().product();
            let bytes = (elems / format.block_elems() * format.block_bytes()) as u64;
            out.push(Planned {
                entry: TensorEntry {
                    name,
                    dims,
                    ggml_type: format.ggml_type(),
                    bytes,
                },
                format,
                std,
                center,
                quiet_bytes: 0,
            });
        };
        // Unit-scale embeddings: each block then adds contributions of about its own size, so
        // the token still counts after 32 blocks.
        add("token_embd.weight".into(), vec![VOCAB, DIM], base, 1.0, 0.0);
        let fan = |n: usize| 1.0 / (n as f32).sqrt();
        for b in 0..BLOCKS {
            let n = |t: &str| format!("blk.{b}.{t}.weight");
            let wide = if self.quant == Quant::Q4KM && Self::more_bits(b) {
                Format::Q6K
            } else {
                base
            };
            add(n("attn_norm"), vec![DIM], Format::F32, 0.1, 1.0);
            // Query and key a little larger than unit gain, so attention is not uniform.
            add(n("attn_q"), vec![DIM, DIM], base, 1.5 * fan(DIM), 0.0);
            add(n("attn_k"), vec![kvd, DIM], base, 1.5 * fan(DIM), 0.0);
            add(n("attn_v"), vec![kvd, DIM], wide, fan(DIM), 0.0);
            // The two matrices that write into the residual stream are damped: with unit gain a
            // random 32-block network is chaotic, and the last-bit differences between two
            // correct implementations (summation order, a Q8 rounding of an activation) grow
            // through the blocks until their greedy tokens part. Trained networks also add
            // small updates to a larger residual.
            add(
                n("attn_output"),
                vec![DIM, DIM],
                base,
                RESIDUAL_GAIN * fan(DIM),
                0.0,
            );
            add(n("ffn_norm"), vec![DIM], Format::F32, 0.1, 1.0);
            add(n("ffn_gate"), vec![ff, DIM], base, fan(DIM), 0.0);
            add(n("ffn_up"), vec![ff, DIM], base, fan(DIM), 0.0);
            add(
                n("ffn_down"),
                vec![DIM, ff],
                wide,
                RESIDUAL_GAIN * fan(ff),
                0.0,
            );
        }
        add(
            "output_norm.weight".into(),
            vec![DIM],
            Format::F32,
            0.1,
            1.0,
        );
        // Logits of spread ~10: clear winners, so greedy choices are rarely near-ties that
        // the last bits of two implementations could flip.
        add(
            "output.weight".into(),
            vec![VOCAB, DIM],
            Format::Q6K,
            10.0 * fan(DIM),
            0.0,
        );
        // `<unk>`, `<s>` and `</s>` get logits near 0 against winners near +40: a random model
        // would otherwise end a text with `</s>` now and then, and a run asked for 512 tokens
        // would stop early.
        if let Some(head) = out.last_mut() {
            head.quiet_bytes = 3 * DIM / Format::Q6K.block_elems() * Format::Q6K.block_bytes();
        }
        out
    }

    fn metadata(&self) -> Vec<(String, Meta)> {
        let pieces = vocab::pieces(VOCAB);
        let u = |v: usize| Meta::U32(v as u32);
        let k = |s: &str| format!("llama.{s}");
        vec![
            ("general.architecture".into(), Meta::Str("llama".into())),
            (
                "general.name".into(),
                Meta::Str(format!(
                    "synthetic {} {}",
                    self.shape.name(),
                    self.quant.name()
                )),
            ),
            (
                "general.file_type".into(),
                Meta::U32(self.quant.file_type()),
            ),
            ("general.quantization_version".into(), Meta::U32(2)),
            (k("block_count"), u(BLOCKS)),
            (k("context_length"), u(CONTEXT)),
            (k("embedding_length"), u(DIM)),
            (k("feed_forward_length"), u(self.shape.ff())),
            (k("attention.head_count"), u(HEADS)),
            (k("attention.head_count_kv"), u(self.shape.kv_heads())),
            (k("rope.dimension_count"), u(HEAD_DIM)),
            (k("rope.freq_base"), Meta::F32(10000.0)),
            (k("attention.layer_norm_rms_epsilon"), Meta::F32(1e-5)),
            (k("vocab_size"), u(VOCAB)),
            ("tokenizer.ggml.model".into(), Meta::Str("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Meta::Strs(pieces.iter().map(|p| p.text.clone()).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Meta::F32s(pieces.iter().map(|p| p.score).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Meta::I32s(pieces.iter().map(|p| p.kind).collect()),
            ),
            (
                "tokenizer.ggml.bos_token_id".into(),
                Meta::U32(vocab::BOS_ID),
            ),
            (
                "tokenizer.ggml.eos_token_id".into(),
                Meta::U32(vocab::EOS_ID),
            ),
            (
                "tokenizer.ggml.unknown_token_id".into(),
                Meta::U32(vocab::UNK_ID),
            ),
            ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
            ("tokenizer.ggml.add_eos_token".into(), Meta::Bool(false)),
            ("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(true)),
        ]
    }

    /// The header bytes and the tensors in file order.
    fn layout(&self) -> (Vec<u8>, Vec<Planned>) {
        let plan = self.plan();
        let entries: Vec<TensorEntry> = plan
            .iter()
            .map(|p| TensorEntry {
                name: p.entry.name.clone(),
                dims: p.entry.dims.clone(),
                ggml_type: p.entry.ggml_type,
                bytes: p.entry.bytes,
            })
            .collect();
        (gguf_writer::header(&self.metadata(), &entries), plan)
    }

    /// The size of the file in bytes.
    pub fn file_bytes(&self) -> u64 {
        let (header, plan) = self.layout();
        header.len() as u64
            + plan
                .iter()
                .map(|p| gguf_writer::aligned(p.entry.bytes))
                .sum::<u64>()
    }

    /// The generator of tensor `index`: one stream per tensor, so any tensor's bytes can be
    /// regenerated (and checked) without the others.
    fn rng(&self, index: usize) -> Rng {
        Rng::new(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index as u64),
        )
    }

    /// Writes the model into `dir` unless a file with its name is there and is this model
    /// (size, header and the first bytes of every tensor as generated), and returns its path.
    /// A file that is not is replaced. Writes go to a temporary name first, so an interrupted
    /// run leaves no file that looks finished.
    pub fn write_if_missing(
        &self,
        dir: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf> {
        let path = dir.join(self.file_name());
        if path.exists() {
            if self.matches(&path)? {
                tracing::info!(path = %path.display(), "synthetic model present, kept");
                return Ok(path);
            }
            tracing::warn!(path = %path.display(), "a different file has this name; rewriting it");
        }
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| SyntheticError::Io { path: p, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // A name of its own per writer: tests run in parallel threads and may both find the
        // file missing; each writes the same bytes and the last rename wins.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            "{}.partial-{}-{n}",
            self.file_name(),
            std::process::id()
        ));
        self.write(&tmp, progress)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Writes the whole file to `path`, reporting `progress(bytes_done, bytes_total)`.
    pub fn write(&self, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let io = |source| SyntheticError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (header, plan) = self.layout();
        let total = self.file_bytes();
        let mut f = BufWriter::with_capacity(CHUNK, File::create(path).map_err(io)?);
        f.write_all(&header).map_err(io)?;
        let mut done = header.len() as u64;
        progress(done, total);
        let mut buf = vec![0u8; CHUNK];
        for (i, t) in plan.iter().enumerate() {
            let mut rng = self.rng(i);
            let per_chunk = CHUNK / t.format.block_bytes() * t.format.block_bytes();
            let mut left = t.entry.bytes as usize;
            while left > 0 {
                let n = left.min(per_chunk);
                t.fill(&mut rng, t.entry.bytes as usize - left, &mut buf[..n]);
                f.write_all(&buf[..n]).map_err(io)?;
                left -= n;
                done += n as u64;
                progress(done, total);
            }
            let pad = (gguf_writer::aligned(t.entry.bytes) - t.entry.bytes) as usize;
            f.write_all(&vec![0u8; pad]).map_err(io)?;
            done += pad as u64;
        }
        f.flush().map_err(io)?;
        f.get_ref().sync_all().map_err(io)?;
        progress(total, total);
        Ok(())
    }

    /// Is the file at `path` this model? Compares its size, its header and the first
    /// [`CHECK_BYTES`] of every tensor with what [`write`](Self::write) would put there: a
    /// different seed, shape or format differs in all of them, a truncated file in its size.
    pub fn matches(&self, path: &Path) -> Result<bool> {
        let io = |source| SyntheticError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::open(path).map_err(io)?;
        if f.metadata().map_err(io)?.len() != self.file_bytes() {
            return Ok(false);
        }
        let (header, plan) = self.layout();
        let mut have = vec![0u8; header.len()];
        f.read_exact(&mut have).map_err(io)?;
        if have != header {
            return Ok(false);
        }
        let mut offset = header.len() as u64;
        let (mut want, mut got) = (vec![0u8; CHECK_BYTES], vec![0u8; CHECK_BYTES]);
        for (i, t) in plan.iter().enumerate() {
            let bb = t.format.block_bytes();
            let n = (t.entry.bytes as usize).min(CHECK_BYTES / bb * bb);
            t.fill(&mut self.rng(i), 0, &mut want[..n]);
            f.seek(SeekFrom::Start(offset)).map_err(io)?;
            f.read_exact(&mut got[..n]).map_err(io)?;
            if want[..n] != got[..n] {
                return Ok(false);
            }
            offset += gguf_writer::aligned(t.entry.bytes);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_those_of_a_7b_model() {
        let q4 = FullSizeModel::new(Shape::Mistral7B, Quant::Q4_0).file_bytes();
        let km = FullSizeModel::new(Shape::Mistral7B, Quant::Q4KM).file_bytes();
        // Mistral-7B's published files: Q4_0 4.11 GB, Q4_K_M 4.37 GB.
        assert!((4.0e9..4.3e9).contains(&(q4 as f64)), "Q4_0 {q4}");
        assert!((4.2e9..4.5e9).contains(&(km as f64)), "Q4_K_M {km}");
    }
}
