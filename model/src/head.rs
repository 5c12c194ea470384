//! Final norm and LM head: hidden states to logits, on the client.

use crate::blocks::{load_vector, Hidden};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::matrix::{matmul, on_pool, Activations, QMatrix};
use crate::numerics::rms_norm;
use crate::spec::ModelSpec;

pub struct Head {
    norm: Vec<f32>,
    eps: f32,
    lm: QMatrix,
    /// Gemma's `c * tanh(logit / c)` on the output.
    softcap: Option<f32>,
}

impl Head {
    /// Uses `output.weight`, or the token embedding when the file ties them (as SmolLM2 does);
    /// `tied` is that embedding when the caller has already packed it.
    pub fn load(file: &GgufFile, spec: &ModelSpec, tied: Option<&QMatrix>) -> Result<Self> {
        let name = if spec.tied_embeddings {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let lm = match tied {
            Some(m) if spec.tied_embeddings => m.clone(),
            _ => QMatrix::new(file.tensor(name)?)?,
        };
        if lm.cols != spec.embedding_length {
            return Err(ModelError::BadTensor {
                name: name.into(),
                reason: format!("{} columns, expected {}", lm.cols, spec.embedding_length),
            });
        }
        Ok(Self {
            norm: load_vector(file, "output_norm.weight", spec.embedding_length)?,
            eps: spec.rms_eps,
            lm,
            softcap: spec.final_softcap,
        })
    }

    pub fn matrix(&self) -> &QMatrix {
        &self.lm
    }

    pub fn weight_bytes(&self) -> usize {
        self.lm.weight_bytes() + self.norm.len() * 4
    }

    /// Logits `[tokens, vocab]` for every position of `x`.
    pub fn logits(&self, x: &Hidden) -> Result<Vec<f32>> {
        let mut normed = Vec::new();
        rms_norm(&x.data, &self.norm, self.eps, &mut normed);
        let mut out = Vec::new();
        on_pool(|| {
            matmul(
                &Activations::new(&normed, x.tokens, x.dim),
                &self.lm,
                &mut out,
            )
        })?;
        if let Some(c) = self.softcap {
            crate::activation::softcap(&mut out, c);
        }
        Ok(out)
    }

    /// Logits of the last position only: what generation needs, at 1/T of the cost.
    pub fn last_logits(&self, x: &Hidden) -> Result<Vec<f32>> {
        self.logits(&x.tail(1))
    }
}
