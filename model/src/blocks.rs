//! The decoder block (RMSNorm, RoPE, grouped-query attention, gated MLP) and a stack of them.
//! One block serves every family: the spec says which optional parts a family has (biases,
//! QK-norm, post-norms, sliding window, soft-capping, GELU), fused tensors are split at load.
//!
//! Weights are immutable and shared by every session; the session's KV cache is passed in. The
//! arithmetic follows llama.cpp's CPU backend (f64 accumulation in RMSNorm, its RoPE angle
//! recurrence, 8-bit activation quantization before quantized products) so outputs agree with it
//! to float noise, and it is deterministic: the same inputs give the same bits whatever the
//! thread count, which is what lets a chain of peers reproduce a single process exactly.

use std::ops::Range;

use crate::activation::{add_bias, geglu, scale};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{LayerKv, SessionKv};
use crate::matrix::{matmul, matmul_many, on_pool, Activations, QMatrix};
use crate::numerics::{attend, rms_norm, swiglu, AttendScratch};
use crate::spec::{Activation, ModelSpec, RopeParams, RopeStyle};
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

/// Rotary position embedding, as ggml's `rope_f32` computes it for one kind of layer.
#[derive(Clone)]
pub struct Rope {
    dim: usize,
    style: RopeStyle,
    theta_scale: f32,
    freq_scale: f32,
    mscale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    fn new(spec: &ModelSpec, params: RopeParams, freq_factors: Option<Vec<f32>>) -> Self {
        Self {
            dim: spec.rope_dim,
            style: spec.rope_style,
            theta_scale: libm::powf(params.freq_base, -2.0 / spec.rope_dim as f32),
            freq_scale: params.freq_scale,
            mscale: spec.rope_attn_factor,
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
                let t = self.freq_scale * (theta / ff);
                out.push((libm::cosf(t) * self.mscale, libm::sinf(t) * self.mscale));
                theta *= self.theta_scale;
            }
        }
        out
    }

    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, table: &[(f32, f32)]) {
        let pairs = self.dim / 2;
        // Normal RoPE rotates adjacent elements, NeoX the two halves of the rotated part.
        let (stride, offset) = match self.style {
            RopeStyle::Normal => (2, 1),
            RopeStyle::Neox => (1, pairs),
        };
        for (row, cs) in x
            .chunks_exact_mut(heads * head_dim)
            .zip(table.chunks_exact(pairs))
        {
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (stride * i, stride * i + offset);
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}

/// The RoPE variants of a model: global layers, sliding-window layers, and LongRoPE's long
/// factors for sessions longer than the original context.
#[derive(Clone)]
struct Ropes {
    global: Rope,
    local: Rope,
    global_long: Option<Rope>,
}

/// The per-family numbers every block of a model shares.
#[derive(Clone, Copy)]
struct BlockMath {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    activation: Activation,
    attention_scale: f32,
    scale_query_first: bool,
    softcap: f32,
}

/// The intermediate buffers of a block, reused by every block of a forward pass: a prompt's
/// are megabytes, and fresh allocations that size are fresh pages to fault in, each time.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// One transformer block's weights. Every family's block is this one; what a family lacks is
/// `None` (biases, QK-norm, post-norms) and fused tensors are split into row views at load.
pub struct DecoderBlock {
    pub index: usize,
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    /// Q, K and V biases (Qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm weights of Q and K (Qwen3, Gemma 3).
    qk_norm: Option<[Vec<f32>; 2]>,
    wo: QMatrix,
    /// RMSNorm of the attention output and of the FFN output (Gemma).
    post_norms: Option<[Vec<f32>; 2]>,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
    /// The sliding window of this layer, if it is a sliding-window layer.
    window: Option<usize>,
    math: BlockMath,
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
        let bias = |t: &str| format!("blk.{index}.{t}.bias");
        let d = spec.embedding_length;
        let check = |m: QMatrix, rows: usize, cols: usize| -> Result<QMatrix> {
            if m.rows != rows || m.cols != cols {
                return Err(ModelError::BadTensor {
                    name: m.name().to_string(),
                    reason: format!("shape {}x{}, expected {rows}x{cols}", m.rows, m.cols),
                });
            }
            Ok(m)
        };
        let matrix = |t: &str, rows: usize, cols: usize| -> Result<QMatrix> {
            check(QMatrix::new(file.tensor(&name(t))?)?, rows, cols)
        };
        let (qd, kvd, ff) = (spec.q_dim(), spec.kv_dim(), spec.feed_forward_length);

        // Q, K, V: separate tensors, or Phi-3's fused `attn_qkv` split by rows.
        let (wq, wk, wv, qkv_bias) = if file.has_tensor(&name("attn_qkv")) {
            let fused = file.tensor(&name("attn_qkv"))?;
            if fused.dims != [qd + 2 * kvd, d] {
                return Err(ModelError::BadTensor {
                    name: name("attn_qkv"),
                    reason: format!("shape {:?}, expected {:?}", fused.dims, [qd + 2 * kvd, d]),
                });
            }
            let part = |r: std::ops::Range<usize>| QMatrix::new(fused.rows(r)?);
            let b = if file.has_tensor(&bias("attn_qkv")) {
                let all = load_vector(file, &bias("attn_qkv"), qd + 2 * kvd)?;
                Some([
                    all[..qd].to_vec(),
                    all[qd..qd + kvd].to_vec(),
                    all[qd + kvd..].to_vec(),
                ])
            } else {
                None
            };
            (
                part(0..qd)?,
                part(qd..qd + kvd)?,
                part(qd + kvd..qd + 2 * kvd)?,
                b,
            )
        } else {
            let has_bias = ["attn_q", "attn_k", "attn_v"].map(|t| file.has_tensor(&bias(t)));
            let b = if has_bias.iter().any(|&b| b) {
                Some([
                    load_vector(file, &bias("attn_q"), qd)?,
                    load_vector(file, &bias("attn_k"), kvd)?,
                    load_vector(file, &bias("attn_v"), kvd)?,
                ])
            } else {
                None
            };
            (
                matrix("attn_q", qd, d)?,
                matrix("attn_k", kvd, d)?,
                matrix("attn_v", kvd, d)?,
                b,
            )
        };
        let qk_norm = if spec.qk_norm {
            Some([
                load_vector(file, &name("attn_q_norm"), spec.head_dim)?,
                load_vector(file, &name("attn_k_norm"), spec.head_dim)?,
            ])
        } else {
            None
        };
        let post_norms = if spec.post_norms {
            Some([
                load_vector(file, &name("post_attention_norm"), d)?,
                load_vector(file, &name("post_ffw_norm"), d)?,
            ])
        } else {
            None
        };
        // Gate and up: separate tensors, or Phi-3's `ffn_up` of 2*ff rows (gate first).
        let (w_gate, w_up) = if file.has_tensor(&name("ffn_gate")) {
            (matrix("ffn_gate", ff, d)?, matrix("ffn_up", ff, d)?)
        } else {
            let fused = file.tensor(&name("ffn_up"))?;
            if fused.dims != [2 * ff, d] {
                return Err(ModelError::BadTensor {
                    name: name("ffn_up"),
                    reason: format!(
                        "shape {:?}, expected {:?} (there is no ffn_gate, so up must hold gate and up)",
                        fused.dims,
                        [2 * ff, d]
                    ),
                });
            }
            (
                QMatrix::new(fused.rows(0..ff)?)?,
                QMatrix::new(fused.rows(ff..2 * ff)?)?,
            )
        };
        Ok(Self {
            index,
            attn_norm: load_vector(file, &name("attn_norm"), d)?,
            wq,
            wk,
            wv,
            qkv_bias,
            qk_norm,
            wo: matrix("attn_output", d, qd)?,
            post_norms,
            ffn_norm: load_vector(file, &name("ffn_norm"), d)?,
            w_gate,
            w_up,
            w_down: matrix("ffn_down", d, ff)?,
            window: spec.is_sliding(index).then_some(spec.sliding_window),
            math: BlockMath {
                heads: spec.head_count,
                kv_heads: spec.head_count_kv,
                head_dim: spec.head_dim,
                eps: spec.rms_eps,
                activation: spec.activation,
                attention_scale: spec.attention_scale,
                scale_query_first: spec.scale_query_first,
                softcap: spec.attn_softcap.unwrap_or(0.0),
            },
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

    /// The sliding window of this block, if it attends through one.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Bytes of weights this block maps (what a node pays in memory per block).
    pub fn weight_bytes(&self) -> usize {
        let vectors = self.attn_norm.len()
            + self.ffn_norm.len()
            + self.qkv_bias.iter().flatten().map(Vec::len).sum::<usize>()
            + self.qk_norm.iter().flatten().map(Vec::len).sum::<usize>()
            + self
                .post_norms
                .iter()
                .flatten()
                .map(Vec::len)
                .sum::<usize>();
        self.matrices()
            .iter()
            .map(|m| m.weight_bytes())
            .sum::<usize>()
            + vectors * 4
    }

    /// Runs the block on `x` in place: the rows of each segment are one session's positions
    /// `pos..`, extending layer `layer` of that session's cache. Every product runs over all
    /// rows at once; RoPE, the cache and attention are per segment.
    fn forward(
        &self,
        x: &mut Hidden,
        sessions: &mut [BatchEntry],
        segments: &[Segment],
        layer: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let m = &self.math;
        let t = x.tokens;
        let dim = x.dim;
        let hd = m.head_dim;
        for (s, seg) in sessions.iter().zip(segments) {
            s.kv.layers[layer].check_continues(seg.pos)?;
        }
        let Scratch {
            normed,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        } = scratch;
        rms_norm(&x.data, &self.attn_norm, m.eps, normed);
        {
            let acts = Activations::new(normed, t, dim);
            matmul_many(&acts, &[&self.wq, &self.wk, &self.wv], &mut [q, k, v])?;
        }
        if let Some([bq, bk, bv]) = &self.qkv_bias {
            add_bias(q, bq);
            add_bias(k, bk);
            add_bias(v, bv);
        }
        if let Some([qn, kn]) = &self.qk_norm {
            // RMSNorm over each head's vector: the weights are one head long.
            rms_norm(&q.clone(), qn, m.eps, q);
            rms_norm(&k.clone(), kn, m.eps, k);
        }
        let (width, kv_width) = (m.heads * hd, m.kv_heads * hd);
        for seg in segments {
            let (rope, table) = seg.rope(self.window.is_some());
            let rows = seg.rows.clone();
            rope.apply(
                &mut q[rows.start * width..rows.end * width],
                m.heads,
                hd,
                table,
            );
            rope.apply(
                &mut k[rows.start * kv_width..rows.end * kv_width],
                m.kv_heads,
                hd,
                table,
            );
        }
        let dot_scale = if m.scale_query_first {
            scale(q, m.attention_scale);
            1.0
        } else {
            m.attention_scale
        };
        let mut attn = vec![0f32; t * width];
        for (s, seg) in sessions.iter_mut().zip(segments) {
            let kv = &mut s.kv.layers[layer];
            let (r, n) = (seg.rows.clone(), seg.rows.len());
            let (q, out) = (
                &q[r.start * width..r.end * width],
                &mut attn[r.start * width..r.end * width],
            );
            let (k, v) = (
                &k[r.start * kv_width..r.end * kv_width],
                &v[r.start * kv_width..r.end * kv_width],
            );
            match self.window {
                None => {
                    kv.append(k, v, n)?;
                    self.attention_full(q, kv, seg.pos, n, dot_scale, out);
                }
                Some(window) => {
                    self.attention_window(q, k, v, kv, seg.pos, window, dot_scale, out)?
                }
            }
        }
        matmul(&Activations::new(&attn, t, m.heads * hd), &self.wo, o)?;
        if let Some([post_attn, _]) = &self.post_norms {
            rms_norm(&o.clone(), post_attn, m.eps, o);
        }
        for (x, o) in x.data.iter_mut().zip(o.iter()) {
            *x += o;
        }

        rms_norm(&x.data, &self.ffn_norm, m.eps, normed);
        {
            let acts = Activations::new(normed, t, dim);
            matmul_many(&acts, &[&self.w_gate, &self.w_up], &mut [gate, up])?;
        }
        let ff = self.w_gate.rows;
        match m.activation {
            Activation::Silu => swiglu(gate, up, ff),
            Activation::Gelu => geglu(gate, up, ff),
        }
        matmul(&Activations::new(gate, t, ff), &self.w_down, down)?;
        if let Some([_, post_ffn]) = &self.post_norms {
            rms_norm(&down.clone(), post_ffn, m.eps, down);
        }
        for (x, d) in x.data.iter_mut().zip(down.iter()) {
            *x += d;
        }
        Ok(())
    }

    /// Attention of the queries of tokens `tokens` (rows of `q16`, `[t, heads * head_dim]`)
    /// into `out` (their rows only), each query head over the keys and values `kv_of(token,
    /// kv_head)` returns; in parallel when there is enough work to pay for the hand-off.
    fn attend_rows<'k>(
        &self,
        q16: &[f16],
        tokens: Range<usize>,
        out: &mut [f32],
        kv_of: impl Fn(usize, usize) -> (&'k [f16], &'k [f16]) + Sync,
        dot_scale: f32,
    ) {
        let m = self.math;
        let hd = m.head_dim;
        let group = m.heads / m.kv_heads;
        let first = tokens.start;
        let work: usize = tokens.len() * m.heads * kv_of(tokens.end - 1, 0).0.len();
        let one = |scratch: &mut AttendScratch, (i, o): (usize, &mut [f32])| {
            let (tok, h) = (first + i / m.heads, i % m.heads);
            let qh = &q16[(tok * m.heads + h) * hd..(tok * m.heads + h + 1) * hd];
            let (keys, values) = kv_of(tok, h / group);
            attend(qh, keys, values, dot_scale, m.softcap, scratch, o);
        };
        if work > 1 << 16 {
            thread_local! {
                static SCRATCH: std::cell::RefCell<AttendScratch> = Default::default();
            }
            crate::team::run_chunks(out, hd, &|i, o| {
                SCRATCH.with(|s| one(&mut s.borrow_mut(), (i, o)))
            });
        } else {
            let mut scratch = AttendScratch::default();
            out.chunks_mut(hd)
                .enumerate()
                .for_each(|x| one(&mut scratch, x));
        }
    }

    /// Causal attention of the `t` new queries over the whole cache into `out`,
    /// `[t, heads * head_dim]`.
    fn attention_full(
        &self,
        q: &[f32],
        kv: &LayerKv,
        pos: usize,
        t: usize,
        dot_scale: f32,
        out: &mut [f32],
    ) {
        // llama.cpp rounds the query to the cache's f16 before the dot products.
        let q16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
        self.attend_rows(
            &q16,
            0..t,
            out,
            |tok, kh| (kv.keys(kh, pos + tok + 1), kv.values(kh, pos + tok + 1)),
            dot_scale,
        );
    }

    /// Causal attention through a sliding window into `out`: each query sees itself and the
    /// `window - 1` positions before it. The step's keys go into the ring in chunks short enough that none
    /// overwrites a key a query of its chunk still needs; each chunk's queries then read their
    /// window in place.
    #[allow(clippy::too_many_arguments)]
    fn attention_window(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        kv: &mut LayerKv,
        pos: usize,
        window: usize,
        dot_scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let m = self.math;
        let (hd, width, kv_width) = (m.head_dim, m.heads * m.head_dim, m.kv_heads * m.head_dim);
        let t = q.len() / width;
        let q16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
        let chunk = kv.max_append().max(1);
        let mut start = 0;
        while start < t {
            let end = (start + chunk).min(t);
            let n = end - start;
            kv.append(
                &k[start * kv_width..end * kv_width],
                &v[start * kv_width..end * kv_width],
                n,
            )?;
            let ring = &*kv;
            self.attend_rows(
                &q16,
                start..end,
                &mut out[start * width..end * width],
                |tok, kh| {
                    let p = pos + tok;
                    ring.run(kh, (p + 1).saturating_sub(window)..p + 1)
                },
                dot_scale,
            );
            start = end;
        }
        debug_assert_eq!(out.len() % hd, 0);
        Ok(())
    }
}

/// The blocks `range` of a model, as one process holds them.
pub struct BlockStack {
    range: Range<usize>,
    blocks: Vec<DecoderBlock>,
    ropes: Ropes,
    spec: ModelSpec,
}

/// RoPE frequency factors from the file: `rope_freqs` (Llama 3), or LongRoPE's short and long
/// factors (Phi-3).
pub(crate) struct FreqFactors {
    pub one: Option<Vec<f32>>,
    pub long: Option<Vec<f32>>,
}

impl FreqFactors {
    pub(crate) fn load(file: &GgufFile, spec: &ModelSpec) -> Result<Self> {
        let n = spec.rope_dim / 2;
        let opt = |name: &str| -> Result<Option<Vec<f32>>> {
            if file.has_tensor(name) {
                load_vector(file, name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        // llama.cpp prefers `rope_freqs` when a file has both kinds.
        let one = match opt("rope_freqs.weight")? {
            Some(f) => {
                return Ok(Self {
                    one: Some(f),
                    long: None,
                })
            }
            None => opt("rope_factors_short.weight")?,
        };
        Ok(Self {
            one,
            long: opt("rope_factors_long.weight")?,
        })
    }
}

impl BlockStack {
    pub(crate) fn new(
        spec: &ModelSpec,
        range: Range<usize>,
        blocks: Vec<DecoderBlock>,
        factors: FreqFactors,
    ) -> Self {
        let ropes = Ropes {
            global: Rope::new(spec, spec.rope_global, factors.one.clone()),
            // Phi-3 (the only family with factors and local layers both possible) disables
            // its window, so local layers never need LongRoPE factors.
            local: Rope::new(spec, spec.rope_local, factors.one.clone()),
            global_long: factors
                .long
                .map(|f| Rope::new(spec, spec.rope_global, Some(f))),
        };
        Self {
            ropes,
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

    /// Positions a cache of `span` (opened for `capacity`) has allocated once it holds
    /// `positions`: what [`SessionKv::allocated`] will say, known before anything is allocated,
    /// so a node can refuse a session or a step its budget cannot hold.
    pub fn cache_allocation(&self, span: Range<usize>, capacity: usize, positions: usize) -> usize {
        let w = self.spec.sliding_window;
        if w > 0 && span.clone().all(|i| self.spec.is_sliding(i)) {
            capacity.min(w.saturating_add(crate::kv_cache::WINDOW_REWIND_SLACK))
        } else {
            crate::kv_cache::pages_for(positions.max(1), capacity)
        }
    }

    /// A fresh cache for `span` (a sub-range of this stack) holding up to `capacity` tokens;
    /// sliding-window blocks keep only their window.
    pub fn new_cache(&self, span: Range<usize>, capacity: usize) -> SessionKv {
        let layers = span
            .map(|i| {
                LayerKv::with_window(
                    self.spec.head_count_kv,
                    self.spec.head_dim,
                    capacity,
                    self.spec.is_sliding(i).then_some(self.spec.sliding_window),
                )
            })
            .collect();
        SessionKv::from_layers(layers, capacity)
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
        let tokens = x.tokens;
        self.forward_batch(span, x, &mut [BatchEntry { tokens, pos, kv }])
    }

    /// Whether one session's step can run on blocks `span`: the span is inside this stack, the
    /// cache is of that span and holds exactly `pos` positions, and `tokens` more fit. A
    /// scheduler checks each session with this before batching it with others, so a bad step
    /// fails alone.
    pub fn check_step(
        &self,
        span: &Range<usize>,
        tokens: usize,
        kv: &SessionKv,
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
        if tokens == 0 {
            return Err(ModelError::Shape("a step of zero tokens".into()));
        }
        if kv.len() != pos {
            return Err(ModelError::Position {
                got: pos,
                expected: kv.len(),
            });
        }
        let needed = pos + tokens;
        if needed > kv.capacity() {
            return Err(ModelError::CacheFull {
                needed,
                capacity: kv.capacity(),
            });
        }
        Ok(())
    }

    /// Runs blocks `span` for several sessions at once: `x` holds their rows one session after
    /// the other (`entries[i].tokens` rows each, positions `entries[i].pos..`), and every weight
    /// product runs over all rows together, so each weight row is read once for the whole
    /// batch. Each session's rows come out bit-identical to running it alone: the kernels
    /// compute every row independently of the others (tested), and RoPE, the cache and
    /// attention are per session. On an error no session's cache is to be trusted for this
    /// step ([`Self::check_step`] each entry first to keep one bad step from failing others).
    pub fn forward_batch(
        &self,
        span: Range<usize>,
        x: &mut Hidden,
        entries: &mut [BatchEntry],
    ) -> Result<()> {
        let rows: usize = entries.iter().map(|e| e.tokens).sum();
        if x.dim != self.spec.embedding_length || x.tokens == 0 || x.tokens != rows {
            return Err(ModelError::Shape(format!(
                "hidden state {}x{} for a model of width {} and a batch of {rows} rows",
                x.tokens, x.dim, self.spec.embedding_length
            )));
        }
        for e in entries.iter() {
            self.check_step(&span, e.tokens, e.kv, e.pos)?;
        }
        let first = span.start - self.range.start;
        let blocks = &self.blocks[first..first + span.len()];
        let any_global = blocks.iter().any(|b| b.window.is_none());
        let any_local = blocks.iter().any(|b| b.window.is_some());
        let mut start = 0;
        let segments: Vec<Segment> = entries
            .iter()
            .map(|e| {
                // LongRoPE picks its factors by the session's length, as llama.cpp does by its
                // context size: every peer of a session sees the same capacity, so they agree.
                let global = match &self.ropes.global_long {
                    Some(long) if e.kv.capacity() > self.spec.rope_original_context => long,
                    _ => &self.ropes.global,
                };
                let local = &self.ropes.local;
                let table = |rope: &Rope, needed: bool| {
                    if needed {
                        rope.table(e.pos, e.tokens)
                    } else {
                        Vec::new()
                    }
                };
                let seg = Segment {
                    rows: start..start + e.tokens,
                    pos: e.pos,
                    global,
                    global_table: table(global, any_global),
                    local,
                    local_table: table(local, any_local),
                };
                start += e.tokens;
                seg
            })
            .collect();
        on_pool(|| {
            let mut scratch = Scratch::default();
            for (layer, block) in blocks.iter().enumerate() {
                block.forward(x, entries, &segments, layer, &mut scratch)?;
            }
            Ok(())
        })
    }
}

/// One session's step in a batched forward pass: `tokens` rows of the batch at positions
/// `pos..pos + tokens`, over the cache `kv`.
pub struct BatchEntry<'a> {
    pub tokens: usize,
    pub pos: usize,
    pub kv: &'a mut SessionKv,
}

/// A session's rows of the batch and its RoPE tables for global and sliding-window layers.
struct Segment<'r> {
    rows: Range<usize>,
    pos: usize,
    global: &'r Rope,
    global_table: Vec<(f32, f32)>,
    local: &'r Rope,
    local_table: Vec<(f32, f32)>,
}

impl Segment<'_> {
    fn rope(&self, sliding: bool) -> (&Rope, &[(f32, f32)]) {
        if sliding {
            (self.local, &self.local_table)
        } else {
            (self.global, &self.global_table)
        }
    }
}
