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

use crate::config::RedisUrl;

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
}

impl RedisCause {
    /// The cause of a client error.
    pub fn of(error: &RedisError) -> RedisCause {
        if is_tls(error) {
            return RedisCause::Tls;
        }
        match error.kind() {
            ErrorKind::AuthenticationFailed => RedisCause::Authentication,
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
                "authentication failed: Redis refused the password (cluster.redis_url or WXGATE_REDIS_PASSWORD)"
            }
            RedisCause::Protocol => {
                "protocol error: what answers at cluster.redis_url does not speak Redis's protocol (not a Redis, or something else in the way)"
            }
            RedisCause::TooOld => {
                "protocol error: Redis older than 6.0 (wxgate needs RESP3)"
            }
            RedisCause::Timeout => {
                "timeout: no answer in time (a server that accepts connections and never answers, or a network that drops them)"
            }
            RedisCause::Refused => {
                "connection refused: nothing listens at cluster.redis_url's host and port"
            }
            RedisCause::Tls => {
                "TLS handshake failed: rediss:// to a Redis without TLS, or a certificate not trusted"
            }
            RedisCause::Connection => {
                "no connection: the host does not resolve, or the connection was reset or closed"
            }
            RedisCause::Answer => "Redis answered with an error",
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

/// Connects to the Redis of `url` on a connection of its own (its handshake: TLS, `HELLO 3`,
/// `AUTH`) and sends `PING`, all within `within`: how long it took, or why it failed.
pub async fn try_connection(url: &RedisUrl, within: Duration) -> Result<Duration, RedisCause> {
    let client =
        redis::Client::open(url.connection_info()).map_err(|error| RedisCause::of(&error))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(within))
        .set_response_timeout(Some(within));
    let started = Instant::now();
    let attempt = async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    let cause = match tokio::time::timeout(within, attempt).await {
        Ok(Ok(_)) => return Ok(started.elapsed()),
        Ok(Err(error)) => RedisCause::of(&error),
        Err(_) => RedisCause::Timeout,
    };
    // A Redis without TLS takes a TLS handshake for the start of a command and waits for
    // the rest: to the client, a timeout. Asked in plain text, it answers.
    if let redis::ConnectionAddr::TcpTls { host, port, .. } = url.connection_info().addr() {
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
