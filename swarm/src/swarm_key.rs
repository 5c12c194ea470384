//! A private swarm: peers that share a secret key talk only to each other.
//!
//! An open swarm admits anyone, which is what a public model wants and what a family's or a
//! lab's own devices do not. libp2p's pnet protects every connection with XSalsa20 keyed by the
//! shared secret before anything else is exchanged, so a peer without the key cannot complete a
//! handshake, read the DHT or open a session. The key file uses the go-ipfs `swarm.key` format
//! (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits), so existing tooling can make one;
//! `edge-node swarm-key FILE` makes one too.

use std::path::Path;

use libp2p::pnet::PreSharedKey;

#[derive(Debug, thiserror::Error)]
pub enum SwarmKeyError {
    #[error("reading swarm key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("swarm key {path} is not a /key/swarm/psk/1.0.0/ base16 key: {reason}")]
    Invalid { path: String, reason: String },
    #[error("swarm key {path} exists already; not overwriting it")]
    Exists { path: String },
}

/// Reads a swarm key file. Files are small; anything over 1 KiB is refused before it is read.
pub fn load(path: &Path) -> Result<PreSharedKey, SwarmKeyError> {
    let shown = || path.display().to_string();
    let io = |source| SwarmKeyError::Io {
        path: shown(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > 1024 {
        return Err(SwarmKeyError::Invalid {
            path: shown(),
            reason: format!("{len} bytes, a key file has about 100"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    text.trim().parse().map_err(|e| SwarmKeyError::Invalid {
        path: shown(),
        reason: format!("{e:?}"),
    })
}

/// Writes a fresh random key to `path` (readable only by its owner), never over an existing file.
pub fn create(path: &Path) -> Result<PreSharedKey, SwarmKeyError> {
    let shown = || path.display().to_string();
    if path.exists() {
        return Err(SwarmKeyError::Exists { path: shown() });
    }
    let key = PreSharedKey::new(rand::random());
    crate::identity::write_private(path, format!("{key}\n").as_bytes()).map_err(|source| {
        SwarmKeyError::Io {
            path: shown(),
            source,
        }
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_loads_back_and_is_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("edge-swarm-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("swarm.key");
        let _ = std::fs::remove_file(&path);
        let made = create(&path).unwrap();
        assert_eq!(
            load(&path).unwrap().fingerprint().to_string(),
            made.fingerprint().to_string()
        );
        assert!(matches!(create(&path), Err(SwarmKeyError::Exists { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnot-hex\n").unwrap();
        assert!(matches!(load(&path), Err(SwarmKeyError::Invalid { .. })));
        std::fs::write(&path, vec![b'a'; 4096]).unwrap();
        assert!(matches!(load(&path), Err(SwarmKeyError::Invalid { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
