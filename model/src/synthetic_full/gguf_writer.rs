//! The GGUF header (metadata and tensor directory) of a file whose tensor data is written
//! afterwards, tensor by tensor, so that a multi-gigabyte file never has to be in memory.
//!
//! candle's writer takes every tensor as a finished `QTensor`; here only the sizes are known
//! up front, which is all the header needs: offsets follow from sizes and the alignment.

/// GGUF's default data alignment (we write no `general.alignment`).
pub const ALIGNMENT: u64 = 32;

/// A metadata value of the kinds these files use.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// A tensor's directory entry: name, dimensions outermost first (`[rows, cols]`), ggml type
/// and size in bytes.
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    pub bytes: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Rounds `n` up to the data alignment.
pub fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The header bytes, padded to the alignment, so that the first tensor's data follows
/// directly and each next one at its aligned offset.
pub fn header(metadata: &[(String, Meta)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(&mut out, s);
                }
            }
            Meta::F32s(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Meta::I32s(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for d in t.dims.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = aligned(offset + t.bytes);
    }
    out.resize(aligned(out.len() as u64) as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own parser reads back what was written: keys, types, shapes and offsets.
    #[test]
    fn header_parses_back() {
        let md = vec![
            (
                "general.architecture".to_string(),
                Meta::Str("llama".into()),
            ),
            ("llama.block_count".to_string(), Meta::U32(2)),
            ("t.scores".to_string(), Meta::F32s(vec![0.0, -1.0])),
        ];
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                dims: vec![2, 32],
                ggml_type: 2,
                bytes: 36,
            },
            TensorEntry {
                name: "b".into(),
                dims: vec![4],
                ggml_type: 0,
                bytes: 16,
            },
        ];
        let mut file = header(&md, &tensors);
        let data_start = file.len();
        file.resize(data_start + 64 + 16, 0);
        let h = crate::gguf_header::parse(&file).unwrap();
        assert_eq!(h.metadata.len(), 3);
        assert_eq!(h.tensors[0].dims, vec![2, 32]);
        assert_eq!(h.tensors[0].start, data_start);
        assert_eq!(h.tensors[1].start, data_start + 64);
    }
}
