//! The quota's own metrics: the keys by the source of their limit, the changes of learned
//! limits, and (daily quotas) the keys WeChat's 45009 blocked and the calls wxgate answered
//! for them.

use prometheus::{IntCounter, IntGauge};
use wxgate_contract::LimitSource;

use crate::metrics::{api_label, Label, Metrics, Series};
use crate::wechat::Api;

/// How a learned limit changed: the `direction` label of
/// `wxgate_quota_learned_changes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LearnedChange {
    /// WeChat's 45011 taught a lower figure.
    Lowered,
    /// A step of the climb.
    Raised,
    /// The climb reached the configured figure: learning ended.
    Ended,
}

impl LearnedChange {
    const ALL: [LearnedChange; 3] = [
        LearnedChange::Lowered,
        LearnedChange::Raised,
        LearnedChange::Ended,
    ];

    fn label(self) -> &'static str {
        match self {
            LearnedChange::Lowered => "lowered",
            LearnedChange::Raised => "raised",
            LearnedChange::Ended => "ended",
        }
    }
}

/// The handles of the quota's metrics.
pub struct QuotaMetrics {
    keys_by_source: Series<IntGauge>,
    learned_changes: Series<IntCounter>,
    local_daily: Series<IntCounter>,
    daily_blocked: IntGauge,
}

impl QuotaMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<QuotaMetrics> {
        Ok(QuotaMetrics {
            keys_by_source: metrics.gauges(
                "wxgate_quota_keys_by_source",
                "(appid, API) pairs with recent traffic, by where the limit in force comes from: config, wechat (quota/get), learned (from 45011), default.",
                &[Label::new("source", LimitSource::ALL.map(LimitSource::label))],
            )?,
            learned_changes: metrics.counters(
                "wxgate_quota_learned_changes_total",
                "Changes of limits learned from WeChat's 45011: lowered (a 45011 taught a lower figure), raised (a step of the climb back), ended (back at the configured figure).",
                &[Label::new("direction", LearnedChange::ALL.map(LearnedChange::label))],
            )?,
            local_daily: metrics.counters(
                "wxgate_quota_local_daily_answers_total",
                "Calls wxgate answered 45009 itself, sending nothing, because WeChat's daily quota of their key was spent.",
                &[api_label()],
            )?,
            daily_blocked: metrics.gauge(
                "wxgate_quota_daily_blocked_keys",
                "(appid, API) pairs whose daily quota WeChat said is spent (45009), answered locally until WeChat's midnight.",
            )?,
        })
    }

    /// A learned limit changed.
    pub fn learned(&self, change: LearnedChange) {
        let index = LearnedChange::ALL
            .iter()
            .position(|c| *c == change)
            .unwrap_or(0);
        self.learned_changes.get(index).inc();
    }

    /// Sets the keys by source.
    pub fn set_keys_by_source(&self, counts: [i64; LimitSource::ALL.len()]) {
        for (index, count) in counts.into_iter().enumerate() {
            self.keys_by_source.get(index).set(count);
        }
    }

    /// wxgate answered a call of `api` 45009 itself.
    pub fn local_daily(&self, api: Api) {
        self.local_daily.get(api.index()).inc();
    }

    /// Sets the keys blocked for the day.
    pub fn set_daily_blocked(&self, keys: usize) {
        self.daily_blocked.set(keys as i64);
    }
}
