//! A peer's long-lived identity: `--identity FILE` keeps the same peer id across restarts.

use std::path::Path;

use libp2p::identity::Keypair;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading identity file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("identity file {path} is not a libp2p key: {reason}")]
    Invalid { path: String, reason: String },
}

/// The identity kept in `path`, or a fresh one for this run only: without a file, a restarted
/// peer is a new peer to the swarm.
pub fn load_or_generate(path: Option<&Path>) -> Result<Keypair, IdentityError> {
    match path {
        Some(p) => load_or_create(p),
        None => Ok(Keypair::generate_ed25519()),
    }
}

/// Loads the keypair from `path`, creating a new Ed25519 one (readable only by its owner) when
/// the file does not exist.
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Invalid {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            write_private(path, &bytes).map_err(io)?;
            tracing::info!(peer = %key.public().to_peer_id(), "created identity {}", path.display());
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("id-test-{}", std::process::id()));
        let path = dir.join("node.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Invalid { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
