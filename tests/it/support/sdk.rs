//! Two SDK-style token clients, as backends run them against WeChat, written here to show
//! they run unchanged through wxgate:
//!
//! - **wechatpy** style: fetches a token when it has none or it is about to expire, caches
//!   it for `expires_in`, and on 40001, 40014 or 42001 drops it, fetches again and retries
//!   the call once. No lock: concurrent callers may fetch at the same time.
//! - **WxJava** style: the same, but fetches under a lock and checks again after taking it
//!   (so concurrent callers fetch once), and on a stale-token answer drops the cached token
//!   only if it is still the one that failed (compare before expire).
//!
//! Both treat a token as expired a little before its `expires_in` ends, as the SDKs do
//! (wechatpy 60 s, WxJava 200 s; here [`EXPIRY_MARGIN`], for lifetimes of seconds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long before its `expires_in` ends a client stops using a token.
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(250);

/// How a client shares its token between its own callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// No lock; drops the token on any stale-token answer.
    Wechatpy,
    /// A lock around the fetch; drops the token only if it is still the failed one.
    WxJava,
}

/// A backend's token client, pointed at wxgate.
pub struct SdkClient {
    http: reqwest::Client,
    base: String,
    appid: String,
    secret: String,
    style: Style,
    cached: std::sync::Mutex<Option<(String, Instant)>>,
    fetch_lock: Mutex<()>,
    /// API calls made (retries included).
    pub calls: AtomicU64,
    /// API calls answered 40001, 40014 or 42001.
    pub stale: AtomicU64,
    /// Token fetches this client sent.
    pub fetches: AtomicU64,
}

/// `true` for the errcodes after which SDKs fetch a new token.
pub fn is_stale(errcode: i64) -> bool {
    matches!(errcode, 40001 | 40014 | 42001)
}

impl SdkClient {
    /// A client of `style` for `appid`, talking to `base` (wxgate's URL).
    pub fn new(
        http: reqwest::Client,
        base: &str,
        appid: &str,
        secret: &str,
        style: Style,
    ) -> SdkClient {
        SdkClient {
            http,
            base: base.to_owned(),
            appid: appid.to_owned(),
            secret: secret.to_owned(),
            style,
            cached: std::sync::Mutex::new(None),
            fetch_lock: Mutex::new(()),
            calls: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        }
    }

    fn cached(&self) -> Option<String> {
        let cached = self.cached.lock().unwrap();
        cached
            .as_ref()
            .filter(|(_, expires)| Instant::now() + EXPIRY_MARGIN < *expires)
            .map(|(token, _)| token.clone())
    }

    /// The token to use: cached, or fetched.
    pub async fn token(&self) -> String {
        if let Some(token) = self.cached() {
            return token;
        }
        let _guard = match self.style {
            Style::WxJava => {
                let guard = self.fetch_lock.lock().await;
                // Someone else fetched while this caller waited for the lock.
                if let Some(token) = self.cached() {
                    return token;
                }
                Some(guard)
            }
            Style::Wechatpy => None,
        };
        self.fetch().await
    }

    async fn fetch(&self) -> String {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "{}/cgi-bin/token?grant_type=client_credential&appid={}&secret={}",
            self.base, self.appid, self.secret
        );
        let body: serde_json::Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("wxgate answers a token fetch")
            .json()
            .await
            .expect("a JSON token answer");
        let token = body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {body}"))
            .to_owned();
        let expires_in = body["expires_in"].as_u64().expect("expires_in");
        let expires = Instant::now() + Duration::from_secs(expires_in);
        *self.cached.lock().unwrap() = Some((token.clone(), expires));
        token
    }

    /// The token failed with a stale-token errcode: forget it (WxJava: only if it is still
    /// the cached one).
    fn expire(&self, failed: &str) {
        let mut cached = self.cached.lock().unwrap();
        let still_cached = cached.as_ref().is_some_and(|(token, _)| token == failed);
        if self.style == Style::Wechatpy || still_cached {
            *cached = None;
        }
    }

    /// One API call (`path` with `access_token=`), retried once after a stale-token answer
    /// with a token fetched again. The errcode of the last answer.
    pub async fn call(&self, path: &str) -> i64 {
        let mut errcode = 0;
        for _ in 0..2 {
            let token = self.token().await;
            self.calls.fetch_add(1, Ordering::Relaxed);
            let body: serde_json::Value = self
                .http
                .get(format!("{}{path}?access_token={token}", self.base))
                .send()
                .await
                .expect("wxgate answers an API call")
                .json()
                .await
                .expect("a JSON answer");
            errcode = body["errcode"].as_i64().unwrap_or(0);
            if !is_stale(errcode) {
                return errcode;
            }
            self.stale.fetch_add(1, Ordering::Relaxed);
            self.expire(&token);
        }
        errcode
    }
}
