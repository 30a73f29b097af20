//! What WeChat does with a call, over the state every connection shares: the parameter checks
//! of each endpoint in WeChat's order, the per-(appid, API) quota over windows aligned to the
//! epoch, single-use codes, tokens, and the record of what was answered.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::{DashMap, DashSet};

use crate::answer::{echo, Answer};
use crate::fault::{FaultMix, FaultQueue};
use crate::ids::{derived_id, random_session_key};
use crate::record::{bump, CallRecord, Counters};
use crate::request::{Params, ReceivedCall};
use crate::tokens::{TokenKind, Tokens};
use crate::{
    duration_nanos, lock, StandInConfig, CHECKED_API_PATH, COMPONENT_JSCODE2SESSION_PATH,
    COMPONENT_TOKEN_PATH, JSCODE2SESSION_PATH, STABLE_TOKEN_PATH, TOKEN_PATH,
};

/// `quota` value meaning "no quota", so the quota fits in one atomic.
pub(crate) const UNLIMITED: u64 = u64::MAX;

/// The endpoints that have a quota, in the order of [`Shared::quota_windows`]' slots.
const QUOTA_ENDPOINTS: usize = 5;

/// State shared by the handle and every connection task.
pub(crate) struct Shared {
    apps: HashMap<String, AppEntry>,
    components: HashMap<String, ComponentEntry>,
    pub(crate) window: Duration,
    pub(crate) record_calls: bool,
    pub(crate) latency_nanos: AtomicU64,
    /// Executed calls allowed per window, or [`UNLIMITED`].
    pub(crate) quota: AtomicU64,
    /// Added to the system clock. Always zero outside this crate's tests, which move it to
    /// cross quota windows without sleeping.
    pub(crate) clock_skew_nanos: AtomicU64,
    pub(crate) faults: FaultQueue,
    /// Drawn from by calls that find `faults` empty.
    pub(crate) random_faults: FaultMix,
    /// appid -> executed-call count of the current window, one slot per quota endpoint.
    quota_windows: DashMap<String, [WindowCount; QUOTA_ENDPOINTS]>,
    /// (appid, `js_code`) of every code exchanged successfully: codes are single-use per app.
    pub(crate) used_codes: DashSet<(String, String)>,
    pub(crate) counters: Counters,
    pub(crate) log: Mutex<Vec<CallRecord>>,
    /// The server name (SNI) each TLS connection asked for, in handshake order.
    pub(crate) server_names: Mutex<Vec<Option<String>>>,
    /// Every access token minted, and which is current.
    pub(crate) tokens: Tokens,
}

struct AppEntry {
    secret: String,
    unionid: bool,
}

struct ComponentEntry {
    appsecret: String,
    access_token: String,
    authorized_appids: HashSet<String>,
}

impl Shared {
    pub(crate) fn new(config: StandInConfig) -> Self {
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
                    appsecret: component.component_appsecret,
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
            random_faults: config.random_faults,
            quota_windows: DashMap::new(),
            used_codes: DashSet::new(),
            counters: Counters::default(),
            log: Mutex::new(Vec::new()),
            server_names: Mutex::new(Vec::new()),
            tokens: Tokens::new(config.token_lifetime, config.token_overlap),
        }
    }

    pub(crate) fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_nanos(self.clock_skew_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Runs the call as WeChat would: validation, quota, then the endpoint's effect.
    pub(crate) fn execute(&self, route: Route, call: &ReceivedCall<'_>) -> Answer {
        let params = match &call.params {
            Ok(params) => params,
            Err(errcode) => return Answer::error(*errcode),
        };
        match route {
            Route::CodeSession => self.code_session(params, call.at),
            Route::ComponentCodeSession => self.component_code_session(params, call.at),
            Route::Token | Route::StableToken => self.client_credential(route, params, call.at),
            Route::ComponentToken => self.component_token(params, call.at),
            Route::CheckedApi => self.checked_api(params, call.at),
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
        // The token is the configured one, or one the platform's token fetch minted and that
        // still works.
        let component_appid = params.component_appid.as_deref().unwrap_or_default();
        let component = self.components.get(component_appid).filter(|component| {
            component.access_token == token
                || self
                    .tokens
                    .check(token, &[TokenKind::Component], Some(component_appid), at)
                    .is_ok()
        });
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
        let (token, expires_in) = match route {
            Route::StableToken => self.tokens.stable(appid, params.force_refresh, at),
            _ => self.tokens.mint(TokenKind::Token, appid, at),
        };
        self.count_token_fetch(route, appid);
        // Tokens are base64url characters: the JSON needs no escaping.
        let body = format!(r#"{{"access_token":"{token}","expires_in":{expires_in}}}"#);
        Answer::success(body)
    }

    /// `/cgi-bin/component/api_component_token`. The stand-in's choices where WeChat does
    /// not document an order: 41002, 41004, 61006 (no ticket), 40013, 40125.
    fn component_token(&self, params: &Params<'_>, at: SystemTime) -> Answer {
        let Some(component_appid) = params.component_appid.as_deref() else {
            return Answer::error(41002);
        };
        let Some(secret) = params.component_appsecret.as_deref() else {
            return Answer::error(41004);
        };
        if params.component_verify_ticket.is_none() {
            return Answer::error(61006);
        }
        let Some(component) = self.components.get(component_appid) else {
            return Answer::error(40013);
        };
        if component.appsecret != secret {
            return Answer::error(40125);
        }
        if !self.admit(Route::ComponentToken, component_appid, at) {
            return Answer::error(45011);
        }
        let (token, expires_in) = self.tokens.mint(TokenKind::Component, component_appid, at);
        self.count_token_fetch(Route::ComponentToken, component_appid);
        let body = format!(r#"{{"component_access_token":"{token}","expires_in":{expires_in}}}"#);
        Answer::success(body)
    }

    /// [`CHECKED_API_PATH`]: an API call that only checks its `access_token`.
    fn checked_api(&self, params: &Params<'_>, at: SystemTime) -> Answer {
        let Some(token) = params.access_token.as_deref() else {
            return Answer::error(41001);
        };
        let kinds = [TokenKind::Token, TokenKind::Stable];
        match self.tokens.check(token, &kinds, None, at) {
            Ok(()) => Answer::success(r#"{"ip_list":["101.226.103.1","101.226.103.2"]}"#.into()),
            Err(errcode) => Answer::error(errcode),
        }
    }

    fn count_token_fetch(&self, route: Route, appid: &str) {
        let path = route.path().unwrap_or_default();
        bump(&self.counters.token_fetches, &format!("{path} {appid}"));
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

    pub(crate) fn record(
        &self,
        at: SystemTime,
        path: &str,
        appid: Option<&str>,
        errcode: Option<i64>,
    ) {
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
pub(crate) fn window_index(at: SystemTime, window: Duration) -> u128 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_nanos() / window.as_nanos().max(1)
}

/// Which behaviour a path gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    CodeSession,
    ComponentCodeSession,
    Token,
    StableToken,
    ComponentToken,
    /// [`CHECKED_API_PATH`].
    CheckedApi,
    Echo,
}

impl Route {
    /// The route of a request path (without its query).
    pub(crate) fn of(path: &str) -> Route {
        match path {
            JSCODE2SESSION_PATH => Route::CodeSession,
            COMPONENT_JSCODE2SESSION_PATH => Route::ComponentCodeSession,
            TOKEN_PATH => Route::Token,
            STABLE_TOKEN_PATH => Route::StableToken,
            COMPONENT_TOKEN_PATH => Route::ComponentToken,
            CHECKED_API_PATH => Route::CheckedApi,
            _ => Route::Echo,
        }
    }

    /// The path of a token route.
    fn path(self) -> Option<&'static str> {
        match self {
            Route::Token => Some(TOKEN_PATH),
            Route::StableToken => Some(STABLE_TOKEN_PATH),
            Route::ComponentToken => Some(COMPONENT_TOKEN_PATH),
            _ => None,
        }
    }

    /// Slot in [`Shared::quota_windows`]; the echo has no quota.
    fn quota_slot(self) -> Option<usize> {
        match self {
            Route::CodeSession => Some(0),
            Route::ComponentCodeSession => Some(1),
            Route::Token => Some(2),
            Route::StableToken => Some(3),
            Route::ComponentToken => Some(4),
            Route::CheckedApi | Route::Echo => None,
        }
    }

    /// Whether this is a platform's token fetch (which names no `appid`).
    pub(crate) fn is_component_token(self) -> bool {
        self == Route::ComponentToken
    }

    /// Whether calls on this route spend a `js_code`.
    pub(crate) fn exchanges_codes(self) -> bool {
        matches!(self, Route::CodeSession | Route::ComponentCodeSession)
    }
}
