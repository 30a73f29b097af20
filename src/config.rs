//! `config.toml` → a validated, typed [`Config`].
//!
//! The file is read into a TOML table and every key is checked by hand rather than through
//! `#[serde(deny_unknown_fields)]`, because serde stops at the first problem and an operator
//! should see every typo, every bad value and every unknown key of the file in one run.
//! [`Config::load`] returns either a `Config` whose values are all usable (durations, socket
//! addresses, a base URL without a trailing slash) or the whole list of problems.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::api::Api;

/// Exit status for an unusable configuration (`EX_CONFIG` would be 78; operators' scripts
/// expect `EX_USAGE`, 64, as the contract says).
pub const EXIT_INVALID_CONFIG: i32 = 64;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`: listeners and request limits.
    pub server: ServerConfig,
    /// `[upstream]`: where WeChat is and how long to wait for it.
    pub upstream: UpstreamConfig,
    /// `[code_cache]`: remembered answers of code exchanges.
    pub code_cache: CodeCacheConfig,
    /// `[quota]`: per-(appid, API) minute quotas.
    pub quota: QuotaConfig,
    /// `[retry]`: holding across 45011 and retrying -1.
    pub retry: RetryConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where backends send their WeChat calls.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`: never on the proxy port, so that a backend cannot
    /// read metrics and a scrape cannot be mistaken for WeChat traffic.
    pub admin_listen: SocketAddr,
    /// Larger request bodies are answered 413 without reading them whole.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
}

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme, host, port and optional path prefix, without a trailing slash.
    pub base_url: String,
    /// Time to open a connection (a refused or unreachable WeChat fails fast).
    pub connect_timeout: Duration,
    /// Time for one whole upstream call, connect included.
    pub timeout: Duration,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle: usize,
}

/// `[code_cache]`.
#[derive(Debug, Clone)]
pub struct CodeCacheConfig {
    /// How long a definitive answer is remembered (a `js_code` lives 5 minutes).
    pub ttl: Duration,
    /// At most this many answers are remembered; the oldest go first.
    pub max_entries: usize,
}

/// One quota: how many calls a window admits and how many may leave at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimit {
    /// Calls per window for one (appid, API); the bound wxgate guarantees.
    pub per_window: u32,
    /// Calls that may leave at once after a quiet spell.
    pub burst: u32,
}

/// `[quota]`.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// The quota window (WeChat: one minute).
    pub window: Duration,
    /// The quota of every (appid, API) without an override.
    pub default: QuotaLimit,
    /// `[quota.apis."/path"]`: overrides for one API.
    pub apis: HashMap<Api, QuotaLimit>,
    /// `[quota.appids."wx…"]`: overrides for one appid, all its APIs; wins over `apis`.
    pub appids: HashMap<String, QuotaLimit>,
    /// How long a request may wait for its turn before wxgate answers 45011 itself.
    pub max_wait: Duration,
}

impl QuotaConfig {
    /// The quota that applies to `appid` calling `api`: an appid override wins over an API
    /// override, which wins over the default.
    pub fn limit_for(&self, appid: &str, api: Api) -> QuotaLimit {
        self.appids
            .get(appid)
            .or_else(|| self.apis.get(&api))
            .copied()
            .unwrap_or(self.default)
    }
}

/// `[retry]`.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// How long a request may be held across upstream 45011 answers; at least one window so
    /// that a held request can reach the next one.
    pub max_hold: Duration,
    /// How many times a `-1 system busy` answer (or a connection that could not be opened)
    /// is retried.
    pub busy_attempts: u32,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml_str("").expect("the defaults are valid")
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigErrors(vec![format!("cannot read {}: {error}", path.display())])
        })?;
        Config::from_toml_str(&text)
    }

    /// Validates a configuration given as TOML text; absent keys take their defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        let root: toml::Table = text
            .parse()
            .map_err(|error: toml::de::Error| ConfigErrors(vec![syntax_error(&error)]))?;
        let mut errors = Vec::new();
        let mut top = Section::new("", &root, &mut errors);
        let server_table = top.table("server");
        let upstream_table = top.table("upstream");
        let cache_table = top.table("code_cache");
        let quota_table = top.table("quota");
        let retry_table = top.table("retry");
        top.finish();

        let server = {
            let mut s = Section::new("server", &server_table, &mut errors);
            let listen = s.socket_addr("listen", "127.0.0.1:8080");
            let admin_listen = s.socket_addr("admin_listen", "127.0.0.1:9090");
            let max_body_bytes = s.int("max_body_bytes", 1 << 20, 1, 1 << 30) as usize;
            let shutdown_grace = s.millis("shutdown_grace_ms", 10_000, 0, 3_600_000);
            s.finish();
            if listen == admin_listen && listen.port() != 0 {
                errors.push(format!(
                    "server.admin_listen: must differ from server.listen ({listen}): metrics never share the proxy port"
                ));
            }
            ServerConfig {
                listen,
                admin_listen,
                max_body_bytes,
                shutdown_grace,
            }
        };

        let upstream = {
            let mut s = Section::new("upstream", &upstream_table, &mut errors);
            let base_url = s.base_url("base_url", "https://api.weixin.qq.com");
            let connect_timeout = s.millis("connect_timeout_ms", 2_000, 1, 600_000);
            let timeout = s.millis("timeout_ms", 10_000, 1, 600_000);
            let pool_max_idle = s.int("pool_max_idle", 512, 0, 100_000) as usize;
            s.finish();
            UpstreamConfig {
                base_url,
                connect_timeout,
                timeout,
                pool_max_idle,
            }
        };

        let code_cache = {
            let mut s = Section::new("code_cache", &cache_table, &mut errors);
            let ttl = Duration::from_secs(s.int("ttl_secs", 300, 1, 86_400));
            let max_entries = s.int("max_entries", 1_000_000, 1, 100_000_000) as usize;
            s.finish();
            CodeCacheConfig { ttl, max_entries }
        };

        let quota = {
            let mut s = Section::new("quota", &quota_table, &mut errors);
            let window = Duration::from_secs(s.int("window_secs", 60, 1, 86_400));
            let default = s.limit(None);
            let max_wait = s.millis("max_wait_ms", 3_000, 0, 3_600_000);
            let apis_table = s.table("apis");
            let appids_table = s.table("appids");
            s.finish();
            let mut apis = HashMap::new();
            for (path, value) in &apis_table {
                let name = format!("quota.apis.\"{path}\"");
                let api = Api::from_path(path);
                if api == Api::Other {
                    let known: Vec<&str> = Api::ALL[..Api::COUNT - 1]
                        .iter()
                        .map(|api| api.label())
                        .collect();
                    errors.push(format!(
                        "{name}: not an API wxgate limits (one of: {})",
                        known.join(", ")
                    ));
                    continue;
                }
                if let Some(table) = sub_table(&name, value, &mut errors) {
                    let mut o = Section::new(&name, &table, &mut errors);
                    let limit = o.limit(Some(default));
                    o.finish();
                    apis.insert(api, limit);
                }
            }
            let mut appids = HashMap::new();
            for (appid, value) in &appids_table {
                let name = format!("quota.appids.\"{appid}\"");
                if !crate::wechat::is_plausible_appid(appid) {
                    errors.push(format!("{name}: not a plausible appid"));
                    continue;
                }
                if let Some(table) = sub_table(&name, value, &mut errors) {
                    let mut o = Section::new(&name, &table, &mut errors);
                    let limit = o.limit(Some(default));
                    o.finish();
                    appids.insert(appid.clone(), limit);
                }
            }
            QuotaConfig {
                window,
                default,
                apis,
                appids,
                max_wait,
            }
        };

        let retry = {
            let mut s = Section::new("retry", &retry_table, &mut errors);
            let default_hold = quota.window.as_millis() as u64 + 5_000;
            let max_hold = s.millis("max_hold_ms", default_hold, 0, 3_600_000);
            let busy_attempts = s.int("busy_attempts", 2, 0, 10) as u32;
            s.finish();
            if max_hold < quota.window {
                errors.push(format!(
                    "retry.max_hold_ms: {} is shorter than quota.window_secs ({} s): a request held after a 45011 could never reach the next window",
                    max_hold.as_millis(),
                    quota.window.as_secs()
                ));
            }
            RetryConfig {
                max_hold,
                busy_attempts,
            }
        };

        if errors.is_empty() {
            Ok(Config {
                server,
                upstream,
                code_cache,
                quota,
                retry,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The effective configuration as TOML, defaults filled in and secrets masked
    /// (`check-config` prints this).
    pub fn to_toml_masked(&self) -> String {
        let mut out = String::new();
        let s = &self.server;
        out.push_str("[server]\n");
        out.push_str(&format!("listen = \"{}\"\n", s.listen));
        out.push_str(&format!("admin_listen = \"{}\"\n", s.admin_listen));
        out.push_str(&format!("max_body_bytes = {}\n", s.max_body_bytes));
        out.push_str(&format!(
            "shutdown_grace_ms = {}\n",
            s.shutdown_grace.as_millis()
        ));
        let u = &self.upstream;
        out.push_str("\n[upstream]\n");
        out.push_str(&format!("base_url = \"{}\"\n", mask_userinfo(&u.base_url)));
        out.push_str(&format!(
            "connect_timeout_ms = {}\n",
            u.connect_timeout.as_millis()
        ));
        out.push_str(&format!("timeout_ms = {}\n", u.timeout.as_millis()));
        out.push_str(&format!("pool_max_idle = {}\n", u.pool_max_idle));
        let c = &self.code_cache;
        out.push_str("\n[code_cache]\n");
        out.push_str(&format!("ttl_secs = {}\n", c.ttl.as_secs()));
        out.push_str(&format!("max_entries = {}\n", c.max_entries));
        let q = &self.quota;
        out.push_str("\n[quota]\n");
        out.push_str(&format!("window_secs = {}\n", q.window.as_secs()));
        out.push_str(&format!("per_window = {}\n", q.default.per_window));
        out.push_str(&format!("burst = {}\n", q.default.burst));
        out.push_str(&format!("max_wait_ms = {}\n", q.max_wait.as_millis()));
        let apis: BTreeMap<&str, QuotaLimit> =
            q.apis.iter().map(|(api, l)| (api.label(), *l)).collect();
        for (path, limit) in apis {
            out.push_str(&format!(
                "\n[quota.apis.\"{path}\"]\nper_window = {}\nburst = {}\n",
                limit.per_window, limit.burst
            ));
        }
        let appids: BTreeMap<&String, &QuotaLimit> = q.appids.iter().collect();
        for (appid, limit) in appids {
            out.push_str(&format!(
                "\n[quota.appids.\"{appid}\"]\nper_window = {}\nburst = {}\n",
                limit.per_window, limit.burst
            ));
        }
        let r = &self.retry;
        out.push_str("\n[retry]\n");
        out.push_str(&format!("max_hold_ms = {}\n", r.max_hold.as_millis()));
        out.push_str(&format!("busy_attempts = {}\n", r.busy_attempts));
        out
    }
}

/// A TOML syntax error without the offending source line: the line could hold a value an
/// operator would not want in a CI log.
fn syntax_error(error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => format!("not valid TOML at byte {}: {}", span.start, error.message()),
        None => format!("not valid TOML: {}", error.message()),
    }
}

/// `https://user:pass@host` → `https://user:***@host`, for `check-config` and logs.
pub fn mask_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn sub_table(name: &str, value: &toml::Value, errors: &mut Vec<String>) -> Option<toml::Table> {
    match value {
        toml::Value::Table(table) => Some(table.clone()),
        other => {
            errors.push(format!(
                "{name}: expected a table, found {}",
                other.type_str()
            ));
            None
        }
    }
}

/// One TOML table being validated: reads known keys, records every problem, and at the end
/// reports the keys nobody asked for.
struct Section<'a> {
    name: String,
    table: &'a toml::Table,
    seen: Vec<&'static str>,
    errors: &'a mut Vec<String>,
}

impl<'a> Section<'a> {
    fn new(name: &str, table: &'a toml::Table, errors: &'a mut Vec<String>) -> Self {
        Section {
            name: name.to_owned(),
            table,
            seen: Vec::new(),
            errors,
        }
    }

    fn path(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a toml::Value> {
        self.seen.push(key);
        self.table.get(key)
    }

    fn table(&mut self, key: &'static str) -> toml::Table {
        match self.get(key) {
            None => toml::Table::new(),
            Some(toml::Value::Table(table)) => table.clone(),
            Some(other) => {
                let path = self.path(key);
                self.errors.push(format!(
                    "{path}: expected a table, found {}",
                    other.type_str()
                ));
                toml::Table::new()
            }
        }
    }

    fn int(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(toml::Value::Integer(n))
                if (min as i128..=max as i128).contains(&(*n as i128)) =>
            {
                *n as u64
            }
            Some(toml::Value::Integer(n)) => {
                let path = self.path(key);
                self.errors
                    .push(format!("{path}: {n} is out of range ({min}..={max})"));
                default
            }
            Some(other) => {
                let path = self.path(key);
                self.errors.push(format!(
                    "{path}: expected an integer, found {}",
                    other.type_str()
                ));
                default
            }
        }
    }

    fn millis(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.int(key, default, min, max))
    }

    fn string(&mut self, key: &'static str) -> Option<&'a str> {
        match self.get(key) {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                let path = self.path(key);
                self.errors.push(format!(
                    "{path}: expected a string, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    fn socket_addr(&mut self, key: &'static str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().expect("default address is valid");
        match self.string(key) {
            None => fallback,
            Some(text) => text.parse().unwrap_or_else(|_| {
                let path = self.path(key);
                self.errors.push(format!(
                    "{path}: \"{text}\" is not an IP address and port such as \"127.0.0.1:8080\""
                ));
                fallback
            }),
        }
    }

    fn base_url(&mut self, key: &'static str, default: &str) -> String {
        let Some(text) = self.string(key) else {
            return default.to_owned();
        };
        let path = self.path(key);
        match url::Url::parse(text) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                text.trim_end_matches('/').to_owned()
            }
            Ok(_) => {
                self.errors.push(format!(
                    "{path}: must be an http:// or https:// URL with a host and no query or fragment, such as \"https://api.weixin.qq.com\""
                ));
                default.to_owned()
            }
            Err(error) => {
                self.errors.push(format!("{path}: not a URL ({error})"));
                default.to_owned()
            }
        }
    }

    /// `per_window` and `burst`; `inherit` gives the default a table's missing keys take.
    fn limit(&mut self, inherit: Option<QuotaLimit>) -> QuotaLimit {
        let default_per_window = inherit.map_or(5_000, |l| l.per_window) as u64;
        let per_window = self.int("per_window", default_per_window, 1, 100_000_000) as u32;
        // About 10 % of the quota may go at once; the rest is spread over the window.
        let default_burst = if inherit.is_some() && self.table.get("per_window").is_none() {
            inherit.map_or(1, |l| l.burst)
        } else {
            (per_window / 10).max(1)
        };
        let burst = self.int("burst", default_burst as u64, 1, 100_000_000) as u32;
        if burst > per_window {
            let path = self.path("burst");
            self.errors.push(format!(
                "{path}: {burst} is larger than per_window ({per_window}): a burst cannot exceed the quota"
            ));
            return QuotaLimit {
                per_window,
                burst: per_window,
            };
        }
        QuotaLimit { per_window, burst }
    }

    fn finish(self) {
        for key in self.table.keys() {
            if !self.seen.iter().any(|seen| seen == key) {
                let path = if self.name.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.name)
                };
                self.errors.push(format!("{path}: unknown key"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            config.server.admin_listen,
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(config.server.max_body_bytes, 1 << 20);
        assert_eq!(config.upstream.base_url, "https://api.weixin.qq.com");
        assert_eq!(config.code_cache.ttl, Duration::from_secs(300));
        assert_eq!(config.quota.window, Duration::from_secs(60));
        assert_eq!(
            config.quota.default.burst,
            config.quota.default.per_window / 10
        );
        assert!(config.retry.max_hold > config.quota.window);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            colour = "blue"
            [server]
            listen = "not an address"
            max_body_bytes = -1
            lisen = "typo"
            [upstream]
            base_url = "ftp://example"
            timeout_ms = "slow"
            [quota]
            per_window = 10
            burst = 20
            [quota.apis."/nope"]
            per_window = 1
            [retry]
            max_hold_ms = 10
        "#;
        let errors = Config::from_toml_str(text).unwrap_err().0;
        let all = errors.join("\n");
        for needle in [
            "colour: unknown key",
            "server.listen",
            "server.max_body_bytes",
            "server.lisen: unknown key",
            "upstream.base_url",
            "upstream.timeout_ms: expected an integer",
            "quota.burst",
            "quota.apis.\"/nope\"",
            "retry.max_hold_ms",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 9, "{all}");
    }

    #[test]
    fn appid_override_wins_over_api_override() {
        let text = r#"
            [quota]
            per_window = 100
            [quota.apis."/sns/jscode2session"]
            per_window = 50
            [quota.appids."wx00000000000000a1"]
            per_window = 20
            burst = 2
        "#;
        let config = Config::from_toml_str(text).unwrap();
        let q = &config.quota;
        assert_eq!(
            q.limit_for("wx00000000000000a1", Api::JsCode2Session)
                .per_window,
            20
        );
        assert_eq!(
            q.limit_for("wx00000000000000b2", Api::JsCode2Session)
                .per_window,
            50
        );
        assert_eq!(
            q.limit_for("wx00000000000000b2", Api::JsCode2Session).burst,
            5
        );
        assert_eq!(
            q.limit_for("wx00000000000000b2", Api::Token).per_window,
            100
        );
    }

    #[test]
    fn masked_output_hides_userinfo_and_parses_back() {
        let text = "[upstream]\nbase_url = \"https://user:hunter2@wechat.internal/\"\n";
        let config = Config::from_toml_str(text).unwrap();
        let shown = config.to_toml_masked();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user:***@wechat.internal"), "{shown}");
        let again = Config::from_toml_str(&shown).unwrap();
        assert_eq!(again.quota.default, config.quota.default);
    }
}
