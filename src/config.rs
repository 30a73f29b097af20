//! `config.toml` → a validated, typed [`Config`].
//!
//! Three layers, each key spelled once: as a field name of the raw structs below.
//! 1. **Read** (`config/read.rs`): the text is parsed as TOML (a syntax error stops here,
//!    reported by position, never with its source line) and deserialized into the raw serde
//!    structs (`RawConfig` and its tables), whose fields are TOML-level types: strings,
//!    integers, tables, defaults for absent keys. Every key nobody asked for is collected
//!    (`serde_ignored`; `deny_unknown_fields` would stop at the first), and a value of the
//!    wrong TOML type is named by its key path (`serde_path_to_error`), taken out, and reading
//!    goes on, so that every such value is reported too. No message holds a value: files
//!    carry secrets.
//! 2. **Validate** (`config/validate.rs`): one pass over the raw values checks ranges,
//!    addresses, the base URL and the rules between keys, recording every problem with its
//!    key path.
//! 3. **Typed**: with no problem at all, a [`Config`] of usable values (`Duration`s,
//!    `SocketAddr`s, a parsed [`BaseUrl`]). [`CheckedConfig`] keeps the raw values beside it,
//!    defaults filled in, for `wxgate check-config` to print (`Serialize`, secrets masked); the
//!    printed text reads back to the same `Config`.
//!
//! Problems are listed in a stable order: unknown keys, then values of the wrong type (each in
//! key order), then the checks of `config/validate.rs` table by table.
//!
//! # Adding a key
//! 1. A field in the raw struct of its table (`RawServer`, ...) in `config/raw.rs`, named as the key and
//!    typed as TOML writes it (`String`, `i64`, a table struct, a `Vec` for an array). A key
//!    whose default depends on another key is an `Option`, written back for `check-config`
//!    by `RawConfig::fill_derived`. A secret is a `Secret<M>`, where `M` says how it is shown
//!    (`UrlPassword` masks a URL's password; a bare secret would get a mask showing `***`).
//! 2. Its default in that struct's `Default` impl.
//! 3. Its check in that table's `check_*` function in `config/validate.rs`:
//!    `c.int(key!(raw.field), min..=max)`, `c.socket_addr(key!(raw.field))`, or
//!    `c.check(name!(raw.field), parse(...))`; `key!` and `name!` take the key's name from the
//!    field, so a message cannot name a key that does not exist.
//! 4. Its typed field in the public struct, built from the checked value.
//!
//! Then `config.toml` and the README's table: tests fail while either lacks the key. A new
//! table is a raw struct with `#[serde(default)]` and a `Default` impl, a field of its parent
//! raw struct, a `check_*` function called from `RawConfig::validate`, and a typed struct.

mod allow;
mod base_url;
mod ca_file;
mod checks;
mod cluster;
mod pem;
mod raw;
mod read;
mod server_tls;
#[cfg(test)]
mod test_files;
mod validate;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::api::Api;
pub use allow::AllowList;
pub use base_url::BaseUrl;
pub use ca_file::CaFile;
pub use cluster::{ClusterSecret, RedisUrl};
use raw::{
    RawCluster, RawCodeCache, RawConfig, RawLimit, RawLog, RawQuota, RawRetry, RawServer,
    RawServerTls, RawTokenCache, RawUpstream, HOLD_BEYOND_WINDOW,
};
use read::read;
pub use server_tls::{tls_provider, ServerTlsConfig};

/// Exit status for an unusable configuration (`EX_CONFIG` would be 78; operators' scripts
/// expect `EX_USAGE`, 64, as the contract says).
pub const EXIT_INVALID_CONFIG: i32 = 64;

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// `[token_cache]`: wxgate as the one place that fetches and refreshes access tokens.
    pub token_cache: TokenCacheConfig,
    /// `[cluster]`: the state replicas share in Redis; `None` (no section) is a single
    /// process, as wxgate always was.
    pub cluster: Option<ClusterConfig>,
    /// `[log]`: how wxgate writes its log.
    pub log: LogConfig,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// One JSON object per line (for a log shipper), or text.
    pub json: bool,
    /// The default filter (`RUST_LOG`, when set, wins): a level or tracing directives.
    pub level: String,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Where backends send their WeChat calls.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`: never on the proxy port, so that a backend cannot
    /// read metrics and a scrape cannot be mistaken for WeChat traffic.
    pub admin_listen: SocketAddr,
    /// Larger request bodies are answered 413 without reading them whole.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT; those still in
    /// flight then get wxgate's own 503 `-1` before their connections close.
    pub shutdown_grace: Duration,
    /// From accept to a complete first request head. A connection that has carried no
    /// request yet and has none in flight is closed past it, whatever bytes trickle in, so
    /// silent and slow sockets cannot pile up.
    pub request_head_timeout: Duration,
    /// How long a connection that has carried a request may stay without one in flight
    /// (HTTP/1.1 keep-alive, HTTP/2) before it is closed: this also bounds the next head.
    pub idle_timeout: Duration,
    /// From the end of a request head to the end of its body; a body that takes longer is
    /// answered 408 without waiting for the rest.
    pub body_timeout: Duration,
    /// Open client connections at most (lowered at start when the open-files limit could not
    /// hold them). Past it the oldest idle connection is closed to admit a new one; with none
    /// idle, the new one is refused.
    pub max_connections: usize,
    /// `server.allow`: who may connect to the proxy port; connections from elsewhere are
    /// closed as they are accepted.
    pub allow: AllowList,
    /// `[server.tls]`: HTTPS on the proxy port with this certificate; `None`, plain HTTP.
    pub tls: Option<ServerTlsConfig>,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Where every call goes, parsed once.
    pub base_url: BaseUrl,
    /// Time to open a connection (a refused or unreachable WeChat fails fast).
    pub connect_timeout: Duration,
    /// Time for one whole upstream call, connect included.
    pub timeout: Duration,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle: usize,
    /// How long a connection may stay idle before wxgate closes it: shorter than the server's
    /// own keep-alive timeout, so that a request is rarely written to a connection the server
    /// is closing at that moment.
    pub pool_idle_timeout: Duration,
    /// The largest answer body read from upstream: bounds the memory one answer can take
    /// (WeChat's JSON answers are a few hundred bytes).
    pub max_body_bytes: usize,
    /// At most this many connections open towards upstream at once; calls beyond them wait
    /// for one within their timeout. Bounds the sockets and memory a hanging upstream can
    /// make wxgate hold.
    pub max_connections: usize,
    /// `upstream.ca_file`: certificate authorities trusted in addition to the webpki roots.
    pub ca_file: Option<CaFile>,
}

/// `[code_cache]`.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// How long a request may be held across upstream 45011 answers; at least one window so
    /// that a held request can reach the next one.
    pub max_hold: Duration,
    /// How many times a `-1 system busy` answer (or a connection that could not be opened)
    /// is retried.
    pub busy_attempts: u32,
}

/// `[token_cache]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCacheConfig {
    /// Whether token fetches are answered from the cache (otherwise they are forwarded like
    /// any call, and every fetch mints a new token).
    pub enabled: bool,
    /// A token is refreshed once less than a tenth of its lifetime remains, but never earlier
    /// than this before it expires: WeChat keeps the previous token valid for five minutes
    /// after a fetch, so refreshing inside those five minutes keeps every token handed out
    /// valid until its `expires_in`.
    pub refresh_ahead: Duration,
    /// Appids (or component appids) whose token fetches are forwarded, never cached.
    pub exclude_appids: BTreeSet<String>,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis every replica shares; its password from the URL or `WXGATE_REDIS_PASSWORD`.
    pub redis_url: RedisUrl,
    /// Prepended to every key, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// The longest one Redis operation may take before the replica stops waiting for it and
    /// degrades.
    pub timeout: Duration,
    /// Shared by the replicas: keys fingerprints and seals what they store.
    pub secret: ClusterSecret,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        writeln!(f, "invalid configuration ({count} {noun}):")?;
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
        Ok(CheckedConfig::load(path)?.config)
    }

    /// Validates a configuration given as TOML text; absent keys take their defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        Ok(CheckedConfig::from_toml_str(text)?.config)
    }
}

/// A valid configuration and the file's values it was built from, defaults filled in: what
/// `wxgate check-config` prints.
#[derive(Debug, Clone)]
pub struct CheckedConfig {
    /// The typed configuration.
    pub config: Config,
    /// Every key with the value in force (written, default, or derived from another key).
    effective: RawConfig,
}

impl CheckedConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<CheckedConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigErrors(vec![format!("cannot read {}: {error}", path.display())])
        })?;
        CheckedConfig::from_toml_str(&text)
    }

    /// Validates a configuration given as TOML text, reporting every problem at once.
    pub fn from_toml_str(text: &str) -> Result<CheckedConfig, ConfigErrors> {
        let (raw, mut problems) = read(text)?;
        match raw.validate(&mut problems) {
            Some(config) if problems.is_empty() => Ok(CheckedConfig {
                effective: raw.fill_derived(&config),
                config,
            }),
            // A check that yields no value records a problem, so `problems` is not empty.
            _ => Err(ConfigErrors(problems)),
        }
    }

    /// The effective configuration as TOML, every key with its value and secrets masked.
    /// Durations keep the file's units (`_ms`, `_secs` keys). Without secrets, the text reads
    /// back to the same [`Config`].
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.effective).expect("the raw configuration serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::read::{key_path, Segment};
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        Config::from_toml_str(text).unwrap_err().0
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            config.server.admin_listen,
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(config.server.max_body_bytes, 1 << 20);
        assert_eq!(config.server.request_head_timeout, Duration::from_secs(10));
        assert_eq!(config.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.server.body_timeout, Duration::from_secs(10));
        assert_eq!(config.server.max_connections, 10_000);
        assert_eq!(
            config.upstream.base_url.as_str(),
            "https://api.weixin.qq.com"
        );
        assert_eq!(config.code_cache.ttl, Duration::from_secs(300));
        assert_eq!(config.quota.window, Duration::from_secs(60));
        assert_eq!(
            config.quota.default.burst,
            config.quota.default.per_window / 10
        );
        assert_eq!(config.retry.max_hold, Duration::from_secs(65));
        let mut problems = Vec::new();
        assert_eq!(RawConfig::default().validate(&mut problems), Some(config));
        assert!(problems.is_empty(), "{problems:?}");
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
        let errors = problems(text);
        let all = errors.join("\n");
        for needle in [
            "colour: unknown key",
            "server.listen",
            "server.max_body_bytes: -1 is out of range (1..=1073741824)",
            "server.lisen: unknown key",
            "upstream.base_url: must be an http:// or https:// URL",
            "upstream.timeout_ms: expected an integer, found string",
            "quota.burst: 20 is larger than per_window (10)",
            "quota.apis.\"/nope\": not an API wxgate limits",
            "retry.max_hold_ms: 10 is shorter than quota.window_secs (60 s)",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 9, "{all}");
        assert_eq!(problems(text), errors, "the same order every time");
    }

    #[test]
    fn printed_configuration_reads_back_equal() {
        let text = r#"
            [server]
            listen = "127.0.0.1:18080"
            admin_listen = "[::1]:19090"
            allow = ["10.0.0.0/8", "::1"]
            max_body_bytes = 4096
            shutdown_grace_ms = 1500
            [upstream]
            base_url = "http://wechat.internal:8081/wx/"
            connect_timeout_ms = 300
            timeout_ms = 4000
            pool_max_idle = 0
            [code_cache]
            ttl_secs = 30
            max_entries = 99
            [quota]
            window_secs = 2
            per_window = 1000
            max_wait_ms = 0
            [quota.apis."/cgi-bin/token"]
            per_window = 20
            [quota.apis."/sns/jscode2session"]
            burst = 3
            [quota.appids.wx00000000000000a1]
            per_window = 7
            burst = 7
            [retry]
            busy_attempts = 0
        "#;
        let checked = CheckedConfig::from_toml_str(text).unwrap();
        let printed = checked.to_toml();
        // Defaults that depend on other keys are printed as chosen.
        for line in [
            "burst = 100\n",
            "max_hold_ms = 7000\n",
            "[quota.apis.\"/cgi-bin/token\"]\nper_window = 20\nburst = 2\n",
            "[quota.apis.\"/sns/jscode2session\"]\nper_window = 1000\nburst = 3\n",
            "allow = [\"10.0.0.0/8\", \"::1\"]\n",
        ] {
            assert!(printed.contains(line), "{line:?} missing from\n{printed}");
        }
        let again = CheckedConfig::from_toml_str(&printed).unwrap();
        assert_eq!(again.config, checked.config, "{printed}");
        assert_eq!(again.to_toml(), printed);
        let defaults = CheckedConfig::from_toml_str("").unwrap();
        assert_eq!(
            Config::from_toml_str(&defaults.to_toml()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn printed_configuration_masks_the_password() {
        let text = "[upstream]\nbase_url = \"https://user:hunter2@wechat.internal/\"\n";
        let checked = CheckedConfig::from_toml_str(text).unwrap();
        let shown = checked.to_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("base_url = \"https://user:***@wechat.internal/\""),
            "{shown}"
        );
        let debug = format!("{checked:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        // The printed text is a valid configuration too (with the masked password).
        let again = Config::from_toml_str(&shown).unwrap();
        assert_eq!(again.quota, checked.config.quota);
        assert_eq!(
            again.upstream.base_url.as_str(),
            "https://user:***@wechat.internal"
        );
    }

    fn leaf_paths(value: &toml::Value, prefix: &[Segment], out: &mut Vec<String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let mut path = prefix.to_vec();
                    path.push(Segment::Key(key.clone()));
                    leaf_paths(value, &path, out);
                }
            }
            _ => out.push(key_path(prefix)),
        }
    }

    /// Every key the defaults print, by key path.
    fn default_keys() -> Vec<String> {
        let printed = CheckedConfig::from_toml_str("").unwrap().to_toml();
        let mut keys = Vec::new();
        leaf_paths(
            &toml::Value::Table(printed.parse().unwrap()),
            &[],
            &mut keys,
        );
        assert!(keys.iter().any(|key| key == "quota.burst"), "{keys:?}");
        keys
    }

    #[test]
    fn the_shipped_config_toml_holds_every_key_at_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
        let shipped = Config::load(Path::new(path)).unwrap_or_else(|errors| panic!("{errors}"));
        let defaults = Config::default();
        assert_eq!(shipped.server, defaults.server);
        assert_eq!(shipped.upstream, defaults.upstream);
        assert_eq!(shipped.code_cache, defaults.code_cache);
        assert_eq!(shipped.quota, defaults.quota);
        assert_eq!(shipped.retry, defaults.retry);
        assert_eq!(shipped.token_cache, defaults.token_cache);
        assert_eq!(shipped, defaults);

        let text = std::fs::read_to_string(path).unwrap();
        let mut written = Vec::new();
        leaf_paths(
            &toml::Value::Table(text.parse().unwrap()),
            &[],
            &mut written,
        );
        for key in default_keys() {
            assert!(written.contains(&key), "config.toml does not set {key}");
        }
    }

    #[test]
    fn the_configuration_reference_documents_every_key() {
        let reference = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ));
        for key in default_keys() {
            assert!(
                reference.contains(&format!("| `{key}` |")),
                "docs/configuration.md's key table has no row for `{key}`"
            );
        }
    }
}
