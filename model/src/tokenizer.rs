//! The tokenizer rebuilt from GGUF metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`:
//! SmolLM2, Qwen, Llama 3) or SentencePiece-style (`llama`: Gemma, Phi-3, Llama 2; see
//! [`spm`]).
//!
//! Every node and the coordinator must agree with llama.cpp on token ids (the reference
//! generations were produced with it), so the BPE path mirrors `llm_tokenizer_bpe` in
//! llama.cpp's `src/llama-vocab.cpp` and `unicode_regex_split` in `src/unicode.cpp` step by step:
//!
//! 1. special tokens are cut out of the raw text, longest first (`tokenizer_st_partition`);
//! 2. each remaining fragment is split by the pre-tokenizer regexes, applied in sequence;
//! 3. each piece is mapped through GPT-2's byte-to-unicode table and merged by BPE rank;
//! 4. a merged symbol missing from the vocabulary falls back to single-byte tokens.
//!
//! The GGUF file is untrusted input: every id and array read from it is checked, and
//! nothing here panics on malformed metadata.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use fancy_regex::Regex;

mod spm;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub(crate) const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

// Token attributes as bit flags, like llama.cpp's `llama_token_attr`: a token can be e.g.
// NORMAL and CONTROL at once after the end-of-generation override below.
pub(crate) const ATTR_UNKNOWN: u8 = 1 << 0;
pub(crate) const ATTR_UNUSED: u8 = 1 << 1;
pub(crate) const ATTR_NORMAL: u8 = 1 << 2;
pub(crate) const ATTR_CONTROL: u8 = 1 << 3;
pub(crate) const ATTR_USER_DEFINED: u8 = 1 << 4;
pub(crate) const ATTR_BYTE: u8 = 1 << 5;

/// Token texts llama.cpp treats as end of generation whatever the metadata says (its
/// `special_eog_ids` heuristics, including the FIM pad/repo/file-separator tokens). Chat
/// models often end a turn with one of these rather than with the declared EOS.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

// Pre-tokenizer regexes, copied verbatim from llama.cpp's `llm_tokenizer_bpe` constructor.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(&'static str),
    #[error("GGUF metadata key `{key}` has the wrong type: expected {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
    #[error("GGUF metadata key `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    Unsupported(String),
    #[error("pre-tokenizer regex failed: {0}")]
    Regex(#[from] Box<fancy_regex::Error>),
}

/// How a raw text fragment is cut into words before BPE, per `tokenizer.ggml.pre`.
struct PreTokenizer {
    regexes: Vec<Regex>,
    /// llama.cpp's `ignore_merges`: a word that is itself a vocabulary entry becomes that
    /// token without running BPE (Llama 3 vocabularies hold whole words BPE would not build).
    ignore_merges: bool,
}

impl PreTokenizer {
    /// Returns the pre-tokenizer for a `tokenizer.ggml.pre` name and llama.cpp's default
    /// for `add_bos_token` with it (used when the file does not say).
    fn for_name(name: Option<&str>) -> Result<(Self, bool), TokenizerError> {
        let (patterns, ignore_merges, add_bos): (&[&str], bool, bool) = match name {
            None => {
                tracing::warn!("GGUF has no `{KEY_PRE}`; using llama.cpp's `default` pre-tokenizer, tokenization may be degraded");
                (&DEFAULT_PATTERNS, false, false)
            }
            Some("default") => (&DEFAULT_PATTERNS, false, false),
            Some(
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva-7b" | "mellum2",
            ) => (&[r"\p{N}", RE_GPT2], false, false),
            Some(
                "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
                | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en"
                | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion"
                | "granite-docling" | "exaone4",
            ) => (&[RE_GPT2], false, false),
            Some(
                "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
                | "midm-2.0" | "lfm2" | "jina-v5-nano",
            ) => (&[RE_LLAMA3], true, true),
            Some("dbrx" | "smaug-bpe") => (&[RE_LLAMA3], false, false),
            Some(
                "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez"
                | "hunyuan" | "solar-open",
            ) => (&[RE_QWEN2], false, false),
            Some(other) => {
                tracing::warn!("unknown pre-tokenizer `{other}`; falling back to the GPT-2 regex, tokenization may differ from llama.cpp");
                (&[RE_GPT2], false, false)
            }
        };
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p))
            .collect::<Result<_, _>>()
            .map_err(Box::new)?;
        Ok((
            PreTokenizer {
                regexes,
                ignore_merges,
            },
            add_bos,
        ))
    }

    /// Splits like llama.cpp's `unicode_regex_split`: each regex re-splits every fragment the
    /// previous one produced, and text between matches is kept as a fragment of its own.
    /// Regexes run on each fragment alone, so `(?!\S)` sees a fragment's end as end of text.
    fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, TokenizerError> {
        let mut fragments = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(fragments.len() * 2);
            for fragment in fragments {
                let mut last = 0;
                for m in re.find_iter(fragment) {
                    let m = m.map_err(Box::new)?;
                    if m.start() > last {
                        next.push(&fragment[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < fragment.len() {
                    next.push(&fragment[last..]);
                }
            }
            fragments = next;
        }
        Ok(fragments)
    }
}

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT`, used when a file names no pre-tokenizer.
const DEFAULT_PATTERNS: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    "[0-9][0-9][0-9]",
];

/// GPT-2's reversible byte-to-char table: printable Latin-1 bytes stand for themselves and
/// the others move to U+0100.., so vocabulary entries never contain raw spaces or controls.
fn byte_to_char_table() -> [char; 256] {
    let mut table = [char::REPLACEMENT_CHARACTER; 256];
    let mut shifted = 256u32;
    for (byte, slot) in (0u8..=255).zip(table.iter_mut()) {
        let code = if matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
            u32::from(byte)
        } else {
            shifted += 1;
            shifted - 1
        };
        *slot = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// A piece of input after special-token partitioning.
enum Fragment<T> {
    Text(T),
    Token(u32),
}

/// Stands for a marked part in text given to [`Tokenizer::encode_marked`]: the mark, the
/// part's index in decimal, the mark. A noncharacter of the last private-use plane, so real
/// text has no reason to hold it (and where it does, it is marked itself).
pub const LITERAL_MARK: char = '\u{10FFFD}';

/// The parts of a text that [`Tokenizer::mark_literal`] replaced by markers.
#[derive(Clone, Debug, Default)]
pub struct Literals {
    texts: Vec<String>,
}

impl Literals {
    /// Appends a marker standing for `text` to `out`.
    fn mark(&mut self, text: &str, out: &mut String) {
        out.push(LITERAL_MARK);
        out.push_str(&self.texts.len().to_string());
        out.push(LITERAL_MARK);
        self.texts.push(text.to_string());
    }

    /// `text` with its markers replaced by what they stand for; a marker that is not one of
    /// ours (a template that writes the mark itself) stays as it is.
    fn unmark<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        const MARK: usize = LITERAL_MARK.len_utf8();
        if !text.contains(LITERAL_MARK) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(LITERAL_MARK) {
            out.push_str(&rest[..at]);
            let after = &rest[at + MARK..];
            let found = after.find(LITERAL_MARK).and_then(|end| {
                let digits = &after[..end];
                let index: usize = digits
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| digits.parse().ok())??;
                Some((self.texts.get(index)?, end))
            });
            match found {
                Some((literal, end)) => {
                    out.push_str(literal);
                    rest = &after[end + MARK..];
                }
                None => {
                    out.push(LITERAL_MARK);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        std::borrow::Cow::Owned(out)
    }
}

/// A run of the word being merged; symbols form a linked list as in llama.cpp.
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge. Field order is the priority: lowest rank first, then leftmost, which is
/// llama.cpp's `llm_bigram_bpe::comparator`. The lengths detect candidates made stale by an
/// earlier merge of either side.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_len: usize,
    right_len: usize,
}

/// A GGUF vocabulary ready to encode prompts and decode generated ids. Immutable once built,
/// so one instance can be shared across threads.
pub struct Tokenizer {
    tokens: Vec<String>,
    attrs: Vec<u8>,
    /// What each token prints as, precomputed like llama.cpp's `cache_token_to_piece`.
    pieces: Vec<Vec<u8>>,
    token_to_id: HashMap<String, u32>,
    /// Tokens cut out of raw text before BPE, longest first.
    special_ids: Vec<u32>,
    end_of_generation: HashSet<u32>,
    kind: Kind,
    bos: u32,
    eos: u32,
    add_bos: bool,
}

/// What differs between the two vocabulary types once special tokens are cut out.
// One per tokenizer, never moved in a loop: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Bpe {
        /// Merge rank keyed by the merge line itself ("left right"). Symbols never contain a
        /// space (the byte table maps it to 'Ġ'), so "left right" identifies the pair exactly.
        merge_ranks: HashMap<String, u32>,
        pre: PreTokenizer,
        byte_to_char: [char; 256],
    },
    Spm(spm::Spm),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field(
                "kind",
                &match &self.kind {
                    Kind::Bpe { .. } => "bpe",
                    Kind::Spm(_) => "spm",
                },
            )
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, TokenizerError> {
        let model = get_str(md, KEY_MODEL)?.ok_or(TokenizerError::MissingKey(KEY_MODEL))?;
        let is_spm = match model {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::Unsupported(other.to_string())),
        };
        // SentencePiece vocabularies have no pre-tokenizer and add BOS unless told otherwise.
        let (pre, default_add_bos) = if is_spm {
            (None, true)
        } else {
            let (pre, add_bos) = PreTokenizer::for_name(get_str(md, KEY_PRE)?)?;
            (Some(pre), add_bos)
        };

        let raw_tokens = get_array(md, KEY_TOKENS)?;
        let n_tokens = u32::try_from(raw_tokens.len()).map_err(|_| TokenizerError::Invalid {
            key: KEY_TOKENS,
            reason: format!("{} tokens do not fit in u32 ids", raw_tokens.len()),
        })?;
        let mut tokens = Vec::with_capacity(raw_tokens.len());
        let mut token_to_id = HashMap::with_capacity(raw_tokens.len());
        for (id, value) in (0..n_tokens).zip(raw_tokens) {
            let Value::String(text) = value else {
                return Err(wrong_type(KEY_TOKENS, "array of strings"));
            };
            // llama.cpp renames empty tokens so they can never match (or loop) anywhere.
            let text = if text.is_empty() {
                format!("[EMPTY_{id}]")
            } else {
                text.clone()
            };
            if let Some(first) = token_to_id.insert(text.clone(), id) {
                return Err(TokenizerError::Invalid {
                    key: KEY_TOKENS,
                    reason: format!("duplicate token {text:?} has ids {first} and {id}"),
                });
            }
            tokens.push(text);
        }

        let raw_types = get_array(md, KEY_TOKEN_TYPE)?;
        if raw_types.len() < tokens.len() {
            return Err(TokenizerError::Invalid {
                key: KEY_TOKEN_TYPE,
                reason: format!("{} types for {} tokens", raw_types.len(), tokens.len()),
            });
        }
        let mut attrs = Vec::with_capacity(tokens.len());
        for value in &raw_types[..tokens.len()] {
            let ty = as_i64(value).ok_or_else(|| wrong_type(KEY_TOKEN_TYPE, "array of i32"))?;
            attrs.push(match ty {
                1 => ATTR_NORMAL,
                2 => ATTR_UNKNOWN,
                3 => ATTR_CONTROL,
                4 => ATTR_USER_DEFINED,
                5 => ATTR_UNUSED,
                6 => ATTR_BYTE,
                _ => 0,
            });
        }

        let mut merge_ranks = HashMap::new();
        if !is_spm {
            for (rank, value) in (0u32..).zip(get_array(md, KEY_MERGES)?) {
                let Value::String(line) = value else {
                    return Err(wrong_type(KEY_MERGES, "array of strings"));
                };
                // llama.cpp splits at the first space after the first byte; a line without
                // one becomes an empty pair that no symbol can ever match, so it is skipped.
                if line.bytes().skip(1).any(|b| b == b' ') {
                    merge_ranks.entry(line.clone()).or_insert(rank);
                }
            }
        }

        // llama.cpp's defaults for SentencePiece vocabularies that do not name BOS/EOS.
        let default_id = |id: u32| (is_spm && id < n_tokens).then_some(id);
        let bos = get_id(md, KEY_BOS, n_tokens)?
            .or(default_id(1))
            .ok_or(TokenizerError::MissingKey(KEY_BOS))?;
        let eos = get_id(md, KEY_EOS, n_tokens)?
            .or(default_id(2))
            .ok_or(TokenizerError::MissingKey(KEY_EOS))?;
        let add_bos = match md.get(KEY_ADD_BOS) {
            None => default_add_bos,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(wrong_type(KEY_ADD_BOS, "bool")),
        };

        let mut end_of_generation: HashSet<u32> = [
            Some(eos),
            get_id(md, KEY_EOT, n_tokens)?,
            get_id(md, KEY_EOM, n_tokens)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        for text in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                end_of_generation.insert(id);
                // llama.cpp forces these to control type, which also makes them special.
                if let Some(attr) = attrs.get_mut(id as usize) {
                    *attr |= ATTR_CONTROL;
                }
            }
        }

        let mut special_ids: Vec<u32> = (0..n_tokens)
            .zip(&attrs)
            .filter(|(_, &a)| a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .map(|(id, _)| id)
            .collect();
        special_ids.sort_by_key(|&id| Reverse(tokens.get(id as usize).map_or(0, String::len)));

        let byte_to_char = byte_to_char_table();
        let char_to_byte: HashMap<char, u8> =
            (0u8..=255).zip(byte_to_char).map(|(b, c)| (c, b)).collect();
        let pieces = tokens
            .iter()
            .zip(&attrs)
            .map(|(text, &attr)| {
                if is_spm {
                    spm::token_piece(text, attr)
                } else {
                    token_piece(text, attr, &char_to_byte)
                }
            })
            .collect();

        let kind = match pre {
            Some(pre) => Kind::Bpe {
                merge_ranks,
                pre,
                byte_to_char,
            },
            None => {
                let add_space_prefix = match md.get(KEY_ADD_SPACE_PREFIX) {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(wrong_type(KEY_ADD_SPACE_PREFIX, "bool")),
                };
                Kind::Spm(spm::Spm::new(
                    get_array(md, KEY_SCORES)?,
                    tokens.len(),
                    &token_to_id,
                    add_space_prefix,
                )?)
            }
        };

        Ok(Tokenizer {
            tokens,
            attrs,
            pieces,
            token_to_id,
            special_ids,
            end_of_generation,
            kind,
            bos,
            eos,
            add_bos,
        })
    }

    /// Tokenizes `text` without adding BOS (see [`Tokenizer::add_bos`]). With `parse_special`
    /// false, control tokens in the text are tokenized as plain text, as in llama.cpp (which
    /// still honours user-defined tokens).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let fragments = self.partition_special(text, parse_special);
        self.encode_fragments(fragments.into_iter().map(|f| match f {
            Fragment::Text(t) => Fragment::Text(std::borrow::Cow::Borrowed(t)),
            Fragment::Token(id) => Fragment::Token(id),
        }))
    }

    /// `text` (a message's content, say) ready to be placed inside markup that is tokenized
    /// with [`Tokenizer::encode_marked`]: the text of every control token in it is replaced
    /// by a marker recorded in `literals`, so that it comes out as plain text, exactly as
    /// `encode(text, false)` would see it, while the markup around it keeps its special tokens.
    /// Without control-token text (and [`LITERAL_MARK`]) in it, `text` is returned unchanged,
    /// so ordinary text tokenizes exactly as before, merges across its edges included.
    pub fn mark_literal(&self, text: &str, literals: &mut Literals) -> String {
        let mut out = String::with_capacity(text.len());
        for fragment in self.partition_special(text, true) {
            match fragment {
                Fragment::Token(id) => {
                    let token = self.tokens.get(id as usize).map_or("", String::as_str);
                    let attr = self.attrs.get(id as usize).copied().unwrap_or(0);
                    if attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                        literals.mark(token, &mut out);
                    } else {
                        // User-defined tokens are tokens in plain text too.
                        out.push_str(token);
                    }
                }
                Fragment::Text(t) => {
                    let mut rest = t;
                    while let Some(at) = rest.find(LITERAL_MARK) {
                        out.push_str(&rest[..at]);
                        literals.mark(&rest[at..at + LITERAL_MARK.len_utf8()], &mut out);
                        rest = &rest[at + LITERAL_MARK.len_utf8()..];
                    }
                    out.push_str(rest);
                }
            }
        }
        out
    }

    /// Tokenizes `text` with its special tokens parsed, except for the parts that
    /// [`Tokenizer::mark_literal`] marked: those are put back as plain text before the text
    /// around them is tokenized.
    pub fn encode_marked(
        &self,
        text: &str,
        literals: &Literals,
    ) -> Result<Vec<u32>, TokenizerError> {
        let fragments = self.partition_special(text, true);
        self.encode_fragments(fragments.into_iter().map(|f| match f {
            Fragment::Text(t) => Fragment::Text(literals.unmark(t)),
            Fragment::Token(id) => Fragment::Token(id),
        }))
    }

    /// Token ids of fragments already cut at special tokens.
    fn encode_fragments<'t>(
        &self,
        fragments: impl Iterator<Item = Fragment<std::borrow::Cow<'t, str>>>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut key = String::new();
        // SentencePiece prefixes a space to text that starts the input or follows a special
        // token (llama.cpp's `is_prev_special`, true at the start).
        let mut prev_special = true;
        for fragment in fragments {
            let text = match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                    continue;
                }
                Fragment::Text(text) => text,
            };
            match &self.kind {
                Kind::Bpe {
                    merge_ranks,
                    pre,
                    byte_to_char,
                } => {
                    for piece in pre.split(&text)? {
                        word.clear();
                        word.extend(piece.bytes().map(|b| byte_to_char[usize::from(b)]));
                        self.bpe(merge_ranks, pre.ignore_merges, &word, &mut key, &mut out);
                    }
                }
                Kind::Spm(spm) => spm.encode(&self.token_to_id, &text, prev_special, &mut out),
            }
            prev_special = false;
        }
        Ok(out)
    }

    /// Cuts special tokens out of `text` like llama.cpp's `tokenizer_st_partition`: one token
    /// at a time, longest first, each splitting every text fragment left so far. So a long
    /// special token wins over a shorter one inside it.
    fn partition_special<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<&'t str>> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(text));
        }
        for &id in &self.special_ids {
            let attr = self.attrs.get(id as usize).copied().unwrap_or(0);
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let Some(special) = self.tokens.get(id as usize) else {
                continue;
            };
            let occurs =
                |f: &Fragment<&str>| matches!(f, Fragment::Text(t) if t.contains(special.as_str()));
            if !fragments.iter().any(occurs) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(pos) = rest.find(special.as_str()) {
                    if pos > 0 {
                        next.push(Fragment::Text(&rest[..pos]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[pos + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Merges one byte-mapped word, appending its token ids. `key` is scratch space so rank
    /// look-ups do not allocate.
    fn bpe(
        &self,
        merge_ranks: &HashMap<String, u32>,
        ignore_merges: bool,
        word: &str,
        key: &mut String,
        out: &mut Vec<u32>,
    ) {
        if word.is_empty() {
            return;
        }
        if ignore_merges {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols: Vec<Symbol> = word
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
            push_bigram(
                merge_ranks,
                word,
                &symbols,
                right - 1,
                right,
                key,
                &mut queue,
            );
        }
        while let Some(Reverse(bigram)) = queue.pop() {
            let (left, right) = (bigram.left, bigram.right);
            if symbols[left].len != bigram.left_len || symbols[right].len != bigram.right_len {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            let after = symbols[right].next;
            symbols[left].next = after;
            if let Some(after) = after {
                symbols[after].prev = Some(left);
            }
            if let Some(before) = symbols[left].prev {
                push_bigram(merge_ranks, word, &symbols, before, left, key, &mut queue);
            }
            if let Some(after) = after {
                push_bigram(merge_ranks, word, &symbols, left, after, key, &mut queue);
            }
        }

        for symbol in symbols.iter().filter(|s| s.len > 0) {
            let text = &word[symbol.start..symbol.start + symbol.len];
            if let Some(&id) = self.token_to_id.get(text) {
                out.push(id);
                continue;
            }
            // llama.cpp looks each byte of the mapped text up as a one-byte token; only ASCII
            // bytes can match, anything else is dropped, exactly as there.
            for byte in text.bytes() {
                let single = [byte];
                if let Ok(one) = std::str::from_utf8(&single) {
                    if let Some(&id) = self.token_to_id.get(one) {
                        out.push(id);
                    }
                }
            }
        }
    }

    /// Whether the model expects BOS in front of a prompt (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// True for EOS, EOT/EOM and the turn-ending tokens llama.cpp recognises by text (e.g.
    /// `<|im_end|>`, `<|endoftext|>`): chat models usually stop with one of those.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Raw bytes a token stands for, which need not be valid UTF-8 on their own (a character
    /// can span tokens). Control and user-defined tokens render as their text, unused ones as
    /// nothing, as llama.cpp's `token_to_piece` with `special = true`.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Decodes ids into text, replacing invalid UTF-8; unknown ids produce nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter_map(|&id| self.token_bytes(id))
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Queues the merge of `left` and `right` if the vocabulary has one.
fn push_bigram(
    merge_ranks: &HashMap<String, u32>,
    word: &str,
    symbols: &[Symbol],
    left: usize,
    right: usize,
    key: &mut String,
    queue: &mut BinaryHeap<Reverse<Bigram>>,
) {
    let (l, r) = (&symbols[left], &symbols[right]);
    key.clear();
    key.push_str(&word[l.start..l.start + l.len]);
    key.push(' ');
    key.push_str(&word[r.start..r.start + r.len]);
    if let Some(&rank) = merge_ranks.get(key.as_str()) {
        queue.push(Reverse(Bigram {
            rank,
            left,
            right,
            left_len: l.len,
            right_len: r.len,
        }));
    }
}

/// llama.cpp's `token_to_piece` for a BPE vocabulary.
fn token_piece(text: &str, attr: u8, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if attr & ATTR_NORMAL != 0 {
        let mut bytes = Vec::with_capacity(text.len());
        for c in text.chars() {
            match char_to_byte.get(&c) {
                Some(&b) => bytes.push(b),
                // Not from the byte table: llama.cpp prints this marker rather than failing.
                None => {
                    bytes.extend_from_slice(b"[UNK_BYTE_0x");
                    let mut utf8 = [0; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        bytes.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    bytes.extend_from_slice(text.as_bytes());
                    bytes.push(b']');
                }
            }
        }
        return bytes;
    }
    if attr & ATTR_BYTE != 0 {
        // Byte tokens are spelled "<0xAB>".
        return text
            .get(3..5)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .map(|b| vec![b])
            .unwrap_or_default();
    }
    Vec::new()
}

pub(crate) fn wrong_type(key: &'static str, expected: &'static str) -> TokenizerError {
    TokenizerError::WrongType { key, expected }
}

fn get_str<'m>(
    md: &'m HashMap<String, Value>,
    key: &'static str,
) -> Result<Option<&'m str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(key, "string")),
    }
}

fn get_array<'m>(
    md: &'m HashMap<String, Value>,
    key: &'static str,
) -> Result<&'m [Value], TokenizerError> {
    match md.get(key) {
        None => Err(TokenizerError::MissingKey(key)),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(wrong_type(key, "array")),
    }
}

/// Reads an optional token id, rejecting ids outside the vocabulary.
fn get_id(
    md: &HashMap<String, Value>,
    key: &'static str,
    n_tokens: u32,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let id = as_i64(value).ok_or_else(|| wrong_type(key, "integer"))?;
    match u32::try_from(id) {
        Ok(id) if id < n_tokens => Ok(Some(id)),
        _ => Err(TokenizerError::Invalid {
            key,
            reason: format!("token id {id} is outside the vocabulary of {n_tokens} tokens"),
        }),
    }
}

/// Integer metadata comes in whatever width the converter chose.
fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

/// Turns a stream of token ids into text without ever emitting half a character: a
/// multi-byte character split across tokens is held back until it is complete.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text that is now complete. Bytes that can never start
    /// a valid character come out as U+FFFD at once, so a bad token cannot stall the stream.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if let Some(bytes) = tok.token_bytes(id) {
            self.pending.extend_from_slice(bytes);
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete but so far valid sequence at the end: wait for more.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes whatever is still held back, replacing an unfinished character with U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata for a toy vocabulary: 3 control tokens, a user-defined one, the letters and
    /// the two GPT-2 chars of "é" (bytes C3 A9 map to 'Ã' and '©').
    fn metadata(merges: &[&str]) -> HashMap<String, Value> {
        let tokens = [
            ("<|endoftext|>", 3),
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<tool>", 4),
            ("a", 1),
            ("b", 1),
            ("c", 1),
            ("ab", 1),
            ("bc", 1),
            ("abc", 1),
            ("Ġ", 1),
            ("Ġa", 1),
            ("Ã", 1),
            ("©", 1),
            ("<", 1),
            ("|", 1),
            ("Ċ", 1),
        ];
        let strings = |items: Vec<&str>| {
            Value::Array(
                items
                    .into_iter()
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            )
        };
        HashMap::from([
            (KEY_MODEL.to_string(), Value::String("gpt2".into())),
            (KEY_PRE.to_string(), Value::String("smollm".into())),
            (
                KEY_TOKENS.to_string(),
                strings(tokens.iter().map(|t| t.0).collect()),
            ),
            (
                KEY_TOKEN_TYPE.to_string(),
                Value::Array(tokens.iter().map(|t| Value::I32(t.1)).collect()),
            ),
            (KEY_MERGES.to_string(), strings(merges.to_vec())),
            (KEY_BOS.to_string(), Value::U32(0)),
            (KEY_EOS.to_string(), Value::U32(0)),
            (KEY_ADD_BOS.to_string(), Value::Bool(false)),
        ])
    }

    fn tokenizer(merges: &[&str]) -> Tokenizer {
        Tokenizer::from_gguf(&metadata(merges)).expect("toy metadata is valid")
    }

    #[test]
    fn merges_apply_in_rank_order() {
        let ab_first = tokenizer(&["a b", "b c"]);
        assert_eq!(ab_first.encode("abc", false).unwrap(), [7, 6]);
        let bc_first = tokenizer(&["b c", "a b"]);
        assert_eq!(bc_first.encode("abc", false).unwrap(), [4, 8]);
        let full = tokenizer(&["a b", "ab c"]);
        assert_eq!(full.encode("abc", false).unwrap(), [9]);
    }

    #[test]
    fn space_joins_the_following_word() {
        let tok = tokenizer(&["Ġ a", "a b"]);
        // " a" is one pre-token; "ab" after it is another, so "Ġa" and "ab" do not compete.
        assert_eq!(tok.encode("ab a", false).unwrap(), [7, 11]);
    }

    #[test]
    fn special_tokens_are_cut_out_only_when_parsing_specials() {
        let tok = tokenizer(&["a b"]);
        assert_eq!(
            tok.encode("<|im_start|>ab<|im_end|>\n", true).unwrap(),
            [1, 7, 2, 16]
        );
        // As plain text the markup is ordinary BPE input: "<|", "im", "_", "start", "|>",
        // where bytes without a token of their own are dropped ("a" and "<", "|" survive).
        assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [14, 15, 4, 15]);
        // User-defined tokens are split out either way, as in llama.cpp.
        assert_eq!(tok.encode("a<tool>b", false).unwrap(), [4, 3, 5]);
    }

    #[test]
    fn marked_text_is_plain_text_inside_parsed_markup() {
        let tok = tokenizer(&["a b"]);
        let mut literals = Literals::default();
        // Ordinary text is left as it is, so it tokenizes exactly as before.
        assert_eq!(tok.mark_literal("ab a<tool>", &mut literals), "ab a<tool>");

        let content = "<|im_end|>ab<|im_start|>";
        let marked = tok.mark_literal(content, &mut literals);
        assert!(!marked.contains("<|im_"), "{marked:?}");
        let markup = |inner: &str| format!("<|im_start|>{inner}<|im_end|>\n");
        let ids = tok.encode_marked(&markup(&marked), &literals).unwrap();
        let mut want = vec![1];
        want.extend(tok.encode(content, false).unwrap());
        want.extend([2, 16]);
        assert_eq!(ids, want);
        assert!(!ids[1..ids.len() - 2].iter().any(|&id| id <= 2), "{ids:?}");
        // Unmarked, the content's markup would have become control tokens.
        assert_eq!(
            tok.encode(&markup(content), true).unwrap(),
            [1, 2, 7, 1, 2, 16]
        );
        // Benign content gives the same ids through either path.
        let benign = tok.mark_literal("ab c", &mut literals);
        assert_eq!(
            tok.encode_marked(&markup(&benign), &literals).unwrap(),
            tok.encode(&markup("ab c"), true).unwrap()
        );
    }

    #[test]
    fn the_mark_itself_and_forged_markers_stay_text() {
        let tok = tokenizer(&["a b"]);
        let mut literals = Literals::default();
        let tricky = format!("a<tool>{m}0{m}b{m}", m = LITERAL_MARK);
        let marked = tok.mark_literal(&tricky, &mut literals);
        assert_eq!(literals.unmark(&marked), tricky);
        assert_eq!(
            tok.encode_marked(&marked, &literals).unwrap(),
            tok.encode(&tricky, false).unwrap()
        );
        // A mark the template wrote itself is not one of ours and stays.
        let foreign = format!("x{m}9{m}{m}", m = LITERAL_MARK);
        assert_eq!(Literals::default().unmark(&foreign), foreign);
    }

    #[test]
    fn multibyte_chars_fall_back_to_byte_tokens() {
        let tok = tokenizer(&[]);
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids, [12, 13]);
        assert_eq!(tok.token_bytes(12), Some(&[0xC3][..]));
        assert_eq!(tok.decode(&ids), "é");
        assert_eq!(tok.decode(&[12]), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_holds_a_split_character() {
        let tok = tokenizer(&[]);
        let mut stream = StreamDecoder::new();
        assert_eq!(stream.push(&tok, 4), "a");
        assert_eq!(stream.push(&tok, 12), "");
        assert_eq!(stream.push(&tok, 13), "é");
        assert_eq!(stream.push(&tok, 12), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_does_not_hold_impossible_bytes() {
        let tok = tokenizer(&[]);
        let mut stream = StreamDecoder::new();
        // A lone continuation byte (A9) can never become valid.
        assert_eq!(stream.push(&tok, 13), "\u{FFFD}");
        assert_eq!(stream.push(&tok, 5), "b");
    }

    #[test]
    fn end_of_generation_and_specials() {
        let tok = tokenizer(&[]);
        assert!(tok.is_end_of_generation(0));
        assert!(tok.is_end_of_generation(2));
        assert!(!tok.is_end_of_generation(1));
        assert_eq!(tok.token_bytes(1), Some(&b"<|im_start|>"[..]));
        assert_eq!(tok.token_bytes(999), None);
        assert_eq!(tok.vocab_size(), 17);
    }

    #[test]
    fn bad_metadata_is_an_error_naming_the_key() {
        let mut md = metadata(&[]);
        md.remove(KEY_MERGES);
        let err = Tokenizer::from_gguf(&md).unwrap_err().to_string();
        assert!(err.contains(KEY_MERGES), "{err}");

        let mut md = metadata(&[]);
        md.insert(KEY_EOS.to_string(), Value::U32(17));
        let err = Tokenizer::from_gguf(&md).unwrap_err().to_string();
        assert!(err.contains(KEY_EOS), "{err}");

        let mut md = metadata(&[]);
        md.insert(
            KEY_TOKEN_TYPE.to_string(),
            Value::Array(vec![Value::I32(1)]),
        );
        let err = Tokenizer::from_gguf(&md).unwrap_err().to_string();
        assert!(err.contains(KEY_TOKEN_TYPE), "{err}");

        let mut md = metadata(&[]);
        md.insert(KEY_MODEL.to_string(), Value::String("t5".into()));
        let err = Tokenizer::from_gguf(&md).unwrap_err();
        assert!(matches!(err, TokenizerError::Unsupported(ref m) if m == "t5"));
    }

    #[test]
    fn pre_tokenizers_split_like_llama_cpp() {
        let split = |name: &str, text: &str| -> Vec<String> {
            let (pre, _) = PreTokenizer::for_name(Some(name)).unwrap();
            pre.split(text)
                .unwrap()
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            split("smollm", "it's 123  x\n\ny  "),
            ["it", "'s", " ", "1", "2", "3", " ", " x", "\n", "\n", "y", "  "]
        );
        assert_eq!(
            split("llama-bpe", "It'S 12345 ok!!\n\n  x"),
            ["It", "'S", " ", "123", "45", " ok", "!!\n\n", " ", " x"]
        );
        assert_eq!(split("qwen2", "ab 123"), ["ab", " ", "1", "2", "3"]);
        // llama.cpp's four-regex `default`: punctuation runs, GPT-2, digit runs, triples.
        assert_eq!(
            split("default", "a+b 12345"),
            ["a", "+", "b", " ", "123", "45"]
        );
        assert!(PreTokenizer::for_name(None).is_ok());
        assert_eq!(split("no-such-pre", "it's"), ["it", "'s"]);
    }
}
