//! Element-wise math that only some families need (GELU, soft-capping, biases), written to
//! give llama.cpp's CPU bits: the families' block differences go through here, not through
//! copies of the block.

use std::sync::OnceLock;

use half::f16;

/// ggml's `ggml_gelu_f32` (tanh approximation, `tanhf` from the `libm` crate like the rest of
/// the crate, so every CPU gets the same bits). ggml is built with FMA contraction, which fuses
/// `1 + a*x*x` into one rounding; checked against the table of the llama.cpp build used for the
/// reference data (all 63,488 finite halves agree, the unfused form differs in one).
fn gelu_f32(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * inner))
}

/// ggml's `ggml_table_gelu_f16`: GELU of every half, rounded to half. ggml's f32 GELU looks its
/// input up here (after rounding it to half), so the table is part of the arithmetic.
fn gelu_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_f32(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// `gate[i] = gelu(gate[i]) * up[i]`, as ggml's `ggml_vec_geglu_f32` with `GGML_GELU_FP16`:
/// saturated outside [-10, 10], the half table inside.
pub fn geglu(gate: &mut [f32], up: &[f32], width: usize) {
    crate::numerics::par_rows(gate, up, width, geglu_rows);
}

fn geglu_rows(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            table[f16::from_f32(x).to_bits() as usize].to_f32() * u
        };
    }
}

/// `x = cap * tanh(x / cap)` as llama.cpp's graph does it: scale by `1/cap`, `tanhf`, scale.
pub fn softcap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x.iter_mut() {
        *v = libm::tanhf(*v * inv) * cap;
    }
}

/// Adds `bias` to every row of `x` (`[rows, bias.len()]`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `x *= s`, ggml's `ggml_scale` without bias.
pub fn scale(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v *= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_matches_exact_gelu_to_half_precision() {
        let xs: Vec<f32> = (-1300..1300).map(|i| i as f32 * 0.01).collect();
        let mut g = xs.clone();
        geglu(&mut g, &vec![2.0; xs.len()], xs.len());
        for (&x, &y) in xs.iter().zip(&g) {
            let exact = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / 2f64.sqrt()));
            let tol = 2e-3 * (1.0 + exact.abs());
            assert!(
                (y as f64 / 2.0 - exact).abs() < tol,
                "gelu({x}) = {}, want {exact}",
                y / 2.0
            );
        }
        assert_eq!(g[0], 0.0, "saturates below -10");
        assert_eq!(
            *g.last().unwrap(),
            xs.last().unwrap() * 2.0,
            "identity above 10"
        );
    }

    /// erf by its series (Numerical Recipes' erfc), enough for the test's tolerance. The
    /// polynomial is evaluated from a coefficient list: written out as nested Horner brackets
    /// it took rustfmt close to a minute to format.
    fn libm_erf(x: f64) -> f64 {
        const C: [f64; 10] = [
            -1.26551223,
            1.00002368,
            0.37409196,
            0.09678418,
            -0.18628806,
            0.27886807,
            -1.13520398,
            1.48851587,
            -0.82215223,
            0.17087277,
        ];
        let t = 1.0 / (1.0 + 0.5 * x.abs());
        let poly = C.iter().rev().fold(0.0, |acc, c| acc * t + c);
        let y = 1.0 - t * (-x * x + poly).exp();
        if x >= 0.0 {
            y
        } else {
            -y
        }
    }

    #[test]
    fn softcap_bounds_and_keeps_small_values() {
        let mut x = vec![-1000.0, -1.0, 0.0, 0.5, 1000.0];
        softcap(&mut x, 30.0);
        assert!(x[0] >= -30.0 && x[4] <= 30.0);
        assert!((x[1] + 1.0).abs() < 1e-3 && x[2] == 0.0 && (x[3] - 0.5).abs() < 1e-3);
    }
}
