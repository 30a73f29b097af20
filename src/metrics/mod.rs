//! wxgate's Prometheus metrics: the registry every component registers its own families
//! with, and the one way a family is built, so that each is written once (its name, help,
//! labels and buckets in one call that creates and registers it).
//!
//! The registry is passed in (no global registry, so several proxies in one test process do
//! not collide). Each component keeps a struct of handles to its own families, registered
//! against it as linkerd2-proxy's components do: the proxy's requests
//! (`proxy::RequestMetrics`), the upstream calls (`dispatch::CallMetrics`), the code cache's
//! and the token cache's, the cluster's, the connections' and the reloads'. This module knows
//! none of them.
//!
//! Every label value comes from a bounded set (an enum's labels), and every series is
//! created when its family is: a dashboard sees zeros rather than gaps, and the hot path
//! indexes a table ([`Series`]) instead of hashing label values.

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::wechat::Api;

/// Latency buckets in seconds, of requests and of upstream calls. The low end resolves the
/// sub-millisecond cost of a cache hit or a loopback upstream; the high end covers requests
/// held across a 45011 into the next minute (`retry.max_hold_ms`, 65 s by default).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// The registry wxgate's metrics live in, with the build information and the process's
/// own metrics registered. Components register their families through it.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Registers the build information and the process metrics with `registry`, which the
    /// components then register their families with.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let metrics = Metrics {
            registry: registry.clone(),
        };
        let build_info = metrics.gauges(
            "wxgate_build_info",
            "Always 1; the version label says which wxgate runs.",
            &[Label::new("version", [env!("CARGO_PKG_VERSION")])],
        )?;
        build_info.get(0).set(1);
        // process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total...: the
        // standard process metrics, for memory and file-descriptor panels and alerts.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// A counter without labels.
    pub fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::new(name, help)?)
    }

    /// A gauge of whole numbers without labels.
    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.register(IntGauge::new(name, help)?)
    }

    /// A gauge of real numbers without labels.
    pub fn float_gauge(&self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.register(Gauge::new(name, help)?)
    }

    /// Counters, one per combination of `labels`' values.
    pub fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
    ) -> prometheus::Result<Series<IntCounter>> {
        let vec = IntCounterVec::new(Opts::new(name, help), &names(labels))?;
        self.series(vec, labels)
    }

    /// Gauges of whole numbers, one per combination of `labels`' values.
    pub fn gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
    ) -> prometheus::Result<Series<IntGauge>> {
        let vec = IntGaugeVec::new(Opts::new(name, help), &names(labels))?;
        self.series(vec, labels)
    }

    /// Histograms with `buckets`, one per combination of `labels`' values.
    pub fn histograms(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[Label],
    ) -> prometheus::Result<Series<Histogram>> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let vec = HistogramVec::new(opts, &names(labels))?;
        self.series(vec, labels)
    }

    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }

    /// Registers `vec` and creates every one of its series.
    fn series<B>(&self, vec: MetricVec<B>, labels: &[Label]) -> prometheus::Result<Series<B::M>>
    where
        B: MetricVecBuilder,
        MetricVec<B>: Collector + Clone + 'static,
    {
        let vec = self.register(vec)?;
        let (first, second) = match labels {
            [first] => (first, None),
            [first, second] => (first, Some(second)),
            _ => unreachable!("wxgate's families have one or two labels"),
        };
        let width = second.map_or(1, |second| second.values.len());
        let mut all = Vec::with_capacity(first.values.len() * width);
        for a in &first.values {
            match second {
                None => all.push(vec.with_label_values(&[*a])),
                Some(second) => {
                    for b in &second.values {
                        all.push(vec.with_label_values(&[*a, *b]));
                    }
                }
            }
        }
        Ok(Series {
            all: all.into_boxed_slice(),
            width,
        })
    }
}

/// One label of a family: its name, and every value it takes, in the order of the indexes
/// its series are found by.
pub struct Label {
    name: &'static str,
    values: Vec<&'static str>,
}

impl Label {
    /// The label `name` with `values`.
    pub fn new(name: &'static str, values: impl IntoIterator<Item = &'static str>) -> Label {
        Label {
            name,
            values: values.into_iter().collect(),
        }
    }
}

/// The `api` label: every [`Api`], in index order (so a series is found by [`Api::index`]).
pub fn api_label() -> Label {
    Label::new("api", Api::ALL.map(Api::label))
}

fn names(labels: &[Label]) -> Vec<&'static str> {
    labels.iter().map(|label| label.name).collect()
}

/// Every series of a family, created with it, found by the positions of its label values.
#[derive(Clone)]
pub struct Series<M> {
    all: Box<[M]>,
    /// How many values the second label takes (1 for a family of one label).
    width: usize,
}

impl<M> Series<M> {
    /// The series of a one-label family whose value is at `index`.
    pub fn get(&self, index: usize) -> &M {
        &self.all[index]
    }

    /// The series of a two-label family whose values are at `first` and `second`.
    pub fn get2(&self, first: usize, second: usize) -> &M {
        &self.all[first * self.width + second]
    }
}

/// Renders a registry as Prometheus text, for the tests of the components' metrics.
#[cfg(test)]
pub fn exposition(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    String::from_utf8(text).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start_and_two_registries_coexist() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let table = metrics
            .counters(
                "test_total",
                "A test.",
                &[
                    Label::new("a", ["x", "y"]),
                    Label::new("b", ["1", "2", "3"]),
                ],
            )
            .unwrap();
        table.get2(1, 2).inc();
        let text = exposition(&registry);
        assert!(text.contains("test_total{a=\"y\",b=\"3\"} 1"), "{text}");
        assert!(text.contains("test_total{a=\"x\",b=\"1\"} 0"), "{text}");
        assert!(text.contains("wxgate_build_info{version="), "{text}");
        // Two proxies in one process do not collide.
        Metrics::new(&Registry::new()).unwrap();
    }
}
