//! The token cache's metrics. Labels are bounded: `api` is one of the three token APIs,
//! `outcome` one of [`TokenOutcome`]; no metric names an appid. Every series exists from the
//! start.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::token_cache::TokenKind;

pub use wxgate_contract::TokenOutcome;

/// The handles of the token cache's metrics, by [`TokenKind::index`].
#[derive(Clone)]
pub struct TokenMetrics {
    requests: Vec<Vec<IntCounter>>,
    fetches: Vec<IntCounter>,
    fetches_today_max: Vec<IntGauge>,
    /// `wxgate_token_expiry_seconds`: the lowest remaining lifetime of any cached token
    /// (NaN while none is cached).
    pub expiry: Gauge,
}

impl TokenMetrics {
    /// Creates every series and registers it with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<TokenMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "wxgate_token_requests_total",
                "Token requests answered by the token cache, by API and outcome (hit, fetched, refreshed: a hit that started the refresh ahead of expiry, rejected: another secret than the cached token's).",
            ),
            &["api", "outcome"],
        )?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "wxgate_token_fetches_total",
                "Token fetches the token cache sent to WeChat that got an answer (refreshes and fetches for other secrets included).",
            ),
            &["api"],
        )?;
        let fetches_today_max = IntGaugeVec::new(
            Opts::new(
                "wxgate_token_fetches_today_max",
                "The most token fetches of any one appid today (the day begins at midnight UTC+8, as WeChat's daily quota; /cgi-bin/token allows 2000).",
            ),
            &["api"],
        )?;
        let expiry = Gauge::new(
            "wxgate_token_expiry_seconds",
            "The lowest remaining lifetime of any cached token, in seconds (NaN while none is cached).",
        )?;
        expiry.set(f64::NAN);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(fetches_today_max.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        let label = |kind: &TokenKind| kind.api().label();
        Ok(TokenMetrics {
            requests: TokenKind::ALL
                .iter()
                .map(|kind| {
                    TokenOutcome::ALL
                        .iter()
                        .map(|outcome| requests.with_label_values(&[label(kind), outcome.label()]))
                        .collect()
                })
                .collect(),
            fetches: TokenKind::ALL
                .iter()
                .map(|kind| fetches.with_label_values(&[label(kind)]))
                .collect(),
            fetches_today_max: TokenKind::ALL
                .iter()
                .map(|kind| fetches_today_max.with_label_values(&[label(kind)]))
                .collect(),
            expiry,
        })
    }

    /// A token request was answered.
    pub fn request(&self, kind: TokenKind, outcome: TokenOutcome) {
        self.requests[kind.index()][outcome.index()].inc();
    }

    /// A fetch got WeChat's answer.
    pub fn fetch(&self, kind: TokenKind) {
        self.fetches[kind.index()].inc();
    }

    /// The highest count of any appid's fetches today.
    pub fn set_fetches_today_max(&self, kind: TokenKind, count: u64) {
        self.fetches_today_max[kind.index()].set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn series_exist_from_the_start_without_appids() {
        let registry = Registry::new();
        let metrics = TokenMetrics::new(&registry).unwrap();
        metrics.request(TokenKind::Stable, TokenOutcome::Rejected);
        metrics.fetch(TokenKind::Token);
        metrics.set_fetches_today_max(TokenKind::Token, 3);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "wxgate_token_requests_total{api=\"/cgi-bin/stable_token\",outcome=\"rejected\"} 1",
            "wxgate_token_requests_total{api=\"/cgi-bin/component/api_component_token\",outcome=\"hit\"} 0",
            "wxgate_token_fetches_total{api=\"/cgi-bin/token\"} 1",
            "wxgate_token_fetches_today_max{api=\"/cgi-bin/token\"} 3",
            "wxgate_token_expiry_seconds NaN",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A second registry, a second set: proxies in one process do not collide.
        TokenMetrics::new(&Registry::new()).unwrap();
    }
}
