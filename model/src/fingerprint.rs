//! The identity of a model file, so peers serving different files or quantizations never mix.
//!
//! It hashes what determines the numbers a block computes: the architecture, every
//! hyperparameter the math reads (RoPE bases and scaling, norm epsilon, window and its layers,
//! soft-caps, scales; see [`math_parameters`]) and the name, type, shape and bytes of every
//! tensor. Metadata that does not change the math (names, licences, tokenizer extras, the
//! context length) is left out, so re-packaging the same weights keeps the fingerprint.

use std::io::{Read, Seek, SeekFrom};

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::spec::ModelSpec;

pub type Fingerprint = [u8; 32];

/// Computes the fingerprint with ordinary reads rather than through the memory map: a node that
/// serves ten blocks must hash all of them, and reading keeps those pages out of its resident
/// memory.
pub fn fingerprint(file: &GgufFile) -> Result<Fingerprint> {
    let io = |reason| ModelError::Open {
        path: file.path().to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(file.path()).map_err(io)?;
    let mut h = Sha256::new();
    h.update(b"edge-swarm fingerprint v2\0");
    let arch = match file.metadata().get("general.architecture") {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s.clone(),
        _ => return Err(ModelError::MissingKey("general.architecture".into())),
    };
    h.update((arch.len() as u64).to_le_bytes());
    h.update(arch.as_bytes());
    let params = math_parameters(&ModelSpec::from_file(file)?);
    h.update((params.len() as u64).to_le_bytes());
    h.update(params.as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for view in file.tensors()? {
        h.update((view.name.len() as u64).to_le_bytes());
        h.update(view.name.as_bytes());
        h.update(view.dtype.0.to_le_bytes());
        h.update((view.dims.len() as u64).to_le_bytes());
        for d in &view.dims {
            h.update((*d as u64).to_le_bytes());
        }
        let range = view.byte_range();
        f.seek(SeekFrom::Start(range.start as u64)).map_err(io)?;
        let mut left = range.len();
        while left > 0 {
            let n = left.min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(io)?;
            h.update(&buf[..n]);
            left -= n;
        }
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
            fingerprint(&GgufFile::open(&p).unwrap()).unwrap()
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
        let fp_of = |p: &std::path::Path| fingerprint(&GgufFile::open(p).unwrap()).unwrap();
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
}
