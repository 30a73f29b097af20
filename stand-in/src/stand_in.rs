//! [`StandIn`]: the running stand-in and its handle (start it, inject faults, change its
//! latency and limits, issue codes of users, read what it received and counted), and the
//! server behind it: the accept loop (and
//! the TLS handshake, for HTTPS) and what happens to one call from arrival to answer.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::answer::{json_response, plain, Answer, CloseConnection};
use crate::ids::{user_code, user_openid, user_unionid};
use crate::record::{
    bump, calls_per_window, max_calls_in_any_span, read_all, read_counter, unix_ms, CallRecord,
    Stats, WindowCalls,
};
use crate::request::{ReceivedCall, Route};
use crate::upstream::Shared;
use crate::{duration_nanos, lock, Fault, RateLimit, StandInConfig, STATS_PATH};

/// Largest request body the stand-in reads; anything bigger gets 413. WeChat requests are
/// tiny; the cap only keeps a runaway test from eating memory.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// A running stand-in for `api.weixin.qq.com`, serving on a loopback port.
///
/// Dropping it stops the server: the accept loop and every connection task are aborted.
///
/// Paths other than the WeChat endpoints get an **echo**: status 200, or the request's
/// `x-echo-status` (200..=599; anything else gets 400); Content-Type from the request's
/// `x-echo-content-type`, else [`JSON_CONTENT_TYPE`](crate::JSON_CONTENT_TYPE); headers `x-echo-custom: stand-in` and
/// `x-echo-method: <METHOD>`; and the body
/// `{"method","uri","headers":{lowercase name: value},"body","body_len"}`, where `uri` is the
/// path and query exactly as received, repeated headers are joined with `", "`, and `body` is
/// the request body as lossy UTF-8.
///
/// A path that [`StandInConfig::api_limits`](crate::StandInConfig::api_limits) names (or
/// [`StandIn::set_rate_limit`] and the like) is an account's API as WeChat's are: it needs an
/// `access_token` the stand-in minted (41001 without, 40001 unknown or replaced, 42001
/// expired; an `authorizer_access_token` makes it a call on the account's behalf) or a
/// platform's `component_access_token` (the platform's own call), is counted under that
/// token's appid, and is echoed only when its limits admit it (else 45011 or 45009).
pub struct StandIn {
    addr: SocketAddr,
    /// Whether it serves HTTPS.
    https: bool,
    /// Also read by this crate's tests, which move its clock.
    pub(crate) shared: Arc<Shared>,
    /// The accept loop. It owns the connection tasks (a `JoinSet`), so aborting it ends them
    /// all.
    server: AbortHandle,
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn")
            .field("addr", &self.addr)
            .field("total_calls", &self.total_calls())
            .finish_non_exhaustive()
    }
}

impl StandIn {
    /// Starts a stand-in on `127.0.0.1:0`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When no loopback port can be bound, or [`StandInConfig::tls`] is not a usable
    /// certificate and key (`InvalidInput`).
    pub async fn start(config: StandInConfig) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener, config).await
    }

    /// Starts a stand-in on a listener the caller bound. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the listener's local address cannot be read, or [`StandInConfig::tls`] is not a
    /// usable certificate and key (`InvalidInput`).
    pub async fn start_on(
        listener: TcpListener,
        config: StandInConfig,
    ) -> std::io::Result<StandIn> {
        let addr = listener.local_addr()?;
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let https = tls.is_some();
        let shared = Arc::new(Shared::new(config));
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls)).abort_handle();
        Ok(StandIn {
            addr,
            https,
            shared,
            server,
        })
    }

    /// The address the stand-in listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, without a trailing slash, e.g. `http://127.0.0.1:40123`; `https://`
    /// when it serves HTTPS (then a client checking the certificate needs a host name the
    /// certificate names, such as `https://localhost:40123`).
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Connections accepted (TCP), whether or not a request came on them.
    pub fn connections(&self) -> u64 {
        self.shared.counters.connections.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed: with keep-alive, fewer than the calls.
    pub fn tls_connections(&self) -> u64 {
        self.shared.counters.tls_connections.load(Ordering::Relaxed)
    }

    /// The server name (SNI) each completed TLS handshake asked for, in order; `None` for a
    /// client that sent none (as for an IP address).
    pub fn server_names(&self) -> Vec<Option<String>> {
        lock(&self.shared.server_names).clone()
    }

    /// Queues faults for the next calls: each call, on any path, takes the first queued fault
    /// (if any) and suffers it instead of its normal answer ([`Fault::Delay`]: before it).
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.push(faults);
    }

    /// Faults injected so far (queued or drawn from [`StandInConfig::random_faults`]), by
    /// [`Fault::name`].
    pub fn injected_faults(&self) -> BTreeMap<&'static str, u64> {
        read_all(&self.shared.counters.by_fault)
    }

    /// How many queued faults no call has taken yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.len()
    }

    /// Sets the delay added before every answer, from the next call on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_nanos
            .store(duration_nanos(latency), Ordering::Relaxed);
    }

    /// Sets the default rate limit ([`StandInConfig::quota_per_window`]), from the next call
    /// on. Executed calls are only counted while some limit applies: turning it on starts
    /// every count that nothing else kept from zero.
    pub fn set_quota(&self, per_window: Option<u32>) {
        self.shared.limits.set_default_rate(per_window);
    }

    /// Sets the rate limit of `path` for `appid` (every appid: `None`), from the next call
    /// on; `None` inherits again (see [`ApiLimits`](crate::ApiLimits)). A path the stand-in
    /// echoes becomes an API that checks its token and counts its calls.
    pub fn set_rate_limit(&self, path: &str, appid: Option<&str>, limit: Option<RateLimit>) {
        self.shared
            .limits
            .set(path, appid, |figures| figures.rate_limit = limit);
    }

    /// Sets the limit of `path` for calls a platform makes on `appid`'s behalf (every appid:
    /// `None`), from the next call on; `None` inherits again.
    pub fn set_component_rate_limit(
        &self,
        path: &str,
        appid: Option<&str>,
        limit: Option<RateLimit>,
    ) {
        self.shared
            .limits
            .set(path, appid, |figures| figures.component_rate_limit = limit);
    }

    /// Sets the daily limit of `path` for `appid` (every appid: `None`), from the next call
    /// on; `None` inherits again. Calls already counted today stay counted.
    pub fn set_daily_limit(&self, path: &str, appid: Option<&str>, limit: Option<u64>) {
        self.shared
            .limits
            .set(path, appid, |figures| figures.daily_limit = limit);
    }

    /// Sets the per-user limit of the code exchanges ([`StandInConfig::user_rate_limit`]),
    /// from the next call on.
    pub fn set_user_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared.limits.set_user_rate_limit(limit);
    }

    /// A fresh `js_code` of the WeChat user `user`, shaped `u<user>_<16 random characters>`:
    /// its exchanges count against that user's limit
    /// ([`StandInConfig::user_rate_limit`]), and every code of the user gets the same
    /// openid ([`StandIn::openid_of`]) and unionid. Any code of that shape names its user,
    /// so a test may also write its own.
    ///
    /// # Panics
    /// When `user` is empty or contains `_` (it would not read back as the same user).
    pub fn issue_code(&self, user: &str) -> String {
        assert!(
            !user.is_empty() && !user.contains('_'),
            "a user name is not empty and has no `_`: {user:?}"
        );
        user_code(user)
    }

    /// The openid the code exchanges of `appid` answer for `user`'s codes.
    pub fn openid_of(&self, appid: &str, user: &str) -> String {
        user_openid(appid, user)
    }

    /// The unionid the code exchanges answer for `user`'s codes (apps with a unionid).
    pub fn unionid_of(&self, user: &str) -> String {
        user_unionid(user)
    }

    /// Calls of (`appid`, `path`) executed today (the stand-in's day, see
    /// [`StandInConfig::day`]): what quota/get reports as `used`. Counted only while some
    /// limit applies to the key; refused calls (45011, 45009) are not counted.
    pub fn daily_used(&self, path: &str, appid: &str) -> u64 {
        self.shared
            .limits
            .daily_used(path, appid, self.shared.now())
    }

    /// How many times `appid` (or a platform, by its `component_appid`) cleared its quota
    /// this month (of the stand-in's days).
    pub fn clears_this_month(&self, appid: &str) -> u32 {
        self.shared
            .limits
            .clears_this_month(appid, self.shared.now())
    }

    /// Calls received on `path` (without query), whatever their answer: faults and 45011
    /// included.
    pub fn calls(&self, path: &str) -> u64 {
        read_counter(&self.shared.counters.by_path, path)
    }

    /// Calls received on any path.
    pub fn total_calls(&self) -> u64 {
        self.shared.counters.total.load(Ordering::Relaxed)
    }

    /// Exchanges received for this `js_code` on either code endpoint, whatever their answer.
    pub fn code_calls(&self, js_code: &str) -> u64 {
        read_counter(&self.shared.counters.by_code, js_code)
    }

    /// Answers given with this errcode; 0 counts success bodies of the WeChat endpoints.
    pub fn answers(&self, errcode: i64) -> u64 {
        read_counter(&self.shared.counters.by_errcode, &errcode)
    }

    /// Successful token fetches of `appid` (`component_appid` for a platform's) on the token
    /// API at `path`: how many tokens a proxy fetched for it.
    pub fn token_fetches(&self, path: &str, appid: &str) -> u64 {
        read_counter(
            &self.shared.counters.token_fetches,
            &format!("{path} {appid}"),
        )
    }

    /// quota/get calls about `cgi_path` that reached the stand-in with a working token of
    /// `appid` (an account's own or an `authorizer_access_token`), whatever they were
    /// answered (45011 and 76022 included): how often a proxy asked about that key.
    pub fn quota_queries(&self, cgi_path: &str, appid: &str) -> u64 {
        read_counter(
            &self.shared.counters.quota_queries,
            &format!("{cgi_path} {appid}"),
        )
    }

    /// Every call received since the start or the last [`reset_counters`](Self::reset_counters),
    /// in arrival order. Empty when [`StandInConfig::record_calls`] is off.
    pub fn call_log(&self) -> Vec<CallRecord> {
        lock(&self.shared.log).clone()
    }

    /// The most calls the log shows for (`appid`, `path`) in one aligned window, faulted and
    /// refused calls included: what a proxy's quota gate let through. Always 0 when
    /// [`StandInConfig::record_calls`] is off.
    pub fn max_calls_in_any_window(&self, appid: &str, path: &str) -> u64 {
        self.calls_per_window()
            .into_iter()
            .filter(|window| window.path == path && window.appid.as_deref() == Some(appid))
            .map(|window| window.calls)
            .max()
            .unwrap_or(0)
    }

    /// The most calls of (`appid`, `path`) the log shows arriving within any span of length
    /// `span`, wherever it starts (sliding, not aligned): calls at `t` and `t'` share a span
    /// when `|t' - t| < span`. Faulted and refused calls count: WeChat counts calls where
    /// they arrive. Arrival is when the stand-in read the request head. Always 0 when
    /// [`StandInConfig::record_calls`] is off.
    pub fn max_calls_in_any_span(&self, path: &str, appid: &str, span: Duration) -> usize {
        max_calls_in_any_span(&lock(&self.shared.log), path, appid, span)
    }

    /// The calls of the log per aligned window and (appid, path), in window order; what
    /// `GET /__stand_in/stats` lists. Empty when [`StandInConfig::record_calls`] is off.
    pub fn calls_per_window(&self) -> Vec<WindowCalls> {
        calls_per_window(&lock(&self.shared.log), self.shared.limits.default_window)
    }

    /// Zeroes every counter and empties the call log. Upstream state is kept: spent codes,
    /// the counts of the limits (windows, days, clears) and queued faults stay as they are.
    pub fn reset_counters(&self) {
        let counters = &self.shared.counters;
        counters.connections.store(0, Ordering::Relaxed);
        counters.tls_connections.store(0, Ordering::Relaxed);
        lock(&self.shared.server_names).clear();
        counters.total.store(0, Ordering::Relaxed);
        counters.by_path.clear();
        counters.by_code.clear();
        counters.by_errcode.clear();
        counters.token_fetches.clear();
        counters.quota_queries.clear();
        counters.by_fault.clear();
        lock(&self.shared.log).clear();
    }

    /// Forgets which codes were spent, so they can be exchanged again. Long benchmarks call it
    /// to bound the memory the spent-code set takes.
    pub fn forget_used_codes(&self) {
        self.shared.used_codes.clear();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Accepts connections until the stand-in is dropped (which aborts this task).
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    // Owned here so that aborting this task (StandIn's Drop) aborts every connection with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(serve_connection(
                        stream,
                        builder.clone(),
                        Arc::clone(&shared),
                        tls.clone(),
                    ));
                }
                // Usually too many open files: back off instead of spinning, the condition
                // clears as connections close.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            // Reap finished connections so the set does not grow over a long benchmark.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One connection: the TLS handshake first for HTTPS (a client that refuses the certificate
/// ends it there, before any request), then HTTP/1.1 or HTTP/2.
async fn serve_connection(
    stream: TcpStream,
    builder: auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
) {
    // Small request/answer exchanges: Nagle's algorithm would only add latency to the baseline.
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_http(stream, builder, shared).await;
    };
    let Ok(stream) = acceptor.accept(stream).await else {
        return;
    };
    let server_name = stream.get_ref().1.server_name().map(str::to_owned);
    lock(&shared.server_names).push(server_name);
    shared
        .counters
        .tls_connections
        .fetch_add(1, Ordering::Relaxed);
    serve_http(stream, builder, shared).await;
}

async fn serve_http<S>(stream: S, builder: auto::Builder<TokioExecutor>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    // The connection ends in an error when the client goes away or a fault closes it on
    // purpose; neither is worth reporting from a test double.
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// One call: counted and given its fault on arrival, executed, recorded, held back by the
/// latency, answered.
async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, CloseConnection> {
    let at = shared.now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    if path == STATS_PATH {
        // The stand-in's own page, not a WeChat call: neither counted nor logged.
        return Ok(stats(&shared, at));
    }
    shared.counters.total.fetch_add(1, Ordering::Relaxed);
    bump(&shared.counters.by_path, path);
    // Taken at arrival so faults are consumed in the order calls arrive; a call that finds
    // none queued may draw one.
    let fault = shared.faults.pop().or_else(|| shared.random_faults.draw());
    if let Some(fault) = fault {
        bump(&shared.counters.by_fault, &fault.name());
    }

    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Ok(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large for the stand-in",
            ));
        }
        Err(_) => return Err(CloseConnection("request body broken off")),
    };

    let route = Route::of(path);
    let call = ReceivedCall::new(at, route, &parts, &body);
    let params = call.params.as_ref().ok();
    if route.exchanges_codes() {
        if let Some(js_code) = params.and_then(|params| params.js_code.as_deref()) {
            bump(&shared.counters.by_code, js_code);
        }
    }

    let mut extra_delay = Duration::ZERO;
    let answer = match fault {
        None => shared.execute(route, &call),
        Some(Fault::Delay(delay)) => {
            extra_delay = delay;
            shared.execute(route, &call)
        }
        Some(Fault::Busy) => Answer::error(-1),
        Some(Fault::MinuteQuota) => Answer::error(45011),
        Some(Fault::DailyQuota) => Answer::error(45009),
        Some(Fault::BadGateway) => Answer::BadGateway,
        Some(Fault::Reset) => Answer::Reset,
        Some(Fault::Hang) => Answer::Hang,
        Some(Fault::LostAnswer) => {
            // Executed for its effect (spent code, quota); the answer never leaves.
            let _lost = shared.execute(route, &call);
            Answer::Reset
        }
    };
    let appid = params
        .filter(|_| shared.record_calls)
        .and_then(|params| shared.logged_appid(route, params));
    shared.record(at, path, appid.as_deref(), answer.errcode());

    let wait = shared.latency().saturating_add(extra_delay);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }

    answer.into_response().await
}

/// The answer of [`STATS_PATH`]: counters, limits and calls per window as JSON.
fn stats(shared: &Shared, now: SystemTime) -> Response<Full<Bytes>> {
    let limits = &shared.limits;
    let (day, day_offset) = limits.day();
    let stats = Stats {
        now_unix_ms: unix_ms(now),
        window_ms: millis(limits.default_window),
        quota_per_window: limits.default_rate(),
        api_limits: limits.configured(),
        user_rate_limit: limits.user_rate_limit(),
        day_ms: millis(day),
        day_offset_ms: millis(day_offset),
        daily_used: limits.used_today(now, |path| Route::of(path).default_limited()),
        total_calls: shared.counters.total.load(Ordering::Relaxed),
        answers: read_all(&shared.counters.by_errcode),
        faults: read_all(&shared.counters.by_fault),
        record_calls: shared.record_calls,
        windows: calls_per_window(&lock(&shared.log), limits.default_window),
    };
    let body = serde_json::to_string(&stats).expect("the stats serialize");
    json_response(body)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
