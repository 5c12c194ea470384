//! A SentencePiece-style vocabulary of exactly the requested size that segments plain English
//! text into real pieces (not byte fallbacks), built from the alphabet alone.
//!
//! Why not a real vocabulary: the full-size synthetic files must be made here, with no model
//! hub. What matters for the tests is that llama.cpp and our tokenizer see the same ordinary
//! text as the same mostly multi-letter pieces, and that the vocabulary has the 32000 rows of
//! a Llama-2/Mistral embedding. Every piece is reachable by merges of shorter pieces, and every
//! score is distinct, so the merge order never depends on tie-breaking.

/// Token types as llama.cpp numbers them.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const BYTE: i32 = 6;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// SentencePiece's word-boundary marker.
const SPACE: &str = "\u{2581}";

/// One vocabulary entry: its text, score and type.
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: i32,
}

/// `size` entries: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces from short to long
/// (single characters, `▁x`, letter pairs, `▁xy`, letter triples, `▁xyz`, ...) until `size`.
/// Scores fall with the id, so shorter, earlier pieces merge first, as in a trained vocabulary.
///
/// `size` must be at least 259 + the single characters (the caller's shapes are 32000).
pub fn pieces(size: usize) -> Vec<Piece> {
    let mut out = Vec::with_capacity(size);
    for (text, kind) in [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)] {
        out.push(Piece {
            text: text.into(),
            score: 0.0,
            kind,
        });
    }
    for b in 0..=255u8 {
        out.push(Piece {
            text: format!("<0x{b:02X}>"),
            score: 0.0,
            kind: BYTE,
        });
    }
    let lower: Vec<char> = ('a'..='z').collect();
    let mut texts: Vec<String> = vec![SPACE.to_string()];
    let printable = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(".,;:!?'\"()-".chars());
    texts.extend(printable.map(String::from));
    texts.extend(('a'..='z').chain('A'..='Z').map(|c| format!("{SPACE}{c}")));
    let pairs: Vec<String> = lower
        .iter()
        .flat_map(|a| lower.iter().map(move |b| format!("{a}{b}")))
        .collect();
    texts.extend(pairs.iter().cloned());
    texts.extend(pairs.iter().map(|p| format!("{SPACE}{p}")));
    // Triples and spaced triples interleaved, so a vocabulary cut short still has both kinds.
    'fill: for p in &pairs {
        for c in &lower {
            for text in [format!("{p}{c}"), format!("{SPACE}{p}{c}")] {
                if out.len() + texts.len() >= size {
                    break 'fill;
                }
                texts.push(text);
            }
        }
    }
    let first = out.len();
    for (i, text) in texts.into_iter().enumerate() {
        if out.len() == size {
            break;
        }
        out.push(Piece {
            text,
            score: -((first + i) as f32),
            kind: NORMAL,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_unique_texts_distinct_scores() {
        let v = pieces(32000);
        assert_eq!(v.len(), 32000);
        let texts: std::collections::HashSet<&str> = v.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts.len(), v.len(), "every piece is distinct");
        let normal: Vec<f32> = v
            .iter()
            .filter(|p| p.kind == NORMAL)
            .map(|p| p.score)
            .collect();
        assert!(
            normal.windows(2).all(|w| w[0] > w[1]),
            "scores strictly fall"
        );
        assert!(
            texts.contains("\u{2581}the"),
            "common words are single pieces"
        );
    }
}
