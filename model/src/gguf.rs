//! A memory-mapped GGUF file: the parsed header plus zero-copy views of tensor data.
//!
//! Weights are never copied out of the mapping. A process that serves blocks 10..20 only ever
//! touches the pages of those tensors, so its resident memory is its slice, not the file.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use memmap2::Mmap;

use crate::error::{ModelError, Result};
use crate::gguf_header::{self, HeaderError, TensorInfo, TensorType};

/// An opened model file. Cheap to clone views from; the mapping lives as long as any view.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mapped>,
    metadata: HashMap<String, Value>,
    /// Tensor directory by name (every entry's byte range already checked against the file).
    tensors: HashMap<String, TensorInfo>,
}

/// A typed, bounds-checked window onto one tensor's bytes inside the mapping.
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub dtype: TensorType,
    /// Dimensions outermost first, e.g. `[rows, cols]` for a matrix (GGUF stores them reversed).
    pub dims: Vec<usize>,
    map: Arc<Mapped>,
    range: Range<usize>,
}

/// The mapping and the open file behind it: the file is kept to drop pages from the page
/// cache once copied (see [`TensorView::release`]).
struct Mapped {
    map: Mmap,
    file: std::fs::File,
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
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
        let header = gguf_header::parse(&map).map_err(|e| match e {
            HeaderError::NotGguf => ModelError::NotGguf { path: path.clone() },
            e => ModelError::BadGguf {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        let tensors = header
            .tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Ok(Self {
            path,
            map: Arc::new(Mapped { map, file }),
            metadata: header.metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The named tensor (its byte range was checked against the file when it was opened).
    pub fn tensor(&self, name: &str) -> Result<TensorView> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        Ok(TensorView {
            name: info.name.clone(),
            dtype: info.ty,
            dims: info.dims.clone(),
            map: self.map.clone(),
            range: info.start..info.start + info.len,
        })
    }

    /// Names and views of every tensor, in name order (deterministic for fingerprints).
    pub fn tensors(&self) -> Result<Vec<TensorView>> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
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
        // The header checked that rows are whole blocks of a known type.
        let (Some(block), Some(size)) = (self.dtype.block_elems(), self.dtype.block_bytes()) else {
            return Err(bad(format!("tensor type {} is unknown", self.dtype)));
        };
        let row_bytes = cols / block * size;
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

    /// Drops the tensor's pages from this process's resident memory once they have been copied
    /// (the kernels keep weights in their own layout). Later reads fault them in again from the
    /// file, so this only costs time if the bytes are read again.
    pub fn release(&self) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and private, so discarding its pages loses nothing:
        // the next access re-reads the same bytes from the file.
        unsafe {
            let _ = self.map.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            );
        }
        // Unmapped, the pages still sit in the page cache, and a memory cgroup (a container's
        // limit) counts the page cache it filled: a node would be charged its slice twice, the
        // packed copy and the file pages. Dropping them keeps the charge at the copy. Advice
        // only: a failure costs memory that the kernel can still reclaim, not correctness.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: plain advice on a file descriptor this struct owns; no memory is touched.
            let _ = unsafe {
                libc::posix_fadvise(
                    self.map.file.as_raw_fd(),
                    self.range.start as libc::off_t,
                    self.range.len() as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }
}
