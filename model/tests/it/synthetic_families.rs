//! Every family's block math against llama.cpp on small random-weight files
//! (`model::synthetic::SYNTHETIC_FAMILIES`). The files are written again here, byte for byte the
//! ones llama.cpp ran on (checked by SHA-256); its outputs are in `tests/data/synthetic/`, made
//! by `scripts/llama_cpp_reference.py` (see `tests/data/README.md`).
//!
//! Each sequence runs past the sliding window and past the ring a window layer keeps (window 8
//! plus the rewind slack), so window-only caches are checked too, and the Phi-3 files use
//! LongRoPE's long factors (session longer than the original context) and its short ones.

use model::synthetic::SYNTHETIC_FAMILIES;
use model::LocalModel;
use sha2::{Digest, Sha256};

use crate::families::{check_generations_at, reference};

#[test]
fn every_family_matches_llama_cpp_on_random_weights() {
    let dir = std::env::temp_dir().join(format!("edge-synth-families-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let families = SYNTHETIC_FAMILIES();
    assert!(families.len() >= 12);
    for (name, m) in families {
        let path = dir.join(format!("{name}.gguf"));
        m.write(&path).expect("write synthetic file");
        let reference = reference(&format!("synthetic/{name}.json"));
        let sha: String = Sha256::digest(std::fs::read(&path).expect("read back"))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sha,
            reference["model_sha256"].as_str().expect("sha"),
            "{name}: the writer no longer makes the file llama.cpp ran on; regenerate the data"
        );
        let model = LocalModel::open(&path, &mut |_, _| {}).expect("open");
        assert_eq!(
            model.spec().architecture,
            name.split('-').next().unwrap_or("")
        );
        eprintln!("{name}");
        // Random weights spread probability thinly, so ties are everywhere; log-probs are
        // compared at every position. F32 weights show the block math alone (largest
        // difference measured: 0.021, Qwen3), at the 0.05 bar. Q8_0 adds the difference
        // between our Q8_0 products (ggml's AVX2 arithmetic) and llama.cpp's AVX-512 build
        // (llamafile sgemm), which Phi-3's LongRoPE file amplifies to 0.064 late in a sequence.
        let tolerance = if name.ends_with("f32") { 0.05 } else { 0.1 };
        check_generations_at(&model, &reference, None, tolerance, 0.2, usize::MAX);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
