//! The pooled HTTP client towards WeChat.
//!
//! Every call goes to the configured base URL joined with the request's path and query as
//! text: the path is never resolved against the base (a path such as `//evil.example/x` stays
//! a path on WeChat's host), so wxgate cannot be used as an open relay.
//!
//! The client is hyper's HTTP/1.1 connection API with a pool of its own: wxgate talks to one
//! host, so the pool is one list of idle connections (most recently used last), with no
//! per-host keying, no URL handling and no boxed futures on the way of a call.
//!
//! What one upstream can cost wxgate is bounded: `upstream.max_connections` sockets,
//! `upstream.max_body_bytes` per answer, `upstream.timeout_ms` per call (waiting for a
//! connection included).
//!
//! # Layout
//! - `mod.rs`: [`UpstreamClient`]: building a request, sending it, reading the answer.
//! - `pool.rs`: the cap on open connections, and the idle ones.
//! - `tls.rs`: the rustls configuration (trusted authorities), refused certificates.
//! - `error.rs`: [`TransportError`], why a call got no answer.
//! - `headers.rs`: the hop-by-hop headers a proxy never forwards.

mod error;
mod headers;
mod pool;
mod tls;

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::UpstreamConfig;
pub use error::TransportError;
// Named by the tests of the retry policy and of wxgate's answers; elsewhere it travels inside
// `TransportError::Certificate`.
#[cfg(test)]
pub use error::CertificateProblem;
pub use headers::strip_hop_by_hop;
use pool::{Checkout, Pool, Sender, Slot};

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
/// Not reqwest, nor hyper-util's pooled client: on a code exchange their layers (URL parsing,
/// per-host pool keys, redirect and retry services, boxed futures) cost more instructions
/// than the rest of wxgate together, and wxgate needs none of them: it talks to one host,
/// follows no redirect, retries by its own rules, and joins a path it already has to a base
/// it parsed once.
#[derive(Clone)]
pub struct UpstreamClient {
    connector: HttpsConnector<HttpConnector>,
    pool: Arc<Pool>,
    /// `scheme://authority/`, what the connector is asked to connect to.
    origin: Uri,
    /// The base URL's path, without a trailing slash (usually empty).
    prefix: String,
    /// `Host`, built once.
    host: HeaderValue,
    /// `Authorization` for a base URL with userinfo.
    authorization: Option<HeaderValue>,
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
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // The connector takes https:// and http:// URIs alike; scheme checks are wxgate's.
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(config.ca_file.as_ref()))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let origin = Uri::builder()
            .scheme(base_url.scheme().clone())
            .authority(base_url.authority().clone())
            .path_and_query("/")
            .build()
            .map_err(|_| InvalidBaseUrl)?;
        Ok(UpstreamClient {
            connector,
            pool: Arc::new(Pool::new(
                config.max_connections,
                config.pool_max_idle,
                config.pool_idle_timeout,
            )),
            origin,
            prefix: base_url.path_prefix().to_owned(),
            host: base_url.host_header().clone(),
            authorization: base_url.authorization().cloned(),
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
    pub async fn send(
        &self,
        request: &UpstreamRequest,
        choice: ConnectionChoice,
    ) -> Result<UpstreamResponse, TransportError> {
        let deadline = Instant::now() + self.timeout;
        let exchange = self.exchange(request, choice, deadline);
        let (parts, body) = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| TransportError::Timeout)??;
        let mut headers = parts.headers;
        // hyper frames the body it sends back itself.
        strip_hop_by_hop(&mut headers, &[header::CONTENT_LENGTH]);
        Ok(UpstreamResponse {
            status: parts.status,
            headers,
            body,
        })
    }

    /// The request as it goes on the wire: the base URL's prefix, `Host` and `Authorization`
    /// added.
    fn outgoing(&self, request: &UpstreamRequest) -> Result<Request<Full<Bytes>>, TransportError> {
        // Text concatenation, never URL resolution: see the module doc.
        let path_and_query = if self.prefix.is_empty() {
            request.path_and_query.clone()
        } else {
            PathAndQuery::from_maybe_shared(Bytes::from(format!(
                "{}{}",
                self.prefix, request.path_and_query
            )))
            // The path came from a request hyper parsed, so this cannot fail; if it did,
            // nothing was sent.
            .map_err(|_| TransportError::Connect)?
        };
        let mut outgoing = Request::new(Full::new(request.body.clone()));
        *outgoing.method_mut() = request.method.clone();
        // Origin-form, as HTTP/1.1 sends it to a server (not a proxy).
        *outgoing.uri_mut() = Uri::from(path_and_query);
        *outgoing.headers_mut() = request.headers.clone();
        let headers = outgoing.headers_mut();
        // Replaces the client's `Host`, if it sent one: the upstream's is the only one sent.
        headers.insert(header::HOST, self.host.clone());
        if let Some(authorization) = &self.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        Ok(outgoing)
    }

    /// Sends `request` on an idle connection, or a new one, and reads the answer whole.
    ///
    /// A connection taken from the pool may be one its server is closing at that moment (its
    /// keep-alive timeout ran out as the request was written). When hyper hands the request
    /// back unsent (the close was seen before it was written), it goes on the next
    /// connection: nothing was sent. When it was written and the connection closed or was
    /// reset before any answer, the call ends with
    /// [`TransportError::ReusedConnectionClosed`], and [`crate::retry`] decides whether it
    /// is sent again (on a new connection, [`ConnectionChoice::New`]).
    ///
    /// Waiting for a connection at `upstream.max_connections` ends at `deadline`, the call's.
    async fn exchange(
        &self,
        request: &UpstreamRequest,
        choice: ConnectionChoice,
        deadline: Instant,
    ) -> Result<(http::response::Parts, Bytes), TransportError> {
        let mut outgoing = self.outgoing(request)?;
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
                    Box::pin(tokio::time::timeout_at(deadline, self.pool.checkout()))
                        .await
                        .map_err(|_| TransportError::ConnectionLimit)?
                }
                (ConnectionChoice::New, None) => Checkout::New(
                    Box::pin(tokio::time::timeout_at(deadline, self.pool.new_slot()))
                        .await
                        .map_err(|_| TransportError::ConnectionLimit)?,
                ),
            };
            let (mut sender, reused) = match checkout {
                Checkout::Idle(sender) => (sender, true),
                // Boxed: opening a connection (TCP, TLS, handshake) is a large future that
                // every call would otherwise carry and copy, while few calls open one.
                Checkout::New(slot) => (Box::pin(self.connect(slot)).await?, false),
            };
            if !ready(&mut sender, reused).await {
                if reused {
                    continue;
                }
                return Err(TransportError::Connect);
            }
            let response = match sender.try_send_request(outgoing).await {
                Ok(response) => response,
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => {
                        outgoing = unsent;
                        continue;
                    }
                    Some(_) => return Err(TransportError::Connect),
                    None if reused && error::closed_before_answer(error.error()) => {
                        tracing::debug!(error = %error.error(), "reused upstream connection closed under a request");
                        return Err(TransportError::ReusedConnectionClosed);
                    }
                    None => return Err(TransportError::Reset),
                },
            };
            let (parts, body) = response.into_parts();
            // On error the sender is dropped, not pooled: the connection closes with the rest
            // of the body unread.
            let body = read_body(body, self.max_body_bytes).await?;
            // The answer was read to its end: the connection can carry the next request.
            self.pool.put(sender);
            return Ok((parts, body));
        }
    }

    /// Opens a connection (TCP, and TLS for https) and starts its HTTP/1.1 driver task, which
    /// holds `slot` for as long as the connection is open.
    async fn connect(&self, slot: Slot) -> Result<Sender, TransportError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|_| TransportError::Connect)?;
        let stream = connector.call(self.origin.clone()).await.map_err(|error| {
            match tls::certificate_problem(&*error) {
                Some(problem) => {
                    // Once per call while it lasts: an operator must see it, it does not fix
                    // itself. rustls's words name the certificate's names or dates, no secret.
                    tracing::warn!(%error, "upstream certificate refused");
                    TransportError::Certificate(problem)
                }
                None => TransportError::Connect,
            }
        })?;
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|_| TransportError::Connect)?;
        // Ends when the connection closes: an error, the server closing it, or the last
        // sender (in the pool or in a call) dropped.
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Reads a whole answer body of at most `limit` bytes. A declared length over it is refused
/// before any of the body is read; an undeclared one (chunked, or ended by the close) once
/// more than `limit` bytes came.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, TransportError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(TransportError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(TransportError::TooLarge),
        Err(_) => Err(TransportError::Reset),
    }
}

/// How long a pooled connection may take to become ready, e.g. while it still writes the body
/// of a request whose answer came early; after that it is set aside (nothing was sent on it).
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

/// Whether `sender` can take a request: at once, nearly always; a pooled connection still
/// busy gets `POOLED_READY_WAIT`, a new one the call's own timeout.
async fn ready(sender: &mut Sender, pooled: bool) -> bool {
    match poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await {
        Poll::Ready(result) => result.is_ok(),
        // Boxed: rare, and its timer would otherwise be part of every call's future.
        Poll::Pending if pooled => {
            matches!(
                Box::pin(tokio::time::timeout(POOLED_READY_WAIT, sender.ready())).await,
                Ok(Ok(()))
            )
        }
        Poll::Pending => sender.ready().await.is_ok(),
    }
}
