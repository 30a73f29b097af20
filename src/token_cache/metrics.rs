//! The token cache's metrics. Labels are bounded: `api` is one of the three token APIs,
//! `outcome` one of [`TokenOutcome`]; no metric names an appid. Every series exists from the
//! start.

use prometheus::{Gauge, IntCounter, IntGauge};
pub use wxgate_contract::TokenOutcome;

use super::TokenKind;
use crate::metrics::{Label, Metrics, Series};

/// The handles of the token cache's metrics, by [`TokenKind::index`].
#[derive(Clone)]
pub struct TokenMetrics {
    requests: Series<IntCounter>,
    fetches: Series<IntCounter>,
    fetches_today_max: Series<IntGauge>,
    /// `wxgate_token_expiry_seconds`: the lowest remaining lifetime of any cached token
    /// (NaN while none is cached).
    pub expiry: Gauge,
    /// `wxgate_token_cache_entries`: keys holding a token or a refused token's memory (set
    /// by the slots, see `slots.rs`).
    pub entries: IntGauge,
}

impl TokenMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<TokenMetrics> {
        let api = || Label::new("api", TokenKind::ALL.map(|kind| kind.api().label()));
        let expiry = metrics.float_gauge(
            "wxgate_token_expiry_seconds",
            "The lowest remaining lifetime of any cached token, in seconds (NaN while none is cached).",
        )?;
        expiry.set(f64::NAN);
        let entries = metrics.gauge(
            "wxgate_token_cache_entries",
            "Keys (API, appid) the token cache holds a token for, or a refused token's memory until it expires; at most token_cache.max_entries.",
        )?;
        Ok(TokenMetrics {
            requests: metrics.counters(
                "wxgate_token_requests_total",
                "Token requests answered by the token cache, by API and outcome (hit, fetched, refreshed: a hit that started the refresh ahead of expiry, rejected: another secret than the cached token's).",
                &[api(), Label::new("outcome", TokenOutcome::ALL.map(TokenOutcome::label))],
            )?,
            fetches: metrics.counters(
                "wxgate_token_fetches_total",
                "Token fetches the token cache sent to WeChat that got an answer, a token or an error (refreshes and fetches for other secrets included).",
                &[api()],
            )?,
            fetches_today_max: metrics.gauges(
                "wxgate_token_fetches_today_max",
                "The most token fetches of any one appid today that minted a token (the day begins at midnight UTC+8, as WeChat's daily quota; /cgi-bin/token allows 2000).",
                &[api()],
            )?,
            expiry,
            entries,
        })
    }

    /// A token request was answered.
    pub fn answered(&self, kind: TokenKind, outcome: TokenOutcome) {
        self.requests.get2(kind.index(), outcome.index()).inc();
    }

    /// A fetch got WeChat's answer.
    pub fn fetch(&self, kind: TokenKind) {
        self.fetches.get(kind.index()).inc();
    }

    /// The highest count of any appid's fetches today.
    pub fn set_fetches_today_max(&self, kind: TokenKind, count: u64) {
        self.fetches_today_max
            .get(kind.index())
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition;
    use prometheus::Registry;

    #[test]
    fn series_exist_from_the_start_without_appids() {
        let registry = Registry::new();
        let metrics = TokenMetrics::new(&Metrics::new(&registry).unwrap()).unwrap();
        metrics.answered(TokenKind::Stable, TokenOutcome::Rejected);
        metrics.fetch(TokenKind::Token);
        metrics.set_fetches_today_max(TokenKind::Token, 3);
        let text = exposition(&registry);
        for line in [
            "wxgate_token_requests_total{api=\"/cgi-bin/stable_token\",outcome=\"rejected\"} 1",
            "wxgate_token_requests_total{api=\"/cgi-bin/component/api_component_token\",outcome=\"hit\"} 0",
            "wxgate_token_fetches_total{api=\"/cgi-bin/token\"} 1",
            "wxgate_token_fetches_today_max{api=\"/cgi-bin/token\"} 3",
            "wxgate_token_expiry_seconds NaN",
            "wxgate_token_cache_entries 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A second registry, a second set: proxies in one process do not collide.
        TokenMetrics::new(&Metrics::new(&Registry::new()).unwrap()).unwrap();
    }
}
