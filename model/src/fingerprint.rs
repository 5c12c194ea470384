//! The identity of a model file, so peers serving different files or quantizations never mix.
//!
//! It hashes what determines the numbers a block computes: the architecture, every
//! hyperparameter the math reads (RoPE bases and scaling, norm epsilon, window and its layers,
//! soft-caps, scales; see [`math_parameters`]) and the name, type, shape and bytes of every
//! tensor (all bytes of small tensors, sampled windows of large ones: see [`fingerprint`]).
//! Metadata that does not change the math (names, licences, tokenizer extras, the context
//! length) is left out, so re-packaging the same weights keeps the fingerprint.

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::spec::ModelSpec;

pub type Fingerprint = [u8; 32];

/// Tensors up to this size (norms, biases, every tensor of the small test models) are hashed
/// whole.
const WHOLE_TENSOR_BYTES: usize = 1 << 20;
/// Larger tensors are hashed through this many windows spread evenly over their bytes ...
const SAMPLE_WINDOWS: usize = 16;
/// ... of this many bytes each.
const WINDOW_BYTES: usize = 1024;

/// Computes the fingerprint by reading the header, every small tensor whole and sampled windows
/// of every large one, with positioned reads and no read-ahead.
///
/// Why sampled: every peer must compute the same fingerprint, so it cannot cover only the
/// node's own blocks; and hashing the whole file would make a node serving a quarter of a 4 GB
/// model read all 4 GB at start, through a page cache its memory limit is charged for. What the
/// fingerprint is for is keeping honest peers with different files apart: another quantization
/// changes the types, another fine-tune or seed changes every window. (A dishonest peer can
/// announce any fingerprint; spot checks of outputs deal with those.) The windows cost about
/// 16 pages per large tensor, dropped from the page cache again after reading.
pub fn fingerprint(file: &GgufFile) -> Result<Fingerprint> {
    let io = |reason| ModelError::Open {
        path: file.path().to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(file.path()).map_err(io)?;
    advise(&f, 0, 0, Advice::Random);
    let mut h = Sha256::new();
    h.update(b"edge-swarm fingerprint v3\0");
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
        for window in windows(view.byte_range()) {
            let mut at = window.start;
            while at < window.end {
                let n = (window.end - at).min(buf.len());
                read_at(&f, &mut buf[..n], at as u64).map_err(io)?;
                h.update(&buf[..n]);
                at += n;
            }
            advise(&f, window.start, window.len(), Advice::DontNeed);
        }
    }
    Ok(h.finalize().into())
}

/// The byte ranges of a tensor at `range` that go into the fingerprint.
fn windows(range: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
    if range.len() <= WHOLE_TENSOR_BYTES {
        return vec![range];
    }
    let span = range.len() - WINDOW_BYTES;
    (0..SAMPLE_WINDOWS)
        .map(|k| {
            let start = range.start + span / (SAMPLE_WINDOWS - 1) * k;
            start..start + WINDOW_BYTES
        })
        .collect()
}

fn read_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = f;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

enum Advice {
    /// No read-ahead: a window read must not pull in the megabytes after it.
    Random,
    /// Done with these pages.
    DontNeed,
}

/// Page-cache advice; only advice, so a failure changes memory use, never the result.
fn advise(f: &std::fs::File, start: usize, len: usize, advice: Advice) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let advice = match advice {
            Advice::Random => libc::POSIX_FADV_RANDOM,
            Advice::DontNeed => libc::POSIX_FADV_DONTNEED,
        };
        // SAFETY: advice on a descriptor we own; no memory is touched.
        let _ = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                start as libc::off_t,
                len as libc::off_t,
                advice,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, start, len, advice);
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

    /// Large tensors are sampled from their first to their last byte, inside their bounds;
    /// small ones are read whole.
    #[test]
    fn windows_span_the_tensor() {
        let small = windows(100..100 + WHOLE_TENSOR_BYTES);
        assert_eq!(small, vec![100..100 + WHOLE_TENSOR_BYTES]);
        let big = 4096..4096 + 50 * WHOLE_TENSOR_BYTES + 3;
        let w = windows(big.clone());
        assert_eq!(w.len(), SAMPLE_WINDOWS);
        assert_eq!(w[0].start, big.start);
        assert!(w.iter().all(|r| r.start >= big.start && r.end <= big.end));
        assert!(big.end - w[SAMPLE_WINDOWS - 1].end < SAMPLE_WINDOWS);
    }

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
