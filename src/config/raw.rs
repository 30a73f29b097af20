//! The raw layer of the configuration: the file as written, TOML-level types, defaults for
//! absent keys. The field names are the keys (no `rename`): messages take key names from
//! them, so each key is spelled once. `config/read.rs` fills these from the text,
//! `config/validate.rs` turns them into the typed `Config`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::read::{Secret, UrlPassword};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawConfig {
    pub(crate) server: RawServer,
    pub(crate) upstream: RawUpstream,
    pub(crate) code_cache: RawCodeCache,
    pub(crate) quota: RawQuota,
    pub(crate) retry: RawRetry,
    pub(crate) token_cache: RawTokenCache,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster: Option<RawCluster>,
    pub(crate) log: RawLog,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawLog {
    /// `text` or `json`.
    pub(crate) format: String,
    pub(crate) level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawServer {
    pub(crate) listen: String,
    pub(crate) admin_listen: String,
    pub(crate) max_body_bytes: i64,
    pub(crate) shutdown_grace_ms: i64,
    pub(crate) request_head_timeout_ms: i64,
    pub(crate) idle_timeout_ms: i64,
    pub(crate) body_timeout_ms: i64,
    pub(crate) max_connections: i64,
    /// Absent: every address may connect. Entries are read as any TOML value and their type
    /// checked at validation: the read layer takes a wrongly typed value out, which would
    /// shift the index of every entry after it in the messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allow: Option<Vec<toml::Value>>,
    /// Absent: plain HTTP. Last: TOML writes tables after values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<RawServerTls>,
}

/// `[server.tls]`: both keys are required once the table is there.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawServerTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_file: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 1 << 20,
            shutdown_grace_ms: 10_000,
            request_head_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            max_connections: 10_000,
            allow: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawUpstream {
    /// May carry a password in its userinfo.
    pub(crate) base_url: Secret<UrlPassword>,
    pub(crate) connect_timeout_ms: i64,
    pub(crate) timeout_ms: i64,
    pub(crate) pool_max_idle: i64,
    pub(crate) pool_idle_timeout_ms: i64,
    pub(crate) max_body_bytes: i64,
    pub(crate) max_connections: i64,
    /// Absent: the webpki roots alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<String>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            base_url: Secret::new("https://api.weixin.qq.com"),
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            pool_max_idle: 512,
            // Under the 5 s of Apache's and Node's defaults, and far under nginx's 75 s.
            pool_idle_timeout_ms: 4_000,
            max_body_bytes: 4 << 20,
            max_connections: 256,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawCodeCache {
    pub(crate) ttl_secs: i64,
    pub(crate) max_entries: i64,
}

impl Default for RawCodeCache {
    fn default() -> Self {
        RawCodeCache {
            ttl_secs: 300,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawQuota {
    pub(crate) window_secs: i64,
    pub(crate) per_window: i64,
    /// Absent: 10 % of `per_window`, at least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<i64>,
    pub(crate) max_wait_ms: i64,
    /// Absent: [`MARGIN_AT_A_MINUTE`] scaled to `window_secs` (0.42 % of the window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) arrival_margin_ms: Option<i64>,
    pub(crate) discover: bool,
    pub(crate) discovery_interval_secs: i64,
    pub(crate) discovery_wait_ms: i64,
    pub(crate) learned_hold_secs: i64,
    pub(crate) learned_floor_percent: i64,
    /// For tests only: the length of WeChat's day (its daily quotas end at midnight UTC+8).
    pub(crate) day_secs: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) apis: BTreeMap<String, RawLimit>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) appids: BTreeMap<String, RawLimit>,
}

impl Default for RawQuota {
    fn default() -> Self {
        RawQuota {
            window_secs: 60,
            per_window: 5_000,
            burst: None,
            max_wait_ms: 3_000,
            arrival_margin_ms: None,
            discover: true,
            discovery_interval_secs: 300,
            discovery_wait_ms: 1_000,
            learned_hold_secs: 600,
            learned_floor_percent: 50,
            day_secs: 86_400,
            apis: BTreeMap::new(),
            appids: BTreeMap::new(),
        }
    }
}

/// `[quota.apis."/path"]` and `[quota.appids."wx…"]`. Absent `per_window`: `[quota]`'s
/// limit (burst included, unless given); absent `burst` only: 10 % of `per_window`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawLimit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) per_window: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawRetry {
    /// Absent: the quota window plus [`HOLD_BEYOND_WINDOW`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_hold_ms: Option<i64>,
    pub(crate) busy_attempts: i64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_hold_ms: None,
            busy_attempts: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawTokenCache {
    pub(crate) enabled: bool,
    pub(crate) refresh_ahead_secs: i64,
    pub(crate) exclude_appids: Vec<String>,
    pub(crate) max_entries: i64,
}

impl Default for RawTokenCache {
    fn default() -> Self {
        RawTokenCache {
            enabled: true,
            // A minute inside WeChat's five-minute overlap: room for clock skew and a slow
            // fetch.
            refresh_ahead_secs: 240,
            exclude_appids: Vec::new(),
            // Far beyond the appids one backend serves (about 50 MB at most).
            max_entries: 100_000,
        }
    }
}

/// `[cluster]`: present only when the replicas share state. One Redis form:
/// `redis_url`, or `sentinels` with `sentinel_master`, or `cluster_nodes`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct RawCluster {
    /// `redis://` or `rediss://`; may carry a user and a password.
    #[serde(skip_serializing_if = "Secret::is_empty")]
    pub(crate) redis_url: Secret<UrlPassword>,
    /// `host:port` of each sentinel.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) sentinels: Vec<String>,
    /// The name the sentinels know the primary by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sentinel_master: Option<String>,
    /// `host:port` of Redis Cluster seed nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) cluster_nodes: Vec<String>,
    /// TLS to the sentinels, the primary and the cluster's nodes (`redis_url` says it with
    /// its scheme).
    pub(crate) tls: bool,
    /// Absent: the webpki roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<String>,
    pub(crate) key_prefix: String,
    pub(crate) timeout_ms: i64,
    pub(crate) expected_replicas: i64,
    /// Absent: the secret comes from `WXGATE_CLUSTER_SECRET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) secret_file: Option<String>,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            redis_url: Secret::new(""),
            sentinels: Vec::new(),
            sentinel_master: None,
            cluster_nodes: Vec::new(),
            tls: false,
            ca_file: None,
            key_prefix: "wxgate:".into(),
            timeout_ms: 50,
            // Production runs two or more replicas.
            expected_replicas: 2,
            secret_file: None,
        }
    }
}

/// `quota.arrival_margin_ms`'s default for WeChat's minute: what a fresh connection's
/// handshakes (two or three round trips to a WeChat tens of milliseconds away) add to one
/// call and not to another, with room to spare; 0.42 % of a minute's quota. Shorter
/// windows get a proportionally shorter default (see `docs/guarantees.md`).
pub(super) const MARGIN_AT_A_MINUTE: Duration = Duration::from_millis(250);

/// `retry.max_hold_ms`'s default beyond the window: time for the held request's next call.
pub(super) const HOLD_BEYOND_WINDOW: Duration = Duration::from_secs(5);
