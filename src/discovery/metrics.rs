//! The metrics of discovery: quota/get's answers by what they came to, and the highest share
//! of a daily quota used among the keys WeChat stated one for.

use prometheus::{Gauge, IntCounter};

use super::answer::Unstated;
use crate::metrics::{Label, Metrics, Series};

/// The handles of discovery's metrics.
pub struct DiscoveryMetrics {
    queries: Series<IntCounter>,
    /// `wxgate_quota_daily_used_ratio_max`.
    pub daily_used_max: Gauge,
}

/// The `result` label's values: `ok`, then [`Unstated::ALL`]'s.
fn results() -> Vec<&'static str> {
    std::iter::once("ok")
        .chain(Unstated::ALL.map(Unstated::label))
        .collect()
}

impl DiscoveryMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<DiscoveryMetrics> {
        Ok(DiscoveryMetrics {
            queries: metrics.counters(
                "wxgate_quota_discovery_queries_total",
                "quota/get calls wxgate made to learn a key's limits, by what they came to: ok, or why WeChat stated nothing (unknown_api 76021, not_queryable 76022, token, other, no_answer), or not_sent (no quota turn for quota/get itself).",
                &[Label::new("result", results())],
            )?,
            daily_used_max: metrics.float_gauge(
                "wxgate_quota_daily_used_ratio_max",
                "The highest share of its daily quota a key has used, among the keys WeChat stated a daily limit for (as of the last quota/get of each); 0 with none.",
            )?,
        })
    }

    /// A query came to `result`.
    pub fn queried(&self, result: Result<(), Unstated>) {
        let index = match result {
            Ok(()) => 0,
            Err(unstated) => {
                1 + Unstated::ALL
                    .iter()
                    .position(|u| *u == unstated)
                    .unwrap_or(0)
            }
        };
        self.queries.get(index).inc();
    }
}
