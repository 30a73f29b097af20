//! The stand-in's own tests, over loopback with reqwest as the client: the shared harness
//! here, WeChat's endpoints in `wechat.rs`, tokens in `tokens.rs`, limits (rate, daily,
//! per-user, on an account's behalf; arrival spans) in `limits.rs`, quota/get and
//! `clear_quota` in `openapi.rs`, faults, the echo and the server in `serving.rs`, HTTPS
//! (with a rustls client) in `https.rs`; the delaying relay in `relay.rs`.

mod https;
mod limits;
mod openapi;
mod relay;
mod serving;
mod tokens;
mod wechat;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{
    duration_nanos, StandIn, StandInConfig, AUTHORIZER_TOKEN_PATH, CHECKED_API_PATH,
    COMPONENT_JSCODE2SESSION_PATH, DEFAULT_APPID, DEFAULT_APP_SECRET,
    DEFAULT_COMPONENT_ACCESS_TOKEN, DEFAULT_COMPONENT_APPID, JSCODE2SESSION_PATH,
    JSON_CONTENT_TYPE, TOKEN_PATH,
};

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

    /// A POST with `body` as its JSON.
    async fn post(&self, path_and_query: &str, body: &Value) -> Reply {
        let url = format!("{}{path_and_query}", self.upstream.base_url());
        self.send(self.client.post(url).body(body.to_string()))
            .await
    }

    async fn post_json(&self, path: &str, body: Value) -> Value {
        self.post(path, &body).await.json()
    }

    /// A fresh access token of [`DEFAULT_APPID`] from `/cgi-bin/token`.
    async fn token(&self) -> String {
        let query = query(&[
            ("grant_type", "client_credential"),
            ("appid", DEFAULT_APPID),
            ("secret", DEFAULT_APP_SECRET),
        ]);
        let reply = self.get(&format!("{TOKEN_PATH}?{query}")).await;
        reply.json()["access_token"].as_str().unwrap().to_owned()
    }

    /// The checked API with `token`: its errcode (0 for success).
    async fn use_token(&self, token: &str) -> i64 {
        let reply = self
            .get(&format!(
                "{CHECKED_API_PATH}?{}",
                query(&[("access_token", token)])
            ))
            .await;
        reply.errcode().unwrap_or(0)
    }

    /// An `authorizer_access_token` of [`DEFAULT_COMPONENT_APPID`] for [`DEFAULT_APPID`].
    async fn authorizer_token(&self) -> String {
        let body = serde_json::json!({
            "component_appid": DEFAULT_COMPONENT_APPID,
            "authorizer_appid": DEFAULT_APPID,
            "authorizer_refresh_token": "refresh-a1",
        });
        let path = format!(
            "{AUTHORIZER_TOKEN_PATH}?component_access_token={DEFAULT_COMPONENT_ACCESS_TOKEN}"
        );
        let reply = self.post_json(&path, body).await;
        reply["authorizer_access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{reply}"))
            .to_owned()
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
    align_clock(upstream, upstream.shared.limits.default_window);
}

/// Moves the stand-in's clock to one second after the start of the next aligned `period`
/// (a window, or a day whose offset is a multiple of it).
fn align_clock(upstream: &StandIn, period: Duration) {
    let period = period.as_nanos();
    let now = upstream
        .shared
        .now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let to_next = period - now % period;
    let skew = to_next + Duration::from_secs(1).as_nanos();
    advance_clock(upstream, Duration::from_nanos(skew as u64));
}

fn config_with_quota(quota: u32) -> StandInConfig {
    StandInConfig {
        quota_per_window: Some(quota),
        ..StandInConfig::default()
    }
}
