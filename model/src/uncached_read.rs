//! Reading a byte range of a file once, in order, without filling the page cache.
//!
//! Why: a process in a memory-limited container is charged for the page cache its reads fill.
//! Hashing a 3.8 GiB model through buffered reads drove a 1600 MiB container's memory peak to
//! its limit in the `big-model` compose scenario, although each 4 MiB chunk was dropped with
//! `POSIX_FADV_DONTNEED` right after it was hashed. `O_DIRECT` reads move the bytes from the
//! device into our own buffer and create no cached pages at all, so the memory a read costs is
//! that buffer. Where the file system refuses `O_DIRECT` (tmpfs, for one) or on other systems,
//! buffered reads with that advice are the fallback.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

/// Bytes handed to the caller at a time (and the size of the one buffer).
const CHUNK_BYTES: usize = 4 << 20;
/// Offsets, lengths and the buffer of a direct read are multiples of this: the largest logical
/// block size of common devices, so it suits 512-byte ones too.
const ALIGN: usize = 4096;

/// How the bytes were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT`: no page cache.
    Direct,
    /// Buffered reads, each chunk dropped from the page cache once consumed.
    Buffered,
}

/// A file opened for reading byte ranges around the page cache, with its one buffer.
pub struct UncachedFile {
    file: File,
    /// Opened with `O_DIRECT`, and no direct read refused yet.
    direct: bool,
    /// `CHUNK_BYTES` plus room to align its start.
    buf: Vec<u8>,
}

impl UncachedFile {
    /// Opens `path` for direct reads where the system and the file system allow them.
    ///
    /// # Errors
    ///
    /// The file cannot be opened.
    pub fn open(path: &Path) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path);
            match direct {
                Ok(file) => return Ok(Self::new(file, true)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let file = File::open(path)?;
        advise(&file, 0, 0, Advice::Sequential);
        Ok(Self::new(file, false))
    }

    fn new(file: File, direct: bool) -> Self {
        Self {
            file,
            direct,
            buf: vec![0u8; CHUNK_BYTES + ALIGN],
        }
    }

    /// How the ranges read so far were read (the last one, if the mode changed).
    pub fn mode(&self) -> ReadMode {
        if self.direct {
            ReadMode::Direct
        } else {
            ReadMode::Buffered
        }
    }

    /// Calls `each` with the bytes of `range`, in order, in chunks of at most 4 MiB.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or ends before `range` does.
    pub fn for_each_chunk(
        &mut self,
        range: Range<u64>,
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if self.direct {
            match read_direct(&self.file, &mut self.buf, range.clone(), &mut each) {
                Ok(()) => return Ok(()),
                Err(Direct::Unsupported) => {
                    // The file system opened the file with O_DIRECT but refuses such reads
                    // (it may not support them after all): buffered from here on.
                    self.direct = false;
                    advise(&self.file, 0, 0, Advice::Sequential);
                }
                Err(Direct::Io(e)) => return Err(e),
            }
        }
        read_buffered(&self.file, &mut self.buf[..CHUNK_BYTES], range, &mut each)
    }
}

#[cfg(target_os = "linux")]
enum Direct {
    /// The file system refused an aligned direct read before any byte was handed out: read
    /// buffered instead.
    Unsupported,
    Io(io::Error),
}

#[cfg(target_os = "linux")]
fn read_direct(
    f: &File,
    raw: &mut [u8],
    range: Range<u64>,
    each: &mut impl FnMut(&[u8]),
) -> Result<(), Direct> {
    use std::os::unix::fs::FileExt;
    // The aligned part of the buffer (safe code, no custom allocation).
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + CHUNK_BYTES];
    let align = ALIGN as u64;
    let mut pos = range.start - range.start % align;
    // Reads stop at the aligned end of the range: a small tensor costs a page or two, not a
    // whole chunk.
    let stop = range.end.div_ceil(align) * align;
    let mut handed_out = false;
    while pos < range.end {
        let want = (stop - pos).min(CHUNK_BYTES as u64) as usize;
        let mut filled = 0;
        while filled < want {
            match f.read_at(&mut buf[filled..want], pos + filled as u64) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    // Only the file's end gives an unaligned count, and a further read from
                    // an unaligned offset would be refused rather than return 0.
                    if n % ALIGN != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !handed_out => {
                    return Err(Direct::Unsupported)
                }
                Err(e) => return Err(Direct::Io(e)),
            }
        }
        let end = pos + filled as u64;
        let (lo, hi) = (pos.max(range.start), end.min(range.end));
        if lo < hi {
            each(&buf[(lo - pos) as usize..(hi - pos) as usize]);
            handed_out = true;
        }
        if filled < want && end < range.end {
            return Err(Direct::Io(ended_early(end, range.end)));
        }
        pos = end;
    }
    Ok(())
}

fn read_buffered(
    f: &File,
    buf: &mut [u8],
    range: Range<u64>,
    each: &mut impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(CHUNK_BYTES as u64) as usize;
        read_exact_at(f, &mut buf[..n], pos).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ended_early(pos, range.end),
            _ => e,
        })?;
        each(&buf[..n]);
        advise(f, pos, n as u64, Advice::DontNeed);
        pos += n as u64;
    }
    Ok(())
}

fn ended_early(at: u64, wanted: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the file ends near byte {at}, before byte {wanted}"),
    )
}

fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = f;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

enum Advice {
    /// The range is read once, in order: read ahead.
    Sequential,
    /// Done with these pages.
    DontNeed,
}

/// Page-cache advice; only advice, so a failure changes memory use, never the bytes read.
fn advise(f: &File, start: u64, len: u64, advice: Advice) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let advice = match advice {
            Advice::Sequential => libc::POSIX_FADV_SEQUENTIAL,
            Advice::DontNeed => libc::POSIX_FADV_DONTNEED,
        };
        // SAFETY: advice on a descriptor we own; no memory is touched.
        let _ = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                start as libc::off_t,
                len as libc::off_t,
                advice,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, start, len, advice);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: usize, name: &str) -> (std::path::PathBuf, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!("uncached-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("data");
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        (p, bytes)
    }

    fn read(f: &mut UncachedFile, range: Range<u64>) -> (Vec<u8>, usize) {
        let mut got = Vec::new();
        let mut chunks = 0;
        f.for_each_chunk(range, |c| {
            assert!(!c.is_empty() && c.len() <= CHUNK_BYTES);
            got.extend_from_slice(c);
            chunks += 1;
        })
        .unwrap();
        (got, chunks)
    }

    /// Unaligned starts and ends, ranges inside one chunk and across several, and a range
    /// that ends at an unaligned end of file all give exactly the file's bytes.
    #[test]
    fn every_range_gives_the_files_bytes() {
        let len = 2 * CHUNK_BYTES + 3 * ALIGN + 123;
        let (p, bytes) = file_of(len, "ranges");
        let opened = UncachedFile::open(&p).unwrap();
        eprintln!(
            "read mode on {}: {:?}",
            std::env::temp_dir().display(),
            opened.mode()
        );
        // The buffered fallback too, wherever the file system takes direct reads.
        let buffered = UncachedFile::new(File::open(&p).unwrap(), false);
        for mut f in [opened, buffered] {
            check_ranges(&mut f, &bytes);
        }
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    fn check_ranges(f: &mut UncachedFile, bytes: &[u8]) {
        let len = bytes.len() as u64;
        for range in [
            0..len,
            1..len,
            4095..4097,
            0..0,
            17..(CHUNK_BYTES as u64 + 5),
            (CHUNK_BYTES as u64 - 1)..len,
            (len - 1)..len,
            (ALIGN as u64)..(2 * CHUNK_BYTES as u64),
        ] {
            let (got, _) = read(f, range.clone());
            assert_eq!(
                got,
                bytes[range.start as usize..range.end as usize],
                "{range:?} read {:?}",
                f.mode()
            );
        }
        let (_, chunks) = read(f, 0..len);
        assert_eq!(chunks, 3);
    }

    /// A range past the end of the file is an error naming where the file ended, not a short
    /// result.
    #[test]
    fn a_file_shorter_than_the_range_is_an_error() {
        let (p, _) = file_of(10_000, "short");
        let mut f = UncachedFile::open(&p).unwrap();
        let e = f.for_each_chunk(0..20_000, |_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("before byte 20000"), "{e}");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
