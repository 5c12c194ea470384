//! How fast the loaded blocks are: timed on synthetic inputs of the model's width, for the
//! speed a node announces and for `bench --local`.

use std::time::{Duration, Instant};

use model::{BlockStack, Hidden, ModelError};

/// Times the stack on synthetic model-scale inputs: a `prefill_tokens` prefill and
/// `decode_steps` one-token steps. Returns milliseconds per block for one decode step and for
/// the prefill. Used by `bench` and by `join`, which announces the result.
pub fn measure_speed(
    stack: &BlockStack,
    prefill_tokens: usize,
    decode_steps: usize,
) -> Result<(f64, f64), ModelError> {
    let d = stack.spec().embedding_length;
    let range = stack.range();
    let synth = |n: usize, seed: usize| -> Hidden {
        let data = (0..n * d)
            .map(|i| ((i.wrapping_add(seed).wrapping_mul(2654435761)) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        Hidden {
            tokens: n,
            dim: d,
            data,
        }
    };
    let mut kv = stack.new_cache(range.clone(), prefill_tokens + decode_steps);
    let mut x = synth(prefill_tokens, 0);
    let t0 = Instant::now();
    stack.forward(&mut x, &mut kv, 0)?;
    let prefill = t0.elapsed();
    let mut steps = Duration::ZERO;
    for i in 0..decode_steps {
        let mut x = synth(1, i + 1);
        let t = Instant::now();
        stack.forward(&mut x, &mut kv, prefill_tokens + i)?;
        steps += t.elapsed();
    }
    let blocks = range.len().max(1) as f64;
    let decode_ms = steps.as_secs_f64() * 1e3 / decode_steps.max(1) as f64 / blocks;
    Ok((decode_ms, prefill.as_secs_f64() * 1e3 / blocks))
}
