//! Dense tensors on the wire as plain little-endian bytes. Kept free of candle so that tools
//! and the coordinator can speak the protocol without linking a tensor library.

use half::{bf16, f16};

use crate::v1::{Dtype, Tensor};
use crate::WireError;

/// Upper bounds a receiver enforces before trusting a tensor's header: a peer can claim any
/// shape, and the check must happen before we size a buffer from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLimits {
    pub max_elements: usize,
    pub max_rank: usize,
}

/// A validated tensor widened to f32, the only dtype the compute side works in.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Bytes per element, or `None` for dtypes that carry no fixed per-element layout
/// (unspecified, and Q8_ROW whose rows also carry a scale: see [`data_len`]).
pub fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::Bf16 => Some(2),
        Dtype::Q8Row | Dtype::Unspecified => None,
    }
}

/// Rows and columns as Q8_ROW sees a shape: the last dimension is a row, everything before it
/// counts rows (a scalar or an empty shape is one row of one element).
fn q8_rows(shape: &[u64], elements: usize) -> (usize, usize) {
    let cols = shape.last().map_or(1, |&c| c as usize);
    if cols == 0 {
        return (0, 0);
    }
    (elements / cols, cols)
}

/// Bytes of data a tensor of `dtype` with this shape (and `elements` elements) must carry;
/// `None` on overflow or a dtype without a layout.
fn data_len(dtype: Dtype, shape: &[u64], elements: usize) -> Option<usize> {
    match dtype {
        Dtype::Q8Row => {
            let (rows, cols) = q8_rows(shape, elements);
            rows.checked_mul(cols.checked_add(4)?)
        }
        other => elements.checked_mul(element_size(other)?),
    }
}

/// One row as Q8_ROW: scale = largest magnitude / 127, each value rounded to the nearest
/// multiple of it. Non-finite values do not set the scale and are sent as 0 (hidden states are
/// finite; this only keeps a bad value from spoiling its whole row).
fn encode_q8_row(row: &[f32], out: &mut Vec<u8>) {
    let max = row
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    out.extend_from_slice(&scale.to_le_bytes());
    for &v in row {
        let q = if scale > 0.0 && v.is_finite() {
            (v / scale).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        };
        out.push(q as u8);
    }
}

/// Encodes row-major `values` of the given `shape`. f16/bf16 round to nearest even.
///
/// `DTYPE_UNSPECIFIED` is encoded as f32: it is what an unset proto3 field (e.g. a client's
/// `wire_dtype`) reads as, and the lossless choice is the safe reading of "no preference".
/// `values.len()` must equal the shape's product; a mismatch is a caller bug, which the
/// receiver's [`decode_tensor`] rejects.
pub fn encode_tensor(values: &[f32], shape: &[usize], dtype: Dtype) -> Tensor {
    debug_assert_eq!(
        shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)),
        Some(values.len()),
        "tensor values do not match shape {shape:?}"
    );
    let dtype = match dtype {
        Dtype::Unspecified => Dtype::F32,
        other => other,
    };
    let size = element_size(dtype).unwrap_or(4);
    let mut data = Vec::with_capacity(values.len() * size);
    match dtype {
        Dtype::Q8Row => {
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            let (_, cols) = q8_rows(&dims, values.len());
            if cols > 0 {
                for row in values.chunks(cols) {
                    encode_q8_row(row, &mut data);
                }
            }
        }
        Dtype::F16 => {
            for &v in values {
                data.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for &v in values {
                data.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
        Dtype::F32 | Dtype::Unspecified => {
            for &v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Tensor {
        dtype: dtype as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data,
    }
}

/// Validates a received tensor against `limits` and widens it to f32.
///
/// All checks run on the header before anything is allocated, so a hostile shape cannot make
/// us reserve memory; the only allocation is sized by data that has already arrived.
pub fn decode_tensor(t: &Tensor, limits: &TensorLimits) -> Result<DecodedTensor, WireError> {
    let bad = |msg: String| Err(WireError::BadTensor(msg));
    let dtype = match Dtype::try_from(t.dtype) {
        Ok(Dtype::Unspecified) => return bad("dtype is unspecified".into()),
        Ok(dtype) => dtype,
        Err(_) => return bad(format!("unknown dtype {}", t.dtype)),
    };
    if t.shape.len() > limits.max_rank {
        return bad(format!(
            "rank {} exceeds the limit of {}",
            t.shape.len(),
            limits.max_rank
        ));
    }
    let Some(elements) = checked_product(&t.shape) else {
        return bad(format!("shape {:?} overflows the element count", t.shape));
    };
    if elements > limits.max_elements {
        return bad(format!(
            "shape {:?} has {elements} elements, above the limit of {}",
            t.shape, limits.max_elements
        ));
    }
    let expected = data_len(dtype, &t.shape, elements);
    if expected != Some(t.data.len()) {
        let needs = match (dtype, element_size(dtype)) {
            (_, Some(size)) => format!("{elements} x {size}"),
            _ => {
                let (rows, cols) = q8_rows(&t.shape, elements);
                format!("{rows} rows x (4 + {cols})")
            }
        };
        return bad(format!(
            "data is {} bytes but shape {:?} of {} needs {needs}",
            t.data.len(),
            t.shape,
            dtype.as_str_name()
        ));
    }
    let values = match dtype {
        Dtype::Q8Row => {
            let (_, cols) = q8_rows(&t.shape, elements);
            let mut values = Vec::with_capacity(elements);
            if cols > 0 {
                for row in t.data.chunks_exact(cols + 4) {
                    let scale = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
                    values.extend(row[4..].iter().map(|&q| f32::from(q as i8) * scale));
                }
            }
            values
        }
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::Bf16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 | Dtype::Unspecified => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    };
    // `checked_product` has already proven every dimension fits in usize.
    let shape = t.shape.iter().map(|&d| d as usize).collect();
    Ok(DecodedTensor { shape, values })
}

/// Product of the dimensions as a usize, `None` if any partial product overflows.
fn checked_product(shape: &[u64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: TensorLimits = TensorLimits {
        max_elements: 1 << 20,
        max_rank: 4,
    };

    fn round_trip(values: &[f32], shape: &[usize], dtype: Dtype) -> DecodedTensor {
        let t = encode_tensor(values, shape, dtype);
        decode_tensor(&t, &LIMITS).unwrap()
    }

    fn bad_tensor_message(t: &Tensor, limits: &TensorLimits) -> String {
        match decode_tensor(t, limits) {
            Err(WireError::BadTensor(msg)) => msg,
            other => panic!("expected BadTensor, got {other:?}"),
        }
    }

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let values = [
            0.0,
            -0.0,
            1.5,
            -3.25e-40, // subnormal
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7fc0_1234), // NaN with payload
            std::f32::consts::PI,
        ];
        let t = encode_tensor(&values, &[2, 5], Dtype::F32);
        assert_eq!(t.data.len(), 40);
        assert_eq!(&t.data[8..12], &1.5f32.to_le_bytes());
        let d = decode_tensor(&t, &LIMITS).unwrap();
        assert_eq!(d.shape, vec![2, 5]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d.values), bits(&values));
    }

    #[test]
    fn unspecified_encodes_as_f32() {
        let t = encode_tensor(&[1.0, 2.0], &[2], Dtype::Unspecified);
        assert_eq!(t.dtype, Dtype::F32 as i32);
        assert_eq!(decode_tensor(&t, &LIMITS).unwrap().values, vec![1.0, 2.0]);
    }

    #[test]
    fn f16_round_trip_within_precision() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.7) * 0.37).collect();
        let d = round_trip(&values, &[8, 8], Dtype::F16);
        assert_eq!(d.shape, vec![8, 8]);
        for (a, b) in values.iter().zip(&d.values) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-11), "{a} vs {b}");
        }
    }

    #[test]
    fn bf16_round_trip_within_precision() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.7) * 1234.5).collect();
        let d = round_trip(&values, &[64], Dtype::Bf16);
        for (a, b) in values.iter().zip(&d.values) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} vs {b}");
        }
    }

    #[test]
    fn half_precision_rounds_to_nearest_even() {
        // Exactly halfway between two representable values: ties go to the even mantissa.
        let f16_tie_down = 1.0 + 2f32.powi(-11);
        let f16_tie_up = 1.0 + 3.0 * 2f32.powi(-11);
        let d = round_trip(&[f16_tie_down, f16_tie_up], &[2], Dtype::F16);
        assert_eq!(d.values, vec![1.0, 1.0 + 2f32.powi(-9)]);
        let bf16_tie_down = 1.0 + 2f32.powi(-8);
        let bf16_tie_up = 1.0 + 3.0 * 2f32.powi(-8);
        let d = round_trip(&[bf16_tie_down, bf16_tie_up], &[2], Dtype::Bf16);
        assert_eq!(d.values, vec![1.0, 1.0 + 2f32.powi(-6)]);
    }

    #[test]
    fn q8_rows_keep_each_value_within_half_a_step_of_their_row_scale() {
        let values: Vec<f32> = (0..48)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.8)
            .collect();
        let mut values = values;
        values[16..32].iter_mut().for_each(|v| *v *= 1000.0);
        let t = encode_tensor(&values, &[3, 16], Dtype::Q8Row);
        assert_eq!(t.data.len(), 3 * (4 + 16));
        let d = decode_tensor(&t, &LIMITS).unwrap();
        assert_eq!(d.shape, vec![3, 16]);
        for (row_in, row_out) in values.chunks(16).zip(d.values.chunks(16)) {
            let step = row_in.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in row_in.iter().zip(row_out) {
                assert!(
                    (a - b).abs() <= step * 0.5 + 1e-6,
                    "{a} vs {b} (step {step})"
                );
            }
        }
        // A row of zeros has scale 0 and comes back as zeros.
        let z = round_trip(&[0.0; 8], &[2, 4], Dtype::Q8Row);
        assert_eq!(z.values, vec![0.0; 8]);
    }

    #[test]
    fn q8_rows_are_checked_against_the_shape() {
        let mut t = encode_tensor(&[1.0; 8], &[2, 4], Dtype::Q8Row);
        t.data.pop();
        let msg = bad_tensor_message(&t, &LIMITS);
        assert!(msg.contains("2 rows x (4 + 4)"), "{msg}");
        let t = Tensor {
            dtype: Dtype::Q8Row as i32,
            shape: vec![u64::MAX / 2, 2],
            data: vec![],
        };
        let unlimited = TensorLimits {
            max_elements: usize::MAX,
            max_rank: 8,
        };
        assert!(decode_tensor(&t, &unlimited).is_err());
        // Non-finite values do not spoil the row.
        let d = round_trip(&[f32::NAN, 1.0, f32::INFINITY, -2.0], &[1, 4], Dtype::Q8Row);
        assert_eq!(d.values[0], 0.0);
        assert!((d.values[3] + 2.0).abs() < 0.01, "{:?}", d.values);
    }

    #[test]
    fn empty_tensor_is_valid() {
        let d = round_trip(&[], &[0, 16], Dtype::F16);
        assert_eq!(d.shape, vec![0, 16]);
        assert!(d.values.is_empty());
    }

    #[test]
    fn rejects_unspecified_and_unknown_dtype() {
        let mut t = encode_tensor(&[1.0], &[1], Dtype::F32);
        t.dtype = Dtype::Unspecified as i32;
        assert!(bad_tensor_message(&t, &LIMITS).contains("unspecified"));
        t.dtype = 42;
        assert!(bad_tensor_message(&t, &LIMITS).contains("unknown dtype 42"));
    }

    #[test]
    fn rejects_wrong_data_length() {
        let mut t = encode_tensor(&[1.0, 2.0, 3.0, 4.0], &[2, 2], Dtype::F16);
        t.data.pop();
        let msg = bad_tensor_message(&t, &LIMITS);
        assert!(msg.contains("7 bytes") && msg.contains("4 x 2"), "{msg}");
        t.data.extend_from_slice(&[0, 0, 0]);
        assert!(bad_tensor_message(&t, &LIMITS).contains("10 bytes"));
    }

    #[test]
    fn rejects_too_high_rank() {
        let t = encode_tensor(&[1.0], &[1, 1, 1, 1, 1], Dtype::F32);
        let msg = bad_tensor_message(&t, &LIMITS);
        assert!(
            msg.contains("rank 5") && msg.contains("limit of 4"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_overflowing_shape() {
        let t = Tensor {
            dtype: Dtype::F32 as i32,
            shape: vec![1 << 32, 1 << 32, 2],
            data: vec![],
        };
        let unlimited = TensorLimits {
            max_elements: usize::MAX,
            max_rank: 8,
        };
        assert!(bad_tensor_message(&t, &unlimited).contains("overflows"));
    }

    #[test]
    fn rejects_element_count_overflowing_byte_length() {
        // The element count fits in usize but the byte count does not.
        let t = Tensor {
            dtype: Dtype::F32 as i32,
            shape: vec![u64::MAX / 2],
            data: vec![],
        };
        let unlimited = TensorLimits {
            max_elements: usize::MAX,
            max_rank: 8,
        };
        assert!(bad_tensor_message(&t, &unlimited).contains("needs"));
    }

    #[test]
    fn rejects_too_many_elements() {
        // Claims a huge tensor without sending its data: must fail on the header alone.
        let t = Tensor {
            dtype: Dtype::Bf16 as i32,
            shape: vec![1 << 20, 1 << 20],
            data: vec![],
        };
        let msg = bad_tensor_message(&t, &LIMITS);
        assert!(msg.contains("1099511627776 elements"), "{msg}");
        assert!(msg.contains(&format!("limit of {}", 1 << 20)), "{msg}");
    }

    proptest! {
        #[test]
        fn f32_bits_survive_any_value(bits in proptest::collection::vec(any::<u32>(), 0..64)) {
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let d = round_trip(&values, &[values.len()], Dtype::F32);
            let out: Vec<u32> = d.values.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(out, bits);
        }

        #[test]
        fn decode_never_panics(
            dtype in -2i32..7,
            shape in proptest::collection::vec(any::<u64>(), 0..6),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode_tensor(&Tensor { dtype, shape, data }, &LIMITS);
        }
    }
}
