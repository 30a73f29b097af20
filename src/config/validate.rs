//! The raw structs of [`super`] → a typed [`Config`]: every key checked, then the rules
//! between keys, each problem recorded with its key path.
//!
//! A check that yields no value records why, and a check that needs another key's value
//! runs only when that value is valid: one mistake gives one message.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use super::checks::{Checks, Key};
use super::cluster::CLUSTER_SECRET_ENV;
use super::redis::{
    Credentials, NodeAddress, NodeSettings, RedisForm, RedisTarget, RedisUrlError,
    REDIS_PASSWORD_ENV, REDIS_USERNAME_ENV, SENTINEL_PASSWORD_ENV, SENTINEL_USERNAME_ENV,
};
use super::{
    AllowList, BaseUrl, CaFile, ClusterConfig, ClusterSecret, CodeCacheConfig, Config, LogConfig,
    QuotaConfig, QuotaLimit, RawCluster, RawCodeCache, RawConfig, RawLimit, RawLog, RawQuota,
    RawRetry, RawServer, RawServerTls, RawTokenCache, RawUpstream, RedisUrl, RetryConfig,
    ServerConfig, ServerTlsConfig, TokenCacheConfig, UpstreamConfig, HOLD_BEYOND_WINDOW,
    MARGIN_AT_A_MINUTE,
};
use crate::wechat::Api;

/// `key!(raw.listen)` is `("listen", &raw.listen)`: a key's name in messages is its field's
/// name, so the key is spelled once.
macro_rules! key {
    ($raw:ident . $field:ident) => {
        (stringify!($field), &$raw.$field)
    };
}

/// `name!(raw.listen)` is `"listen"`, checked to be a field of `raw`.
macro_rules! name {
    ($raw:ident . $field:ident) => {{
        let _ = &$raw.$field;
        stringify!($field)
    }};
}

impl RawConfig {
    /// Checks every key and the rules between keys, recording each problem in `problems`;
    /// the typed configuration if every value could be built (a value that cannot be built
    /// always records a problem, so `Some` with problems only means more were found).
    pub(super) fn validate(&self, problems: &mut Vec<String>) -> Option<Config> {
        let raw = self;
        let server = check_server(&mut Checks::new(problems, name!(raw.server)), &raw.server);
        let upstream = check_upstream(
            &mut Checks::new(problems, name!(raw.upstream)),
            &raw.upstream,
        );
        let code_cache = check_code_cache(
            &mut Checks::new(problems, name!(raw.code_cache)),
            &raw.code_cache,
        );
        let (quota, window) = check_quota(&mut Checks::new(problems, name!(raw.quota)), &raw.quota);
        let retry = check_retry(
            &mut Checks::new(problems, name!(raw.retry)),
            &raw.retry,
            window,
        );
        let log = check_log(&mut Checks::new(problems, name!(raw.log)), &raw.log);
        let token_cache = check_token_cache(
            &mut Checks::new(problems, name!(raw.token_cache)),
            &raw.token_cache,
        );
        let cluster = match &raw.cluster {
            None => Some(None),
            Some(cluster) => {
                check_cluster(&mut Checks::new(problems, name!(raw.cluster)), cluster).map(Some)
            }
        };
        Some(Config {
            server: server?,
            upstream: upstream?,
            code_cache: code_cache?,
            quota: quota?,
            retry: retry?,
            token_cache: token_cache?,
            cluster: cluster?,
            log: log?,
        })
    }

    /// These values with every default that depends on another key written in, as
    /// validation chose it, so that `check-config` shows it.
    pub(super) fn fill_derived(mut self, config: &Config) -> RawConfig {
        let quota = &config.quota;
        self.quota.burst = Some(quota.default.burst.into());
        let overrides = self
            .quota
            .apis
            .iter_mut()
            .map(|(path, raw)| (raw, quota.apis.get(&Api::from_path(path))));
        let appids = self
            .quota
            .appids
            .iter_mut()
            .map(|(appid, raw)| (raw, quota.appids.get(appid)));
        for (raw, limit) in overrides.chain(appids) {
            if let Some(limit) = limit {
                raw.per_window = Some(limit.per_window.into());
                raw.burst = Some(limit.burst.into());
            }
        }
        self.quota.arrival_margin_ms = Some(millis(quota.arrival_margin));
        self.retry.max_hold_ms = Some(millis(config.retry.max_hold));
        self
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn check_server(c: &mut Checks, raw: &RawServer) -> Option<ServerConfig> {
    let listen = c.socket_addr(key!(raw.listen));
    let admin_listen = c.socket_addr(key!(raw.admin_listen));
    let max_body_bytes = c.int(key!(raw.max_body_bytes), 1..=1 << 30);
    let shutdown_grace = c.millis(key!(raw.shutdown_grace_ms), 0..=3_600_000);
    let request_head_timeout = c.millis(key!(raw.request_head_timeout_ms), 1..=3_600_000);
    let idle_timeout = c.millis(key!(raw.idle_timeout_ms), 1..=3_600_000);
    let body_timeout = c.millis(key!(raw.body_timeout_ms), 1..=3_600_000);
    let max_connections = c.int(key!(raw.max_connections), 1..=10_000_000);
    let allow = match &raw.allow {
        None => Some(AllowList::everyone()),
        Some(entries) => check_allow(c, name!(raw.allow), entries),
    };
    let tls = match &raw.tls {
        None => Some(None),
        Some(tls) => check_server_tls(&mut c.table(name!(raw.tls)), tls).map(Some),
    };
    if let (Some(proxy), Some(admin)) = (listen, admin_listen) {
        if proxy == admin && proxy.port() != 0 {
            let other = c.path(name!(raw.listen));
            c.problem(
                name!(raw.admin_listen),
                format!("must differ from {other} ({proxy}): metrics never share the proxy port"),
            );
        }
    }
    Some(ServerConfig {
        listen: listen?,
        admin_listen: admin_listen?,
        max_body_bytes: max_body_bytes?,
        shutdown_grace: shutdown_grace?,
        request_head_timeout: request_head_timeout?,
        idle_timeout: idle_timeout?,
        body_timeout: body_timeout?,
        max_connections: max_connections?,
        allow: allow?,
        tls: tls?,
    })
}

/// `server.allow`: every entry is read, and each one that is not an address or a block is
/// reported by its index (`server.allow[2]`), so one pass over the file finds them all.
fn check_allow(c: &mut Checks, key: &'static str, entries: &[toml::Value]) -> Option<AllowList> {
    let mut blocks = Vec::with_capacity(entries.len());
    let mut valid = true;
    for (index, entry) in entries.iter().enumerate() {
        let parsed = match entry {
            toml::Value::String(entry) => AllowList::parse_entry(entry).map_err(|e| e.to_string()),
            // Worded as the read layer words a value of the wrong type.
            other => Err(format!("expected a string, found {}", other.type_str())),
        };
        match parsed {
            Ok(block) => blocks.push(block),
            Err(problem) => {
                c.problem(&format!("{key}[{index}]"), problem);
                valid = false;
            }
        }
    }
    if !valid {
        return None;
    }
    let allow = AllowList::only(blocks);
    if allow.is_none() {
        c.problem(
            key,
            "an empty list would refuse every client: leave the key out to allow every address",
        );
    }
    allow
}

/// A key naming a file that its table cannot do without.
fn required_file<'a>(c: &mut Checks, (key, path): Key<'a, Option<String>>) -> Option<&'a Path> {
    if path.is_none() {
        c.problem(key, "is required in [server.tls] (a PEM file)");
    }
    path.as_deref().map(Path::new)
}

/// `[server.tls]`: both files read and checked now (see `config/server_tls.rs`); the key is
/// checked against the certificate only once the certificate could be read.
fn check_server_tls(c: &mut Checks, raw: &RawServerTls) -> Option<ServerTlsConfig> {
    let cert_file = required_file(c, key!(raw.cert_file));
    let key_file = required_file(c, key!(raw.key_file));
    let chain =
        cert_file.and_then(|path| c.check(name!(raw.cert_file), ServerTlsConfig::read_chain(path)));
    let cert_key = c.path(name!(raw.cert_file));
    let (cert_file, chain, key_file) = (cert_file?, chain?, key_file?);
    c.check(
        name!(raw.key_file),
        ServerTlsConfig::load(cert_file, chain, key_file, &cert_key),
    )
}

fn check_upstream(c: &mut Checks, raw: &RawUpstream) -> Option<UpstreamConfig> {
    let base_url = c.check(name!(raw.base_url), BaseUrl::parse(raw.base_url.expose()));
    let connect_timeout = c.millis(key!(raw.connect_timeout_ms), 1..=600_000);
    let timeout = c.millis(key!(raw.timeout_ms), 1..=600_000);
    let pool_max_idle = c.int(key!(raw.pool_max_idle), 0..=100_000);
    let pool_idle_timeout = c.millis(key!(raw.pool_idle_timeout_ms), 1..=3_600_000);
    let max_body_bytes = c.int(key!(raw.max_body_bytes), 1..=1 << 30);
    let max_connections = c.int(key!(raw.max_connections), 1..=100_000);
    let ca_file = match &raw.ca_file {
        None => Some(None),
        Some(path) => c
            .check(name!(raw.ca_file), CaFile::load(Path::new(path)))
            .map(Some),
    };
    Some(UpstreamConfig {
        base_url: base_url?,
        connect_timeout: connect_timeout?,
        timeout: timeout?,
        pool_max_idle: pool_max_idle?,
        pool_idle_timeout: pool_idle_timeout?,
        max_body_bytes: max_body_bytes?,
        max_connections: max_connections?,
        ca_file: ca_file?,
    })
}

/// `[cluster]`. The environment is read here: `WXGATE_REDIS_USERNAME` and
/// `WXGATE_REDIS_PASSWORD` when the URL has none (and for the Sentinel and Cluster forms),
/// the sentinels' `WXGATE_SENTINEL_*`, `WXGATE_CLUSTER_SECRET` when there is no
/// `secret_file`.
fn check_cluster(c: &mut Checks, raw: &RawCluster) -> Option<ClusterConfig> {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let credentials = Credentials::new(env(REDIS_USERNAME_ENV), env(REDIS_PASSWORD_ENV));
    let form = check_redis_form(c, raw, credentials);
    let ca_file = match &raw.ca_file {
        None => Some(None),
        Some(path) => c
            .check(name!(raw.ca_file), CaFile::load(Path::new(path)))
            .map(Some),
    };
    let prefix = &raw.key_prefix;
    let key_prefix =
        if (1..=64).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_graphic()) {
            Some(prefix.clone())
        } else {
            c.problem(
                name!(raw.key_prefix),
                "must be 1 to 64 visible ASCII characters, such as \"wxgate:\"",
            );
            None
        };
    let key_prefix = key_prefix.filter(|prefix| {
        let keeps_tags = keeps_hash_tags(prefix);
        if !keeps_tags {
            c.problem(
                name!(raw.key_prefix),
                "a '{' in it must be closed by a '}' in it, around at least one character (a Redis Cluster hash tag), or every key of a script would not share one slot",
            );
        }
        keeps_tags
    });
    let timeout = c.millis(key!(raw.timeout_ms), 1..=10_000);
    let expected_replicas = c.int(key!(raw.expected_replicas), 1..=1000);
    let secret = ClusterSecret::load(
        raw.secret_file.as_deref().map(std::path::Path::new),
        env(CLUSTER_SECRET_ENV),
    );
    let secret = c.check(name!(raw.secret_file), secret);
    Some(ClusterConfig {
        redis: RedisTarget {
            form: form?,
            ca_file: ca_file?,
        },
        key_prefix: key_prefix?,
        timeout: timeout?,
        expected_replicas: expected_replicas?,
        secret: secret?,
    })
}

/// Whether keys that start with `prefix` keep the hash tag wxgate puts after it: a prefix
/// without braces, or one with a tag of its own (then every key has that tag, which one
/// slot holds whole).
fn keeps_hash_tags(prefix: &str) -> bool {
    match prefix.find('{') {
        None => true,
        Some(open) => prefix[open + 1..].find('}').is_some_and(|close| close > 0),
    }
}

/// The one Redis form of `[cluster]`, each of its keys checked.
fn check_redis_form(
    c: &mut Checks,
    raw: &RawCluster,
    credentials: Credentials,
) -> Option<RedisForm> {
    let url = !raw.redis_url.is_empty();
    let sentinels = !raw.sentinels.is_empty();
    let nodes = !raw.cluster_nodes.is_empty();
    let forms = [url, sentinels, nodes]
        .into_iter()
        .filter(|given| *given)
        .count();
    if forms == 0 {
        c.problem(name!(raw.redis_url), RedisUrlError::Missing);
        return None;
    }
    if forms > 1 {
        for (given, key) in [
            (sentinels, name!(raw.sentinels)),
            (nodes, name!(raw.cluster_nodes)),
        ] {
            if given {
                c.problem(
                    key,
                    "one Redis form at a time: cluster.redis_url, cluster.sentinels (with cluster.sentinel_master) or cluster.cluster_nodes",
                );
            }
        }
        return None;
    }
    if !sentinels && raw.sentinel_master.is_some() {
        c.problem(
            name!(raw.sentinel_master),
            "only with cluster.sentinels (the sentinels that know this primary)",
        );
    }
    let settings = NodeSettings {
        tls: raw.tls,
        credentials,
    };
    if url {
        let parsed = c.check(
            name!(raw.redis_url),
            RedisUrl::parse(raw.redis_url.expose(), settings.credentials),
        )?;
        if raw.tls && !parsed.tls() {
            c.problem(
                name!(raw.tls),
                "cluster.redis_url says TLS with its scheme: write rediss:// (cluster.tls is for the sentinels and the cluster's nodes)",
            );
            return None;
        }
        return Some(RedisForm::Standalone(parsed));
    }
    if sentinels {
        let addresses = check_nodes(c, key!(raw.sentinels));
        let master = match raw.sentinel_master.as_deref() {
            Some(master) if !master.is_empty() && master.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(master.to_owned())
            }
            Some(_) => {
                c.problem(
                    name!(raw.sentinel_master),
                    "must be the name the sentinels monitor the primary by (sentinel monitor NAME ...)",
                );
                None
            }
            None => {
                c.problem(
                    name!(raw.sentinel_master),
                    "required with cluster.sentinels: the name the sentinels monitor the primary by (sentinel monitor NAME ...)",
                );
                None
            }
        };
        let env = |name: &str| std::env::var(name).ok();
        return Some(RedisForm::Sentinel {
            sentinels: addresses?,
            master: master?,
            nodes: settings,
            sentinel_credentials: Credentials::new(
                env(SENTINEL_USERNAME_ENV),
                env(SENTINEL_PASSWORD_ENV),
            ),
        });
    }
    let nodes = check_nodes(c, key!(raw.cluster_nodes))?;
    Some(RedisForm::Cluster { nodes, settings })
}

/// A list of `host:port`, each entry checked and reported by its index.
fn check_nodes(c: &mut Checks, (key, entries): Key<Vec<String>>) -> Option<Vec<NodeAddress>> {
    let mut nodes = Vec::with_capacity(entries.len());
    let mut valid = true;
    for (index, entry) in entries.iter().enumerate() {
        match NodeAddress::parse(entry) {
            Ok(node) => nodes.push(node),
            Err(problem) => {
                c.problem(&format!("{key}[{index}]"), problem);
                valid = false;
            }
        }
    }
    valid.then_some(nodes)
}

fn check_log(c: &mut Checks, raw: &RawLog) -> Option<LogConfig> {
    let json = match raw.format.as_str() {
        "text" => Some(false),
        "json" => Some(true),
        _ => {
            c.problem(name!(raw.format), "must be \"text\" or \"json\"");
            None
        }
    };
    let level = match tracing_subscriber::EnvFilter::try_new(&raw.level) {
        Ok(_) => Some(raw.level.clone()),
        Err(_) => {
            c.problem(
                name!(raw.level),
                "must be a level (error, warn, info, debug, trace) or tracing directives such as \"info,wxgate::access=off\"",
            );
            None
        }
    };
    Some(LogConfig {
        json: json?,
        level: level?,
    })
}

/// `[token_cache]`. `refresh_ahead_secs` stays under WeChat's five-minute overlap: a token
/// refreshed earlier than that before its expiry would stop working while callers still hold
/// it with a longer `expires_in`.
fn check_token_cache(c: &mut Checks, raw: &RawTokenCache) -> Option<TokenCacheConfig> {
    let refresh_ahead = c.secs(key!(raw.refresh_ahead_secs), 1..=299);
    let max_entries = c.int(key!(raw.max_entries), 1..=10_000_000);
    let (exclude_key, excluded) = key!(raw.exclude_appids);
    let mut exclude_appids = BTreeSet::new();
    for (index, appid) in excluded.iter().enumerate() {
        if crate::wechat::is_plausible_appid(appid) {
            exclude_appids.insert(appid.clone());
        } else {
            c.problem(&format!("{exclude_key}[{index}]"), "not a plausible appid");
        }
    }
    Some(TokenCacheConfig {
        enabled: raw.enabled,
        refresh_ahead: refresh_ahead?,
        exclude_appids,
        max_entries: max_entries?,
    })
}

fn check_code_cache(c: &mut Checks, raw: &RawCodeCache) -> Option<CodeCacheConfig> {
    let ttl = c.secs(key!(raw.ttl_secs), 1..=86_400);
    let max_entries = c.int(key!(raw.max_entries), 1..=100_000_000);
    Some(CodeCacheConfig {
        ttl: ttl?,
        max_entries: max_entries?,
    })
}

/// `[quota]` and its overrides; also the window with its key path, which `[retry]` is
/// checked against.
fn check_quota(
    c: &mut Checks,
    raw: &RawQuota,
) -> (Option<QuotaConfig>, Option<(String, Duration)>) {
    let window = c.secs(key!(raw.window_secs), 1..=86_400);
    let (per_window, value) = key!(raw.per_window);
    let default = check_limit(c, (per_window, Some(*value)), key!(raw.burst), None);
    let max_wait = c.millis(key!(raw.max_wait_ms), 0..=3_600_000);
    let (margin_key, margin) = key!(raw.arrival_margin_ms);
    let arrival_margin = match margin {
        Some(ms) => c.millis((margin_key, ms), 0..=60_000),
        None => window.map(default_margin),
    };
    let discovery_interval = c.secs(key!(raw.discovery_interval_secs), 1..=86_400);
    let discovery_wait = c.millis(key!(raw.discovery_wait_ms), 0..=60_000);
    let learned_hold = c.secs(key!(raw.learned_hold_secs), 0..=86_400);
    let learned_floor_percent = c.int(key!(raw.learned_floor_percent), 1..=100);
    let day = c.secs(key!(raw.day_secs), 1..=86_400);
    let mut apis = HashMap::new();
    for (path, limit) in &raw.apis {
        let mut o = c.nested(name!(raw.apis), path);
        let api = Api::from_path(path);
        if api == Api::Other {
            let known: Vec<&str> = Api::ALL[..Api::COUNT - 1]
                .iter()
                .map(|api| api.label())
                .collect();
            o.table_problem(format!(
                "not an API wxgate limits (one of: {})",
                known.join(", ")
            ));
            continue;
        }
        if let Some(limit) = check_override(&mut o, limit, default) {
            apis.insert(api, limit);
        }
    }
    let mut appids = HashMap::new();
    for (appid, limit) in &raw.appids {
        let mut o = c.nested(name!(raw.appids), appid);
        if !crate::wechat::is_plausible_appid(appid) {
            o.table_problem("not a plausible appid");
            continue;
        }
        if let Some(limit) = check_override(&mut o, limit, default) {
            appids.insert(appid.clone(), limit);
        }
    }
    let window_key = window.map(|window| (c.path(name!(raw.window_secs)), window));
    let quota = (|| {
        Some(QuotaConfig {
            window: window?,
            default: default?,
            apis,
            appids,
            max_wait: max_wait?,
            arrival_margin: arrival_margin?,
            discover: raw.discover,
            discovery_interval: discovery_interval?,
            discovery_wait: discovery_wait?,
            learned_hold: learned_hold?,
            learned_floor_percent: learned_floor_percent?,
            day: day?,
        })
    })();
    (quota, window_key)
}

/// `quota.arrival_margin_ms`'s default: [`MARGIN_AT_A_MINUTE`] for WeChat's minute, the same
/// share of a shorter or longer window (whole milliseconds).
fn default_margin(window: Duration) -> Duration {
    let millis = MARGIN_AT_A_MINUTE.as_millis() * window.as_millis() / 60_000;
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

fn check_override(
    c: &mut Checks,
    raw: &RawLimit,
    inherited: Option<QuotaLimit>,
) -> Option<QuotaLimit> {
    let (per_window, value) = key!(raw.per_window);
    check_limit(c, (per_window, *value), key!(raw.burst), inherited)
}

/// `per_window` and `burst` of one table. An absent `per_window` takes `inherited` whole
/// (`None` there means `[quota]`'s own limit is invalid and already reported); an absent
/// `burst` alone is about 10 % of `per_window`: the rest of the quota is spread over the
/// window.
fn check_limit(
    c: &mut Checks,
    (per_window_key, per_window): (&'static str, Option<i64>),
    (burst_key, burst): Key<Option<i64>>,
    inherited: Option<QuotaLimit>,
) -> Option<QuotaLimit> {
    let range = 1..=100_000_000;
    let checked_per_window = per_window.map(|n| c.int::<u32>((per_window_key, &n), range.clone()));
    let checked_burst = burst.map(|n| c.int::<u32>((burst_key, &n), range));
    let per_window = match checked_per_window {
        Some(checked) => checked?,
        None => inherited?.per_window,
    };
    let burst = match (checked_burst, checked_per_window) {
        (Some(checked), _) => checked?,
        (None, None) => inherited?.burst,
        (None, Some(_)) => (per_window / 10).max(1),
    };
    if burst > per_window {
        c.problem(
            burst_key,
            format!("{burst} is larger than {per_window_key} ({per_window}): a burst cannot exceed the quota"),
        );
        return None;
    }
    Some(QuotaLimit { per_window, burst })
}

fn check_retry(
    c: &mut Checks,
    raw: &RawRetry,
    window: Option<(String, Duration)>,
) -> Option<RetryConfig> {
    let (max_hold_key, max_hold) = key!(raw.max_hold_ms);
    let max_hold = match max_hold {
        Some(ms) => c.millis((max_hold_key, ms), 0..=3_600_000),
        // Without a valid window, its problem is reported already.
        None => window
            .as_ref()
            .map(|(_, window)| *window + HOLD_BEYOND_WINDOW),
    };
    let busy_attempts = c.int(key!(raw.busy_attempts), 0..=10);
    if let (Some(max_hold), Some((window_key, window))) = (max_hold, &window) {
        if max_hold < *window {
            c.problem(
                max_hold_key,
                format!(
                    "{} is shorter than {window_key} ({} s): a request held after a 45011 could never reach the next window",
                    max_hold.as_millis(),
                    window.as_secs()
                ),
            );
        }
    }
    Some(RetryConfig {
        max_hold: max_hold?,
        busy_attempts: busy_attempts?,
    })
}
