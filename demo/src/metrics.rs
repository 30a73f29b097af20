//! What wxgate's `/metrics` say: the Prometheus text format read by a small parser of the
//! demo's own, and the sums over every API that the table needs ([`MetricsCounts`]).

use wxgate_contract::{Outcome, RetryReason, TokenOutcome};

/// The sums of wxgate's `/metrics` the table needs, over every API.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsCounts {
    /// `wxgate_requests_total` by outcome, in [`Outcome::ALL`] order.
    pub requests: [u64; Outcome::ALL.len()],
    /// `wxgate_upstream_requests_total`: calls WeChat answered.
    pub upstream_answers: u64,
    /// `wxgate_upstream_transport_errors_total`: calls without an answer.
    pub transport_errors: u64,
    /// Of those, `reason="connect"`: never reached WeChat.
    pub connect_errors: u64,
    /// `wxgate_upstream_quota_exceeded_total`: WeChat's 45011 answers.
    pub upstream_45011: u64,
    /// `wxgate_retries_total` by reason, in [`RetryReason::ALL`] order.
    pub retries: [u64; RetryReason::ALL.len()],
    /// `wxgate_quota_wait_seconds_count`: calls that waited for a quota turn.
    pub quota_waits: u64,
    /// `wxgate_quota_wait_seconds_sum`.
    pub quota_wait_seconds: f64,
    /// The smallest histogram bucket holding every wait, if any waited.
    pub quota_wait_within: Option<f64>,
    /// `wxgate_token_requests_total{outcome="refreshed"}`: token requests that started a
    /// refresh ahead of expiry, each one upstream call that no client request made.
    pub token_refreshes: u64,
    /// `wxgate_token_fetches_total`: token fetches wxgate sent to WeChat.
    pub token_fetches: u64,
    /// `wxgate_quota_discovery_queries_total` but `result="not_sent"`: quota/get calls wxgate
    /// made on its own to learn WeChat's limits, each one upstream call no client request
    /// made.
    pub limit_queries: u64,
}

impl MetricsCounts {
    /// Reads Prometheus text.
    pub fn from_text(text: &str) -> MetricsCounts {
        let samples = parse_samples(text);
        let sum = |name: &str, labels: &[(&str, &str)]| -> u64 {
            sum_samples(&samples, name, labels).round() as u64
        };
        let mut requests = [0; Outcome::ALL.len()];
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            requests[i] = sum("wxgate_requests_total", &[("outcome", outcome.label())]);
        }
        let mut retries = [0; RetryReason::ALL.len()];
        for (i, reason) in RetryReason::ALL.iter().enumerate() {
            retries[i] = sum("wxgate_retries_total", &[("reason", reason.label())]);
        }
        let quota_waits = sum("wxgate_quota_wait_seconds_count", &[]);
        MetricsCounts {
            requests,
            upstream_answers: sum("wxgate_upstream_requests_total", &[]),
            transport_errors: sum("wxgate_upstream_transport_errors_total", &[]),
            connect_errors: sum(
                "wxgate_upstream_transport_errors_total",
                &[("reason", "connect")],
            ),
            upstream_45011: sum("wxgate_upstream_quota_exceeded_total", &[]),
            retries,
            quota_waits,
            quota_wait_seconds: sum_samples(&samples, "wxgate_quota_wait_seconds_sum", &[]),
            token_refreshes: sum(
                "wxgate_token_requests_total",
                &[("outcome", TokenOutcome::Refreshed.label())],
            ),
            token_fetches: sum("wxgate_token_fetches_total", &[]),
            limit_queries: sum("wxgate_quota_discovery_queries_total", &[]).saturating_sub(sum(
                "wxgate_quota_discovery_queries_total",
                &[("result", "not_sent")],
            )),
            quota_wait_within: (quota_waits > 0)
                .then(|| {
                    bucket_holding_all(&samples, "wxgate_quota_wait_seconds_bucket", quota_waits)
                })
                .flatten(),
        }
    }

    /// `wxgate_requests_total{outcome}` over every API.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.requests[outcome.index()]
    }

    /// `wxgate_retries_total{reason}` over every API.
    pub fn retries(&self, reason: RetryReason) -> u64 {
        RetryReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.retries[i])
    }

    /// Every client request wxgate answered.
    pub fn client_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Every retry.
    pub fn all_retries(&self) -> u64 {
        self.retries.iter().sum()
    }

    /// Calls that reached WeChat, by wxgate's count: answered, or sent and not answered.
    pub fn upstream_calls(&self) -> u64 {
        self.upstream_answers + self.transport_errors
            - self.connect_errors.min(self.transport_errors)
    }
}

/// One series of Prometheus text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the text exposition format (what wxgate's `/metrics` writes); lines it cannot read
/// are skipped.
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(line.get(open + 1..close)?)?,
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(char::is_whitespace)?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// `a="x",b="y\"z"` → pairs, with `\\`, `\"` and `\n` unescaped.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(labels)
}

fn sum_samples(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// The smallest finite `le` whose cumulative count (over every API) is the whole count.
fn bucket_holding_all(samples: &[Sample], name: &str, count: u64) -> Option<f64> {
    let mut bounds: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == "le"))
        .filter_map(|(_, le)| parse_value(le))
        .filter(|le| le.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds.into_iter().find(|&le| {
        let cumulative: f64 = samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| k == "le" && parse_value(v) == Some(le))
            })
            .map(|s| s.value)
            .sum();
        cumulative.round() as u64 >= count
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_with_labels_escapes_and_buckets() {
        let text = r#"
# HELP wxgate_requests_total Client requests.
# TYPE wxgate_requests_total counter
wxgate_requests_total{api="/sns/jscode2session",outcome="cache_hit"} 3
wxgate_requests_total{api="/cgi-bin/token",outcome="cache_hit"} 2
wxgate_requests_total{api="other",outcome="forwarded"} 7
odd_metric{note="a \"quoted\", comma\\"} 1.5 1700000000
wxgate_quota_wait_seconds_bucket{api="a",le="0.5"} 1
wxgate_quota_wait_seconds_bucket{api="b",le="0.5"} 0
wxgate_quota_wait_seconds_bucket{api="a",le="1"} 2
wxgate_quota_wait_seconds_bucket{api="b",le="1"} 2
wxgate_quota_wait_seconds_bucket{api="a",le="+Inf"} 2
wxgate_quota_wait_seconds_bucket{api="b",le="+Inf"} 2
wxgate_quota_wait_seconds_count{api="a"} 2
wxgate_quota_wait_seconds_count{api="b"} 2
wxgate_quota_wait_seconds_sum{api="a"} 1.25
unlabelled 4
"#;
        let samples = parse_samples(text);
        assert_eq!(
            sum_samples(
                &samples,
                "wxgate_requests_total",
                &[("outcome", "cache_hit")]
            ),
            5.0
        );
        assert_eq!(sum_samples(&samples, "wxgate_requests_total", &[]), 12.0);
        assert_eq!(sum_samples(&samples, "unlabelled", &[]), 4.0);
        let odd = samples.iter().find(|s| s.name == "odd_metric").unwrap();
        assert_eq!(
            odd.labels,
            vec![("note".into(), "a \"quoted\", comma\\".into())]
        );
        assert_eq!(odd.value, 1.5);
        assert_eq!(
            bucket_holding_all(&samples, "wxgate_quota_wait_seconds_bucket", 4),
            Some(1.0)
        );
        let counts = MetricsCounts::from_text(text);
        assert_eq!(counts.outcome(Outcome::CacheHit), 5);
        assert_eq!(counts.outcome(Outcome::Forwarded), 7);
        assert_eq!(counts.quota_waits, 4);
        assert_eq!(counts.quota_wait_within, Some(1.0));
    }
}
