//! The request pipeline, in named phases over a small per-request context:
//!
//! 1. [`target`](Proxy::answer): the request's API, from its path; anything that could point
//!    wxgate elsewhere is refused.
//! 2. [`body`](Proxy::read_body): read whole, within `server.max_body_bytes`.
//! 3. [`token`](Proxy::token) (a token fetch, answered by the token cache),
//!    [`code exchange`](Proxy::code_exchange) (a replay, a follower or a leader) or
//!    [`forward`](Proxy::forward) (any other request, under its appid's quota). A call that
//!    names `access_token` or `component_access_token` twice is refused (40097). When WeChat
//!    answers a call that carried a cached token with 40001, 40014 or 42001, the token cache
//!    drops that token before the answer goes back.
//! 4. respond: WeChat's answer as it came, or one of wxgate's own ([`LocalAnswer`]).
//! 5. [`log`](Proxy::log): one access line and the request's metrics.
//!
//! Only the path and query of a request are used: an absolute-form URI or a `Host` header
//! names no destination, the configured upstream is the only one. The log line names the
//! API (a bounded label), never the path or query, so no credential reaches a log.

mod metrics;
mod observe;
mod reply;
mod target;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::time::Instant;
use wxgate_contract::CacheStatus;

use self::metrics::RequestMetrics;
use self::reply::Reply;
use self::target::{prepare_upstream_headers, read_target, request_id, Target};
use crate::answer::{Answer, LocalAnswer};
use crate::cluster::Cluster;
use crate::code_cache::{CodeCache, CodeRequest, Lookup};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::dispatch::{Call, CallMetrics, Dispatcher};
use crate::metrics::Metrics;
use crate::quota::{DailyRow, KeyRow, QuotaGate, QuotaKey};
use crate::token_cache::{
    carried_token, is_stale_token_errcode, RepeatedToken, TokenCache, TokenKind, TokenRequest,
};
use crate::upstream::{InvalidBaseUrl, UpstreamClient, UpstreamRequest};
use crate::wechat::Api;
use crate::wechat::Errcode;

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
    /// The limits WeChat states, and the tokens whose appid wxgate knows.
    discovery: Arc<Discovery>,
    codes: Arc<CodeCache>,
    tokens: Arc<TokenCache>,
    metrics: RequestMetrics,
    /// `server.max_body_bytes`; a reload may change it.
    max_body_bytes: AtomicUsize,
    /// From the end of a request's head to the end of its body; a reload may change it.
    body_timeout_ms: AtomicU64,
    /// `quota.max_wait_ms`; a reload may change it.
    max_wait_ms: AtomicU64,
    /// With `[cluster]`: whether the housekeeping's read of the limits other replicas learned
    /// is still running (one at a time).
    syncing: Arc<AtomicBool>,
}

/// What the phases learn about a request, for its log line and its metrics.
struct RequestContext {
    started: Instant,
    method: Method,
    api: Api,
    /// In the access line and the response's `X-Request-Id`.
    request_id: HeaderValue,
    /// The quota the request's call spends, once known.
    quota_key: Option<QuotaKey>,
}

/// Why the request pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream client could not be built.
    #[error("cannot build the upstream client: {0}")]
    Upstream(#[from] InvalidBaseUrl),
    /// The pipeline's metrics could not be registered.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Proxy {
    /// Builds the proxy and its upstream client from the configuration, its components'
    /// metrics registered in `metrics`' registry.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Proxy, ProxyError> {
        Proxy::with_cluster(config, &metrics, None)
    }

    /// The proxy of a replica: with a `cluster`, quota turns are counted with the other
    /// replicas, and access tokens are shared with them.
    pub(crate) fn with_cluster(
        config: &Config,
        metrics: &Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Proxy, ProxyError> {
        let upstream = UpstreamClient::new(&config.upstream)?;
        let mut quota = QuotaGate::new(&config.quota).with_metrics(metrics)?;
        let mut codes = CodeCache::new(&config.code_cache, metrics)?;
        if let Some(cluster) = &cluster {
            quota = quota.shared_with(cluster.clone());
            codes = codes.shared_with(cluster.clone(), config.upstream.timeout);
        }
        let calls = CallMetrics::new(metrics)?;
        let dispatcher = Arc::new(Dispatcher::new(upstream, quota, &config.retry, calls));
        let tokens = TokenCache::new(config, dispatcher.clone(), metrics, cluster.clone())?;
        let discovery = Arc::new(Discovery::new(
            &config.quota,
            dispatcher.clone(),
            metrics,
            cluster,
        )?);
        Ok(Proxy {
            dispatcher,
            discovery,
            codes: Arc::new(codes),
            tokens: Arc::new(tokens),
            metrics: RequestMetrics::new(metrics)?,
            max_body_bytes: AtomicUsize::new(config.server.max_body_bytes),
            body_timeout_ms: AtomicU64::new(config.server.body_timeout.as_millis() as u64),
            max_wait_ms: AtomicU64::new(config.quota.max_wait.as_millis() as u64),
            syncing: Arc::default(),
        })
    }

    /// Applies the settings of a new configuration that can change while serving: quotas
    /// (to the buckets in use), retries, the code cache's lifetime and size, the body limit
    /// and the quota wait. What needs new sockets or a new Redis connection is the caller's
    /// to keep (see `crate::reload`).
    pub fn reconfigure(&self, config: &Config) {
        self.dispatcher.quota().reconfigure(&config.quota);
        self.discovery.reconfigure(&config.quota);
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
        self.discovery.housekeeping();
        self.dispatcher.housekeeping();
        if self.dispatcher.quota().is_shared() && !self.syncing.swap(true, Ordering::AcqRel) {
            let dispatcher = self.dispatcher.clone();
            let syncing = self.syncing.clone();
            tokio::spawn(async move {
                dispatcher.quota().sync_learned().await;
                syncing.store(false, Ordering::Release);
            });
        }
    }

    /// Every (appid, API) with recent traffic, as `GET /quota` shows it (at most `most`,
    /// busiest first), and how many more there are.
    pub fn quota_table(&self, most: usize) -> (Vec<KeyRow>, usize) {
        let gate = self.dispatcher.quota();
        let mut rows: Vec<KeyRow> = gate
            .keys()
            .iter()
            .map(|key| {
                let mut row = gate.row(key);
                row.daily = self.discovery.daily(key).map(|daily| DailyRow {
                    used: daily.used,
                    limit: daily.limit,
                });
                row
            })
            .collect();
        rows.sort_by(|a, b| {
            b.calls
                .cmp(&a.calls)
                .then_with(|| (&a.appid, &a.api, a.on_behalf).cmp(&(&b.appid, &b.api, b.on_behalf)))
        });
        let omitted = rows.len().saturating_sub(most);
        rows.truncate(most);
        rows.sort_by(|a, b| (&a.appid, &a.api, a.on_behalf).cmp(&(&b.appid, &b.api, b.on_behalf)));
        (rows, omitted)
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
            quota_key: None,
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
        let body = self.read_body(body).await?;
        let query = target.path_and_query.query().unwrap_or("");
        if let Some(token) = self
            .tokens
            .read_request(target.api, &parts.method, query, &body)
        {
            return Ok(self.token(token, parts, target, body).await);
        }
        // A call carrying a token: refused if it names one twice (WeChat could refuse the
        // copy wxgate does not drop), else kept (a reference count) in case WeChat refuses
        // the token. Calls without one pay a substring search only.
        let carried = if query.contains("access_token") {
            carried_token(query)
                .map_err(|RepeatedToken(name)| LocalAnswer::RepeatedParameter(name))?;
            Some(target.path_and_query.clone())
        } else {
            None
        };
        let reply = if target.api.is_code_exchange() && parts.method == Method::GET {
            let exchange = self.codes.read_request(target.api, query)?;
            context.quota_key = Some(exchange.quota_key);
            self.code_exchange(exchange, parts, target, body).await
        } else {
            self.forward(context, parts, target, body).await?
        };
        if let Some(carried) = carried {
            self.carried_token(context, &carried, reply.errcode).await;
        }
        Ok(reply)
    }

    /// WeChat answered a call that carried a token: a refused token is dropped from the token
    /// cache (before the answer goes back: the caller's next fetch gets a fresh token) and
    /// forgotten; a token accepted on a call that names its appid is tied to that appid.
    async fn carried_token(
        &self,
        context: &RequestContext,
        carried: &http::uri::PathAndQuery,
        errcode: Option<Errcode>,
    ) {
        let query = carried.query().unwrap_or("");
        match errcode {
            Some(Errcode::Code(code)) if is_stale_token_errcode(code) => {
                self.tokens.forget_stale(query).await;
                if let Some(token) = observe::access_token(query) {
                    self.discovery.tokens().refused(&token);
                }
            }
            Some(Errcode::Success) => {
                if let (Some(key), Some(token)) = (&context.quota_key, observe::access_token(query))
                {
                    self.discovery.tokens().presented(&token, key.appid());
                }
            }
            _ => {}
        }
    }

    /// A token fetch: from the cache, or from the one fetch in flight for its appid and
    /// secret (see [`crate::token_cache`]).
    async fn token(&self, token: TokenRequest, parts: Parts, target: Target, body: Bytes) -> Reply {
        let quota_key = token.quota_key();
        let call = self.call(parts, target, body, quota_key);
        let (kind, appid) = (token.key().kind, token.key().appid.clone());
        match self.tokens.answer(token, call).await {
            Ok((answer, status)) => {
                let body = match &answer {
                    Answer::Token(body) => Some(body),
                    Answer::Wechat(answer) => Some(&answer.response.body),
                    _ => None,
                };
                if let (Some(body), TokenKind::Token | TokenKind::Stable) = (body, kind) {
                    self.minted(body, "access_token", &appid, false);
                }
                Reply::cached(answer, status)
            }
            Err(local) => Reply::local(local),
        }
    }

    /// A token answer for `appid` passed through: calls carrying its token spend `appid`'s
    /// quota (on its behalf, for a platform's token).
    fn minted(&self, body: &[u8], field: &str, appid: &str, on_behalf: bool) {
        if let Some((token, lifetime)) = observe::minted_token(body, field) {
            self.discovery
                .tokens()
                .minted(token.as_bytes(), appid, on_behalf, lifetime);
        }
    }

    /// Reads the whole body, refusing one larger than `server.max_body_bytes` before reading
    /// it when its length is declared, and answering 408 to one that has not arrived whole
    /// within `server.body_timeout_ms` (a client trickling a byte at a time, or declaring a
    /// body it never sends, would otherwise hold the request open for ever).
    async fn read_body<B>(&self, body: B) -> Result<Bytes, LocalAnswer>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.max_body_bytes.load(Ordering::Relaxed);
        let too_large = LocalAnswer::BodyTooLarge { limit };
        // A declared length (hyper's size hint, from `Content-Length`) over the limit is
        // refused before any of the body is read.
        if body.size_hint().lower() > limit as u64 {
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
        exchange: CodeRequest,
        parts: Parts,
        target: Target,
        body: Bytes,
    ) -> Reply {
        // Replays and followers need nothing below (headers, the upstream request).
        match self.codes.lookup(exchange.key) {
            Lookup::Remembered(remembered) => {
                return Reply::cached(Answer::Remembered(remembered), CacheStatus::Hit);
            }
            Lookup::InFlight(waiter) => {
                return Reply::cached(waiter.result().await, CacheStatus::Coalesced)
            }
            Lookup::Absent => {}
        }
        let call = self.call(parts, target, body, Some(exchange.quota_key));
        let (answer, status) = self
            .codes
            .exchange(exchange.key, call, &self.dispatcher)
            .await;
        Reply::cached(answer, status)
    }

    /// Any other request: sent upstream as it is, under its appid's quota when the API is one
    /// wxgate knows and names its appid, or when the call carries an access token whose appid
    /// wxgate knows (then under WeChat's own figure, once discovered).
    async fn forward(
        &self,
        context: &mut RequestContext,
        parts: Parts,
        target: Target,
        body: Bytes,
    ) -> Result<Reply, LocalAnswer> {
        let query = target.path_and_query.query().unwrap_or("");
        let named = target
            .api
            .quota_appid(query, &body)?
            .and_then(|appid| QuotaKey::new(target.api, appid));
        let carries_token = query.contains("access_token");
        let quota_key = named.or_else(|| carries_token.then(|| self.token_key(&target, query))?);
        context.quota_key = quota_key;
        // The calls quota/get is about: an account's API calls, made with its token (token
        // fetches carry none, and the token cache watches their budget).
        if let (Some(key), true) = (quota_key, carries_token) {
            Box::pin(self.discovery.prepare(key)).await;
        }
        let authorizer = (target.path_and_query.path() == observe::AUTHORIZER_TOKEN_PATH)
            .then(|| observe::authorizer_appid(&body))
            .flatten();
        let call = self.call(parts, target, body, quota_key);
        // Boxed: the call's future is large, and hyper moves the future of every request
        // (code exchanges, the hot path, included) whole; one allocation here is cheaper.
        let answer = Box::pin(self.dispatcher.call(&call, std::future::pending)).await?;
        if answer.errcode == Errcode::Success {
            let path = call.request.path_and_query.path();
            if let Some(appid) = observe::cleared_appid(path, &call.request.body) {
                // The account's day starts over: so do wxgate's 45009 answers for it.
                self.dispatcher.quota().lift_daily_appid(&appid);
            }
            let body = &answer.response.body;
            match (call.api, named, authorizer) {
                (Api::Token | Api::StableToken, Some(key), _) => {
                    self.minted(body, "access_token", key.appid(), false);
                }
                (_, _, Some(appid)) => self.minted(body, "authorizer_access_token", &appid, true),
                _ => {}
            }
        }
        Ok(Reply::forwarded(answer))
    }

    /// The quota key of a call that names no appid but carries an access token whose appid
    /// wxgate knows.
    fn token_key(&self, target: &Target, query: &str) -> Option<QuotaKey> {
        let owner = self
            .discovery
            .tokens()
            .owner(&observe::access_token(query)?)?;
        let key = match target.api {
            Api::Other => self
                .dispatcher
                .quota()
                .key_for_path(target.path_and_query.path(), owner.appid())?,
            api => QuotaKey::new(api, owner.appid())?,
        };
        Some(if owner.on_behalf {
            key.on_behalf()
        } else {
            key
        })
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
            .answered(context.api, reply.outcome, elapsed.as_secs_f64());
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
