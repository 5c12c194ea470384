//! Per-session key/value cache. Weights are shared by every session; this is the only state a
//! session owns. A full-attention layer's memory grows in pages of [`KV_PAGE`] positions as the
//! session does, up to the session's declared maximum length, so a node pays for what its
//! sessions use rather than what they might reach; a sliding-window layer holds a ring sized
//! by its window from the start (it is small, and it never grows).
//! Stored as f16, like llama.cpp's default cache: half the memory of f32, and the attention
//! arithmetic (see `numerics`) is defined on f16 keys and values anyway.

use std::ops::Range;

use half::f16;

use crate::error::{ModelError, Result};

/// How many positions a sliding-window layer keeps beyond its window, so that a session can
/// roll back a little (a chat turn re-run from where the template diverges, a one-token touch)
/// without running the whole prefix again.
pub const WINDOW_REWIND_SLACK: usize = 64;

/// Positions a full-attention layer allocates at a time. Small enough that a short chat holds
/// little more than it uses, large enough that a long prompt regrows its layers only a few
/// times (each growth copies what the layer holds, once).
pub const KV_PAGE: usize = 128;

/// Positions allocated for a session that has reached `positions` (of at most `capacity`):
/// whole pages, never more than the capacity.
pub fn pages_for(positions: usize, capacity: usize) -> usize {
    positions
        .div_ceil(KV_PAGE)
        .saturating_mul(KV_PAGE)
        .min(capacity)
}

/// Keys and values of one block, laid out `[kv_head][slot][head_dim]` so attention scans one
/// head's history contiguously.
///
/// A full-attention layer has one slot per position of the session, allocated a page at a time
/// (growing relays the slots out with the new stride). A sliding-window layer
/// keeps only its window (plus [`WINDOW_REWIND_SLACK`]) in a ring: position `p` lives in slot
/// `p % slots`, so its memory follows the window, not the session's length. The ring is
/// written twice (slots `s` and `s + slots`), so any run of up to `slots` consecutive positions
/// is one contiguous slice and attention reads it in place, oldest first.
#[derive(Clone)]
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    heads: usize,
    head_dim: usize,
    slots: usize,
    window: Option<usize>,
    /// Most positions the session may reach.
    capacity: usize,
    /// Positions seen so far.
    len: usize,
    /// Positions still stored: `len - held..len`.
    held: usize,
    /// Storage per head in slots: `slots`, or twice that for the mirrored ring.
    stride: usize,
}

impl LayerKv {
    pub fn new(heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self::with_window(heads, head_dim, capacity, None)
    }

    /// A layer cache that keeps only the last `window` positions (plus the rewind slack) when
    /// `window` is given.
    pub fn with_window(
        heads: usize,
        head_dim: usize,
        capacity: usize,
        window: Option<usize>,
    ) -> Self {
        let window = window.filter(|&w| w > 0);
        let (slots, copies) = match window {
            Some(w) => (capacity.min(w.saturating_add(WINDOW_REWIND_SLACK)), 2),
            None => (pages_for(1, capacity), 1),
        };
        let n = heads * head_dim * slots * copies;
        Self {
            k: vec![f16::ZERO; n],
            v: vec![f16::ZERO; n],
            heads,
            head_dim,
            slots,
            window,
            capacity,
            len: 0,
            held: 0,
            stride: slots * copies,
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

    /// Positions this layer has memory for now (a window layer: its ring).
    pub fn allocated(&self) -> usize {
        self.slots
    }

    /// Makes room for `positions` positions (page-rounded, at most the capacity) in a
    /// full-attention layer; a window layer's ring already holds what it ever will.
    pub fn grow_to(&mut self, positions: usize) {
        if self.window.is_some() || positions <= self.slots {
            return;
        }
        let slots = pages_for(positions, self.capacity);
        if slots <= self.slots {
            return;
        }
        let hd = self.head_dim;
        let n = self.heads * slots * hd;
        let (mut k, mut v) = (vec![f16::ZERO; n], vec![f16::ZERO; n]);
        let used = self.len.min(self.slots) * hd;
        for h in 0..self.heads {
            let (from, to) = (h * self.stride * hd, h * slots * hd);
            k[to..to + used].copy_from_slice(&self.k[from..from + used]);
            v[to..to + used].copy_from_slice(&self.v[from..from + used]);
        }
        (self.k, self.v) = (k, v);
        self.slots = slots;
        self.stride = slots;
    }

    /// The sliding window, if this is a sliding-window layer.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// The first position whose keys are still stored.
    pub fn first_held(&self) -> usize {
        self.len - self.held
    }

    /// Forgets everything from `pos` on; used to roll back or to replay after a failure. A
    /// sliding-window layer may no longer hold the window that a query at `pos` needs; the
    /// next forward then fails with [`ModelError::Rewind`] rather than compute wrong numbers.
    pub fn truncate(&mut self, pos: usize) {
        if pos < self.len {
            self.held = self.held.saturating_sub(self.len - pos);
            self.len = pos;
        }
    }

    /// How many tokens one append may carry so that no key a query of the same step needs is
    /// overwritten before that query reads it: a window layer runs long steps in such chunks.
    pub fn max_append(&self) -> usize {
        match self.window {
            // A ring as long as the session never overwrites anything.
            Some(w) if self.slots < self.capacity => self.slots + 1 - w.min(self.slots),
            _ => usize::MAX,
        }
    }

    /// Checks that a step at `pos` finds every key it must attend to.
    pub fn check_continues(&self, pos: usize) -> Result<()> {
        if pos != self.len {
            return Err(ModelError::Position {
                got: pos,
                expected: self.len,
            });
        }
        let needed = match self.window {
            Some(w) => pos.saturating_sub(w - 1),
            None => 0,
        };
        if self.first_held() > needed {
            return Err(ModelError::Rewind {
                pos,
                floor: self.first_held(),
            });
        }
        Ok(())
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
        self.grow_to(needed);
        let hd = self.head_dim;
        // Only the last `slots` positions survive; older ones would be overwritten anyway.
        let skip = tokens.saturating_sub(self.slots);
        let mirrored = self.stride > self.slots;
        for t in skip..tokens {
            let slot = (self.len + t) % self.slots;
            for h in 0..self.heads {
                let src = t * width + h * hd;
                for copy in [slot, slot + self.slots]
                    .into_iter()
                    .take(1 + mirrored as usize)
                {
                    let dst = (h * self.stride + copy) * hd;
                    for (d, s) in self.k[dst..dst + hd].iter_mut().zip(&k[src..src + hd]) {
                        *d = f16::from_f32(*s);
                    }
                    for (d, s) in self.v[dst..dst + hd].iter_mut().zip(&v[src..src + hd]) {
                        *d = f16::from_f32(*s);
                    }
                }
            }
        }
        self.len = needed;
        self.held = (self.held + tokens).min(self.slots);
        Ok(())
    }

    /// Keys of `head` for positions `0..len`, `[len, head_dim]`, of a full-attention layer (a
    /// sliding-window layer answers with [`LayerKv::run`]).
    pub fn keys(&self, head: usize, len: usize) -> &[f16] {
        let start = head * self.stride * self.head_dim;
        &self.k[start..start + len.min(self.slots) * self.head_dim]
    }

    pub fn values(&self, head: usize, len: usize) -> &[f16] {
        let start = head * self.stride * self.head_dim;
        &self.v[start..start + len.min(self.slots) * self.head_dim]
    }

    /// Keys and values of `head` for the stored positions `positions`, oldest first, as one
    /// contiguous run (positions not held are left out).
    pub fn run(&self, head: usize, positions: Range<usize>) -> (&[f16], &[f16]) {
        let from = positions.start.max(self.first_held());
        let to = positions.end.min(self.len).max(from);
        let hd = self.head_dim;
        let a = head * self.stride + from % self.slots;
        let run = a * hd..(a + to - from) * hd;
        (&self.k[run.clone()], &self.v[run])
    }

    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f16>()
    }
}

/// The caches of a contiguous run of blocks for one session.
#[derive(Clone)]
pub struct SessionKv {
    pub layers: Vec<LayerKv>,
    capacity: usize,
}

impl SessionKv {
    /// Full-attention caches for `blocks` blocks.
    pub fn new(blocks: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..blocks)
                .map(|_| LayerKv::new(heads, head_dim, capacity))
                .collect(),
            capacity,
        }
    }

    /// Caches of layers built by the caller (some may be sliding-window layers).
    pub fn from_layers(layers: Vec<LayerKv>, capacity: usize) -> Self {
        Self { layers, capacity }
    }

    /// Number of positions cached (equal in every layer by construction).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most positions the session may reach (what it was opened with).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn truncate(&mut self, pos: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(pos));
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Positions the session has memory for now: what a node's cache budget is charged.
    pub fn allocated(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.window().is_none())
            .map(LayerKv::allocated)
            .max()
            .unwrap_or_else(|| self.layers.first().map_or(0, LayerKv::allocated))
    }

    /// What [`SessionKv::allocated`] becomes once the session holds `positions` positions.
    pub fn allocated_for(&self, positions: usize) -> usize {
        if self.layers.iter().all(|l| l.window().is_some()) {
            return self.allocated();
        }
        self.allocated().max(pages_for(positions, self.capacity))
    }

    /// Allocates what `positions` positions need in every layer, so that a step's memory is
    /// taken (and charged) before it runs rather than midway through it.
    pub fn grow_to(&mut self, positions: usize) {
        self.layers.iter_mut().for_each(|l| l.grow_to(positions));
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

    #[test]
    fn a_full_layer_grows_by_pages_and_keeps_what_it_holds() {
        let capacity = 3 * KV_PAGE + 5;
        let mut kv = LayerKv::new(2, 2, capacity);
        assert_eq!(kv.allocated(), KV_PAGE);
        assert_eq!(kv.bytes(), 2 * 2 * KV_PAGE * 2 * 2);
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from..from + n)
                .flat_map(|p| [p as f32, 0.5, -(p as f32), 1.5])
                .collect()
        };
        // One position past the first page takes a second page, then a third.
        kv.append(&rows(0, KV_PAGE + 1), &rows(0, KV_PAGE + 1), KV_PAGE + 1)
            .unwrap();
        assert_eq!(kv.allocated(), 2 * KV_PAGE);
        kv.append(
            &rows(KV_PAGE + 1, KV_PAGE),
            &rows(KV_PAGE + 1, KV_PAGE),
            KV_PAGE,
        )
        .unwrap();
        assert_eq!(kv.allocated(), 3 * KV_PAGE);
        // Every position of both heads reads back after two relayouts.
        let len = 2 * KV_PAGE + 1;
        let want = |head: usize| -> Vec<f16> {
            (0..len)
                .flat_map(|p| {
                    let r = &rows(p, 1)[head * 2..head * 2 + 2];
                    [f16::from_f32(r[0]), f16::from_f32(r[1])]
                })
                .collect()
        };
        assert_eq!(kv.keys(0, len), &want(0)[..]);
        assert_eq!(kv.values(1, len), &want(1)[..]);
        // The last page stops at the capacity.
        kv.grow_to(capacity);
        assert_eq!(kv.allocated(), capacity);
        assert_eq!(kv.keys(1, len), &want(1)[..]);
        // Truncating keeps the memory: a replay reuses it.
        kv.truncate(3);
        assert_eq!(kv.allocated(), capacity);
    }

    #[test]
    fn a_session_is_charged_whole_pages() {
        let mut s = SessionKv::new(2, 1, 2, 1000);
        assert_eq!(s.allocated(), KV_PAGE);
        assert_eq!(s.allocated_for(KV_PAGE + 1), 2 * KV_PAGE);
        assert_eq!(s.allocated_for(10), KV_PAGE);
        s.grow_to(999);
        assert_eq!((s.allocated(), s.allocated_for(5)), (1000, 1000));
        assert_eq!(pages_for(0, 50), 0);
        assert_eq!(pages_for(1, 50), 50);
    }

    #[test]
    fn a_window_layer_keeps_only_its_window_in_a_ring() {
        // Window 2 (+ slack) over a session of 200 positions: the ring has 66 slots, mirrored.
        let mut kv = LayerKv::with_window(1, 2, 200, Some(2));
        assert_eq!(kv.bytes(), 2 * 2 * 66 * 2 * 2);
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from..from + n)
                .flat_map(|p| [p as f32, -(p as f32)])
                .collect()
        };
        kv.append(&rows(0, 70), &rows(0, 70), 70).unwrap();
        assert_eq!((kv.len(), kv.first_held()), (70, 4));
        // Positions 63..70 wrap around the ring, yet read as one run, oldest first.
        let (k, v) = kv.run(0, 63..70);
        let got: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, rows(63, 7));
        assert_eq!(v, k);
        assert_eq!(kv.max_append(), 65);
        kv.check_continues(70).unwrap();
        // Rolling back within the slack is fine; further back the window is gone.
        kv.truncate(10);
        kv.check_continues(10).unwrap();
        kv.truncate(4);
        assert!(matches!(
            kv.check_continues(4),
            Err(ModelError::Rewind { pos: 4, floor: 4 })
        ));
        // A long append keeps only what fits.
        let mut kv = LayerKv::with_window(1, 2, 1000, Some(2));
        kv.append(&rows(0, 500), &rows(0, 500), 500).unwrap();
        let (k, _) = kv.run(0, 434..500);
        let got: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, rows(434, 66));
    }
}
