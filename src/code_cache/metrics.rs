//! The code cache's metrics: look-ups by where (this process's memory, or Redis with
//! `[cluster]`) and what they found, and how many answers are remembered.

use prometheus::{IntCounter, IntGauge};
use wxgate_contract::CacheStatus;

use crate::metrics::{Label, Metrics, Series};

/// The handles of the code cache's metrics.
#[derive(Clone)]
pub struct CodeCacheMetrics {
    /// By [`Tier`] and [`CacheStatus::index`].
    lookups: Series<IntCounter>,
    /// Code-exchange answers remembered right now.
    pub entries: IntGauge,
}

/// Where an exchange's answer was looked for: the `tier` label of
/// `wxgate_code_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// This process's memory.
    Local,
    /// Redis, shared by the replicas (with `[cluster]`).
    Redis,
}

impl Tier {
    /// Every value, in label order.
    const ALL: [Tier; 2] = [Tier::Local, Tier::Redis];

    fn label(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Redis => "redis",
        }
    }
}

impl CodeCacheMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<CodeCacheMetrics> {
        Ok(CodeCacheMetrics {
            lookups: metrics.counters(
                "wxgate_code_cache_lookups_total",
                "Code-exchange answers looked for, by where (local memory, or Redis with [cluster]) and what was found.",
                &[
                    Label::new("tier", Tier::ALL.map(Tier::label)),
                    Label::new("result", CacheStatus::ALL.map(CacheStatus::lookup_label)),
                ],
            )?,
            entries: metrics.gauge(
                "wxgate_code_cache_entries",
                "Code-exchange answers remembered right now.",
            )?,
        })
    }

    /// An exchange's answer was looked for in `tier`, and found as `found` says.
    pub fn lookup(&self, tier: Tier, found: CacheStatus) {
        self.lookups.get2(tier as usize, found.index()).inc();
    }
}
