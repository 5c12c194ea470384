//! SentencePiece-style vocabularies (`tokenizer.ggml.model = llama`: Gemma, Phi-3, Llama 2).
//!
//! Mirrors llama.cpp's `llm_tokenizer_spm_session`: spaces become `▁`, the text is split into
//! characters, and adjacent symbols are merged greedily by the score of the token they would
//! form (highest first, leftmost on ties) for as long as such a token exists. A symbol that is
//! not a token at the end falls back to its bytes as `<0xAB>` tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;

use super::{
    wrong_type, TokenizerError, ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN,
    ATTR_USER_DEFINED, KEY_SCORES,
};

/// SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

pub(super) struct Spm {
    scores: Vec<f32>,
    /// The `<0xAB>` token of each byte, or failing that the byte as a one-character token,
    /// as llama.cpp's `byte_to_token`.
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge, ordered as llama.cpp's `llm_bigram_spm::comparator` ranks them in its
/// max-heap: higher score first, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    pub(super) fn new(
        raw_scores: &[Value],
        n_tokens: usize,
        token_to_id: &HashMap<String, u32>,
        add_space_prefix: bool,
    ) -> Result<Self, TokenizerError> {
        if raw_scores.len() < n_tokens {
            return Err(TokenizerError::Invalid {
                key: KEY_SCORES,
                reason: format!("{} scores for {n_tokens} tokens", raw_scores.len()),
            });
        }
        let scores = raw_scores[..n_tokens]
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                _ => Err(wrong_type(KEY_SCORES, "array of f32")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut byte_tokens = [None; 256];
        for (b, slot) in (0u8..=255).zip(byte_tokens.iter_mut()) {
            *slot = token_to_id
                .get(&format!("<0x{b:02X}>"))
                .or_else(|| token_to_id.get(std::str::from_utf8(&[b]).ok()?))
                .copied();
        }
        Ok(Self {
            scores,
            byte_tokens,
            add_space_prefix,
        })
    }

    /// Appends the ids of one text fragment (special tokens already cut out).
    pub(super) fn encode(
        &self,
        token_to_id: &HashMap<String, u32>,
        fragment: &str,
        prev_special: bool,
        out: &mut Vec<u32>,
    ) {
        let mut text = String::with_capacity(fragment.len() + 3);
        if self.add_space_prefix && prev_special {
            text.push_str(SPACE);
        }
        text.push_str(&fragment.replace(' ', SPACE));
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_bigram(token_to_id, &text, &symbols, right - 1, right, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (bigram.left, bigram.right);
            let (l, r) = (symbols[left].len, symbols[right].len);
            if l == 0 || r == 0 || l + r != bigram.size {
                continue;
            }
            symbols[left].len += r;
            symbols[right].len = 0;
            let after = symbols[right].next;
            symbols[left].next = after;
            if let Some(after) = after {
                symbols[after].prev = Some(left);
            }
            if let Some(before) = symbols[left].prev {
                self.push_bigram(token_to_id, &text, &symbols, before, left, &mut queue);
            }
            if let Some(after) = after {
                self.push_bigram(token_to_id, &text, &symbols, left, after, &mut queue);
            }
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let s = &symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match token_to_id.get(piece) {
                Some(&id) => out.push(id),
                // Every merged symbol is a token, so only a single character lands here.
                // llama.cpp throws for a byte with no token at all; it is dropped instead.
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = s.next;
        }
    }

    fn push_bigram(
        &self,
        token_to_id: &HashMap<String, u32>,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (&symbols[left], &symbols[right]);
        let size = l.len + r.len;
        let Some(&id) = token_to_id.get(&text[l.start..l.start + size]) else {
            return;
        };
        if let Some(&score) = self.scores.get(id as usize) {
            queue.push(Bigram {
                score,
                left,
                right,
                size,
            });
        }
    }
}

/// llama.cpp's `token_to_piece` for a SentencePiece vocabulary (with `special = true`).
pub(super) fn token_piece(text: &str, attr: u8) -> Vec<u8> {
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if attr & ATTR_NORMAL != 0 {
        return text.replace(SPACE, " ").into_bytes();
    }
    if attr & ATTR_BYTE != 0 {
        return text
            .get(3..5)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .map(|b| vec![b])
            .unwrap_or_default();
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use super::*;

    /// A toy SentencePiece vocabulary: byte tokens for "\n" and "é"'s bytes, pieces with
    /// scores that make the merge order matter.
    fn tokenizer(add_space_prefix: bool) -> Tokenizer {
        let tokens: &[(&str, f32, i32)] = &[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x0A>", 0.0, 6),
            ("<0xC3>", 0.0, 6),
            ("<0xA9>", 0.0, 6),
            ("▁", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -2.0, 1),
            ("c", -2.0, 1),
            ("ab", -5.0, 1),
            ("bc", -3.0, 1),
            ("abc", -4.0, 1),
            ("▁a", -1.5, 1),
            ("<start_of_turn>", 0.0, 3),
        ];
        let md = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(tokens.iter().map(|t| Value::String(t.0.into())).collect()),
            ),
            (
                KEY_SCORES.to_string(),
                Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
            ),
            (
                "tokenizer.ggml.add_space_prefix".to_string(),
                Value::Bool(add_space_prefix),
            ),
        ]);
        Tokenizer::from_gguf(&md).expect("toy vocabulary is valid")
    }

    #[test]
    fn merges_follow_scores_then_position() {
        let tok = tokenizer(false);
        // "bc" (-3) beats "ab" (-5); then "a"+"bc" forms "abc".
        assert_eq!(tok.encode("abc", true).unwrap(), [12]);
        // "b a": the space is "▁", and "▁a" merges; "b" stays alone.
        assert_eq!(tok.encode("b a", true).unwrap(), [8, 13]);
        // Defaults of SentencePiece vocabularies: BOS 1, EOS 2, BOS added.
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.add_bos()), (1, 2, true));
    }

    #[test]
    fn space_prefix_only_at_start_and_after_specials() {
        let tok = tokenizer(true);
        assert_eq!(tok.encode("a", true).unwrap(), [13]);
        assert_eq!(
            tok.encode("<start_of_turn>a<start_of_turn>", true).unwrap(),
            [14, 13, 14]
        );
        assert_eq!(tokenizer(false).encode("a", true).unwrap(), [7]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_and_decode_back() {
        let tok = tokenizer(false);
        let ids = tok.encode("é\na", true).unwrap();
        assert_eq!(ids, [4, 5, 3, 7]);
        assert_eq!(tok.decode(&ids), "é\na");
        assert_eq!(tok.decode(&[6, 13]), "  a");
        // A character with neither a token nor byte tokens disappears, as nothing can encode it.
        assert_eq!(tok.encode("z", true).unwrap(), Vec::<u32>::new());
    }
}
