//! The default model against llama.cpp's own outputs
//! (`model/tests/data/smollm2-135m.generations.json`) and against itself split into slices.

use model::{load, GgufFile, LoadOptions};
use serde_json::Value;

use crate::common::{data, default_model, require_model};

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax_at(v: &[f32], id: u32) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    (v[id as usize] as f64 - lse) as f32
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_llama_cpp() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(data("smollm2-135m.generations.json")).unwrap(),
    )
    .unwrap();
    let model = default_model();
    let mut failures = Vec::new();
    for case in reference["generations"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected_prompt = ids(&case["prompt_token_ids"]);
        let expected = ids(&case["generated_token_ids"]);
        let expected_lp: Vec<f64> = case["chosen_logprob_per_position"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let tie = case["near_tie_index"]
            .as_u64()
            .map_or(expected.len(), |n| n as usize);

        let prompt_ids = model.tokenizer.encode(prompt, true).unwrap();
        if prompt_ids != expected_prompt {
            failures.push(format!(
                "{prompt:?}: prompt tokens {prompt_ids:?} vs llama.cpp {expected_prompt:?}"
            ));
        }
        // The model is checked on llama.cpp's own prompt ids, so a tokenizer fault cannot hide
        // or fake a model fault.
        let prompt_ids = expected_prompt;
        let mut kv = model.new_cache(prompt_ids.len() + expected.len()).unwrap();
        let mut logits = model.forward(&prompt_ids, &mut kv, 0).unwrap();
        let mut got = Vec::new();
        for (i, &reference_lp) in expected_lp.iter().enumerate().take(tie) {
            let id = argmax(&logits);
            if i < 3 {
                let lp = log_softmax_at(&logits, id) as f64;
                eprintln!("{prompt:?} position {i}: logprob {lp:.4}, llama.cpp {reference_lp:.4}");
                if (lp - reference_lp).abs() > 0.05 {
                    failures.push(format!(
                        "{prompt:?} position {i}: logprob {lp:.4} vs llama.cpp {reference_lp:.4}"
                    ));
                }
            }
            got.push(id);
            logits = model.forward(&[id], &mut kv, prompt_ids.len() + i).unwrap();
        }
        if got[..] != expected[..tie] {
            failures.push(format!(
                "{prompt:?}: tokens {got:?} vs llama.cpp {:?} (up to near-tie {tie})",
                &expected[..tie]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn default_model_split_in_three_is_bit_identical() {
    let file = GgufFile::open(require_model()).unwrap();
    let model = default_model();
    let ids = model
        .tokenizer
        .encode("Peers pass hidden states along a chain.", true)
        .unwrap();
    let mut whole = model.slice.embedding().unwrap().embed(&ids).unwrap();
    let mut split = whole.clone();
    let stack = model.slice.stack().unwrap();
    let mut kv = stack.new_cache(0..30, 64);
    stack.forward(&mut whole, &mut kv, 0).unwrap();
    for range in [0..10, 10..20, 20..30] {
        let part = load(&file, &LoadOptions::blocks(range.clone()), &mut |_, _| {}).unwrap();
        let stack = part.stack().unwrap();
        let mut kv = stack.new_cache(range, 64);
        stack.forward(&mut split, &mut kv, 0).unwrap();
    }
    assert_eq!(whole, split);
}
