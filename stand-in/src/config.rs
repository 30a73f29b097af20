//! What the stand-in is told at start: the mini programs and third-party platforms it knows,
//! its limits ([`RateLimit`], [`ApiLimits`] per API, the per-user limit of code exchanges,
//! the day and the monthly budget of `clear_quota`), its latency, the faults it draws at random,
//! whether it logs every call, and whether it speaks HTTPS.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::{
    FaultMix, DEFAULT_APPID, DEFAULT_APP_SECRET, DEFAULT_COMPONENT_ACCESS_TOKEN,
    DEFAULT_COMPONENT_APPID, DEFAULT_COMPONENT_APPSECRET,
};

/// What the stand-in knows about the apps and platforms calling it, and how it behaves.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// Registered mini programs: appid -> app secret.
    pub apps: Vec<StandInApp>,
    /// Third-party platforms: `component_appid`, its `component_access_token`, and the appids
    /// authorized to it.
    pub components: Vec<StandInComponent>,
    /// The default rate limit of the stand-in's code-exchange and token endpoints, per
    /// (appid, API path): at most this many *executed* calls per [`window`](Self::window);
    /// `None` = unlimited. [`api_limits`](Self::api_limits) overrides it per API and appid;
    /// other APIs have no rate limit unless `api_limits` gives one.
    pub quota_per_window: Option<u32>,
    /// Window length for the quota (WeChat: 60 s). Windows are fixed and aligned to multiples of
    /// the window length since the UNIX epoch (`SystemTime`), as WeChat counts calendar minutes.
    /// A zero window is treated as one nanosecond. It is also the window of the stats page's
    /// `windows`.
    pub window: Duration,
    /// Rate limits (with their own windows), limits for calls on an account's behalf and
    /// daily limits, per API path, for every appid or one (see [`ApiLimits`]). Empty by
    /// default. [`StandIn::set_rate_limit`](crate::StandIn::set_rate_limit) and the like
    /// change them while the stand-in runs.
    pub api_limits: Vec<ApiLimits>,
    /// The limit of each WeChat user's code exchanges, per (appid, exchange path): WeChat's
    /// 100 a minute by default, answered with the same 45011 as the appid's limit. Only
    /// codes that name their user are counted (`u<user>_<anything>`, as
    /// [`StandIn::issue_code`](crate::StandIn::issue_code) makes them); any other code is
    /// its own user's only code. `None`: no per-user limit.
    pub user_rate_limit: Option<RateLimit>,
    /// Length of the day of the daily limits (WeChat: 86,400 s); tests shorten it. Days are
    /// aligned to multiples of it since the epoch on a clock [`day_offset`](Self::day_offset)
    /// ahead of UTC. A zero day is treated as one nanosecond.
    pub day: Duration,
    /// How far ahead of UTC the day's clock is: WeChat's days end at midnight Beijing time
    /// (UTC+8), so 8 hours.
    pub day_offset: Duration,
    /// How many times a month each account may `clear_quota` (the three clear endpoints
    /// together, per appid or `component_appid`) before 48006: WeChat's 10.
    pub clear_quota_per_month: u32,
    /// Added before every answer.
    pub latency: Duration,
    /// Faults drawn at random by the calls that find no queued fault
    /// ([`StandIn::push_faults`](crate::StandIn::push_faults)); empty: none.
    pub random_faults: FaultMix,
    /// Keep a log of every call (time, path, appid, errcode); benches turn it off.
    pub record_calls: bool,
    /// How long an access token (and a component token) works: WeChat's 7200 s; tests
    /// shorten it. At least one second (`expires_in` counts whole seconds).
    pub token_lifetime: Duration,
    /// How long the previous token still works after a fetch mints a new one: WeChat's
    /// five minutes.
    pub token_overlap: Duration,
    /// Serve HTTPS with this certificate instead of plain HTTP; `None` = plain HTTP.
    pub tls: Option<StandInTls>,
}

/// The certificate the stand-in serves HTTPS with, as PEM text (what certificate tools write).
#[derive(Clone)]
pub struct StandInTls {
    /// The leaf certificate first, then any intermediates.
    pub certificate_chain_pem: String,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key_pem: String,
}

impl std::fmt::Debug for StandInTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A key, even a test one, is not printed.
        f.debug_struct("StandInTls").finish_non_exhaustive()
    }
}

impl Default for StandInConfig {
    /// One app ([`DEFAULT_APPID`], with a unionid), one platform ([`DEFAULT_COMPONENT_APPID`])
    /// that the app authorized, no quota, 60 s windows, no per-API limits, WeChat's per-user
    /// limit (100 code exchanges a minute), days of 86,400 s ending at midnight UTC+8, 10
    /// clears a month, no latency, no random faults, calls recorded, tokens as WeChat's
    /// (7200 s, the previous one working 300 s more), plain HTTP.
    fn default() -> Self {
        StandInConfig {
            apps: vec![StandInApp {
                appid: DEFAULT_APPID.to_owned(),
                secret: DEFAULT_APP_SECRET.to_owned(),
                unionid: true,
            }],
            components: vec![StandInComponent {
                component_appid: DEFAULT_COMPONENT_APPID.to_owned(),
                component_appsecret: DEFAULT_COMPONENT_APPSECRET.to_owned(),
                component_access_token: DEFAULT_COMPONENT_ACCESS_TOKEN.to_owned(),
                authorized_appids: vec![DEFAULT_APPID.to_owned()],
            }],
            quota_per_window: None,
            window: Duration::from_secs(60),
            api_limits: Vec::new(),
            user_rate_limit: Some(RateLimit::new(100, Duration::from_secs(60))),
            day: Duration::from_secs(86_400),
            day_offset: Duration::from_secs(8 * 3600),
            clear_quota_per_month: 10,
            latency: Duration::ZERO,
            random_faults: FaultMix::default(),
            record_calls: true,
            tls: None,
            token_lifetime: Duration::from_secs(7200),
            token_overlap: Duration::from_secs(300),
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
    /// Its secret, checked by `/cgi-bin/component/api_component_token`.
    pub component_appsecret: String,
    /// A `component_access_token` the stand-in always accepts for this platform (besides
    /// the tokens its token fetch mints).
    pub component_access_token: String,
    /// Mini programs that authorized the platform; others get 61003.
    pub authorized_appids: Vec<String>,
}

/// `call_count` calls per `window`, as quota/get's `rate_limit` reports it
/// (`{"call_count":N,"refresh_second":S}`). Windows are aligned to multiples of their length
/// since the UNIX epoch, as WeChat counts calendar minutes.
///
/// Written `N/S` on the command line ([`FromStr`]): `20/3` is 20 calls per 3 s window, `S`
/// may be fractional.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls executed per window; past it, 45011.
    pub call_count: u32,
    /// The window's length. A zero window is treated as one nanosecond.
    pub window: Duration,
}

impl RateLimit {
    /// `call_count` calls per `window`.
    pub fn new(call_count: u32, window: Duration) -> RateLimit {
        RateLimit { call_count, window }
    }

    /// The window in whole seconds as quota/get reports it (`refresh_second`): rounded up,
    /// at least 1. A test that reads quota/get should give whole-second windows.
    pub fn refresh_second(&self) -> u64 {
        let nanos = self.window.as_nanos().max(1);
        u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
    }
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<RateLimit, String> {
        let (count, secs) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not CALLS/SECONDS, e.g. 20/3"))?;
        let call_count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{text:?}: {count:?} is not a whole number of calls"))?;
        let window = secs
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|secs| *secs > 0.0)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("{text:?}: {secs:?} is not a number of seconds above 0"))?;
        Ok(RateLimit { call_count, window })
    }
}

impl fmt::Display for RateLimit {
    /// The form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.call_count, self.window.as_secs_f64())
    }
}

/// The limits of one API path, for every appid (`appid: None`) or for one. A figure left
/// `None` is inherited: an appid's entry from the path's entry for every appid, which in turn
/// from [`StandInConfig::quota_per_window`] (rate limit only, and only for the stand-in's
/// code-exchange and token endpoints); `component_rate_limit` from the `rate_limit` in force.
///
/// Naming a path that the stand-in otherwise echoes makes it an API that checks its token:
/// it needs an `access_token` (or `component_access_token`) the stand-in minted, is counted
/// under that token's appid, and is echoed only when admitted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApiLimits {
    /// The API path, without the query (e.g. `/wxa/getwxacode`).
    pub path: String,
    /// The appid these figures are for; `None`: every appid without an entry of its own.
    pub appid: Option<String>,
    /// Calls the account itself may make per window.
    pub rate_limit: Option<RateLimit>,
    /// Calls a third-party platform may make on the account's behalf per window, counted
    /// apart from the account's own: calls with an `authorizer_access_token` (minted by
    /// `/cgi-bin/component/api_authorizer_token`) and the platform's code exchange.
    pub component_rate_limit: Option<RateLimit>,
    /// Calls executed per day (own and on the account's behalf together); past it, 45009.
    pub daily_limit: Option<u64>,
}

impl ApiLimits {
    /// No figures yet for `path`, for every appid.
    pub fn new(path: impl Into<String>) -> ApiLimits {
        ApiLimits {
            path: path.into(),
            ..ApiLimits::default()
        }
    }

    /// For this appid only.
    pub fn for_appid(mut self, appid: impl Into<String>) -> ApiLimits {
        self.appid = Some(appid.into());
        self
    }

    /// With this rate limit.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> ApiLimits {
        self.rate_limit = Some(limit);
        self
    }

    /// With this rate limit for calls on the account's behalf.
    pub fn with_component_rate_limit(mut self, limit: RateLimit) -> ApiLimits {
        self.component_rate_limit = Some(limit);
        self
    }

    /// With this daily limit.
    pub fn with_daily_limit(mut self, limit: u64) -> ApiLimits {
        self.daily_limit = Some(limit);
        self
    }
}

impl Serialize for RateLimit {
    /// As quota/get writes it: `{"call_count":N,"refresh_second":S}`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("RateLimit", 2)?;
        out.serialize_field("call_count", &self.call_count)?;
        out.serialize_field("refresh_second", &self.refresh_second())?;
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_reads_as_the_command_line_writes_it() {
        let limit: RateLimit = "20/3".parse().unwrap();
        assert_eq!(limit, RateLimit::new(20, Duration::from_secs(3)));
        assert_eq!(limit.to_string().parse::<RateLimit>(), Ok(limit));
        assert_eq!(
            "5/0.5".parse::<RateLimit>().unwrap().window,
            Duration::from_millis(500)
        );
        assert_eq!("5/0.5".parse::<RateLimit>().unwrap().refresh_second(), 1);
        for bad in ["20", "x/3", "20/0", "20/-1", "-1/3", "20/NaN"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }
}
