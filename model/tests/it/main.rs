//! One integration-test binary for the model crate (one link instead of one per file).

mod common;
mod families;
mod reference;
mod synthetic;
mod synthetic_7b;
mod synthetic_families;
mod tokenizer;
