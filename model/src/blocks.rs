//! The decoder block (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) and a stack of them.
//!
//! Weights are immutable and shared by every session; the session's KV cache is passed in. The
//! arithmetic follows llama.cpp's CPU backend (f64 accumulation in RMSNorm, its RoPE angle
//! recurrence, 8-bit activation quantization before quantized products) so outputs agree with it
//! to float noise, and it is deterministic: the same inputs give the same bits whatever the
//! thread count, which is what lets a chain of peers reproduce a single process exactly.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{LayerKv, SessionKv};
use crate::matrix::{matmul, matmul_many, on_pool, Activations, QMatrix};
use crate::numerics::{attend, rms_norm, swiglu};
use crate::spec::ModelSpec;
use half::f16;

/// Hidden states of `tokens` consecutive positions, `[tokens, dim]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Hidden {
    pub tokens: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Hidden {
    pub fn new(tokens: usize, dim: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != tokens * dim {
            return Err(ModelError::Shape(format!(
                "hidden state of {tokens}x{dim} needs {} floats, got {}",
                tokens * dim,
                data.len()
            )));
        }
        Ok(Self { tokens, dim, data })
    }

    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.dim..(t + 1) * self.dim]
    }

    /// The last `n` positions (e.g. the one whose logits are wanted).
    pub fn tail(&self, n: usize) -> Hidden {
        let n = n.min(self.tokens);
        Hidden {
            tokens: n,
            dim: self.dim,
            data: self.data[(self.tokens - n) * self.dim..].to_vec(),
        }
    }
}

/// Rotary position embedding of the "normal" (adjacent pairs) kind that llama uses in GGUF.
#[derive(Clone)]
pub struct Rope {
    dim: usize,
    theta_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    fn new(spec: &ModelSpec, freq_factors: Option<Vec<f32>>) -> Self {
        Self {
            dim: spec.rope_dim,
            theta_scale: libm::powf(spec.rope_freq_base, -2.0 / spec.rope_dim as f32),
            freq_factors,
        }
    }

    /// `(cos, sin)` for each position and pair, computed with ggml's recurrence
    /// `theta_{i+1} = theta_i * base^(-2/dim)` so the angles match llama.cpp bit for bit.
    fn table(&self, pos: usize, tokens: usize) -> Vec<(f32, f32)> {
        let pairs = self.dim / 2;
        let mut out = Vec::with_capacity(tokens * pairs);
        for p in pos..pos + tokens {
            let mut theta = p as f32;
            for i in 0..pairs {
                let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let t = theta / ff;
                out.push((libm::cosf(t), libm::sinf(t)));
                theta *= self.theta_scale;
            }
        }
        out
    }

    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, table: &[(f32, f32)]) {
        let pairs = self.dim / 2;
        for (row, cs) in x
            .chunks_exact_mut(heads * head_dim)
            .zip(table.chunks_exact(pairs))
        {
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = x0 * c - x1 * s;
                    head[2 * i + 1] = x0 * s + x1 * c;
                }
            }
        }
    }
}

/// One transformer block's weights.
pub struct DecoderBlock {
    pub index: usize,
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

pub(crate) fn load_vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let view = file.tensor(name)?;
    if view.elem_count() != len {
        return Err(ModelError::BadTensor {
            name: name.into(),
            reason: format!("expected {len} values, found shape {:?}", view.dims),
        });
    }
    let m = QMatrix::new(view.with_dims(vec![1, len])?)?;
    let mut out = vec![0.0; len];
    m.dequantize_row(0, &mut out)?;
    Ok(out)
}

impl DecoderBlock {
    /// The tensors of block `index`, with every shape checked against the spec.
    pub fn load(file: &GgufFile, spec: &ModelSpec, index: usize) -> Result<Self> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let d = spec.embedding_length;
        let matrix = |t: &str, rows: usize, cols: usize| -> Result<QMatrix> {
            let m = QMatrix::new(file.tensor(&name(t))?)?;
            if m.rows != rows || m.cols != cols {
                return Err(ModelError::BadTensor {
                    name: name(t),
                    reason: format!("shape {}x{}, expected {rows}x{cols}", m.rows, m.cols),
                });
            }
            Ok(m)
        };
        let ff = spec.feed_forward_length;
        Ok(Self {
            index,
            attn_norm: load_vector(file, &name("attn_norm"), d)?,
            wq: matrix("attn_q", spec.q_dim(), d)?,
            wk: matrix("attn_k", spec.kv_dim(), d)?,
            wv: matrix("attn_v", spec.kv_dim(), d)?,
            wo: matrix("attn_output", d, spec.q_dim())?,
            ffn_norm: load_vector(file, &name("ffn_norm"), d)?,
            w_gate: matrix("ffn_gate", ff, d)?,
            w_up: matrix("ffn_up", ff, d)?,
            w_down: matrix("ffn_down", d, ff)?,
            heads: spec.head_count,
            kv_heads: spec.head_count_kv,
            head_dim: spec.head_dim,
            eps: spec.rms_eps,
        })
    }

    pub fn matrices(&self) -> [&QMatrix; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    /// Bytes of weights this block maps (what a node pays in memory per block).
    pub fn weight_bytes(&self) -> usize {
        self.matrices()
            .iter()
            .map(|m| m.weight_bytes())
            .sum::<usize>()
            + (self.attn_norm.len() + self.ffn_norm.len()) * 4
    }

    /// Runs the block on `x` in place, for positions `pos..pos + x.tokens`, extending `kv`.
    fn forward(
        &self,
        x: &mut Hidden,
        kv: &mut LayerKv,
        pos: usize,
        rope: &Rope,
        table: &[(f32, f32)],
    ) -> Result<()> {
        let t = x.tokens;
        let dim = x.dim;
        let hd = self.head_dim;
        let mut normed = Vec::new();
        rms_norm(&x.data, &self.attn_norm, self.eps, &mut normed);
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        {
            let acts = Activations::new(&normed, t, dim);
            matmul_many(
                &acts,
                &[&self.wq, &self.wk, &self.wv],
                &mut [&mut q, &mut k, &mut v],
            )?;
        }
        rope.apply(&mut q, self.heads, hd, table);
        rope.apply(&mut k, self.kv_heads, hd, table);
        kv.append(&k, &v, t)?;
        let attn = self.attention(&q, kv, pos, t);
        let mut o = Vec::new();
        matmul(
            &Activations::new(&attn, t, self.heads * hd),
            &self.wo,
            &mut o,
        )?;
        for (x, o) in x.data.iter_mut().zip(&o) {
            *x += o;
        }

        rms_norm(&x.data, &self.ffn_norm, self.eps, &mut normed);
        let (mut gate, mut up) = (Vec::new(), Vec::new());
        {
            let acts = Activations::new(&normed, t, dim);
            matmul_many(
                &acts,
                &[&self.w_gate, &self.w_up],
                &mut [&mut gate, &mut up],
            )?;
        }
        let ff = self.w_gate.rows;
        swiglu(&mut gate, &up, ff);
        let mut down = Vec::new();
        matmul(&Activations::new(&gate, t, ff), &self.w_down, &mut down)?;
        for (x, d) in x.data.iter_mut().zip(&down) {
            *x += d;
        }
        Ok(())
    }

    /// Causal attention of the `t` new queries over the whole cache, `[t, heads * head_dim]`.
    fn attention(&self, q: &[f32], kv: &LayerKv, pos: usize, t: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // llama.cpp rounds the query to the cache's f16 before the dot products.
        let q16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
        let mut out = vec![0f32; t * self.heads * hd];
        let one = |acc: &mut Vec<f16>, (i, o): (usize, &mut [f32])| {
            let (tok, h) = (i / self.heads, i % self.heads);
            let len = pos + tok + 1;
            acc.resize(hd, f16::ZERO);
            let qh = &q16[i * hd..(i + 1) * hd];
            attend(
                qh,
                kv.keys(h / group, len),
                kv.values(h / group, len),
                scale,
                acc,
                o,
            );
        };
        // Fan out only when there is enough work to pay for the hand-off.
        if t * self.heads * (pos + t) * hd > 1 << 16 {
            out.par_chunks_mut(hd)
                .enumerate()
                .for_each_init(Vec::new, one);
        } else {
            let mut acc = Vec::new();
            out.chunks_mut(hd)
                .enumerate()
                .for_each(|x| one(&mut acc, x));
        }
        out
    }
}

/// The blocks `range` of a model, as one process holds them.
pub struct BlockStack {
    range: Range<usize>,
    blocks: Vec<DecoderBlock>,
    rope: Rope,
    spec: ModelSpec,
}

impl BlockStack {
    pub(crate) fn new(
        spec: &ModelSpec,
        range: Range<usize>,
        blocks: Vec<DecoderBlock>,
        freq_factors: Option<Vec<f32>>,
    ) -> Self {
        Self {
            rope: Rope::new(spec, freq_factors),
            spec: spec.clone(),
            range,
            blocks,
        }
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn weight_bytes(&self) -> usize {
        self.blocks.iter().map(DecoderBlock::weight_bytes).sum()
    }

    /// A fresh cache for `span` (a sub-range of this stack) holding up to `capacity` tokens.
    pub fn new_cache(&self, span: Range<usize>, capacity: usize) -> SessionKv {
        SessionKv::new(
            span.len(),
            self.spec.head_count_kv,
            self.spec.head_dim,
            capacity,
        )
    }

    /// Runs every block of the stack.
    pub fn forward(&self, x: &mut Hidden, kv: &mut SessionKv, pos: usize) -> Result<()> {
        self.forward_span(self.range.clone(), x, kv, pos)
    }

    /// Runs blocks `span` (absolute indices inside this stack's range) on positions
    /// `pos..pos + x.tokens`. `kv` must hold exactly `pos` positions of those blocks.
    pub fn forward_span(
        &self,
        span: Range<usize>,
        x: &mut Hidden,
        kv: &mut SessionKv,
        pos: usize,
    ) -> Result<()> {
        if span.start < self.range.start || span.end > self.range.end || span.is_empty() {
            return Err(ModelError::BadBlockRange {
                start: span.start,
                end: span.end,
                count: self.spec.block_count,
            });
        }
        if kv.layers.len() != span.len() {
            return Err(ModelError::Shape(format!(
                "cache has {} layers for blocks {}..{}",
                kv.layers.len(),
                span.start,
                span.end
            )));
        }
        if x.dim != self.spec.embedding_length || x.tokens == 0 {
            return Err(ModelError::Shape(format!(
                "hidden state {}x{} for a model of width {}",
                x.tokens, x.dim, self.spec.embedding_length
            )));
        }
        if kv.len() != pos {
            return Err(ModelError::Position {
                got: pos,
                expected: kv.len(),
            });
        }
        let needed = pos + x.tokens;
        if needed > kv.capacity() {
            return Err(ModelError::CacheFull {
                needed,
                capacity: kv.capacity(),
            });
        }
        let table = self.rope.table(pos, x.tokens);
        let first = span.start - self.range.start;
        let blocks = &self.blocks[first..first + span.len()];
        on_pool(|| {
            for (block, layer) in blocks.iter().zip(kv.layers.iter_mut()) {
                block.forward(x, layer, pos, &self.rope, &table)?;
            }
            Ok(())
        })
    }
}
