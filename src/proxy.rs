//! The request pipeline, in named phases over a small per-request context:
//!
//! 1. [`target`](Proxy::answer): the request's API, from its path; anything that could point
//!    wxgate elsewhere is refused.
//! 2. [`body`](Proxy::read_body): read whole, within `server.max_body_bytes`.
//! 3. [`token`](Proxy::token) (a token fetch, answered by the token cache),
//!    [`code exchange`](Proxy::code_exchange) (a replay, a follower or a leader) or
//!    [`forward`](Proxy::forward) (any other request, under its appid's quota). When WeChat
//!    answers a call that carried a cached token with 40001, 40014 or 42001, the token cache
//!    drops that token before the answer goes back.
//! 4. respond: WeChat's answer as it came, or one of wxgate's own ([`LocalAnswer`]).
//! 5. [`log`](Proxy::log): one access line and the request's metrics.
//!
//! Only the path and query of a request are used: an absolute-form URI or a `Host` header
//! names no destination, the configured upstream is the only one. The log line names the
//! API (a bounded label), never the path or query, so no credential reaches a log.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::time::Instant;

use crate::api::{Api, PathClass};
use crate::cluster::Cluster;
use crate::code_exchange::{CacheStatus, CodeExchange, ExchangeRequest, ExchangeResult, Lookup};
use crate::config::Config;
use crate::dispatch::{Call, CallResult, Dispatcher, WechatAnswer};
use crate::local_answer::LocalAnswer;
use crate::metrics::{Metrics, Outcome};
use crate::quota::{QuotaGate, QuotaKey};
use crate::token_cache::{is_stale_token_errcode, TokenAnswer, TokenCache, TokenRequest};
use crate::upstream::{strip_hop_by_hop, InvalidBaseUrl, UpstreamClient, UpstreamRequest};
use crate::wechat::{Errcode, JSON_CONTENT_TYPE};

/// Request header with which a client shortens its own quota wait (milliseconds); consumed
/// by wxgate, never forwarded.
pub const MAX_WAIT_HEADER: HeaderName = HeaderName::from_static("x-wxgate-max-wait-ms");

/// Request and response header naming a request in wxgate's log: taken from the client when
/// it sends a sane one (up to 64 of `[A-Za-z0-9._:-]`), made up otherwise; never forwarded
/// upstream as wxgate's own (a client's is forwarded as it came).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Response header of code exchanges and token fetches: `miss`, `coalesced` or `hit`.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static(wxgate_contract::CACHE_HEADER);

/// The proxy: everything a request needs, shared by all connections.
pub struct Proxy {
    dispatcher: Arc<Dispatcher>,
    codes: Arc<CodeExchange>,
    tokens: Arc<TokenCache>,
    metrics: Metrics,
    /// `server.max_body_bytes`; a reload may change it.
    max_body_bytes: AtomicUsize,
    /// From the end of a request's head to the end of its body; a reload may change it.
    body_timeout_ms: AtomicU64,
    /// `quota.max_wait_ms`; a reload may change it.
    max_wait_ms: AtomicU64,
}

/// What the phases learn about a request, for its log line and its metrics.
struct RequestContext {
    started: Instant,
    method: Method,
    api: Api,
    /// In the access line and the response's `X-Request-Id`.
    request_id: HeaderValue,
}

/// Where a request goes: its API and its path and query, as received.
struct Target {
    api: Api,
    path_and_query: PathAndQuery,
}

/// What goes back to the client, with what its log line and metrics say of it.
struct Reply {
    response: Response<Full<Bytes>>,
    outcome: Outcome,
    /// The errcode of WeChat's answer, when this reply is one.
    errcode: Option<Errcode>,
}

impl Proxy {
    /// Builds the proxy and its upstream client from the configuration.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Proxy, InvalidBaseUrl> {
        Proxy::with_cluster(config, metrics, None)
    }

    /// The proxy of a replica: with a `cluster`, quota turns are counted with the other
    /// replicas, and access tokens are shared with them.
    pub(crate) fn with_cluster(
        config: &Config,
        metrics: Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Proxy, InvalidBaseUrl> {
        let upstream = UpstreamClient::new(&config.upstream)?;
        let mut quota = QuotaGate::new(&config.quota);
        let mut codes = CodeExchange::new(&config.code_cache, metrics.clone());
        if let Some(cluster) = &cluster {
            quota = quota.shared_with(cluster.clone());
            codes = codes.shared_with(cluster.clone(), config.upstream.timeout);
        }
        let dispatcher = Dispatcher::new(upstream, quota, &config.retry, metrics.clone());
        let dispatcher = Arc::new(dispatcher);
        let tokens = TokenCache::new(config, dispatcher.clone(), metrics.tokens.clone(), cluster);
        Ok(Proxy {
            dispatcher,
            codes: Arc::new(codes),
            tokens: Arc::new(tokens),
            metrics,
            max_body_bytes: AtomicUsize::new(config.server.max_body_bytes),
            body_timeout_ms: AtomicU64::new(config.server.body_timeout.as_millis() as u64),
            max_wait_ms: AtomicU64::new(config.quota.max_wait.as_millis() as u64),
        })
    }

    /// Applies the settings of a new configuration that can change while serving: quotas
    /// (to the buckets in use), retries, the code cache's lifetime and size, the body limit
    /// and the quota wait. What needs new sockets or a new Redis connection is the caller's
    /// to keep (see `crate::reload`).
    pub fn reconfigure(&self, config: &Config) {
        self.dispatcher.quota().reconfigure(&config.quota);
        self.dispatcher.reconfigure(&config.retry);
        self.codes.reconfigure(&config.code_cache);
        self.tokens.reconfigure(&config.token_cache);
        self.max_body_bytes
            .store(config.server.max_body_bytes, Ordering::Relaxed);
        self.body_timeout_ms.store(
            config.server.body_timeout.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.max_wait_ms
            .store(config.quota.max_wait.as_millis() as u64, Ordering::Relaxed);
    }

    /// Periodic housekeeping: expire remembered answers, drop idle quota keys and upstream
    /// connections, update gauges.
    pub fn housekeeping(&self) {
        self.codes.expire();
        self.tokens.housekeeping();
        self.dispatcher.quota().retain_recent();
        self.dispatcher.upstream().close_idle();
        self.metrics
            .quota_keys
            .set(self.dispatcher.quota().len() as i64);
    }

    /// Answers one client request. Never fails: every problem becomes a response.
    pub async fn handle<B>(
        self: Arc<Self>,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.handle_until(request, std::future::pending()).await
    }

    /// Answers one client request, or, if `cut_off` completes first (the shutdown grace has
    /// ended), wxgate's own 503 `-1` at once. Either way the request is logged and counted.
    pub(crate) async fn handle_until<B>(
        self: Arc<Self>,
        request: Request<B>,
        cut_off: impl std::future::Future<Output = ()>,
    ) -> Result<Response<Full<Bytes>>, Infallible>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _inflight = self.metrics.inflight_request();
        let mut context = RequestContext {
            started: Instant::now(),
            method: request.method().clone(),
            api: Api::Other,
            request_id: request_id(request.headers()),
        };
        // The answer is polled first: one that is ready never looks at the cut-off.
        let mut reply = tokio::select! {
            biased;
            answered = self.answer(&mut context, request) => answered.unwrap_or_else(Reply::local),
            () = cut_off => Reply::local(LocalAnswer::ShuttingDown),
        };
        self.log(&context, &reply);
        reply
            .response
            .headers_mut()
            .insert(REQUEST_ID_HEADER, context.request_id);
        Ok(reply.response)
    }

    /// The phases: target → body → token, code exchange or forward.
    async fn answer<B>(
        &self,
        context: &mut RequestContext,
        request: Request<B>,
    ) -> Result<Reply, LocalAnswer>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let target = read_target(&parts)?;
        context.api = target.api;
        let body = self.read_body(&parts.headers, body).await?;
        let query = target.path_and_query.query().unwrap_or("");
        if let Some(token) = self.tokens.request(target.api, &parts.method, query, &body) {
            return Ok(self.token(token, parts, target, body).await);
        }
        // A call carrying a token: kept (a reference count) in case WeChat refuses the token.
        let carried = query
            .contains("access_token")
            .then(|| target.path_and_query.clone());
        let reply = if target.api.is_code_exchange() && parts.method == Method::GET {
            let exchange = self.codes.request(target.api, query)?;
            self.code_exchange(exchange, parts, target, body).await
        } else {
            self.forward(parts, target, body).await?
        };
        if let (Some(carried), Some(Errcode::Code(code))) = (carried, reply.errcode) {
            if is_stale_token_errcode(code) {
                // Before the answer goes back: the caller's next fetch gets a fresh token.
                let query = carried.query().unwrap_or("");
                self.tokens.forget_stale(query).await;
            }
        }
        Ok(reply)
    }

    /// A token fetch: from the cache, or from the one fetch in flight for its appid and
    /// secret (see [`crate::token_cache`]).
    async fn token(&self, token: TokenRequest, parts: Parts, target: Target, body: Bytes) -> Reply {
        let quota_key = token.quota_key();
        let call = self.call(parts, target, body, quota_key);
        Reply::token(self.tokens.answer(token, call).await)
    }

    /// Reads the whole body, refusing one larger than `server.max_body_bytes` before reading
    /// it when its length is declared, and answering 408 to one that has not arrived whole
    /// within `server.body_timeout_ms` (a client trickling a byte at a time, or declaring a
    /// body it never sends, would otherwise hold the request open for ever).
    async fn read_body<B>(&self, headers: &HeaderMap, body: B) -> Result<Bytes, LocalAnswer>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.max_body_bytes.load(Ordering::Relaxed);
        let too_large = LocalAnswer::BodyTooLarge { limit };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large);
        }
        // A GET without a body (every code exchange) skips the collecting machinery.
        if body.is_end_stream() {
            return Ok(Bytes::new());
        }
        // The deadline's timer is armed only if the body is not already here when first
        // polled (`timeout` polls the body first): most bodies come with their head.
        let body_timeout = Duration::from_millis(self.body_timeout_ms.load(Ordering::Relaxed));
        let collect = Limited::new(body, limit).collect();
        match tokio::time::timeout(body_timeout, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
            Ok(Err(_)) => Err(LocalAnswer::BodyUnreadable),
            Err(_) => Err(LocalAnswer::BodyTimeout {
                after: body_timeout,
            }),
        }
    }

    /// A code exchange: a replay gets the remembered answer, a follower waits for the call in
    /// flight, the first caller makes the call.
    async fn code_exchange(
        &self,
        exchange: ExchangeRequest,
        parts: Parts,
        target: Target,
        body: Bytes,
    ) -> Reply {
        // Replays and followers need nothing below (headers, the upstream request).
        match self.codes.lookup(exchange.key) {
            Lookup::Remembered(remembered) => {
                let result = ExchangeResult::Remembered(remembered);
                return Reply::exchanged(result, CacheStatus::Hit);
            }
            Lookup::InFlight(waiter) => {
                return Reply::exchanged(waiter.result().await, CacheStatus::Coalesced)
            }
            Lookup::Absent => {}
        }
        let query = target.path_and_query.query().unwrap_or("");
        let fingerprint = self.codes.fingerprint(target.api, query);
        let call = self.call(parts, target, body, Some(exchange.quota_key));
        let (result, status) = self
            .codes
            .exchange(exchange.key, call, &self.dispatcher, fingerprint)
            .await;
        Reply::exchanged(result, status)
    }

    /// Any other request: sent upstream as it is, under its appid's quota when the API is one
    /// wxgate knows and the appid is in the query.
    async fn forward(
        &self,
        parts: Parts,
        target: Target,
        body: Bytes,
    ) -> Result<Reply, LocalAnswer> {
        let query = target.path_and_query.query().unwrap_or("");
        let quota_key = target
            .api
            .quota_appid(query, &body)?
            .and_then(|appid| QuotaKey::new(target.api, appid));
        let call = self.call(parts, target, body, quota_key);
        // Boxed: the call's future is large, and hyper moves the future of every request
        // (code exchanges, the hot path, included) whole; one allocation here is cheaper.
        let result: CallResult = Box::pin(self.dispatcher.call(&call, std::future::pending)).await;
        Ok(Reply::forwarded(result?))
    }

    /// The upstream call of a request: its own headers minus what stays local, and how long
    /// it may wait for quota (the client may shorten the configured wait).
    fn call(&self, parts: Parts, target: Target, body: Bytes, quota_key: Option<QuotaKey>) -> Call {
        let max_wait = Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed));
        let max_wait = parts
            .headers
            .get(MAX_WAIT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(max_wait, |ms| max_wait.min(Duration::from_millis(ms)));
        let mut headers = parts.headers;
        prepare_upstream_headers(&mut headers);
        Call {
            api: target.api,
            quota_key,
            request: UpstreamRequest {
                method: parts.method,
                path_and_query: target.path_and_query,
                headers,
                body,
            },
            max_wait,
        }
    }

    /// The access line and the request's metrics.
    fn log(&self, context: &RequestContext, reply: &Reply) {
        let elapsed = context.started.elapsed();
        self.metrics
            .request(context.api, reply.outcome, elapsed.as_secs_f64());
        tracing::info!(
            target: "wxgate::access",
            request_id = context.request_id.to_str().unwrap_or("-"),
            method = %context.method,
            api = %context.api.label(),
            status = reply.response.status().as_u16(),
            errcode = %reply.errcode.map_or("-", Errcode::label),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            outcome = %reply.outcome.label(),
        );
    }
}

impl Reply {
    /// One of wxgate's own answers.
    fn local(answer: LocalAnswer) -> Reply {
        Reply {
            response: answer.response(),
            outcome: answer.outcome(),
            errcode: None,
        }
    }

    /// WeChat's answer, as it came.
    fn forwarded(answer: WechatAnswer) -> Reply {
        let upstream = answer.response;
        let mut response = Response::new(Full::new(upstream.body));
        *response.status_mut() = upstream.status;
        *response.headers_mut() = upstream.headers;
        Reply {
            response,
            outcome: Outcome::Forwarded,
            errcode: Some(answer.errcode),
        }
    }

    /// The answer of the token cache, with its `X-Wxgate-Cache` header.
    fn token(answer: TokenAnswer) -> Reply {
        let (mut reply, status) = match answer {
            TokenAnswer::Token { body, status } => {
                let mut response = Response::new(Full::new(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(JSON_CONTENT_TYPE),
                );
                let errcode = (status == CacheStatus::Miss).then_some(Errcode::Success);
                let outcome = Outcome::Forwarded;
                (
                    Reply {
                        response,
                        outcome,
                        errcode,
                    },
                    status,
                )
            }
            TokenAnswer::Wechat { answer, status } => {
                (Reply::forwarded(Arc::unwrap_or_clone(answer)), status)
            }
            TokenAnswer::Local(local) => return Reply::local(local),
        };
        reply.outcome = match status {
            CacheStatus::Hit => Outcome::CacheHit,
            CacheStatus::Coalesced => Outcome::Coalesced,
            CacheStatus::Miss => Outcome::Forwarded,
        };
        reply
            .response
            .headers_mut()
            .insert(CACHE_HEADER, status.header_value());
        reply
    }

    /// The result of a code exchange, with its `X-Wxgate-Cache` header.
    fn exchanged(result: ExchangeResult, status: CacheStatus) -> Reply {
        let mut reply = match result {
            // The leader alone usually holds the answer: no copy then.
            ExchangeResult::Upstream(answer) => Reply::forwarded(Arc::unwrap_or_clone(answer)),
            ExchangeResult::Remembered(remembered) => {
                let mut response = Response::new(Full::new(remembered.body()));
                *response.status_mut() = remembered.status();
                if let Some(content_type) = remembered.content_type() {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                Reply {
                    response,
                    outcome: Outcome::CacheHit,
                    errcode: None,
                }
            }
            ExchangeResult::Local(answer) => Reply::local(answer),
        };
        // A follower of a call, here or on another replica, is counted as coalesced.
        if status == CacheStatus::Coalesced
            && matches!(reply.outcome, Outcome::Forwarded | Outcome::CacheHit)
        {
            reply.outcome = Outcome::Coalesced;
        }
        reply
            .response
            .headers_mut()
            .insert(CACHE_HEADER, status.header_value());
        reply
    }
}

/// The request's id: the client's `X-Request-Id` when it is sane (so a client's id can be
/// followed through wxgate's log), else 16 random hex digits.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |value: &&HeaderValue| {
        (1..=64).contains(&value.len())
            && value
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(b))
    };
    if let Some(value) = headers.get(REQUEST_ID_HEADER).filter(sane) {
        return value.clone();
    }
    let mut id = [0u8; 16];
    let random = fastrand::u64(..);
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((random >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// The target phase: the API of a plain path. `CONNECT`, an authority-form or
/// asterisk-form target, and dot segments (which an HTTP client would resolve, and so send
/// somewhere other than the path the request named) are refused; so is a path that looks
/// like a known API only up to case or `;` parameters. A known API written another way
/// WeChat reads as the same goes upstream under its documented path (see [`crate::api`]).
fn read_target(parts: &Parts) -> Result<Target, LocalAnswer> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .ok_or(LocalAnswer::BadTarget)?;
    let path = path_and_query.path();
    if parts.method == Method::CONNECT || !path.starts_with('/') || has_dot_segment(path) {
        return Err(LocalAnswer::BadTarget);
    }
    match Api::classify(path) {
        PathClass::Exact(api) => Ok(Target {
            api,
            path_and_query,
        }),
        PathClass::Variant(api) => {
            let canonical = match path_and_query.query() {
                Some(query) => format!("{}?{query}", api.label()),
                None => api.label().to_owned(),
            };
            Ok(Target {
                api,
                path_and_query: canonical.parse().map_err(|_| LocalAnswer::BadTarget)?,
            })
        }
        PathClass::Ambiguous => Err(LocalAnswer::BadTarget),
    }
}

/// What goes upstream: the client's headers minus those describing the client's connection,
/// `Content-Length` (recomputed from the body), `Expect` (wxgate has read the whole body
/// already, answering the client's `100-continue` itself), `Accept-Encoding` (wxgate must
/// read each answer's errcode, so it asks for the identity encoding) and wxgate's own.
/// `Host` is left for the upstream client to replace with the upstream's (one replacement
/// instead of a removal and an insertion).
fn prepare_upstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(
        headers,
        &[
            header::CONTENT_LENGTH,
            header::EXPECT,
            header::ACCEPT_ENCODING,
            MAX_WAIT_HEADER,
        ],
    );
}

/// Whether a path has `.` or `..` segments.
fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither '.' nor '%': one scan, no allocation.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|segment| {
        segment.len() <= 6
            && [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."]
                .iter()
                .any(|dots| segment.eq_ignore_ascii_case(dots))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_clients_when_sane() {
        let mut headers = HeaderMap::new();
        let made_up = request_id(&headers);
        assert_eq!(made_up.len(), 16);
        assert_ne!(made_up, request_id(&headers));
        headers.insert(REQUEST_ID_HEADER, "abc-123.x:y_z".parse().unwrap());
        assert_eq!(request_id(&headers), "abc-123.x:y_z");
        for bad in ["has space", "quote\"", &"x".repeat(65)] {
            headers.insert(REQUEST_ID_HEADER, bad.parse().unwrap());
            assert_eq!(request_id(&headers).len(), 16, "{bad}");
        }
    }

    #[test]
    fn dot_segments_are_found() {
        assert!(has_dot_segment("/sns/../cgi-bin/token"));
        assert!(has_dot_segment("/sns/%2E%2e/x"));
        assert!(has_dot_segment("/."));
        assert!(!has_dot_segment("/sns/jscode2session"));
        assert!(!has_dot_segment("/a.b/..c"));
    }

    #[test]
    fn hop_by_hop_and_wxgate_headers_stay_local() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "wxgate".parse().unwrap());
        headers.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        headers.insert(MAX_WAIT_HEADER, "10".parse().unwrap());
        headers.insert("x-custom", "kept".parse().unwrap());
        prepare_upstream_headers(&mut headers);
        // Host is replaced by the upstream client (see `UpstreamClient::outgoing`).
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["x-custom"], "kept");
    }
}
