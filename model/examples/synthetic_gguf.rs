//! Writes the synthetic GGUF files of every family that the tests compare against llama.cpp
//! (`model/tests/it/synthetic_families.rs`), so `scripts/llama_cpp_reference.py` can run
//! llama.cpp on the very same bytes:
//!
//!   cargo run -p model --example synthetic_gguf -- OUT_DIR
use model::synthetic::SYNTHETIC_FAMILIES;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: synthetic_gguf OUT_DIR")?;
    std::fs::create_dir_all(&dir)?;
    for (name, model) in SYNTHETIC_FAMILIES() {
        let path = std::path::Path::new(&dir).join(format!("{name}.gguf"));
        model.write(&path)?;
        println!("{}", path.display());
    }
    Ok(())
}
