use std::path::PathBuf;

/// Everything that can go wrong while opening a model file or running its math.
///
/// Messages are written for the person who typed the path: they name the file, the key or the
/// tensor at fault, because most of these come from user mistakes (wrong file, wrong range).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The I/O error is part of the message, not a `source`: chained error printers (anyhow's
    // `{:#}`) would print it twice.
    #[error("cannot open model file {path}: {reason}")]
    Open {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{path} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf { path: PathBuf },
    #[error("{path} is not a readable GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("unsupported model architecture `{0}` (supported: {list})", list = crate::spec::SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has the wrong type or value: {reason}")]
    BadKey { key: String, reason: String },
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("block range {start}..{end} is outside the model's blocks 0..{count}")]
    BadBlockRange {
        start: usize,
        end: usize,
        count: usize,
    },
    #[error("{what} was not loaded in this process")]
    NotLoaded { what: &'static str },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("position {got} does not continue the cache, which holds {expected} tokens")]
    Position { got: usize, expected: usize },
    #[error("position {pos} is further back than this sliding-window cache keeps (it holds positions from {floor} on); run the sequence again from position 0")]
    Rewind { pos: usize, floor: usize },
    #[error("the sequence would reach {needed} tokens but the cache holds at most {capacity}")]
    CacheFull { needed: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat::ChatTemplateError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
