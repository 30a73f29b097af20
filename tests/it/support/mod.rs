//! Shared by the integration tests: a wxgate started in-process on `127.0.0.1:0` in front of
//! a WeChat stand-in, and small helpers to read its metrics.

pub mod child;
pub mod cluster;
pub mod redis;
pub mod sdk;
pub mod tls;
pub mod topology;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wxgate::{Config, Listeners};
use wxgate_stand_in::{StandIn, StandInConfig};

pub use wxgate_stand_in::{
    DEFAULT_APPID as APPID, DEFAULT_APP_SECRET as SECRET,
    DEFAULT_COMPONENT_ACCESS_TOKEN as COMPONENT_TOKEN, DEFAULT_COMPONENT_APPID as COMPONENT_APPID,
};

/// Generous bound for what should happen within a configured deadline of a few hundred
/// milliseconds: a failure means "never", not "slow".
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// A wxgate serving on loopback; stopped when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// `http://127.0.0.1:PORT` of the proxy port.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("admin answers")
            .text()
            .await
            .expect("metrics text")
    }

    /// Reads the metrics until `done` holds of them (events, not sleeps: the metrics say when
    /// wxgate has done something), or panics after [`EVENTUALLY`] saying `what` never happened.
    pub async fn metrics_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        loop {
            let text = self.metrics().await;
            if done(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never happened:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `POST /-/reload` on the admin port (a proxy started from a file): the status and the
    /// answer's text.
    pub async fn reload(&self) -> (u16, String) {
        let answer = reqwest::Client::new()
            .post(format!("http://{}/-/reload", self.admin))
            .send()
            .await
            .expect("admin answers");
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    /// Stops accepting, drains, and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("run returns");
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The configuration tests start from: everything at its default but the upstream, short
/// timeouts, and quotas too high to bind unless a test sets them.
pub fn config_text(upstream: &str, extra: &str) -> String {
    format!(
        "[upstream]\nbase_url = \"{upstream}\"\nconnect_timeout_ms = 500\ntimeout_ms = 2000\n{extra}"
    )
}

/// Parses `text` (panicking with every problem if invalid).
pub fn config(text: &str) -> Config {
    Config::from_toml_str(text).unwrap_or_else(|errors| panic!("{errors}"))
}

/// Starts wxgate with `config` on two free loopback ports.
pub async fn spawn_proxy(config: Config) -> TestProxy {
    spawn(config, None).await
}

/// Starts wxgate with the configuration file at `path` on two free loopback ports (its
/// listen addresses are not used), reloadable from that file as the binary is
/// (`TestProxy::reload`).
pub async fn spawn_proxy_from_file(path: &Path) -> TestProxy {
    let config = Config::load(path).unwrap_or_else(|errors| panic!("{errors}"));
    spawn(config, Some(path.to_owned())).await
}

async fn spawn(config: Config, reload_from: Option<PathBuf>) -> TestProxy {
    let listeners = Listeners::bind_local().await.expect("bind loopback");
    let addr = listeners.proxy_addr();
    let admin = listeners.admin_addr();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        wxgate::run_reloadable(listeners, config, reload_from, async {
            let _ = stopped.await;
        })
        .await
        .expect("wxgate runs");
    });
    TestProxy {
        addr,
        admin,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A stand-in with the default apps and `configure` applied.
pub async fn stand_in(configure: impl FnOnce(&mut StandInConfig)) -> StandIn {
    let mut config = StandInConfig::default();
    configure(&mut config);
    StandIn::start(config).await.expect("stand-in starts")
}

/// A stand-in and a wxgate in front of it, with `extra` TOML appended to the config.
pub async fn setup(extra: &str) -> (StandIn, TestProxy) {
    let upstream = stand_in(|_| {}).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.base_url(), extra))).await;
    (upstream, proxy)
}

/// A client that keeps connections alive, with no proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The value of one series in Prometheus text, e.g.
/// `metric(&text, "wxgate_requests_total", &[("api", "other"), ("outcome", "forwarded")])`;
/// 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = match series.find('{') {
                Some(brace) => (&series[..brace], &series[brace..]),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(key, val)| rest.contains(&format!("{key}=\"{val}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The errcode of a WeChat-shaped body (0 when it has none, as WeChat's successes).
pub fn errcode(body: &[u8]) -> i64 {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap();
    value["errcode"].as_i64().unwrap_or(0)
}

/// One `/sns/jscode2session` of the stand-in's default app through `proxy`: its status and
/// errcode.
pub async fn exchange(client: &reqwest::Client, proxy: &TestProxy, code: &str) -> (u16, i64) {
    let answer = client
        .get(proxy.url(&jscode2session(APPID, SECRET, code)))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, errcode(&answer.bytes().await.unwrap()))
}

/// Calls the stand-in received per aligned window of `window`, from its log.
pub fn calls_per_window(upstream: &StandIn, window: Duration) -> BTreeMap<u128, u64> {
    let mut windows = BTreeMap::new();
    for call in upstream.call_log() {
        let at = call.at.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        *windows.entry(at / window.as_nanos()).or_default() += 1;
    }
    windows
}

/// The value of `name=` in a text log line of wxgate's, e.g. `proxy` in its "wxgate serving"
/// line.
pub fn log_field(line: &str, name: &str) -> String {
    let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
    line[start..].split_whitespace().next().unwrap().to_owned()
}

/// Client connections wxgate closed for `reason`, from its metrics.
pub fn connections_closed(text: &str, reason: &str) -> f64 {
    metric(
        text,
        "wxgate_connections_closed_total",
        &[("reason", reason)],
    )
}

/// Client connections open, from wxgate's metrics.
pub fn connections_open(text: &str) -> f64 {
    metric(text, "wxgate_connections_open", &[])
}

/// A `/sns/jscode2session` path and query.
pub fn jscode2session(appid: &str, secret: &str, code: &str) -> String {
    format!("/sns/jscode2session?appid={appid}&secret={secret}&js_code={code}&grant_type=authorization_code")
}

/// A `/sns/component/jscode2session` path and query.
pub fn component_jscode2session(
    appid: &str,
    component_appid: &str,
    token: &str,
    code: &str,
) -> String {
    format!(
        "/sns/component/jscode2session?appid={appid}&js_code={code}&grant_type=authorization_code&component_appid={component_appid}&component_access_token={token}"
    )
}
