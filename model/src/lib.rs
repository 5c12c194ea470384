//! The model math of edge-swarm, with no networking: GGUF spec and sliced loading, the
//! Llama-family decoder block with a per-session KV cache, embeddings and head, the tokenizer and
//! chat template, and [`LocalModel`], the single-process golden reference.

pub mod activation;
pub mod blocks;
pub mod chat;
pub mod embed;
pub mod error;
pub mod fingerprint;
pub mod fingerprint_cache;
pub mod gguf;
pub mod gguf_header;
pub mod head;
pub mod kernels;
pub mod kv_cache;
pub mod load;
pub mod local;
pub mod matrix;
pub mod numerics;
pub mod spec;
pub mod synthetic;
pub mod synthetic_full;
pub mod team;
pub mod tokenizer;
pub mod uncached_read;

pub use blocks::{BatchEntry, BlockStack, Hidden};
pub use error::{ModelError, Result};
pub use gguf::GgufFile;
pub use kv_cache::{LayerKv, SessionKv};
pub use load::{load, LoadOptions, ModelSlice};
pub use local::LocalModel;
pub use spec::{Family, ModelSpec, SUPPORTED_ARCHITECTURES};
