//! The metrics of upstream calls: every attempt WeChat answered (by errcode) or did not (by
//! reason), its duration, the 45011s received, the retries sent, the waits for a quota turn,
//! and how many (appid, API) keys have quota state.

use prometheus::{Histogram, IntCounter, IntGauge};
use wxgate_contract::RetryReason;

use crate::metrics::{api_label, Label, Metrics, Series, LATENCY_BUCKETS};
use crate::upstream::TransportError;
use crate::wechat::{errcode_labels, Api, Errcode, MINUTE_QUOTA};

/// Quota-wait buckets in seconds: most requests never wait (they are not observed at all);
/// those that do wait anything from a token's spacing (milliseconds) to `max_wait_ms`.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The handles of the upstream calls' metrics, by [`Api::index`] and the index of their
/// second label.
#[derive(Clone)]
pub struct CallMetrics {
    answers: Series<IntCounter>,
    transport_errors: Series<IntCounter>,
    duration: Series<Histogram>,
    quota_exceeded: Series<IntCounter>,
    retries: Series<IntCounter>,
    quota_wait: Series<Histogram>,
    /// (appid, API) pairs with quota state right now.
    pub quota_keys: IntGauge,
}

impl CallMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<CallMetrics> {
        Ok(CallMetrics {
            answers: metrics.counters(
                "wxgate_upstream_requests_total",
                "Calls sent to WeChat that got an answer, retries included, by the errcode of the answer.",
                &[api_label(), Label::new("errcode", errcode_labels())],
            )?,
            transport_errors: metrics.counters(
                "wxgate_upstream_transport_errors_total",
                "Calls sent to WeChat that got no answer, by reason.",
                &[api_label(), Label::new("reason", TransportError::LABELS)],
            )?,
            duration: metrics.histograms(
                "wxgate_upstream_duration_seconds",
                "Time of one call to WeChat, from sending to the whole answer.",
                LATENCY_BUCKETS,
                &[api_label()],
            )?,
            quota_exceeded: metrics.counters(
                "wxgate_upstream_quota_exceeded_total",
                "45011 answers received from WeChat.",
                &[api_label()],
            )?,
            retries: metrics.counters(
                "wxgate_retries_total",
                "Calls sent to WeChat again, by reason.",
                &[api_label(), Label::new("reason", RetryReason::ALL.map(RetryReason::label))],
            )?,
            quota_wait: metrics.histograms(
                "wxgate_quota_wait_seconds",
                "Time a call waited for its turn in the quota (calls that did not wait are not observed).",
                WAIT_BUCKETS,
                &[api_label()],
            )?,
            quota_keys: metrics.gauge(
                "wxgate_quota_keys",
                "(appid, API) pairs that have quota state right now.",
            )?,
        })
    }

    /// An upstream call got an answer.
    pub fn upstream_answer(&self, api: Api, errcode: Errcode, seconds: f64) {
        self.answers.get2(api.index(), errcode.label_index()).inc();
        self.duration.get(api.index()).observe(seconds);
        if errcode == Errcode::Code(MINUTE_QUOTA) {
            self.quota_exceeded.get(api.index()).inc();
        }
    }

    /// An upstream call got no answer.
    pub fn upstream_failure(&self, api: Api, error: TransportError, seconds: f64) {
        self.transport_errors.get2(api.index(), error.index()).inc();
        self.duration.get(api.index()).observe(seconds);
    }

    /// A call waited this long for its quota turn.
    pub fn quota_wait(&self, api: Api, seconds: f64) {
        self.quota_wait.get(api.index()).observe(seconds);
    }

    /// A call is sent upstream again.
    pub fn retry(&self, api: Api, reason: RetryReason) {
        self.retries.get2(api.index(), reason.index()).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition;
    use prometheus::Registry;

    #[test]
    fn series_exist_from_the_start_and_count() {
        let registry = Registry::new();
        let metrics = CallMetrics::new(&Metrics::new(&registry).unwrap()).unwrap();
        metrics.upstream_answer(Api::Token, Errcode::Code(45011), 0.01);
        metrics.upstream_answer(Api::Token, Errcode::Code(99999), 0.01);
        metrics.retry(Api::Token, RetryReason::MinuteQuota);
        let text = exposition(&registry);
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
        // Two proxies in one process do not collide.
        CallMetrics::new(&Metrics::new(&Registry::new()).unwrap()).unwrap();
    }
}
