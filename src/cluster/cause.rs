//! Why Redis cannot be used ([`RedisCause`]), as the log says it when a replica starts
//! without Redis or degrades, and as `wxgate check-config --connect` says it
//! ([`try_connection`]): a wrong password, a server that does not speak Redis, one that
//! never answers, nothing listening, a TLS handshake that fails.
//!
//! The replica's own connection (redis-rs's connection manager) retries a failed connection
//! by itself and stops at `cluster.timeout_ms`, so what an operation fails with is often
//! only a timeout. [`try_connection`] opens a connection of its own, with a deadline long
//! enough for a connection to be set up, to learn the real cause.

use std::error::Error as _;
use std::time::Duration;

use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use tokio::time::Instant;

use super::connection::{ask_sentinels, client, sentinel_settings};
use crate::config::{RedisForm, RedisTarget};

/// Why Redis could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisCause {
    /// Redis refused the password (or the user).
    Authentication,
    /// What answered does not speak Redis's protocol.
    Protocol,
    /// A Redis older than 6.0: no RESP3, which wxgate's push messages need.
    TooOld,
    /// No answer in time.
    Timeout,
    /// Nothing listens at the host and port.
    Refused,
    /// The TLS handshake failed.
    Tls,
    /// The connection could not be made or was lost (reset, closed, a host that does not
    /// resolve).
    Connection,
    /// Redis answered with an error.
    Answer,
    /// The sentinels answer, but none names a primary of `cluster.sentinel_master`.
    UnknownMaster,
    /// Redis refused a command wxgate needs: the ACL user lacks a permission.
    NoPermission,
}

impl RedisCause {
    /// The cause of a client error.
    pub fn of(error: &RedisError) -> RedisCause {
        if is_tls(error) {
            return RedisCause::Tls;
        }
        match error.kind() {
            ErrorKind::AuthenticationFailed => RedisCause::Authentication,
            ErrorKind::MasterNameNotFoundBySentinel => RedisCause::UnknownMaster,
            ErrorKind::Server(redis::ServerErrorKind::NoPerm) => RedisCause::NoPermission,
            ErrorKind::RESP3NotSupported => RedisCause::TooOld,
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => RedisCause::Protocol,
            _ if matches!(error.code(), Some("WRONGPASS" | "NOAUTH")) => RedisCause::Authentication,
            _ if error.is_timeout() => RedisCause::Timeout,
            _ if error.is_connection_refusal() => RedisCause::Refused,
            _ if error.is_io_error() || error.is_connection_dropped() => RedisCause::Connection,
            _ => RedisCause::Answer,
        }
    }

    /// For the log and `check-config --connect`: what happened and what to look at. Never
    /// names the URL, its password or the secret.
    pub fn describe(self) -> &'static str {
        match self {
            RedisCause::Authentication => {
                "authentication failed: Redis refused the user or password (cluster.redis_url, or WXGATE_REDIS_USERNAME and WXGATE_REDIS_PASSWORD; the sentinels' WXGATE_SENTINEL_PASSWORD)"
            }
            RedisCause::Protocol => {
                "protocol error: what answers at [cluster]'s address does not speak Redis's protocol (not a Redis, or something else in the way)"
            }
            RedisCause::TooOld => {
                "protocol error: Redis older than 6.0 (wxgate needs RESP3)"
            }
            RedisCause::Timeout => {
                "timeout: no answer in time (a server that accepts connections and never answers, or a network that drops them)"
            }
            RedisCause::Refused => {
                "connection refused: nothing listens at [cluster]'s host and port"
            }
            RedisCause::Tls => {
                "TLS handshake failed: rediss:// to a Redis without TLS, or a certificate not trusted"
            }
            RedisCause::Connection => {
                "no connection: the host does not resolve, or the connection was reset or closed"
            }
            RedisCause::Answer => "Redis answered with an error",
            RedisCause::UnknownMaster => {
                "no sentinel names a primary of cluster.sentinel_master (is it the name of their sentinel monitor line?)"
            }
            RedisCause::NoPermission => {
                "no permission: the ACL user may not run a command wxgate needs (EVALSHA, EVAL, SCRIPT LOAD, SUBSCRIBE, SSUBSCRIBE, PING; see docs/replicas.md)"
            }
        }
    }
}

/// Whether a TLS error is behind `error` (rustls's, carried in an I/O error).
fn is_tls(error: &RedisError) -> bool {
    let mut source = error.source();
    while let Some(error) = source {
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if error.is::<rustls::Error>() || inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        source = error.source();
    }
    false
}

/// Connects to the Redis of `target` on a connection of its own (its handshake: TLS,
/// `HELLO 3`, `AUTH`) and sends `PING`, all within `within`: how long it took, or why it
/// failed. With Sentinel, the sentinels are asked for the primary first; with Redis
/// Cluster, every seed node is tried, and one that answers is enough.
pub async fn try_connection(
    target: &RedisTarget,
    within: Duration,
) -> Result<Duration, RedisCause> {
    let certificates = target.tls_certificates();
    let started = Instant::now();
    let nodes: Vec<redis::ConnectionInfo> = match &target.form {
        RedisForm::Standalone(url) => vec![url.connection_info()],
        RedisForm::Cluster { nodes, settings } => nodes
            .iter()
            .map(|node| settings.connection_info(node))
            .collect(),
        RedisForm::Sentinel {
            sentinels,
            master,
            nodes,
            sentinel_credentials,
        } => {
            let settings = sentinel_settings(nodes, sentinel_credentials);
            let sentinels: Vec<redis::Client> = sentinels
                .iter()
                .map(|sentinel| client(settings.connection_info(sentinel), certificates.clone()))
                .collect::<Result<_, _>>()
                .map_err(|error| RedisCause::of(&error))?;
            let primary = ask_sentinels(&sentinels, master, within)
                .await
                .map_err(|error| RedisCause::of(&error))?;
            vec![nodes.connection_info(&primary)]
        }
    };
    let mut first_cause = None;
    for node in nodes {
        let left = within.saturating_sub(started.elapsed());
        match ping(node, certificates.clone(), left).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(cause) => {
                first_cause.get_or_insert(cause);
            }
        }
    }
    Err(first_cause.unwrap_or(RedisCause::Connection))
}

/// `PING` on a connection of its own to `node`, within `within`.
async fn ping(
    node: redis::ConnectionInfo,
    certificates: Option<redis::TlsCertificates>,
    within: Duration,
) -> Result<(), RedisCause> {
    let client = client(node.clone(), certificates).map_err(|error| RedisCause::of(&error))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(within))
        .set_response_timeout(Some(within));
    let attempt = async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    let cause = match tokio::time::timeout(within, attempt).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(error)) => RedisCause::of(&error),
        Err(_) => RedisCause::Timeout,
    };
    // A Redis without TLS takes a TLS handshake for the start of a command and waits for
    // the rest: to the client, a timeout. Asked in plain text, it answers.
    if let redis::ConnectionAddr::TcpTls { host, port, .. } = node.addr() {
        if cause != RedisCause::Tls && speaks_plain_redis(host, *port, within).await {
            return Err(RedisCause::Tls);
        }
    }
    Err(cause)
}

/// Whether the server at `host:port` answers a plain-text `PING` as a Redis does (`+PONG`,
/// or an error such as `-NOAUTH`), within `within`.
async fn speaks_plain_redis(host: &str, port: u16, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], b'+' | b'-'))
    };
    matches!(tokio::time::timeout(within, ask).await, Ok(Some(true)))
}
