//! The pooled HTTP client towards WeChat, and the headers a proxy must not forward.
//!
//! Every call goes to the configured base URL joined with the request's path and query as
//! text: the path is never resolved against the base (a path such as `//evil.example/x` stays
//! a path on WeChat's host), so wxgate cannot be used as an open relay.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method, StatusCode};

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

    fn classify(error: &reqwest::Error) -> TransportError {
        if error.is_timeout() {
            TransportError::Timeout
        } else if error.is_connect() {
            TransportError::Connect
        } else {
            TransportError::Reset
        }
    }
}

/// A request as it goes upstream. Built once per client request and sent as many times as
/// retries need (the body is reference-counted, so a retry copies nothing).
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The client's method.
    pub method: Method,
    /// The client's path and query, exactly as received.
    pub path_and_query: String,
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

/// The client towards WeChat: pooled keep-alive connections, rustls for HTTPS.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    client: reqwest::Client,
    base_url: String,
}

impl UpstreamClient {
    /// Builds the client from `[upstream]`.
    pub fn new(config: &UpstreamConfig) -> reqwest::Result<UpstreamClient> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // A proxy passes redirects back; following one could leave the configured host.
            .redirect(reqwest::redirect::Policy::none())
            // Environment proxies (HTTP_PROXY…) would send secrets to a third party unasked.
            .no_proxy()
            .build()?;
        Ok(UpstreamClient {
            client,
            base_url: config.base_url.clone(),
        })
    }

    /// The base URL every call goes to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &self,
        request: &UpstreamRequest,
    ) -> Result<UpstreamResponse, TransportError> {
        // Text concatenation, never URL resolution: see the module doc.
        let url = format!("{}{}", self.base_url, request.path_and_query);
        let response = self
            .client
            .request(request.method.clone(), url)
            .headers(request.headers.clone())
            .body(request.body.clone())
            .send()
            .await
            .map_err(|error| TransportError::classify(&error))?;
        let status = response.status();
        let mut headers = response.headers().clone();
        strip_hop_by_hop(&mut headers);
        // hyper frames the body it sends back itself.
        headers.remove(header::CONTENT_LENGTH);
        let body = response
            .bytes()
            .await
            .map_err(|error| TransportError::classify(&error))?;
        Ok(UpstreamResponse {
            status,
            headers,
            body,
        })
    }
}

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1), plus
/// those named in `Connection`: a proxy consumes them and never forwards them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
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
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
    }
}
