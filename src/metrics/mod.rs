//! wxgate's Prometheus metrics: one struct of handles registered against a registry that is
//! passed in (no global registry, so several proxies in one test process do not collide).
//!
//! Every label value comes from a bounded set ([`Api`], [`Outcome`], the errcode labels of
//! [`crate::wechat`], [`RetryReason`], [`TransportError`], [`CloseReason`]), and every series
//! is created at
//! start-up, so a dashboard sees zeros rather than gaps and the hot path indexes an array
//! instead of hashing label values.

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::server::CloseReason;
use crate::upstream::TransportError;
use crate::wechat::Api;
use crate::wechat::{errcode_labels, Errcode};

mod cluster;
mod tokens;

pub use self::cluster::{ClusterMetrics, RedisErrorKind, RedisOp};
pub use self::tokens::{TokenMetrics, TokenOutcome};
pub use wxgate_contract::{Outcome, RetryReason};

/// Where a code-exchange answer was looked for: the `tier` label of
/// `wxgate_code_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// This process's memory.
    Local,
    /// Redis, shared by the replicas (with `[cluster]`).
    Redis,
}

impl Tier {
    const ALL: [Tier; 2] = [Tier::Local, Tier::Redis];

    fn label(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Redis => "redis",
        }
    }
}

/// What a look-up found: the `result` label of `wxgate_code_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// A remembered answer.
    Hit,
    /// An identical exchange in flight, joined.
    Joined,
    /// Nothing: this caller makes (or, in Redis, claims) the call.
    Miss,
}

impl LookupResult {
    const ALL: [LookupResult; 3] = [LookupResult::Hit, LookupResult::Joined, LookupResult::Miss];

    fn label(self) -> &'static str {
        match self {
            LookupResult::Hit => "hit",
            LookupResult::Joined => "joined",
            LookupResult::Miss => "miss",
        }
    }
}

/// Latency buckets in seconds. The low end resolves the sub-millisecond cost of a cache hit
/// or a loopback upstream; the high end covers requests held across a 45011 into the next
/// minute (`retry.max_hold_ms`, 65 s by default).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Quota-wait buckets in seconds: most requests never wait (they are not observed at all);
/// those that do wait anything from a token's spacing (milliseconds) to `max_wait_ms`.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The handles of every wxgate metric. Per-label series are tables indexed by the labels'
/// positions (`requests[api][outcome]`), filled at start-up.
#[derive(Clone)]
pub struct Metrics {
    requests: Vec<Vec<IntCounter>>,
    upstream_requests: Vec<Vec<IntCounter>>,
    transport_errors: Vec<Vec<IntCounter>>,
    request_duration: Vec<Histogram>,
    upstream_duration: Vec<Histogram>,
    quota_wait: Vec<Histogram>,
    quota_exceeded: Vec<IntCounter>,
    retries: Vec<Vec<IntCounter>>,
    /// `[tier][result]`.
    code_lookups: [Vec<IntCounter>; 2],
    /// Client requests being answered right now.
    inflight: IntGauge,
    /// Code-exchange answers remembered right now.
    pub code_cache_entries: IntGauge,
    /// (appid, API) pairs with quota state right now.
    pub quota_keys: IntGauge,
    /// `[success, failure]`.
    config_reloads: [IntCounter; 2],
    config_last_success: Gauge,
    /// 1 while the last load or reload succeeded, 0 after a refused one.
    config_last_successful: IntGauge,
    /// Client connections of the proxy port.
    pub connections: ConnectionMetrics,
    /// The token cache's metrics.
    pub tokens: TokenMetrics,
}

/// The proxy port's client connections: how many are open, the cap, and those wxgate closed
/// itself, by reason.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Open right now.
    pub open: IntGauge,
    /// The cap in force (`server.max_connections`, or less to fit the open-files limit).
    pub limit: IntGauge,
    closed: Vec<IntCounter>,
}

impl ConnectionMetrics {
    /// wxgate closed a connection (or refused a new one) for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].inc();
    }
}

/// Counts a request in `wxgate_inflight_requests` while it lives.
pub struct InflightRequest(IntGauge);

impl Drop for InflightRequest {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Creates every series and registers it with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "wxgate_requests_total",
                "Client requests answered, by API and by how they were answered.",
            ),
            &["api", "outcome"],
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "wxgate_upstream_requests_total",
                "Calls sent to WeChat that got an answer, retries included, by the errcode of the answer.",
            ),
            &["api", "errcode"],
        )?;
        let transport_errors = IntCounterVec::new(
            Opts::new(
                "wxgate_upstream_transport_errors_total",
                "Calls sent to WeChat that got no answer, by reason.",
            ),
            &["api", "reason"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "wxgate_request_duration_seconds",
                "Time from a client request's arrival to its answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "wxgate_upstream_duration_seconds",
                "Time of one call to WeChat, from sending to the whole answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        )?;
        let quota_wait = HistogramVec::new(
            HistogramOpts::new(
                "wxgate_quota_wait_seconds",
                "Time a call waited for its turn in the quota (calls that did not wait are not observed).",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
            &["api"],
        )?;
        let quota_exceeded = IntCounterVec::new(
            Opts::new(
                "wxgate_upstream_quota_exceeded_total",
                "45011 answers received from WeChat.",
            ),
            &["api"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "wxgate_retries_total",
                "Calls sent to WeChat again, by reason.",
            ),
            &["api", "reason"],
        )?;
        let code_lookups = IntCounterVec::new(
            Opts::new(
                "wxgate_code_cache_lookups_total",
                "Code-exchange answers looked for, by where (local memory, or Redis with [cluster]) and what was found.",
            ),
            &["tier", "result"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "wxgate_config_reloads_total",
                "Configuration loads (at start) and reloads, by result.",
            ),
            &["result"],
        )?;
        let config_last_success = Gauge::new(
            "wxgate_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded or reloaded successfully (UNIX time).",
        )?;
        let config_last_successful = IntGauge::new(
            "wxgate_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, 0 if the last reload was refused (the running configuration stayed).",
        )?;
        // The configuration in force was valid: wxgate starts with no other.
        config_last_successful.set(1);
        let inflight = IntGauge::new(
            "wxgate_inflight_requests",
            "Client requests being answered right now.",
        )?;
        let code_cache_entries = IntGauge::new(
            "wxgate_code_cache_entries",
            "Code-exchange answers remembered right now.",
        )?;
        let quota_keys = IntGauge::new(
            "wxgate_quota_keys",
            "(appid, API) pairs that have quota state right now.",
        )?;
        let connections_open = IntGauge::new(
            "wxgate_connections_open",
            "Client connections open on the proxy port right now.",
        )?;
        let connections_limit = IntGauge::new(
            "wxgate_connections_limit",
            "The cap on open client connections in force: server.max_connections, or less to fit the open-files limit.",
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "wxgate_connections_closed_total",
                "Client connections wxgate closed itself, by reason: head_timeout (no complete request head, or TLS handshake, in time), idle (no request for idle_timeout), cap (closed to admit a new one), refused (a new one at the cap with none idle), not_allowed (from an address outside server.allow), tls_handshake (a failed TLS handshake).",
            ),
            &["reason"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "wxgate_build_info",
                "Always 1; the version label says which wxgate runs.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(transport_errors.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(quota_wait.clone()))?;
        registry.register(Box::new(quota_exceeded.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(code_lookups.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_last_success.clone()))?;
        registry.register(Box::new(config_last_successful.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(code_cache_entries.clone()))?;
        registry.register(Box::new(quota_keys.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_limit.clone()))?;
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(build_info))?;
        // process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total...: the
        // standard process metrics, for memory and file-descriptor panels and alerts.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.label()).collect();
        let errcodes: Vec<&str> = errcode_labels().collect();
        let reasons = TransportError::LABELS;
        let retry_reasons: Vec<&str> = RetryReason::ALL.iter().map(|r| r.label()).collect();
        Ok(Metrics {
            requests: per_api_and(&requests, &outcomes),
            upstream_requests: per_api_and(&upstream_requests, &errcodes),
            transport_errors: per_api_and(&transport_errors, &reasons),
            request_duration: per_api(&request_duration),
            upstream_duration: per_api(&upstream_duration),
            quota_wait: per_api(&quota_wait),
            quota_exceeded: per_api(&quota_exceeded),
            retries: per_api_and(&retries, &retry_reasons),
            code_lookups: Tier::ALL.map(|tier| {
                LookupResult::ALL
                    .iter()
                    .map(|result| code_lookups.with_label_values(&[tier.label(), result.label()]))
                    .collect()
            }),
            inflight,
            code_cache_entries,
            quota_keys,
            config_reloads: ["success", "failure"]
                .map(|result| config_reloads.with_label_values(&[result])),
            config_last_success,
            config_last_successful,
            connections: ConnectionMetrics {
                open: connections_open,
                limit: connections_limit,
                closed: CloseReason::ALL
                    .iter()
                    .map(|reason| connections_closed.with_label_values(&[reason.label()]))
                    .collect(),
            },
            tokens: TokenMetrics::new(registry)?,
        })
    }

    /// A client request arrived; it counts as in flight until the guard is dropped.
    pub fn inflight_request(&self) -> InflightRequest {
        self.inflight.inc();
        InflightRequest(self.inflight.clone())
    }

    /// A client request was answered.
    pub fn request(&self, api: Api, outcome: Outcome, seconds: f64) {
        self.requests[api.index()][outcome.index()].inc();
        self.request_duration[api.index()].observe(seconds);
    }

    /// An upstream call got an answer.
    pub fn upstream_answer(&self, api: Api, errcode: Errcode, seconds: f64) {
        self.upstream_requests[api.index()][errcode.label_index()].inc();
        self.upstream_duration[api.index()].observe(seconds);
        if errcode == Errcode::Code(crate::wechat::MINUTE_QUOTA) {
            self.quota_exceeded[api.index()].inc();
        }
    }

    /// An upstream call got no answer.
    pub fn upstream_failure(&self, api: Api, error: TransportError, seconds: f64) {
        self.transport_errors[api.index()][error.index()].inc();
        self.upstream_duration[api.index()].observe(seconds);
    }

    /// A call waited this long for its quota turn.
    pub fn quota_wait(&self, api: Api, seconds: f64) {
        self.quota_wait[api.index()].observe(seconds);
    }

    /// The configuration was loaded or reloaded (`success`), or a reload was refused, at
    /// `timestamp` (UNIX seconds).
    pub fn config_reloaded(&self, success: bool, timestamp: f64) {
        self.config_reloads[usize::from(!success)].inc();
        self.config_last_successful.set(i64::from(success));
        if success {
            self.config_last_success.set(timestamp);
        }
    }

    /// A code-exchange answer was looked for.
    pub fn code_lookup(&self, tier: Tier, result: LookupResult) {
        self.code_lookups[tier as usize][result as usize].inc();
    }

    /// A call is sent upstream again.
    pub fn retry(&self, api: Api, reason: RetryReason) {
        self.retries[api.index()][reason.index()].inc();
    }
}

/// The series of a metric labelled by `api` only, in [`Api::ALL`] order.
fn per_api<M: MetricVecBuilder>(vec: &MetricVec<M>) -> Vec<M::M> {
    Api::ALL
        .iter()
        .map(|api| vec.with_label_values(&[api.label()]))
        .collect()
}

/// The series of a metric labelled by `api` and one more label, whose values are `second`
/// in their index order.
fn per_api_and<M: MetricVecBuilder>(vec: &MetricVec<M>, second: &[&str]) -> Vec<Vec<M::M>> {
    Api::ALL
        .iter()
        .map(|api| {
            second
                .iter()
                .map(|value| vec.with_label_values(&[api.label(), value]))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn series_exist_from_the_start_and_count() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        metrics.request(Api::JsCode2Session, Outcome::CacheHit, 0.001);
        metrics.upstream_answer(Api::Token, Errcode::Code(45011), 0.01);
        metrics.upstream_answer(Api::Token, Errcode::Code(99999), 0.01);
        metrics.retry(Api::Token, RetryReason::MinuteQuota);
        metrics.connections.closed(CloseReason::Cap);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(
            "wxgate_requests_total{api=\"/sns/jscode2session\",outcome=\"cache_hit\"} 1"
        ));
        assert!(text.contains("wxgate_requests_total{api=\"other\",outcome=\"forwarded\"} 0"));
        assert!(text.contains(
            "wxgate_upstream_requests_total{api=\"/cgi-bin/token\",errcode=\"45011\"} 1"
        ));
        assert!(text.contains(
            "wxgate_upstream_requests_total{api=\"/cgi-bin/token\",errcode=\"other\"} 1"
        ));
        assert!(text.contains("wxgate_upstream_quota_exceeded_total{api=\"/cgi-bin/token\"} 1"));
        assert!(
            text.contains("wxgate_retries_total{api=\"/cgi-bin/token\",reason=\"minute_quota\"} 1")
        );
        assert!(text.contains("wxgate_connections_closed_total{reason=\"cap\"} 1"));
        assert!(text.contains("wxgate_connections_closed_total{reason=\"head_timeout\"} 0"));
        // Two proxies in one process do not collide.
        Metrics::new(&Registry::new()).unwrap();
    }
}
