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
mod files;
mod pem;
mod raw;
mod read;
mod redis;
mod server_tls;
#[cfg(test)]
mod test_files;
mod validate;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::wechat::Api;
pub use allow::AllowList;
pub use base_url::BaseUrl;
pub use ca_file::CaFile;
pub use cluster::ClusterSecret;
pub(crate) use raw::RawConfig;
use raw::{
    RawCluster, RawCodeCache, RawLimit, RawLog, RawQuota, RawRetry, RawServer, RawServerTls,
    RawTokenCache, RawUpstream, HOLD_BEYOND_WINDOW, MARGIN_AT_A_MINUTE,
};
use read::read;
pub use redis::{Credentials, NodeAddress, NodeSettings, RedisForm, RedisTarget, RedisUrl};
pub use server_tls::{tls_provider, ServerTlsConfig};

/// `config_key!(server.listen)` is `"server.listen"`: a key path of `config.toml` (a key, or
/// a whole table), checked at compile time to name fields of the raw configuration, so that
/// code outside this module can name a key without a misspelling compiling.
macro_rules! config_key {
    ($($field:ident).+) => {{
        let _ = |raw: &$crate::config::RawConfig| {
            let _ = &raw.$($field).+;
        };
        stringify!($($field).+)
    }};
}
pub(crate) use config_key;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// How much more one call may take than another to reach WeChat: calls the bound
    /// separates by a window leave at least a window plus this apart, so that the bound
    /// holds where WeChat counts, at their arrival (see `crate::quota`).
    pub arrival_margin: Duration,
    /// Whether wxgate asks WeChat (quota/get) for the limits of the keys with traffic it
    /// holds a token for.
    pub discover: bool,
    /// How long an answer of quota/get (or its error) stands before the key is asked about
    /// again.
    pub discovery_interval: Duration,
    /// How long the first call of a key waits for its first answer before it goes on under
    /// the default.
    pub discovery_wait: Duration,
    /// How long a limit learned from WeChat's 45011 is held before it climbs back.
    pub learned_hold: Duration,
    /// The floor under a learned limit, in percent of the configured figure.
    pub learned_floor_percent: u32,
    /// WeChat's day, which ends at midnight UTC+8: 86,400 s, shorter only in tests.
    pub day: Duration,
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
    /// The most keys (API, appid) holding a token or a refused token's memory; past it the
    /// token stored longest ago goes first.
    pub max_entries: usize,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis every replica shares, in one of its forms; its user and password from the
    /// URL or `WXGATE_REDIS_USERNAME` and `WXGATE_REDIS_PASSWORD`.
    pub redis: RedisTarget,
    /// Prepended to every key, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// The longest one Redis operation may take before the replica stops waiting for it and
    /// degrades.
    pub timeout: Duration,
    /// The fewest replicas a degraded replica's share assumes: its share of a quota is
    /// `per_window / max(expected_replicas, live replicas)`, and a replica that starts
    /// without Redis (and so has counted nobody) divides by it alone.
    pub expected_replicas: u32,
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
    /// Reads and validates a file (of at most [`files::MAX_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<CheckedConfig, ConfigErrors> {
        let cannot =
            |why: String| ConfigErrors(vec![format!("cannot read {}: {why}", path.display())]);
        let bytes = files::read_limited(path).map_err(|error| match error {
            files::FileError::Unreadable(error) => cannot(error.to_string()),
            files::FileError::TooLarge(error) => cannot(error.to_string()),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| cannot("not UTF-8 text".into()))?;
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
mod tests;
