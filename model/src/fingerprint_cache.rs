//! Fingerprints already computed on this machine, so that a node restarting on a multi-gigabyte
//! file does not hash all of it again.
//!
//! An entry is named by a hash of the fingerprint's version and the file's identity here: path,
//! device, inode, length, modification and change times. Writing the file in any way changes
//! its change time, which no user call can set back, so a changed file never finds the entry
//! of what it was. Entries are plain 64-digit hex; anything else is ignored and recomputed.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprint;

/// Where computed fingerprints are kept: `$EDGE_SWARM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/edge-swarm`, else `~/.cache/edge-swarm`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EDGE_SWARM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("edge-swarm"));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty())?;
    Some(PathBuf::from(home).join(".cache").join("edge-swarm"))
}

/// The entry of the file at `path` as it is now, for fingerprints of `version`.
pub fn entry(dir: &Path, version: &str, path: &Path) -> Option<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(path).ok()?;
        let m = std::fs::metadata(&path).ok()?;
        let key = format!(
            "{version}\0{}\0{}\0{}\0{}\0{}.{}\0{}.{}",
            path.display(),
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        );
        Some(dir.join(format!("fingerprint-{}", hex(&Sha256::digest(key)[..16]))))
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, version, path);
        None
    }
}

/// A cached fingerprint: exactly 64 hex digits, or nothing (a damaged or foreign entry is
/// recomputed, never trusted or fatal).
pub fn read(entry: &Path) -> Option<Fingerprint> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(entry)
        .ok()?
        .take(65)
        .read_to_string(&mut text)
        .ok()?;
    let text = text.trim_end_matches('\n');
    if text.len() != 64 {
        return None;
    }
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(fp)
}

/// Writes the entry through a temporary file and a rename, so a reader never sees half of it.
pub fn write(entry: &Path, fp: &Fingerprint) -> std::io::Result<()> {
    let dir = entry.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}",
        entry.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, hex(fp) + "\n")?;
    std::fs::rename(&tmp, entry)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
