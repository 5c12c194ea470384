//! The GGUF header (metadata and tensor directory), parsed from the mapped bytes with every
//! count and length checked against what is left of the file before anything is allocated.
//!
//! A GGUF file is untrusted input: a swarm member may be handed one by anybody. candle's parser
//! allocated from declared counts and carried backtraces in its errors; this one answers any
//! malformed header with a one-line error naming what is wrong, and never panics.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

const MAGIC: &[u8; 4] = b"GGUF";
/// Nesting of arrays inside arrays that a real file needs (none do more than one level).
const MAX_DEPTH: usize = 2;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// What is wrong with a header, in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a GGUF file (no GGUF magic)")]
    NotGguf,
    #[error("GGUF version {0} is not supported (1 to 3 are)")]
    Version(u32),
    #[error("truncated header: {0} ends past the end of the file")]
    Truncated(String),
    #[error(
        "{what} declares {count} entries, more than the {left} bytes left in the file can hold"
    )]
    TooMany {
        what: String,
        count: u64,
        left: usize,
    },
    #[error("metadata key {key:?}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("general.alignment {0} is not a power of two")]
    Alignment(u64),
}

type Result<T> = std::result::Result<T, HeaderError>;

/// A ggml tensor type, by its id in the file: known types carry their block geometry (so byte
/// ranges can be checked even for types with no kernel), unknown ids are kept for the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorType(pub u32);

impl TensorType {
    /// `(name, elements per block, bytes per block)` of the types ggml defines.
    fn traits(self) -> Option<(&'static str, usize, usize)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            40 => ("NVFP4", 64, 36),
            41 => ("Q1_0", 128, 18),
            42 => ("Q2_0", 64, 18),
            _ => return None,
        })
    }

    pub fn name(self) -> String {
        self.traits()
            .map_or_else(|| format!("type {}", self.0), |t| t.0.to_string())
    }

    pub fn block_elems(self) -> Option<usize> {
        self.traits().map(|t| t.1)
    }

    pub fn block_bytes(self) -> Option<usize> {
        self.traits().map(|t| t.2)
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor directory, checked: its bytes lie inside the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: TensorType,
    /// Dimensions outermost first (`[rows, cols]` for a matrix; GGUF stores them reversed).
    pub dims: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// Where tensor data begins (aligned).
    pub data_offset: usize,
}

/// A bounds-checked cursor: every read says what it was reading when it runs out.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(HeaderError::Truncated(what()));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit `min_size` bytes per entry in what is left.
    fn count(&mut self, v1: bool, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = if v1 {
            self.u32(what)? as u64
        } else {
            self.u64(what)?
        };
        let fits = (self.left() / min_size.max(1)) as u64;
        if n > fits {
            return Err(HeaderError::TooMany {
                what: what(),
                count: n,
                left: self.left(),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, v1: bool, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(v1, 1, what)?;
        let bytes = self.take(len, what)?;
        // Lossy: a bad byte in a tokenizer entry should not make the whole file unusable.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, v1: bool, depth: usize, key: &str) -> Result<Value> {
        let what = || format!("the value of {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(HeaderError::BadValue {
                        key: key.into(),
                        reason: format!("boolean byte {b}"),
                    })
                }
            },
            8 => Value::String(self.string(v1, &what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(HeaderError::BadValue {
                        key: key.into(),
                        reason: format!("arrays nested deeper than {MAX_DEPTH}"),
                    });
                }
                let elem = self.u32(&what)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => {
                        if v1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => 12,
                    10..=12 => 8,
                    other => {
                        return Err(HeaderError::BadValue {
                            key: key.into(),
                            reason: format!("unknown array element type {other}"),
                        })
                    }
                };
                let n = self.count(v1, min, &what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, v1, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(HeaderError::BadValue {
                    key: key.into(),
                    reason: format!("unknown value type {other}"),
                })
            }
        })
    }
}

/// Parses the header at the start of `bytes` (the whole file) and checks that every tensor's
/// data lies inside it.
pub fn parse(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { bytes, pos: 0 };
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Err(HeaderError::NotGguf);
    }
    r.pos = 4;
    let version = r.u32(&|| "the version".into())?;
    if !(1..=3).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    let v1 = version == 1;
    // A tensor entry is at least a length, a name byte, a dimension count, a type and an
    // offset; a metadata entry at least a key length, a key byte, a type and a byte.
    let tensor_count = r.count(v1, 8 + 1 + 4 + 4 + 8, &|| "the tensor count".into())?;
    let kv_count = r.count(v1, 8 + 1 + 4 + 1, &|| "the metadata count".into())?;

    let mut metadata = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = r.string(v1, &|| format!("metadata key {i}"))?;
        let ty = r.u32(&|| format!("the type of {key:?}"))?;
        let value = r.value(ty, v1, 0, &key)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) => *a as u64,
        Some(Value::U64(a)) => *a,
        Some(Value::I32(a)) if *a >= 0 => *a as u64,
        Some(other) => {
            return Err(HeaderError::BadValue {
                key: "general.alignment".into(),
                reason: format!("expected an unsigned integer, found {other:?}"),
            })
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(HeaderError::Alignment(alignment));
    }

    let mut raw = Vec::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = r.string(v1, &|| format!("tensor {i}'s name"))?;
        let what = || format!("tensor {name:?}");
        let n_dims = r.u32(&what)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(HeaderError::BadTensor {
                name,
                reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(if v1 {
                r.u32(&what)? as u64
            } else {
                r.u64(&what)?
            });
        }
        let ty = TensorType(r.u32(&what)?);
        let offset = r.u64(&what)?;
        raw.push((name, dims, ty, offset));
    }
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;

    let mut tensors = Vec::with_capacity(raw.len());
    let mut names = std::collections::HashSet::with_capacity(raw.len());
    for (name, mut dims, ty, offset) in raw {
        let bad = |reason: String| HeaderError::BadTensor {
            name: name.clone(),
            reason,
        };
        if !names.insert(name.clone()) {
            return Err(bad("appears twice".into()));
        }
        let (Some(be), Some(bb)) = (ty.block_elems(), ty.block_bytes()) else {
            return Err(bad(format!("unknown tensor type {}", ty.0)));
        };
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        if dims.first().is_some_and(|&inner| inner % be as u64 != 0) {
            return Err(bad(format!(
                "rows of {} elements are not whole {ty} blocks of {be}",
                dims[0]
            )));
        }
        let len = (elems / be as u64)
            .checked_mul(bb as u64)
            .ok_or_else(|| bad("byte size overflows".into()))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "data offset {offset} is not {alignment}-aligned"
            )));
        }
        let start = data_offset
            .checked_add(offset)
            .ok_or_else(|| bad("data offset overflows".into()))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("data end overflows".into()))?;
        if end > bytes.len() as u64 {
            return Err(bad(format!(
                "needs bytes {start}..{end} but the file has {} (truncated download?)",
                bytes.len()
            )));
        }
        dims.reverse();
        tensors.push(TensorInfo {
            name,
            ty,
            dims: dims.into_iter().map(|d| d as usize).collect(),
            start: start as usize,
            len: len as usize,
        });
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset: data_offset as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small valid file: one string key, the alignment key, one 4x32 Q8_0 tensor.
    fn valid(alignment: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // metadata
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        string(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "general.alignment");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&alignment.to_le_bytes());
        string(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes()); // Q8_0
        b.extend_from_slice(&0u64.to_le_bytes());
        let a = alignment.max(1) as usize;
        while b.len() % a != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, 4 * 34));
        b
    }

    #[test]
    fn a_valid_header_is_read() {
        let h = parse(&valid(32)).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.tensors.len(), 1);
        let t = &h.tensors[0];
        assert_eq!(
            (t.dims.clone(), t.ty.name(), t.len),
            (vec![4, 32], "Q8_0".into(), 136)
        );
        assert_eq!(t.start % 32, 0);
    }

    #[test]
    fn malformed_headers_are_one_line_errors() {
        assert_eq!(parse(b"GGML").unwrap_err(), HeaderError::NotGguf);
        assert_eq!(parse(&valid(0)).unwrap_err(), HeaderError::Alignment(0));
        assert_eq!(parse(&valid(3)).unwrap_err(), HeaderError::Alignment(3));
        let mut huge = valid(32);
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse(&huge).unwrap_err(),
            HeaderError::TooMany { .. }
        ));
        let f = valid(32);
        for cut in [10, 30, 60, 100, f.len() - 1] {
            let e = parse(&f[..cut]).unwrap_err();
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(
                matches!(
                    e,
                    HeaderError::Truncated(_)
                        | HeaderError::TooMany { .. }
                        | HeaderError::BadTensor { .. }
                ),
                "cut at {cut}: {e:?}"
            );
        }
        let mut unknown = valid(32);
        let name = unknown
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
            .unwrap();
        let at = name + 9 + 4 + 16;
        assert_eq!(&unknown[at..at + 4], &8u32.to_le_bytes());
        unknown[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(parse(&unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown tensor type 99"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any bytes, and any corruption of a valid file, give a result or an error: never a
        /// panic, never an allocation beyond the file's size.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
            let mut prefixed = b"GGUF\x03\0\0\0".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = parse(&prefixed);
        }

        #[test]
        fn corrupted_valid_files_never_panic(at in 0usize..400, byte in any::<u8>(), cut in 0usize..600) {
            let mut f = valid(32);
            let at = at % f.len();
            f[at] = byte;
            f.truncate(cut.min(f.len()));
            let _ = parse(&f);
        }
    }
}
