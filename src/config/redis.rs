//! Where the replicas' Redis is, in one of its *forms* ([`RedisForm`]), and how to reach it:
//! TLS, the certificate authorities of `cluster.ca_file`, an ACL user and its password.
//!
//! - **standalone** (`cluster.redis_url`): one endpoint, a Redis or a managed service's
//!   endpoint (a cluster-mode proxy among them); TLS by its scheme (`rediss://`), the user
//!   and password in the URL or the environment;
//! - **Sentinel** (`cluster.sentinels` and `cluster.sentinel_master`): the sentinels that
//!   know the primary, found again after every failover;
//! - **Redis Cluster** (`cluster.cluster_nodes`): seed nodes, the rest learned from them.
//!
//! Credentials are never shown: `Debug` and `Display` mask them, and no error names them.

use std::fmt;

use redis::{ConnectionAddr, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo};

use super::CaFile;

/// The environment variable that holds Redis's password, so that it need not sit in a file
/// (used when the URL has none, and by the Sentinel and Cluster forms).
pub const REDIS_PASSWORD_ENV: &str = "WXGATE_REDIS_PASSWORD";

/// The environment variable that holds the ACL user of Redis (used when the URL has none,
/// and by the Sentinel and Cluster forms).
pub const REDIS_USERNAME_ENV: &str = "WXGATE_REDIS_USERNAME";

/// The environment variable that holds the sentinels' own password, when they require one
/// (`requirepass` in their configuration).
pub const SENTINEL_PASSWORD_ENV: &str = "WXGATE_SENTINEL_PASSWORD";

/// The environment variable that holds the sentinels' own ACL user, if any.
pub const SENTINEL_USERNAME_ENV: &str = "WXGATE_SENTINEL_USERNAME";

/// Where the replicas' Redis is and how to reach it (`[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// Which form, and its addresses.
    pub form: RedisForm,
    /// `cluster.ca_file`: the certificate authorities trusted for Redis's TLS certificates
    /// instead of the public roots (a private CA, as managed services use).
    pub ca_file: Option<CaFile>,
}

/// The form of the replicas' Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisForm {
    /// `cluster.redis_url`: one endpoint.
    Standalone(RedisUrl),
    /// `cluster.sentinels` and `cluster.sentinel_master`.
    Sentinel {
        /// The sentinels, asked in turn.
        sentinels: Vec<NodeAddress>,
        /// The name the sentinels know the primary by (`sentinel monitor NAME ...`).
        master: String,
        /// TLS and credentials of the primary (and of the sentinels: their TLS).
        nodes: NodeSettings,
        /// The sentinels' own credentials, if they require any.
        sentinel_credentials: Credentials,
    },
    /// `cluster.cluster_nodes`: Redis Cluster.
    Cluster {
        /// Seed nodes: any of them tells the rest.
        nodes: Vec<NodeAddress>,
        /// TLS and credentials of every node.
        settings: NodeSettings,
    },
}

/// A `host:port` of the Sentinel and Cluster forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// A name or an IP address (IPv6 without its brackets).
    pub host: String,
    pub port: u16,
}

/// TLS and credentials of the servers of the Sentinel and Cluster forms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSettings {
    /// `cluster.tls`.
    pub tls: bool,
    /// From `WXGATE_REDIS_USERNAME` and `WXGATE_REDIS_PASSWORD`.
    pub credentials: Credentials,
}

/// An ACL user and its password, each optional. Never shown.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |value: &Option<String>| value.as_ref().map(|_| "***");
        f.debug_struct("Credentials")
            .field("username", &shown(&self.username))
            .field("password", &shown(&self.password))
            .finish()
    }
}

impl NodeAddress {
    /// Reads `host:port` (`[::1]:6379` for IPv6).
    pub fn parse(text: &str) -> Result<NodeAddress, NodeAddressError> {
        let (host, port) = text.rsplit_once(':').ok_or(NodeAddressError)?;
        let host = host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            .unwrap_or(host);
        let plausible = !host.is_empty()
            && !host.contains(['/', '@', ' ', '[', ']'])
            && (host.contains(':') == text.starts_with('['));
        match port.parse::<u16>() {
            Ok(port) if port > 0 && plausible => Ok(NodeAddress {
                host: host.to_owned(),
                port,
            }),
            _ => Err(NodeAddressError),
        }
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a list entry is not a `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be a host and port such as \"10.0.0.5:6379\" (\"[::1]:6379\" for IPv6)")]
pub struct NodeAddressError;

impl NodeSettings {
    /// How to connect to the server at `address`: TLS when set (the CA of `cluster.ca_file`
    /// is given to the client separately), the credentials, RESP3 (published messages
    /// arrive as pushes on the same connection).
    pub fn connection_info(&self, address: &NodeAddress) -> redis::ConnectionInfo {
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host: address.host.clone(),
                port: address.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(address.host.clone(), address.port)
        };
        let info = addr
            .into_connection_info()
            .expect("a host and port make a connection info");
        let settings = self.credentials.apply(RedisConnectionInfo::default());
        info.set_redis_settings(settings.set_protocol(ProtocolVersion::RESP3))
    }
}

impl Credentials {
    /// `username` and `password` as given, each taken only when not empty.
    pub fn new(username: Option<String>, password: Option<String>) -> Credentials {
        let given = |value: Option<String>| value.filter(|value| !value.is_empty());
        Credentials {
            username: given(username),
            password: given(password),
        }
    }

    /// The settings with these credentials in them.
    pub fn apply(&self, mut settings: RedisConnectionInfo) -> RedisConnectionInfo {
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        settings
    }
}

impl RedisTarget {
    /// The certificate authorities of `cluster.ca_file` as the Redis client takes them (PEM),
    /// or `None` for the public roots.
    pub fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        let ca_file = self.ca_file.as_ref()?;
        Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_file.pem()),
        })
    }

    /// What `check-config` and the log say of the form in use: never a password.
    pub fn describe(&self) -> String {
        let tls = |tls: bool| if tls { ", TLS" } else { "" };
        let ca = if self.ca_file.is_some() {
            ", CA from cluster.ca_file"
        } else {
            ""
        };
        let user = |credentials: &Credentials| match credentials.username {
            Some(_) => ", an ACL user",
            None => "",
        };
        match &self.form {
            RedisForm::Standalone(url) => format!("standalone Redis at {url}{ca}"),
            RedisForm::Sentinel {
                sentinels,
                master,
                nodes,
                ..
            } => format!(
                "Redis Sentinel: the primary of \"{master}\" as {} sentinel(s) name it{}{}{ca}",
                sentinels.len(),
                tls(nodes.tls),
                user(&nodes.credentials),
            ),
            RedisForm::Cluster { nodes, settings } => format!(
                "Redis Cluster: {} seed node(s){}{}{ca}",
                nodes.len(),
                tls(settings.tls),
                user(&settings.credentials),
            ),
        }
    }
}

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
    #[error("required when [cluster] is present (or cluster.sentinels, or cluster.cluster_nodes), such as \"redis://127.0.0.1:6379/0\"")]
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
    /// Checks `text`, taking the user and the password from `env` when the URL has none.
    pub fn parse(text: &str, env: Credentials) -> Result<RedisUrl, RedisUrlError> {
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
        if let (None, Some(username)) = (settings.username(), &env.username) {
            settings = settings.set_username(username);
        }
        let password = match (settings.password(), env.password) {
            (Some(password), _) => Some(password.to_owned()),
            (None, Some(password)) => {
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
        if !url.username().is_empty() {
            // An ACL user's name is a credential too.
            let _ = shown.set_username("***");
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

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_checked_and_their_passwords_masked() {
        let url =
            RedisUrl::parse("redis://:hunter2@127.0.0.1:6379/2", Credentials::default()).unwrap();
        assert_eq!(url.to_string(), "redis://:***@127.0.0.1:6379/2");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            url.connection_info().redis_settings().password(),
            Some("hunter2")
        );
        let env = Credentials::new(Some("wxgate".into()), Some("s3cret".into()));
        let from_env = RedisUrl::parse("redis://127.0.0.1", env).unwrap();
        assert_eq!(
            from_env.connection_info().redis_settings().username(),
            Some("wxgate")
        );
        assert_eq!(
            from_env.connection_info().redis_settings().password(),
            Some("s3cret")
        );
        assert_eq!(from_env.to_string(), "redis://127.0.0.1");
        let user =
            RedisUrl::parse("rediss://wxgate:pw@redis:6380", Credentials::default()).unwrap();
        assert_eq!(user.to_string(), "rediss://***:***@redis:6380");
        assert!(user.tls());
        assert!(RedisUrl::parse("rediss://redis.internal:6380", Credentials::default()).is_ok());
        assert_eq!(
            RedisUrl::parse("", Credentials::default()).unwrap_err(),
            RedisUrlError::Missing
        );
        for bad in [
            "http://x",
            "redis://",
            "127.0.0.1:6379",
            "unix:///tmp/r.sock",
        ] {
            assert!(
                RedisUrl::parse(bad, Credentials::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_addresses_are_hosts_and_ports() {
        let node = NodeAddress::parse("10.0.0.5:26379").unwrap();
        assert_eq!((node.host.as_str(), node.port), ("10.0.0.5", 26379));
        let v6 = NodeAddress::parse("[::1]:6379").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.to_string().as_str()),
            ("::1", "[::1]:6379")
        );
        assert!(NodeAddress::parse("redis.internal:6379").is_ok());
        for bad in [
            "10.0.0.5",
            ":6379",
            "host:0",
            "host:x",
            "::1:6379",
            "redis://h:1",
            "a b:1",
        ] {
            assert!(NodeAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_never_shown() {
        let credentials = Credentials::new(Some("wxgate".into()), Some("hunter2".into()));
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("wxgate") && !shown.contains("hunter2"),
            "{shown}"
        );
        let settings = NodeSettings {
            tls: true,
            credentials,
        };
        let info = settings.connection_info(&NodeAddress::parse("h:1").unwrap());
        assert!(matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
        assert_eq!(info.redis_settings().password(), Some("hunter2"));
        assert_eq!(
            Credentials::new(Some(String::new()), None),
            Credentials::default()
        );
    }
}
