//! A memory-mapped GGUF file: the parsed header plus zero-copy views of tensor data.
//!
//! Weights are never copied out of the mapping. A process that serves blocks 10..20 only ever
//! touches the pages of those tensors, so its resident memory is its slice, not the file.

use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{ModelError, Result};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// An opened model file. Cheap to clone views from; the mapping lives as long as any view.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    content: Content,
}

/// A typed, bounds-checked window onto one tensor's bytes inside the mapping.
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub dtype: GgmlDType,
    /// Dimensions outermost first, e.g. `[rows, cols]` for a matrix (GGUF stores them reversed).
    pub dims: Vec<usize>,
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|reason| ModelError::Open {
            path: path.clone(),
            reason,
        })?;
        // SAFETY: the mapping is read-only. A file truncated by another process while mapped
        // would fault; that is the same contract every mmap-based model loader accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|reason| ModelError::Open {
            path: path.clone(),
            reason,
        })?;
        if map.len() < 4 || &map[..4] != GGUF_MAGIC {
            return Err(ModelError::NotGguf { path });
        }
        let content =
            Content::read(&mut Cursor::new(&map[..])).map_err(|e| ModelError::BadGguf {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path,
            map: Arc::new(map),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The named tensor, with its byte range checked against the file before anything reads it.
    pub fn tensor(&self, name: &str) -> Result<TensorView> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        self.view(name, info)
    }

    fn view(&self, name: &str, info: &TensorInfo) -> Result<TensorView> {
        let bad = |reason: String| ModelError::BadTensor {
            name: name.to_string(),
            reason,
        };
        let dims = info.shape.dims().to_vec();
        let elems = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        let block = info.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(bad(format!(
                "{elems} elements is not a multiple of the {:?} block size {block}",
                info.ggml_dtype
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(|| bad("size overflows".into()))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| bad("offset overflows".into()))?;
        let end = start
            .checked_add(bytes)
            .ok_or_else(|| bad("offset overflows".into()))?;
        if end > self.map.len() {
            return Err(bad(format!(
                "needs bytes {start}..{end} but the file has only {} bytes (truncated download?)",
                self.map.len()
            )));
        }
        Ok(TensorView {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            dims,
            map: self.map.clone(),
            range: start..end,
        })
    }

    /// Names and views of every tensor, in name order (deterministic for fingerprints).
    pub fn tensors(&self) -> Result<Vec<TensorView>> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        names.into_iter().map(|n| self.tensor(n)).collect()
    }
}

impl TensorView {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// The same bytes seen with other dimensions of equal element count (a vector as a 1-row
    /// matrix, say).
    pub fn with_dims(mut self, dims: Vec<usize>) -> Result<Self> {
        if dims.iter().product::<usize>() != self.elem_count() {
            return Err(ModelError::BadTensor {
                name: self.name.clone(),
                reason: format!("cannot view shape {:?} as {dims:?}", self.dims),
            });
        }
        self.dims = dims;
        Ok(self)
    }

    /// Rows `rows` of a matrix, as a view of their own: how fused tensors (Phi-3's `attn_qkv`
    /// and gate/up) are split into the matrices the block multiplies. The product of a row
    /// range is the same bits as those rows of the whole product, so nothing is copied.
    pub fn rows(&self, rows: Range<usize>) -> Result<Self> {
        let bad = |reason: String| ModelError::BadTensor {
            name: self.name.clone(),
            reason,
        };
        let [n, cols] = self.dims[..] else {
            return Err(bad(format!(
                "expected a matrix to split by rows, found shape {:?}",
                self.dims
            )));
        };
        if rows.start > rows.end || rows.end > n {
            return Err(bad(format!("rows {rows:?} of a {n}-row matrix")));
        }
        let block = self.dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(bad(format!(
                "row length {cols} is not a multiple of the {:?} block size {block}",
                self.dtype
            )));
        }
        let row_bytes = cols / block * self.dtype.type_size();
        Ok(Self {
            name: format!("{}[{}..{}]", self.name, rows.start, rows.end),
            dtype: self.dtype,
            dims: vec![rows.len(), cols],
            map: self.map.clone(),
            range: self.range.start + rows.start * row_bytes
                ..self.range.start + rows.end * row_bytes,
        })
    }

    pub fn len_bytes(&self) -> usize {
        self.range.len()
    }

    /// Where the tensor's bytes are in the file.
    pub fn byte_range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Reinterprets the bytes as a slice of `T` (a GGML block or a float type).
    ///
    /// Checked, not assumed: GGUF promises aligned tensor data, but a hostile file need not keep
    /// that promise, and a misaligned cast would be undefined behaviour.
    pub fn cast<T: Pod>(&self) -> Result<&[T]> {
        let bytes = self.bytes();
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size)
            || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            return Err(ModelError::BadTensor {
                name: self.name.clone(),
                reason: format!(
                    "data is not aligned for {} (offset {})",
                    std::any::type_name::<T>(),
                    self.range.start
                ),
            });
        }
        // SAFETY: length and alignment checked above; `Pod` types accept every bit pattern.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
    }

    /// Drops the tensor's pages from this process's resident memory once they have been copied
    /// (the kernels keep weights in their own layout). Later reads fault them in again from the
    /// file, so this only costs time if the bytes are read again.
    pub fn release(&self) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and private, so discarding its pages loses nothing:
        // the next access re-reads the same bytes from the file.
        unsafe {
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            );
        }
    }
}

/// Marker for plain-old-data types that may be viewed directly from file bytes.
///
/// # Safety
/// Implementors must be `repr(C)` (or primitive), contain no padding-sensitive invariants and
/// accept every bit pattern.
pub unsafe trait Pod: Sized + 'static {}
unsafe impl Pod for f32 {}
unsafe impl Pod for half::f16 {}
unsafe impl Pod for half::bf16 {}
