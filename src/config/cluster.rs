//! The values of `[cluster]` that hold secrets: the Redis URL (its password) and the cluster
//! secret. Neither is ever shown: `Debug` and `Display` mask them, and no error names them.

use std::fmt;
use std::path::Path;

use redis::{IntoConnectionInfo, ProtocolVersion};

use super::files::{read_limited, FileError, TooLarge};

/// The shortest cluster secret accepted, in bytes: the key of every fingerprint and seal
/// (256 bits) is derived from it.
pub const MIN_SECRET_LEN: usize = 32;

/// The environment variable that holds Redis's password, so that it need not sit in a file
/// (used when the URL has none).
pub const REDIS_PASSWORD_ENV: &str = "WXGATE_REDIS_PASSWORD";

/// The environment variable that holds the cluster secret when `cluster.secret_file` is
/// not set.
pub const CLUSTER_SECRET_ENV: &str = "WXGATE_CLUSTER_SECRET";

/// A checked `redis://` or `rediss://` URL, with the password from the environment when the
/// URL has none.
#[derive(Clone)]
pub struct RedisUrl {
    info: redis::ConnectionInfo,
    /// The URL with its password masked.
    shown: String,
    /// What equality compares: the URL as written and the password in force.
    identity: (String, Option<String>),
}

/// Why a text is not a usable Redis URL (the text itself is never part of the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    /// No URL at all.
    #[error("required when [cluster] is present, such as \"redis://127.0.0.1:6379/0\"")]
    Missing,
    /// Not `redis://` or `rediss://` with a host.
    #[error(
        "must be a redis:// or rediss:// URL with a host, such as \"redis://127.0.0.1:6379/0\""
    )]
    Unsupported,
    /// The Redis client refused it (a bad database number, say).
    #[error("the Redis client cannot use it")]
    Refused,
}

impl RedisUrl {
    /// Checks `text`, taking the password from `env_password` when the URL has none.
    pub fn parse(text: &str, env_password: Option<String>) -> Result<RedisUrl, RedisUrlError> {
        if text.is_empty() {
            return Err(RedisUrlError::Missing);
        }
        let url = url::Url::parse(text).map_err(|_| RedisUrlError::Unsupported)?;
        if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
            return Err(RedisUrlError::Unsupported);
        }
        let info = text
            .into_connection_info()
            .map_err(|_| RedisUrlError::Refused)?;
        let mut settings = info.redis_settings().clone();
        let password = match (settings.password(), env_password) {
            (Some(password), _) => Some(password.to_owned()),
            (None, Some(password)) if !password.is_empty() => {
                settings = settings.set_password(&password);
                Some(password)
            }
            _ => None,
        };
        // RESP3, for the push messages that tell replicas an answer is ready.
        settings = settings.set_protocol(ProtocolVersion::RESP3);
        let mut shown = url.clone();
        if url.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        Ok(RedisUrl {
            info: info.set_redis_settings(settings),
            shown: shown.to_string(),
            identity: (text.to_owned(), password),
        })
    }

    /// What the Redis client connects with.
    pub fn connection_info(&self) -> redis::ConnectionInfo {
        self.info.clone()
    }
}

impl PartialEq for RedisUrl {
    fn eq(&self, other: &Self) -> bool {
        self.identity == other.identity
    }
}

impl Eq for RedisUrl {}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

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
    fn redis_urls_are_checked_and_their_passwords_masked() {
        let url = RedisUrl::parse("redis://:hunter2@127.0.0.1:6379/2", None).unwrap();
        assert_eq!(url.to_string(), "redis://:***@127.0.0.1:6379/2");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            url.connection_info().redis_settings().password(),
            Some("hunter2")
        );
        let from_env = RedisUrl::parse("redis://127.0.0.1", Some("s3cret".into())).unwrap();
        assert_eq!(
            from_env.connection_info().redis_settings().password(),
            Some("s3cret")
        );
        assert_eq!(from_env.to_string(), "redis://127.0.0.1");
        assert!(RedisUrl::parse("rediss://redis.internal:6380", None).is_ok());
        assert_eq!(
            RedisUrl::parse("", None).unwrap_err(),
            RedisUrlError::Missing
        );
        for bad in [
            "http://x",
            "redis://",
            "127.0.0.1:6379",
            "unix:///tmp/r.sock",
        ] {
            assert!(RedisUrl::parse(bad, None).is_err(), "{bad}");
        }
    }

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
