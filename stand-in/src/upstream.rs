//! What WeChat does with a call, over the state every connection shares: the parameter checks
//! of each endpoint in WeChat's order, the limits (`limits.rs`) counted once a call passes
//! them, single-use codes, tokens, and the record of what was answered. The quota
//! management endpoints (quota/get, `clear_quota`) are in `openapi.rs`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashSet;

use crate::answer::{echo, Answer};
use crate::fault::{FaultMix, FaultQueue};
use crate::ids::{code_user, derived_id, random_session_key, user_openid, user_unionid};
use crate::limits::{KeyCall, Limits};
use crate::record::{bump, CallRecord, Counters};
use crate::request::{Params, ReceivedCall, Route};
use crate::tokens::{TokenKind, Tokens};
use crate::{duration_nanos, lock, StandInConfig};

/// State shared by the handle and every connection task.
pub(crate) struct Shared {
    pub(crate) apps: HashMap<String, AppEntry>,
    pub(crate) components: HashMap<String, ComponentEntry>,
    pub(crate) record_calls: bool,
    pub(crate) latency_nanos: AtomicU64,
    /// Rate and daily limits, and what was counted against them.
    pub(crate) limits: Limits,
    /// Added to the system clock. Always zero outside this crate's tests, which move it to
    /// cross quota windows without sleeping.
    pub(crate) clock_skew_nanos: AtomicU64,
    pub(crate) faults: FaultQueue,
    /// Drawn from by calls that find `faults` empty.
    pub(crate) random_faults: FaultMix,
    /// (appid, `js_code`) of every code exchanged successfully: codes are single-use per app.
    pub(crate) used_codes: DashSet<(String, String)>,
    pub(crate) counters: Counters,
    pub(crate) log: Mutex<Vec<CallRecord>>,
    /// The server name (SNI) each TLS connection asked for, in handshake order.
    pub(crate) server_names: Mutex<Vec<Option<String>>>,
    /// Every access token minted, and which is current.
    pub(crate) tokens: Tokens,
}

pub(crate) struct AppEntry {
    pub(crate) secret: String,
    unionid: bool,
}

pub(crate) struct ComponentEntry {
    appsecret: String,
    access_token: String,
    authorized_appids: HashSet<String>,
}

/// The account an API call is made for, as its token says.
pub(crate) struct Caller {
    pub(crate) appid: String,
    /// Made with an `authorizer_access_token`: a platform on the account's behalf.
    pub(crate) via_component: bool,
}

impl Shared {
    pub(crate) fn new(config: StandInConfig) -> Self {
        let limits = Limits::new(&config);
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
            record_calls: config.record_calls,
            latency_nanos: AtomicU64::new(duration_nanos(config.latency)),
            limits,
            clock_skew_nanos: AtomicU64::new(0),
            faults: FaultQueue::default(),
            random_faults: config.random_faults,
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

    /// Runs the call as WeChat would: validation, limits, then the endpoint's effect.
    pub(crate) fn execute(&self, route: Route, call: &ReceivedCall<'_>) -> Answer {
        let params = match &call.params {
            Ok(params) => params,
            Err(errcode) => return Answer::error(*errcode),
        };
        let answer = match route {
            Route::CodeSession => self.code_session(call, params),
            Route::ComponentCodeSession => self.component_code_session(call, params),
            Route::Token | Route::StableToken => self.client_credential(route, call, params),
            Route::ComponentToken => self.component_token(call, params),
            Route::AuthorizerToken => self.authorizer_token(call, params),
            Route::CheckedApi => self.checked_api(call, params),
            Route::QuotaGet => self.quota_get(call, params),
            Route::ClearQuota => self.clear_quota(call, params),
            Route::ClearQuotaV2 => self.clear_quota_v2(call, params),
            Route::ComponentClearQuota => self.component_clear_quota(call, params),
            Route::Echo => self.echo_api(call, params),
        };
        answer.unwrap_or_else(Answer::error)
    }

    fn code_session(&self, call: &ReceivedCall<'_>, params: &Params<'_>) -> Result<Answer, i64> {
        let appid = params.appid.as_deref().ok_or(41002)?;
        let secret = params.secret.as_deref().ok_or(41004)?;
        let js_code = params.js_code.as_deref().ok_or(41008)?;
        if params.grant_type.as_deref() != Some("authorization_code") {
            return Err(40002);
        }
        let app = self.apps.get(appid).ok_or(40013)?;
        if app.secret != secret {
            return Err(40125);
        }
        self.admit(call, Route::CodeSession, appid, false, code_user(js_code))?;
        self.exchange_code(appid, js_code, app.unionid)
    }

    fn component_code_session(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let token = params.component_access_token.as_deref().ok_or(41021)?;
        let appid = params.appid.as_deref().ok_or(41002)?;
        let js_code = params.js_code.as_deref().ok_or(41008)?;
        if params.grant_type.as_deref() != Some("authorization_code") {
            return Err(40002);
        }
        // WeChat does not say whether the platform or its token was wrong: both are 40001.
        let component_appid = params.component_appid.as_deref().unwrap_or_default();
        let component = self
            .platform(component_appid, token, call.at)
            .ok_or(40001)?;
        if !component.authorized_appids.contains(appid) {
            return Err(61003);
        }
        // The platform exchanges on the account's behalf.
        let user = code_user(js_code);
        self.admit(call, Route::ComponentCodeSession, appid, true, user)?;
        // An app may authorize a platform without being registered here; it then has no unionid.
        let unionid = self.apps.get(appid).is_some_and(|app| app.unionid);
        self.exchange_code(appid, js_code, unionid)
    }

    /// `/cgi-bin/token` and `/cgi-bin/stable_token` check the same things in the same order.
    fn client_credential(
        &self,
        route: Route,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        if params.grant_type.as_deref() != Some("client_credential") {
            return Err(40002);
        }
        let appid = params.appid.as_deref().ok_or(41002)?;
        let secret = params.secret.as_deref().ok_or(41004)?;
        let app = self.apps.get(appid).ok_or(40013)?;
        if app.secret != secret {
            return Err(40125);
        }
        self.admit(call, route, appid, false, None)?;
        let (token, expires_in) = match route {
            Route::StableToken => self.tokens.stable(appid, params.force_refresh, call.at),
            _ => self.tokens.mint(TokenKind::Token, appid, call.at),
        };
        self.count_token_fetch(call.path(), appid);
        // Tokens are base64url characters: the JSON needs no escaping.
        let body = format!(r#"{{"access_token":"{token}","expires_in":{expires_in}}}"#);
        Ok(Answer::success(body))
    }

    /// `/cgi-bin/component/api_component_token`. The stand-in's choices where WeChat does
    /// not document an order: 41002, 41004, 61006 (no ticket), 40013, 40125.
    fn component_token(&self, call: &ReceivedCall<'_>, params: &Params<'_>) -> Result<Answer, i64> {
        let component_appid = params.component_appid.as_deref().ok_or(41002)?;
        let secret = params.component_appsecret.as_deref().ok_or(41004)?;
        if params.component_verify_ticket.is_none() {
            return Err(61006);
        }
        let component = self.components.get(component_appid).ok_or(40013)?;
        if component.appsecret != secret {
            return Err(40125);
        }
        self.admit(call, Route::ComponentToken, component_appid, false, None)?;
        let (token, expires_in) = self
            .tokens
            .mint(TokenKind::Component, component_appid, call.at);
        self.count_token_fetch(call.path(), component_appid);
        let body = format!(r#"{{"component_access_token":"{token}","expires_in":{expires_in}}}"#);
        Ok(Answer::success(body))
    }

    /// `/cgi-bin/component/api_authorizer_token`: a platform's token for one account that
    /// authorized it. The stand-in's choices: 41002 (no `component_appid`), 41021, 40001,
    /// 41002 (no `authorizer_appid`), 61023 (no refresh token; any given one is accepted and
    /// handed back), 61003. Counted as the platform's call.
    fn authorizer_token(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let component_appid = params.component_appid.as_deref().ok_or(41002)?;
        let token = params.component_access_token.as_deref().ok_or(41021)?;
        let component = self
            .platform(component_appid, token, call.at)
            .ok_or(40001)?;
        let appid = params.authorizer_appid.as_deref().ok_or(41002)?;
        let refresh_token = params.authorizer_refresh_token.as_deref().ok_or(61023)?;
        if !component.authorized_appids.contains(appid) {
            return Err(61003);
        }
        self.admit(call, Route::AuthorizerToken, component_appid, false, None)?;
        let (token, expires_in) = self.tokens.mint(TokenKind::Authorizer, appid, call.at);
        self.count_token_fetch(call.path(), appid);
        let body = serde_json::json!({
            "authorizer_access_token": token,
            "expires_in": expires_in,
            "authorizer_refresh_token": refresh_token,
        });
        Ok(Answer::success(body.to_string()))
    }

    /// [`CHECKED_API_PATH`](crate::CHECKED_API_PATH): an API call that only checks its
    /// `access_token`.
    fn checked_api(&self, call: &ReceivedCall<'_>, params: &Params<'_>) -> Result<Answer, i64> {
        let caller = self.api_caller(params, call.at, false)?;
        self.admit(
            call,
            Route::CheckedApi,
            &caller.appid,
            caller.via_component,
            None,
        )?;
        Ok(Answer::success(
            r#"{"ip_list":["101.226.103.1","101.226.103.2"]}"#.into(),
        ))
    }

    /// Any other path: echoed. When the configuration names it, it is an account's API as
    /// WeChat's are: its token is checked and the call counted, and it is echoed only when
    /// admitted.
    fn echo_api(&self, call: &ReceivedCall<'_>, params: &Params<'_>) -> Result<Answer, i64> {
        if self.limits.names(call.path()) {
            let caller = self.api_caller(params, call.at, true)?;
            self.admit(call, Route::Echo, &caller.appid, caller.via_component, None)?;
        }
        Ok(echo(call.parts, call.body))
    }

    /// Whose API call this is, from its `access_token` (an account's token, or a platform's
    /// `authorizer_access_token` for the account), or, where `platform_tokens`, its
    /// `component_access_token` (the platform's own call). 41001 without a token, 40001 for
    /// one the stand-in did not mint or that was replaced, 42001 for an expired one.
    pub(crate) fn api_caller(
        &self,
        params: &Params<'_>,
        at: SystemTime,
        platform_tokens: bool,
    ) -> Result<Caller, i64> {
        if let Some(token) = params.access_token.as_deref() {
            let (kind, appid) = self.tokens.owner(token, &TokenKind::ACCESS, at)?;
            let via_component = kind == TokenKind::Authorizer;
            return Ok(Caller {
                appid,
                via_component,
            });
        }
        match params.component_access_token.as_deref() {
            Some(token) if platform_tokens => {
                let configured = self
                    .components
                    .iter()
                    .find(|(_, component)| component.access_token == token);
                let appid = match configured {
                    Some((component_appid, _)) => component_appid.clone(),
                    None => self.tokens.owner(token, &[TokenKind::Component], at)?.1,
                };
                Ok(Caller {
                    appid,
                    via_component: false,
                })
            }
            _ => Err(41001),
        }
    }

    /// The platform `component_appid`, if `token` is its configured token or one its token
    /// fetch minted and that still works.
    pub(crate) fn platform(
        &self,
        component_appid: &str,
        token: &str,
        at: SystemTime,
    ) -> Option<&ComponentEntry> {
        self.components.get(component_appid).filter(|component| {
            component.access_token == token
                || self
                    .tokens
                    .check(token, &[TokenKind::Component], Some(component_appid), at)
                    .is_ok()
        })
    }

    /// Counts one executed call of (`appid`, the call's path) against its limits; the
    /// errcode WeChat answers when a limit refuses it.
    pub(crate) fn admit(
        &self,
        call: &ReceivedCall<'_>,
        route: Route,
        appid: &str,
        via_component: bool,
        user: Option<&str>,
    ) -> Result<(), i64> {
        self.limits.admit(&KeyCall {
            path: call.path(),
            appid,
            via_component,
            default_limited: route.default_limited(),
            user,
            at: call.at,
        })
    }

    /// The appid the call log names for a call: the `appid` it gives, the platform of a
    /// platform's own call, else whoever the token it presents was minted for.
    pub(crate) fn logged_appid<'p>(
        &self,
        route: Route,
        params: &'p Params<'_>,
    ) -> Option<Cow<'p, str>> {
        if let Some(appid) = params.appid.as_deref() {
            return Some(Cow::Borrowed(appid));
        }
        if route.names_a_platform() {
            return params.component_appid.as_deref().map(Cow::Borrowed);
        }
        let token = params
            .access_token
            .as_deref()
            .or(params.component_access_token.as_deref())?;
        let configured = self
            .components
            .iter()
            .find(|(_, component)| component.access_token == token);
        if let Some((component_appid, _)) = configured {
            return Some(Cow::Owned(component_appid.clone()));
        }
        self.tokens.minted_for(token).map(Cow::Owned)
    }

    fn count_token_fetch(&self, path: &str, appid: &str) {
        bump(&self.counters.token_fetches, &format!("{path} {appid}"));
    }

    /// The code's own checks, once the caller is known to be allowed to exchange it.
    fn exchange_code(&self, appid: &str, js_code: &str, unionid: bool) -> Result<Answer, i64> {
        if js_code.starts_with("invalid") {
            return Err(40029);
        }
        if js_code.starts_with("risky") {
            return Err(40226);
        }
        // One atomic insert both checks and spends the code, so two concurrent exchanges of
        // one code cannot both succeed.
        if !self
            .used_codes
            .insert((appid.to_owned(), js_code.to_owned()))
        {
            return Err(40163);
        }
        // Every interpolated value comes from a fixed alphabet (base64, base64url), so the
        // JSON needs no escaping and can be formatted directly; this is the benchmarks' path.
        let session_key = random_session_key();
        let user = code_user(js_code);
        let openid = match user {
            Some(user) => user_openid(appid, user),
            None => derived_id(b'o', appid, js_code),
        };
        let body = if unionid {
            // The unionid names the user across apps, so it depends on the user (or the code)
            // alone.
            let unionid = match user {
                Some(user) => user_unionid(user),
                None => derived_id(b'u', "", js_code),
            };
            format!(
                r#"{{"session_key":"{session_key}","openid":"{openid}","unionid":"{unionid}"}}"#
            )
        } else {
            format!(r#"{{"session_key":"{session_key}","openid":"{openid}"}}"#)
        };
        Ok(Answer::success(body))
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

/// Index of the aligned window `at` falls in: windows start at multiples of `window` since the
/// UNIX epoch.
pub(crate) fn window_index(at: SystemTime, window: Duration) -> u128 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_nanos() / window.as_nanos().max(1)
}
