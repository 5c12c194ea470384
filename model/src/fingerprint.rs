//! The identity of a model file, so peers serving different files or quantizations never mix.
//!
//! It hashes what determines the numbers a block computes: the architecture and the name, type,
//! shape and bytes of every tensor. Metadata that does not change the math (names, licences,
//! tokenizer extras) is left out, so re-packaging the same weights keeps the fingerprint.

use std::io::{Read, Seek, SeekFrom};

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

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
    h.update(b"edge-swarm fingerprint v1\0");
    let arch = match file.metadata().get("general.architecture") {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s.clone(),
        _ => return Err(ModelError::MissingKey("general.architecture".into())),
    };
    h.update((arch.len() as u64).to_le_bytes());
    h.update(arch.as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for view in file.tensors()? {
        h.update((view.name.len() as u64).to_le_bytes());
        h.update(view.name.as_bytes());
        h.update(format!("{:?}", view.dtype).as_bytes());
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
}
