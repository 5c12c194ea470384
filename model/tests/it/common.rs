use std::path::PathBuf;
use std::sync::OnceLock;

use model::LocalModel;

/// The default model fetched by `scripts/fetch-model.sh` (or `$EDGE_MODEL`), if present.
pub fn default_model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("EDGE_MODEL") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
    p.exists().then_some(p)
}

/// The default model path, or a failure that says how to get it: these tests must not pass by
/// skipping.
pub fn require_model() -> PathBuf {
    default_model_path().expect("default model missing: run scripts/fetch-model.sh first")
}

/// The default model loaded once for every test in this binary.
pub fn default_model() -> &'static LocalModel {
    static MODEL: OnceLock<LocalModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        LocalModel::open(require_model(), &mut |_, _| {}).expect("load default model")
    })
}

/// A file of `model/tests/data/` (reference outputs of llama.cpp, kept in the repository).
pub fn data(path: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/")).join(path)
}
