//! The pooled HTTP client towards WeChat, and the headers a proxy must not forward.
//!
//! Every call goes to the configured base URL joined with the request's path and query as
//! text: the path is never resolved against the base (a path such as `//evil.example/x` stays
//! a path on WeChat's host), so wxgate cannot be used as an open relay.
//!
//! The client is hyper's HTTP/1.1 connection API with a pool of its own: wxgate talks to one
//! host, so the pool is one list of idle connections (most recently used last), with no
//! per-host keying, no URL handling and no boxed futures on the way of a call.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::config::UpstreamConfig;

/// Why an upstream call got no answer: the `reason` label of
/// `wxgate_upstream_transport_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The connection could not be opened (refused, unreachable, TLS failed): nothing was sent.
    #[error("upstream connection failed")]
    Connect,
    /// No whole answer within `upstream.timeout_ms`.
    #[error("upstream timed out")]
    Timeout,
    /// The connection broke after the request may have been sent.
    #[error("upstream connection reset")]
    Reset,
}

impl TransportError {
    /// Every value, in label order.
    pub const ALL: [TransportError; 3] = [
        TransportError::Connect,
        TransportError::Timeout,
        TransportError::Reset,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TransportError::Connect => "connect",
            TransportError::Timeout => "timeout",
            TransportError::Reset => "reset",
        }
    }

    /// Position in [`TransportError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The HTTP status wxgate answers with: 504 for a timeout, 502 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            TransportError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            TransportError::Connect | TransportError::Reset => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the request certainly never reached upstream, so sending it again cannot
    /// execute it twice (or spend a `js_code` twice).
    pub fn nothing_was_sent(self) -> bool {
        self == TransportError::Connect
    }
}

/// A request as it goes upstream. Built once per client request and sent as many times as
/// retries need (the body is reference-counted, so a retry copies nothing).
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The client's method.
    pub method: Method,
    /// The client's path and query, exactly as received.
    pub path_and_query: PathAndQuery,
    /// The client's headers minus hop-by-hop ones, `Host` and wxgate's own.
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
/// webpki roots) for HTTPS.
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
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("scheme", &self.origin.scheme_str())
            .field("host", &self.origin.host())
            .finish_non_exhaustive()
    }
}

/// The base URL cannot be used by the client (config validation normally catches this).
#[derive(Debug, thiserror::Error)]
#[error("upstream.base_url is not a usable http(s) URL")]
pub struct InvalidBaseUrl;

/// How long an idle connection is kept, in housekeeping ticks (seconds, see
/// [`UpstreamClient::close_idle`]): well under the minute after which servers commonly close
/// idle keep-alive connections, so a request rarely meets one being closed.
const IDLE_TICKS: u64 = 50;

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
            .with_webpki_roots()
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
            pool: Arc::new(Pool::new(config.pool_max_idle)),
            origin,
            prefix: base_url.path_prefix().to_owned(),
            host: base_url.host_header().clone(),
            authorization: base_url.authorization().cloned(),
            timeout: config.timeout,
        })
    }

    /// Closes connections idle for too long (their servers may be about to close them), and
    /// those already closed. Called once a second: each call is a tick of the idle clock.
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }

    /// Sends one request and reads the whole answer, within `upstream.timeout_ms`.
    pub async fn send(
        &self,
        request: &UpstreamRequest,
    ) -> Result<UpstreamResponse, TransportError> {
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
        headers.insert(header::HOST, self.host.clone());
        if let Some(authorization) = &self.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        let (parts, body) = tokio::time::timeout(self.timeout, self.exchange(outgoing))
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

    /// Sends `request` on an idle connection, or a new one, and reads the answer whole.
    /// A pooled connection found closed before the request was written is set aside and the
    /// request goes on the next one: that is safe, nothing was sent.
    async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(http::response::Parts, Bytes), TransportError> {
        loop {
            let (mut sender, pooled) = match self.pool.take() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if !ready(&mut sender, pooled).await {
                if pooled {
                    continue;
                }
                return Err(TransportError::Connect);
            }
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut error) => match error.take_message() {
                    Some(unsent) if pooled => {
                        request = unsent;
                        continue;
                    }
                    Some(_) => return Err(TransportError::Connect),
                    None => return Err(TransportError::Reset),
                },
            };
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|_| TransportError::Reset)?
                .to_bytes();
            // The answer was read to its end: the connection can carry the next request.
            self.pool.put(sender);
            return Ok((parts, body));
        }
    }

    /// Opens a connection (TCP, and TLS for https) and starts its HTTP/1.1 driver task.
    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, TransportError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|_| TransportError::Connect)?;
        let stream = connector
            .call(self.origin.clone())
            .await
            .map_err(|_| TransportError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|_| TransportError::Connect)?;
        // Ends when the connection closes: an error, the server closing it, or the last
        // sender (in the pool or in a call) dropped.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// How long a pooled connection may take to become ready, e.g. while it still writes the body
/// of a request whose answer came early; after that it is set aside (nothing was sent on it).
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

/// Whether `sender` can take a request: at once, nearly always; a pooled connection still
/// busy gets `POOLED_READY_WAIT`, a new one the call's own timeout.
async fn ready(sender: &mut http1::SendRequest<Full<Bytes>>, pooled: bool) -> bool {
    match poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await {
        Poll::Ready(result) => result.is_ok(),
        Poll::Pending if pooled => {
            matches!(
                tokio::time::timeout(POOLED_READY_WAIT, sender.ready()).await,
                Ok(Ok(()))
            )
        }
        Poll::Pending => sender.ready().await.is_ok(),
    }
}

/// Idle keep-alive connections towards upstream, most recently used last (so the busy ones
/// stay warm and the rest idle out). Idle time is counted in housekeeping ticks, so that
/// neither taking nor returning a connection reads the clock.
struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    tick: AtomicU64,
}

struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since_tick: u64,
}

impl Pool {
    fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            tick: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock()
    }

    /// The most recently used connection that is still open.
    fn take(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put(&self, sender: http1::SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let since_tick = self.tick.load(Ordering::Relaxed);
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since_tick });
        }
    }

    fn close_idle(&self) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        // Dropping a sender closes its connection.
        self.lock()
            .retain(|entry| !entry.sender.is_closed() && tick - entry.since_tick < IDLE_TICKS);
    }
}

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1): a proxy
/// consumes them and never forwards them, nor those named in `Connection`.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop headers, those named in `Connection`, and `also`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    // One pass over the (few) headers finds what is there; only that is removed.
    let mut present = [false; 16];
    assert!(
        HOP_BY_HOP.len() + also.len() <= present.len(),
        "strip_hop_by_hop: too many extra names"
    );
    let mut any = false;
    for name in headers.keys() {
        let found = HOP_BY_HOP
            .iter()
            .position(|hop| hop == name)
            .or_else(|| Some(HOP_BY_HOP.len() + also.iter().position(|hop| hop == name)?));
        if let Some(i) = found {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    let only_keep_alive_or_close = || {
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().map(HeaderValue::as_bytes);
        values.next().is_none()
            && first.is_some_and(|value| {
                value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
            })
    };
    if present[0] && !only_keep_alive_or_close() {
        // `keep-alive` and `close` name no header; others name headers to remove.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|name| {
                !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP
        .iter()
        .chain(also)
        .zip(present)
        .filter(|(_, present)| *present)
    {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut headers, &[]);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
    }
}
