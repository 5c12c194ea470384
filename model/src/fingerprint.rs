//! The identity of a model file, so peers serving different files or quantizations never mix.
//!
//! It hashes what determines the numbers a block computes: the architecture, every
//! hyperparameter the math reads (RoPE bases and scaling, norm epsilon, window and its layers,
//! soft-caps, scales; see [`math_parameters`]) and the name, type, shape and every byte of
//! every tensor. Metadata that does not change the math (names, licences,
//! tokenizer extras, the context length) is left out, so re-packaging the same weights keeps
//! the fingerprint.

use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::fingerprint_cache;
use crate::gguf::GgufFile;
use crate::spec::ModelSpec;
use crate::uncached_read::{ReadMode, UncachedFile};

pub type Fingerprint = [u8; 32];

/// Names this definition of the fingerprint, in the hash and in its cache entries. (v3 hashed
/// sampled windows of large tensors, so files that differed elsewhere shared an identity.)
const VERSION: &str = "edge-swarm fingerprint v4";

/// The file's fingerprint, from the cache of fingerprints already computed on this machine
/// ([`fingerprint_cache::cache_dir`]) or computed now and kept there.
///
/// Why every byte, and so a cache: every peer must compute the same identity, so a node serving
/// a quarter of a 4 GB model reads all 4 GB for it once (a few seconds; the reads bypass the
/// page cache, so a memory-limited node is not charged for the parts it does not serve).
pub fn fingerprint(file: &GgufFile) -> Result<Fingerprint> {
    fingerprint_cached(file, fingerprint_cache::cache_dir().as_deref())
}

/// [`fingerprint`] with the cache in `dir` (`None`: no cache).
pub fn fingerprint_cached(file: &GgufFile, dir: Option<&Path>) -> Result<Fingerprint> {
    let entry = dir.and_then(|d| fingerprint_cache::entry(d, VERSION, file.path()));
    if let Some(fp) = entry.as_deref().and_then(fingerprint_cache::read) {
        return Ok(fp);
    }
    let fp = compute(file)?;
    if let Some(entry) = entry {
        if let Err(e) = fingerprint_cache::write(&entry, &fp) {
            tracing::debug!(path = %entry.display(), "fingerprint not cached: {e}");
        }
    }
    Ok(fp)
}

/// Hashes the header's math and every tensor's name, type, shape and bytes, in name order (so
/// the order of tensors in the file does not matter), reading the bytes without filling the
/// page cache.
pub fn compute(file: &GgufFile) -> Result<Fingerprint> {
    let io = |reason| ModelError::Open {
        path: file.path().to_path_buf(),
        reason,
    };
    let mut reader = UncachedFile::open(file.path()).map_err(io)?;
    let mut h = Sha256::new();
    h.update(VERSION.as_bytes());
    h.update(b"\0");
    let arch = match file.metadata().get("general.architecture") {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s.clone(),
        _ => return Err(ModelError::MissingKey("general.architecture".into())),
    };
    h.update((arch.len() as u64).to_le_bytes());
    h.update(arch.as_bytes());
    let params = math_parameters(&ModelSpec::from_file(file)?);
    h.update((params.len() as u64).to_le_bytes());
    h.update(params.as_bytes());
    let started = Instant::now();
    let mut bytes = 0u64;
    for view in file.tensors()? {
        h.update((view.name.len() as u64).to_le_bytes());
        h.update(view.name.as_bytes());
        h.update(view.dtype.0.to_le_bytes());
        h.update((view.dims.len() as u64).to_le_bytes());
        for d in &view.dims {
            h.update((*d as u64).to_le_bytes());
        }
        let range = view.byte_range();
        h.update((range.len() as u64).to_le_bytes());
        bytes += range.len() as u64;
        reader
            .for_each_chunk(range.start as u64..range.end as u64, |b| h.update(b))
            .map_err(io)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let direct = reader.mode() == ReadMode::Direct;
    if secs >= 1.0 {
        tracing::info!(
            secs,
            gib,
            direct,
            "hashed the model's tensors to identify it"
        );
    } else {
        tracing::debug!(
            secs,
            gib,
            direct,
            "hashed the model's tensors to identify it"
        );
    }
    Ok(h.finalize().into())
}

/// Every hyperparameter that changes what the blocks, the embedding or the head compute, in a
/// canonical text form (floats print exactly, so a one-ulp change of `rope.freq_base` shows).
/// Written field by field, not with `Debug` of the whole spec, so that adding a descriptive
/// field (a name) cannot change fingerprints, and forgetting a math field is a visible edit.
pub fn math_parameters(spec: &ModelSpec) -> String {
    format!(
        "family={:?} blocks={} d={} ff={} heads={} kv_heads={} head_dim={} rope_dim={} \
         rope={:?} global={:?} local={:?} rope_attn_factor={:?} rope_original_context={} \
         eps={:?} tied={} window={} sliding={:?} attention_scale={:?} scale_query_first={} \
         attn_softcap={:?} final_softcap={:?} embedding_scale={:?} activation={:?} \
         qk_norm={} post_norms={}",
        spec.family,
        spec.block_count,
        spec.embedding_length,
        spec.feed_forward_length,
        spec.head_count,
        spec.head_count_kv,
        spec.head_dim,
        spec.rope_dim,
        spec.rope_style,
        spec.rope_global,
        spec.rope_local,
        spec.rope_attn_factor,
        spec.rope_original_context,
        spec.rms_eps,
        spec.tied_embeddings,
        spec.sliding_window,
        spec.sliding_layers,
        spec.attention_scale,
        spec.scale_query_first,
        spec.attn_softcap,
        spec.final_softcap,
        spec.embedding_scale,
        spec.activation,
        spec.qk_norm,
        spec.post_norms,
    )
}

/// Short printable form for logs and errors.
pub fn short_hex(fp: &Fingerprint) -> String {
    fp[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticModel;

    #[test]
    fn same_weights_same_fingerprint_other_weights_other_fingerprint() {
        let dir = std::env::temp_dir().join(format!("fp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, m: SyntheticModel| {
            let p = dir.join(name);
            m.write(&p).unwrap();
            compute(&GgufFile::open(&p).unwrap()).unwrap()
        };
        let a = write("a.gguf", SyntheticModel::default());
        let b = write("b.gguf", SyntheticModel::default());
        let c = write(
            "c.gguf",
            SyntheticModel {
                seed: 2,
                ..Default::default()
            },
        );
        let d = write(
            "d.gguf",
            SyntheticModel {
                weight_dtype: candle_core::quantized::GgmlDType::Q8_0,
                ..Default::default()
            },
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two files with the same tensors that differ only in one hyperparameter of the math must
    /// never be mixed in a swarm; a change of metadata the math does not read keeps the
    /// fingerprint.
    #[test]
    fn hyperparameters_of_the_math_are_part_of_the_identity() {
        use candle_core::quantized::gguf_file::{self, Content, Value};
        let dir = std::env::temp_dir().join(format!("fp-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.gguf");
        SyntheticModel::family("gemma3", candle_core::quantized::GgmlDType::Q8_0)
            .write(&base)
            .unwrap();
        let fp_of = |p: &std::path::Path| compute(&GgufFile::open(p).unwrap()).unwrap();
        let original = fp_of(&base);
        // Rewrites the file with one metadata value changed, tensors untouched.
        let rewrite = |name: &str, key: &str, value: Value| {
            let mut f = std::fs::File::open(&base).unwrap();
            let content = Content::read(&mut f).unwrap();
            let mut md = content.metadata.clone();
            md.insert(key.to_string(), value);
            let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
                .tensor_infos
                .keys()
                .map(|n| {
                    let t = content
                        .tensor(&mut f, n, &candle_core::Device::Cpu)
                        .unwrap();
                    (n.clone(), t)
                })
                .collect();
            let p = dir.join(name);
            let mut out = std::fs::File::create(&p).unwrap();
            let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
                tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
            p
        };
        let same = rewrite("name.gguf", "general.name", Value::String("renamed".into()));
        assert_eq!(fp_of(&same), original, "a new name is the same model");
        for (key, value) in [
            ("gemma3.rope.freq_base", Value::F32(10001.0)),
            ("gemma3.rope.freq_base_swa", Value::F32(101.0)),
            ("gemma3.attention.sliding_window", Value::U32(9)),
            ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(2e-5)),
            ("gemma3.final_logit_softcapping", Value::F32(9.0)),
        ] {
            let p = rewrite("changed.gguf", key, value);
            assert_ne!(fp_of(&p), original, "{key} changes the math");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Flips one byte in the middle of the largest tensor of the file at `p`, in place.
    fn flip_a_weight_byte(p: &std::path::Path) {
        use std::os::unix::fs::FileExt;
        let file = GgufFile::open(p).unwrap();
        let largest = file
            .tensors()
            .unwrap()
            .into_iter()
            .max_by_key(|t| t.byte_range().len())
            .unwrap()
            .byte_range();
        drop(file);
        let at = (largest.start + largest.len() / 2 + 7) as u64;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }

    /// Two files that differ in one byte of one tensor, far from its start and end (where v3's
    /// sampled windows did not look), are two models.
    #[test]
    fn one_byte_anywhere_in_the_weights_is_another_model() {
        let dir = std::env::temp_dir().join(format!("fp-byte-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.gguf");
        let b = dir.join("b.gguf");
        SyntheticModel::default().write(&a).unwrap();
        std::fs::copy(&a, &b).unwrap();
        let fp = |p: &std::path::Path| compute(&GgufFile::open(p).unwrap()).unwrap();
        assert_eq!(fp(&a), fp(&b));
        flip_a_weight_byte(&b);
        assert_ne!(fp(&a), fp(&b));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The cache answers what computing would, ignores a damaged entry, and a file written
    /// since never finds the entry of what it was.
    #[test]
    fn the_cache_gives_the_computed_fingerprint_and_never_hides_a_change() {
        let dir = std::env::temp_dir().join(format!("fp-cache-{}", std::process::id()));
        let cache = dir.join("cache");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        SyntheticModel::default().write(&p).unwrap();
        let cached = |p: &std::path::Path| {
            fingerprint_cached(&GgufFile::open(p).unwrap(), Some(&cache)).unwrap()
        };
        let computed = compute(&GgufFile::open(&p).unwrap()).unwrap();
        assert_eq!(cached(&p), computed);
        let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(entries.len(), 1, "one entry kept");
        let entry = entries[0].as_ref().unwrap().path();
        assert_eq!(fingerprint_cache::read(&entry), Some(computed));
        assert_eq!(cached(&p), computed);

        std::fs::write(&entry, "not a fingerprint").unwrap();
        assert_eq!(cached(&p), computed, "a damaged entry is recomputed");

        flip_a_weight_byte(&p);
        let changed = compute(&GgufFile::open(&p).unwrap()).unwrap();
        assert_ne!(changed, computed);
        assert_eq!(cached(&p), changed, "the changed file is hashed again");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
