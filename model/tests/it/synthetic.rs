//! Loader and block math on small random-weight GGUF files written by the test itself.

use candle_core::quantized::GgmlDType;
use model::synthetic::SyntheticModel;
use model::{load, GgufFile, LoadOptions, LocalModel, ModelError, ModelSpec};

fn write(m: &SyntheticModel) -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("tiny.gguf");
    m.write(&path).expect("write synthetic gguf");
    (dir, path)
}

/// A tiny self-cleaning temporary directory (no extra crate needed).
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "edge-swarm-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn embed(file: &GgufFile, ids: &[u32]) -> model::Hidden {
    let spec = ModelSpec::from_file(file).unwrap();
    let mut opts = LoadOptions::client();
    opts.head = false;
    let _ = spec;
    load(file, &opts, &mut |_, _| {})
        .unwrap()
        .embedding()
        .unwrap()
        .embed(ids)
        .unwrap()
}

#[test]
fn split_stacks_are_bit_identical_to_the_whole_stack() {
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::F32,
        GgmlDType::Q4K,
    ] {
        let m = SyntheticModel {
            weight_dtype: dtype,
            dim: if dtype == GgmlDType::Q4K { 256 } else { 64 },
            ff: if dtype == GgmlDType::Q4K { 512 } else { 128 },
            ..Default::default()
        };
        let (_d, path) = write(&m);
        let file = GgufFile::open(&path).unwrap();
        let ids = [3u32, 200, 17, 42, 99];
        let whole = load(&file, &LoadOptions::blocks(0..4), &mut |_, _| {}).unwrap();
        let first = load(&file, &LoadOptions::blocks(0..1), &mut |_, _| {}).unwrap();
        let rest = load(&file, &LoadOptions::blocks(1..4), &mut |_, _| {}).unwrap();
        let (whole, first, rest) = (
            whole.stack().unwrap(),
            first.stack().unwrap(),
            rest.stack().unwrap(),
        );

        let mut a = embed(&file, &ids);
        let mut kv = whole.new_cache(0..4, 16);
        whole.forward(&mut a, &mut kv, 0).unwrap();

        let mut b = embed(&file, &ids);
        let (mut kv1, mut kv2) = (first.new_cache(0..1, 16), rest.new_cache(1..4, 16));
        first.forward(&mut b, &mut kv1, 0).unwrap();
        rest.forward(&mut b, &mut kv2, 0).unwrap();
        assert_eq!(a, b, "{dtype:?}: split prefill differs");

        // One decode step on top of the caches, and a span of an overlapping stack.
        let mut a = embed(&file, &[7]);
        whole.forward(&mut a, &mut kv, 5).unwrap();
        let mut b = embed(&file, &[7]);
        first.forward(&mut b, &mut kv1, 5).unwrap();
        let mut kv_span = whole.new_cache(1..4, 16);
        let mut replay = embed(&file, &ids);
        first
            .forward(&mut replay, &mut first.new_cache(0..1, 16), 0)
            .unwrap();
        whole
            .forward_span(1..4, &mut replay, &mut kv_span, 0)
            .unwrap();
        whole.forward_span(1..4, &mut b, &mut kv_span, 5).unwrap();
        assert_eq!(a, b, "{dtype:?}: split decode through a sub-span differs");
    }
}

#[test]
fn prefill_then_decode_matches_one_prefill() {
    let m = SyntheticModel::default();
    let (_d, path) = write(&m);
    let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 % 256) as u32).collect();
    let mut kv = model.new_cache(32).unwrap();
    let full = model.forward(&ids, &mut kv, 0).unwrap();
    let mut kv = model.new_cache(32).unwrap();
    model.forward(&ids[..5], &mut kv, 0).unwrap();
    let mut last = Vec::new();
    for (i, &id) in ids[5..].iter().enumerate() {
        last = model.forward(&[id], &mut kv, 5 + i).unwrap();
    }
    // Every per-token computation (quantized products, attention over the cache) is done the
    // same way whether the token arrives in a batch or alone, so the logits are bit-identical:
    // the tolerance is zero.
    assert_eq!(full, last);
    assert_eq!(full.len(), m.vocab_size());
}

/// What a node's scheduler does with a long prompt: chunks of any size, the cache growing by
/// pages between them. The logits after the last chunk equal one whole-prompt forward bit for
/// bit, in every family (Gemma's window layers included) and in a K-quant format whose
/// products take the tiled prefill path.
#[test]
fn a_prompt_in_chunks_across_cache_pages_matches_the_whole_prompt() {
    use model::kv_cache::KV_PAGE;
    let mut cases: Vec<SyntheticModel> = ["llama", "qwen3", "gemma3", "phi3"]
        .iter()
        .map(|a| SyntheticModel {
            context: 1024,
            ..SyntheticModel::family(a, GgmlDType::Q8_0)
        })
        .collect();
    cases.push(SyntheticModel {
        context: 1024,
        dim: 256,
        ff: 512,
        weight_dtype: GgmlDType::Q4K,
        ..Default::default()
    });
    for m in cases {
        let (_d, path) = write(&m);
        let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
        let n = 2 * KV_PAGE + 21;
        let ids: Vec<u32> = (0..n).map(|i| (i * 37 % 250) as u32).collect();
        let mut kv = model.new_cache(600).unwrap();
        let whole = model.forward(&ids, &mut kv, 0).unwrap();
        let mut kv = model.new_cache(600).unwrap();
        let mut last = Vec::new();
        let mut pos = 0;
        for chunk in [1, 47, 80, 5, 200].iter().cycle() {
            if pos == n {
                break;
            }
            let end = (pos + chunk).min(n);
            last = model.forward(&ids[pos..end], &mut kv, pos).unwrap();
            pos = end;
        }
        assert_eq!(whole, last, "{} {:?}", m.architecture, m.weight_dtype);
    }
}

#[test]
fn truncating_the_cache_replays_identically() {
    let (_d, path) = write(&SyntheticModel::default());
    let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
    let ids = [1u32, 2, 3, 4, 5, 6];
    let mut kv = model.new_cache(16).unwrap();
    let first = model.forward(&ids, &mut kv, 0).unwrap();
    kv.truncate(3);
    let again = model.forward(&ids[3..], &mut kv, 3).unwrap();
    assert_eq!(first, again);
    // A position that does not continue the cache is refused, not silently accepted.
    assert!(matches!(
        model.forward(&[1], &mut kv, 2),
        Err(ModelError::Position {
            got: 2,
            expected: 6
        })
    ));
}

#[test]
fn a_slice_maps_only_its_share_of_the_weights() {
    let m = SyntheticModel {
        blocks: 6,
        ..Default::default()
    };
    let (_d, path) = write(&m);
    let file = GgufFile::open(&path).unwrap();
    let all = load(&file, &LoadOptions::blocks(0..6), &mut |_, _| {}).unwrap();
    let part = load(&file, &LoadOptions::blocks(2..4), &mut |_, _| {}).unwrap();
    assert!(part.embedding.is_none() && part.head.is_none());
    assert_eq!(part.weight_bytes() * 3, all.weight_bytes());
    assert!(matches!(part.head(), Err(ModelError::NotLoaded { .. })));
}

#[test]
fn untied_head_and_other_formats_load() {
    let m = SyntheticModel {
        separate_head: true,
        weight_dtype: GgmlDType::F16,
        ..Default::default()
    };
    let (_d, path) = write(&m);
    let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
    assert!(!model.spec().tied_embeddings);
    let mut kv = model.new_cache(8).unwrap();
    let logits = model.forward(&[5, 6], &mut kv, 0).unwrap();
    assert!(logits.iter().all(|l| l.is_finite()));
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempdir::Dir::new();
    let missing = dir.path().join("nope.gguf");
    let err = GgufFile::open(&missing).err().unwrap();
    assert!(matches!(err, ModelError::Open { .. }));
    assert!(err.to_string().contains("nope.gguf"));

    let text = dir.path().join("text.gguf");
    std::fs::write(&text, "hello, I am not a model").unwrap();
    assert!(matches!(
        GgufFile::open(&text),
        Err(ModelError::NotGguf { .. })
    ));

    let (_d, good) = write(&SyntheticModel::default());
    let bytes = std::fs::read(&good).unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() - 100] {
        let truncated = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&truncated)
            .and_then(|f| LocalModel::open(f.path(), &mut |_, _| {}).map(drop));
        let msg = err.expect_err("truncated file must fail").to_string();
        assert!(
            !msg.is_empty() && !msg.contains('\n'),
            "cut at {cut}: {msg}"
        );
    }

    // A tensor of a type with no kernel (IQ4_NL) is named with its type, not rejected as an
    // unreadable file: patch blk.0.attn_q.weight's type id in the header.
    let name = b"blk.0.attn_q.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    // name, then u32 dimension count (2), two u64 dimensions, then the u32 type.
    let ty = at + name.len() + 4 + 16;
    let mut iq = bytes.clone();
    iq[ty..ty + 4].copy_from_slice(&20u32.to_le_bytes());
    let path = dir.path().join("iq4_nl.gguf");
    std::fs::write(&path, &iq).unwrap();
    let msg = LocalModel::open(&path, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("IQ4_NL") && !msg.contains('\n'),
        "{msg}"
    );

    let (_d2, other) = write(&SyntheticModel {
        architecture: "mamba".into(),
        ..Default::default()
    });
    match LocalModel::open(&other, &mut |_, _| {}) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "mamba"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("mamba accepted"),
    }

    let file = GgufFile::open(&good).unwrap();
    let err = load(&file, &LoadOptions::blocks(2..9), &mut |_, _| {})
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "block range 2..9 is outside the model's blocks 0..4"
    );
}

#[test]
fn out_of_vocabulary_ids_and_overfull_caches_are_errors() {
    let (_d, path) = write(&SyntheticModel::default());
    let model = LocalModel::open(&path, &mut |_, _| {}).unwrap();
    let mut kv = model.new_cache(4).unwrap();
    assert!(matches!(
        model.forward(&[9999], &mut kv, 0),
        Err(ModelError::TokenOutOfRange { id: 9999, .. })
    ));
    assert!(matches!(
        model.forward(&[1, 2, 3, 4, 5], &mut kv, 0),
        Err(ModelError::CacheFull {
            needed: 5,
            capacity: 4
        })
    ));
    assert!(model.new_cache(100_000).is_err());
}

/// Rewrites `src` into `dst` without the tensor or metadata key `drop` (everything else as is).
fn without(src: &std::path::Path, dst: &std::path::Path, drop: &str) {
    use candle_core::quantized::gguf_file::{self, Content, Value};
    use candle_core::quantized::QTensor;
    let mut f = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let md: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != drop)
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .filter(|n| n.as_str() != drop)
        .map(|n| {
            let t = content
                .tensor(&mut f, n, &candle_core::Device::Cpu)
                .unwrap();
            (n.clone(), t)
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &refs).unwrap();
}

/// A file missing something its architecture needs names it, for every family; nothing panics.
#[test]
fn a_missing_key_or_tensor_of_a_family_is_named() {
    let dir = tempdir::Dir::new();
    let cases = [
        ("qwen2", "blk.1.attn_k.bias"),
        ("qwen3", "blk.0.attn_q_norm.weight"),
        ("qwen3", "qwen3.attention.layer_norm_rms_epsilon"),
        ("gemma2", "blk.2.post_ffw_norm.weight"),
        ("gemma3", "blk.3.post_attention_norm.weight"),
        ("gemma3", "gemma3.feed_forward_length"),
        ("phi3", "blk.0.attn_qkv.weight"),
        ("phi3", "phi3.block_count"),
    ];
    for (arch, drop) in cases {
        let full = dir.path().join(format!("{arch}.gguf"));
        SyntheticModel::family(arch, GgmlDType::F32)
            .write(&full)
            .unwrap();
        let broken = dir.path().join(format!("{arch}-broken.gguf"));
        without(&full, &broken, drop);
        let err = match LocalModel::open(&broken, &mut |_, _| {}) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{arch} without {drop} loaded"),
        };
        // A Qwen2 file with only some QKV biases names the first one missing; a Phi-3 file
        // without its fused QKV falls back to separate tensors and names those.
        let named = match drop {
            "blk.0.attn_qkv.weight" => "blk.0.attn_q.weight",
            d => d,
        };
        assert!(err.contains(named), "{arch} without {drop}: {err}");
    }
}

/// Sessions run together in one batched pass (different positions, prompt chunks and decode
/// steps side by side) give each session the bits it gets alone, on global and sliding-window
/// layers, and leave caches that continue identically.
#[test]
fn a_batch_of_sessions_is_bit_identical_to_each_alone() {
    for m in [
        SyntheticModel::default(),
        SyntheticModel::family("gemma3", GgmlDType::Q8_0),
        SyntheticModel::family("phi3", GgmlDType::Q4_0),
        SyntheticModel {
            weight_dtype: GgmlDType::Q4K,
            dim: 256,
            ff: 512,
            ..Default::default()
        },
    ] {
        let (_d, path) = write(&m);
        let file = GgufFile::open(&path).unwrap();
        let blocks = ModelSpec::from_file(&file).unwrap().block_count;
        let slice = load(&file, &LoadOptions::blocks(0..blocks), &mut |_, _| {}).unwrap();
        let stack = slice.stack().unwrap();
        let ids = |n: usize, seed: u32| -> Vec<u32> {
            (0..n as u32).map(|i| (i * 31 + seed * 17) % 250).collect()
        };
        // (history already in the cache, tokens of this step): a long prompt chunk on top of
        // a history past the window, a fresh prompt, two decode steps.
        let plan = [(11usize, 6usize), (0, 4), (3, 1), (13, 1)];
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        for (s, &(history, step)) in plan.iter().enumerate() {
            let mut kv = stack.new_cache(0..blocks, 32);
            if history > 0 {
                let mut h = embed(&file, &ids(history, s as u32));
                stack.forward(&mut h, &mut kv, 0).unwrap();
            }
            let mut kv_alone = stack.new_cache(0..blocks, 32);
            if history > 0 {
                let mut h = embed(&file, &ids(history, s as u32));
                stack.forward(&mut h, &mut kv_alone, 0).unwrap();
            }
            let mut x = embed(&file, &ids(step, 100 + s as u32));
            stack.forward(&mut x, &mut kv_alone, history).unwrap();
            alone.push((x, kv_alone));
            caches.push(kv);
        }
        let mut data = Vec::new();
        for (s, &(_, step)) in plan.iter().enumerate() {
            data.extend(embed(&file, &ids(step, 100 + s as u32)).data);
        }
        let rows: usize = plan.iter().map(|p| p.1).sum();
        let mut x = model::Hidden::new(rows, alone[0].0.dim, data).unwrap();
        let mut entries: Vec<model::BatchEntry> = caches
            .iter_mut()
            .zip(&plan)
            .map(|(kv, &(history, step))| model::BatchEntry {
                tokens: step,
                pos: history,
                kv,
            })
            .collect();
        stack
            .forward_batch(0..blocks, &mut x, &mut entries)
            .unwrap();
        drop(entries);
        let mut row = 0;
        for (s, &(history, step)) in plan.iter().enumerate() {
            let got = &x.data[row * x.dim..(row + step) * x.dim];
            assert_eq!(
                got,
                &alone[s].0.data[..],
                "{m:?}: session {s} differs in the batch"
            );
            row += step;
            // The caches the batch left continue like the ones of the lone runs.
            let mut a = embed(&file, &[5]);
            let mut b = a.clone();
            stack
                .forward(&mut a, &mut caches[s], history + step)
                .unwrap();
            stack
                .forward(&mut b, &mut alone[s].1, history + step)
                .unwrap();
            assert_eq!(a, b, "{m:?}: session {s}'s cache differs after the batch");
        }

        // A bad entry (wrong position) is refused by check_step before anything runs.
        let mut kv = stack.new_cache(0..blocks, 32);
        assert!(matches!(
            stack.check_step(&(0..blocks), 1, &kv, 3),
            Err(ModelError::Position {
                got: 3,
                expected: 0
            })
        ));
        let mut x = embed(&file, &[1, 2]);
        let err = stack
            .forward_batch(
                0..blocks,
                &mut x,
                &mut [model::BatchEntry {
                    tokens: 1,
                    pos: 0,
                    kv: &mut kv,
                }],
            )
            .unwrap_err();
        assert!(err.to_string().contains("batch of 1 rows"), "{err}");
    }
}
