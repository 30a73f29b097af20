//! An in-process stand-in for `api.weixin.qq.com`.
//!
//! wxgate's integration tests, its benchmarks and the `wxgate demo` command need an upstream
//! that behaves like WeChat where wxgate cares (single-use login codes, per-minute quotas,
//! errors answered as HTTP 200 with `{"errcode","errmsg"}`) and that can be made to fail on
//! demand. This module owns that upstream: [`StandIn`] serves HTTP/1.1 and HTTP/2 on a
//! loopback listener, answers the endpoints listed below the way WeChat documents them, echoes
//! every other request back so pass-through can be checked, and counts what it received.
//!
//! | path | answers |
//! |---|---|
//! | `/sns/jscode2session` | `{"session_key","openid"[,"unionid"]}` or an error |
//! | `/sns/component/jscode2session` | the same, for a third-party platform |
//! | `/cgi-bin/token` | `{"access_token","expires_in":7200}` or an error |
//! | `/cgi-bin/stable_token` (POST, JSON) | the same |
//! | anything else | an echo of the request (see [`StandIn`]) |
//!
//! Failures are injected with [`StandIn::push_faults`]: each call takes the next queued
//! [`Fault`], whatever its path.
//!
//! Every call is *executed when it arrives* (quota counted, code spent) and answered after the
//! configured latency plus any [`Fault::Delay`]. So a client that gives up while waiting has
//! still spent its code, as it would against WeChat.
//!
//! # Example
//! ```no_run
//! use wxgate::stand_in::{Fault, StandIn, StandInConfig};
//!
//! # async fn example() -> std::io::Result<()> {
//! let upstream = StandIn::start(StandInConfig::default()).await?;
//! upstream.push_faults([Fault::Busy]);
//! // ... point the proxy at upstream.base_url() and drive it ...
//! assert_eq!(upstream.answers(-1), 1);
//! # Ok(())
//! # }
//! ```

use std::borrow::{Borrow, Cow};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::{DashMap, DashSet};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

/// The mini program registered by [`StandInConfig::default`].
pub const DEFAULT_APPID: &str = "wx00000000000000a1";
/// The app secret of [`DEFAULT_APPID`].
pub const DEFAULT_APP_SECRET: &str = "stand-in-secret-a1";
/// The third-party platform registered by [`StandInConfig::default`]; [`DEFAULT_APPID`] is
/// authorized to it.
pub const DEFAULT_COMPONENT_APPID: &str = "wx00000000000000c1";
/// The `component_access_token` of [`DEFAULT_COMPONENT_APPID`].
pub const DEFAULT_COMPONENT_ACCESS_TOKEN: &str = "stand-in-component-token-c1";

/// Path of the mini program's own code exchange (`auth.code2Session`).
pub const JSCODE2SESSION_PATH: &str = "/sns/jscode2session";
/// Path of the third-party platform's code exchange.
pub const COMPONENT_JSCODE2SESSION_PATH: &str = "/sns/component/jscode2session";
/// Path of the access-token fetch.
pub const TOKEN_PATH: &str = "/cgi-bin/token";
/// Path of the stable access-token fetch (POST, JSON body).
pub const STABLE_TOKEN_PATH: &str = "/cgi-bin/stable_token";

/// Content-Type of every JSON answer, byte for byte what WeChat sends.
pub const JSON_CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// Largest request body the stand-in reads; anything bigger gets 413. WeChat requests are
/// tiny; the cap only keeps a runaway test from eating memory.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// `quota` value meaning "no quota", so the quota fits in one atomic.
const UNLIMITED: u64 = u64::MAX;

/// The endpoints that have a quota, in the order of [`QuotaWindows`]' slots.
const QUOTA_ENDPOINTS: usize = 4;

/// What the stand-in knows about the apps and platforms calling it, and how it behaves.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// Registered mini programs: appid -> app secret.
    pub apps: Vec<StandInApp>,
    /// Third-party platforms: `component_appid`, its `component_access_token`, and the appids
    /// authorized to it.
    pub components: Vec<StandInComponent>,
    /// Per (appid, API path) quota: at most this many *executed* calls per window; `None` =
    /// unlimited.
    pub quota_per_window: Option<u32>,
    /// Window length for the quota (WeChat: 60 s). Windows are fixed and aligned to multiples of
    /// the window length since the UNIX epoch (`SystemTime`), as WeChat counts calendar minutes.
    /// A zero window is treated as one nanosecond.
    pub window: Duration,
    /// Added before every answer.
    pub latency: Duration,
    /// Keep a log of every call (time, path, appid, errcode); benches turn it off.
    pub record_calls: bool,
}

impl Default for StandInConfig {
    /// One app ([`DEFAULT_APPID`], with a unionid), one platform ([`DEFAULT_COMPONENT_APPID`])
    /// that the app authorized, no quota, 60 s windows, no latency, calls recorded.
    fn default() -> Self {
        StandInConfig {
            apps: vec![StandInApp {
                appid: DEFAULT_APPID.to_owned(),
                secret: DEFAULT_APP_SECRET.to_owned(),
                unionid: true,
            }],
            components: vec![StandInComponent {
                component_appid: DEFAULT_COMPONENT_APPID.to_owned(),
                component_access_token: DEFAULT_COMPONENT_ACCESS_TOKEN.to_owned(),
                authorized_appids: vec![DEFAULT_APPID.to_owned()],
            }],
            quota_per_window: None,
            window: Duration::from_secs(60),
            latency: Duration::ZERO,
            record_calls: true,
        }
    }
}

/// A mini program registered with the stand-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandInApp {
    /// The mini program's appid.
    pub appid: String,
    /// Its app secret, checked by `/sns/jscode2session` and the token endpoints.
    pub secret: String,
    /// Whether the app is bound to an open-platform account, so successful exchanges carry a
    /// `unionid`.
    pub unionid: bool,
}

/// A third-party platform registered with the stand-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandInComponent {
    /// The platform's own appid (`component_appid`).
    pub component_appid: String,
    /// The one `component_access_token` the stand-in accepts for this platform.
    pub component_access_token: String,
    /// Mini programs that authorized the platform; others get 61003.
    pub authorized_appids: Vec<String>,
}

/// A failure to inject into the next call, whatever its path (see [`StandIn::push_faults`]).
///
/// Unless said otherwise, a faulted call is *not executed*: no code is spent and no quota is
/// counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 200 `{"errcode":-1,"errmsg":"system error, rid: …"}`.
    Busy,
    /// HTTP 200 with 45011 `api minute-quota reach limit, must slower, retry next minute`.
    MinuteQuota,
    /// HTTP 200 with 45009 `reach max api daily quota limit`.
    DailyQuota,
    /// HTTP 502 with a small `text/html` body, as a load balancer in front of WeChat sends.
    BadGateway,
    /// The connection is closed without any answer.
    Reset,
    /// Never answers: the client hears nothing until it gives up. The pending call is
    /// released at the latest when the stand-in is dropped.
    Hang,
    /// Answers normally after this extra delay (on top of the latency). The call is executed
    /// when it arrives, so a client that times out meanwhile has still spent its code.
    Delay(Duration),
    /// The call *is executed* (a code is spent, quota counted), then the connection is closed
    /// without an answer: the answer was lost on the way back. Retrying a code exchange after
    /// this gets 40163.
    LostAnswer,
}

/// One call received by the stand-in, kept when [`StandInConfig::record_calls`] is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// When the call arrived (its quota window is taken from this time).
    pub at: SystemTime,
    /// The request path, without the query.
    pub path: String,
    /// The `appid` the call named (query, or JSON body for `stable_token`), if any.
    pub appid: Option<String>,
    /// The errcode answered (0 for a success body); `None` when no WeChat JSON answer was
    /// given: echoes, 502, resets, hangs, lost answers.
    pub errcode: Option<i64>,
}

/// A running stand-in for `api.weixin.qq.com`, serving on a loopback port.
///
/// Dropping it stops the server: the accept loop and every connection task are aborted.
///
/// Paths other than the WeChat endpoints get an **echo**: status 200, or the request's
/// `x-echo-status` (200..=599; anything else gets 400); Content-Type from the request's
/// `x-echo-content-type`, else [`JSON_CONTENT_TYPE`]; headers `x-echo-custom: stand-in` and
/// `x-echo-method: <METHOD>`; and the body
/// `{"method","uri","headers":{lowercase name: value},"body","body_len"}`, where `uri` is the
/// path and query exactly as received, repeated headers are joined with `", "`, and `body` is
/// the request body as lossy UTF-8.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
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
    /// When no loopback port can be bound.
    pub async fn start(config: StandInConfig) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener, config).await
    }

    /// Starts a stand-in on a listener the caller bound. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the listener's local address cannot be read.
    pub async fn start_on(
        listener: TcpListener,
        config: StandInConfig,
    ) -> std::io::Result<StandIn> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared))).abort_handle();
        Ok(StandIn {
            addr,
            shared,
            server,
        })
    }

    /// The address the stand-in listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, without a trailing slash, e.g. `http://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues faults for the next calls: each call, on any path, takes the first queued fault
    /// (if any) and suffers it instead of its normal answer ([`Fault::Delay`]: before it).
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.push(faults);
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

    /// Sets the per (appid, path) quota, from the next call on. Executed calls are only
    /// counted while a quota is set: turning it on starts every count from zero.
    pub fn set_quota(&self, per_window: Option<u32>) {
        self.shared
            .quota
            .store(per_window.map_or(UNLIMITED, u64::from), Ordering::Relaxed);
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

    /// Every call received since the start or the last [`reset_counters`](Self::reset_counters),
    /// in arrival order. Empty when [`StandInConfig::record_calls`] is off.
    pub fn call_log(&self) -> Vec<CallRecord> {
        lock(&self.shared.log).clone()
    }

    /// The most calls the log shows for (`appid`, `path`) in one aligned window, faulted and
    /// refused calls included: what a proxy's quota gate let through. Always 0 when
    /// [`StandInConfig::record_calls`] is off.
    pub fn max_calls_in_any_window(&self, appid: &str, path: &str) -> u64 {
        let window = self.shared.window;
        let mut per_window: HashMap<u128, u64> = HashMap::new();
        for record in lock(&self.shared.log).iter() {
            if record.path == path && record.appid.as_deref() == Some(appid) {
                *per_window
                    .entry(window_index(record.at, window))
                    .or_default() += 1;
            }
        }
        per_window.into_values().max().unwrap_or(0)
    }

    /// Zeroes every counter and empties the call log. Upstream state is kept: spent codes,
    /// quota counts and queued faults stay as they are.
    pub fn reset_counters(&self) {
        let counters = &self.shared.counters;
        counters.total.store(0, Ordering::Relaxed);
        counters.by_path.clear();
        counters.by_code.clear();
        counters.by_errcode.clear();
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

/// State shared by the handle and every connection task.
struct Shared {
    apps: HashMap<String, AppEntry>,
    components: HashMap<String, ComponentEntry>,
    window: Duration,
    record_calls: bool,
    latency_nanos: AtomicU64,
    /// Executed calls allowed per window, or [`UNLIMITED`].
    quota: AtomicU64,
    /// Added to the system clock. Always zero outside this module's tests, which move it to
    /// cross quota windows without sleeping.
    clock_skew_nanos: AtomicU64,
    faults: FaultQueue,
    /// appid -> executed-call count of the current window, one slot per quota endpoint.
    quota_windows: DashMap<String, [WindowCount; QUOTA_ENDPOINTS]>,
    /// (appid, `js_code`) of every code exchanged successfully: codes are single-use per app.
    used_codes: DashSet<(String, String)>,
    counters: Counters,
    log: Mutex<Vec<CallRecord>>,
}

struct AppEntry {
    secret: String,
    unionid: bool,
}

struct ComponentEntry {
    access_token: String,
    authorized_appids: HashSet<String>,
}

impl Shared {
    fn new(config: StandInConfig) -> Self {
        let apps = config
            .apps
            .into_iter()
            .map(|app| {
                let entry = AppEntry {
                    secret: app.secret,
                    unionid: app.unionid,
                };
                (app.appid, entry)
            })
            .collect();
        let components = config
            .components
            .into_iter()
            .map(|component| {
                let entry = ComponentEntry {
                    access_token: component.component_access_token,
                    authorized_appids: component.authorized_appids.into_iter().collect(),
                };
                (component.component_appid, entry)
            })
            .collect();
        Shared {
            apps,
            components,
            window: config.window,
            record_calls: config.record_calls,
            latency_nanos: AtomicU64::new(duration_nanos(config.latency)),
            quota: AtomicU64::new(config.quota_per_window.map_or(UNLIMITED, u64::from)),
            clock_skew_nanos: AtomicU64::new(0),
            faults: FaultQueue::default(),
            quota_windows: DashMap::new(),
            used_codes: DashSet::new(),
            counters: Counters::default(),
            log: Mutex::new(Vec::new()),
        }
    }

    fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_nanos(self.clock_skew_nanos.load(Ordering::Relaxed))
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Runs the call as WeChat would: validation, quota, then the endpoint's effect.
    fn execute(&self, route: Route, call: &ReceivedCall<'_>) -> Answer {
        let params = match &call.params {
            Ok(params) => params,
            Err(errcode) => return Answer::error(*errcode),
        };
        match route {
            Route::CodeSession => self.code_session(params, call.at),
            Route::ComponentCodeSession => self.component_code_session(params, call.at),
            Route::Token | Route::StableToken => self.client_credential(route, params, call.at),
            Route::Echo => echo(call.parts, call.body),
        }
    }

    fn code_session(&self, params: &Params<'_>, at: SystemTime) -> Answer {
        let Some(appid) = params.appid.as_deref() else {
            return Answer::error(41002);
        };
        let Some(secret) = params.secret.as_deref() else {
            return Answer::error(41004);
        };
        let Some(js_code) = params.js_code.as_deref() else {
            return Answer::error(41008);
        };
        if params.grant_type.as_deref() != Some("authorization_code") {
            return Answer::error(40002);
        }
        let Some(app) = self.apps.get(appid) else {
            return Answer::error(40013);
        };
        if app.secret != secret {
            return Answer::error(40125);
        }
        if !self.admit(Route::CodeSession, appid, at) {
            return Answer::error(45011);
        }
        self.exchange_code(appid, js_code, app.unionid)
    }

    fn component_code_session(&self, params: &Params<'_>, at: SystemTime) -> Answer {
        let Some(token) = params.component_access_token.as_deref() else {
            return Answer::error(41021);
        };
        let Some(appid) = params.appid.as_deref() else {
            return Answer::error(41002);
        };
        let Some(js_code) = params.js_code.as_deref() else {
            return Answer::error(41008);
        };
        if params.grant_type.as_deref() != Some("authorization_code") {
            return Answer::error(40002);
        }
        // WeChat does not say whether the platform or its token was wrong: both are 40001.
        let component = params
            .component_appid
            .as_deref()
            .and_then(|component_appid| self.components.get(component_appid))
            .filter(|component| component.access_token == token);
        let Some(component) = component else {
            return Answer::error(40001);
        };
        if !component.authorized_appids.contains(appid) {
            return Answer::error(61003);
        }
        if !self.admit(Route::ComponentCodeSession, appid, at) {
            return Answer::error(45011);
        }
        // An app may authorize a platform without being registered here; it then has no unionid.
        let unionid = self.apps.get(appid).is_some_and(|app| app.unionid);
        self.exchange_code(appid, js_code, unionid)
    }

    /// `/cgi-bin/token` and `/cgi-bin/stable_token` check the same things in the same order.
    fn client_credential(&self, route: Route, params: &Params<'_>, at: SystemTime) -> Answer {
        if params.grant_type.as_deref() != Some("client_credential") {
            return Answer::error(40002);
        }
        let Some(appid) = params.appid.as_deref() else {
            return Answer::error(41002);
        };
        let Some(secret) = params.secret.as_deref() else {
            return Answer::error(41004);
        };
        let Some(app) = self.apps.get(appid) else {
            return Answer::error(40013);
        };
        if app.secret != secret {
            return Answer::error(40125);
        }
        if !self.admit(route, appid, at) {
            return Answer::error(45011);
        }
        let body = format!(
            r#"{{"access_token":"{}","expires_in":7200}}"#,
            random_chars(96)
        );
        Answer::success(body)
    }

    /// The code's own checks, once the caller is known to be allowed to exchange it.
    fn exchange_code(&self, appid: &str, js_code: &str, unionid: bool) -> Answer {
        if js_code.starts_with("invalid") {
            return Answer::error(40029);
        }
        if js_code.starts_with("risky") {
            return Answer::error(40226);
        }
        // One atomic insert both checks and spends the code, so two concurrent exchanges of
        // one code cannot both succeed.
        if !self
            .used_codes
            .insert((appid.to_owned(), js_code.to_owned()))
        {
            return Answer::error(40163);
        }
        // Every interpolated value comes from a fixed alphabet (base64, base64url), so the
        // JSON needs no escaping and can be formatted directly; this is the benchmarks' path.
        let session_key = random_session_key();
        let openid = derived_id(b'o', appid, js_code);
        let body = if unionid {
            // The unionid names the user across apps, so it depends on the code alone.
            let unionid = derived_id(b'u', "", js_code);
            format!(
                r#"{{"session_key":"{session_key}","openid":"{openid}","unionid":"{unionid}"}}"#
            )
        } else {
            format!(r#"{{"session_key":"{session_key}","openid":"{openid}"}}"#)
        };
        Answer::success(body)
    }

    /// Counts one executed call against the quota of (appid, route); false if over it.
    fn admit(&self, route: Route, appid: &str, at: SystemTime) -> bool {
        let limit = self.quota.load(Ordering::Relaxed);
        if limit == UNLIMITED {
            return true;
        }
        let Some(slot) = route.quota_slot() else {
            return true;
        };
        let window = window_index(at, self.window);
        // Look up by &str first: the appid is almost always known, and this avoids allocating.
        if let Some(mut counts) = self.quota_windows.get_mut(appid) {
            return counts[slot].admit(window, limit);
        }
        let mut counts = self.quota_windows.entry(appid.to_owned()).or_default();
        counts[slot].admit(window, limit)
    }

    fn record(&self, at: SystemTime, path: &str, appid: Option<&str>, errcode: Option<i64>) {
        if let Some(errcode) = errcode {
            bump(&self.counters.by_errcode, &errcode);
        }
        if self.record_calls {
            let record = CallRecord {
                at,
                path: path.to_owned(),
                appid: appid.map(str::to_owned),
                errcode,
            };
            lock(&self.log).push(record);
        }
    }
}

/// Executed calls of one (appid, endpoint) in the window `window`.
#[derive(Clone, Copy, Default)]
struct WindowCount {
    window: u128,
    executed: u64,
}

impl WindowCount {
    fn admit(&mut self, window: u128, limit: u64) -> bool {
        if self.window != window {
            // A fixed window: the count starts over at each boundary, as WeChat's minute does.
            self.window = window;
            self.executed = 0;
        }
        if self.executed >= limit {
            return false;
        }
        self.executed += 1;
        true
    }
}

/// Index of the aligned window `at` falls in: windows start at multiples of `window` since the
/// UNIX epoch.
fn window_index(at: SystemTime, window: Duration) -> u128 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_nanos() / window.as_nanos().max(1)
}

/// Faults waiting for the next calls.
#[derive(Default)]
struct FaultQueue {
    /// Mirrors `queue.len()` so calls can skip the mutex when nothing is queued, which is
    /// nearly always.
    pending: AtomicUsize,
    queue: Mutex<VecDeque<Fault>>,
}

impl FaultQueue {
    fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        // Collected first so the caller's iterator does not run under the lock.
        let faults: Vec<Fault> = faults.into_iter().collect();
        let mut queue = lock(&self.queue);
        queue.extend(faults);
        self.pending.store(queue.len(), Ordering::Release);
    }

    fn pop(&self) -> Option<Fault> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = lock(&self.queue);
        let fault = queue.pop_front();
        self.pending.store(queue.len(), Ordering::Release);
        fault
    }

    fn len(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// What the stand-in counts about every call. Sharded maps and atomics, so counting does not
/// serialize concurrent calls.
#[derive(Default)]
struct Counters {
    total: AtomicU64,
    by_path: DashMap<String, AtomicU64>,
    by_code: DashMap<String, AtomicU64>,
    by_errcode: DashMap<i64, AtomicU64>,
}

fn bump<K, Q>(map: &DashMap<K, AtomicU64>, key: &Q)
where
    K: Borrow<Q> + Eq + Hash,
    Q: ToOwned<Owned = K> + Eq + Hash + ?Sized,
{
    // The key is usually there already: a shared lock on one shard and no allocation.
    if let Some(counter) = map.get(key) {
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    map.entry(key.to_owned())
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
}

fn read_counter<K, Q>(map: &DashMap<K, AtomicU64>, key: &Q) -> u64
where
    K: Borrow<Q> + Eq + Hash,
    Q: Eq + Hash + ?Sized,
{
    map.get(key)
        .map_or(0, |counter| counter.load(Ordering::Relaxed))
}

/// Locks a mutex even if a panicking thread poisoned it: the data (a log, a queue) stays
/// usable, and a test double must not turn one failure into many.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Which behaviour a path gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    CodeSession,
    ComponentCodeSession,
    Token,
    StableToken,
    Echo,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            JSCODE2SESSION_PATH => Route::CodeSession,
            COMPONENT_JSCODE2SESSION_PATH => Route::ComponentCodeSession,
            TOKEN_PATH => Route::Token,
            STABLE_TOKEN_PATH => Route::StableToken,
            _ => Route::Echo,
        }
    }

    /// Slot in [`Shared::quota_windows`]; the echo has no quota.
    fn quota_slot(self) -> Option<usize> {
        match self {
            Route::CodeSession => Some(0),
            Route::ComponentCodeSession => Some(1),
            Route::Token => Some(2),
            Route::StableToken => Some(3),
            Route::Echo => None,
        }
    }

    fn exchanges_codes(self) -> bool {
        matches!(self, Route::CodeSession | Route::ComponentCodeSession)
    }
}

/// The parameters WeChat's endpoints read: an empty value counts as missing, and of a
/// repeated parameter the first one wins. Read with `form_urlencoded` directly, not with
/// wxgate's own reader, so that a bug there is not repeated here.
#[derive(Default)]
struct Params<'a> {
    appid: Option<Cow<'a, str>>,
    secret: Option<Cow<'a, str>>,
    js_code: Option<Cow<'a, str>>,
    grant_type: Option<Cow<'a, str>>,
    component_appid: Option<Cow<'a, str>>,
    component_access_token: Option<Cow<'a, str>>,
}

impl<'a> Params<'a> {
    fn parse(query: &'a str) -> Params<'a> {
        let mut params = Params::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*name {
                "appid" => &mut params.appid,
                "secret" => &mut params.secret,
                "js_code" => &mut params.js_code,
                "grant_type" => &mut params.grant_type,
                "component_appid" => &mut params.component_appid,
                "component_access_token" => &mut params.component_access_token,
                _ => continue,
            };
            if slot.is_none() && !value.is_empty() {
                *slot = Some(value);
            }
        }
        params
    }
}

/// The JSON body of `/cgi-bin/stable_token`; `Err(errcode)` when WeChat would refuse it
/// before looking at the fields.
fn stable_token_params<'a>(body: &'a [u8]) -> Result<Params<'a>, i64> {
    #[derive(serde::Deserialize)]
    struct StableTokenBody<'b> {
        #[serde(borrow)]
        grant_type: Option<Cow<'b, str>>,
        #[serde(borrow)]
        appid: Option<Cow<'b, str>>,
        #[serde(borrow)]
        secret: Option<Cow<'b, str>>,
    }
    let parsed: StableTokenBody<'a> = serde_json::from_slice(body).map_err(|_| 47001_i64)?;
    let present = |value: Option<Cow<'a, str>>| value.filter(|value| !value.is_empty());
    Ok(Params {
        grant_type: present(parsed.grant_type),
        appid: present(parsed.appid),
        secret: present(parsed.secret),
        ..Params::default()
    })
}

/// One call as received, before the stand-in decides what to do with it.
struct ReceivedCall<'a> {
    at: SystemTime,
    parts: &'a Parts,
    body: &'a Bytes,
    /// The endpoint's parameters, or the errcode WeChat answers before reading them.
    params: Result<Params<'a>, i64>,
}

/// What the stand-in decided to answer.
enum Answer {
    /// HTTP 200 with a WeChat JSON body; `errcode` 0 for a success body.
    Wechat {
        errcode: i64,
        body: String,
    },
    /// A finished response without an errcode (echo, or a refusal of the echo's own input).
    Other(Response<Full<Bytes>>),
    BadGateway,
    Reset,
    Hang,
}

impl Answer {
    fn success(body: String) -> Answer {
        Answer::Wechat { errcode: 0, body }
    }

    fn error(errcode: i64) -> Answer {
        let body = format!(
            r#"{{"errcode":{errcode},"errmsg":"{}, rid: {}"}}"#,
            errmsg(errcode),
            request_id()
        );
        Answer::Wechat { errcode, body }
    }

    fn errcode(&self) -> Option<i64> {
        match self {
            Answer::Wechat { errcode, .. } => Some(*errcode),
            _ => None,
        }
    }
}

/// The text WeChat puts before `, rid: …` for each errcode the stand-in answers.
fn errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40013 => "invalid appid",
        40029 => "invalid code",
        40125 => "invalid appsecret",
        40163 => "code been used",
        40226 => "code blocked",
        41002 => "appid missing",
        41004 => "appsecret missing",
        41008 => "missing code",
        41021 => "missing component_access_token",
        43002 => "require POST method",
        45009 => "reach max api daily quota limit",
        45011 => "api minute-quota reach limit, must slower, retry next minute",
        47001 => "data format error",
        61003 => "component is not authorized by this account",
        _ => "unknown error",
    }
}

/// Returned by the service to make hyper close the connection without answering.
#[derive(Debug)]
struct CloseConnection(&'static str);

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CloseConnection {}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    // Owned here so that aborting this task (StandIn's Drop) aborts every connection with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, builder.clone(), Arc::clone(&shared)));
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

async fn serve_connection(
    stream: TcpStream,
    builder: auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
) {
    // Small request/answer exchanges: Nagle's algorithm would only add latency to the baseline.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    // The connection ends in an error when the client goes away or a fault closes it on
    // purpose; neither is worth reporting from a test double.
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, CloseConnection> {
    let at = shared.now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    shared.counters.total.fetch_add(1, Ordering::Relaxed);
    bump(&shared.counters.by_path, path);
    // Taken at arrival so faults are consumed in the order calls arrive.
    let fault = shared.faults.pop();

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
    let params = match route {
        Route::StableToken if parts.method != Method::POST => Err(43002),
        Route::StableToken => stable_token_params(&body),
        _ => Ok(Params::parse(parts.uri.query().unwrap_or_default())),
    };
    let call = ReceivedCall {
        at,
        parts: &parts,
        body: &body,
        params,
    };
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
    let appid = params.and_then(|params| params.appid.as_deref());
    shared.record(at, path, appid, answer.errcode());

    let wait = shared.latency().saturating_add(extra_delay);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }

    match answer {
        Answer::Wechat { body, .. } => Ok(json_response(body)),
        Answer::Other(response) => Ok(response),
        Answer::BadGateway => Ok(bad_gateway()),
        Answer::Reset => Err(CloseConnection("fault injected: reset")),
        // Pending until the client gives up and the connection task is dropped, or until
        // the stand-in is dropped.
        Answer::Hang => std::future::pending().await,
    }
}

fn json_response(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn bad_gateway() -> Response<Full<Bytes>> {
    // What an nginx in front of an unreachable backend sends.
    const BODY: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                        <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
                        </body>\r\n</html>\r\n";
    let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

const ECHO_STATUS: HeaderName = HeaderName::from_static("x-echo-status");
const ECHO_CONTENT_TYPE: HeaderName = HeaderName::from_static("x-echo-content-type");
const ECHO_CUSTOM: HeaderName = HeaderName::from_static("x-echo-custom");
const ECHO_METHOD: HeaderName = HeaderName::from_static("x-echo-method");

/// The echo answer described on [`StandIn`].
fn echo(parts: &Parts, body: &Bytes) -> Answer {
    let status = match parts.headers.get(&ECHO_STATUS) {
        None => StatusCode::OK,
        Some(value) => {
            // 1xx are not final answers and hyper would not send them as one.
            let status = value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u16>().ok())
                .filter(|code| (200..=599).contains(code))
                .and_then(|code| StatusCode::from_u16(code).ok());
            let Some(status) = status else {
                return Answer::Other(plain(
                    StatusCode::BAD_REQUEST,
                    "x-echo-status must be a status code from 200 to 599",
                ));
            };
            status
        }
    };

    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.get_mut(name.as_str()) {
            // A repeated header reads as one, joined the way HTTP allows.
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(
                    name.as_str().to_owned(),
                    serde_json::Value::String(value.into_owned()),
                );
            }
        }
    }
    let uri = parts.uri.path_and_query().map_or_else(
        || parts.uri.path(),
        |path_and_query| path_and_query.as_str(),
    );
    let echoed = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
        "body_len": body.len(),
    });

    let mut response = Response::new(Full::new(Bytes::from(echoed.to_string())));
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    let content_type = parts
        .headers
        .get(&ECHO_CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(JSON_CONTENT_TYPE));
    response_headers.insert(CONTENT_TYPE, content_type);
    response_headers.insert(ECHO_CUSTOM, HeaderValue::from_static("stand-in"));
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        response_headers.insert(ECHO_METHOD, method);
    }
    Answer::Other(response)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A fresh `session_key` shaped like WeChat's: 16 random bytes in padded base64 (24 chars).
fn random_session_key() -> String {
    let bytes = fastrand::u128(..).to_le_bytes();
    let mut key = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let sextets = [
            b0 >> 2,
            (b0 & 0x03) << 4 | b1 >> 4,
            (b1 & 0x0f) << 2 | b2 >> 6,
            b2 & 0x3f,
        ];
        // A chunk of n bytes carries n + 1 sextets; the rest is padding.
        for (index, sextet) in sextets.iter().enumerate() {
            if index <= chunk.len() {
                key.push(char::from(BASE64[usize::from(*sextet)]));
            } else {
                key.push('=');
            }
        }
    }
    key
}

/// `len` random characters from the base64url alphabet.
fn random_chars(len: usize) -> String {
    (0..len)
        .map(|_| char::from(BASE64_URL[fastrand::usize(..BASE64_URL.len())]))
        .collect()
}

/// A request id like WeChat's `rid`: different for every answer.
fn request_id() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Truncated on purpose: the first group only has to look like a timestamp.
    format!(
        "{:08x}-{:08x}-{:08x}",
        seconds as u32,
        fastrand::u32(..),
        fastrand::u32(..)
    )
}

/// `o` followed by 26 base64url characters, the same for the same (`scope`, `js_code`) in
/// every run and process, so tests can predict an openid. `salt` keeps openids and unionids of
/// one code apart.
fn derived_id(salt: u8, scope: &str, js_code: &str) -> String {
    // FNV-1a, then SplitMix64 to spread it over 156 bits: both fixed algorithms, unlike
    // std's hasher whose output may change between Rust releases.
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in [salt, 0xff]
        .iter()
        .chain(scope.as_bytes())
        .chain(&[0xff])
        .chain(js_code.as_bytes())
    {
        state ^= u64::from(*byte);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut id = String::with_capacity(27);
    id.push('o');
    let mut bits = 0_u64;
    let mut available = 0;
    for _ in 0..26 {
        if available < 6 {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut mixed = state;
            mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bits = mixed ^ (mixed >> 31);
            available = 64;
        }
        id.push(char::from(BASE64_URL[(bits & 0x3f) as usize]));
        bits >>= 6;
        available -= 6;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in and a client that talks to it over loopback.
    struct Harness {
        upstream: StandIn,
        client: reqwest::Client,
    }

    /// What came back, read whole so assertions can look at any part.
    struct Reply {
        status: u16,
        headers: reqwest::header::HeaderMap,
        text: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text))
        }

        fn errcode(&self) -> Option<i64> {
            self.json().get("errcode").and_then(Value::as_i64)
        }

        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
        }

        /// A success body of a code exchange: the fields WeChat sends and no errcode.
        fn assert_session(&self) {
            assert_eq!(self.status, 200, "{}", self.text);
            assert_eq!(self.header("content-type"), JSON_CONTENT_TYPE);
            let body = self.json();
            assert!(body.get("errcode").is_none(), "{}", self.text);
            let session_key = body["session_key"].as_str().unwrap_or_default();
            assert_eq!(session_key.len(), 24, "{}", self.text);
            let openid = body["openid"].as_str().unwrap_or_default();
            assert!(
                openid.starts_with('o') && openid.len() == 27,
                "{}",
                self.text
            );
        }

        /// A WeChat error answer with this errcode and a rid.
        fn assert_error(&self, errcode: i64) {
            assert_eq!(self.status, 200, "{}", self.text);
            assert_eq!(self.header("content-type"), JSON_CONTENT_TYPE);
            assert_eq!(self.errcode(), Some(errcode), "{}", self.text);
            let errmsg = self.json()["errmsg"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(errmsg.contains(", rid: "), "{errmsg}");
        }
    }

    impl Harness {
        async fn start(config: StandInConfig) -> Harness {
            let upstream = StandIn::start(config).await.expect("stand-in starts");
            let client = reqwest::Client::builder()
                // An http_proxy in the environment must not catch loopback calls.
                .no_proxy()
                .build()
                .expect("client builds");
            Harness { upstream, client }
        }

        async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
            let response = request.send().await.expect("stand-in answers");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let text = response.text().await.expect("body reads");
            Reply {
                status,
                headers,
                text,
            }
        }

        async fn get(&self, path_and_query: &str) -> Reply {
            let url = format!("{}{path_and_query}", self.upstream.base_url());
            self.send(self.client.get(url)).await
        }

        async fn exchange(&self, js_code: &str) -> Reply {
            self.get(&code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, js_code))
                .await
        }

        async fn component_exchange(&self, appid: &str, token: &str, js_code: &str) -> Reply {
            let query = query(&[
                ("appid", appid),
                ("js_code", js_code),
                ("grant_type", "authorization_code"),
                ("component_appid", DEFAULT_COMPONENT_APPID),
                ("component_access_token", token),
            ]);
            self.get(&format!("{COMPONENT_JSCODE2SESSION_PATH}?{query}"))
                .await
        }
    }

    fn query(pairs: &[(&str, &str)]) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    fn code_session(appid: &str, secret: &str, js_code: &str) -> String {
        let query = query(&[
            ("appid", appid),
            ("secret", secret),
            ("js_code", js_code),
            ("grant_type", "authorization_code"),
        ]);
        format!("{JSCODE2SESSION_PATH}?{query}")
    }

    /// Sends one request on a fresh connection and reads until the server closes it. A reset
    /// may surface as a read error rather than EOF; either way, what was read is returned.
    async fn raw_call(addr: SocketAddr, path_and_query: &str) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        let request =
            format!("GET {path_and_query} HTTP/1.1\r\nhost: stand-in\r\nconnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("request written");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    }

    fn advance_clock(upstream: &StandIn, by: Duration) {
        upstream
            .shared
            .clock_skew_nanos
            .fetch_add(duration_nanos(by), Ordering::Relaxed);
    }

    /// Moves the stand-in's clock to one second after the start of its next window, so a few
    /// quick calls cannot straddle a window boundary.
    fn align_clock_to_window(upstream: &StandIn) {
        let window = upstream.shared.window.as_nanos();
        let now = upstream
            .shared
            .now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let to_next_window = window - now % window;
        let skew = to_next_window + Duration::from_secs(1).as_nanos();
        advance_clock(upstream, Duration::from_nanos(skew as u64));
    }

    fn config_with_quota(quota: u32) -> StandInConfig {
        StandInConfig {
            quota_per_window: Some(quota),
            ..StandInConfig::default()
        }
    }

    #[tokio::test]
    async fn a_code_can_be_exchanged_once() {
        let h = Harness::start(StandInConfig::default()).await;

        let first = h.exchange("code-once").await;
        first.assert_session();
        assert!(first.json()["unionid"].is_string(), "{}", first.text);

        let second = h.exchange("code-once").await;
        second.assert_error(40163);
        assert!(second.text.contains("code been used"), "{}", second.text);

        assert_eq!(h.upstream.code_calls("code-once"), 2);
        assert_eq!(h.upstream.answers(0), 1);
        assert_eq!(h.upstream.answers(40163), 1);
    }

    #[tokio::test]
    async fn concurrent_exchanges_of_one_code_succeed_once() {
        let h = Arc::new(Harness::start(StandInConfig::default()).await);
        let mut exchanges = JoinSet::new();
        for _ in 0..16 {
            let h = Arc::clone(&h);
            exchanges.spawn(async move { h.exchange("code-raced").await.errcode() });
        }
        let mut successes = 0;
        while let Some(errcode) = exchanges.join_next().await {
            match errcode.expect("exchange task") {
                None => successes += 1,
                Some(errcode) => assert_eq!(errcode, 40163),
            }
        }
        assert_eq!(successes, 1);
        assert_eq!(h.upstream.code_calls("code-raced"), 16);
    }

    #[tokio::test]
    async fn openid_is_derived_from_the_code_and_session_key_is_fresh() {
        let h = Harness::start(StandInConfig::default()).await;
        let first = h.exchange("code-same-user").await.json();
        h.upstream.forget_used_codes();
        let again = h.exchange("code-same-user").await.json();
        let other = h.exchange("code-other-user").await.json();

        assert_eq!(first["openid"], again["openid"]);
        assert_eq!(first["unionid"], again["unionid"]);
        assert_ne!(first["session_key"], again["session_key"]);
        assert_ne!(first["openid"], other["openid"]);
    }

    #[tokio::test]
    async fn invalid_and_risky_codes_are_refused() {
        let h = Harness::start(StandInConfig::default()).await;
        h.exchange("invalid-123").await.assert_error(40029);
        h.exchange("risky-123").await.assert_error(40226);
        assert_eq!(h.upstream.answers(0), 0);
    }

    #[tokio::test]
    async fn code_session_checks_its_parameters_in_order() {
        let h = Harness::start(StandInConfig::default()).await;
        let grant = ("grant_type", "authorization_code");
        let cases: [(&[(&str, &str)], i64); 7] = [
            (&[("secret", "s"), ("js_code", "c"), grant], 41002),
            (
                &[("appid", ""), ("secret", "s"), ("js_code", "c"), grant],
                41002,
            ),
            (&[("appid", DEFAULT_APPID), ("js_code", "c"), grant], 41004),
            (&[("appid", DEFAULT_APPID), ("secret", "s"), grant], 41008),
            (
                &[("appid", DEFAULT_APPID), ("secret", "s"), ("js_code", "c")],
                40002,
            ),
            (
                &[
                    ("appid", "wx-unknown"),
                    ("secret", "s"),
                    ("js_code", "c"),
                    grant,
                ],
                40013,
            ),
            (
                &[
                    ("appid", DEFAULT_APPID),
                    ("secret", "wrong"),
                    ("js_code", "c"),
                    grant,
                ],
                40125,
            ),
        ];
        for (pairs, errcode) in cases {
            let reply = h
                .get(&format!("{JSCODE2SESSION_PATH}?{}", query(pairs)))
                .await;
            reply.assert_error(errcode);
        }
        // None of those spent the code.
        h.exchange("c").await.assert_session();
    }

    #[tokio::test]
    async fn wrong_secret_is_40125_and_spends_nothing() {
        let h = Harness::start(StandInConfig::default()).await;
        h.get(&code_session(DEFAULT_APPID, "not-the-secret", "code-w"))
            .await
            .assert_error(40125);
        h.exchange("code-w").await.assert_session();
    }

    #[tokio::test]
    async fn an_app_without_unionid_gets_none() {
        let mut config = StandInConfig::default();
        config.apps.push(StandInApp {
            appid: "wx-plain".to_owned(),
            secret: "plain-secret".to_owned(),
            unionid: false,
        });
        let h = Harness::start(config).await;
        let reply = h
            .get(&code_session("wx-plain", "plain-secret", "code-p"))
            .await;
        reply.assert_session();
        assert!(reply.json().get("unionid").is_none(), "{}", reply.text);
    }

    #[tokio::test]
    async fn component_exchange_checks_the_platform_and_its_authorization() {
        let mut config = StandInConfig::default();
        config.apps.push(StandInApp {
            appid: "wx-not-authorized".to_owned(),
            secret: "secret".to_owned(),
            unionid: false,
        });
        let h = Harness::start(config).await;
        let token = DEFAULT_COMPONENT_ACCESS_TOKEN;

        h.component_exchange(DEFAULT_APPID, "", "code-c")
            .await
            .assert_error(41021);
        h.component_exchange(DEFAULT_APPID, "stale-token", "code-c")
            .await
            .assert_error(40001);
        h.component_exchange("wx-not-authorized", token, "code-c")
            .await
            .assert_error(61003);
        let unknown_platform = query(&[
            ("appid", DEFAULT_APPID),
            ("js_code", "code-c"),
            ("grant_type", "authorization_code"),
            ("component_appid", "wx-unknown-platform"),
            ("component_access_token", token),
        ]);
        h.get(&format!(
            "{COMPONENT_JSCODE2SESSION_PATH}?{unknown_platform}"
        ))
        .await
        .assert_error(40001);

        let reply = h.component_exchange(DEFAULT_APPID, token, "code-c").await;
        reply.assert_session();
        assert!(reply.json()["unionid"].is_string(), "{}", reply.text);
        // Both endpoints share the app's spent codes.
        h.exchange("code-c").await.assert_error(40163);
        assert_eq!(h.upstream.code_calls("code-c"), 6);
    }

    #[tokio::test]
    async fn quota_refuses_with_45011_without_spending_the_code() {
        let h = Harness::start(config_with_quota(2)).await;
        align_clock_to_window(&h.upstream);

        h.exchange("code-q1").await.assert_session();
        h.exchange("code-q2").await.assert_session();
        let refused = h.exchange("code-q3").await;
        refused.assert_error(45011);
        assert!(refused.text.contains("minute-quota"), "{}", refused.text);

        // The quota is per path: the token endpoint of the same app still has its own.
        let token = query(&[
            ("grant_type", "client_credential"),
            ("appid", DEFAULT_APPID),
            ("secret", DEFAULT_APP_SECRET),
        ]);
        let token = h.get(&format!("{TOKEN_PATH}?{token}")).await;
        assert!(token.json()["access_token"].is_string(), "{}", token.text);

        // Raising the quota lets the refused code through: 45011 did not spend it.
        h.upstream.set_quota(Some(3));
        h.exchange("code-q3").await.assert_session();
        h.exchange("code-q4").await.assert_error(45011);
    }

    #[tokio::test]
    async fn quota_starts_over_in_the_next_aligned_window() {
        let h = Harness::start(config_with_quota(1)).await;
        align_clock_to_window(&h.upstream);

        h.exchange("code-w1").await.assert_session();
        h.exchange("code-w2").await.assert_error(45011);
        advance_clock(&h.upstream, h.upstream.shared.window);
        h.exchange("code-w2").await.assert_session();

        // Two calls arrived in the first window (one refused), one in the second.
        let max = h
            .upstream
            .max_calls_in_any_window(DEFAULT_APPID, JSCODE2SESSION_PATH);
        assert_eq!(max, 2);
        assert_eq!(
            h.upstream
                .max_calls_in_any_window("wx-other", JSCODE2SESSION_PATH),
            0
        );
    }

    #[tokio::test]
    async fn json_faults_answer_in_order_and_spend_nothing() {
        let h = Harness::start(StandInConfig::default()).await;
        h.upstream
            .push_faults([Fault::Busy, Fault::MinuteQuota, Fault::DailyQuota]);
        h.upstream.push_faults([Fault::BadGateway]);
        assert_eq!(h.upstream.pending_faults(), 4);

        h.exchange("code-f").await.assert_error(-1);
        h.exchange("code-f").await.assert_error(45011);
        let daily = h.exchange("code-f").await;
        daily.assert_error(45009);
        assert!(daily.text.contains("daily quota"), "{}", daily.text);
        let bad_gateway = h.exchange("code-f").await;
        assert_eq!(bad_gateway.status, 502);
        assert_eq!(bad_gateway.header("content-type"), "text/html");
        assert!(bad_gateway.text.contains("502 Bad Gateway"));
        // The queue is empty and the code was never spent.
        assert_eq!(h.upstream.pending_faults(), 0);
        h.exchange("code-f").await.assert_session();

        let errcodes: Vec<Option<i64>> = h
            .upstream
            .call_log()
            .iter()
            .map(|record| record.errcode)
            .collect();
        assert_eq!(
            errcodes,
            [Some(-1), Some(45011), Some(45009), None, Some(0)]
        );
        assert_eq!(h.upstream.code_calls("code-f"), 5);
    }

    #[tokio::test]
    async fn reset_closes_the_connection_without_spending_the_code() {
        let h = Harness::start(StandInConfig::default()).await;
        let path = code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-r");

        h.upstream.push_faults([Fault::Reset]);
        let answer = raw_call(h.upstream.addr(), &path).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

        // The same raw call without a fault is answered, and the code was still unspent.
        let answer = raw_call(h.upstream.addr(), &path).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("session_key"), "{answer}");
        assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 2);
    }

    #[tokio::test]
    async fn lost_answer_spends_the_code_but_answers_nothing() {
        let h = Harness::start(StandInConfig::default()).await;
        h.upstream.push_faults([Fault::LostAnswer]);
        let path = code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-l");
        let answer = raw_call(h.upstream.addr(), &path).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

        h.exchange("code-l").await.assert_error(40163);
        assert_eq!(h.upstream.answers(0), 0);
    }

    #[tokio::test]
    async fn hang_keeps_the_call_pending_until_the_client_gives_up() {
        let h = Harness::start(StandInConfig::default()).await;
        h.upstream.push_faults([Fault::Hang]);
        let url = format!(
            "{}{}",
            h.upstream.base_url(),
            code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-h")
        );
        let error = h
            .client
            .get(url)
            .timeout(Duration::from_millis(200))
            .send()
            .await
            .expect_err("a hung call is never answered");
        assert!(error.is_timeout(), "{error}");

        // Other calls are not held up, and the hung one spent nothing.
        h.exchange("code-h").await.assert_session();
        assert_eq!(h.upstream.code_calls("code-h"), 2);
    }

    #[tokio::test]
    async fn delay_and_latency_hold_the_answer_back() {
        let h = Harness::start(StandInConfig::default()).await;

        h.upstream
            .push_faults([Fault::Delay(Duration::from_millis(150))]);
        let started = Instant::now();
        h.exchange("code-d1").await.assert_session();
        assert!(started.elapsed() >= Duration::from_millis(150));

        h.upstream.set_latency(Duration::from_millis(100));
        let started = Instant::now();
        h.exchange("code-d2").await.assert_session();
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn tokens_are_issued_and_checked() {
        let h = Harness::start(StandInConfig::default()).await;
        let credentials = |grant_type: &str, secret: &str| {
            let query = query(&[
                ("grant_type", grant_type),
                ("appid", DEFAULT_APPID),
                ("secret", secret),
            ]);
            format!("{TOKEN_PATH}?{query}")
        };
        let token = h
            .get(&credentials("client_credential", DEFAULT_APP_SECRET))
            .await;
        assert_eq!(token.header("content-type"), JSON_CONTENT_TYPE);
        assert_eq!(token.json()["expires_in"], 7200);
        let first = token.json()["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!first.is_empty(), "{}", token.text);
        let again = h
            .get(&credentials("client_credential", DEFAULT_APP_SECRET))
            .await;
        assert_ne!(again.json()["access_token"].as_str(), Some(first.as_str()));

        h.get(&credentials("authorization_code", DEFAULT_APP_SECRET))
            .await
            .assert_error(40002);
        h.get(&credentials("client_credential", "wrong"))
            .await
            .assert_error(40125);
        h.get(&format!(
            "{TOKEN_PATH}?grant_type=client_credential&secret=s"
        ))
        .await
        .assert_error(41002);
    }

    #[tokio::test]
    async fn stable_token_reads_a_json_body() {
        let h = Harness::start(StandInConfig::default()).await;
        let url = format!("{}{STABLE_TOKEN_PATH}", h.upstream.base_url());
        let body = |secret: &str| {
            serde_json::json!({
                "grant_type": "client_credential",
                "appid": DEFAULT_APPID,
                "secret": secret,
                "force_refresh": false,
            })
            .to_string()
        };

        let token = h
            .send(h.client.post(&url).body(body(DEFAULT_APP_SECRET)))
            .await;
        assert!(token.json()["access_token"].is_string(), "{}", token.text);
        assert_eq!(token.json()["expires_in"], 7200);

        h.send(h.client.post(&url).body(body("wrong")))
            .await
            .assert_error(40125);
        h.send(h.client.post(&url).body("appid=not-json"))
            .await
            .assert_error(47001);
        h.send(h.client.get(&url)).await.assert_error(43002);

        let appids: Vec<Option<String>> = h
            .upstream
            .call_log()
            .into_iter()
            .map(|record| record.appid)
            .collect();
        let named = Some(DEFAULT_APPID.to_owned());
        assert_eq!(appids, [named.clone(), named, None, None]);
    }

    #[tokio::test]
    async fn other_paths_are_echoed() {
        let h = Harness::start(StandInConfig::default()).await;
        let path_and_query = "/wxa/getwxacode?access_token=T&b=%2F+x&a=1&a=2";
        let request = h
            .client
            .post(format!("{}{path_and_query}", h.upstream.base_url()))
            .header("x-echo-status", "201")
            .header("x-echo-content-type", "text/plain")
            .header("x-custom", "one")
            .header("X-Repeated", "a")
            .header("x-repeated", "b")
            .body(&b"h\xc3\xa9llo \xff"[..]);
        let reply = h.send(request).await;

        assert_eq!(reply.status, 201);
        assert_eq!(reply.header("content-type"), "text/plain");
        assert_eq!(reply.header("x-echo-custom"), "stand-in");
        assert_eq!(reply.header("x-echo-method"), "POST");
        let echoed = reply.json();
        assert_eq!(echoed["method"], "POST");
        assert_eq!(echoed["uri"], path_and_query);
        assert_eq!(echoed["headers"]["x-custom"], "one");
        assert_eq!(echoed["headers"]["x-repeated"], "a, b");
        assert_eq!(echoed["body"], "héllo \u{fffd}");
        assert_eq!(echoed["body_len"], 8);

        let plain_get = h.get("/anything").await;
        assert_eq!(plain_get.status, 200);
        assert_eq!(plain_get.header("content-type"), JSON_CONTENT_TYPE);
        assert_eq!(plain_get.json()["method"], "GET");
        assert_eq!(plain_get.json()["body_len"], 0);

        let bad_status = h
            .send(
                h.client
                    .get(format!("{}/anything", h.upstream.base_url()))
                    .header("x-echo-status", "abc"),
            )
            .await;
        assert_eq!(bad_status.status, 400);

        assert_eq!(h.upstream.calls("/wxa/getwxacode"), 1);
        assert_eq!(h.upstream.calls("/anything"), 2);
        assert_eq!(h.upstream.total_calls(), 3);
    }

    #[tokio::test]
    async fn faults_and_latency_apply_to_the_echo() {
        let h = Harness::start(StandInConfig::default()).await;
        h.upstream.push_faults([Fault::Busy, Fault::BadGateway]);
        h.get("/echo").await.assert_error(-1);
        assert_eq!(h.get("/echo").await.status, 502);

        h.upstream.set_latency(Duration::from_millis(50));
        let started = Instant::now();
        let echoed = h.get("/echo").await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(echoed.json()["uri"], "/echo");
    }

    #[tokio::test]
    async fn http2_is_served_too() {
        let h = Harness::start(StandInConfig::default()).await;
        let client = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .expect("client builds");
        let response = client
            .get(format!("{}/h2", h.upstream.base_url()))
            .send()
            .await
            .expect("stand-in answers");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status().as_u16(), 200);
    }

    #[tokio::test]
    async fn counters_log_and_reset() {
        let h = Harness::start(StandInConfig::default()).await;
        h.exchange("code-k").await.assert_session();
        h.exchange("code-k").await.assert_error(40163);
        h.get("/echo?appid=wx-echo").await;

        assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 2);
        assert_eq!(h.upstream.total_calls(), 3);
        let log = h.upstream.call_log();
        assert_eq!(log.len(), 3);
        assert_eq!(log[0].path, JSCODE2SESSION_PATH);
        assert_eq!(log[0].appid.as_deref(), Some(DEFAULT_APPID));
        assert_eq!(log[1].errcode, Some(40163));
        assert_eq!(log[2].appid.as_deref(), Some("wx-echo"));
        assert_eq!(log[2].errcode, None);
        assert!(log[0].at <= log[1].at && log[1].at <= log[2].at);

        h.upstream.reset_counters();
        assert_eq!(h.upstream.total_calls(), 0);
        assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 0);
        assert_eq!(h.upstream.code_calls("code-k"), 0);
        assert_eq!(h.upstream.answers(0), 0);
        assert!(h.upstream.call_log().is_empty());
        // Spent codes are upstream state, not counters.
        h.exchange("code-k").await.assert_error(40163);
    }

    #[tokio::test]
    async fn without_record_calls_the_counters_still_count() {
        let config = StandInConfig {
            record_calls: false,
            ..StandInConfig::default()
        };
        let h = Harness::start(config).await;
        h.exchange("code-n").await.assert_session();
        assert!(h.upstream.call_log().is_empty());
        assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 1);
        assert_eq!(h.upstream.answers(0), 1);
    }

    #[tokio::test]
    async fn dropping_the_stand_in_stops_the_server() {
        let upstream = StandIn::start(StandInConfig::default())
            .await
            .expect("stand-in starts");
        let addr = upstream.addr();
        let answer = raw_call(addr, "/before-drop").await;
        assert!(answer.starts_with(b"HTTP/1.1 200"));

        drop(upstream);
        // The abort takes effect when the runtime next polls the accept task; give it turns
        // rather than wall-clock time.
        let mut refused = false;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the listener still accepts after drop");
    }
}
