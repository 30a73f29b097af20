//! The cluster secret of `[cluster]`: never shown (`Debug` masks it), and no error names
//! it. Where Redis is, and its credentials, are `config/redis.rs`'.

use std::fmt;
use std::path::Path;

use super::files::{read_limited, FileError, TooLarge};

/// The shortest cluster secret accepted, in bytes: the key of every fingerprint and seal
/// (256 bits) is derived from it.
pub const MIN_SECRET_LEN: usize = 32;

/// The environment variable that holds the cluster secret when `cluster.secret_file` is
/// not set.
pub const CLUSTER_SECRET_ENV: &str = "WXGATE_CLUSTER_SECRET";

/// The key the replicas share. Its bytes are never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

/// Why there is no usable cluster secret (never quoting it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterSecretError {
    /// Neither a file nor the environment variable.
    #[error("no cluster secret: set cluster.secret_file or the environment variable WXGATE_CLUSTER_SECRET (at least 32 bytes, e.g. `openssl rand -hex 32`)")]
    Missing,
    /// The file could not be read.
    #[error("cannot read the secret file: {0}")]
    Unreadable(String),
    /// The file is larger than wxgate reads.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// Too short to be a key.
    #[error(
        "the cluster secret has {0} bytes; at least 32 are needed (e.g. `openssl rand -hex 32`)"
    )]
    TooShort(usize),
}

impl ClusterSecret {
    /// The secret from `file`, or else from `env`; surrounding white space (a file's final
    /// newline) is not part of it.
    pub fn load(
        file: Option<&Path>,
        env: Option<String>,
    ) -> Result<ClusterSecret, ClusterSecretError> {
        let text = match (file, env) {
            (Some(path), _) => read_limited(path).map_err(|error| match error {
                FileError::Unreadable(error) => {
                    ClusterSecretError::Unreadable(error.kind().to_string())
                }
                FileError::TooLarge(error) => ClusterSecretError::TooLarge(error),
            })?,
            (None, Some(value)) => value.into_bytes(),
            (None, None) => return Err(ClusterSecretError::Missing),
        };
        let trimmed = text.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(ClusterSecretError::TooShort(trimmed.len()));
        }
        Ok(ClusterSecret(trimmed.to_vec()))
    }

    /// The secret's bytes, for the key derivation and nothing else.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_comes_from_a_file_or_the_environment_and_is_long_enough() {
        let long = "k".repeat(32);
        assert!(ClusterSecret::load(None, Some(long.clone())).is_ok());
        assert_eq!(
            ClusterSecret::load(None, Some("short".into())),
            Err(ClusterSecretError::TooShort(5))
        );
        assert_eq!(
            ClusterSecret::load(None, None),
            Err(ClusterSecretError::Missing)
        );
        let path = std::env::temp_dir().join(format!("wxgate-secret-{}", std::process::id()));
        std::fs::write(&path, format!("{long}\n")).unwrap();
        let secret = ClusterSecret::load(Some(&path), None).unwrap();
        assert_eq!(secret.expose(), long.as_bytes());
        assert_eq!(format!("{secret:?}"), "ClusterSecret(***)");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            ClusterSecret::load(Some(&path), None),
            Err(ClusterSecretError::Unreadable(_))
        ));
    }
}
