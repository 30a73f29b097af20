//! What the stand-in is told at start: the mini programs and third-party platforms it knows,
//! its quota and window, its latency, the faults it draws at random, whether it logs every
//! call, and whether it speaks HTTPS.

use std::time::Duration;

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
    /// Per (appid, API path) quota: at most this many *executed* calls per window; `None` =
    /// unlimited.
    pub quota_per_window: Option<u32>,
    /// Window length for the quota (WeChat: 60 s). Windows are fixed and aligned to multiples of
    /// the window length since the UNIX epoch (`SystemTime`), as WeChat counts calendar minutes.
    /// A zero window is treated as one nanosecond.
    pub window: Duration,
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
    /// that the app authorized, no quota, 60 s windows, no latency, no random faults, calls
    /// recorded, tokens as WeChat's (7200 s, the previous one working 300 s more), plain HTTP.
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
