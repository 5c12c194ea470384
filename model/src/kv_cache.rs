//! Per-session key/value cache. Weights are shared by every session; this is the only state a
//! session owns, so it is sized once, up front, from the session's declared maximum length.
//! Stored as f16, like llama.cpp's default cache: half the memory of f32, and the attention
//! arithmetic (see `numerics`) is defined on f16 keys and values anyway.

use half::f16;

use crate::error::{ModelError, Result};

/// Keys and values of one block, laid out `[kv_head][position][head_dim]` so attention scans one
/// head's history contiguously.
#[derive(Clone)]
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl LayerKv {
    pub fn new(heads: usize, head_dim: usize, capacity: usize) -> Self {
        let n = heads * head_dim * capacity;
        Self {
            k: vec![f16::ZERO; n],
            v: vec![f16::ZERO; n],
            heads,
            head_dim,
            capacity,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything from `pos` on; used to roll back or to replay after a failure.
    pub fn truncate(&mut self, pos: usize) {
        self.len = self.len.min(pos);
    }

    /// Appends `tokens` rows of keys and values (`[tokens, heads * head_dim]` each).
    pub fn append(&mut self, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        let needed = self.len + tokens;
        if needed > self.capacity {
            return Err(ModelError::CacheFull {
                needed,
                capacity: self.capacity,
            });
        }
        let width = self.heads * self.head_dim;
        if k.len() != tokens * width || v.len() != tokens * width {
            return Err(ModelError::Shape(format!(
                "kv append of {tokens} tokens needs {} values",
                tokens * width
            )));
        }
        let hd = self.head_dim;
        for t in 0..tokens {
            let pos = self.len + t;
            for h in 0..self.heads {
                let src = t * width + h * hd;
                let dst = (h * self.capacity + pos) * hd;
                for (d, s) in self.k[dst..dst + hd].iter_mut().zip(&k[src..src + hd]) {
                    *d = f16::from_f32(*s);
                }
                for (d, s) in self.v[dst..dst + hd].iter_mut().zip(&v[src..src + hd]) {
                    *d = f16::from_f32(*s);
                }
            }
        }
        self.len = needed;
        Ok(())
    }

    /// Keys of `head` for positions `0..len`, `[len, head_dim]`.
    pub fn keys(&self, head: usize, len: usize) -> &[f16] {
        let start = head * self.capacity * self.head_dim;
        &self.k[start..start + len * self.head_dim]
    }

    pub fn values(&self, head: usize, len: usize) -> &[f16] {
        let start = head * self.capacity * self.head_dim;
        &self.v[start..start + len * self.head_dim]
    }

    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f16>()
    }
}

/// The caches of a contiguous run of blocks for one session.
#[derive(Clone)]
pub struct SessionKv {
    pub layers: Vec<LayerKv>,
}

impl SessionKv {
    pub fn new(blocks: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..blocks)
                .map(|_| LayerKv::new(heads, head_dim, capacity))
                .collect(),
        }
    }

    /// Number of positions cached (equal in every layer by construction).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::capacity)
    }

    pub fn truncate(&mut self, pos: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(pos));
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_truncate_and_overflow() {
        let mut kv = LayerKv::new(2, 4, 3);
        let k: Vec<f32> = (0..16).map(|x| x as f32).collect();
        kv.append(&k, &k, 2).unwrap();
        assert_eq!(kv.len(), 2);
        let f = |xs: &[f32]| xs.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        assert_eq!(
            kv.keys(1, 2),
            f(&[4.0, 5.0, 6.0, 7.0, 12.0, 13.0, 14.0, 15.0])
        );
        assert!(matches!(
            kv.append(&k, &k, 2),
            Err(ModelError::CacheFull {
                needed: 4,
                capacity: 3
            })
        ));
        kv.truncate(1);
        kv.append(&k, &k, 2).unwrap();
        assert_eq!(
            kv.keys(0, 3),
            f(&[0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0])
        );
    }
}
