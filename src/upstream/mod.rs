//! The pooled HTTP client towards WeChat.
//!
//! Every call goes to the configured base URL joined with the request's path and query as
//! text: the path is never resolved against the base (a path such as `//evil.example/x` stays
//! a path on WeChat's host), so wxgate cannot be used as an open relay.
//!
//! The client is an HTTP/1.1 client of wxgate's own, over a pool of its own: wxgate talks to
//! one host, so the pool is one list of idle connections (most recently used last), with no
//! per-host keying, no URL handling and no boxed futures on the way of a call; and a call
//! drives its connection in its own task, with no driver task per connection to hand the
//! request to and take the answer from (see [`connection`]).
//!
//! What one upstream can cost wxgate is bounded: `upstream.max_connections` sockets,
//! `upstream.max_body_bytes` per answer, `upstream.timeout_ms` per call (waiting for a
//! connection included).
//!
//! # Layout
//! - `mod.rs`: [`UpstreamClient`]: opening connections, sending a call on one, which failures
//!   send it on another.
//! - `connection.rs`: one connection: writing a request, reading its answer, its deadline.
//! - `request.rs`: a request as it goes on the wire.
//! - `answer.rs`: an answer's head and body framing, and the chunked decoder.
//! - `pool.rs`: the cap on open connections, and the idle ones.
//! - `tls.rs`: the rustls configuration (trusted authorities), refused certificates.
//! - `error.rs`: [`TransportError`], why a call got no answer.
//! - `headers.rs`: the hop-by-hop headers a proxy never forwards.

mod answer;
mod connection;
mod error;
mod headers;
mod pool;
mod request;
mod tls;

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::UpstreamConfig;
use connection::{Connection, Failure, Stream};
pub use error::TransportError;
// Named by the tests of the retry policy and of wxgate's answers; elsewhere it travels inside
// `TransportError::Certificate`.
#[cfg(test)]
pub use error::CertificateProblem;
pub use headers::strip_hop_by_hop;
use pool::{Checkout, Pool, Slot};
use request::RequestWriter;

/// A request as it goes upstream. Built once per client request and sent as many times as
/// retries need (the body is reference-counted, so a retry copies nothing).
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The client's method.
    pub method: Method,
    /// The client's path and query, exactly as received.
    pub path_and_query: PathAndQuery,
    /// The client's headers minus hop-by-hop ones and wxgate's own; a `Host` among them is
    /// replaced by the upstream's when sent.
    pub headers: HeaderMap,
    /// The client's body, read whole.
    pub body: Bytes,
}

/// An upstream answer, read whole (WeChat's answers are small JSON documents, and wxgate
/// must read their `errcode`).
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// Passed back unchanged.
    pub status: StatusCode,
    /// Passed back minus hop-by-hop headers.
    pub headers: HeaderMap,
    /// Passed back byte for byte.
    pub body: Bytes,
}

/// The client towards WeChat: HTTP/1.1 keep-alive connections from a pool, rustls (with the
/// webpki roots and `upstream.ca_file`'s authorities) for HTTPS.
///
/// Not reqwest, nor hyper's or hyper-util's clients: on a code exchange their layers (URL
/// parsing, per-host pool keys, redirect and retry services, boxed futures, a task and a
/// channel per connection) cost more instructions than the rest of wxgate together, and wxgate
/// needs none of them: it talks to one host, follows no redirect, retries by its own rules,
/// and joins a path it already has to a base it parsed once.
#[derive(Clone)]
pub struct UpstreamClient {
    /// Opens TCP connections (name resolution, connect timeout, `TCP_NODELAY`).
    connector: HttpConnector,
    /// For `https://`: the TLS client and the name the certificate must be valid for.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    pool: Arc<Pool>,
    /// `scheme://authority/`, what the connector is asked to connect to.
    origin: Uri,
    /// The prefix, `Host` and `Authorization` every request gets.
    writer: RequestWriter,
    timeout: Duration,
    /// `upstream.max_body_bytes`: the largest answer body read.
    max_body_bytes: usize,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("scheme", &self.origin.scheme_str())
            .field("host", &self.origin.host())
            .finish_non_exhaustive()
    }
}

/// Which connection a call may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionChoice {
    /// An idle one from the pool, or a new one.
    Any,
    /// A new one: the call is sent again after a reused connection closed under it, and
    /// another idle connection could be as stale.
    New,
}

/// The base URL cannot be used by the client (config validation normally catches this).
#[derive(Debug, thiserror::Error)]
#[error("upstream.base_url is not a usable http(s) URL")]
pub struct InvalidBaseUrl;

impl UpstreamClient {
    /// Builds the client from `[upstream]`, whose base URL was parsed at validation.
    pub fn new(config: &UpstreamConfig) -> Result<UpstreamClient, InvalidBaseUrl> {
        let base_url = &config.base_url;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        // The connector takes https:// and http:// URIs alike; TLS is added here.
        connector.enforce_http(false);
        let tls = match base_url.scheme().as_str() {
            "https" => {
                // An IPv6 address is written in brackets in a URL, not in a server name.
                let host = base_url.authority().host();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned()).map_err(|_| InvalidBaseUrl)?;
                let client = tls::client_config(config.ca_file.as_ref());
                Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
            }
            _ => None,
        };
        let origin = Uri::builder()
            .scheme(base_url.scheme().clone())
            .authority(base_url.authority().clone())
            .path_and_query("/")
            .build()
            .map_err(|_| InvalidBaseUrl)?;
        Ok(UpstreamClient {
            connector,
            tls,
            pool: Arc::new(Pool::new(
                config.max_connections,
                config.pool_max_idle,
                config.pool_idle_timeout,
            )),
            origin,
            writer: RequestWriter {
                prefix: base_url.path_prefix().to_owned(),
                host: base_url.host_header().clone(),
                authorization: base_url.authorization().cloned(),
            },
            timeout: config.timeout,
            max_body_bytes: config.max_body_bytes,
        })
    }

    /// Closes connections idle for `upstream.pool_idle_timeout_ms` (their servers may be about
    /// to close them), and those already closed. Called once a second by housekeeping, so that
    /// idle sockets go even when no request comes to find them stale.
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }

    /// Sends one request and reads the whole answer, within `upstream.timeout_ms`, on a
    /// connection `choice` allows.
    ///
    /// A connection taken from the pool may be one its server is closing at that moment (its
    /// keep-alive timeout ran out as the request was written). When writing fails before any
    /// byte went out, the request goes on the next connection: nothing was sent. When it was
    /// written and the connection closed or was reset before any answer, the call ends with
    /// [`TransportError::ReusedConnectionClosed`], and [`crate::retry`] decides whether it
    /// is sent again (on a new connection, [`ConnectionChoice::New`]).
    ///
    /// Waiting for a connection at `upstream.max_connections`, and opening one, end at the
    /// call's deadline too.
    pub async fn send(
        &self,
        request: &UpstreamRequest,
        choice: ConnectionChoice,
    ) -> Result<UpstreamResponse, TransportError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let ready_now = match choice {
                ConnectionChoice::Any => self.pool.try_checkout(),
                ConnectionChoice::New => None,
            };
            let checkout = match (choice, ready_now) {
                (_, Some(checkout)) => checkout,
                // At the cap (or for a new connection when there is no room): a timer only
                // here. Boxed, like the other waits off the common path, so that every call
                // does not carry (and copy) their futures.
                (ConnectionChoice::Any, None) => {
                    let checkout =
                        Box::pin(tokio::time::timeout_at(deadline, self.pool.checkout()))
                            .await
                            .map_err(|_| TransportError::ConnectionLimit)?;
                    if Instant::now() >= deadline {
                        // Came as the call's time ran out (a connection closed at its own
                        // deadline): the call waited its whole timeout for it.
                        if let Checkout::Idle(connection) = checkout {
                            self.pool.put(connection);
                        }
                        return Err(TransportError::ConnectionLimit);
                    }
                    checkout
                }
                (ConnectionChoice::New, None) => {
                    let slot = Box::pin(tokio::time::timeout_at(deadline, self.pool.new_slot()))
                        .await
                        .map_err(|_| TransportError::ConnectionLimit)?;
                    if Instant::now() >= deadline {
                        return Err(TransportError::ConnectionLimit);
                    }
                    Checkout::New(slot)
                }
            };
            let (mut connection, reused) = match checkout {
                Checkout::Idle(connection) => (connection, true),
                // Boxed: opening a connection (TCP, TLS) is a large future that every call
                // would otherwise carry and copy, while few calls open one.
                Checkout::New(slot) => {
                    let connecting = tokio::time::timeout_at(deadline, self.connect(slot));
                    let connection = Box::pin(connecting)
                        .await
                        .map_err(|_| TransportError::Timeout)??;
                    (connection, false)
                }
            };
            let sent = connection
                .send(&self.writer, request, self.max_body_bytes, deadline)
                .await;
            return match sent {
                Ok(response) => {
                    if connection.reusable() {
                        self.pool.put(connection);
                    }
                    Ok(response)
                }
                // Nothing was sent on this connection: the next one may be open.
                Err(Failure::Unsent) if reused => continue,
                Err(Failure::Unsent) => Err(TransportError::Connect),
                Err(Failure::ClosedBeforeAnswer) if reused => {
                    tracing::debug!("reused upstream connection closed under a request");
                    Err(TransportError::ReusedConnectionClosed)
                }
                Err(Failure::ClosedBeforeAnswer | Failure::Broken) => Err(TransportError::Reset),
                Err(Failure::TooLarge) => Err(TransportError::TooLarge),
                Err(Failure::Timeout) => Err(TransportError::Timeout),
            };
        }
    }

    /// Opens a connection (TCP, and TLS for https) holding `slot` for as long as it is open.
    async fn connect(&self, slot: Slot) -> Result<Connection, TransportError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|_| TransportError::Connect)?;
        let tcp: TcpStream = connector
            .call(self.origin.clone())
            .await
            .map_err(|_| TransportError::Connect)?
            .into_inner();
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((tls, name)) => {
                let stream = tls.connect(name.clone(), tcp).await.map_err(|error| {
                    match tls::certificate_problem(&error) {
                        Some(problem) => {
                            // Once per call while it lasts: an operator must see it, it does
                            // not fix itself. rustls's words name the certificate's names or
                            // dates, no secret.
                            tracing::warn!(%error, "upstream certificate refused");
                            TransportError::Certificate(problem)
                        }
                        None => TransportError::Connect,
                    }
                })?;
                Stream::Tls(Box::new(stream))
            }
        };
        Ok(Connection::new(stream, slot))
    }
}
