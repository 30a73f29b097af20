//! The request pipeline's metrics: client requests answered, by API and by how, their
//! duration, and those being answered right now.

use prometheus::{Histogram, IntCounter, IntGauge};
use wxgate_contract::Outcome;

use crate::metrics::{api_label, Label, Metrics, Series, LATENCY_BUCKETS};
use crate::wechat::Api;

/// The handles of the pipeline's metrics, by [`Api::index`] and [`Outcome::index`].
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Series<IntCounter>,
    duration: Series<Histogram>,
    /// Client requests being answered right now.
    inflight: IntGauge,
}

/// Counts a request in `wxgate_inflight_requests` while it lives.
pub struct InflightRequest(IntGauge);

impl Drop for InflightRequest {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<RequestMetrics> {
        Ok(RequestMetrics {
            requests: metrics.counters(
                "wxgate_requests_total",
                "Client requests answered, by API and by how they were answered.",
                &[
                    api_label(),
                    Label::new("outcome", Outcome::ALL.map(Outcome::label)),
                ],
            )?,
            duration: metrics.histograms(
                "wxgate_request_duration_seconds",
                "Time from a client request's arrival to its answer.",
                LATENCY_BUCKETS,
                &[api_label()],
            )?,
            inflight: metrics.gauge(
                "wxgate_inflight_requests",
                "Client requests being answered right now.",
            )?,
        })
    }

    /// A client request arrived; it counts as in flight until the guard is dropped.
    pub fn inflight_request(&self) -> InflightRequest {
        self.inflight.inc();
        InflightRequest(self.inflight.clone())
    }

    /// A client request was answered.
    pub fn answered(&self, api: Api, outcome: Outcome, seconds: f64) {
        self.requests.get2(api.index(), outcome.index()).inc();
        self.duration.get(api.index()).observe(seconds);
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
        let metrics = RequestMetrics::new(&Metrics::new(&registry).unwrap()).unwrap();
        metrics.answered(Api::JsCode2Session, Outcome::CacheHit, 0.001);
        let text = exposition(&registry);
        assert!(text.contains(
            "wxgate_requests_total{api=\"/sns/jscode2session\",outcome=\"cache_hit\"} 1"
        ));
        assert!(text.contains("wxgate_requests_total{api=\"other\",outcome=\"forwarded\"} 0"));
        // Two proxies in one process do not collide.
        RequestMetrics::new(&Metrics::new(&Registry::new()).unwrap()).unwrap();
    }
}
